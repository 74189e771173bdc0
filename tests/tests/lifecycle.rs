//! The SDK's lifecycle hooks over mTLS: `on_start` runs once the transport is ready (it can
//! send), `on_stop` runs once, first thing in stop, while the agent can still send; a failing
//! `on_start` runs `on_stop`, stops the agent and releases its instance.

#![cfg(not(madsim))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mas_agent::{AgentError, HandlerError};
use mas_tests::{TestBroker, eventually};

#[tokio::test]
async fn on_start_can_send_and_on_stop_runs_once_before_the_transport_goes() {
    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[])]).await;
    let (bob, hellos) = tb.counting_agent::<serde_json::Value>("bob", "hello").await;
    let stops = Arc::new(AtomicU32::new(0));
    let stop_count = stops.clone();
    let alice = tb
        .agent("alice")
        .on_start(|agent| async move {
            agent.send("bob", "hello", &serde_json::json!({"phase": "start"})).await?;
            Ok(())
        })
        .on_stop(move |agent| {
            stop_count.fetch_add(1, Ordering::SeqCst);
            async move {
                agent.send("bob", "hello", &serde_json::json!({"phase": "stop"})).await?;
                Ok(())
            }
        })
        .start()
        .await
        .expect("alice starts");
    assert!(eventually(Duration::from_secs(5), || hellos.load(Ordering::SeqCst) == 1).await, "on_start's send");
    alice.stop().await;
    alice.stop().await;
    assert_eq!(stops.load(Ordering::SeqCst), 1, "on_stop runs once however often stop is called");
    assert!(eventually(Duration::from_secs(5), || hellos.load(Ordering::SeqCst) == 2).await, "on_stop's send");
    assert!(!alice.is_running());
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn a_failing_on_start_runs_on_stop_and_releases_the_instance() {
    let tb = TestBroker::start(&[("alice", &[])]).await;
    let stops = Arc::new(AtomicU32::new(0));
    let stop_count = stops.clone();
    let mut config = tb.agent_config("alice");
    config.instance_id = Some(mas_core::ids::InstanceId::new("0000beef").unwrap());
    let failed = mas_agent::AgentBuilder::new(config.clone())
        .on_start(|_| async { Err::<(), HandlerError>("cannot load the model".into()) })
        .on_stop(move |_| {
            stop_count.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .start()
        .await;
    match failed {
        Err(AgentError::Start(err)) => assert_eq!(err.to_string(), "cannot load the model"),
        other => panic!("expected AgentError::Start, got {other:?}"),
    }
    assert_eq!(stops.load(Ordering::SeqCst), 1);
    // The same instance id may connect again at once: the failed start closed its session.
    let again = mas_agent::AgentBuilder::new(config).start().await.expect("the instance was released");
    again.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn ask_uses_the_configured_default_request_timeout() {
    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[])]).await;
    assert_eq!(tb.agent_config("alice").request_timeout, Duration::from_secs(60), "the reference's default");
    // bob takes the request and never answers.
    let (bob, asked) = tb.counting_agent::<serde_json::Value>("bob", "question").await;
    let mut config = tb.agent_config("alice");
    config.request_timeout = Duration::from_millis(300);
    let alice = mas_agent::AgentBuilder::new(config).start().await.unwrap();
    match alice.ask("bob", "question", &serde_json::json!({})).await {
        Err(AgentError::RequestTimeout(timeout)) => assert_eq!(timeout, Duration::from_millis(300)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn a_stopped_agent_starts_again_with_its_handlers_hooks_and_instance() {
    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[])]).await;
    let (bob, hellos) = tb.counting_agent::<serde_json::Value>("bob", "hello").await;
    let starts = Arc::new(AtomicU32::new(0));
    let start_count = starts.clone();
    let alice = tb
        .agent("alice")
        .on_start(move |agent| {
            start_count.fetch_add(1, Ordering::SeqCst);
            async move {
                agent.send("bob", "hello", &serde_json::json!({})).await?;
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    assert!(matches!(alice.restart().await, Err(AgentError::StillRunning)));
    alice.stop().await;
    let again = alice.restart().await.expect("starts again");
    assert_eq!(again.instance_id(), alice.instance_id(), "the same instance");
    assert!(again.is_running() && !alice.is_running());
    assert_eq!(starts.load(Ordering::SeqCst), 2, "on_start ran for each start");
    assert!(eventually(Duration::from_secs(5), || hellos.load(Ordering::SeqCst) == 2).await);
    again.send("bob", "hello", &serde_json::json!({})).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || hellos.load(Ordering::SeqCst) == 3).await);
    again.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn a_received_request_is_answered_through_the_message() {
    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[])]).await;
    let refused = Arc::new(AtomicU32::new(0));
    let refusals = refused.clone();
    let bob = tb
        .agent("bob")
        .on("question", |_, question: mas_agent::Message<serde_json::Value>| async move {
            let n = question.payload["n"].as_u64().unwrap_or_default();
            question.reply("answer", &serde_json::json!({ "n": n + 1 })).await?;
            Ok(())
        })
        .on("note", move |_, note: mas_agent::Message<serde_json::Value>| {
            let refusals = refusals.clone();
            async move {
                if let Err(AgentError::NotARequest) = note.reply("answer", &serde_json::json!({})).await {
                    refusals.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    let answer = alice.ask("bob", "question", &serde_json::json!({"n": 41})).await.unwrap();
    assert_eq!((answer.message_type.as_str(), &answer.data["n"]), ("answer", &serde_json::json!(42)));
    alice.send("bob", "note", &serde_json::json!({})).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || refused.load(Ordering::SeqCst) == 1).await,
        "a plain send cannot be answered"
    );
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Counter {
    count: u64,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Loose {
    count: serde_json::Value,
}

#[tokio::test]
async fn typed_state_is_loaded_before_on_start_and_a_state_that_does_not_decode_fails_the_start() {
    let tb = TestBroker::start(&[("alice", &[])]).await;
    // First life: count to 2 through the shared state.
    let alice = tb
        .agent("alice")
        .with_state::<Counter>()
        .on_start(|agent| async move {
            let state = agent.state::<Counter>()?;
            let mut counter = state.lock().await;
            let next = counter.get().count + 2;
            counter.update(serde_json::Map::from_iter([("count".into(), next.into())])).await?;
            Ok(())
        })
        .start()
        .await
        .unwrap();
    assert!(matches!(alice.state::<Loose>(), Err(AgentError::State(_))), "the wrong type is refused");
    alice.stop().await;
    // Second life: the stored state is there before on_start.
    let seen = Arc::new(AtomicU32::new(0));
    let seen_in_hook = seen.clone();
    let alice = tb
        .agent("alice")
        .with_state::<Counter>()
        .on_start(move |agent| {
            let seen = seen_in_hook.clone();
            async move {
                let count = agent.state::<Counter>()?.lock().await.get().count;
                seen.store(u32::try_from(count)?, Ordering::SeqCst);
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    alice.stop().await;
    // Overwrite `count` with a string, which `Counter` cannot decode.
    let writer = tb.agent("alice").with_state::<Loose>().start().await.unwrap();
    let state = writer.state::<Loose>().unwrap();
    state.lock().await.update(serde_json::Map::from_iter([("count".into(), "many".into())])).await.unwrap();
    writer.stop().await;
    let stops = Arc::new(AtomicU32::new(0));
    let stop_count = stops.clone();
    let refused = tb
        .agent("alice")
        .with_state::<Counter>()
        .on_stop(move |_| {
            stop_count.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .start()
        .await;
    assert!(matches!(refused, Err(AgentError::State(_))), "never silently reset: {refused:?}");
    assert_eq!(stops.load(Ordering::SeqCst), 1, "on_stop runs when the start fails");
    tb.stop().await;
}

#[tokio::test]
async fn instances_of_one_agent_start_together_with_their_own_instance_ids() {
    let tb = TestBroker::start(&[("alice", &[])]).await;
    let instances = tb.agent("alice").start_instances(3).await.unwrap();
    let ids: std::collections::BTreeSet<String> = instances.iter().map(|a| a.instance_id().to_string()).collect();
    assert_eq!(ids.len(), 3, "distinct instance ids: {ids:?}");
    assert!(instances.iter().all(|a| a.is_running()));
    for agent in &instances {
        agent.stop().await;
    }
    tb.stop().await;
}
