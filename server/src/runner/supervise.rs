//! One agent instance's life under `mas run`: start it, label its output, restart it with
//! bounded backoff when it exits, and on stop give it SIGTERM and a deadline before SIGKILL.

use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::Instant;

use super::events::{Event, emit};
use super::launch::LaunchSpec;
use crate::project::RunnerSettings;

/// How an instance ended when the runner stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It exited within the stop timeout after SIGTERM (or was not running).
    Cleanly,
    /// It outlived the stop timeout and was killed.
    Killed,
}

/// The delay before each restart: doubling from the initial delay to the cap, and back to the
/// initial delay after a run long enough to count as healthy.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    next: Duration,
}

impl Backoff {
    /// The backoff the settings describe.
    pub fn new(settings: &RunnerSettings) -> Backoff {
        let initial = settings.restart_backoff_initial();
        Backoff {
            initial,
            max: settings.restart_backoff_max(),
            reset_after: settings.restart_backoff_reset_after(),
            next: initial,
        }
    }

    /// The delay before restarting a process that ran for `ran`.
    pub fn after_run(&mut self, ran: Duration) -> Duration {
        if ran >= self.reset_after {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }
}

/// Runs instance `index` of `spec` until `stop` turns true.
pub async fn supervise(
    spec: &LaunchSpec,
    index: u32,
    settings: &RunnerSettings,
    mut stop: watch::Receiver<bool>,
) -> Stopped {
    let agent = spec.agent_id.as_str();
    let mut backoff = Backoff::new(settings);
    loop {
        let started = Instant::now();
        let outcome = match spec.command(index).spawn() {
            Ok(mut child) => {
                let pid = child.id().unwrap_or_default();
                emit(Event::AgentStarted { agent, instance: index, pid });
                forward_output(&mut child, agent, index);
                tokio::select! {
                    status = child.wait() => Err(describe(status)),
                    () = stopped(&mut stop) => Ok(terminate(child, settings.stop_timeout()).await),
                }
            }
            Err(err) => Err(format!("cannot start: {err}")),
        };
        let status = match outcome {
            Ok(stopped) => return stopped,
            Err(status) => status,
        };
        let delay = backoff.after_run(started.elapsed());
        let restart_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        emit(Event::AgentExited { agent, instance: index, status: &status, restart_in_ms });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => return Stopped::Cleanly,
        }
    }
}

/// Resolves once the runner is stopping (or gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await.map(drop);
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(err) => format!("cannot wait for it: {err}"),
    }
}

/// SIGTERM, then up to `timeout` for the process to exit, then SIGKILL.
async fn terminate(mut child: Child, timeout: Duration) -> Stopped {
    let Some(pid) = child.id() else { return Stopped::Cleanly };
    let signalled = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|pid| rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok());
    if signalled && tokio::time::timeout(timeout, child.wait()).await.is_ok() {
        return Stopped::Cleanly;
    }
    let _ = child.kill().await;
    Stopped::Killed
}

/// Copies the child's stdout and stderr to the runner's stderr, one line at a time, each
/// labelled `[agent#instance]`.
fn forward_output(child: &mut Child, agent: &str, index: u32) {
    let label = format!("[{agent}#{index}]");
    if let Some(out) = child.stdout.take() {
        tokio::spawn(copy_lines(out, label.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(copy_lines(err, label));
    }
}

async fn copy_lines(from: impl AsyncRead + Unpin, label: String) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("{label} {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_to_the_cap_and_reset_after_a_healthy_run() {
        let settings = RunnerSettings {
            restart_backoff_initial_ms: 100,
            restart_backoff_max_ms: 350,
            restart_backoff_reset_after_ms: 5_000,
            ..RunnerSettings::default()
        };
        let mut backoff = Backoff::new(&settings);
        let quick = Duration::from_millis(10);
        let delays: Vec<u128> = (0..4).map(|_| backoff.after_run(quick).as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        assert_eq!(backoff.after_run(Duration::from_secs(6)).as_millis(), 100, "a healthy run resets");
        assert_eq!(backoff.after_run(quick).as_millis(), 200);
    }
}
