//! Every input bound, hit over real mTLS with a raw client: the status and detail a client
//! gets, and that nothing of the refused input reaches the audit trail or the store.
//! (The limits table in the README lists the same bounds.)

#![cfg(not(madsim))]

use std::time::Duration;

use mas_net::client::RuntimeClient;
use mas_proto::runtime::{
    ClientEvent, Hello, ReplyRequest, RequestRequest, SendRequest, ServerEvent, UpdateStateRequest, client_event,
};
use mas_server::config::LimitSettings;
use mas_tests::{TestBroker, id};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

/// Small bounds, so that each is cheap to hit.
fn small_limits() -> LimitSettings {
    LimitSettings {
        max_payload_bytes: 1_000,
        max_json_depth: 8,
        max_message_type_bytes: 16,
        max_state_bytes: 200,
        max_sessions_per_agent: 3,
        max_request_timeout_ms: 60_000,
        max_pending_requests_per_agent: 3,
        ..LimitSettings::default()
    }
}

async fn broker() -> TestBroker {
    TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &[])], |c| c.limits = small_limits()).await
}

/// A client of `agent` with an open session of instance `instance`.
async fn session(tb: &TestBroker, agent: &str, instance: &str) -> Result<(RuntimeClient, Session), Status> {
    let pair = tb.ca.agent_cert(&id(agent)).expect("cert");
    let mut client = tb.raw_client(Some(&pair)).await.expect("TLS handshake");
    let (tx, rx) = mpsc::channel(4);
    let hello = ClientEvent { event: Some(client_event::Event::Hello(Hello { instance_id: instance.into() })) };
    tx.send(hello).await.expect("queue hello");
    let mut events = client.transport(ReceiverStream::new(rx)).await?.into_inner();
    events.message().await?.expect("welcome");
    Ok((client, Session { _tx: tx, _events: events }))
}

/// Keeps a session open while held.
struct Session {
    _tx: mpsc::Sender<ClientEvent>,
    _events: Streaming<ServerEvent>,
}

fn send(target: &str, message_type: &str, data: &str) -> SendRequest {
    SendRequest {
        instance_id: "i1".into(),
        target_id: target.into(),
        message_type: message_type.into(),
        data_json: data.into(),
    }
}

fn refusal(result: Result<impl std::fmt::Debug, Status>) -> (Code, String) {
    let status = result.expect_err("must be refused");
    (status.code(), status.message().to_string())
}

