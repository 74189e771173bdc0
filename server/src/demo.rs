//! `mas demo`: a broker on 127.0.0.1 with the embedded store and fresh dev certificates, plus
//! two agents; alice greets bob once a second and bob prints what he receives. Ctrl-C stops
//! the agents, drains the broker and exits with code 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use mas_agent::{AgentBuilder, AgentConfig, HandlerError, Message};
use mas_core::ids::AgentId;
use serde::{Deserialize, Serialize};

use crate::config::{AgentDefinition, BrokerConfig};
use crate::{Broker, serve};

/// The demo's message.
#[derive(Debug, Serialize, Deserialize)]
struct Greeting {
    n: u64,
    text: String,
}

/// Runs the demo until `shutdown` resolves or `max_messages` greetings were delivered.
pub async fn run(
    certs_dir: &Path,
    listen: SocketAddr,
    max_messages: Option<u64>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let alice = AgentId::new("alice")?;
    let bob = AgentId::new("bob")?;
    let pki = mas_net::pki::write_dev_pki(certs_dir, &[alice.clone(), bob.clone()])
        .with_context(|| format!("writing dev certificates to {}", certs_dir.display()))?;
    println!("dev certificates written to {}", certs_dir.display());

    let agents = BTreeMap::from([
        (alice.clone(), AgentDefinition::allowing(&[bob.as_str()])),
        (bob.clone(), AgentDefinition::allowing::<&str>(&[])),
    ]);
    let broker = Broker::connect(BrokerConfig::new(listen, agents)).await?;
    let bound = serve::bind(listen).await?;
    let addr = bound.local_addr;
    let tls = pki.server.load()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let broker = broker.clone();
        async move {
            serve::serve_tls(broker, bound, &tls, async {
                let _ = stop_rx.await;
            })
            .await
        }
    });
    println!("broker listening on {addr} (mTLS, embedded store)");

    let endpoint = format!("https://{addr}");
    let (delivered_tx, mut delivered_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let bob_agent = AgentBuilder::new(AgentConfig::new(bob.clone(), endpoint.clone(), pki.agent(&bob)))
        .on("greeting", move |_agent, msg: Message<Greeting>| {
            let delivered = delivered_tx.clone();
            async move {
                println!("bob received from {}: #{} {:?}", msg.envelope.sender_id, msg.payload.n, msg.payload.text);
                let _ = delivered.send(msg.payload.n);
                Ok::<(), HandlerError>(())
            }
        })
        .start()
        .await
        .context("starting bob")?;
    let alice_agent = AgentBuilder::new(AgentConfig::new(alice.clone(), endpoint, pki.agent(&alice)))
        .start()
        .await
        .context("starting alice")?;
    println!("alice and bob connected; alice greets bob every second (Ctrl-C to stop)");

    let mut shutdown = Box::pin(shutdown);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut sent = 0u64;
    let mut received = 0u64;
    loop {
        if max_messages.is_some_and(|max| received >= max) {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = delivered_rx.recv() => received += 1,
            _ = ticker.tick(), if max_messages.is_none_or(|max| sent < max) => {
                sent += 1;
                let greeting = Greeting { n: sent, text: format!("hello bob, this is greeting {sent}") };
                match alice_agent.send(bob.as_str(), "greeting", &greeting).await {
                    Ok(id) => println!("alice sent #{sent} (message id {id})"),
                    Err(err) => println!("alice could not send #{sent}: {err}"),
                }
            }
        }
    }
    println!("stopping: agents first, then the broker drains");
    alice_agent.stop().await;
    bob_agent.stop().await;
    let _ = stop_tx.send(());
    server.await.context("broker task")??;
    println!("stopped cleanly ({sent} sent, {received} delivered)");
    Ok(())
}
