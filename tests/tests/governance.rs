//! Governance in the message path over mTLS: DLP blocks, redacts and alerts (sends, requests,
//! replies and state writes).

#![cfg(not(madsim))]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mas_agent::{HandlerError, Message, TypedState};
use mas_core::envelope::Envelope;
use mas_tests::{TestBroker, eventually};
use serde::{Deserialize, Serialize};
use tonic::Code;

type Inbox = Arc<Mutex<Vec<Envelope>>>;

async fn bob_recording(tb: &TestBroker, inbox: &Inbox) -> mas_agent::Agent {
    let inbox = inbox.clone();
    tb.agent("bob")
        .fallback(move |_, envelope| {
            inbox.lock().unwrap().push(envelope);
            async { Ok::<(), HandlerError>(()) }
        })
        .start()
        .await
        .unwrap()
}

fn denial(err: &mas_agent::AgentError) -> (Code, String) {
    let status = err.status().expect("a status from the broker");
    (status.code(), status.message().to_string())
}

#[tokio::test]
async fn a_card_number_is_refused_an_ssn_redacted_and_an_email_delivered_unchanged() {
    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[])]).await;
    let inbox = Inbox::default();
    let bob = bob_recording(&tb, &inbox).await;
    let alice = tb.agent("alice").start().await.unwrap();

    let err = alice.send("bob", "pay", &serde_json::json!({"card": "4111 1111 1111 1111"})).await.expect_err("blocked");
    assert_eq!(denial(&err), (Code::PermissionDenied, "dlp_blocked".to_string()));
    alice.send("bob", "hr", &serde_json::json!({"employee": {"ssn": "123-45-6789", "name": "Jane"}})).await.unwrap();
    alice.send("bob", "contact", &serde_json::json!({"email": "jane.doe@example.com"})).await.unwrap();

    assert!(eventually(Duration::from_secs(5), || inbox.lock().unwrap().len() == 2).await);
    let got = inbox.lock().unwrap().clone();
    let hr = got.iter().find(|e| e.message_type == "hr").unwrap();
    assert_eq!(hr.data["employee"]["ssn"], "XXX-XX-6789");
    assert_eq!(hr.data["employee"]["name"], "Jane");
    let contact = got.iter().find(|e| e.message_type == "contact").unwrap();
    assert_eq!(contact.data["email"], "jane.doe@example.com", "an alert does not change the payload");
    assert!(got.iter().all(|e| e.message_type != "pay"), "the blocked message was never delivered");
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn a_blocked_reply_leaves_the_request_pending_for_a_clean_one() {
    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[])]).await;
    let outcome: Arc<Mutex<Option<(Code, String)>>> = Arc::default();
    let o = outcome.clone();
    let bob = tb
        .agent("bob")
        .on("lookup", move |agent, msg: Message<serde_json::Value>| {
            let o = o.clone();
            async move {
                let leak =
                    agent.reply(&msg.envelope, "card", &serde_json::json!({"card": "5500-0000-0000-0004"})).await;
                *o.lock().unwrap() = leak.err().map(|e| denial(&e));
                agent.reply(&msg.envelope, "card", &serde_json::json!({"card": "on file"})).await?;
                Ok::<(), HandlerError>(())
            }
        })
        .start()
        .await
        .unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    let reply = alice.request("bob", "lookup", &serde_json::json!({}), Duration::from_secs(5)).await.unwrap();
    assert_eq!(reply.data["card"], "on file");
    assert_eq!(outcome.lock().unwrap().clone(), Some((Code::PermissionDenied, "dlp_blocked".to_string())));
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Profile {
    note: String,
}

