"""mas.runtime.v1 with raw grpcio stubs generated from proto/mas.proto: the messaging flows and
every refusal of the reference's status catalogue that mas implements, code and detail exact."""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid

import grpc
import pytest

import mas_pb2
from harness import Broker, Pki
from runtime_client import Client, new_instance, refusal, transport_refusal

OK = grpc.StatusCode
# How often each Transport refusal is tried: a refusal that races the stream reset showed up
# as INTERNAL about one run in two.
TRANSPORT_REFUSAL_TRIES = 10


def run(coro):
    return asyncio.run(coro)


def hello(instance_id: str) -> mas_pb2.ClientEvent:
    return mas_pb2.ClientEvent(hello=mas_pb2.Hello(instance_id=instance_id))


# --- flows ---------------------------------------------------------------------------------


def test_send_is_delivered_once_and_acked(broker: Broker, pki: Pki) -> None:
    async def main():
        alice, bob = Client(broker.target, pki.agent("alice")), Client(broker.target, pki.agent("bob"))
        a, b = await alice.connect(), await bob.connect()
        marker = uuid.uuid4().hex
        message_id = await alice.send(a.instance_id, "bob", "greeting", {"text": "hi", "marker": marker})
        delivery_id, envelope = await b.delivery()
        assert envelope["message_id"] == message_id
        assert envelope["sender_id"] == "alice" and envelope["target_id"] == "bob"
        assert envelope["message_type"] == "greeting"
        assert envelope["data"] == {"text": "hi", "marker": marker}
        assert envelope["meta"]["sender_instance_id"] == a.instance_id
        assert envelope["meta"]["is_reply"] is False and envelope["meta"]["expects_reply"] is False
        b.ack(delivery_id)
        # Acked: nothing comes again (a retry would come after 50 ms backoff).
        with pytest.raises(asyncio.TimeoutError):
            await b.delivery(timeout=0.5)
        await a.close(), await b.close()
        await alice.close(), await bob.close()

    run(main())


def test_send_batch_answers_each_message_as_its_own_send_would(broker: Broker, pki: Pki) -> None:
    """SendBatch (ours, additive to mas.runtime.v1) from plain grpcio stubs of our proto."""
    async def main():
        alice, bob = Client(broker.target, pki.agent("alice")), Client(broker.target, pki.agent("bob"))
        a, b = await alice.connect(), await bob.connect()
        marker = uuid.uuid4().hex
        sends = [
            mas_pb2.BatchedSend(target_id="bob", message_type="note", data_json=json.dumps({"n": 1, "m": marker})),
            mas_pb2.BatchedSend(target_id="nobody", message_type="note", data_json="{}"),
            mas_pb2.BatchedSend(target_id="bob", message_type="note", data_json="[1]"),
            mas_pb2.BatchedSend(target_id="bob", message_type="note", data_json=json.dumps({"n": 2, "m": marker})),
        ]
        resp = await alice.stub.SendBatch(mas_pb2.SendBatchRequest(instance_id=a.instance_id, sends=sends),
                                          timeout=10)
        codes = {code.value[0]: code for code in grpc.StatusCode}
        got = [(codes[o.code], o.detail) for o in resp.outcomes]
        assert got == [(OK.OK, ""), (OK.PERMISSION_DENIED, "not_authorized"),
                       (OK.INVALID_ARGUMENT, "payload_must_be_object"), (OK.OK, "")]
        # The same refusal as a plain Send of that message.
        assert await refusal(alice.send(a.instance_id, "nobody", "note", {})) == (OK.PERMISSION_DENIED,
                                                                                 "not_authorized")
        ids = [resp.outcomes[0].message_id, resp.outcomes[3].message_id]
        for expected_id, n in zip(ids, (1, 2)):
            delivery_id, envelope = await b.delivery()
            assert (envelope["message_id"], envelope["data"]) == (expected_id, {"n": n, "m": marker})
            b.ack(delivery_id)
        too_many = mas_pb2.SendBatchRequest(instance_id=a.instance_id, sends=[sends[0]] * 1025)
        assert await refusal(alice.stub.SendBatch(too_many, timeout=10)) == (OK.INVALID_ARGUMENT, "batch_too_large")
        await a.close(), await b.close()
        await alice.close(), await bob.close()

    run(main())


