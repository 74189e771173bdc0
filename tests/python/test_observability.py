"""Observability of the real `mas serve` binary, read by third-party tools: `/metrics` parsed
by the official Python Prometheus client's strict OpenMetrics parser and checked against a
known workload, the gRPC health service answered to the stock `grpcio-health-checking`
client, `/readyz` following the store, and SIGTERM draining a delivery in flight."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import mas_pb2
from harness import Broker, Pki, RedisServer, wait_for
from runtime_client import Client, channel, refusal

SENDS, REJECTED, REQUESTS, DENIED = 12, 3, 4, 2


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an OpenMetrics exposition by (name, labels); the parser refuses
    anything that is not valid OpenMetrics (missing `# EOF`, bad types, duplicate series)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def scrape(broker: Broker) -> dict:
    status, content_type, body = broker.admin_get("/metrics")
    assert status == 200, body
    assert content_type.startswith("application/openmetrics-text"), content_type
    return samples(body)


async def workload(broker: Broker, pki: Pki) -> None:
    """SENDS sends to bob (the last REJECTED of them nacked for good), REQUESTS answered
    requests, DENIED sends to a target alice may not message."""
    alice, bob = Client(broker.target, pki.agent("alice")), Client(broker.target, pki.agent("bob"))
    dave = Client(broker.target, pki.agent("dave"))
    a, b = await alice.connect(), await bob.connect()
    d = await dave.connect()
    for i in range(SENDS):
        await alice.send(a.instance_id, "bob", "job", {"n": i})
    for i in range(SENDS):
        delivery_id, envelope = await b.delivery()
        if envelope["data"]["n"] >= SENDS - REJECTED:
            b.nack(delivery_id, "poison", retryable=False)
        else:
            b.ack(delivery_id)
    for i in range(REQUESTS):
        sent = await alice.request(a.instance_id, "bob", "ask", {"n": i})
        delivery_id, envelope = await b.delivery()
        b.ack(delivery_id)
        await bob.reply(b.instance_id, sent.correlation_id, "answer", {"n": i})
        reply_id, _ = await a.delivery()
        a.ack(reply_id)
    for _ in range(DENIED):
        code, detail = await refusal(dave.send(d.instance_id, "bob", "job", {}))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (code, detail)
    # Let the last acks reach the store before the scrape.
    await asyncio.sleep(0.5)
    for t in (a, b, d):
        await t.close()
    for c in (alice, bob, dave):
        await c.close()


def test_metrics_count_exactly_the_workload(store: str, pki: Pki, tmp_path) -> None:
    redis = RedisServer.start(tmp_path) if store == "redis" else None
    broker = Broker.start(tmp_path, pki, redis_url=redis.url if redis else None)
    try:
        before = scrape(broker)
        assert value(before, "mas_build_info", version="0.1.0") == 1
        assert value(before, "mas_deliveries_total", agent="bob") == 0
        asyncio.run(workload(broker, pki))
        found = scrape(broker)
        routed = SENDS + 2 * REQUESTS  # every send, every request and every reply
        assert value(found, "mas_messages_admitted_total", decision="ALLOWED") == routed
        assert value(found, "mas_messages_admitted_total", decision="AUTHZ_DENIED") == DENIED
        assert value(found, "mas_deliveries_total", agent="bob") == SENDS + REQUESTS
        assert value(found, "mas_deliveries_total", agent="alice") == REQUESTS
        assert value(found, "mas_acks_total", agent="bob") == SENDS - REJECTED + REQUESTS
        assert value(found, "mas_acks_total", agent="alice") == REQUESTS
        assert value(found, "mas_nacks_total", agent="bob", retryable="false") == REJECTED
        assert value(found, "mas_dead_letters_total", agent="bob", reason="rejected") == REJECTED
        assert value(found, "mas_rpcs_total", method="send", code="OK") == SENDS
        assert value(found, "mas_rpcs_total", method="send", code="PERMISSION_DENIED") == DENIED
        assert value(found, "mas_rpcs_total", method="request", code="OK") == REQUESTS
        assert value(found, "mas_rpcs_total", method="reply", code="OK") == REQUESTS
        assert value(found, "mas_rpc_duration_seconds_count", method="send") == SENDS + DENIED
        assert value(found, "mas_queue_depth", agent="bob") == 0
        assert value(found, "mas_in_flight", agent="bob") == 0
        assert value(found, "mas_sessions", agent="bob") == 0, "closed sessions are gone"
        assert value(found, "mas_circuit_state", agent="bob") == 0
        assert value(found, "mas_store_up") == 1
        # bob's chain: the routed sends and requests plus the denials recorded for bob.
        assert value(found, "mas_audit_chain_length", chain="bob") == SENDS + REQUESTS + DENIED
        assert value(found, "mas_store_operation_duration_seconds_count", operation="admit") >= SENDS
    finally:
        code = broker.stop()
        if redis:
            redis.stop()
    assert code == 0, f"the broker exited {code} on SIGTERM; log: {broker.log_path}"


def health_status(broker: Broker, pki: Pki, service: str = "") -> int:
    async def check():
        async with channel(broker.target, pki.agent("alice")) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return response.status

    return asyncio.run(check())


def test_health_follows_the_store(pki: Pki, tmp_path) -> None:
    redis = RedisServer.start(tmp_path, fsync="everysec")
    broker = Broker.start(tmp_path, pki, redis_url=redis.url, admin={"listen_addr": "127.0.0.1:0",
                                                                      "readiness_timeout_ms": 300})
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        assert broker.admin_get("/healthz")[0] == 200
        assert broker.admin_get("/readyz")[0] == 200
        for service in ("", "mas.runtime.v1.RuntimeService", "mas.v1.MasService"):
            assert health_status(broker, pki, service) == serving, service
        redis.kill()
        status, _, body = broker.admin_get("/readyz")
        assert status == 503 and "store_" in body, (status, body)
        assert broker.admin_get("/healthz")[0] == 200, "alive while the store is away"
        assert wait_for(lambda: health_status(broker, pki) == health_pb2.HealthCheckResponse.NOT_SERVING, 10), \
            "gRPC health NOT_SERVING"
        assert value(scrape(broker), "mas_store_up") == 0
        redis = redis.restart()
        assert wait_for(lambda: broker.admin_get("/readyz")[0] == 200, 10), "/readyz 200 again"
        assert wait_for(lambda: health_status(broker, pki) == serving, 10), "gRPC health SERVING again"
    finally:
        code = broker.stop()
        redis.stop()
    assert code == 0, f"the broker exited {code}; log: {broker.log_path}"


async def one_delivery_in_flight(broker: Broker, pki: Pki):
    """alice sends bob one job and bob receives it without acking: returns (clients,
    alice's transport, bob's transport, the delivery id)."""
    alice, bob = Client(broker.target, pki.agent("alice")), Client(broker.target, pki.agent("bob"))
    a, b = await alice.connect(), await bob.connect()
    await alice.send(a.instance_id, "bob", "job", {})
    delivery_id, _ = await b.delivery()
    return (alice, bob), a, b, delivery_id


def test_sigterm_drains_a_delivery_in_flight(pki: Pki, tmp_path) -> None:
    """A delivery the agent is still working on when SIGTERM comes: the broker stops taking
    work (readiness and gRPC health turn), waits for the ack, stores it, and exits 0."""
    broker = Broker.start(tmp_path, pki, delivery={"drain_timeout_ms": 10_000})

    async def main():
        clients, a, b, delivery_id = await one_delivery_in_flight(broker, pki)
        alice = clients[0]
        broker.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        status, _, body = broker.admin_get("/readyz")
        assert (status, body.strip()) == (503, "not ready: draining")
        assert broker.proc.poll() is None, "the broker waits for the delivery in flight"
        code, detail = await refusal(alice.send(a.instance_id, "bob", "job", {}))
        assert (code, detail) == (grpc.StatusCode.UNAVAILABLE, "broker_shutting_down")
        found = scrape(broker)
        assert value(found, "mas_draining") == 1
        assert value(found, "mas_in_flight", agent="bob") == 1
        assert value(found, "mas_queue_depth", agent="bob") == 1, "in flight is still in the queue"
        assert 0.4 < value(found, "mas_oldest_message_age_seconds", agent="bob") < 30
        b.ack(delivery_id)
        # Drained: the broker ends the session's stream by itself, then stops (its admin
        # listener with it, so the outcome is read from the exit code and the log).
        await b.end(timeout=10)
        for c in clients:
            await c.close()

    asyncio.run(main())
    # The broker stops by itself once drained; another signal now would be a second one.
    code = broker.proc.wait(timeout=15)
    broker.stop()
    assert code == 0, f"a clean drain exits 0, got {code}; log: {broker.log_path}"
    log = broker.log_path.read_text()
    assert "cut work short" not in log, log


def test_a_drain_cut_short_exits_3(pki: Pki, tmp_path) -> None:
    """The agent never acks: at the drain deadline the delivery is handed back (not lost) and
    the exit code says the drain was cut short."""
    broker = Broker.start(tmp_path, pki, delivery={"drain_timeout_ms": 300})

    async def main():
        clients, *_ = await one_delivery_in_flight(broker, pki)
        broker.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(2)
        for c in clients:
            await c.close()

    asyncio.run(main())
    code = broker.proc.wait(timeout=15)
    broker.stop()
    assert code == 3, f"expected exit 3 (drain cut short), got {code}; log: {broker.log_path}"
    assert "1 deliveries handed back" in broker.log_path.read_text()


def test_a_second_signal_stops_at_once(pki: Pki, tmp_path) -> None:
    broker = Broker.start(tmp_path, pki, delivery={"drain_timeout_ms": 60_000})

    async def main():
        clients, *_ = await one_delivery_in_flight(broker, pki)
        broker.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert broker.proc.poll() is None, "draining: waits up to a minute for the ack"
        started = time.monotonic()
        broker.proc.send_signal(signal.SIGINT)
        broker.proc.wait(timeout=5)
        assert time.monotonic() - started < 5
        for c in clients:
            await c.close()

    asyncio.run(main())
    assert broker.stop() == 130, "128 + SIGINT"


def test_a_callers_traceparent_reaches_the_receiver(broker: Broker, pki: Pki) -> None:
    """A grpcio client that sends W3C trace context in its metadata finds its trace id in the
    delivered envelope (the broker records nothing here: the context is passed through);
    a malformed one is dropped."""
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"

    async def main():
        alice, bob = Client(broker.target, pki.agent("alice")), Client(broker.target, pki.agent("bob"))
        a, b = await alice.connect(), await bob.connect()
        await alice.stub.Send(
            mas_pb2.SendRequest(target_id="bob", message_type="traced", data_json="{}", instance_id=a.instance_id),
            metadata=(("traceparent", traceparent), ("tracestate", "vendor=1")),
            timeout=10,
        )
        delivery_id, envelope = await b.delivery()
        b.ack(delivery_id)
        assert envelope["meta"]["traceparent"] == traceparent
        assert envelope["meta"]["tracestate"] == "vendor=1"
        await alice.stub.Send(
            mas_pb2.SendRequest(target_id="bob", message_type="untraced", data_json="{}", instance_id=a.instance_id),
            metadata=(("traceparent", "not-a-traceparent"),),
            timeout=10,
        )
        delivery_id, envelope = await b.delivery()
        b.ack(delivery_id)
        assert envelope["meta"]["traceparent"] is None, "a malformed traceparent is dropped"
        for t in (a, b):
            await t.close()
        for c in (alice, bob):
            await c.close()

    asyncio.run(main())


class _Collector:
    """An OTLP trace collector (the service of the `opentelemetry-proto` package) on a free
    loopback port, keeping every span with its resource's service name."""

    def __init__(self) -> None:
        from concurrent import futures

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        spans = self.spans = []

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for resource in request.resource_spans:
                    service = next((a.value.string_value for a in resource.resource.attributes
                                    if a.key == "service.name"), None)
                    for scope in resource.scope_spans:
                        spans.extend((service, s) for s in scope.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def of_trace(self, trace_id: str) -> list:
        return [(service, s) for service, s in self.spans if s.trace_id.hex() == trace_id]


def test_the_broker_binary_exports_its_spans_over_otlp(pki: Pki, tmp_path) -> None:
    """`mas serve` with a `telemetry` section sends its spans to a real OTLP collector: the
    RPC span is the child of the caller's span, the delivered envelope carries the delivery
    span's context, an unsampled caller context is followed (nothing recorded), log lines
    inside a traced RPC name the trace, and SIGTERM flushes what is buffered. A payload with a
    `traceparent` key of its own is delivered as it was sent, and the trace is the caller's."""
    collector = _Collector()
    broker = Broker.start(tmp_path, pki, telemetry={"otlp_endpoint": f"http://127.0.0.1:{collector.port}",
                                                    "service_name": "mas-broker-under-test"})
    sampled_trace, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    unsampled_trace = uuid.uuid4().hex
    denied_trace = uuid.uuid4().hex
    payload_trace, decoy_trace = uuid.uuid4().hex, uuid.uuid4().hex
    # Pretty-printed, a duplicate key, escapes, numbers serde_json re-writes, and fields named
    # like the envelope's own: what the receiver gets is what Python's json reads of it.
    decoy = f"00-{decoy_trace}-{uuid.uuid4().hex[:16]}-01"
    tricky = ('{\n  "traceparent": "%s",\n  "meta": {"traceparent": "%s", "tracestate": "k=v"},\n'
              '  "dup": 1, "dup": 2, "é\\n": "line\\nbreak \\"q\\" \\u00e9 \\ud83d\\ude00",\n'
              '  "n": [1, 2.50, -0.0, 1e3, -7, 18446744073709551615, null, true]\n}') % (decoy, decoy)

    async def main():
        alice, bob = Client(broker.target, pki.agent("alice")), Client(broker.target, pki.agent("bob"))
        dave = Client(broker.target, pki.agent("dave"))
        a, b, d = await alice.connect(), await bob.connect(), await dave.connect()

        async def send(client, transport, trace, span, flags, target="bob", data_json="{}"):
            return await client.stub.Send(
                mas_pb2.SendRequest(target_id=target, message_type="traced", data_json=data_json,
                                    instance_id=transport.instance_id),
                metadata=(("traceparent", f"00-{trace}-{span}-{flags}"),), timeout=10)

        await send(alice, a, sampled_trace, caller_span, "01")
        delivery_id, sampled = await b.delivery()
        b.ack(delivery_id)
        await send(alice, a, unsampled_trace, caller_span, "00")
        delivery_id, unsampled = await b.delivery()
        b.ack(delivery_id)
        code, _ = await refusal(send(dave, d, denied_trace, caller_span, "01"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        await send(alice, a, payload_trace, caller_span, "01", data_json=tricky)
        delivery_id, with_own_traceparent = await b.delivery()
        b.ack(delivery_id)
        await asyncio.sleep(0.3)
        for t in (a, b, d):
            await t.close()
        for c in (alice, bob, dave):
            await c.close()
        return sampled, unsampled, with_own_traceparent

    sampled, unsampled, with_own_traceparent = asyncio.run(main())
    assert broker.stop() == 0
    collector.server.stop(grace=None)

    _, trace, delivery_span, flags = sampled["meta"]["traceparent"].split("-")
    assert trace == sampled_trace and flags == "01"
    assert delivery_span != caller_span, "the envelope carries the broker's delivery span"
    spans = {s.name: (service, s) for service, s in collector.of_trace(sampled_trace)}
    assert {"mas.rpc.send", "mas.admission", "mas.deliver"} <= set(spans), sorted(spans)
    service, rpc = spans["mas.rpc.send"]
    assert service == "mas-broker-under-test"
    assert rpc.parent_span_id.hex() == caller_span, "the RPC span is the caller's child"
    assert spans["mas.deliver"][1].span_id.hex() == delivery_span
    assert spans["mas.admission"][1].parent_span_id == rpc.span_id

    assert unsampled["meta"]["traceparent"] == f"00-{unsampled_trace}-{caller_span}-00", "passed through"
    assert collector.of_trace(unsampled_trace) == [], "an unsampled caller is followed: nothing recorded"
    assert denied_trace in broker.log_path.read_text(), "the denial's log line names its trace"

    assert with_own_traceparent["data"] == json.loads(tricky), "the payload arrives as sent"
    _, trace, delivery_span, _ = with_own_traceparent["meta"]["traceparent"].split("-")
    assert trace == payload_trace, "the payload's traceparent field is not the message's context"
    assert delivery_span != caller_span, "the delivery span was opened on the caller's context"
    assert collector.of_trace(decoy_trace) == []
