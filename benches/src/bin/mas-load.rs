//! Load generator: one in-process broker (embedded store or Redis) behind real mTLS, producer
//! agents sending as fast as their concurrency allows, and consumer instances handling and
//! acking. Reports throughput and send → handler latency percentiles.
//!
//! `cargo run --release -p mas-benches --bin mas-load -- --messages 20000 --redis redis://127.0.0.1:6400`

/// The allocator the broker binary uses too (see `server/src/main.rs`).
#[cfg(not(madsim))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
fn main() -> anyhow::Result<()> {
    load::main()
}

#[cfg(not(madsim))]
mod load {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use clap::Parser;
    use mas_agent::{AgentBuilder, AgentConfig, AgentError, HandlerError, Message};
    use mas_core::ids::AgentId;
    use mas_server::config::DeliverySettings;
    use mas_server::{AgentDefinition, Broker, BrokerConfig, serve};
    use serde::Deserialize;
    use tokio::sync::Mutex;

    #[derive(Parser, Debug)]
    struct Args {
        /// Messages to send in total.
        #[arg(long, default_value_t = 20_000)]
        messages: u64,
        /// Sends in flight at once (over all producers).
        #[arg(long, default_value_t = 256)]
        concurrency: u64,
        /// Producer agents.
        #[arg(long, default_value_t = 2)]
        producers: u64,
        /// Consumer instances (of one agent id, sharing its queue).
        #[arg(long, default_value_t = 2)]
        consumers: u64,
        /// Payload size in bytes (approximate).
        #[arg(long, default_value_t = 256)]
        payload: usize,
        /// Redis URL; the embedded store when absent.
        #[arg(long)]
        redis: Option<String>,
        /// Bound of the consumer's queue (default: the broker's default). A full queue makes
        /// producers back off and retry, as a real producer would.
        #[arg(long)]
        max_queue_len: Option<usize>,
        /// Trace with this sample ratio (0.0–1.0): broker and agents export their spans over
        /// OTLP/gRPC to an in-process collector that counts them. Off when absent.
        #[arg(long)]
        trace_ratio: Option<f64>,
    }

    #[derive(Debug, Deserialize)]
    struct Job {
        sent_ns: u64,
    }

    /// The process's peak resident set (`VmHWM`), in KiB, where /proc has it.
    fn peak_rss_kib() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    pub fn main() -> anyhow::Result<()> {
        let args = Args::parse();
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        runtime.block_on(run(args))
    }

    /// Starts tracing into a counting collector when `--trace-ratio` is given.
    async fn start_tracing(
        ratio: Option<f64>,
    ) -> anyhow::Result<Option<(mas_tests::otlp::Collector, mas_net::telemetry::TelemetryGuard)>> {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;

        let Some(sample_ratio) = ratio else { return Ok(None) };
        let collector = mas_tests::otlp::Collector::counting();
        let endpoint = collector.start().await?;
        let settings =
            mas_net::telemetry::TelemetrySettings { otlp_endpoint: Some(endpoint), sample_ratio, ..Default::default() };
        let (layer, guard) = mas_net::telemetry::start(&settings, "mas-load")?.context("no endpoint")?;
        tracing_subscriber::registry().with(layer).init();
        Ok(Some((collector, guard)))
    }

