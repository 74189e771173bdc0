//! `mas run`: the agents of a project file as supervised processes beside the broker.
//!
//! Every `agents[]` entry with a `class_path` or a `command` becomes `instances` processes.
//! Each is restarted with bounded backoff when it exits; on stop every process gets SIGTERM
//! and the runner's `stop_timeout_ms` to exit before it is killed. The broker is started before
//! the agents and drained after them (by the caller, see the `mas` binary), so nothing an
//! agent was doing is cut off by the broker going first. A runner that dies without stopping
//! them (SIGKILL) takes its agents with it: see [`launch::parent_death_wrapper`].

mod events;
pub mod launch;
mod supervise;

use std::future::Future;

use tokio::sync::watch;

pub use events::{Event, emit};
pub use launch::LaunchSpec;
pub use supervise::{Backoff, Stopped};

use crate::project::{Project, client_addr};

/// Why `mas run` cannot start the agents of a file.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No entry says how to start its agent.
    #[error("no agents configured to start in {0}: give an agents[] entry a class_path or a command")]
    NoAgents(std::path::PathBuf),
}

/// How the agents ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgentsOutcome {
    /// Processes that exited after SIGTERM.
    pub clean: usize,
    /// Processes killed after the stop timeout.
    pub killed: usize,
}

/// The launch specs of every startable entry, for a broker bound at `bound`.
pub fn launch_specs(project: &Project, bound: std::net::SocketAddr) -> Result<Vec<(LaunchSpec, u32)>, RunError> {
    let server_addr = client_addr(bound);
    let ca = project.broker.tls.as_ref().map(|t| t.client_ca_path.clone()).unwrap_or_default();
    let parent_death = launch::parent_death_wrapper();
    if parent_death.is_none() {
        eprintln!("mas run: setpriv (util-linux) not found on PATH; agents would outlive a runner killed by SIGKILL");
    }
    let specs: Vec<_> = project
        .agents
        .iter()
        .filter_map(|agent| {
            LaunchSpec::new(agent, &server_addr, &ca, project.dir(), &project.runner.python, parent_death.as_deref())
                .map(|spec| (spec, agent.instances))
        })
        .collect();
    if specs.is_empty() {
        return Err(RunError::NoAgents(project.path.clone()));
    }
    Ok(specs)
}

/// Runs every instance of `specs` until `stop` resolves, then stops them all at once.
pub async fn run_agents(
    specs: Vec<(LaunchSpec, u32)>,
    settings: &crate::project::RunnerSettings,
    stop: impl Future<Output = ()>,
) -> AgentsOutcome {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut instances = tokio::task::JoinSet::new();
    for (spec, count) in specs {
        let spec = std::sync::Arc::new(spec);
        for index in 0..count {
            let (spec, settings, stop) = (spec.clone(), settings.clone(), stop_rx.clone());
            instances.spawn(async move { supervise::supervise(&spec, index, &settings, stop).await });
        }
    }
    stop.await;
    let _ = stop_tx.send(true);
    let mut outcome = AgentsOutcome::default();
    while let Some(ended) = instances.join_next().await {
        match ended {
            Ok(Stopped::Cleanly) => outcome.clean += 1,
            Ok(Stopped::Killed) | Err(_) => outcome.killed += 1,
        }
    }
    emit(Event::AgentsStopped { clean: outcome.clean, killed: outcome.killed });
    outcome
}
