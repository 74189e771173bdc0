"""A minimal mas.runtime.v1 client over raw grpcio stubs generated from our proto: what any
third-party client written from the proto would do, with nothing of ours in between."""

from __future__ import annotations

import asyncio
import json
import uuid

import grpc
import grpc.aio

import mas_pb2
import mas_pb2_grpc
from harness import Identity


def channel(target: str, identity: Identity) -> grpc.aio.Channel:
    ca, key, cert = identity.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.aio.secure_channel(target, creds)


def new_instance() -> str:
    return uuid.uuid4().hex[:8]


class Transport:
    """One instance's Transport stream: Hello first, then acks and nacks from a queue, as the
    stock clients do (the request side stays open for the life of the session). A reader task
    moves server events into a queue, so waiting for one with a timeout never cancels the
    call (grpc.aio cancels the whole RPC when a pending read is cancelled)."""

    def __init__(self, stub: mas_pb2_grpc.RuntimeServiceStub, instance_id: str) -> None:
        self.instance_id = instance_id
        self.outgoing: asyncio.Queue[mas_pb2.ClientEvent | None] = asyncio.Queue()
        self.outgoing.put_nowait(mas_pb2.ClientEvent(hello=mas_pb2.Hello(instance_id=instance_id)))
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.call = stub.Transport(self._requests())
        self.reader = asyncio.create_task(self._read())

    async def _requests(self):
        while True:
            event = await self.outgoing.get()
            if event is None:
                return
            yield event

    async def _read(self) -> None:
        try:
            while (event := await self.call.read()) is not grpc.aio.EOF:
                self.incoming.put_nowait(event)
            self.incoming.put_nowait(grpc.aio.EOF)
        except grpc.aio.AioRpcError as err:
            self.incoming.put_nowait(err)

    async def next_event(self, timeout: float = 10):
        event = await asyncio.wait_for(self.incoming.get(), timeout)
        if isinstance(event, grpc.aio.AioRpcError):
            raise event
        assert event is not grpc.aio.EOF, "stream ended"
        return event

    async def welcome(self, timeout: float = 10) -> mas_pb2.Welcome:
        event = await self.next_event(timeout)
        assert event.HasField("welcome"), event
        return event.welcome

    async def delivery(self, timeout: float = 10) -> tuple[str, dict]:
        """The next delivery: its id and its parsed envelope."""
        event = await self.next_event(timeout)
        assert event.HasField("delivery"), event
        return event.delivery.delivery_id, json.loads(event.delivery.envelope_json)

    async def end(self, timeout: float = 10) -> grpc.aio.AioRpcError | None:
        """Waits for the stream to end: the status error that ended it, or None if it ended OK."""
        await asyncio.wait_for(asyncio.shield(self.reader), timeout)
        while not self.incoming.empty():
            event = self.incoming.get_nowait()
            if isinstance(event, grpc.aio.AioRpcError):
                return event
        return None

    def ack(self, delivery_id: str) -> None:
        self.outgoing.put_nowait(mas_pb2.ClientEvent(ack=mas_pb2.Ack(delivery_id=delivery_id)))

    def nack(self, delivery_id: str, reason: str, retryable: bool) -> None:
        self.outgoing.put_nowait(
            mas_pb2.ClientEvent(nack=mas_pb2.Nack(delivery_id=delivery_id, reason=reason, retryable=retryable))
        )

    def send_event(self, event: mas_pb2.ClientEvent) -> None:
        self.outgoing.put_nowait(event)

    async def close(self) -> None:
        """Half-closes the request side; the broker then ends the session and the stream."""
        self.outgoing.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), 5)
        except asyncio.TimeoutError:
            self.call.cancel()
            self.reader.cancel()