fn nested(depth: usize) -> String {
    format!(r#"{{"x":{}1{}}}"#, "[".repeat(depth - 1), "]".repeat(depth - 1))
}

#[tokio::test]
async fn message_bounds_refuse_with_their_detail_and_leave_no_trace() {
    let tb = broker().await;
    let (mut alice, _alice_session) = session(&tb, "alice", "i1").await.unwrap();
    let (_bob, _bob_session) = session(&tb, "bob", "b1").await.unwrap();
    let big = format!(r#"{{"x":"{}"}}"#, "y".repeat(1_000));
    let cases = [
        (send("bob", "t", &big), Code::ResourceExhausted, "payload_too_large"),
        (send("bob", "t", &nested(9)), Code::InvalidArgument, "json_too_deep"),
        (send("bob", &"t".repeat(17), "{}"), Code::InvalidArgument, "message_type_too_long"),
        (send(&"b".repeat(1_000_000), "t", "{}"), Code::InvalidArgument, "invalid_target_id"),
        (send("bob/../x", "t", "{}"), Code::InvalidArgument, "invalid_target_id"),
    ];
    for (req, code, detail) in cases {
        assert_eq!(refusal(alice.send(req).await), (code, detail.to_string()));
    }
    // At the bounds exactly, all is accepted.
    let at_bound = format!(r#"{{"x":"{}"}}"#, "y".repeat(1_000 - 8));
    alice.send(send("bob", &"t".repeat(16), &at_bound)).await.expect("payload of exactly the bound");
    alice.send(send("bob", "t", &nested(8))).await.expect("depth of exactly the bound");
    let report = tb.broker.verify_audit().await.unwrap();
    assert_eq!(report.records(), 2, "refused inputs are not audited: {report:?}");

    let request = |timeout_ms| RequestRequest {
        instance_id: "i1".into(),
        target_id: "bob".into(),
        message_type: "t".into(),
        data_json: "{}".into(),
        timeout_ms,
    };
    assert_eq!(refusal(alice.request(request(60_001)).await), (Code::InvalidArgument, "timeout_ms_too_large".into()));
    alice.request(request(60_000)).await.expect("the longest allowed timeout");
    tb.stop().await;
}

#[tokio::test]
async fn requests_awaiting_replies_are_bounded_per_requester() {
    let tb = broker().await;
    let (mut alice, _alice_session) = session(&tb, "alice", "i1").await.unwrap();
    let (_bob, _bob_session) = session(&tb, "bob", "b1").await.unwrap();
    let request = || RequestRequest {
        instance_id: "i1".into(),
        target_id: "bob".into(),
        message_type: "t".into(),
        data_json: "{}".into(),
        timeout_ms: 60_000,
    };
    for _ in 0..3 {
        alice.request(request()).await.expect("within the bound");
    }
    let refused = alice.request(request()).await;
    assert_eq!(refusal(refused), (Code::ResourceExhausted, "too_many_pending_requests".into()));
    assert_eq!(tb.queue_len("bob").await, 3, "the refused request was not queued");
    tb.stop().await;
}

#[tokio::test]
async fn a_reply_is_bounded_like_a_message() {
    let tb = broker().await;
    let (mut bob, _bob_session) = session(&tb, "bob", "i1").await.unwrap();
    let reply = |message_type: &str, data: &str| ReplyRequest {
        instance_id: "i1".into(),
        correlation_id: "c.alice".into(),
        message_type: message_type.into(),
        data_json: data.into(),
    };
    let big = format!(r#"{{"x":"{}"}}"#, "y".repeat(1_000));
    assert_eq!(refusal(bob.reply(reply("t", &big)).await), (Code::ResourceExhausted, "payload_too_large".into()));
    assert_eq!(refusal(bob.reply(reply("t", &nested(9))).await), (Code::InvalidArgument, "json_too_deep".into()));
    let long_type = "t".repeat(17);
    assert_eq!(
        refusal(bob.reply(reply(&long_type, "{}")).await),
        (Code::InvalidArgument, "message_type_too_long".into())
    );
    let mut long_id = reply("t", "{}");
    long_id.correlation_id = format!("{}.alice", "c".repeat(100_000));
    assert_eq!(refusal(bob.reply(long_id).await), (Code::InvalidArgument, "unknown_correlation_id".into()));
    tb.stop().await;
}

#[tokio::test]
async fn state_is_bounded_in_total_not_only_per_write() {
    let tb = broker().await;
    let (mut alice, _session) = session(&tb, "alice", "i1").await.unwrap();
    let write = |field: &str, value: String| UpdateStateRequest {
        updates: [(field.to_string(), value)].into_iter().collect(),
        expected_revision: None,
    };
    // 90 + 90 bytes fit under 200; a third field takes the total past it.
    alice.update_state(write("a", format!("\"{}\"", "x".repeat(87)))).await.expect("first field");
    alice.update_state(write("b", format!("\"{}\"", "x".repeat(87)))).await.expect("second field");
    let third = alice.update_state(write("c", format!("\"{}\"", "x".repeat(87)))).await;
    assert_eq!(refusal(third), (Code::ResourceExhausted, "state_too_large".into()));
    let single = alice.update_state(write("d", format!("\"{}\"", "x".repeat(300)))).await;
    assert_eq!(refusal(single), (Code::ResourceExhausted, "state_too_large".into()));
    let deep = alice.update_state(write("e", nested(9))).await;
    assert_eq!(refusal(deep), (Code::InvalidArgument, "json_too_deep".into()));
    let state = tb.broker.store().get_state(&id("alice")).await.unwrap();
    assert_eq!(state.fields.keys().collect::<Vec<_>>(), ["a", "b"], "refused writes changed nothing");
    // Overwriting a field with a value of the same size still fits.
    alice.update_state(write("a", format!("\"{}\"", "z".repeat(87)))).await.expect("overwrite");
    tb.stop().await;
}

#[tokio::test]
async fn sessions_beyond_the_per_agent_bound_are_refused_and_others_still_served() {
    let tb = broker().await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(session(&tb, "alice", &format!("i{i}")).await.expect("within the bound"));
    }
    let refused = session(&tb, "alice", "i3").await.map(|_| ());
    assert_eq!(refusal(refused), (Code::ResourceExhausted, "too_many_sessions".into()));
    let (_bob, _bob_session) = session(&tb, "bob", "b1").await.expect("another agent is unaffected");
    held.pop();
    // The slot comes back once the session's stream is gone.
    let mut reopened = None;
    for _ in 0..50 {
        if let Ok(s) = session(&tb, "alice", "i3").await {
            reopened = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened.is_some(), "a closed session frees its slot");
    tb.stop().await;
}
