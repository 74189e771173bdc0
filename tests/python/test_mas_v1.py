"""mas.v1 (`MasService`) with the stock client users install from PyPI: mas-framework 0.4.5's
`mas.Agent`, unmodified, pointed at the mas broker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from mas import Agent, AgentMessage
from mas.agent import TlsClientConfig

from harness import Broker, Pki


class Greeting(BaseModel):
    text: str
    marker: str


class Counter(BaseModel):
    # Scalars only: mas-framework 0.4.5 writes list and dict fields as JSON but never decodes
    # them on load, so such a model falls back to its defaults (on its own broker too).
    count: int = 0
    name: str = "unnamed"
    ratio: float = 0.5
    enabled: bool = False


def tls(pki: Pki, agent: str) -> TlsClientConfig:
    identity = pki.agent(agent)
    return TlsClientConfig(str(identity.ca), str(identity.cert), str(identity.key))


class Worker(Agent[dict[str, Any]]):
    """Receives greetings, answers pings, and fails the first attempt of every `flaky`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.greetings: asyncio.Queue[tuple[AgentMessage, Greeting]] = asyncio.Queue()
        self.flaky_attempts: dict[str, int] = {}
        self.flaky_done: asyncio.Queue[str] = asyncio.Queue()

    @Agent.on("greeting", model=Greeting)
    async def on_greeting(self, message: AgentMessage, payload: Greeting) -> None:
        await self.greetings.put((message, payload))

    @Agent.on("ping")
    async def on_ping(self, message: AgentMessage, payload: None) -> None:
        await message.reply("pong", {"echo": message.data["n"], "by": self.id})

    @Agent.on("flaky")
    async def on_flaky(self, message: AgentMessage, payload: None) -> None:
        attempts = self.flaky_attempts[message.message_id] = self.flaky_attempts.get(message.message_id, 0) + 1
        if attempts == 1:
            raise RuntimeError("transient failure")
        await self.flaky_done.put(message.message_id)


def agents(broker: Broker, pki: Pki) -> tuple[Agent, Worker]:
    client = Agent("v1_client", server_addr=broker.target, tls=tls(pki, "v1_client"))
    worker = Worker("v1_worker", server_addr=broker.target, tls=tls(pki, "v1_worker"))
    return client, worker


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@contextlib.asynccontextmanager
async def started(*agents: Agent):
    """Starts `agents` in order and stops them in reverse, whatever the test body does."""
    running: list[Agent] = []
    try:
        for agent in agents:
            await agent.start()
            running.append(agent)
        yield agents
    finally:
        for agent in reversed(running):
            await agent.stop()


def test_typed_handler_receives_a_send(broker: Broker, pki: Pki) -> None:
    async def main():
        client, worker = agents(broker, pki)
        async with started(worker, client):
            marker = uuid.uuid4().hex
            await client.send("v1_worker", "greeting", {"text": "hello", "marker": marker})
            message, payload = await asyncio.wait_for(worker.greetings.get(), 10)
            assert payload == Greeting(text="hello", marker=marker)
            assert message.sender_id == "v1_client" and message.target_id == "v1_worker"
            assert message.meta.sender_instance_id == client.instance_id
            uuid.UUID(message.message_id)  # the broker's id: a uuid

    run(main())


def test_request_reply(broker: Broker, pki: Pki) -> None:
    async def main():
        client, worker = agents(broker, pki)
        async with started(worker, client):
            for n in range(5):
                reply = await client.request("v1_worker", "ping", {"n": n}, timeout=10)
                assert reply.message_type == "pong"
                assert reply.data == {"echo": n, "by": "v1_worker"}
                assert reply.meta.is_reply and reply.meta.reply_to_instance_id == client.instance_id
            replies = await asyncio.gather(*(client.request("v1_worker", "ping", {"n": n}, timeout=10)
                                             for n in range(16)))
            assert [r.data["echo"] for r in replies] == list(range(16))

    run(main())


def test_discover(broker: Broker, pki: Pki) -> None:
    async def main():
        client, worker = agents(broker, pki)
        async with started(worker, client):
            found = await client.discover(["v1-work"])
            assert found == [{"id": "v1_worker", "capabilities": ["v1-work"], "metadata": {"gen": "mas.v1"},
                              "status": "ACTIVE"}]
            assert await client.discover(["nothing-offers-this"]) == []

    run(main())


def test_state_update_reload_and_reset(broker: Broker, pki: Pki) -> None:
    def agent() -> Agent[Counter]:
        return Agent("v1_state", server_addr=broker.target, tls=tls(pki, "v1_state"), state_model=Counter)

    async def main():
        async with started(agent()) as (first,):
            await first.reset_state()
            assert first.state == Counter()
            await first.update_state({"count": 3, "name": "x"})
            await first.update_state({"ratio": 0.25, "enabled": True})
            assert first.state == Counter(count=3, name="x", ratio=0.25, enabled=True)
        async with started(agent()) as (second,):
            assert second.state == Counter(count=3, name="x", ratio=0.25, enabled=True), "state reloads"
            await second.reset_state()
            assert second.state == Counter()
        async with started(agent()) as (third,):
            assert third.state == Counter(), "a reset is durable"

    run(main())


def test_a_handler_that_raises_is_redelivered(broker: Broker, pki: Pki) -> None:
    """mas-framework 0.4.5 NACKs every handler exception as non-retryable; mas retries handler
    errors of mas.v1 clients (see the README), so the second attempt succeeds."""

    async def main():
        client, worker = agents(broker, pki)
        async with started(worker, client):
            await client.send("v1_worker", "flaky", {})
            done = await asyncio.wait_for(worker.flaky_done.get(), 10)
            assert worker.flaky_attempts[done] == 2

    run(main())


def test_a_payload_the_handler_model_rejects_is_not_redelivered(broker: Broker, pki: Pki) -> None:
    async def main():
        client, worker = agents(broker, pki)
        async with started(worker, client):
            await client.send("v1_worker", "greeting", {"text": "no marker"})  # fails the model
            marker = uuid.uuid4().hex
            await client.send("v1_worker", "greeting", {"text": "ok", "marker": marker})
            message, payload = await asyncio.wait_for(worker.greetings.get(), 10)
            assert payload.marker == marker
            # Retries come after 50-200 ms; none does.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(worker.greetings.get(), 1.0)

    run(main())
