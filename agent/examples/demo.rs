//! `cargo run -p mas-agent --example demo`: a broker on 127.0.0.1 with the embedded store and
//! fresh dev certificates, plus two SDK agents: alice greets bob once a second and bob prints
//! what he receives. Ctrl-C stops the agents, drains the broker and exits with code 0.
//!
//! The broker runs in this process through `mas-server`, a dev-dependency of the SDK: the
//! broker itself never links the SDK.

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    demo::run(clap::Parser::parse()).await
}

#[cfg(not(madsim))]
mod demo {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use anyhow::Context;
    use mas_agent::{AgentBuilder, AgentConfig, HandlerError, Message};
    use mas_core::ids::AgentId;
    use mas_server::config::{AgentDefinition, BrokerConfig};
    use mas_server::{Broker, admin, serve};
    use serde::{Deserialize, Serialize};

    /// Options.
    #[derive(Debug, clap::Parser)]
    #[command(about = "mas demo: a broker (embedded store, fresh dev certificates) with two agents")]
    pub struct Args {
        /// Where to write the dev certificates.
        #[arg(long, default_value = "dev-certs")]
        certs_dir: PathBuf,
        /// Broker address.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Stop after this many greetings were delivered (default: run until Ctrl-C).
        #[arg(long)]
        messages: Option<u64>,
        /// Where to serve metrics and health probes (`none` to turn them off).
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin: String,
    }

    /// The demo's message.
    #[derive(Debug, Serialize, Deserialize)]
    struct Greeting {
        n: u64,
        text: String,
    }

    pub async fn run(args: Args) -> anyhow::Result<()> {
        let (alice, bob) = (AgentId::new("alice")?, AgentId::new("bob")?);
        let pki = mas_net::pki::write_dev_pki(&args.certs_dir, &[alice.clone(), bob.clone()], &[])
            .with_context(|| format!("writing dev certificates to {}", args.certs_dir.display()))?;
        println!("dev certificates written to {}", args.certs_dir.display());

        let agents = BTreeMap::from([
            (alice.clone(), AgentDefinition::allowing(&[bob.as_str()])),
            (bob.clone(), AgentDefinition::allowing::<&str>(&[])),
        ]);
        let broker = Broker::connect(BrokerConfig::new(args.listen, agents)).await?;
        let bound = serve::bind(args.listen).await?;
        let addr = bound.local_addr;
        let tls = pki.server.load()?;
        let (stop_broker, broker_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let broker = broker.clone();
            async move {
                serve::serve_tls(broker, bound, &tls, async {
                    let _ = broker_stopped.await;
                })
                .await
            }
        });
        println!("broker listening on {addr} (mTLS, embedded store)");
        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = match args.admin.as_str() {
            "none" => None,
            at => {
                let at: SocketAddr = at.parse().with_context(|| format!("--admin {at:?}"))?;
                match admin::bind(at).await {
                    Ok(listener) => {
                        let base = format!("http://{}", listener.local_addr);
                        println!("metrics on {base}/metrics, probes on {base}/healthz and {base}/readyz");
                        Some(tokio::spawn(admin::serve(broker.clone(), listener, async move {
                            let _ = admin_stopped.await;
                        })))
                    }
                    Err(err) => {
                        println!(
                            "no metrics listener: cannot listen on {at} ({err}); pass --admin with another address"
                        );
                        None
                    }
                }
            }
        };

        let endpoint = format!("https://{addr}");
        let delivered = Arc::new(AtomicU64::new(0));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (count, notify) = (delivered.clone(), arrived.clone());
        let bob_agent = AgentBuilder::new(AgentConfig::new(bob.clone(), &endpoint, pki.agent(&bob)))
            .on("greeting", move |_, greeting: Message<Greeting>| {
                let g = greeting.payload;
                println!("bob received from {}: #{} {:?}", greeting.envelope.sender_id, g.n, g.text);
                count.fetch_add(1, Ordering::SeqCst);
                notify.notify_one();
                async { Ok::<(), HandlerError>(()) }
            })
            .start()
            .await
            .context("starting bob")?;
        let alice_agent = AgentBuilder::new(AgentConfig::new(alice.clone(), &endpoint, pki.agent(&alice)))
            .start()
            .await
            .context("starting alice")?;
        println!("alice and bob connected; alice greets bob every second (Ctrl-C to stop)");

        let shutdown = mas_agent::shutdown_signal();
        tokio::pin!(shutdown);
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        let mut sent = 0u64;
        loop {
            if args.messages.is_some_and(|max| delivered.load(Ordering::SeqCst) >= max) {
                break;
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = arrived.notified() => {}
                _ = ticker.tick(), if args.messages.is_none_or(|max| sent < max) => {
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
        let _ = stop_broker.send(());
        server.await.context("broker task")??;
        let _ = stop_admin.send(());
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        println!("stopped cleanly ({sent} sent, {} delivered)", delivered.load(Ordering::SeqCst));
        Ok(())
    }
}
