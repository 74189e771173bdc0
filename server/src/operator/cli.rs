//! `mas admin`: the admin API from the command line, for people and scripts.
//!
//! Exit codes: 0 done; 1 the broker could not be reached or failed; 2 a usage error or an
//! argument the broker refused (`INVALID_ARGUMENT`); 3 refused (not an operator, not an allowed
//! one, or no valid certificate); 4 not found; 5 `audit verify` found a broken chain.

use std::path::PathBuf;
use std::process::ExitCode;

use mas_net::identity::OperatorId;
use mas_net::tls::TlsFiles;
use mas_proto::admin::admin_service_client::AdminServiceClient;
use mas_proto::admin::{
    AgentGrants, AgentRequest, AgentStatus, ApplyPresetRequest, ChangeGrantsRequest, DeadLetter, DeadLetterSelector,
    GetDeadLetterRequest, GetGrantsRequest, KickSessionRequest, ListAgentsRequest, ListDeadLettersRequest,
    QueryAuditRequest, VerifyAuditRequest,
};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::project::{Project, client_addr};

/// Where the broker is and who is calling.
#[derive(Debug, clap::Args)]
pub struct Connection {
    /// The broker's `host:port` (default: the project file's `server_listen_addr`).
    #[arg(long)]
    addr: Option<String>,
    /// A project file (mas.yaml) to take the address and CA from.
    #[arg(long)]
    config: Option<PathBuf>,
    /// With `--config`: use `operators/{name}.pem` and `.key` beside its CA (as `mas dev-certs
    /// --operators` writes them).
    #[arg(long)]
    operator: Option<String>,
    /// The CA the broker's certificate chains to (default: the project file's `tls_ca_path`).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The operator's certificate.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// The operator's private key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Output: `table` for people, `json` for scripts.
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
}

/// What to do.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Dead letters: list, show, redrive, purge.
    Dlq {
        /// The dead-letter action.
        #[command(subcommand)]
        action: DlqCommand,
    },
    /// Grants, blocks and roles: show, change (for every broker on the store).
    Grants {
        /// The grants action.
        #[command(subcommand)]
        action: GrantsCommand,
    },
    /// Every agent: sessions here, queue, circuit, audit, dead letters, rate-limit usage.
    Agents {
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Queue depth and the age of the oldest queued message, per agent.
    Queues,
    /// Circuit breakers: list, reset.
    Circuits {
        /// The circuits action.
        #[command(subcommand)]
        action: ResetCommand,
    },
    /// Rate limits: current usage per sender, reset.
    Limits {
        /// The limits action.
        #[command(subcommand)]
        action: ResetCommand,
    },
    /// Sessions: list (on this broker), kick (an instance, on whichever broker holds it).
    Sessions {
        /// The sessions action.
        #[command(subcommand)]
        action: SessionsCommand,
    },
    /// The audit trail: verify, query, follow.
    Audit {
        /// The audit action.
        #[command(subcommand)]
        action: AuditCommand,
    },
}

/// `mas admin circuits|limits ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ResetCommand {
    /// Show every agent's state.
    List,
    /// Reset one agent's state (store-wide).
    Reset {
        /// The agent.
        #[arg(long)]
        agent: String,
    },
}

/// `mas admin sessions ...`.
#[derive(Debug, clap::Subcommand)]
pub enum SessionsCommand {
    /// Sessions on this broker.
    List,
    /// End an instance's session wherever it is (its lease is revoked; the holder ends the
    /// session at its next renewal and the instance's work is redelivered).
    Kick {
        /// The agent.
        #[arg(long)]
        agent: String,
        /// The instance id (as `sessions list` shows it).
        #[arg(long)]
        instance: String,
    },
}

/// `mas admin audit ...`.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Verify every chain in the store: exit 0 intact, 5 broken.
    Verify,
    /// Message records matching a filter, oldest first (one JSON object per line).
    Query {
        #[command(flatten)]
        /// Which records.
        filter: AuditFilterArgs,
        /// At most this many (cap 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Print matching records as they are written, one JSON object per line, until Ctrl-C.
    Follow {
        #[command(flatten)]
        /// Which records.
        filter: AuditFilterArgs,
    },
}

/// An audit filter.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditFilterArgs {
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
}

