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
    use mas_benches::redis_baseline::redis_cpu_seconds;
    use mas_core::ids::AgentId;
    use mas_server::config::DeliverySettings;
    use mas_server::{AgentDefinition, Broker, BrokerConfig, serve};
    use serde::Deserialize;
    use tokio::sync::Mutex;

    #[derive(Parser, Debug, Clone)]
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
        /// One `Send` per message (the SDK's `batch_sends` off), as the reference client does.
        #[arg(long)]
        unary: bool,
        /// Run the broker as its own process from this `mas` binary (so its CPU is its own);
        /// in-process when absent.
        #[arg(long)]
        broker_bin: Option<std::path::PathBuf>,
        /// Also run the bare-Redis Streams baseline of the same shape, in the same invocation,
        /// and print mas / baseline (needs `--redis`).
        #[arg(long)]
        baseline: bool,
        /// Repeat the run (fresh broker each time) and print min / median / max.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Print the throughput of every window of this many handled messages and the
        /// broker's resident memory then (for long runs: both must stay flat).
        #[arg(long)]
        report_every: Option<u64>,
    }

    #[derive(Debug, Deserialize)]
    struct Job {
        sent_ns: u64,
    }

    /// The process's peak resident set (`VmHWM`), in KiB, where /proc has it.
    fn peak_rss_kib(pid: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The current resident set (`VmRSS`) of a process (`self` for this one), in KiB.
    fn rss_kib(pid: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Reports every `every` handled messages: that window's throughput and the RSS of the
    /// process `pid`. Ends when `total` are handled.
    async fn report_windows(handled: Arc<AtomicU64>, every: u64, total: u64, pid: String) {
        let mut window_start = (Instant::now(), 0u64);
        while window_start.1 + every <= total {
            let mark = window_start.1 + every;
            while handled.load(Ordering::Relaxed) < mark {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let now = Instant::now();
            let rate = every as f64 / now.duration_since(window_start.0).as_secs_f64();
            let rss = rss_kib(&pid).map_or("?".to_string(), |k| (k / 1024).to_string());
            println!("  {mark:>9} handled: {rate:>8.0} msg/s in this window, broker RSS {rss} MiB");
            window_start = (now, mark);
        }
    }

    /// CPU seconds (user + system) a process has used, from /proc (clock ticks of 10 ms).
    fn cpu_seconds(pid: u32) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
    }

    pub fn main() -> anyhow::Result<()> {
        let args = Args::parse();
        anyhow::ensure!(!args.baseline || args.redis.is_some(), "--baseline needs --redis");
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

    /// What one round measured.
    struct Round {
        msg_per_s: f64,
        p50_ms: f64,
        p99_ms: f64,
        /// Broker CPU per message (external broker only).
        broker_cpu_us: Option<f64>,
        /// Peak RSS of the broker's process (of mas-load itself when in-process), MiB.
        peak_mib: Option<u64>,
        /// Redis server CPU per message (on Redis only).
        redis_cpu_us: Option<f64>,
    }

    /// `min / median / max` of `values` with `decimals` places, or `-` for none.
    fn min_median_max(mut values: Vec<f64>, decimals: usize) -> String {
        values.sort_by(f64::total_cmp);
        match values.as_slice() {
            [] => "-".to_string(),
            v => format!("{:.decimals$} / {:.decimals$} / {:.decimals$}", v[0], v[v.len() / 2], v[v.len() - 1]),
        }
    }

    /// Percentile `p` (0–1) of sorted nanoseconds, in milliseconds.
    fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
        sorted
            .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
            .map_or(0.0, |ns| *ns as f64 / 1e6)
    }

    /// The allowlist: producers p0… may send to `sink`.
    struct Cast {
        producers: Vec<AgentId>,
        consumer: AgentId,
    }

    async fn run(args: Args) -> anyhow::Result<()> {
        let tracing = start_tracing(args.trace_ratio).await?;
        let dir = std::env::temp_dir().join(format!("mas-load-{}", std::process::id()));
        let producers: Vec<AgentId> =
            (0..args.producers).map(|i| AgentId::new(&format!("p{i}"))).collect::<Result<_, _>>()?;
        let cast = Cast { producers, consumer: AgentId::new("sink")? };
        let mut all = cast.producers.clone();
        all.push(cast.consumer.clone());
        let pki = mas_net::pki::write_dev_pki(&dir, &all, &[])?;
        println!(
            "store={} messages={} payload={}B concurrency={} producers={} consumers={} sends={} broker={}",
            if args.redis.is_some() { "redis" } else { "memory" },
            args.messages,
            args.payload,
            args.concurrency,
            args.producers,
            args.consumers,
            if args.unary { "unary" } else { "batched" },
            if args.broker_bin.is_some() { "own process" } else { "in process" },
        );
        let mut rounds = Vec::new();
        let mut baselines = Vec::new();
        let mut baseline_redis_cpu = Vec::new();
        for round in 0..args.rounds {
            if args.baseline
                && let Some(url) = &args.redis
            {
                let load = mas_benches::redis_baseline::BaselineLoad {
                    url: url.clone(),
                    messages: args.messages,
                    producers: args.producers,
                    concurrency: args.concurrency,
                    consumers: args.consumers,
                    payload: args.payload,
                };
                let cpu_before = redis_cpu_seconds(url).await?;
                let report = mas_benches::redis_baseline::run(load).await.context("bare Redis baseline")?;
                let redis_cpu_us = (redis_cpu_seconds(url).await? - cpu_before) * 1e6 / args.messages as f64;
                let rate = args.messages as f64 / report.elapsed.as_secs_f64();
                println!(
                    "round {round}: bare Redis Streams {rate:.0} msg/s, p50 {:.2} ms, p99 {:.2} ms, Redis CPU {redis_cpu_us:.1} µs/msg",
                    percentile_ms(&report.latencies_ns, 0.5),
                    percentile_ms(&report.latencies_ns, 0.99)
                );
                baselines.push(rate);
                baseline_redis_cpu.push(redis_cpu_us);
            }
            let measured = run_round(&args, &cast, &dir, &pki).await?;
            println!(
                "round {round}: mas {:.0} msg/s, p50 {:.2} ms, p99 {:.2} ms{}{}{}",
                measured.msg_per_s,
                measured.p50_ms,
                measured.p99_ms,
                measured.broker_cpu_us.map_or(String::new(), |us| format!(", broker CPU {us:.1} µs/msg")),
                measured.redis_cpu_us.map_or(String::new(), |us| format!(", Redis CPU {us:.1} µs/msg")),
                measured.peak_mib.map_or(String::new(), |mib| format!(", peak RSS {mib} MiB")),
            );
            rounds.push(measured);
        }
        println!("summary over {} round(s), min / median / max:", rounds.len());
        println!("  mas msg/s            {}", min_median_max(rounds.iter().map(|r| r.msg_per_s).collect(), 0));
        println!("  mas p50 ms           {}", min_median_max(rounds.iter().map(|r| r.p50_ms).collect(), 2));
        println!("  mas p99 ms           {}", min_median_max(rounds.iter().map(|r| r.p99_ms).collect(), 2));
        if rounds.iter().all(|r| r.broker_cpu_us.is_some()) {
            println!(
                "  broker CPU µs/msg    {}",
                min_median_max(rounds.iter().filter_map(|r| r.broker_cpu_us).collect(), 2)
            );
        }
        if rounds.iter().all(|r| r.redis_cpu_us.is_some()) {
            println!(
                "  Redis CPU µs/msg     {}",
                min_median_max(rounds.iter().filter_map(|r| r.redis_cpu_us).collect(), 2)
            );
        }
        if !baselines.is_empty() {
            println!("  bare Redis msg/s     {}", min_median_max(baselines.clone(), 0));
            println!("  bare Redis CPU µs/msg {}", min_median_max(baseline_redis_cpu, 2));
            let ratios = rounds.iter().zip(&baselines).map(|(r, b)| r.msg_per_s / b).collect();
            println!("  mas / bare Redis     {}", min_median_max(ratios, 2));
        }
        if let Some((collector, guard)) = tracing {
            drop(guard);
            println!("tracing at ratio {}: {} spans exported", args.trace_ratio.unwrap_or(0.0), collector.received());
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// The broker under load: in this process, or a `mas serve` child.
    enum BrokerUnderTest {
        InProcess(Arc<Broker>),
        Process { child: std::process::Child, config: std::path::PathBuf, bin: std::path::PathBuf },
    }

    impl BrokerUnderTest {
        async fn start(
            args: &Args,
            cast: &Cast,
            dir: &std::path::Path,
            pki: &mas_net::pki::DevPkiFiles,
        ) -> anyhow::Result<(Self, String)> {
            let mut agents: BTreeMap<AgentId, AgentDefinition> =
                cast.producers.iter().map(|p| (p.clone(), AgentDefinition::allowing(&["sink"]))).collect();
            agents.insert(cast.consumer.clone(), AgentDefinition::allowing::<&str>(&[]));
            let Some(bin) = &args.broker_bin else {
                let mut config = BrokerConfig::new("127.0.0.1:0".parse()?, agents);
                config.delivery = DeliverySettings::default();
                config.data_dir = dir.join("data");
                config.admin.listen_addr = None;
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
                return Ok((BrokerUnderTest::InProcess(broker), endpoint));
            };
            let allowlist: serde_json::Map<String, serde_json::Value> = agents
                .keys()
                .map(|a| {
                    let targets = if *a == cast.consumer { vec![] } else { vec!["sink"] };
                    (a.to_string(), serde_json::json!({ "allowed_targets": targets }))
                })
                .collect();
            let unlimited = mas_server::config::RateLimitSettings::unlimited();
            let mut config = serde_json::json!({
                "listen_addr": "127.0.0.1:0",
                "tls": {
                    "server_cert_path": pki.server.cert,
                    "server_key_path": pki.server.key,
                    "client_ca_path": pki.server.ca,
                },
                "agents": allowlist,
                "data_dir": dir.join("data"),
                "admin": { "listen_addr": null },
                "gateway": { "rate_limit": { "per_minute": unlimited.per_minute, "per_hour": unlimited.per_hour } },
            });
            if let Some(max) = args.max_queue_len {
                config["max_queue_len"] = max.into();
            }
            if let Some(url) = &args.redis {
                config["redis"] = serde_json::json!({ "url": url });
                if let Some(max) = args.max_queue_len {
                    config["redis"]["max_queue_len"] = max.into();
                }
            }
            let path = dir.join("broker.json");
            std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
            // The broker's log goes to a file beside its config, not into the report.
            let log = std::fs::File::create(dir.join("broker.log"))?;
            let mut child = std::process::Command::new(bin)
                .args(["serve", "--config"])
                .arg(&path)
                .stdout(std::process::Stdio::piped())
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            let stdout = child.stdout.take().context("broker stdout")?;
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            let ready: serde_json::Value = loop {
                let line = lines.next().context("the broker exited before its ready line")??;
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                    && value["event"] == "mas.broker.ready"
                {
                    break value;
                }
            };
            let addr = ready["listen_addr"].as_str().context("listen_addr in the ready line")?;
            let endpoint = format!("https://{addr}");
            Ok((BrokerUnderTest::Process { child, config: path, bin: bin.clone() }, endpoint))
        }

        fn pid(&self) -> Option<u32> {
            match self {
                BrokerUnderTest::InProcess(_) => None,
                BrokerUnderTest::Process { child, .. } => Some(child.id()),
            }
        }

        /// Stops the broker and verifies the audit trail where it outlives the broker: the
        /// in-process broker's, or a Redis store's through `mas audit verify`.
        async fn stop_and_verify(self, redis: bool) -> anyhow::Result<String> {
            match self {
                BrokerUnderTest::InProcess(broker) => {
                    let report = broker.verify_audit().await.context("audit verification")?;
                    anyhow::ensure!(report.is_intact(), "audit trail does not verify: {report:?}");
                    let chain = report.chains.iter().find(|c| c.chain == "agent:sink").context("sink chain")?;
                    Ok(format!("{} live records, {} archived (verified)", chain.records, chain.archived))
                }
                BrokerUnderTest::Process { mut child, config, bin } => {
                    let status =
                        std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
                    anyhow::ensure!(status.success(), "cannot signal the broker");
                    let exit = child.wait()?;
                    anyhow::ensure!(exit.success(), "the broker exited with {exit} after SIGTERM");
                    if !redis {
                        return Ok("not verified (embedded store, gone with the broker's process)".to_string());
                    }
                    let verify =
                        std::process::Command::new(bin).args(["audit", "verify", "--config"]).arg(&config).output()?;
                    anyhow::ensure!(
                        verify.status.success(),
                        "mas audit verify: {}",
                        String::from_utf8_lossy(&verify.stdout)
                    );
                    Ok("verified by `mas audit verify`".to_string())
                }
            }
        }
    }

    async fn run_round(
        args: &Args,
        cast: &Cast,
        dir: &std::path::Path,
        pki: &mas_net::pki::DevPkiFiles,
    ) -> anyhow::Result<Round> {
        let (broker, endpoint) = BrokerUnderTest::start(args, cast, dir, pki).await?;
        let cpu_before = broker.pid().and_then(cpu_seconds);
        let redis_cpu_before = match &args.redis {
            Some(url) => Some(redis_cpu_seconds(url).await?),
            None => None,
        };
        let epoch = Instant::now();
        let handled = Arc::new(AtomicU64::new(0));
        let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.messages as usize)));
        let mut sinks = Vec::new();
        for _ in 0..args.consumers {
            let (handled, latencies) = (handled.clone(), latencies.clone());
            let mut cfg = AgentConfig::new(cast.consumer.clone(), endpoint.clone(), pki.agent(&cast.consumer));
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
        for p in &cast.producers {
            let mut cfg = AgentConfig::new(p.clone(), endpoint.clone(), pki.agent(p));
            cfg.batch_sends = !args.unary;
            senders.push(AgentBuilder::new(cfg).start().await?);
        }
        let filler = "x".repeat(args.payload.saturating_sub(40));
        let next = Arc::new(AtomicU64::new(0));
        let queue_full = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let reporter = args.report_every.map(|every| {
            let pid = broker.pid().map_or("self".to_string(), |pid| pid.to_string());
            tokio::spawn(report_windows(handled.clone(), every.max(1), args.messages, pid))
        });
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
        let deadline = Instant::now() + Duration::from_secs(120);
        while handled.load(Ordering::Relaxed) < args.messages && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let done_in = started.elapsed();
        if let Some(reporter) = reporter {
            reporter.abort();
        }
        anyhow::ensure!(handled.load(Ordering::Relaxed) >= args.messages, "not every message was handled in time");
        let broker_cpu_us = match (broker.pid().and_then(cpu_seconds), cpu_before) {
            (Some(after), Some(before)) => Some((after - before) * 1e6 / args.messages as f64),
            _ => None,
        };
        let redis_cpu_us = match (&args.redis, redis_cpu_before) {
            (Some(url), Some(before)) => Some((redis_cpu_seconds(url).await? - before) * 1e6 / args.messages as f64),
            _ => None,
        };
        let peak_mib = peak_rss_kib(&broker.pid().map_or("self".to_string(), |pid| pid.to_string())).map(|k| k / 1024);
        for s in senders.iter().chain(sinks.iter()) {
            s.stop().await;
        }
        let audit = broker.stop_and_verify(args.redis.is_some()).await?;
        let mut lat = latencies.lock().await.clone();
        lat.sort_unstable();
        println!(
            "  handled {} in {:.2}s; sends retried after queue_full: {}; audit: {audit}",
            handled.load(Ordering::Relaxed),
            done_in.as_secs_f64(),
            queue_full.load(Ordering::Relaxed)
        );
        Ok(Round {
            msg_per_s: args.messages as f64 / done_in.as_secs_f64(),
            p50_ms: percentile_ms(&lat, 0.5),
            p99_ms: percentile_ms(&lat, 0.99),
            broker_cpu_us,
            peak_mib,
            redis_cpu_us,
        })
    }
}
