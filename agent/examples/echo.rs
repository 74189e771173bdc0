//! The answering side of request/reply under `mas run`: every `echo` request is answered with
//! an `echo_reply` carrying the same payload and the instance that answered. Run it with
//! `instances: 2` and the requests are shared between the two processes.

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use mas_agent::{AgentBuilder, AgentConfig, Message};

    let instance = mas_agent::instance_index()?;
    let agent = AgentBuilder::new(AgentConfig::from_env()?)
        .on("echo", move |_, request: Message<serde_json::Map<String, serde_json::Value>>| async move {
            let mut answer = request.payload.clone();
            answer.insert("answered_by".into(), instance.into());
            request.reply("echo_reply", &answer).await?;
            Ok(())
        })
        .start()
        .await?;
    mas_agent::shutdown_signal().await;
    agent.stop().await;
    Ok(())
}
