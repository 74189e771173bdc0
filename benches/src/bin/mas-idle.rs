//! Idle sessions against a broker in its own process: opens `--sessions` `Transport` streams
//! (one instance id each, spread over `--connections` mTLS connections), waits until every one
//! is welcomed, then reports the broker's resident memory (`/proc/{--broker-pid}/status`)
//! before and after. Driven by `benches/matrix.py`, which starts the broker with enough
//! `limits.max_sessions_per_agent` and `limits.max_streams_per_connection`.
//!
//! `mas-idle --endpoint https://127.0.0.1:50051 --certs dev-certs --agent idle --sessions 10000 --broker-pid 1234`

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
fn main() -> anyhow::Result<()> {
    idle::main()
}

#[cfg(not(madsim))]
mod idle {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use clap::Parser;
    use mas_core::ids::AgentId;
    use mas_net::client::runtime_client;
    use mas_net::pki::DevPkiFiles;
    use mas_proto::runtime::{ClientEvent, Hello, client_event, server_event};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    #[derive(Parser, Debug)]
    struct Args {
        /// Broker URL.
        #[arg(long)]
        endpoint: String,
        /// Directory with `ca.pem` and `{agent}.pem`/`{agent}.key`.
        #[arg(long)]
        certs: PathBuf,
        /// The agent whose instances connect.
        #[arg(long, default_value = "idle")]
        agent: String,
        /// Sessions to open.
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        /// mTLS connections to spread them over.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// The broker's pid, to read its memory.
        #[arg(long)]
        broker_pid: u32,
    }

    fn rss_mib(pid: u32) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .context("VmRSS")?
            .parse()?;
        Ok(kib / 1024.0)
    }

    pub fn main() -> anyhow::Result<()> {
        let args = Args::parse();
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
    }

    async fn run(args: Args) -> anyhow::Result<()> {
        mas_net::tls::install_crypto_provider();
        let agent = AgentId::new(&args.agent)?;
        let tls = DevPkiFiles::at(&args.certs).agent(&agent).load()?.client_config("localhost");
        let before = rss_mib(args.broker_pid)?;
        let started = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..args.connections.max(1) {
            let channel = tonic::transport::Endpoint::from_shared(args.endpoint.clone())?
                .tcp_nodelay(true)
                .tls_config(tls.clone())?
                .connect()
                .await?;
            clients.push(runtime_client(channel, &agent));
        }
        // Held open until the end: dropping either side ends the session.
        let mut held = Vec::with_capacity(args.sessions);
        let mut opening = tokio::task::JoinSet::new();
        for n in 0..args.sessions {
            let mut client = clients[n % clients.len()].clone();
            opening.spawn(async move {
                let (tx, rx) = mpsc::channel(1);
                let hello = Hello { instance_id: format!("i{n:07}") };
                tx.send(ClientEvent { event: Some(client_event::Event::Hello(hello)) }).await?;
                let mut events = client.transport(ReceiverStream::new(rx)).await?.into_inner();
                match events.message().await?.and_then(|e| e.event) {
                    Some(server_event::Event::Welcome(_)) => anyhow::Ok((tx, events)),
                    other => anyhow::bail!("session {n}: expected Welcome, got {other:?}"),
                }
            });
            // Bounded concurrency of handshakes.
            if opening.len() >= 256
                && let Some(done) = opening.join_next().await
            {
                held.push(done??);
            }
        }
        while let Some(done) = opening.join_next().await {
            held.push(done??);
        }
        let opened_in = started.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = rss_mib(args.broker_pid)?;
        println!(
            "{{\"sessions\":{},\"connections\":{},\"opened_s\":{:.2},\"broker_rss_before_mib\":{before:.1},\"broker_rss_mib\":{after:.1},\"per_session_kib\":{:.1}}}",
            held.len(),
            clients.len(),
            opened_in.as_secs_f64(),
            (after - before) * 1024.0 / held.len().max(1) as f64
        );
        Ok(())
    }
}
