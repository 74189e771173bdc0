//! `mas demo`: a broker on 127.0.0.1 with the embedded store and fresh dev certificates, plus
//! two agents; alice greets bob once a second and bob prints what he receives. Ctrl-C stops
//! the agents, drains the broker and exits with code 0.
//!
//! The broker never links the agent SDK, so the demo's agents are plain clients of the
//! generated `mas.runtime.v1` stubs over mTLS, as any third-party client would be.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use mas_core::ids::AgentId;
use mas_net::client::{RuntimeClient, runtime_client};
use mas_net::tls::TlsFiles;
use mas_proto::runtime::{Ack, ClientEvent, Delivery, Hello, SendRequest, ServerEvent, client_event, server_event};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::Endpoint;

use mas_core::envelope::Envelope;

use crate::config::{AgentDefinition, BrokerConfig};
use crate::{Broker, serve};

/// The demo's message.
#[derive(Debug, Serialize, Deserialize)]
struct Greeting {
    n: u64,
    text: String,
}

/// Runs the demo until `shutdown` resolves or `max_messages` greetings were delivered; with
/// `admin`, metrics and health probes are served there (a busy port only costs a warning).
pub async fn run(
    certs_dir: &Path,
    listen: SocketAddr,
    admin: Option<SocketAddr>,
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
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_task = match admin {
        Some(at) => match crate::admin::bind(at).await {
            Ok(listener) => {
                let base = format!("http://{}", listener.local_addr);
                println!("metrics on {base}/metrics, probes on {base}/healthz and {base}/readyz");
                Some(tokio::spawn(crate::admin::serve(broker.clone(), listener, async move {
                    let _ = admin_stopped.await;
                })))
            }
            Err(err) => {
                println!("no metrics listener: cannot listen on {at} ({err}); pass --admin with another address");
                None
            }
        },
        None => None,
    };

    let endpoint = format!("https://{addr}");
    let mut bob_agent = DemoAgent::connect(&endpoint, &pki.agent(&bob), &bob).await.context("starting bob")?;
    let alice_agent = DemoAgent::connect(&endpoint, &pki.agent(&alice), &alice).await.context("starting alice")?;
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
            delivery = bob_agent.next_delivery() => {
                let Some(delivery) = delivery? else { break };
                let envelope = Envelope::from_json(&delivery.envelope_json)?;
                let greeting: Greeting = serde_json::from_value(serde_json::Value::Object(envelope.data))?;
                println!("bob received from {}: #{} {:?}", envelope.sender_id, greeting.n, greeting.text);
                bob_agent.ack(delivery.delivery_id).await;
                received += 1;
            }
            _ = ticker.tick(), if max_messages.is_none_or(|max| sent < max) => {
                sent += 1;
                let greeting = Greeting { n: sent, text: format!("hello bob, this is greeting {sent}") };
                match alice_agent.send(bob.as_str(), "greeting", &greeting).await {
                    Ok(id) => println!("alice sent #{sent} (message id {id})"),
                    Err(status) => println!("alice could not send #{sent}: {}", status.message()),
                }
            }
        }
    }
    println!("stopping: agents first, then the broker drains");
    alice_agent.close().await;
    bob_agent.close().await;
    let _ = stop_tx.send(());
    server.await.context("broker task")??;
    let _ = admin_stop.send(());
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    println!("stopped cleanly ({sent} sent, {received} delivered)");
    Ok(())
}

/// One demo agent instance: its RPC client, its instance id and its `Transport` stream.
struct DemoAgent {
    client: RuntimeClient,
    instance_id: String,
    outgoing: mpsc::Sender<ClientEvent>,
    inbound: Streaming<ServerEvent>,
}

impl DemoAgent {
    /// Connects over mTLS as `agent` and opens its stream: Hello, then the broker's Welcome.
    async fn connect(endpoint: &str, files: &TlsFiles, agent: &AgentId) -> anyhow::Result<Self> {
        let tls = files.load()?.client_config("localhost");
        let channel = Endpoint::from_shared(endpoint.to_string())?.tcp_nodelay(true).tls_config(tls)?.connect().await?;
        let mut client = runtime_client(channel, agent);
        let instance_id = format!("demo-{agent}");
        let (outgoing, requests) = mpsc::channel(64);
        let hello = ClientEvent { event: Some(client_event::Event::Hello(Hello { instance_id: instance_id.clone() })) };
        outgoing.send(hello).await?;
        let mut inbound = client.transport(tokio_stream::wrappers::ReceiverStream::new(requests)).await?.into_inner();
        match inbound.message().await? {
            Some(ServerEvent { event: Some(server_event::Event::Welcome(_)) }) => {}
            other => anyhow::bail!("expected Welcome, got {other:?}"),
        }
        Ok(DemoAgent { client, instance_id, outgoing, inbound })
    }

    async fn send(&self, target: &str, message_type: &str, data: &impl Serialize) -> Result<String, tonic::Status> {
        let data_json = serde_json::to_string(data).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let request = SendRequest {
            target_id: target.to_string(),
            message_type: message_type.to_string(),
            data_json,
            instance_id: self.instance_id.clone(),
        };
        Ok(self.client.clone().send(request).await?.into_inner().message_id)
    }

    /// The next delivery; `None` when the broker closed the stream.
    async fn next_delivery(&mut self) -> anyhow::Result<Option<Delivery>> {
        loop {
            match self.inbound.message().await? {
                None => return Ok(None),
                Some(ServerEvent { event: Some(server_event::Event::Delivery(delivery)) }) => {
                    return Ok(Some(delivery));
                }
                Some(_) => continue,
            }
        }
    }

    async fn ack(&self, delivery_id: String) {
        let ack = ClientEvent { event: Some(client_event::Event::Ack(Ack { delivery_id })) };
        let _ = self.outgoing.send(ack).await;
    }

    /// Half-closes the stream and waits for the broker to end it, so every ack was processed.
    async fn close(mut self) {
        drop(self.outgoing);
        let closed = async { while let Ok(Some(_)) = self.inbound.message().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
    }
}