impl AuditFilterArgs {
    /// The filter, for reading chains offline (`mas audit query`).
    pub fn filter(&self) -> Result<mas_core::policy::audit::AuditFilter, String> {
        let decision = match &self.decision {
            Some(name) => Some(
                mas_core::policy::audit::Decision::parse(name).ok_or_else(|| format!("unknown decision {name:?}"))?,
            ),
            None => None,
        };
        Ok(mas_core::policy::audit::AuditFilter {
            sender: self.sender.clone(),
            target: self.target.clone(),
            decision,
            since: self.since,
            until: self.until,
        })
    }

    fn request(&self, limit: u32) -> QueryAuditRequest {
        QueryAuditRequest {
            sender: self.sender.clone().unwrap_or_default(),
            target: self.target.clone().unwrap_or_default(),
            decision: self.decision.clone().unwrap_or_default(),
            since: self.since.unwrap_or(0.0),
            until: self.until.unwrap_or(0.0),
            limit,
        }
    }
}

/// `mas admin grants ...`.
#[derive(Debug, clap::Subcommand)]
pub enum GrantsCommand {
    /// The grants in force on this broker.
    Show {
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Change one agent's grants; persisted in the store and applied by every broker on it
    /// within its `admin.authz_refresh_ms`. Applied in order: allow, revoke, block, unblock,
    /// assign, unassign.
    Change {
        /// The agent whose grants change.
        #[arg(long)]
        agent: String,
        /// Let it message this agent (or `*`); repeat the flag for several.
        #[arg(long)]
        allow: Vec<String>,
        /// Take away an allowed target.
        #[arg(long)]
        revoke: Vec<String>,
        /// Block a target whatever grants it.
        #[arg(long)]
        block: Vec<String>,
        /// Lift a block.
        #[arg(long)]
        unblock: Vec<String>,
        /// Give a role.
        #[arg(long)]
        assign_role: Vec<String>,
        /// Take a role away.
        #[arg(long)]
        unassign_role: Vec<String>,
    },
    /// Apply a permission preset as a mas.yaml `permissions` entry writes it, in JSON, e.g.
    /// '{"type": "allow_bidirectional", "agents": ["alice", "carol"]}'.
    Preset {
        /// The preset (JSON).
        preset: String,
    },
}

/// `mas admin dlq ...`.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first (no payloads unless `--envelopes`).
    List {
        /// Which letters (none: all).
        #[command(flatten)]
        filter: Filter,
        /// At most this many (cap 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Include each message's envelope (its payload).
        #[arg(long)]
        envelopes: bool,
    },
    /// Show one dead letter with its envelope.
    Show {
        /// The agent whose queue holds it.
        #[arg(long)]
        agent: String,
        /// Its id, as listed.
        id: String,
    },
    /// Put the selected dead letters back in their work queues with a fresh attempt count.
    Redrive {
        /// Which letters.
        #[command(flatten)]
        filter: Filter,
    },
    /// Delete the selected dead letters.
    Purge {
        /// Which letters.
        #[command(flatten)]
        filter: Filter,
    },
}

/// Which dead letters; redrive and purge need at least one condition or `--all`.
#[derive(Debug, Clone, clap::Args)]
pub struct Filter {
    /// Only this agent's queue.
    #[arg(long)]
    agent: Option<String>,
    /// Only these ids (repeat the flag).
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Only letters with exactly this reason.
    #[arg(long)]
    reason: Option<String>,
    /// Only letters dead-lettered at least this many milliseconds ago.
    #[arg(long)]
    older_than_ms: Option<u64>,
    /// Every letter (of `--agent`, or of every agent).
    #[arg(long)]
    all: bool,
}

impl Filter {
    fn selector(&self) -> DeadLetterSelector {
        DeadLetterSelector {
            agent_id: self.agent.clone().unwrap_or_default(),
            ids: self.ids.clone(),
            reason: self.reason.clone().unwrap_or_default(),
            older_than_ms: self.older_than_ms.unwrap_or(0),
            all: self.all,
        }
    }
}

/// Why a command failed, and its exit code.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure { code: 2, message: message.into() }
    }

    fn unreachable(message: impl Into<String>) -> Failure {
        Failure { code: 1, message: message.into() }
    }

    fn of(status: tonic::Status) -> Failure {
        let code = match status.code() {
            Code::InvalidArgument => 2,
            Code::Unauthenticated | Code::PermissionDenied => 3,
            Code::NotFound => 4,
            _ => 1,
        };
        Failure { code, message: format!("{:?}: {}", status.code(), status.message()) }
    }
}

