//! Distributed tracing end to end: an in-test OTLP collector (the OTLP trace service from the
//! published `opentelemetry-proto` crate, over real gRPC) receives the spans of a broker and two
//! Rust agents, and one request alice → bob with its reply must form ONE trace whose spans link
//! client call → broker RPC → delivery → bob's handler → bob's reply RPC → reply delivery →
//! alice's receipt, each the parent of the next; the request's audit record names the trace.

#![cfg(not(madsim))]

use std::collections::HashMap;
use std::time::Duration;

use mas_agent::Message;
use mas_core::policy::audit::AuditFilter;
use mas_net::telemetry::TelemetrySettings;
use mas_tests::otlp::Collector;
use mas_tests::{TestBroker, eventually};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde::Deserialize;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        _ => None,
    })
}

#[derive(Debug, Deserialize)]
struct Ask {
    n: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_and_its_reply_form_one_linked_trace() {
    let collector = Collector::keeping();
    let endpoint = collector.start().await.unwrap();
    let settings = TelemetrySettings { otlp_endpoint: Some(endpoint), ..Default::default() };
    let (layer, guard) = mas_net::telemetry::start(&settings, "mas-e2e").unwrap().expect("endpoint set");
    tracing_subscriber::registry().with(layer).init();

    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[])]).await;
    let bob = tb
        .agent("bob")
        .on("ask", |agent, msg: Message<Ask>| async move {
            agent.reply(&msg.envelope, "answer", &serde_json::json!({"n": msg.payload.n + 1})).await?;
            Ok(())
        })
        .start()
        .await
        .unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    let reply = alice.request("bob", "ask", &serde_json::json!({"n": 41}), Duration::from_secs(5)).await.unwrap();
    assert_eq!(reply.data["n"], 43 - 1);
    let reply_trace = reply.meta.traceparent.clone().expect("the reply carries the trace");

    let records =
        tb.broker.query_audit(&AuditFilter { sender: Some("alice".into()), ..Default::default() }, 10).await.unwrap();
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
    drop(guard); // flushes every buffered span to the collector
    assert!(eventually(Duration::from_secs(5), || collector.spans().len() >= 9).await);

    let spans = collector.spans();
    let by_name = |name: &str| -> Vec<&Span> { spans.iter().filter(|s| s.name == name).collect() };
    let one = |name: &str| -> &Span {
        let found = by_name(name);
        assert_eq!(found.len(), 1, "one {name} span expected, got {}: {:?}", found.len(), names(&spans));
        found[0]
    };
    let request = one("mas.request");
    let trace_id = hex(&request.trace_id);
    assert_eq!(&reply_trace[3..35], trace_id, "the reply envelope continues the request's trace");
    let rpc_request = one("mas.rpc.request");
    let deliveries = by_name("mas.deliver");
    assert_eq!(deliveries.len(), 2, "the request's delivery and the reply's");
    let handle = one("mas.handle");
    let client_reply = one("mas.reply");
    let rpc_reply = one("mas.rpc.reply");
    let receive = one("mas.receive");
    let parent_of = |child: &Span, parent: &Span, what: &str| {
        assert_eq!(hex(&child.trace_id), trace_id, "{what}: same trace");
        assert_eq!(hex(&child.parent_span_id), hex(&parent.span_id), "{what}: parent/child");
    };
    parent_of(rpc_request, request, "broker RPC under alice's client call");
    let to_bob =
        deliveries.iter().find(|d| hex(&d.parent_span_id) == hex(&rpc_request.span_id)).expect("delivery to bob");
    parent_of(to_bob, rpc_request, "delivery under the RPC");
    parent_of(handle, to_bob, "bob's handler under its delivery");
    parent_of(client_reply, handle, "bob's reply call inside the handler");
    parent_of(rpc_reply, client_reply, "broker reply RPC under bob's call");
    let to_alice =
        deliveries.iter().find(|d| hex(&d.parent_span_id) == hex(&rpc_reply.span_id)).expect("reply delivery");
    parent_of(to_alice, rpc_reply, "reply delivery under the reply RPC");
    parent_of(receive, to_alice, "alice's receipt under the reply delivery");
    let admission = by_name("mas.admission");
    assert!(
        admission.iter().any(|a| hex(&a.parent_span_id) == hex(&rpc_request.span_id)
            && attr(a, "mas.decision").as_deref() == Some("ALLOWED")),
        "the admission span carries the decision"
    );
    // Kinds: CLIENT 3, SERVER 2, PRODUCER 4, CONSUMER 5 (opentelemetry-proto's enum).
    assert_eq!(request.kind, 3);
    assert_eq!(rpc_request.kind, 2);
    assert_eq!(to_bob.kind, 4);
    assert_eq!(handle.kind, 5);
    assert_eq!(attr(rpc_request, "mas.sender_id").as_deref(), Some("alice"));
    assert_eq!(attr(rpc_request, "mas.target_id").as_deref(), Some("bob"));
    assert_eq!(attr(rpc_request, "mas.message_type").as_deref(), Some("ask"));
    assert_eq!(attr(to_bob, "mas.attempt").as_deref(), Some("1"));
    assert!(to_bob.events.iter().any(|e| attr_event(e, "event") == Some("ack".into())), "the ack is an event");

    let asked: Vec<_> = records.iter().filter(|r| r.message_type.as_deref() == Some("ask")).collect();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].trace_id.as_deref(), Some(trace_id.as_str()), "the audit record names the trace");
}

fn attr_event(event: &opentelemetry_proto::tonic::trace::v1::span::Event, key: &str) -> Option<String> {
    event.attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    })
}

fn names(spans: &[Span]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for s in spans {
        *counts.entry(s.name.clone()).or_insert(0) += 1;
    }
    counts
}
