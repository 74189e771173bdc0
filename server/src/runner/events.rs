//! The runner's events: one JSON object per line on stdout, beside the broker's ready line, so
//! supervisors and tests can follow agent processes without parsing log text.

use serde::Serialize;

/// Something that happened to an agent process.
#[derive(Debug, Serialize)]
#[serde(tag = "event")]
pub enum Event<'a> {
    /// A process was started.
    #[serde(rename = "mas.runner.agent_started")]
    AgentStarted {
        /// Its agent id.
        agent: &'a str,
        /// Which instance of the entry.
        instance: u32,
        /// Its process id.
        pid: u32,
    },
    /// A process exited on its own; it is restarted after `restart_in_ms`.
    #[serde(rename = "mas.runner.agent_exited")]
    AgentExited {
        /// Its agent id.
        agent: &'a str,
        /// Which instance of the entry.
        instance: u32,
        /// The exit status, as the OS reports it.
        status: &'a str,
        /// The delay before the restart.
        restart_in_ms: u64,
    },
    /// Every agent process has ended; the broker drains next.
    #[serde(rename = "mas.runner.agents_stopped")]
    AgentsStopped {
        /// Processes that exited after SIGTERM.
        clean: usize,
        /// Processes killed after the stop timeout.
        killed: usize,
    },
}

/// Writes `event` as one line on stdout.
pub fn emit(event: Event<'_>) {
    match serde_json::to_string(&event) {
        Ok(line) => println!("{line}"),
        Err(err) => eprintln!("cannot encode runner event {event:?}: {err}"),
    }
}
