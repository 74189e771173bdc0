"""Real-process chaos: the `mas` binary, a real redis-server (append-only file, fsync
`everysec` or `always`), and a producer and a consumer process (`chaos_agent.py`, raw grpcio
stubs) that log every accepted and every handled message id. One fault per run, three runs
per scenario. Every accepted message must be handled at least once; the only loss allowed is
Redis's own (a kill -9 inside its one-second fsync window with `everysec`), and it is measured.

Each run appends a row to $MAS_CHAOS_RESULTS (JSON lines) when set; `chaos_table.py` prints
them as a table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import Broker, Pki, RedisServer, free_port, wait_for

HERE = Path(__file__).parent
MESSAGES = 600
RATE = 200.0  # per second: a 3 s run, the fault a third of the way in
HANDLE_BOUND_S = 60  # after the producer is done, everything accepted is handled within this
WINDOW = 200  # delivery.max_in_flight: deliveries in flight that a fault may repeat


@dataclass
class World:
    dir: Path
    pki: Pki
    redis: RedisServer
    brokers: list[Broker]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def targets(self) -> str:
        return ",".join(b.target for b in self.brokers)

    def agent(self, mode: str, agent: str, log: Path, *extra: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "chaos_agent.py"), mode, "--targets", self.targets(),
             "--identity", str(self.pki.dir), "--agent", agent, "--log", str(log), *extra],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / f"{mode}.err", "ab"),
        )
        self.procs.append(proc)
        return proc


def broker_kill9_restart(w: World) -> None:
    w.brokers[0].kill()
    w.brokers[0] = w.brokers[0].restart()


def broker_sigterm_restart(w: World) -> None:
    assert w.brokers[0].stop(signal.SIGTERM) == 0, "SIGTERM drains and exits 0"
    w.brokers[0] = w.brokers[0].restart()


def two_brokers_kill9_one(w: World) -> None:
    w.brokers[0].kill()


def redis_kill9_restart(w: World) -> None:
    w.redis.kill()
    w.redis = w.redis.restart()


def redis_sigstop(seconds: float):
    def fault(w: World) -> None:
        os.kill(w.redis.proc.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(w.redis.proc.pid, signal.SIGCONT)

    fault.__name__ = f"redis_sigstop_{seconds:g}s"
    return fault


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: object
    fsync: str = "everysec"
    brokers: int = 1
    # Only a Redis crash with fsync everysec may lose acknowledged writes (its last second).
    may_lose: bool = False


SCENARIOS = [
    Scenario("broker kill -9, restart", broker_kill9_restart),
    Scenario("two brokers, kill -9 one", two_brokers_kill9_one, brokers=2),
    Scenario("broker SIGTERM, restart", broker_sigterm_restart),
    Scenario("redis kill -9, restart from AOF (everysec)", redis_kill9_restart, may_lose=True),
    Scenario("redis kill -9, restart from AOF (always)", redis_kill9_restart, fsync="always"),
    Scenario("redis SIGSTOP 1 s", redis_sigstop(1)),
    Scenario("redis SIGSTOP 10 s", redis_sigstop(10)),
]


def read_log(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("run", range(3))
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.fault.__name__)
def test_chaos(tmp_path: Path, pki: Pki, scenario: Scenario, run: int) -> None:
    (tmp_path / "redis").mkdir()
    redis = RedisServer.start(tmp_path / "redis", fsync=scenario.fsync)
    brokers = []
    for i in range(scenario.brokers):
        (tmp_path / f"broker{i}").mkdir()
        brokers.append(Broker.start(tmp_path / f"broker{i}", pki, redis_url=redis.url,
                                    listen_addr=f"127.0.0.1:{free_port()}"))
    world = World(tmp_path, pki, redis, brokers)
    produced, handled_log = tmp_path / "produced.log", tmp_path / "handled.log"
    try:
        world.agent("consume", "bob", handled_log)
        world.agent("produce", "rejoin", produced, "--count", str(MESSAGES), "--rate", str(RATE))
        accepted = lambda: [l for l in read_log(produced) if l[0] == "accepted"]  # noqa: E731
        assert wait_for(lambda: len(accepted()) >= MESSAGES // 3, 60), "the producer never got going"
        fault_at = time.time()
        scenario.fault(world)
        healed_at = time.time()
        assert wait_for(lambda: any(l[0] == "done" for l in read_log(produced)), 120), "the producer never finished"
        ids = {l[1] for l in accepted()}
        handled = lambda: [l for l in read_log(handled_log) if l[0] == "handled"]  # noqa: E731
        wait_for(lambda: ids <= {l[1] for l in handled()}, HANDLE_BOUND_S, step=0.2)
    finally:
        for proc in world.procs:
            proc.kill()
            proc.wait()
        codes = [b.stop() for b in world.brokers if b.proc.poll() is None]
        if world.redis.proc.poll() is None:
            os.kill(world.redis.proc.pid, signal.SIGCONT)
            world.redis.stop()

    runs = handled()
    handled_ids = [l[1] for l in runs]
    lost = ids - set(handled_ids)
    duplicates = len(handled_ids) - len(set(handled_ids))
    after = [float(l[2]) for l in runs if float(l[2]) >= healed_at]
    recovery = (min(after) - healed_at) if after else None
    row = {
        "scenario": scenario.name, "run": run, "accepted": len(ids), "handled": len(ids & set(handled_ids)),
        "lost": len(lost), "duplicates": duplicates, "fault_s": round(healed_at - fault_at, 2),
        "recovery_s": None if recovery is None else round(recovery, 2),
    }
    print(json.dumps(row))
    if results := os.environ.get("MAS_CHAOS_RESULTS"):
        with open(results, "a") as out:
            out.write(json.dumps(row) + "\n")
    assert codes == [0] * len(codes), f"brokers exited {codes} on SIGTERM"
    assert len(ids) == MESSAGES, f"the producer logged {len(ids)} accepted of {MESSAGES}"
    if scenario.may_lose:
        # At most what Redis had not fsynced: about one second of traffic around the kill.
        assert len(lost) <= 2 * RATE, f"lost {len(lost)}: more than Redis's fsync window"
    else:
        assert not lost, f"accepted but never handled: {sorted(lost)[:10]} ({len(lost)} in all)"
    assert duplicates <= 2 * WINDOW, f"{duplicates} duplicates: more than the deliveries in flight"