def test_retryable_nack_is_redelivered_with_a_fresh_delivery_id(broker: Broker, pki: Pki) -> None:
    async def main():
        alice, bob = Client(broker.target, pki.agent("alice")), Client(broker.target, pki.agent("bob"))
        a, b = await alice.connect(), await bob.connect()
        message_id = await alice.send(a.instance_id, "bob", "flaky", {})
        first, envelope = await b.delivery()
        b.nack(first, "try again", retryable=True)
        second, again = await b.delivery()
        assert second != first and again["message_id"] == message_id == envelope["message_id"]
        b.ack(second)
        await a.close(), await b.close()
        await alice.close(), await bob.close()

    run(main())


async def serve_replies(transport, client: Client, count: int) -> None:
    """Answers `count` requests with their own correlation id and number."""
    for _ in range(count):
        delivery_id, envelope = await transport.delivery()
        assert envelope["meta"]["expects_reply"] is True
        await client.reply(transport.instance_id, envelope["meta"]["correlation_id"], "answer",
                           {"n": envelope["data"]["n"], "cid": envelope["meta"]["correlation_id"]})
        transport.ack(delivery_id)


async def collect_replies(transport, count: int) -> dict[str, dict]:
    replies = {}
    for _ in range(count):
        delivery_id, envelope = await transport.delivery()
        transport.ack(delivery_id)
        assert envelope["meta"]["is_reply"] is True
        replies[envelope["meta"]["correlation_id"]] = envelope
    return replies


def test_request_reply_returns_to_the_asking_instance(broker: Broker, pki: Pki) -> None:
    async def main():
        alice, bob = Client(broker.target, pki.agent("alice")), Client(broker.target, pki.agent("bob"))
        a, b = await alice.connect(), await bob.connect()
        server = asyncio.create_task(serve_replies(b, bob, 1))
        resp = await alice.request(a.instance_id, "bob", "question", {"n": 1})
        reply = (await collect_replies(a, 1))[resp.correlation_id]
        assert reply["sender_id"] == "bob" and reply["target_id"] == "alice"
        assert reply["data"] == {"n": 1, "cid": resp.correlation_id}
        assert reply["meta"]["reply_to_instance_id"] == a.instance_id
        await server
        await a.close(), await b.close()
        await alice.close(), await bob.close()

    run(main())


def test_32_concurrent_requests_from_two_instances_each_get_their_own_replies(broker: Broker, pki: Pki) -> None:
    async def main():
        alice, bob = Client(broker.target, pki.agent("alice")), Client(broker.target, pki.agent("bob"))
        asking = [await alice.connect(), await alice.connect()]
        b = await bob.connect()
        server = asyncio.create_task(serve_replies(b, bob, 32))

        async def ask(transport, n):
            return n, (await alice.request(transport.instance_id, "bob", "question", {"n": n})).correlation_id

        sent = await asyncio.gather(*(ask(asking[n % 2], n) for n in range(32)))
        got = await asyncio.gather(collect_replies(asking[0], 16), collect_replies(asking[1], 16))
        await server
        for i, replies in enumerate(got):
            mine = {cid: n for n, cid in sent if n % 2 == i}
            assert set(replies) == set(mine), "each instance receives exactly its own replies"
            for cid, envelope in replies.items():
                assert envelope["data"] == {"n": mine[cid], "cid": cid}
                assert envelope["meta"]["reply_to_instance_id"] == asking[i].instance_id
        for t in [*asking, b]:
            await t.close()
        await alice.close(), await bob.close()

    run(main())


def test_discover_by_capability_shows_live_permitted_agents(broker: Broker, pki: Pki) -> None:
    async def main():
        alice, bob, carol, dave = (Client(broker.target, pki.agent(n)) for n in ("alice", "bob", "carol", "dave"))
        sessions = [await bob.connect(), await carol.connect()]
        found = await alice.stub.Discover(mas_pb2.DiscoverRequest(capabilities=["math"]), timeout=10)
        assert [a.agent_id for a in found.agents] == ["bob", "carol"]
        bob_record = found.agents[0]
        assert list(bob_record.capabilities) == ["echo", "math"]
        assert json.loads(bob_record.metadata_json) == {"lang": "py"}
        assert bob_record.status == "ACTIVE"
        echo = await alice.stub.Discover(mas_pb2.DiscoverRequest(capabilities=["echo"]), timeout=10)
        assert [a.agent_id for a in echo.agents] == ["bob"]
        none = await alice.stub.Discover(mas_pb2.DiscoverRequest(capabilities=["no-such"]), timeout=10)
        assert list(none.agents) == []
        # dave may message nobody, so discovery shows him nobody.
        hidden = await dave.stub.Discover(mas_pb2.DiscoverRequest(), timeout=10)
        assert list(hidden.agents) == []
        for s in sessions:
            await s.close()
        for c in (alice, bob, carol, dave):
            await c.close()

    run(main())


