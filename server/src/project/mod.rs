//! Configuration files: finding one, reading it (YAML or JSON, either schema) and resolving
//! its relative paths.
//!
//! Two schemas are read, in YAML or JSON alike:
//! - the **project file** (`mas.yaml`), the reference runner's schema with mas's sections
//!   added: `agents` is a list of entries, each a process `mas run` may start;
//! - the **broker file**, mas's earlier JSON schema: `agents` is a map of agent id to
//!   definition (an allowlist only). Such files keep working unchanged.
//!
//! Both become one [`BrokerConfig`]. Relative paths in either resolve against the directory of
//! the file, so a project can be moved or started from anywhere.

mod gateway;
mod schema;

use std::path::{Path, PathBuf};
use std::time::Duration;

use mas_core::ids::AgentId;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::{BrokerConfig, ConfigError};

pub use schema::client_addr;

/// The environment variable naming the configuration file when `--config` is not given (the
/// reference runner's).
pub const CONFIG_FILE_ENV: &str = "MAS_RUNNER_CONFIG_FILE";

/// The file searched for from the working directory upward.
pub const PROJECT_FILE_NAME: &str = "mas.yaml";

/// A configuration file, read and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    /// Where it was read from.
    pub path: PathBuf,
    /// The broker's settings.
    pub broker: BrokerConfig,
    /// The agent processes `mas run` starts, in file order (none for a broker file).
    pub agents: Vec<AgentProcess>,
    /// How `mas run` supervises them.
    pub runner: RunnerSettings,
}

/// One `agents[]` entry of a project file: `instances` processes of one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentProcess {
    /// The agent.
    pub agent_id: AgentId,
    /// How many processes (each its own instance of the agent).
    pub instances: u32,
    /// How to start one; `None` for an agent that is only allowlisted.
    pub launch: Option<Launch>,
    /// The agent's client certificate.
    pub tls_cert_path: PathBuf,
    /// The agent's private key.
    pub tls_key_path: PathBuf,
    /// Passed to the agent (as keyword arguments to a Python class, as JSON to a command).
    pub init_kwargs: serde_json::Map<String, serde_json::Value>,
}

/// How an agent process starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// A program and its arguments (mas's extension to the schema).
    Command(Vec<String>),
    /// A Python `mas.Agent` subclass, `module:ClassName`, run by the bundled host.
    Python {
        /// `module:ClassName`.
        class_path: String,
    },
}

/// The project file's `runner` section (mas's): how agent processes are supervised.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunnerSettings {
    /// The interpreter for `class_path` agents (default `python3` on `PATH`); a path with a
    /// `/` is taken relative to the file's directory.
    pub python: PathBuf,
    /// First delay before restarting an agent process that exited (default 500 ms) ...
    pub restart_backoff_initial_ms: u64,
    /// ... doubling up to this (default 30 000 ms).
    pub restart_backoff_max_ms: u64,
    /// A process that ran this long before exiting restarts after the initial delay again
    /// (default 10 000 ms).
    pub restart_backoff_reset_after_ms: u64,
    /// On stop, how long agent processes get to exit after SIGTERM before they are killed
    /// (default 10 000 ms).
    pub stop_timeout_ms: u64,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        RunnerSettings {
            python: PathBuf::from("python3"),
            restart_backoff_initial_ms: 500,
            restart_backoff_max_ms: 30_000,
            restart_backoff_reset_after_ms: 10_000,
            stop_timeout_ms: 10_000,
        }
    }
}

impl RunnerSettings {
    /// The first restart delay.
    pub fn restart_backoff_initial(&self) -> Duration {
        Duration::from_millis(self.restart_backoff_initial_ms)
    }

    /// The longest restart delay.
    pub fn restart_backoff_max(&self) -> Duration {
        Duration::from_millis(self.restart_backoff_max_ms)
    }

    /// How long a process must have run for its next restart to start from the initial delay.
    pub fn restart_backoff_reset_after(&self) -> Duration {
        Duration::from_millis(self.restart_backoff_reset_after_ms)
    }