#[tokio::test]
async fn state_writes_are_screened_too() {
    let tb = TestBroker::start(&[("bob", &[])]).await;
    let bob = tb.agent("bob").start().await.unwrap();
    let mut state = TypedState::<Profile>::load(&bob).await.unwrap();
    let err = state
        .update(serde_json::json!({"note": "password: hunter2222"}).as_object().cloned().unwrap())
        .await
        .expect_err("blocked");
    assert_eq!(denial(&err), (Code::PermissionDenied, "dlp_blocked".to_string()));
    assert_eq!(state.revision(), 0, "nothing written");
    state.update(serde_json::json!({"note": "ssn 123-45-6789"}).as_object().cloned().unwrap()).await.unwrap();
    state.refresh().await.unwrap();
    assert_eq!(state.get().note, "ssn XXX-XX-6789", "stored redacted");
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn dlp_can_be_switched_off() {
    let tb = TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &[])], |c| c.gateway.features.dlp = false).await;
    let inbox = Inbox::default();
    let bob = bob_recording(&tb, &inbox).await;
    let alice = tb.agent("alice").start().await.unwrap();
    alice.send("bob", "pay", &serde_json::json!({"card": "4111 1111 1111 1111"})).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || inbox.lock().unwrap().len() == 1).await);
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn the_second_message_over_one_per_minute_is_rate_limited() {
    let tb = TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &[])], |c| {
        c.gateway
            .rate_limit
            .overrides
            .insert(mas_tests::id("alice"), mas_server::config::RateOverride { per_minute: Some(1), per_hour: None });
    })
    .await;
    let inbox = Inbox::default();
    let bob = bob_recording(&tb, &inbox).await;
    let alice = tb.agent("alice").start().await.unwrap();
    alice.send("bob", "t", &serde_json::json!({"n": 1})).await.unwrap();
    let err = alice.send("bob", "t", &serde_json::json!({"n": 2})).await.expect_err("over the limit");
    assert_eq!(denial(&err), (Code::ResourceExhausted, "rate_limited".to_string()));
    // bob has no override: his default 100/min is untouched by alice's.
    assert!(eventually(Duration::from_secs(5), || inbox.lock().unwrap().len() == 1).await);
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn a_blocked_target_stays_blocked_with_a_wildcard_grant_and_revocation_applies_to_the_next_message() {
    let tb = TestBroker::start_custom(&[("alice", &["*"]), ("bob", &[]), ("carol", &[])], |c| {
        c.agents.get_mut(&mas_tests::id("alice")).unwrap().blocked_targets = vec!["carol".into()];
    })
    .await;
    let inbox = Inbox::default();
    let bob = bob_recording(&tb, &inbox).await;
    let carol = tb.agent("carol").start().await.unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    let err = alice.send("carol", "t", &serde_json::json!({})).await.expect_err("blocked");
    assert_eq!(denial(&err), (Code::PermissionDenied, "not_authorized".to_string()));
    let peers: Vec<String> = alice.discover(&[]).await.unwrap().into_iter().map(|a| a.agent_id).collect();
    // Exactly what authorization allows: the wildcard includes alice herself, the block hides carol.
    assert_eq!(peers, ["alice", "bob"], "discovery shows exactly what authorization allows");
    alice.send("bob", "t", &serde_json::json!({"n": 1})).await.unwrap();
    tb.broker.change_authz("revoke all of alice", |p| p.set_allowed(&mas_tests::id("alice"), Vec::new()));
    let err = alice.send("bob", "t", &serde_json::json!({"n": 2})).await.expect_err("revoked");
    assert_eq!(denial(&err), (Code::PermissionDenied, "not_authorized".to_string()));
    assert!(eventually(Duration::from_secs(5), || inbox.lock().unwrap().len() == 1).await);
    alice.stop().await;
    bob.stop().await;
    carol.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn a_target_without_a_live_session_is_not_authorized() {
    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[])]).await;
    let alice = tb.agent("alice").start().await.unwrap();
    let err = alice.send("bob", "t", &serde_json::json!({})).await.expect_err("bob is not connected");
    assert_eq!(denial(&err), (Code::PermissionDenied, "not_authorized".to_string()));
    alice.stop().await;
    tb.stop().await;
}
