//! A pipeline stage for `mas run`: every message it receives is forwarded to the agent named
//! by `init_kwargs.next` (with `"via"` naming this stage), or, without a `next`, printed.
//! With `init_kwargs.emit: N` it also sends N numbered `job` messages to `next` at start,
//! which makes it the head of a pipeline.
//!
//! Run it under `mas run` (see `examples/pipeline/mas.yaml`); it reads its connection
//! settings from the environment the runner sets, and stops cleanly on SIGTERM.

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use mas_agent::{AgentBuilder, AgentConfig, HandlerError};

    #[derive(serde::Deserialize)]
    struct Settings {
        next: Option<String>,
        #[serde(default)]
        emit: u64,
    }

    let settings: Settings = mas_agent::init_kwargs()?;
    let next = settings.next.clone();
    let config = AgentConfig::from_env()?;
    let label = format!("{}#{}", config.agent_id, mas_agent::instance_index()?);
    let agent = AgentBuilder::new(config)
        .fallback(move |agent, envelope| {
            let (next, label) = (next.clone(), label.clone());
            async move {
                let mut data = envelope.data.clone();
                data.insert("via".into(), label.clone().into());
                match &next {
                    Some(next) => {
                        agent.send(next, &envelope.message_type, &data).await?;
                    }
                    None => println!("{label} received {} {}", envelope.message_type, serde_json::Value::Object(data)),
                }
                Ok::<(), HandlerError>(())
            }
        })
        .start()
        .await?;
    if let Some(next) = &settings.next {
        for job in 0..settings.emit {
            agent.send(next, "job", &serde_json::json!({ "job": job })).await?;
        }
    }
    mas_agent::shutdown_signal().await;
    agent.stop().await;
    Ok(())
}
