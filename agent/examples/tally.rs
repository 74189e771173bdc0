//! The end of a pipeline, with typed state: counts the distinct jobs it has received in its
//! durable state (loaded at start by `with_state`, so a restarted process continues the count), appends each
//! new job id to `init_kwargs.record` if given, and tells `init_kwargs.notify` (if given)
//! with a `done` message.
//!
//! Delivery is at least once, so a job can arrive twice; the state's `jobs` list makes the
//! count exact.

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;

    use mas_agent::{AgentBuilder, AgentConfig, Message};

    #[derive(serde::Deserialize)]
    struct Settings {
        record: Option<std::path::PathBuf>,
        notify: Option<String>,
    }

    #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
    struct Tally {
        jobs: Vec<u64>,
    }

    #[derive(serde::Deserialize)]
    struct Job {
        job: u64,
    }

    let settings: Settings = mas_agent::init_kwargs()?;
    let agent = AgentBuilder::new(AgentConfig::from_env()?)
        // Loaded at start, before the first delivery; a stored state that does not decode
        // fails the start instead of being silently reset.
        .with_state::<Tally>()
        .on("job", move |agent, message: Message<Job>| {
            let (record, notify) = (settings.record.clone(), settings.notify.clone());
            async move {
                let job = message.payload.job;
                let state = agent.state::<Tally>()?;
                let mut tally = state.lock().await;
                if !tally.get().jobs.contains(&job) {
                    let mut jobs = tally.get().jobs.clone();
                    jobs.push(job);
                    if let Err(err) = tally.update(serde_json::Map::from_iter([("jobs".into(), jobs.into())])).await {
                        tally.refresh().await?;
                        return Err(err.into());
                    }
                    if let Some(path) = &record {
                        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                        writeln!(file, "{job}")?;
                    }
                }
                if let Some(notify) = &notify {
                    agent.send(notify, "done", &serde_json::json!({ "job": job })).await?;
                }
                Ok(())
            }
        })
        .start()
        .await?;
    mas_agent::shutdown_signal().await;
    agent.stop().await;
    Ok(())
}
