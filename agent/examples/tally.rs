//! The end of a pipeline, with typed state: counts the distinct jobs it has received in its
//! durable state (loaded at start, so a restarted process continues the count), appends each
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
    use std::sync::Arc;

    use mas_agent::{AgentBuilder, AgentConfig, Message, TypedState};
    use tokio::sync::Mutex;

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
    let state: Arc<Mutex<Option<TypedState<Tally>>>> = Arc::default();
    let (handler_state, loaded) = (state.clone(), state.clone());
    let agent = AgentBuilder::new(AgentConfig::from_env()?)
        .on("job", move |agent, message: Message<Job>| {
            let (state, record, notify) = (handler_state.clone(), settings.record.clone(), settings.notify.clone());
            async move {
                let job = message.payload.job;
                let mut guard = state.lock().await;
                let Some(tally) = guard.as_mut() else { return Err("state not loaded yet".into()) };
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
        // The durable state, loaded once the transport is ready; a stored state that does not
        // decode stops the agent instead of being silently reset.
        .on_start(move |agent| {
            let loaded = loaded.clone();
            async move {
                *loaded.lock().await = Some(TypedState::load(&agent).await?);
                Ok(())
            }
        })
        .start()
        .await?;
    mas_agent::shutdown_signal().await;
    agent.stop().await;
    Ok(())
}
