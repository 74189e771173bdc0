//! How one agent process is started: its program, working directory and environment.
//!
//! A `command` agent gets its connection settings in environment variables (the names below
//! are the contract, documented in the README). A `class_path` agent runs through the bundled
//! Python host, which reads the same variables and starts the class the way the reference
//! runner does.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use mas_core::ids::AgentId;
use tokio::process::Command;

use crate::project::{AgentProcess, Launch};

/// `host:port` of the broker (`localhost:{port}` when it listens on a wildcard address).
pub const ENV_SERVER_ADDR: &str = "MAS_SERVER_ADDR";
/// The agent id.
pub const ENV_AGENT_ID: &str = "MAS_AGENT_ID";
/// Which of the entry's `instances` this process is, from 0.
pub const ENV_INSTANCE_INDEX: &str = "MAS_INSTANCE_INDEX";
/// The CA the broker's certificate chains to (the file's `tls_ca_path`).
pub const ENV_TLS_CA_PATH: &str = "MAS_TLS_CA_PATH";
/// The agent's certificate.
pub const ENV_TLS_CERT_PATH: &str = "MAS_TLS_CERT_PATH";
/// The agent's private key.
pub const ENV_TLS_KEY_PATH: &str = "MAS_TLS_KEY_PATH";
/// The entry's `init_kwargs` as a JSON object.
pub const ENV_INIT_KWARGS: &str = "MAS_INIT_KWARGS";
/// The directory of the configuration file (also the process's working directory).
pub const ENV_PROJECT_DIR: &str = "MAS_PROJECT_DIR";
/// For the Python host: the `module:ClassName` to run.
pub const ENV_CLASS_PATH: &str = "MAS_CLASS_PATH";

/// The Python host, passed to the interpreter with `-c` so the `mas` binary needs no files
/// beside it.
const PYTHON_HOST: &str = include_str!("python_host.py");

/// Everything needed to start any instance of one agent entry.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The agent.
    pub agent_id: AgentId,
    launch: Launch,
    server_addr: String,
    ca_path: PathBuf,
    cert_path: PathBuf,
    key_path: PathBuf,
    init_kwargs: String,
    project_dir: PathBuf,
    python: PathBuf,
    parent_death: Option<PathBuf>,
}

impl LaunchSpec {
    /// The spec of `agent`, or `None` when it is only allowlisted.
    pub fn new(
        agent: &AgentProcess,
        server_addr: &str,
        ca_path: &Path,
        project_dir: &Path,
        python: &Path,
        parent_death: Option<&Path>,
    ) -> Option<LaunchSpec> {
        Some(LaunchSpec {
            agent_id: agent.agent_id.clone(),
            launch: agent.launch.clone()?,
            server_addr: server_addr.to_string(),
            ca_path: ca_path.to_path_buf(),
            cert_path: agent.tls_cert_path.clone(),
            key_path: agent.tls_key_path.clone(),
            init_kwargs: serde_json::Value::Object(agent.init_kwargs.clone()).to_string(),
            project_dir: project_dir.to_path_buf(),
            python: python.to_path_buf(),
            parent_death: parent_death.map(Path::to_path_buf),
        })
    }

    /// The command for instance `index`, output piped so the runner can label it, killed if
    /// the runner's handle to it is dropped, and sent SIGTERM by the kernel if the runner dies
    /// (when `setpriv` was found).
    pub fn command(&self, index: u32) -> Command {
        let (program, args): (&Path, Vec<&std::ffi::OsStr>) = match &self.launch {
            Launch::Command(argv) => (Path::new(&argv[0]), argv[1..].iter().map(|a| a.as_ref()).collect()),
            Launch::Python { class_path: _ } => (&self.python, vec!["-c".as_ref(), PYTHON_HOST.as_ref()]),
        };
        let mut command = match &self.parent_death {
            Some(setpriv) => {
                let mut command = Command::new(setpriv);
                command.args(["--pdeathsig", "TERM", "--"]).arg(program);
                command
            }
            None => Command::new(program),
        };
        command.args(args);
        if let Launch::Python { class_path } = &self.launch {
            command.env(ENV_CLASS_PATH, class_path).env("PYTHONUNBUFFERED", "1");
        }
        command
            .current_dir(&self.project_dir)
            .env(ENV_SERVER_ADDR, &self.server_addr)
            .env(ENV_AGENT_ID, self.agent_id.as_str())
            .env(ENV_INSTANCE_INDEX, index.to_string())
            .env(ENV_TLS_CA_PATH, &self.ca_path)
            .env(ENV_TLS_CERT_PATH, &self.cert_path)
            .env(ENV_TLS_KEY_PATH, &self.key_path)
            .env(ENV_INIT_KWARGS, &self.init_kwargs)
            .env(ENV_PROJECT_DIR, &self.project_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }
}

/// util-linux's `setpriv`, found on `PATH`. Started through it, an agent is sent SIGTERM by
/// the kernel when the runner dies, even by SIGKILL (`PR_SET_PDEATHSIG`), so no agent outlives
/// its runner. Setting that flag directly needs code between fork and exec (`pre_exec`, which
/// is unsafe); `setpriv` sets it in the child and then execs the agent, so the pid the runner
/// sees is the agent's own.
pub fn parent_death_wrapper() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("setpriv")).find(|candidate| candidate.is_file())
}
