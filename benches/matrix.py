#!/usr/bin/env python3
"""The benchmark matrix of benches/README.md: one-way throughput with `mas-load` (broker in its
own process, bare Redis Streams baseline of the same shape in the same invocation) and
request/reply with `mas-rr`, on private redis-servers (AOF everysec and AOF always) that this
script starts on free ports and stops by pid. Standard library only.

  python3 benches/matrix.py [--messages 50000] [--rounds 3] [--quick]

Prints a Markdown table (min / median / max of the rounds). Needs the release binaries
(`cargo build --release -p mas-server -p mas-benches`) and `redis-server`, `redis-cli` and
`redis-benchmark` on PATH (Debian: redis-server and redis-tools).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
# Untimed exchanges `mas-rr` makes before its timed ones.
RR_WARM_UP = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A private redis-server with the given append-only fsync policy."""

    def __init__(self, fsync: str, workdir: Path):
        self.port = free_port()
        self.dir = workdir / f"redis-{fsync}"
        self.dir.mkdir()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", fsync, "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def flush(self) -> None:
        self.cli("flushall")

    def cli(self, *command: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *command], check=True, capture_output=True,
                              text=True).stdout

    def script_calls(self) -> int:
        """EVALSHA calls since the last `CONFIG RESETSTAT` (each is one store step's script)."""
        m = re.search(r"^cmdstat_evalsha:calls=(\d+),", self.cli("info", "commandstats"), re.M)
        return int(m.group(1)) if m else 0

    def ping_baseline(self, concurrency: int) -> tuple[float, float]:
        """Bare round trips with `concurrency` clients: (p50 ms, PINGs per second)."""
        out = subprocess.run(["redis-benchmark", "-p", str(self.port), "-c", str(concurrency), "-n", "20000",
                              "-t", "ping", "--csv"], check=True, capture_output=True, text=True).stdout
        row = next(csv.DictReader(out.splitlines()))
        return float(row["p50_latency_ms"]), float(row["rps"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def summary(output: str, label: str) -> str:
    m = re.search(rf"^  {re.escape(label)}\s+(.*)$", output, re.M)
    return m.group(1).strip() if m else "-"


def one_way(args, redis: Redis | None, **shape) -> dict:
    messages = shape.pop("messages", args.messages)
    cmd = [str(BIN / "mas-load"), "--messages", str(messages), "--rounds", str(args.rounds),
           "--broker-bin", str(BIN / "mas")]
    for key, value in shape.items():
        if value is True:
            cmd.append(f"--{key}")
        elif value is not False:
            cmd += [f"--{key}", str(value)]
    if redis:
        redis.flush()
        cmd += ["--redis", redis.url, "--baseline"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {"msg/s": summary(out, "mas msg/s"), "p50 ms": summary(out, "mas p50 ms"),
            "p99 ms": summary(out, "mas p99 ms"), "broker µs/msg": summary(out, "broker CPU µs/msg"),
            "Redis µs/msg": summary(out, "Redis CPU µs/msg"), "bare Redis msg/s": summary(out, "bare Redis msg/s"),
            "bare Redis µs/msg": summary(out, "bare Redis CPU µs/msg"), "mas / Redis": summary(out, "mas / bare Redis")}


def broker_config(workdir: Path, name: str, agents: dict, redis: Redis | None, **extra) -> tuple[Path, Path]:
    """Dev certificates for `agents` and a broker configuration on them (a fresh Redis
    database when `redis` is given). Returns (config path, certificate directory)."""
    certs = workdir / f"{name}-certs"
    if not certs.exists():
        subprocess.run([str(BIN / "mas"), "dev-certs", "--dir", str(certs), "--agents", ",".join(agents)],
                       check=True, capture_output=True)
    config = {
        "listen_addr": "127.0.0.1:0",
        "tls": {"server_cert_path": str(certs / "server.pem"), "server_key_path": str(certs / "server.key"),
                "client_ca_path": str(certs / "ca.pem")},
        "agents": agents,
        "data_dir": str(workdir / f"{name}-data"),
        "admin": {"listen_addr": None},
        **extra,
    }
    if redis:
        redis.flush()
        config["redis"] = {"url": redis.url}
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    return path, certs


def with_broker(config: Path, client) -> subprocess.CompletedProcess:
    """Starts `mas serve`, waits for its ready line, runs `client(ready)` (the argv of a
    client process) and stops the broker again."""
    broker = subprocess.Popen([str(BIN / "mas"), "serve", "--config", str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        while True:
            line = broker.stdout.readline()
            if not line:
                raise RuntimeError("broker exited before its ready line")
            if '"mas.broker.ready"' in line:
                ready = json.loads(line)
                break
        return subprocess.run(client(ready), capture_output=True, text=True)
    finally:
        broker.terminate()
        broker.wait()


def request_reply(args, redis: Redis | None, concurrency: int, workdir: Path) -> dict:
    """`mas-rr` rounds; on Redis each round also counts the script calls per request/reply
    (`INFO commandstats`) and times bare round trips to the same redis-server at the same
    concurrency (`redis-benchmark PING`), the floor under every store step."""
    agents = {"alice": {"allowed_targets": ["bob"]}, "bob": {"allowed_targets": []}}
    unlimited = {"rate_limit": {"per_minute": 10**15, "per_hour": 10**15}}
    path, certs = broker_config(workdir, "rr", agents, redis, gateway=unlimited)
    rows = []
    for _ in range(args.rounds):
        if redis:
            redis.cli("config", "resetstat")
        run = with_broker(path, lambda ready: [
            str(BIN / "mas-rr"), "--endpoint", f"https://{ready['listen_addr']}", "--certs", str(certs),
            "--client", "alice", "--worker", "bob", "--concurrency", str(concurrency),
            "--requests", str(args.requests)])
        run.check_returncode()
        row = json.loads(run.stdout.strip().splitlines()[-1])
        if redis:
            # mas-rr makes 100 untimed warm-up exchanges before the timed ones.
            row["scripts"] = redis.script_calls() / (args.requests + RR_WARM_UP)
            row["ping_ms"], row["ping_rps"] = redis.ping_baseline(concurrency)
        rows.append(row)

    def mmm(key: str, fmt: str) -> str:
        if any(key not in r for r in rows):
            return "-"
        values = sorted(r[key] for r in rows)
        return " / ".join(fmt.format(v) for v in (values[0], values[len(values) // 2], values[-1]))

    return {"req/s": mmm("req_per_s", "{:.0f}"), "p50 ms": mmm("p50_ms", "{:.2f}"), "p99 ms": mmm("p99_ms", "{:.2f}"),
            "Redis scripts / rr": mmm("scripts", "{:.1f}"), "bare Redis PING p50 ms": mmm("ping_ms", "{:.3f}"),
            "bare Redis PING/s": mmm("ping_rps", "{:.0f}")}


def idle_sessions(sessions: int, redis: Redis | None, workdir: Path) -> dict:
    limits = {"max_sessions_per_agent": sessions, "max_streams_per_connection": sessions}
    path, certs = broker_config(workdir, "idle", {"idle": {"allowed_targets": []}}, redis, limits=limits)
    run = with_broker(path, lambda ready: [
        str(BIN / "mas-idle"), "--endpoint", f"https://{ready['listen_addr']}", "--certs", str(certs),
        "--agent", "idle", "--sessions", str(sessions), "--broker-pid", str(ready["pid"])])
    if run.returncode != 0:
        # A finding, not a crash of the matrix: say what the client got.
        error = (run.stderr.strip().splitlines() or ["?"])[0]
        return {"sessions": f"failed: {error}", "broker RSS MiB": "-", "before MiB": "-", "KiB per session": "-",
                "opened in s": "-"}
    r = json.loads(run.stdout.strip().splitlines()[-1])
    return {"sessions": str(r["sessions"]), "broker RSS MiB": f"{r['broker_rss_mib']:.0f}",
            "before MiB": f"{r['broker_rss_before_mib']:.0f}", "KiB per session": f"{r['per_session_kib']:.1f}",
            "opened in s": f"{r['opened_s']:.1f}"}


def table(title: str, rows: list[tuple[str, dict]]) -> None:
    print(f"\n### {title}\n")
    columns = list(rows[0][1].keys())
    print("| workload | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name, row in rows:
        print(f"| {name} | " + " | ".join(row[c] for c in columns) + " |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only the headline rows")
    parser.add_argument("--only", choices=["one-way", "rr", "idle"], help="one table only")
    args = parser.parse_args()
    for tool in ("mas", "mas-load", "mas-rr", "mas-idle"):
        if not (BIN / tool).exists():
            sys.exit(f"missing {BIN / tool}: cargo build --release -p mas-server -p mas-benches")
    for tool in ("redis-server", "redis-cli", "redis-benchmark"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not on PATH")
    cpus = os.cpu_count()
    print(f"machine: {cpus} CPUs, {os.uname().sysname} {os.uname().release}; {args.messages} messages per run, "
          f"min / median / max of {args.rounds} rounds; broker in its own process; governance on (authz, rate "
          f"limits, circuit breakers, default DLP rules, hash-chained audit)")
    workdir = Path(tempfile.mkdtemp(prefix="mas-matrix-"))
    everysec, always = Redis("everysec", workdir), Redis("always", workdir)
    try:
        if args.only in (None, "one-way"):
            one_way_table(args, everysec, always)
        if args.only in (None, "rr"):
            rr_table(args, everysec, workdir)
        if args.only in (None, "idle"):
            table("idle sessions (16 mTLS connections)", [
                ("memory", idle_sessions(10_000, None, workdir)),
                ("Redis everysec", idle_sessions(10_000, everysec, workdir)),
            ])
    finally:
        everysec.stop()
        always.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def one_way_table(args, everysec: Redis, always: Redis) -> None:
    rows = [
        ("memory, 2 producers × 128 in flight, batched", one_way(args, None)),
        ("memory, unary Send", one_way(args, None, unary=True)),
        ("Redis everysec, 2 × 128, batched", one_way(args, everysec)),
        ("Redis everysec, unary Send", one_way(args, everysec, unary=True)),
        ("Redis always, batched", one_way(args, always)),
    ]
    if not args.quick:
        rows += [
            ("Redis everysec, 4 producers × 64, 1 consumer",
             one_way(args, everysec, producers=4, concurrency=256, consumers=1)),
            ("Redis everysec, 4 producers × 1, 1 consumer",
             one_way(args, everysec, producers=4, concurrency=4, consumers=1, messages=10_000)),
            ("Redis everysec, 1 producer × 1, 1 consumer",
             one_way(args, everysec, producers=1, concurrency=1, consumers=1, messages=5_000)),
            ("Redis everysec, 4 consumers", one_way(args, everysec, consumers=4)),
            ("Redis everysec, 2 × 256 in flight", one_way(args, everysec, concurrency=512)),
            ("Redis everysec, 2 KB payload", one_way(args, everysec, payload=2048)),
            ("memory, 2 KB payload", one_way(args, None, payload=2048)),
        ]
    table("one-way (send → handler → ack)", rows)


def rr_table(args, everysec: Redis, workdir: Path) -> None:
    table("request/reply through the Rust SDK", [
        ("memory, c=1", request_reply(args, None, 1, workdir)),
        ("memory, c=32", request_reply(args, None, 32, workdir)),
        ("Redis everysec, c=1", request_reply(args, everysec, 1, workdir)),
        ("Redis everysec, c=32", request_reply(args, everysec, 32, workdir)),
    ])


if __name__ == "__main__":
    main()