    async fn run(args: Args) -> anyhow::Result<()> {
        let tracing = start_tracing(args.trace_ratio).await?;
        let dir = std::env::temp_dir().join(format!("mas-load-{}", std::process::id()));
        let producers: Vec<AgentId> =
            (0..args.producers).map(|i| AgentId::new(&format!("p{i}"))).collect::<Result<_, _>>()?;
        let consumer = AgentId::new("sink")?;
        let mut all = producers.clone();
        all.push(consumer.clone());
        let pki = mas_net::pki::write_dev_pki(&dir, &all)?;
        let mut agents: BTreeMap<AgentId, AgentDefinition> =
            producers.iter().map(|p| (p.clone(), AgentDefinition::allowing(&["sink"]))).collect();
        agents.insert(consumer.clone(), AgentDefinition::allowing::<&str>(&[]));
        let mut config = BrokerConfig::new("127.0.0.1:0".parse()?, agents);
        config.delivery = DeliverySettings::default();
        config.data_dir = dir.join("data");
        if let Some(max) = args.max_queue_len {
            config.max_queue_len = max;
        }
        config.gateway.rate_limit = mas_server::config::RateLimitSettings::unlimited();
        config.redis = args.redis.as_ref().map(|url| {
            let mut s = mas_server::store::redis::RedisSettings::new(url);
            if let Some(max) = args.max_queue_len {
                s.max_queue_len = max;
            }
            s
        });
        let bound = serve::bind(config.listen_addr).await?;
        let endpoint = format!("https://{}", bound.local_addr);
        let broker = Broker::connect(config).await.context("broker")?;
        let tls = pki.server.load()?;
        let served = broker.clone();
        tokio::spawn(async move { serve::serve_tls(served, bound, &tls, std::future::pending()).await });

        let epoch = Instant::now();
        let handled = Arc::new(AtomicU64::new(0));
        let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.messages as usize)));
        let mut sinks = Vec::new();
        for _ in 0..args.consumers {
            let (handled, latencies) = (handled.clone(), latencies.clone());
            let mut cfg = AgentConfig::new(consumer.clone(), endpoint.clone(), pki.agent(&consumer));
            cfg.max_concurrent_handlers = 256;
            let sink = AgentBuilder::new(cfg)
                .on("job", move |_, msg: Message<Job>| {
                    let (handled, latencies) = (handled.clone(), latencies.clone());
                    async move {
                        let now = epoch.elapsed().as_nanos() as u64;
                        latencies.lock().await.push(now.saturating_sub(msg.payload.sent_ns));
                        handled.fetch_add(1, Ordering::Relaxed);
                        Ok::<(), HandlerError>(())
                    }
                })
                .start()
                .await?;
            sinks.push(sink);
        }
        let mut senders = Vec::new();
        for p in &producers {
            senders.push(AgentBuilder::new(AgentConfig::new(p.clone(), endpoint.clone(), pki.agent(p))).start().await?);
        }
        let filler = "x".repeat(args.payload.saturating_sub(40));
        let next = Arc::new(AtomicU64::new(0));
        let queue_full = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..args.concurrency {
            let sender = senders[(w % args.producers) as usize].clone();
            let (next, filler, total, queue_full) = (next.clone(), filler.clone(), args.messages, queue_full.clone());
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    loop {
                        let sent_ns = epoch.elapsed().as_nanos() as u64;
                        let data = serde_json::json!({ "sent_ns": sent_ns, "filler": filler });
                        match sender.send("sink", "job", &data).await {
                            Ok(_) => break,
                            Err(AgentError::Rpc(status)) if status.message() == "queue_full" => {
                                queue_full.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err(err) => panic!("send refused: {err}"),
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        let sent_in = started.elapsed();
        let deadline = Instant::now() + Duration::from_secs(120);
        while handled.load(Ordering::Relaxed) < args.messages && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let done_in = started.elapsed();
        let peak_kib = peak_rss_kib();
        let report = broker.verify_audit().await.context("audit verification")?;
        anyhow::ensure!(report.is_intact(), "audit trail does not verify: {report:?}");
        let chain = report.chains.iter().find(|c| c.chain == "agent:sink").cloned().context("sink chain")?;
        let mut lat = latencies.lock().await.clone();
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .map_or(0.0, |ns| *ns as f64 / 1e6)
        };
        println!(
            "store={} messages={} handled={} payload={}B concurrency={} producers={} consumers={}",
            if args.redis.is_some() { "redis" } else { "memory" },
            args.messages,
            handled.load(Ordering::Relaxed),
            args.payload,
            args.concurrency,
            args.producers,
            args.consumers
        );
        println!(
            "send phase {:.2}s ({:.0} msg/s accepted); end to end {:.2}s ({:.0} msg/s delivered+acked)",
            sent_in.as_secs_f64(),
            args.messages as f64 / sent_in.as_secs_f64(),
            done_in.as_secs_f64(),
            args.messages as f64 / done_in.as_secs_f64()
        );
        println!(
            "latency send->handler ms: p50 {:.2} p95 {:.2} p99 {:.2} max {:.2}",
            pct(0.50),
            pct(0.95),
            pct(0.99),
            pct(1.0)
        );
        println!(
            "sends retried after queue_full: {}; audit chain {} live records, {} archived (verified)",
            queue_full.load(Ordering::Relaxed),
            chain.records,
            chain.archived
        );
        println!("peak RSS before verification: {} MiB", peak_kib.map_or("?".into(), |k| (k / 1024).to_string()));
        for s in senders.iter().chain(sinks.iter()) {
            s.stop().await;
        }
        if let Some((collector, guard)) = tracing {
            drop(guard);
            println!("tracing at ratio {}: {} spans exported", args.trace_ratio.unwrap_or(0.0), collector.received());
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
