"""A producer or consumer process for the chaos suite, over raw grpcio stubs.

    python chaos_agent.py produce --targets A[,B] --identity DIR --agent NAME --count N --rate R --log FILE
    python chaos_agent.py consume --targets A[,B] --identity DIR --agent NAME --log FILE

Both keep a Transport session the way mas-framework 0.5 does (same instance id; on any stream
error back off 0.1 s doubling to 5 s, then reconnect, trying the next target). The producer
sends `count` jobs to `bob` at about `rate` per second, retrying each until the broker accepts
it, and logs `accepted <message id> <seq> <unix time>` per accepted send. The consumer logs
`handled <message id> <unix time>` per delivery before acking it. Lines are flushed at once,
so a killed process leaves a complete log of what it saw.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import grpc

from harness import Identity
from runtime_client import ReconnectingSession


def identity(certs: str, agent: str) -> Identity:
    """`mas dev-certs` files of `agent` in `certs`."""
    d = Path(certs)
    return Identity(d / "ca.pem", d / f"{agent}.pem", d / f"{agent}.key")


def line_log(path: str):
    out = open(path, "a", buffering=1)

    def write(*fields) -> None:
        out.write(" ".join(str(f) for f in fields) + "\n")

    return write


async def produce(args) -> None:
    log = line_log(args.log)
    session = ReconnectingSession(args.targets, identity(args.identity, args.agent))
    await session.ready.wait()
    interval = 1.0 / args.rate
    next_at = time.monotonic()
    for seq in range(args.count):
        backoff = 0.05
        while True:
            try:
                message_id = await session.client.send(session.instance_id, "bob", "job", {"seq": seq})
                log("accepted", message_id, seq, f"{time.time():.6f}")
                break
            except grpc.aio.AioRpcError as err:
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    session.rotate()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    log("done", args.count, f"{time.time():.6f}")


async def consume(args) -> None:
    log = line_log(args.log)
    ReconnectingSession(args.targets, identity(args.identity, args.agent),
            on_delivery=lambda envelope: log("handled", envelope["message_id"], f"{time.time():.6f}"))
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["produce", "consume"])
    parser.add_argument("--targets", required=True, type=lambda s: s.split(","))
    parser.add_argument("--identity", required=True, help="the directory of `mas dev-certs`")
    parser.add_argument("--agent", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--rate", type=float, default=100.0)
    args = parser.parse_args()
    asyncio.run(produce(args) if args.mode == "produce" else consume(args))


if __name__ == "__main__":
    main()
