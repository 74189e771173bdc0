"""`mas run` on a mas.yaml in the reference's schema: the real binary supervising two Rust
example agents (one with `instances: 2`) and a Python `class_path` agent (mas-framework
0.4.5's `mas.Agent`, over `mas.v1`). Jobs flow Python → Rust stage → Rust tally → Python; a
stage process is killed mid-stream and restarted; SIGTERM ends everything with exit 0, and
every job the Python agent had accepted arrives.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from harness import MAS_BIN

EXAMPLES = Path(os.environ.get("MAS_EXAMPLES_DIR", "."))
JOBS = 60

SOURCE_AGENT = '''
import asyncio
from pathlib import Path

from mas import Agent


class Source(Agent):
    """Sends numbered jobs to the stage; records each accepted send and each `done`."""

    def __init__(self, agent_id, *, jobs, interval, sent, done, **kwargs):
        super().__init__(agent_id, **kwargs)
        self.jobs, self.interval = jobs, interval
        self.sent_path, self.done_path = Path(sent), Path(done)
        self.task = None

    async def on_start(self):
        self.task = asyncio.create_task(self.produce())

    async def produce(self):
        already = set(self.sent_path.read_text().split()) if self.sent_path.exists() else set()
        for job in range(self.jobs):
            if str(job) in already:
                continue
            while True:
                try:
                    await self.send("worker", "job", {"job": job})
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            with self.sent_path.open("a") as f:
                f.write(f"{job}\\n")
            await asyncio.sleep(self.interval)

    async def on_stop(self):
        if self.task:
            self.task.cancel()

    @Agent.on("done")
    async def on_done(self, message, payload):
        with self.done_path.open("a") as f:
            f.write(f"{message.data['job']}\\n")
'''


def project_file(python: str) -> str:
    return textwrap.dedent(
        f"""\
        # The reference runner's schema; `command` and `runner` are mas's additions.
        server_listen_addr: 127.0.0.1:0
        tls_ca_path: certs/ca.pem
        tls_server_cert_path: certs/server.pem
        tls_server_key_path: certs/server.key
        admin: {{listen_addr: null}}
        gateway:
          rate_limit: {{per_minute: 100000, per_hour: 1000000}}
        permissions:
          - {{type: allow, sender: source, targets: [worker]}}
          - {{type: allow, sender: worker, targets: [tally]}}
          - {{type: allow, sender: tally, targets: [source]}}
        agents:
          - agent_id: source
            class_path: source_agent:Source
            tls_cert_path: certs/source.pem
            tls_key_path: certs/source.key
            init_kwargs: {{jobs: {JOBS}, interval: 0.05, sent: sent.txt, done: done.txt}}
          - agent_id: worker
            command: [{EXAMPLES / "stage"}]
            instances: 2
            tls_cert_path: certs/worker.pem
            tls_key_path: certs/worker.key
            init_kwargs: {{next: tally}}
          - agent_id: tally
            command: [{EXAMPLES / "tally"}]
            tls_cert_path: certs/tally.pem
            tls_key_path: certs/tally.key
            init_kwargs: {{record: tally.txt, notify: source}}
        runner:
          python: {python}
          restart_backoff_initial_ms: 100
        """
    )


@contextmanager
def mas_run(tmp_path: Path, *args: str, **popen):
    """`mas run` as a process: its JSON event lines read from stdout, its stderr (the agents'
    labelled output) in runner.log; killed at the end if it is still running."""
    log = (tmp_path / "runner.log").open("w")
    proc = subprocess.Popen([MAS_BIN, "run", *args], stdout=subprocess.PIPE, stderr=log, text=True, **popen)
    try:
        yield proc, Events(proc.stdout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


class Events:
    """The runner's JSON lines on stdout, read by a thread."""

    def __init__(self, stream) -> None:
        self.queue: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            if line.startswith("{"):
                self.queue.put(json.loads(line))

    def wait(self, predicate, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.seen:
            if predicate(event):
                return event
        while time.monotonic() < deadline:
            try:
                event = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(event)
            if predicate(event):
                return event
        raise AssertionError(f"no matching runner event in {timeout} s; seen: {self.seen}")


def lines(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_mas_run_supervises_rust_and_python_agents_and_stops_cleanly(tmp_path: Path) -> None:
    assert (EXAMPLES / "stage").exists(), f"build the examples first: {EXAMPLES}"
    (tmp_path / "mas.yaml").write_text(project_file(sys.executable))
    (tmp_path / "source_agent.py").write_text(SOURCE_AGENT)
    subprocess.run([MAS_BIN, "dev-certs", "--config", str(tmp_path / "mas.yaml")], check=True)
    assert (tmp_path / "certs" / "tally.key").stat().st_mode & 0o077 == 0, "keys are private"
    # Started in a subdirectory: the runner finds mas.yaml upward, as the reference's does.
    workdir = tmp_path / "deep" / "er"
    workdir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "MAS_RUNNER_CONFIG_FILE"}
    with mas_run(tmp_path, cwd=workdir, env=env) as (proc, events):
        events.wait(lambda e: e["event"] == "mas.broker.ready")
        started = {}
        for agent, instance in [("source", 0), ("worker", 0), ("worker", 1), ("tally", 0)]:
            event = events.wait(
                lambda e, a=agent, i=instance: e["event"] == "mas.runner.agent_started"
                and e["agent"] == a and e["instance"] == i
            )
            started[(agent, instance)] = event["pid"]

        wait_until(lambda: len(lines(tmp_path / "tally.txt")) >= 10, 60, "the first jobs to reach the tally")
        killed = started[("worker", 0)]
        os.kill(killed, signal.SIGKILL)
        events.wait(
            lambda e: e["event"] == "mas.runner.agent_exited" and e["agent"] == "worker" and e["instance"] == 0
        )
        restarted = events.wait(
            lambda e: e["event"] == "mas.runner.agent_started" and e["agent"] == "worker" and e["instance"] == 0
            and e["pid"] != killed
        )
        assert restarted["pid"] != killed

        wait_until(lambda: len(set(lines(tmp_path / "done.txt"))) == JOBS, 90, "every job to come back as done")
        sent, tallied = lines(tmp_path / "sent.txt"), lines(tmp_path / "tally.txt")
        assert sorted(sent) == list(range(JOBS))
        assert sorted(set(tallied)) == list(range(JOBS)), "every accepted job reached the tally"
        assert len(tallied) == JOBS, "the tally's typed state made the count exact despite redelivery"

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        stopped = events.wait(lambda e: e["event"] == "mas.runner.agents_stopped", timeout=5)
    runner_log = (tmp_path / "runner.log").read_text()
    assert code == 0, f"mas run exited {code}; log:\n{runner_log}"
    assert stopped == {"event": "mas.runner.agents_stopped", "clean": 4, "killed": 0}, stopped
    assert "broker stopped" in runner_log, runner_log


def test_mas_run_request_reply_between_rust_examples(tmp_path: Path) -> None:
    """The echo example with `instances: 2` answers the ask example's requests."""
    (tmp_path / "mas.yaml").write_text(textwrap.dedent(
        f"""\
        server_listen_addr: 127.0.0.1:0
        tls_ca_path: certs/ca.pem
        tls_server_cert_path: certs/server.pem
        tls_server_key_path: certs/server.key
        admin: {{listen_addr: null}}
        permissions:
          - {{type: allow, sender: asker, targets: [echo]}}
        agents:
          - agent_id: echo
            command: [{EXAMPLES / "echo"}]
            instances: 2
            tls_cert_path: certs/echo.pem
            tls_key_path: certs/echo.key
          - agent_id: asker
            command: [{EXAMPLES / "ask"}]
            tls_cert_path: certs/asker.pem
            tls_key_path: certs/asker.key
            init_kwargs: {{count: 20, record: answers.txt}}
        """
    ))
    subprocess.run([MAS_BIN, "dev-certs", "--config", str(tmp_path / "mas.yaml")], check=True)
    with mas_run(tmp_path, "--config", str(tmp_path / "mas.yaml")) as (proc, events):
        events.wait(lambda e: e["event"] == "mas.broker.ready")
        answers = tmp_path / "answers.txt"
        def answered() -> set[int]:
            return {int(line.split()[0]) for line in answers.read_text().splitlines()} if answers.exists() else set()
        wait_until(lambda: answered() == set(range(20)), 60, "20 answers")
        for line in answers.read_text().splitlines():
            assert line.split()[1] in {"0", "1"}, f"answered by an echo instance: {line}"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    runner_log = (tmp_path / "runner.log").read_text()
    assert code == 0, f"mas run exited {code}; log:\n{runner_log}"
    assert "[asker#0] answer 19 from instance" in runner_log, "the agent's output is labelled"


def gone(pid: int) -> bool:
    """True once `pid` has exited (reaped, or a zombie waiting for whoever adopted it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in {"Z", "X"}


def test_agents_do_not_outlive_a_runner_killed_by_sigkill(tmp_path: Path) -> None:
    """No stop sequence runs when the runner is SIGKILLed; the kernel's parent-death signal
    (set through setpriv) still ends a Rust SDK agent and an arbitrary program."""
    (tmp_path / "mas.yaml").write_text(textwrap.dedent(
        f"""\
        server_listen_addr: 127.0.0.1:0
        tls_ca_path: certs/ca.pem
        tls_server_cert_path: certs/server.pem
        tls_server_key_path: certs/server.key
        admin: {{listen_addr: null}}
        agents:
          - agent_id: echo
            command: [{EXAMPLES / "echo"}]
            tls_cert_path: certs/echo.pem
            tls_key_path: certs/echo.key
          - agent_id: sleeper
            command: [sleep, "600"]
            tls_cert_path: certs/sleeper.pem
            tls_key_path: certs/sleeper.key
        """
    ))
    subprocess.run([MAS_BIN, "dev-certs", "--config", str(tmp_path / "mas.yaml")], check=True)
    pids: list[int] = []
    with mas_run(tmp_path, "--config", str(tmp_path / "mas.yaml")) as (proc, events):
        try:
            for agent in ["echo", "sleeper"]:
                event = events.wait(lambda e, a=agent: e["event"] == "mas.runner.agent_started" and e["agent"] == a)
                pids.append(event["pid"])
            time.sleep(0.5)
            assert not any(gone(pid) for pid in pids), "both agents run"
            proc.kill()
            proc.wait(timeout=10)
            wait_until(lambda: all(gone(pid) for pid in pids), 20, f"agents {pids} to end with their runner")
        finally:
            for pid in pids:
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)


def test_the_shipped_pipeline_example_runs(tmp_path: Path) -> None:
    """agent/examples/pipeline/mas.yaml as shipped, moved to a scratch directory: its agent
    paths point at the built examples and it listens on a free port."""
    shipped = (Path(__file__).parents[2] / "agent" / "examples" / "pipeline" / "mas.yaml").read_text()
    for needle in ["../../../target/debug/examples/", "127.0.0.1:50051"]:
        assert needle in shipped, f"the example no longer contains {needle!r}; update this test"
    text = shipped.replace("../../../target/debug/examples/", f"{EXAMPLES}/").replace("127.0.0.1:50051", "127.0.0.1:0")
    (tmp_path / "mas.yaml").write_text(text + "admin: {listen_addr: null}\n")
    subprocess.run([MAS_BIN, "dev-certs", "--config", str(tmp_path / "mas.yaml")], check=True)
    with mas_run(tmp_path, "--config", str(tmp_path / "mas.yaml")) as (proc, events):
        events.wait(lambda e: e["event"] == "mas.broker.ready")
        wait_until(lambda: sorted(set(lines(tmp_path / "tail-jobs.txt"))) == list(range(20)), 60,
                   "the 20 jobs of head to reach tail through middle")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        stopped = events.wait(lambda e: e["event"] == "mas.runner.agents_stopped", timeout=5)
    assert code == 0, (tmp_path / "runner.log").read_text()
    assert stopped == {"event": "mas.runner.agents_stopped", "clean": 4, "killed": 0}, stopped
    assert len(lines(tmp_path / "tail-jobs.txt")) == 20, "each job counted once"
