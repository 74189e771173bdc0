//! End-to-end over real TCP on 127.0.0.1 with real mTLS: authentication, authorization,
//! send → deliver → ack, and the Transport protocol rules.

#![cfg(not(madsim))]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mas_agent::{HandlerError, Message};
use mas_proto::runtime::{ClientEvent, Hello, SendRequest, client_event};
use mas_tests::{TestBroker, eventually, eventually_async, id};
use serde::Deserialize;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

#[derive(Debug, Deserialize)]
struct Ping {
    n: u32,
}

type Seen = Arc<Mutex<Vec<(String, u32)>>>;

fn recorder(
    seen: &Seen,
) -> impl Fn(mas_agent::Agent, Message<Ping>) -> std::future::Ready<Result<(), HandlerError>> + use<> {
    let seen = seen.clone();
    move |_, msg: Message<Ping>| {
        seen.lock().unwrap().push((msg.envelope.sender_id.clone(), msg.payload.n));
        std::future::ready(Ok(()))
    }
}

#[tokio::test]
async fn send_is_delivered_acked_and_removed_from_the_queue() {
    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[])]).await;
    let seen: Seen = Arc::default();
    let bob = tb.agent("bob").on("ping", recorder(&seen)).start().await.unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    for n in 0..20 {
        alice.send("bob", "ping", &serde_json::json!({ "n": n })).await.unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || seen.lock().unwrap().len() == 20).await);
    let mut got: Vec<u32> = seen.lock().unwrap().iter().map(|(_, n)| *n).collect();
    got.sort();
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    assert!(seen.lock().unwrap().iter().all(|(from, _)| from == "alice"), "sender is the authenticated identity");
    assert!(
        eventually_async(Duration::from_secs(5), || async { tb.queue_len("bob").await == 0 }).await,
        "acks reach the store"
    );
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let tb = TestBroker::start(&[("alice", &[])]).await;
    // TLS 1.3 may complete the client side before the server's alert arrives, so the refusal
    // shows at connect or at the first RPC; either way nothing gets through.
    let refused = match tb.raw_client(None).await {
        Err(_) => true,
        Ok(mut client) => {
            let req = SendRequest { target_id: "alice".into(), instance_id: "i1".into(), ..Default::default() };
            client.send(req).await.is_err()
        }
    };
    assert!(refused);
    tb.stop().await;
}

async fn refusal_of(tb: &TestBroker, pair: &mas_net::pki::PemPair) -> tonic::Status {
    let mut client = tb.raw_client(Some(pair)).await.expect("TLS handshake succeeds");
    let req = SendRequest { target_id: "alice".into(), instance_id: "i1".into(), ..Default::default() };
    client.send(req).await.expect_err("must be refused")
}

#[tokio::test]
async fn certificate_without_spiffe_san_is_unauthenticated() {
    let tb = TestBroker::start(&[("alice", &[])]).await;
    let no_san = tb.ca.client_cert("alice", vec![]).unwrap();
    let status = refusal_of(&tb, &no_san).await;
    assert_eq!((status.code(), status.message()), (Code::Unauthenticated, "missing_spiffe_san"));
    tb.stop().await;
}

#[tokio::test]
async fn agent_outside_the_allowlist_is_refused() {
    let tb = TestBroker::start(&[("alice", &[])]).await;
    let mallory = tb.ca.agent_cert(&id("mallory")).unwrap();
    let status = refusal_of(&tb, &mallory).await;
    assert_eq!((status.code(), status.message()), (Code::Unauthenticated, "agent_not_allowlisted"));
    let err = mas_agent::AgentBuilder::new(tb.agent_config("mallory")).start().await.expect_err("refused");
    assert_eq!(err.status().map(|s| s.message()), Some("agent_not_allowlisted"));
    tb.stop().await;
}