def test_state_revisions_conflict_and_reset(broker: Broker, pki: Pki) -> None:
    async def main():
        client = Client(broker.target, pki.agent("stately"))
        stub = client.stub
        start = await stub.GetState(mas_pb2.GetStateRequest(), timeout=10)
        r0 = start.revision
        written = await stub.UpdateState(
            mas_pb2.UpdateStateRequest(updates={"count": "1", "name": '"s"'}, expected_revision=r0), timeout=10)
        assert written.revision == r0 + 1
        code, detail = await refusal(stub.UpdateState(
            mas_pb2.UpdateStateRequest(updates={"count": "2"}, expected_revision=r0), timeout=10))
        assert (code, detail) == (OK.ABORTED, "state_revision_conflict")
        now = await stub.GetState(mas_pb2.GetStateRequest(), timeout=10)
        assert dict(now.state) == {**dict(start.state), "count": "1", "name": '"s"'}
        assert now.revision == r0 + 1
        reset = await stub.ResetState(mas_pb2.ResetStateRequest(expected_revision=r0 + 1), timeout=10)
        assert reset.revision == r0 + 2
        code, detail = await refusal(stub.ResetState(mas_pb2.ResetStateRequest(expected_revision=r0), timeout=10))
        assert (code, detail) == (OK.ABORTED, "state_revision_conflict")
        empty = await stub.GetState(mas_pb2.GetStateRequest(), timeout=10)
        assert dict(empty.state) == {} and empty.revision == r0 + 2
        await client.close()

    run(main())


def test_dev_certificates_pass_python_strict_x509_verification(broker: Broker, pki: Pki) -> None:
    """Python 3.13's default context sets VERIFY_X509_STRICT, which refused leaves without an
    Authority Key Identifier; any Python TLS client other than grpcio failed on them."""
    identity = pki.agent("alice")
    context = ssl.create_default_context(cafile=str(identity.ca))
    assert context.verify_flags & ssl.VERIFY_X509_STRICT
    context.load_cert_chain(str(identity.cert), str(identity.key))
    context.set_alpn_protocols(["h2"])
    host, port = broker.target.rsplit(":", 1)
    import socket

    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            assert tls.selected_alpn_protocol() == "h2"
            assert tls.getpeercert()["subject"]


# --- refusals --------------------------------------------------------------------------------


def test_unusable_certificates_are_refused_with_their_detail(broker: Broker, pki: Pki) -> None:
    cases = {
        "no-san": "missing_spiffe_san",
        "dns-only": "invalid_spiffe_san",  # a SAN, but no SPIFFE URI in it
        "two-spiffe": "invalid_spiffe_san",
        "foreign-spiffe": "invalid_spiffe_format",
        "bad-id-spiffe": "invalid_spiffe_format",
        "outsider": "agent_not_allowlisted",
    }

    async def main():
        for name, detail in cases.items():
            client = Client(broker.target, pki.agent(name))
            unary = await refusal(client.send(new_instance(), "bob", "x", {}))
            assert unary == (OK.UNAUTHENTICATED, detail), name
            for _ in range(TRANSPORT_REFUSAL_TRIES):
                streamed = await transport_refusal(client.stub, hello(new_instance()))
                assert streamed == (OK.UNAUTHENTICATED, detail), name
            await client.close()

    run(main())


def test_certificate_of_an_untrusted_ca_fails_the_handshake(broker: Broker, pki: Pki) -> None:
    async def main():
        client = Client(broker.target, pki.agent("untrusted-alice"))
        code, _ = await refusal(client.send(new_instance(), "bob", "x", {}))
        assert code == OK.UNAVAILABLE
        await client.close()

    run(main())


def test_transport_protocol_violations(broker: Broker, pki: Pki) -> None:
    ack = mas_pb2.ClientEvent(ack=mas_pb2.Ack(delivery_id="d"))
    heartbeat = mas_pb2.ClientEvent(heartbeat=mas_pb2.Heartbeat())

    async def main():
        bob = Client(broker.target, pki.agent("bob"))
        for _ in range(TRANSPORT_REFUSAL_TRIES):
            assert await transport_refusal(bob.stub, close=True) == (OK.INVALID_ARGUMENT, "missing_hello")
            assert await transport_refusal(bob.stub, ack) == (OK.INVALID_ARGUMENT, "expected_hello")
            assert await transport_refusal(bob.stub, hello("not valid!")) == (OK.INVALID_ARGUMENT, "invalid_instance_id")
            assert await transport_refusal(bob.stub, hello("x" * 33)) == (OK.INVALID_ARGUMENT, "invalid_instance_id")
            held = await bob.connect()
            duplicate = await transport_refusal(bob.stub, hello(held.instance_id))
            assert duplicate == (OK.FAILED_PRECONDITION, "instance_already_connected")
            await held.close()
            for second in (hello(new_instance()), heartbeat):
                code = await transport_refusal(bob.stub, hello(new_instance()), second)
                assert code == (OK.INVALID_ARGUMENT, "expected_ack_or_nack")
        await bob.close()

    run(main())