    /// How long agents get to stop.
    pub fn stop_timeout(&self) -> Duration {
        Duration::from_millis(self.stop_timeout_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        const HOUR_MS: u64 = 3_600_000;
        let checks = [
            ("runner.restart_backoff_initial_ms", self.restart_backoff_initial_ms, 1),
            ("runner.restart_backoff_max_ms", self.restart_backoff_max_ms, 1),
            ("runner.restart_backoff_reset_after_ms", self.restart_backoff_reset_after_ms, 0),
            ("runner.stop_timeout_ms", self.stop_timeout_ms, 0),
        ];
        for (name, value, min) in checks {
            if !(min..=HOUR_MS).contains(&value) {
                return Err(ConfigError::Invalid(format!("{name} is {value}; it must be between {min} and {HOUR_MS}")));
            }
        }
        if self.restart_backoff_initial_ms > self.restart_backoff_max_ms {
            return Err(ConfigError::Invalid(
                "runner.restart_backoff_initial_ms must not exceed runner.restart_backoff_max_ms".into(),
            ));
        }
        Ok(())
    }
}

impl Project {
    /// The file named by `explicit`, else by `MAS_RUNNER_CONFIG_FILE`, else the first
    /// `mas.yaml` in `cwd` or one of its parents; read and checked.
    pub fn discover(explicit: Option<&Path>, cwd: &Path) -> Result<Project, ConfigError> {
        let env = std::env::var_os(CONFIG_FILE_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
        Project::load(&locate(explicit, env.as_deref(), cwd)?)
    }

    /// Reads and checks one file: JSON when its name ends in `.json`, YAML otherwise.
    pub fn load(path: &Path) -> Result<Project, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ConfigError::NotFound(path.into()),
            _ => ConfigError::Read { path: path.into(), source },
        })?;
        let dir = absolute_dir_of(path)?;
        let mut project = Project::parse(&text, Format::of(path), path)?;
        project.resolve_paths(&dir);
        project.validate()?;
        Ok(project)
    }

    /// Parses either schema, paths as written.
    fn parse(text: &str, format: Format, path: &Path) -> Result<Project, ConfigError> {
        let outline: serde_json::Value = format.parse(text, path)?;
        let Some(top) = outline.as_object() else {
            return Err(ConfigError::Invalid(format!("{}: the file must be a mapping of keys", path.display())));
        };
        if top.get("agents").is_some_and(serde_json::Value::is_object) {
            let broker: BrokerConfig = format.parse(text, path)?;
            return Ok(Project { path: path.into(), broker, agents: Vec::new(), runner: RunnerSettings::default() });
        }
        format.parse::<schema::ProjectFile>(text, path)?.into_project(path.into())
    }

    /// Makes every relative path absolute against `dir`, the file's directory.
    fn resolve_paths(&mut self, dir: &Path) {
        self.broker.resolve_paths(dir);
        for agent in &mut self.agents {
            resolve(dir, &mut agent.tls_cert_path);
            resolve(dir, &mut agent.tls_key_path);
            if let Some(Launch::Command(argv)) = &mut agent.launch
                && let Some(program) = argv.first_mut().filter(|p| p.contains('/'))
            {
                let mut path = PathBuf::from(&*program);
                resolve(dir, &mut path);
                *program = path.to_string_lossy().into_owned();
            }
        }
        if self.runner.python.components().count() > 1 {
            resolve(dir, &mut self.runner.python);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.broker.validate()?;
        self.runner.validate()
    }

    /// The directory the file is in (agents run there; `class_path` modules import from it).
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

/// Where the configuration is: `explicit`, else `env`, else `mas.yaml` upward from `cwd`.
fn locate(explicit: Option<&Path>, env: Option<&Path>, cwd: &Path) -> Result<PathBuf, ConfigError> {
    if let Some(path) = explicit.or(env) {
        return Ok(path.to_path_buf());
    }
    cwd.ancestors()
        .map(|dir| dir.join(PROJECT_FILE_NAME))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| ConfigError::NoProjectFile(cwd.to_path_buf()))
}

fn absolute_dir_of(path: &Path) -> Result<PathBuf, ConfigError> {
    let absolute = std::path::absolute(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    Ok(absolute.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// `path` made absolute against `dir` when it is relative.
pub(crate) fn resolve(dir: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = dir.join(&*path);
    }
}

/// The syntax of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Yaml,
}

impl Format {
    fn of(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Yaml,
        }
    }

    /// Deserialises `text`; errors carry the line and column (and for YAML the line itself).
    fn parse<T: DeserializeOwned>(self, text: &str, path: &Path) -> Result<T, ConfigError> {
        match self {
            Format::Json => serde_json::from_str(text)
                .map_err(|err| ConfigError::Syntax { path: path.into(), message: err.to_string() }),
            Format::Yaml => serde_saphyr::from_str(text)
                .map_err(|err| ConfigError::Syntax { path: path.into(), message: err.to_string() }),
        }
    }
}

#[cfg(test)]
mod tests;
