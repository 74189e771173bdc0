//! The `mas` command: `serve` runs the broker, `dev-certs` writes a development PKI, `demo`
//! runs a broker with two agents.

/// mimalloc rather than glibc malloc: the broker allocates and frees small buffers on many
/// worker threads at once, and glibc's arena locks showed up as futex contention in profiles
/// (benches/README.md has the A/B).
#[cfg(not(madsim))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(not(madsim))]
mod cli {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::process::ExitCode;

    use anyhow::Context;
    use clap::{Parser, Subcommand};
    use mas_core::ids::AgentId;
    use mas_core::policy::audit::{AuditFilter, Decision, to_csv, to_json};
    use mas_net::tls::TlsFiles;
    use mas_server::audit::offline;
    use mas_server::{Broker, BrokerConfig, admin, serve};

    #[derive(Parser)]
    #[command(name = "mas", version, about = "mas broker: secure, at-least-once messaging for agents")]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Run the broker from a JSON configuration file.
        Serve {
            /// Configuration file (see README: listen_addr, tls, agents, delivery).
            #[arg(long)]
            config: PathBuf,
        },
        /// Write a development CA, a server certificate for localhost/127.0.0.1 and one client
        /// certificate per agent (SPIFFE SAN spiffe://mas/agent/{id}).
        DevCerts {
            /// Output directory.
            #[arg(long, default_value = "dev-certs")]
            dir: PathBuf,
            /// Agent ids, comma-separated.
            #[arg(long, value_delimiter = ',', required = true)]
            agents: Vec<String>,
        },
        /// Run a broker (embedded store, fresh dev certificates) with two demo agents.
        Demo {
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
            #[arg(long, default_value = "127.0.0.1:9464", value_parser = admin_addr)]
            admin: AdminAddr,
        },
        /// Verify or query the audit trail.
        Audit {
            #[command(subcommand)]
            action: AuditCommand,
        },
    }

    /// Where the audit records are read from: the store of a configuration (Redis), or the
    /// JSONL file sink with its rotated backups.
    #[derive(clap::Args)]
    #[group(required = true, multiple = false)]
    struct Source {
        /// Broker configuration whose Redis store holds the chains.
        #[arg(long)]
        config: Option<PathBuf>,
        /// JSONL audit file (`gateway.audit.file_path`); rotated `.1`, `.2`, … are included.
        #[arg(long)]
        file: Option<PathBuf>,
    }

    #[derive(Subcommand)]
    enum AuditCommand {
        /// Check every hash chain: exit code 1 if a record was edited, deleted, re-linked or
        /// the tail cut off.
        Verify {
            #[command(flatten)]
            source: Source,
        },
        /// Print matching records, oldest first.
        Query {
            #[command(flatten)]
            source: Source,
            /// Only this sender.
            #[arg(long)]
            sender: Option<String>,
            /// Only this target.
            #[arg(long)]
            target: Option<String>,
            /// Only this decision (ALLOWED, ALERT, DLP_REDACTED, AUTHZ_DENIED, RATE_LIMITED,
            /// CIRCUIT_OPEN, DLP_BLOCKED, QUEUE_FULL).
            #[arg(long)]
            decision: Option<String>,
            /// Only records at or after this time (seconds since the Unix epoch).
            #[arg(long)]
            since: Option<f64>,
            /// Only records at or before this time (seconds since the Unix epoch).
            #[arg(long)]
            until: Option<f64>,
            /// At most this many records.
            #[arg(long, default_value_t = 100)]
            limit: usize,
            /// `json` or `csv`.
            #[arg(long, default_value = "json")]
            format: String,
        },
    }

    /// `--admin`: an address, or `none`.
    #[derive(Debug, Clone, Copy)]
    struct AdminAddr(Option<SocketAddr>);

    fn admin_addr(value: &str) -> Result<AdminAddr, String> {
        match value {
            "none" => Ok(AdminAddr(None)),
            addr => addr.parse().map(|a| AdminAddr(Some(a))).map_err(|err| format!("{addr:?}: {err}")),
        }
    }

    pub fn main() -> ExitCode {
        let cli = Cli::parse();
        let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(err) => {
                eprintln!("error: cannot start the runtime: {err}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(run(cli.command)) {
            Ok(code) => code,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        }
    }

    /// SIGINT (Ctrl-C) and SIGTERM (how systemd, Kubernetes and process supervisors stop a
    /// service): the first of either starts the graceful drain, a second one ends the process
    /// at once with `128 + signal number` (130 or 143), as if the signal had killed it. The
    /// handlers are installed when this is called, not when the future is first polled, so a
    /// signal that arrives while the broker is still starting is not the default action.
    fn stop_requested() -> impl std::future::Future<Output = ()> {
        use tokio::signal::unix::{Signal, SignalKind, signal};

        let install = |name: &str, kind: SignalKind| {
            signal(kind).map_err(|err| eprintln!("cannot listen for {name} ({err}); stop with another signal")).ok()
        };
        let mut signals = (install("SIGINT", SignalKind::interrupt()), install("SIGTERM", SignalKind::terminate()));
        async fn received(signal: &mut Option<Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        /// The number of the next signal received.
        async fn next(signals: &mut (Option<Signal>, Option<Signal>)) -> u8 {
            tokio::select! {
                () = received(&mut signals.0) => 2,
                () = received(&mut signals.1) => 15,
            }
        }
        async move {
            let first = next(&mut signals).await;
            eprintln!("signal {first} received: draining (a second signal stops at once)");
            tokio::spawn(async move {
                let second = next(&mut signals).await;
                eprintln!("signal {second} received again: stopping without finishing the drain");
                std::process::exit(128 + i32::from(second));
            });
        }
    }

    /// Logs to stderr (`RUST_LOG`, default `warn,mas_server=info`) and, when `telemetry` names
    /// an OTLP endpoint, exports spans; the guard flushes them when dropped.
    fn init_logging(
        telemetry: Option<&mas_net::telemetry::TelemetrySettings>,
    ) -> anyhow::Result<Option<mas_net::telemetry::TelemetryGuard>> {
        Ok(mas_net::telemetry::install(telemetry, "mas-broker", "warn,mas_server=info")?)
    }

    async fn run(command: Command) -> anyhow::Result<ExitCode> {
        if !matches!(command, Command::Serve { .. }) {
            init_logging(None)?;
        }
        match command {
            Command::Audit { action: AuditCommand::Verify { source } } => verify(source).await,
            Command::Serve { config } => serve_from(config).await,
            other => run_command(other).await.map(|()| ExitCode::SUCCESS),
        }
    }

    /// Every command but `audit verify`, whose outcome has more than two exit codes.
    async fn run_command(command: Command) -> anyhow::Result<()> {
        match command {
            Command::Serve { config } => serve_from(config).await.map(|_| ()),
            Command::DevCerts { dir, agents } => {
                let agents = agents.iter().map(|a| AgentId::new(a)).collect::<Result<Vec<_>, _>>()?;
                mas_net::pki::write_dev_pki(&dir, &agents)?;
                println!(
                    "wrote ca.pem, server.pem/.key and {} agent certificate(s) to {}",
                    agents.len(),
                    dir.display()
                );
                Ok(())
            }
            Command::Demo { certs_dir, listen, messages, admin } => {
                mas_server::demo::run(&certs_dir, listen, admin.0, messages, stop_requested()).await
            }
            Command::Audit { action: AuditCommand::Verify { source } } => verify(source).await.map(|_| ()),
            Command::Audit {
                action: AuditCommand::Query { source, sender, target, decision, since, until, limit, format },
            } => {
                let decision = match decision {
                    Some(d) => Some(Decision::parse(&d).with_context(|| format!("unknown decision {d:?}"))?),
                    None => None,
                };
                let filter = AuditFilter { sender, target, decision, since, until };
                let records = match (&source.config, &source.file) {
                    (Some(config), _) => {
                        offline::query_store(&BrokerConfig::from_file(config)?, &filter, limit).await?
                    }
                    (None, Some(file)) => offline::query_file(file, &filter, limit)?,
                    (None, None) => anyhow::bail!("give --config or --file"),
                };
                match format.as_str() {
                    "json" => println!("{}", to_json(&records, true)),
                    "csv" => print!("{}", to_csv(&records)),
                    other => anyhow::bail!("unsupported format: {other} (json or csv)"),
                }
                Ok(())
            }
        }
    }

    /// Exit codes: 0 intact, 1 tampered (or unreadable), 2 intact but the file has gaps (lines
    /// the sink could not write, marked and counted; the store holds those records).
    async fn verify(source: Source) -> anyhow::Result<ExitCode> {
        let mut gaps = 0;
        let intact = match (&source.config, &source.file) {
            (Some(config), _) => {
                let report = offline::verify_store(&BrokerConfig::from_file(config)?).await?;
                for chain in &report.chains {
                    let verdict = match &chain.result {
                        Ok(()) => "ok".to_string(),
                        Err(err) => format!("BROKEN: {err}"),
                    };
                    println!("{:<32} {:>9} records  {verdict}", chain.chain, chain.records);
                }
                report.is_intact()
            }
            (None, Some(file)) => {
                let report = offline::verify_file(file)?;
                for (chain, summary) in &report.chains {
                    let note = if summary.starts_mid_chain { " (starts after rotated-away records)" } else { "" };
                    println!("{chain:<32} {:>9} records{note}", summary.records);
                }
                for gap in &report.gaps {
                    println!("GAP: {gap}");
                }
                for error in &report.errors {
                    println!("BROKEN: {error}");
                }
                gaps = report.gaps.len();
                report.is_intact()
            }
            (None, None) => anyhow::bail!("give --config or --file"),
        };
        if !intact {
            anyhow::bail!("audit verification failed");
        }
        if gaps > 0 {
            println!("audit trail intact, but the file misses records at {gaps} marked gap(s) (the store holds them)");
            return Ok(ExitCode::from(2));
        }
        println!("audit trail intact");
        Ok(ExitCode::SUCCESS)
    }

    /// Exit code of a broker whose drain deadline cut work short: deliveries were handed back
    /// to their queues unacknowledged (nothing is lost; they are redelivered later).
    const DRAIN_CUT_SHORT: u8 = 3;

    async fn serve_from(path: PathBuf) -> anyhow::Result<ExitCode> {
        let stop = stop_requested();
        let config = BrokerConfig::from_file(&path)?;
        let _telemetry = init_logging(Some(&config.telemetry))?;
        let tls = config.tls.as_ref().context("config: `tls` is required to serve (mTLS is mandatory)")?;
        let files = TlsFiles {
            ca: tls.client_ca_path.clone(),
            cert: tls.server_cert_path.clone(),
            key: tls.server_key_path.clone(),
        };
        // Everything the file points at is checked before the ready line.
        let pem = files.load_checked().context("TLS material rejected")?;
        mas_server::preflight::check_paths(&config)?;
        let bound = serve::bind(config.listen_addr).await?;
        let addr = bound.local_addr;
        let admin = match config.admin.listen_addr {
            Some(admin_addr) => Some(
                admin::bind(admin_addr)
                    .await
                    .with_context(|| format!("cannot listen on admin.listen_addr {admin_addr}"))?,
            ),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|a| a.local_addr.to_string());
        let broker = Broker::connect(config).await?;
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        let admin_task = admin.map(|admin| {
            tokio::spawn(admin::serve(broker.clone(), admin, async move {
                let _ = stopped_rx.await;
            }))
        });
        println!(
            "{}",
            serde_json::json!({
                "event": "mas.broker.ready",
                "pid": std::process::id(),
                "listen_addr": addr.to_string(),
                "admin_addr": admin_addr,
            })
        );
        let served = serve::serve_tls(broker.clone(), bound, &pem, stop).await;
        let _ = stopped_tx.send(());
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        served?;
        let outcome = broker.drain_outcome();
        if !outcome.is_clean() {
            eprintln!(
                "broker stopped; the drain deadline cut work short: {} deliveries handed back unacknowledged{}",
                outcome.handed_back,
                if outcome.sessions_overran { ", some sessions did not end in time" } else { "" }
            );
            return Ok(ExitCode::from(DRAIN_CUT_SHORT));
        }
        eprintln!("broker stopped");
        Ok(ExitCode::SUCCESS)
    }
}
