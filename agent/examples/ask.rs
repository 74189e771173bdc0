//! The asking side of request/reply under `mas run`: sends `init_kwargs.count` (default 10)
//! `echo` requests to `init_kwargs.target` (default `echo`), one at a time, and prints each
//! answer with its round-trip time (and appends `n answered_by` to `init_kwargs.record`, if
//! given). Then it waits for SIGTERM, so the runner does not restart it.

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;
    use std::time::Instant;

    use mas_agent::{AgentBuilder, AgentConfig};

    #[derive(serde::Deserialize)]
    struct Settings {
        #[serde(default = "echo")]
        target: String,
        #[serde(default = "ten")]
        count: u64,
        record: Option<std::path::PathBuf>,
    }
    fn echo() -> String {
        "echo".into()
    }
    fn ten() -> u64 {
        10
    }

    let settings: Settings = mas_agent::init_kwargs()?;
    let agent = AgentBuilder::new(AgentConfig::from_env()?).start().await?;
    // The runner starts agents together; a request to an agent not yet connected is refused,
    // so wait (bounded) until discovery shows the target live.
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while !agent.discover(&[]).await?.iter().any(|a| a.agent_id == settings.target) {
        if Instant::now() > deadline {
            return Err(format!("{} did not come up within 30 s", settings.target).into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for n in 0..settings.count {
        let started = Instant::now();
        // `ask` is bounded by the default request timeout (60 s, as in the reference).
        let answer = agent.ask(&settings.target, "echo", &serde_json::json!({ "n": n })).await?;
        let by = answer.data.get("answered_by").cloned().unwrap_or_default();
        println!("answer {n} from instance {by} in {:?}", started.elapsed());
        if let Some(path) = &settings.record {
            writeln!(std::fs::OpenOptions::new().create(true).append(true).open(path)?, "{n} {by}")?;
        }
    }
    mas_agent::shutdown_signal().await;
    agent.stop().await;
    Ok(())
}