def test_message_refusals(broker: Broker, pki: Pki) -> None:
    async def main():
        alice, bob, dave = (Client(broker.target, pki.agent(n)) for n in ("alice", "bob", "dave"))
        a, b, d = await alice.connect(), await bob.connect(), await dave.connect()
        cases = [
            (dave.send(d.instance_id, "bob", "x", {}), OK.PERMISSION_DENIED, "not_authorized"),
            (alice.send(a.instance_id, "erin", "x", {}), OK.PERMISSION_DENIED, "not_authorized"),
            (alice.send(a.instance_id, "nobody-at-all", "x", {}), OK.PERMISSION_DENIED, "not_authorized"),
            (alice.send(new_instance(), "bob", "x", {}), OK.FAILED_PRECONDITION, "session_not_connected"),
            (alice.send("not valid!", "bob", "x", {}), OK.INVALID_ARGUMENT, "invalid_instance_id"),
            (alice.send(a.instance_id, "bob", "x", "{not json"), OK.INVALID_ARGUMENT, "invalid_json"),
            (alice.send(a.instance_id, "bob", "x", "[1, 2]"), OK.INVALID_ARGUMENT, "payload_must_be_object"),
            (alice.send(a.instance_id, "bob", "x", {"card": "4111 1111 1111 1111"}), OK.PERMISSION_DENIED,
             "dlp_blocked"),
            (alice.request(a.instance_id, "bob", "x", {}, timeout_ms=-1), OK.INVALID_ARGUMENT,
             "invalid_timeout_ms"),
            (bob.reply(b.instance_id, "", "x", {}), OK.INVALID_ARGUMENT, "missing_correlation_id"),
            (bob.reply(b.instance_id, "deadbeef.alice", "x", {}), OK.INVALID_ARGUMENT, "unknown_correlation_id"),
        ]
        for call, code, detail in cases:
            assert await refusal(call) == (code, detail), detail
        for t in (a, b, d):
            await t.close()
        for c in (alice, bob, dave):
            await c.close()

    run(main())


def test_reply_rules_spoofed_late_and_repeated(broker: Broker, pki: Pki) -> None:
    async def main():
        alice, bob, carol = (Client(broker.target, pki.agent(n)) for n in ("alice", "bob", "carol"))
        a, b, c = await alice.connect(), await bob.connect(), await carol.connect()

        resp = await alice.request(a.instance_id, "bob", "question", {"n": 1})
        delivery_id, _ = await b.delivery()
        b.ack(delivery_id)
        spoofed = await refusal(carol.reply(c.instance_id, resp.correlation_id, "answer", {"n": "fake"}))
        assert spoofed == (OK.PERMISSION_DENIED, "reply_sender_mismatch")
        first = await bob.reply(b.instance_id, resp.correlation_id, "answer", {"n": 1})
        again = await bob.reply(b.instance_id, resp.correlation_id, "answer", {"n": 1})
        assert again == first, "an identical retry returns the original reply's id"
        different = await refusal(bob.reply(b.instance_id, resp.correlation_id, "answer", {"n": 2}))
        assert different == (OK.INVALID_ARGUMENT, "unknown_or_completed_correlation_id")
        replies = await collect_replies(a, 1)
        assert replies[resp.correlation_id]["data"] == {"n": 1}, "only the real reply arrives"

        late = await alice.request(a.instance_id, "bob", "question", {"n": 2}, timeout_ms=200)
        delivery_id, _ = await b.delivery()
        b.ack(delivery_id)
        await asyncio.sleep(0.4)
        expired = await refusal(bob.reply(b.instance_id, late.correlation_id, "answer", {"n": 2}))
        assert expired == (OK.FAILED_PRECONDITION, "correlation_id_expired")
        for t in (a, b, c):
            await t.close()
        for cl in (alice, bob, carol):
            await cl.close()

    run(main())