class ReconnectingSession:
    """An instance's Transport session kept up the way mas-framework 0.5 does (reference §4.2):
    same instance id on every attempt; on any stream error back off 0.1 s doubling to 5 s, then
    reconnect, moving to the next of `targets`. Deliveries go to `on_delivery` (the envelope)
    and are acked; every refusal is kept in `refusals`."""

    def __init__(self, targets: list[str], identity: Identity, on_delivery=None) -> None:
        self.targets, self.identity, self.on_delivery = targets, identity, on_delivery
        self.instance_id = new_instance()
        self.index = 0
        self.client = Client(targets[0], identity)
        self.ready = asyncio.Event()
        self.refusals: list[tuple[grpc.StatusCode, str]] = []
        self.task = asyncio.create_task(self._loop())

    def rotate(self) -> None:
        """Moves to the next broker (a no-op with one)."""
        if len(self.targets) > 1:
            self.index = (self.index + 1) % len(self.targets)
            self.client = Client(self.targets[self.index], self.identity)

    async def _loop(self) -> None:
        backoff = 0.1
        while True:
            transport = Transport(self.client.stub, self.instance_id)
            try:
                await transport.welcome(timeout=30)
                self.ready.set()
                backoff = 0.1
                while True:
                    delivery_id, envelope = await transport.delivery(timeout=3600)
                    if self.on_delivery:
                        self.on_delivery(envelope)
                    transport.ack(delivery_id)
            except grpc.aio.AioRpcError as err:
                self.refusals.append((err.code(), err.details()))
            except (AssertionError, asyncio.TimeoutError) as err:
                self.refusals.append((grpc.StatusCode.UNKNOWN, repr(err)))
            self.ready.clear()
            transport.call.cancel()
            self.rotate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class Client:
    """An agent over raw stubs: a channel, a stub, and helpers for the unary RPCs."""

    def __init__(self, target: str, identity: Identity) -> None:
        self.channel = channel(target, identity)
        self.stub = mas_pb2_grpc.RuntimeServiceStub(self.channel)

    async def connect(self, instance_id: str | None = None) -> Transport:
        transport = Transport(self.stub, instance_id or new_instance())
        await transport.welcome()
        return transport

    async def send(self, instance_id: str, target: str, message_type: str, data: dict | str) -> str:
        data_json = data if isinstance(data, str) else json.dumps(data)
        resp = await self.stub.Send(
            mas_pb2.SendRequest(target_id=target, message_type=message_type, data_json=data_json,
                                instance_id=instance_id),
            timeout=10,
        )
        return resp.message_id

    async def request(self, instance_id: str, target: str, message_type: str, data: dict,
                      timeout_ms: int = 10_000) -> mas_pb2.RequestResponse:
        return await self.stub.Request(
            mas_pb2.RequestRequest(target_id=target, message_type=message_type, data_json=json.dumps(data),
                                   timeout_ms=timeout_ms, instance_id=instance_id),
            timeout=10,
        )

    async def reply(self, instance_id: str, correlation_id: str, message_type: str, data: dict) -> str:
        resp = await self.stub.Reply(
            mas_pb2.ReplyRequest(correlation_id=correlation_id, message_type=message_type,
                                 data_json=json.dumps(data), instance_id=instance_id),
            timeout=10,
        )
        return resp.message_id

    async def close(self) -> None:
        await self.channel.close()


async def refusal(awaitable) -> tuple[grpc.StatusCode, str]:
    """The status code and detail of a call that must be refused."""
    try:
        result = await awaitable
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    raise AssertionError(f"expected a refusal, got {result!r}")


async def transport_refusal(stub: mas_pb2_grpc.RuntimeServiceStub, *events: mas_pb2.ClientEvent,
                            close: bool = False) -> tuple[grpc.StatusCode, str]:
    """Opens a Transport stream, sends `events` (then half-closes if `close`, else keeps the
    request side open like a real client), and returns the status that ends the stream."""
    queue: asyncio.Queue = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    if close:
        queue.put_nowait(None)

    async def requests():
        while (event := await queue.get()) is not None:
            yield event

    call = stub.Transport(requests())
    try:
        while True:
            event = await asyncio.wait_for(call.read(), 10)
            if event is grpc.aio.EOF:
                break
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    finally:
        queue.put_nowait(None)
    code = await call.code()
    return code, await call.details()