/// Runs one `mas admin` command; prints the result on stdout, a failure on stderr.
pub async fn run(connection: Connection, command: AdminCommand) -> ExitCode {
    let json = connection.format == "json";
    match execute(connection, command).await {
        Ok(output) => {
            if !output.json.is_null() {
                print!("{}", if json { format!("{:#}\n", output.json) } else { output.table });
            }
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("mas admin: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// A result in both formats.
struct Output {
    json: serde_json::Value,
    table: String,
}

async fn execute(connection: Connection, command: AdminCommand) -> Result<Output, Failure> {
    let json = connection.format == "json";
    let mut client = connect(&connection).await?;
    match command {
        AdminCommand::Dlq { action } => dead_letters(&mut client, action).await,
        AdminCommand::Grants { action } => grants(&mut client, action).await,
        AdminCommand::Agents { agent } => {
            let agents = list_agents(&mut client, agent).await?;
            let table = table(
                std::iter::once(
                    [
                        "AGENT",
                        "SESSIONS HERE",
                        "IN FLIGHT",
                        "QUEUED",
                        "OLDEST",
                        "CIRCUIT",
                        "AUDIT",
                        "DLQ",
                        "RATE/MIN",
                        "RATE/H",
                    ]
                    .map(String::from),
                )
                .chain(agents.iter().map(|a| {
                    [
                        a.agent_id.clone(),
                        a.sessions_here.join(","),
                        a.in_flight_here.to_string(),
                        a.queue_depth.to_string(),
                        format!("{:.1}s", a.oldest_age_s),
                        a.circuit.clone(),
                        a.audit_records.to_string(),
                        a.dead_letters.to_string(),
                        format!("{}/{}", a.rate_minute_used, a.rate_per_minute),
                        format!("{}/{}", a.rate_hour_used, a.rate_per_hour),
                    ]
                }))
                .collect(),
            );
            Ok(Output { json: serde_json::Value::Array(agents.iter().map(agent_json).collect()), table })
        }
        AdminCommand::Queues => {
            let agents = list_agents(&mut client, None).await?;
            let rows = agents
                .iter()
                .map(|a| [a.agent_id.clone(), a.queue_depth.to_string(), format!("{:.1}s", a.oldest_age_s)]);
            let json = agents.iter().map(|a| {
                serde_json::json!({ "agent_id": a.agent_id, "queue_depth": a.queue_depth, "oldest_age_s": a.oldest_age_s })
            });
            Ok(Output {
                json: serde_json::Value::Array(json.collect()),
                table: table(std::iter::once(["AGENT", "QUEUED", "OLDEST"].map(String::from)).chain(rows).collect()),
            })
        }
        AdminCommand::Circuits { action: ResetCommand::List } => {
            let agents = list_agents(&mut client, None).await?;
            let rows = agents.iter().map(|a| [a.agent_id.clone(), a.circuit.clone()]);
            let json = agents.iter().map(|a| serde_json::json!({ "agent_id": a.agent_id, "circuit": a.circuit }));
            Ok(Output {
                json: serde_json::Value::Array(json.collect()),
                table: table(std::iter::once(["AGENT", "CIRCUIT"].map(String::from)).chain(rows).collect()),
            })
        }
        AdminCommand::Circuits { action: ResetCommand::Reset { agent } } => {
            let reset = client.reset_circuit(AgentRequest { agent_id: agent }).await.map_err(Failure::of)?.into_inner();
            Ok(reset_output(reset.had_state))
        }
        AdminCommand::Limits { action: ResetCommand::List } => {
            let agents = list_agents(&mut client, None).await?;
            let rows = agents.iter().map(|a| {
                [
                    a.agent_id.clone(),
                    format!("{}/{}", a.rate_minute_used, a.rate_per_minute),
                    format!("{}/{}", a.rate_hour_used, a.rate_per_hour),
                ]
            });
            let json = agents.iter().map(|a| {
                serde_json::json!({
                    "agent_id": a.agent_id,
                    "minute_used": a.rate_minute_used, "per_minute": a.rate_per_minute,
                    "hour_used": a.rate_hour_used, "per_hour": a.rate_per_hour,
                })
            });
            Ok(Output {
                json: serde_json::Value::Array(json.collect()),
                table: table(std::iter::once(["SENDER", "MINUTE", "HOUR"].map(String::from)).chain(rows).collect()),
            })
        }
        AdminCommand::Limits { action: ResetCommand::Reset { agent } } => {
            let reset =
                client.reset_rate_limit(AgentRequest { agent_id: agent }).await.map_err(Failure::of)?.into_inner();
            Ok(reset_output(reset.had_state))
        }
        AdminCommand::Sessions { action: SessionsCommand::List } => {
            let agents = list_agents(&mut client, None).await?;
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            let sessions: Vec<(&str, &mas_proto::admin::SessionHere)> =
                agents.iter().flat_map(|a| a.sessions.iter().map(move |s| (a.agent_id.as_str(), s))).collect();
            let rows = sessions.iter().map(|(agent, s)| {
                [agent.to_string(), s.instance_id.clone(), format!("{:.0}s", (now - s.connected_at).max(0.0))]
            });
            let json = sessions.iter().map(|(agent, s)| {
                serde_json::json!({ "agent_id": agent, "instance_id": s.instance_id, "connected_at": s.connected_at })
            });
            Ok(Output {
                json: serde_json::Value::Array(json.collect()),
                table: table(
                    std::iter::once(["AGENT", "INSTANCE", "CONNECTED FOR"].map(String::from)).chain(rows).collect(),
                ),
            })
        }
        AdminCommand::Sessions { action: SessionsCommand::Kick { agent, instance } } => {
            let request = KickSessionRequest { agent_id: agent, instance_id: instance };
            let kicked = client.kick_session(request).await.map_err(Failure::of)?.into_inner().kicked;
            if !kicked {
                return Err(Failure { code: 4, message: "no such session (the instance holds no lease)".into() });
            }
            Ok(Output { json: serde_json::json!({ "kicked": true }), table: "kicked\n".into() })
        }
        AdminCommand::Audit { action: AuditCommand::Verify } => {
            let report = client.verify_audit(VerifyAuditRequest {}).await.map_err(Failure::of)?.into_inner();
            let rows = report.chains.iter().map(|c| {
                [
                    c.chain.clone(),
                    c.records.to_string(),
                    c.archived.to_string(),
                    if c.fault.is_empty() { "ok".into() } else { c.fault.clone() },
                ]
            });
            let chains: Vec<_> = report
                .chains
                .iter()
                .map(|c| serde_json::json!({ "chain": c.chain, "records": c.records, "archived": c.archived, "fault": c.fault }))
                .collect();
            let output = Output {
                json: serde_json::json!({ "intact": report.intact, "chains": chains }),
                table: table(
                    std::iter::once(["CHAIN", "RECORDS", "ARCHIVED", "VERDICT"].map(String::from))
                        .chain(rows)
                        .collect(),
                ),
            };
            if report.intact {
                Ok(output)
            } else {
                print!("{}", if json { format!("{:#}\n", output.json) } else { output.table });
                Err(Failure { code: 5, message: "an audit chain is broken".into() })
            }
        }
        AdminCommand::Audit { action: AuditCommand::Query { filter, limit } } => {
            let found = client.query_audit(filter.request(limit)).await.map_err(Failure::of)?.into_inner();
            let lines: String = found.records.iter().map(|r| format!("{}\n", r.json)).collect();
            let records =
                found.records.iter().map(|r| serde_json::from_str(&r.json).unwrap_or(serde_json::Value::Null));
            Ok(Output { json: serde_json::Value::Array(records.collect()), table: lines })
        }
        AdminCommand::Audit { action: AuditCommand::Follow { filter } } => {
            let mut stream = client.follow_audit(filter.request(0)).await.map_err(Failure::of)?.into_inner();
            use std::io::Write;
            while let Some(record) = stream.message().await.map_err(Failure::of)? {
                println!("{}", record.json);
                let _ = std::io::stdout().flush();
            }
            Ok(Output { json: serde_json::Value::Null, table: String::new() })
        }
    }
}

async fn list_agents(
    client: &mut AdminServiceClient<Channel>,
    agent: Option<String>,
) -> Result<Vec<AgentStatus>, Failure> {
    let request = ListAgentsRequest { agent_id: agent.unwrap_or_default() };
    Ok(client.list_agents(request).await.map_err(Failure::of)?.into_inner().agents)
}

fn reset_output(had_state: bool) -> Output {
    Output {
        json: serde_json::json!({ "had_state": had_state }),
        table: if had_state { "reset\n".into() } else { "nothing to reset\n".into() },
    }
}

fn agent_json(a: &AgentStatus) -> serde_json::Value {
    serde_json::json!({
        "agent_id": a.agent_id,
        "sessions_here": a.sessions_here,
        "in_flight_here": a.in_flight_here,
        "queue_depth": a.queue_depth,
        "oldest_age_s": a.oldest_age_s,
        "circuit": a.circuit,
        "audit_records": a.audit_records,
        "dead_letters": a.dead_letters,
        "rate_minute_used": a.rate_minute_used,
        "rate_hour_used": a.rate_hour_used,
        "rate_per_minute": a.rate_per_minute,
        "rate_per_hour": a.rate_per_hour,
    })
}

async fn grants(client: &mut AdminServiceClient<Channel>, action: GrantsCommand) -> Result<Output, Failure> {
    match action {
        GrantsCommand::Show { agent } => {
            let request = GetGrantsRequest { agent_id: agent.unwrap_or_default() };
            let shown = client.get_grants(request).await.map_err(Failure::of)?.into_inner();
            let grants: Vec<_> = shown.grants.iter().map(grants_json).collect();
            let table = format!("revision {}\n{}", shown.revision, grants_table(&shown.grants));
            Ok(Output { json: serde_json::json!({ "revision": shown.revision, "grants": grants }), table })
        }
        GrantsCommand::Change { agent, allow, revoke, block, unblock, assign_role, unassign_role } => {
            let request = ChangeGrantsRequest {
                agent_id: agent,
                allow,
                revoke,
                block,
                unblock,
                assign_roles: assign_role,
                unassign_roles: unassign_role,
            };
            let changed = client.change_grants(request).await.map_err(Failure::of)?.into_inner();
            let grants = changed.grants.unwrap_or_default();
            Ok(Output {
                json: serde_json::json!({ "revision": changed.revision, "grants": grants_json(&grants) }),
                table: format!("revision {}\n{}", changed.revision, grants_table(std::slice::from_ref(&grants))),
            })
        }
        GrantsCommand::Preset { preset } => {
            let applied = client
                .apply_preset(ApplyPresetRequest { preset_json: preset })
                .await
                .map_err(Failure::of)?
                .into_inner();
            let grants: Vec<_> = applied.grants.iter().map(grants_json).collect();
            Ok(Output {
                json: serde_json::json!({ "revision": applied.revision, "grants": grants }),
                table: format!("revision {}\n{}", applied.revision, grants_table(&applied.grants)),
            })
        }
    }
}

async fn dead_letters(client: &mut AdminServiceClient<Channel>, action: DlqCommand) -> Result<Output, Failure> {
    match action {
        DlqCommand::List { filter, limit, envelopes } => {
            let request =
                ListDeadLettersRequest { selector: Some(filter.selector()), limit, include_envelope: envelopes };
            let listed = client.list_dead_letters(request).await.map_err(Failure::of)?.into_inner();
            let mut table = letters_table(&listed.letters);
            if listed.truncated {
                table.push_str("(more match: raise --limit or narrow the filter)\n");
            }
            let letters: Vec<_> = listed.letters.iter().map(letter_json).collect();
            Ok(Output { json: serde_json::json!({ "letters": letters, "truncated": listed.truncated }), table })
        }
        DlqCommand::Show { agent, id } => {
            let letter = client
                .get_dead_letter(GetDeadLetterRequest { agent_id: agent, id })
                .await
                .map_err(Failure::of)?
                .into_inner();
            let table = format!("{}envelope: {}\n", letters_table(std::slice::from_ref(&letter)), letter.envelope_json);
            Ok(Output { json: letter_json(&letter), table })
        }
        DlqCommand::Redrive { filter } => {
            let done = client.redrive_dead_letters(filter.selector()).await.map_err(Failure::of)?.into_inner();
            Ok(Output {
                json: serde_json::json!({ "redriven": done.redriven, "not_found": done.not_found, "queue_full": done.queue_full }),
                table: format!(
                    "redriven {}, not found {}, left for a full queue {}\n",
                    done.redriven, done.not_found, done.queue_full
                ),
            })
        }
        DlqCommand::Purge { filter } => {
            let done = client.purge_dead_letters(filter.selector()).await.map_err(Failure::of)?.into_inner();
            Ok(Output {
                json: serde_json::json!({ "purged": done.purged }),
                table: format!("purged {}\n", done.purged),
            })
        }
    }
}

/// The address and files to use: the flags, else what the project file says.
fn resolve(connection: &Connection) -> Result<(String, TlsFiles), Failure> {
    let project = match &connection.config {
        Some(path) => Some(Project::load(path).map_err(|e| Failure::usage(e.to_string()))?),
        None => None,
    };
    let project_ca = project.as_ref().and_then(|p| p.broker.tls.as_ref()).map(|t| t.client_ca_path.clone());
    let addr = match (&connection.addr, &project) {
        (Some(addr), _) => addr.clone(),
        (None, Some(project)) => client_addr(project.broker.listen_addr),
        (None, None) => return Err(Failure::usage("give --addr, or --config with a project file")),
    };
    let ca = connection.ca.clone().or(project_ca).ok_or_else(|| Failure::usage("give --ca, or --config"))?;
    let operator_files = match &connection.operator {
        Some(name) => {
            let operator =
                OperatorId::new(name).ok_or_else(|| Failure::usage(format!("{name:?} is not an operator name")))?;
            Some(mas_net::pki::operator_paths(&ca, &operator))
        }
        None => None,
    };
    let cert = connection.cert.clone().or_else(|| operator_files.as_ref().map(|p| p.cert.clone()));
    let key = connection.key.clone().or_else(|| operator_files.as_ref().map(|p| p.key.clone()));
    match (cert, key) {
        (Some(cert), Some(key)) => Ok((addr, TlsFiles { ca, cert, key })),
        _ => Err(Failure::usage("give --cert and --key, or --operator NAME with --config")),
    }
}

async fn connect(connection: &Connection) -> Result<AdminServiceClient<Channel>, Failure> {
    let (addr, files) = resolve(connection)?;
    let pem = files.load().map_err(|e| Failure::usage(e.to_string()))?;
    mas_net::tls::install_crypto_provider();
    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(host, _)| host).trim_matches(['[', ']']).to_string();
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| Failure::usage(format!("bad address {addr:?}: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(5))
        .tls_config(pem.client_config(&host))
        .map_err(|e| Failure::usage(format!("TLS settings rejected: {e}")))?;
    let channel = endpoint.connect().await.map_err(|e| Failure::unreachable(format!("cannot reach {addr}: {e}")))?;
    Ok(AdminServiceClient::new(channel))
}

fn letter_json(letter: &DeadLetter) -> serde_json::Value {
    let mut value = serde_json::json!({
        "agent_id": letter.agent_id,
        "id": letter.id,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "age_ms": letter.age_ms,
        "message_id": letter.message_id,
        "sender_id": letter.sender_id,
        "message_type": letter.message_type,
    });
    if !letter.envelope_json.is_empty()
        && let Some(fields) = value.as_object_mut()
    {
        let envelope = serde_json::from_str(&letter.envelope_json).unwrap_or(serde_json::Value::Null);
        fields.insert("envelope".into(), envelope);
    }
    value
}

fn grants_json(grants: &AgentGrants) -> serde_json::Value {
    serde_json::json!({
        "agent_id": grants.agent_id,
        "allowed": grants.allowed,
        "blocked": grants.blocked,
        "roles": grants.roles,
    })
}

fn grants_table(grants: &[AgentGrants]) -> String {
    let header = ["AGENT", "ALLOWED", "BLOCKED", "ROLES"].map(String::from);
    let rows = grants.iter().map(|g| [g.agent_id.clone(), g.allowed.join(","), g.blocked.join(","), g.roles.join(",")]);
    table(std::iter::once(header).chain(rows).collect())
}

fn letters_table(letters: &[DeadLetter]) -> String {
    let header = ["AGENT", "ID", "REASON", "ATTEMPTS", "AGE", "MESSAGE", "SENDER", "TYPE"].map(String::from);
    let rows = letters.iter().map(|l| {
        [
            l.agent_id.clone(),
            l.id.clone(),
            l.reason.clone(),
            l.attempts.to_string(),
            format!("{:.1}s", l.age_ms as f64 / 1000.0),
            l.message_id.clone(),
            l.sender_id.clone(),
            l.message_type.clone(),
        ]
    });
    table(std::iter::once(header).chain(rows).collect())
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(rows: Vec<[String; N]>) -> String {
    let widths: Vec<usize> = (0..N).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
            format!("{}\n", cells.join("  ").trim_end())
        })
        .collect()
}