#[tokio::test]
async fn send_to_a_target_without_grant_is_denied_and_nothing_is_delivered() {
    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[]), ("carol", &[])]).await;
    let seen: Seen = Arc::default();
    let carol = tb.agent("carol").on("ping", recorder(&seen)).start().await.unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    let err = alice.send("carol", "ping", &serde_json::json!({"n": 1})).await.expect_err("denied");
    let status = err.status().expect("a status");
    assert_eq!((status.code(), status.message()), (Code::PermissionDenied, "not_authorized"));
    // Unknown targets get the same answer (no probing of who exists).
    let err = alice.send("nobody", "ping", &serde_json::json!({"n": 1})).await.expect_err("denied");
    assert_eq!(err.status().map(|s| s.message()), Some("not_authorized"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(tb.queue_len("carol").await, 0);
    alice.stop().await;
    carol.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn payload_errors_use_reference_details() {
    let tb = TestBroker::start(&[("alice", &["alice"])]).await;
    let alice_cert = tb.ca.agent_cert(&id("alice")).unwrap();
    let mut client = tb.raw_client(Some(&alice_cert)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ClientEvent { event: Some(client_event::Event::Hello(Hello { instance_id: "i1".into() })) }).await.unwrap();
    let mut events = client.transport(ReceiverStream::new(rx)).await.unwrap().into_inner();
    events.message().await.unwrap().expect("welcome");
    for (data, detail) in [("{oops", "invalid_json"), ("[1]", "payload_must_be_object")] {
        let req = SendRequest {
            target_id: "alice".into(),
            message_type: "t".into(),
            data_json: data.into(),
            instance_id: "i1".into(),
        };
        let status = client.send(req).await.expect_err("refused");
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, detail));
    }
    let req = SendRequest { target_id: "alice".into(), instance_id: "not-connected".into(), ..Default::default() };
    let status = client.send(req).await.expect_err("refused");
    assert_eq!((status.code(), status.message()), (Code::FailedPrecondition, "session_not_connected"));
    drop(tx);
    tb.stop().await;
}

#[tokio::test]
async fn transport_protocol_violations_are_refused_with_reference_details() {
    let tb = TestBroker::start(&[("alice", &[])]).await;
    let cert = tb.ca.agent_cert(&id("alice")).unwrap();
    let mut client = tb.raw_client(Some(&cert)).await.unwrap();

    async fn first_error(client: &mut mas_net::client::RuntimeClient, events: Vec<ClientEvent>) -> tonic::Status {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        for e in events {
            tx.send(e).await.unwrap();
        }
        drop(tx);
        match client.transport(ReceiverStream::new(rx)).await {
            Err(status) => status,
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Err(status) => return status,
                        Ok(Some(_)) => continue,
                        Ok(None) => panic!("stream ended without an error"),
                    }
                }
            }
        }
    }
    let hello = |i: &str| ClientEvent { event: Some(client_event::Event::Hello(Hello { instance_id: i.into() })) };
    let heartbeat = ClientEvent { event: Some(client_event::Event::Heartbeat(Default::default())) };

    let s = first_error(&mut client, vec![]).await;
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "missing_hello"));
    let s = first_error(&mut client, vec![heartbeat.clone()]).await;
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "expected_hello"));
    let s = first_error(&mut client, vec![hello("bad/id")]).await;
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "invalid_instance_id"));
    let s = first_error(&mut client, vec![hello("i1"), heartbeat]).await;
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "expected_ack_or_nack"));

    // A live instance cannot be opened twice.
    let agent = tb.agent("alice");
    let mut config = tb.agent_config("alice");
    config.instance_id = Some("dup".parse().unwrap());
    let first = mas_agent::AgentBuilder::new(config.clone()).start().await.unwrap();
    let err = mas_agent::AgentBuilder::new(config).start().await.expect_err("duplicate");
    let status = err.status().expect("status");
    assert_eq!((status.code(), status.message()), (Code::FailedPrecondition, "instance_already_connected"));
    drop(agent);
    first.stop().await;
    tb.stop().await;
}
