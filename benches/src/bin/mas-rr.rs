//! Request/reply latency through the Rust SDK against a broker running in its own process: a
//! worker agent that answers every `ping`, and a client keeping `--concurrency` requests in
//! flight. Prints one JSON line (req/s, p50, p99). Driven by `tests/python/bench_request_reply.py`,
//! which starts the broker and runs the Python clients beside it.
//!
//! `mas-rr --endpoint https://localhost:50051 --certs dev-certs --client alice --worker bob`

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
fn main() -> anyhow::Result<()> {
    rr::main()
}

#[cfg(not(madsim))]
mod rr {
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use clap::Parser;
    use mas_agent::{Agent, AgentBuilder, AgentConfig, HandlerError, Message};
    use mas_core::ids::AgentId;
    use mas_net::pki::DevPkiFiles;
    use serde_json::Value;
    use tokio::sync::Mutex;

    #[derive(Parser, Debug)]
    struct Args {
        /// Broker URL.
        #[arg(long)]
        endpoint: String,
        /// Directory with `ca.pem` and `{agent}.pem`/`{agent}.key` (as `mas dev-certs` writes).
        #[arg(long)]
        certs: PathBuf,
        /// The requesting agent.
        #[arg(long, default_value = "alice")]
        client: String,
        /// The answering agent.
        #[arg(long)]
        worker: String,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Timed requests (after 100 warm-up requests).
        #[arg(long, default_value_t = 2_000)]
        requests: usize,
        /// Time `Discover` calls instead: one unary RPC with no delivery, the floor under a
        /// request/reply (which is two unary RPCs and two deliveries).
        #[arg(long)]
        unary: bool,
        /// Only run the worker (print `ready`, answer until killed): a Rust worker for clients
        /// in other processes, such as the Python benchmark's.
        #[arg(long)]
        worker_only: bool,
    }

    fn config(args: &Args, agent: &str) -> anyhow::Result<AgentConfig> {
        let agent = AgentId::new(agent)?;
        let files = DevPkiFiles::at(&args.certs).agent(&agent);
        Ok(AgentConfig::new(agent, args.endpoint.clone(), files))
    }

    async fn answer(agent: Agent, message: Message<Value>) -> Result<(), HandlerError> {
        agent.reply(&message.envelope, "pong", &message.payload).await?;
        Ok(())
    }

    /// One timed exchange: a request and its reply, or (`unary`) one `Discover` call.
    async fn exchange(client: &Agent, worker: &str, n: usize, unary: bool) -> anyhow::Result<()> {
        if unary {
            client.discover(&[]).await?;
        } else {
            client.request(worker, "ping", &serde_json::json!({ "n": n }), Duration::from_secs(10)).await?;
        }
        Ok(())
    }

    pub fn main() -> anyhow::Result<()> {
        let args = Args::parse();
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        runtime.block_on(run(args))
    }

    async fn run(args: Args) -> anyhow::Result<()> {
        let worker = AgentBuilder::new(config(&args, &args.worker)?).on("ping", answer).start().await?;
        if args.worker_only {
            println!("ready");
            std::future::pending::<()>().await;
        }
        let client = AgentBuilder::new(config(&args, &args.client)?).start().await?;
        for n in 0..100 {
            exchange(&client, &args.worker, n, args.unary).await?;
        }
        let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.requests)));
        let per_loop = args.requests.div_ceil(args.concurrency);
        let started = Instant::now();
        let loops: Vec<_> = (0..args.concurrency)
            .map(|_| {
                let (client, worker, latencies) = (client.clone(), args.worker.clone(), latencies.clone());
                let unary = args.unary;
                tokio::spawn(async move {
                    let mut mine = Vec::with_capacity(per_loop);
                    for n in 0..per_loop {
                        let sent = Instant::now();
                        exchange(&client, &worker, n, unary).await?;
                        mine.push(sent.elapsed());
                    }
                    latencies.lock().await.extend(mine);
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in loops {
            task.await.context("request loop")??;
        }
        let elapsed = started.elapsed();
        let mut latencies = latencies.lock().await.clone();
        latencies.sort();
        let pick = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{}",
            serde_json::json!({
                "client": if args.unary { "rust-sdk Discover (unary floor)" } else { "rust-sdk" },
                "generation": "mas.runtime.v1",
                "concurrency": args.concurrency,
                "requests": latencies.len(),
                "req_per_s": latencies.len() as f64 / elapsed.as_secs_f64(),
                "p50_ms": ms(pick(0.50)),
                "p99_ms": ms(pick(0.99)),
            })
        );
        client.stop().await;
        worker.stop().await;
        Ok(())
    }
}
