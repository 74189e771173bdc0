"""Request/reply latency guard (a benchmark, not a test): the real `mas` binary in its own
process, then request/reply at concurrency 1 and 32 through

  - the Rust SDK (`mas-rr`),
  - raw grpcio stubs of mas.runtime.v1,
  - the PyPI mas-framework 0.4.5 `mas.Agent` over mas.v1,

each client in its own process with its worker in another (a Python worker of its own
generation, and a Rust SDK worker, which isolates the Python client's cost), beside a
bare-Redis round-trip baseline from Python measured in the same run. With `--mas-null`, each
Python client also runs against `mas-null`, a server of the same protocol and mTLS that
answers every request at once with no policy, store or worker: that row is the client's own
ceiling on this machine, which no broker can lift. Prints one table row per figure.

  tests/python/run --bench [--store redis] [--requests 2000] [--rounds 3] [--mas-rr BIN] [--mas-null BIN]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(int(len(sorted_values) * q), len(sorted_values) - 1)]


def summary(client: str, generation: str, concurrency: int, latencies: list[float], elapsed: float) -> dict:
    latencies.sort()
    return {"client": client, "generation": generation, "concurrency": concurrency, "requests": len(latencies),
            "req_per_s": len(latencies) / elapsed, "p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3}


async def timed(request, concurrency: int, total: int) -> tuple[list[float], float]:
    for n in range(50):  # warm-up
        await request(n)
    latencies: list[float] = []

    async def loop(count: int) -> None:
        for n in range(count):
            sent = time.perf_counter()
            await request(n)
            latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*(loop(total // concurrency) for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


# --- roles run in their own processes ---------------------------------------------------------


async def mas_v1_worker(target: str, certs: Path) -> None:
    from mas import Agent
    from mas.agent import TlsClientConfig

    class Worker(Agent):
        @Agent.on("ping")
        async def ping(self, message, payload) -> None:
            await message.reply("pong", message.data)

    worker = Worker("v1_worker", server_addr=target,
                    tls=TlsClientConfig(str(certs / "ca.pem"), str(certs / "v1_worker.pem"), str(certs / "v1_worker.key")))
    await worker.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def mas_v1_client(target: str, certs: Path, concurrency: int, total: int) -> dict:
    from mas import Agent
    from mas.agent import TlsClientConfig

    client = Agent("v1_client", server_addr=target,
                   tls=TlsClientConfig(str(certs / "ca.pem"), str(certs / "v1_client.pem"), str(certs / "v1_client.key")))
    await client.start()
    latencies, elapsed = await timed(lambda n: client.request("v1_worker", "ping", {"n": n}, timeout=10),
                                     concurrency, total)
    await client.stop()
    return summary("python mas.Agent 0.4.5", "mas.v1", concurrency, latencies, elapsed)


async def runtime_worker(target: str, certs: Path) -> None:
    from harness import Identity
    from runtime_client import Client

    bob = Client(target, Identity(certs / "ca.pem", certs / "bob.pem", certs / "bob.key"))
    transport = await bob.connect()
    print("ready", flush=True)

    async def handle(delivery_id: str, envelope: dict) -> None:
        await bob.reply(transport.instance_id, envelope["meta"]["correlation_id"], "pong", envelope["data"])
        transport.ack(delivery_id)

    # A task per delivery, as the stock clients run handlers (reference 4.3): a worker that
    # answered one request at a time would measure itself, not the broker or the requester.
    handlers: set[asyncio.Task] = set()
    while True:
        task = asyncio.create_task(handle(*await transport.delivery(timeout=3600)))
        handlers.add(task)
        task.add_done_callback(handlers.discard)


async def runtime_client(target: str, certs: Path, concurrency: int, total: int) -> dict:
    from harness import Identity
    from runtime_client import Client

    alice = Client(target, Identity(certs / "ca.pem", certs / "alice.pem", certs / "alice.key"))
    transport = await alice.connect()
    waiting: dict[str, asyncio.Future] = {}
    early: dict[str, dict] = {}

    async def read_replies() -> None:
        while True:
            delivery_id, envelope = await transport.delivery(timeout=3600)
            transport.ack(delivery_id)
            cid = envelope["meta"]["correlation_id"]
            if cid in waiting:
                waiting.pop(cid).set_result(envelope)
            else:
                early[cid] = envelope

    reader = asyncio.create_task(read_replies())

    async def request(n: int) -> dict:
        resp = await alice.request(transport.instance_id, "bob", "ping", {"n": n})
        if resp.correlation_id in early:
            return early.pop(resp.correlation_id)
        future = waiting[resp.correlation_id] = asyncio.get_running_loop().create_future()
        return await asyncio.wait_for(future, 10)

    latencies, elapsed = await timed(request, concurrency, total)
    reader.cancel()
    return summary("python grpcio stubs", "mas.runtime.v1", concurrency, latencies, elapsed)


def redis_baseline(url: str, total: int) -> dict:
    import redis

    r = redis.Redis.from_url(url)
    latencies = []
    started = time.perf_counter()
    for _ in range(total):
        sent = time.perf_counter()
        r.ping()
        latencies.append(time.perf_counter() - sent)
    return summary("python redis-py PING (baseline)", "bare Redis", 1, latencies, time.perf_counter() - started)


# --- the driver ---------------------------------------------------------------------------------


def role(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__)), "--role", *args]


def run_client(client_cmd: list[str]) -> dict:
    out = subprocess.run(client_cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_pair(worker_cmd: list[str], client_cmd: list[str]) -> dict:
    worker = subprocess.Popen(worker_cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        return run_client(client_cmd)
    finally:
        worker.terminate()
        worker.wait()


class NullBroker:
    """`mas-null` in its own process (see the module doc)."""

    def __init__(self, proc: subprocess.Popen, target: str) -> None:
        self.proc, self.target = proc, target

    @classmethod
    def start(cls, binary: str, certs: Path) -> "NullBroker":
        proc = subprocess.Popen([binary, "--certs", str(certs)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["listening"], f"mas-null did not start: {line}"
        # The dev server certificate names localhost.
        return cls(proc, "localhost:" + line[1].rsplit(":", 1)[1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", nargs="*")
    parser.add_argument("--store", choices=["embedded", "redis"], default="embedded")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mas-rr", default=os.environ.get("MAS_RR_BIN", ""))
    parser.add_argument("--mas-null", default=os.environ.get("MAS_NULL_BIN", ""))
    args = parser.parse_args()

    if args.role:
        name, target, certs, *rest = args.role
        certs = Path(certs)
        if name == "v1-worker":
            asyncio.run(mas_v1_worker(target, certs))
        elif name == "runtime-worker":
            asyncio.run(runtime_worker(target, certs))
        elif name == "v1-client":
            print(json.dumps(asyncio.run(mas_v1_client(target, certs, int(rest[0]), int(rest[1])))))
        elif name == "runtime-client":
            print(json.dumps(asyncio.run(runtime_client(target, certs, int(rest[0]), int(rest[1])))))
        return

    from harness import Broker, Pki, RedisServer

    work = Path(tempfile.mkdtemp(prefix="mas-bench-"))
    pki = Pki.create(work / "pki")
    redis = RedisServer.start(work)
    broker = Broker.start(work, pki, redis_url=redis.url if args.store == "redis" else None)
    null = NullBroker.start(args.mas_null, pki.dir) if args.mas_null else None
    rows: dict[tuple, list[dict]] = {}
    try:
        certs, target = str(pki.dir), broker.target
        for _ in range(args.rounds):
            runs = [redis_baseline(redis.url, args.requests)]
            for c in (1, 32):
                n = str(args.requests)
                if args.mas_rr:
                    out = subprocess.run([args.mas_rr, "--endpoint", f"https://{target}", "--certs", certs,
                                          "--client", "alice", "--worker", "bob", "--concurrency", str(c),
                                          "--requests", n], check=True, capture_output=True, text=True).stdout
                    runs.append(json.loads(out.strip().splitlines()[-1]))
                runs.append(run_pair(role("runtime-worker", target, certs), role("runtime-client", target, certs, str(c), n)))
                runs.append(run_pair(role("v1-worker", target, certs), role("v1-client", target, certs, str(c), n)))
                if args.mas_rr:
                    # The Python clients against a Rust SDK worker: the client's own cost alone.
                    def rust_worker(agent: str) -> list[str]:
                        return [args.mas_rr, "--endpoint", f"https://{target}", "--certs", certs, "--worker", agent,
                                "--worker-only"]

                    for worker, client in (("bob", "runtime-client"), ("v1_worker", "v1-client")):
                        r = run_pair(rust_worker(worker), role(client, target, certs, str(c), n))
                        r["client"] += ", Rust worker"
                        runs.append(r)
                if null:
                    # The Python clients' own ceiling: the same calls against a server that
                    # does nothing else.
                    for client in ("runtime-client", "v1-client"):
                        r = run_client(role(client, null.target, certs, str(c), n))
                        r["client"] += ", mas-null (ceiling)"
                        runs.append(r)
            for r in runs:
                rows.setdefault((r["client"], r["generation"], r["concurrency"]), []).append(r)
    finally:
        if null:
            null.stop()
        assert broker.stop() == 0
        redis.stop()

    print(f"\nrequest/reply, broker on the {args.store} store, {args.requests} requests, "
          f"{args.rounds} rounds: min / median / max")
    print(f"{'client':46} {'wire':16} {'c':>3} {'req/s':>26} {'p50 ms':>20} {'p99 ms':>20}")

    def mmm(values: list[float], fmt: str) -> str:
        return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))

    for (client, generation, c), rs in rows.items():
        print(f"{client:46} {generation:16} {c:>3} {mmm([r['req_per_s'] for r in rs], '.0f'):>26} "
              f"{mmm([r['p50_ms'] for r in rs], '.2f'):>20} {mmm([r['p99_ms'] for r in rs], '.2f'):>20}")


if __name__ == "__main__":
    main()
