//! The `mas` command: `serve` runs the broker, `run` runs the broker and a project's agents,
//! `dev-certs` writes a development PKI, `audit` verifies and queries the audit trail. (The
//! demo is an SDK example: `cargo run -p mas-agent --example demo`.)

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
    use std::path::PathBuf;
    use std::process::ExitCode;

    use anyhow::Context;
    use clap::{Parser, Subcommand};
    use mas_core::ids::AgentId;
    use mas_core::policy::audit::{to_csv, to_json};
    use mas_net::identity::{OperatorId, Principal};
    use mas_net::pki::CertPaths;
    use mas_net::tls::TlsFiles;
    use mas_server::audit::offline;
    use mas_server::project::Project;
    use mas_server::{Broker, BrokerConfig, admin, runner, serve};

    #[derive(Parser)]
    #[command(name = "mas", version, about = "mas broker: secure, at-least-once messaging for agents")]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Run the broker from a configuration file (mas.yaml or a JSON broker file).
        Serve {
            /// Configuration file; default: $MAS_RUNNER_CONFIG_FILE, then the first mas.yaml
            /// in the working directory or a parent.
            #[arg(long)]
            config: Option<PathBuf>,
        },
        /// Run the broker and every agent of a mas.yaml as supervised processes; SIGINT or
        /// SIGTERM stops the agents, then drains the broker.
        Run {
            /// Project file; found as for `serve`.
            #[arg(long)]
            config: Option<PathBuf>,
        },
        /// Write a development CA, a server certificate for localhost/127.0.0.1 and one client
        /// certificate per agent (SPIFFE SAN spiffe://mas/agent/{id}): into `--dir` for the
        /// `--agents` given, or with `--config` to every path a project file names.
        DevCerts {
            /// Output directory.
            #[arg(long, default_value = "dev-certs", conflicts_with = "config")]
            dir: PathBuf,
            /// Agent ids, comma-separated.
            #[arg(long, value_delimiter = ',', required_unless_present = "config")]
            agents: Vec<String>,
            /// Operator names, comma-separated: a client certificate each for the admin API
            /// (SAN spiffe://mas/operator/{name}), written to `operators/{name}.pem` and `.key`
            /// beside the CA.
            #[arg(long, value_delimiter = ',')]
            operators: Vec<String>,
            /// Write the CA, the server's and every agent's certificate where this project
            /// file names them.
            #[arg(long)]
            config: Option<PathBuf>,
        },
        /// Verify or query the audit trail.
        Audit {
            #[command(subcommand)]
            action: AuditCommand,
        },
        /// Operate a running broker through its admin API (an operator certificate and
        /// `admin.operators` in the broker's file); exit codes in the README.
        Admin {
            #[command(flatten)]
            connection: mas_server::operator::cli::Connection,
            #[command(subcommand)]
            command: mas_server::operator::cli::AdminCommand,
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
            #[command(flatten)]
            filter: mas_server::operator::cli::AuditFilterArgs,
            /// At most this many records.
            #[arg(long, default_value_t = 100)]
            limit: usize,
            /// `json` or `csv`.
            #[arg(long, default_value = "json")]
            format: String,
        },
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
        if !matches!(command, Command::Serve { .. } | Command::Run { .. }) {
            init_logging(None)?;
        }
        match command {
            Command::Audit { action: AuditCommand::Verify { source } } => verify(source).await,
            Command::Serve { config } => serve_from(config).await,
            Command::Run { config } => run_project(config).await,
            Command::Admin { connection, command } => Ok(mas_server::operator::cli::run(connection, command).await),
            other => run_command(other).await.map(|()| ExitCode::SUCCESS),
        }
    }

    /// Every command, for callers that need only success or failure (`run` keeps the exit
    /// codes of `serve`, `run`, `admin` and `audit verify`).
    async fn run_command(command: Command) -> anyhow::Result<()> {
        match command {
            Command::Serve { config } => serve_from(config).await.map(|_| ()),
            Command::Run { config } => run_project(config).await.map(|_| ()),
            Command::Admin { connection, command } => {
                mas_server::operator::cli::run(connection, command).await;
                Ok(())
            }
            Command::DevCerts { config: Some(config), operators, .. } => {
                dev_certs_for(&config, &operator_ids(&operators)?)
            }
            Command::DevCerts { dir, agents, operators, config: None } => {
                let agents = agents.iter().map(|a| AgentId::new(a)).collect::<Result<Vec<_>, _>>()?;
                let operators = operator_ids(&operators)?;
                mas_net::pki::write_dev_pki(&dir, &agents, &operators)?;
                println!(
                    "wrote ca.pem, server.pem/.key, {} agent and {} operator certificate(s) to {}",
                    agents.len(),
                    operators.len(),
                    dir.display()
                );
                Ok(())
            }
            Command::Audit { action: AuditCommand::Verify { source } } => verify(source).await.map(|_| ()),
            Command::Audit { action: AuditCommand::Query { source, filter, limit, format } } => {
                let filter = filter.filter().map_err(anyhow::Error::msg)?;
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

    /// The configuration `--config` names, or the one discovery finds.
    fn project(config: Option<PathBuf>) -> anyhow::Result<Project> {
        let cwd = std::env::current_dir().context("cannot read the working directory")?;
        Ok(Project::discover(config.as_deref(), &cwd)?)
    }

    async fn serve_from(config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
        let stop = stop_requested();
        let project = project(config)?;
        let _telemetry = init_logging(Some(&project.broker.telemetry))?;
        let running = RunningBroker::start(project.broker, stop).await?;
        running.finish().await
    }

    /// `mas run`: the broker first, then the agents; on a signal the agents stop first, then
    /// the broker drains. Exit 0 when both ended cleanly, [`AGENTS_KILLED`] when an agent had
    /// to be killed, [`DRAIN_CUT_SHORT`] as for `serve`.
    async fn run_project(config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
        let stop = stop_requested();
        let project = project(config)?;
        let _telemetry = init_logging(Some(&project.broker.telemetry))?;
        let (broker_stop, broker_stopped) = tokio::sync::oneshot::channel::<()>();
        let running = RunningBroker::start(project.broker.clone(), async move {
            let _ = broker_stopped.await;
        })
        .await?;
        // Agents stop on a signal, or when the broker stopped serving on its own (then the
        // error is reported by `finish`).
        let mut serving = running.serving.clone();
        let stop = async move {
            tokio::select! {
                () = stop => {}
                _ = serving.wait_for(|serving| !*serving) => eprintln!("the broker stopped serving; stopping the agents"),
            }
        };
        let agents = match runner::launch_specs(&project, running.addr) {
            Ok(specs) => runner::run_agents(specs, &project.runner, stop).await,
            Err(err) => {
                let _ = broker_stop.send(());
                let _ = running.finish().await;
                return Err(err.into());
            }
        };
        let _ = broker_stop.send(());
        let broker = running.finish().await?;
        if agents.killed > 0 {
            eprintln!("{} agent process(es) outlived runner.stop_timeout_ms and were killed", agents.killed);
            return Ok(ExitCode::from(AGENTS_KILLED));
        }
        Ok(broker)
    }

    /// Exit code of `mas run` when agent processes had to be killed at stop.
    const AGENTS_KILLED: u8 = 4;

    /// `mas dev-certs --config`: a fresh CA, the server's and each agent's certificate, at the
    /// paths the file names.
    fn operator_ids(names: &[String]) -> anyhow::Result<Vec<OperatorId>> {
        names
            .iter()
            .map(|name| OperatorId::new(name).with_context(|| format!("{name:?} is not a valid operator name")))
            .collect()
    }

    fn dev_certs_for(config: &std::path::Path, operators: &[OperatorId]) -> anyhow::Result<()> {
        let project = Project::load(config)?;
        let tls = project.broker.tls.as_ref().context("the file names no TLS paths")?;
        let server = CertPaths { cert: tls.server_cert_path.clone(), key: tls.server_key_path.clone() };
        let agents = project.agents.iter().map(|a| {
            (
                Principal::Agent(a.agent_id.clone()),
                CertPaths { cert: a.tls_cert_path.clone(), key: a.tls_key_path.clone() },
            )
        });
        let operator_files = operators
            .iter()
            .map(|op| (Principal::Operator(op.clone()), mas_net::pki::operator_paths(&tls.client_ca_path, op)));
        let clients: Vec<_> = agents.chain(operator_files).collect();
        mas_net::pki::write_dev_pki_to(&tls.client_ca_path, &server, &clients)?;
        println!(
            "wrote the CA, the server's, {} agent and {} operator certificate(s) named in {}",
            project.agents.len(),
            operators.len(),
            config.display()
        );
        Ok(())
    }

    /// A broker serving until its stop future resolves, with its admin listener.
    struct RunningBroker {
        addr: std::net::SocketAddr,
        broker: std::sync::Arc<Broker>,
        served: tokio::task::JoinHandle<Result<(), mas_server::serve::ServeError>>,
        /// True until the server task ends.
        serving: tokio::sync::watch::Receiver<bool>,
        admin_stop: tokio::sync::oneshot::Sender<()>,
        admin_task: Option<tokio::task::JoinHandle<()>>,
    }

    impl RunningBroker {
        /// Checks the TLS material and paths, binds both listeners, connects the store and
        /// prints the ready line; then serves until `stop` resolves.
        async fn start(
            config: BrokerConfig,
            stop: impl std::future::Future<Output = ()> + Send + 'static,
        ) -> anyhow::Result<RunningBroker> {
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
            let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
            let admin_task = admin.map(|admin| {
                tokio::spawn(admin::serve(broker.clone(), admin, async move {
                    let _ = admin_stopped.await;
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
            let (serving_tx, serving) = tokio::sync::watch::channel(true);
            let served = tokio::spawn({
                let broker = broker.clone();
                async move {
                    let served = serve::serve_tls(broker, bound, &pem, stop).await;
                    serving_tx.send_replace(false);
                    served
                }
            });
            Ok(RunningBroker { addr, broker, served, serving, admin_stop, admin_task })
        }

        /// Waits for the drain to finish; the exit code says whether it was cut short.
        async fn finish(self) -> anyhow::Result<ExitCode> {
            let served = self.served.await.context("the broker's server task failed")?;
            let _ = self.admin_stop.send(());
            if let Some(task) = self.admin_task {
                let _ = task.await;
            }
            served?;
            let outcome = self.broker.drain_outcome();
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
}
