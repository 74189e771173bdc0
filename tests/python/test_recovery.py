"""Clients that reconnect the way mas-framework 0.5 does (reference §4.2: on any stream error,
back off 0.1 s doubling to 5 s and reconnect with the same instance id) must be taken back by
a restarted broker, and by a broker whose Redis stalled."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

import mas_pb2
from harness import Broker, Pki, RedisServer
from runtime_client import ReconnectingSession

# Longest a reconnecting client may stay refused: the dead session's lease (6 s) plus the
# client's largest backoff step (5 s), with slack for a loaded machine.
RECOVERY_BOUND_S = 20


class ReconnectingAgent(ReconnectingSession):
    """The 0.5 client's transport loop over raw stubs, on one broker."""

    def __init__(self, target: str, identity) -> None:
        super().__init__([target], identity)

    async def send_until_accepted(self, target: str, bound_s: float) -> float:
        """Sends until the broker accepts; returns how long that took."""
        start = time.monotonic()
        while True:
            try:
                await self.client.send(self.instance_id, target, "after-recovery", {})
                return time.monotonic() - start
            except grpc.aio.AioRpcError as err:
                if time.monotonic() - start > bound_s:
                    raise AssertionError(f"never accepted again; last refusal {err.details()}, "
                                         f"stream refusals {self.refusals[-5:]}") from err
                await asyncio.sleep(0.2)


def fixed_port_broker(workdir, pki: Pki, redis: RedisServer) -> Broker:
    """A broker on a fixed port, so a restart is found where clients look."""
    from harness import free_port

    return Broker.start(workdir, pki, redis_url=redis.url, listen_addr=f"127.0.0.1:{free_port()}")


@pytest.fixture
def redis(tmp_path):
    server = RedisServer.start(tmp_path)
    yield server
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


async def connected(broker: Broker, pki: Pki) -> tuple[ReconnectingAgent, ReconnectingAgent]:
    sender = ReconnectingAgent(broker.target, pki.agent("rejoin"))
    worker = ReconnectingAgent(broker.target, pki.agent("bob"))
    await asyncio.wait_for(asyncio.gather(sender.ready.wait(), worker.ready.wait()), 10)
    await sender.client.send(sender.instance_id, "bob", "before", {})
    return sender, worker


def test_a_restarted_broker_takes_reconnecting_clients_back(tmp_path, pki: Pki, redis: RedisServer) -> None:
    broker = fixed_port_broker(tmp_path, pki, redis)

    async def main():
        nonlocal broker
        sender, worker = await connected(broker, pki)
        broker.kill()
        broker = broker.restart()
        took = await sender.send_until_accepted("bob", RECOVERY_BOUND_S)
        await asyncio.wait_for(worker.ready.wait(), RECOVERY_BOUND_S)
        refusals = {(c.name, d) for c, d in sender.refusals + worker.refusals}
        print(f"accepted again {took:.1f} s after the restart; stream refusals: {sorted(refusals)}")
        # The restarted broker (same broker id: same host and port) takes over the sessions
        # its killed predecessor left, instead of refusing them until their leases expire.
        assert ("FAILED_PRECONDITION", "instance_already_connected") not in refusals
        await sender.close(), await worker.close()

    try:
        asyncio.run(main())
    finally:
        assert broker.stop() == 0


def test_clients_recover_after_a_10_s_redis_stall(tmp_path, pki: Pki, redis: RedisServer) -> None:
    broker = fixed_port_broker(tmp_path, pki, redis)

    async def main():
        sender, worker = await connected(broker, pki)
        os.kill(redis.proc.pid, signal.SIGSTOP)
        await asyncio.sleep(10)
        os.kill(redis.proc.pid, signal.SIGCONT)
        took = await sender.send_until_accepted("bob", RECOVERY_BOUND_S)
        await asyncio.wait_for(worker.ready.wait(), RECOVERY_BOUND_S)
        print(f"accepted again {took:.1f} s after the stall; stream refusals: {sorted({(c.name, d) for c, d in sender.refusals})}")
        await sender.close(), await worker.close()

    try:
        asyncio.run(main())
    finally:
        assert broker.stop() == 0
