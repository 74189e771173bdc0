//! Building blocks of a simulated deployment: a broker node over a shared store, agent nodes
//! that (re)connect with backoff, and sends that retry through loss.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use madsim::runtime::{Handle, NodeHandle};
use mas_agent::{Agent, AgentBuilder, AgentConfig, AgentError};
use mas_core::ids::AgentId;
use mas_server::config::DeliverySettings;
use mas_server::store::Store;
use mas_server::{AgentDefinition, Broker, BrokerConfig};
use tonic::Code;

use crate::trace::Trace;

/// The broker's simulated address.
pub const BROKER_ADDR: &str = "10.0.0.1:50051";

/// Parses an id written by a scenario.
pub fn id(s: &str) -> AgentId {
    AgentId::new(s).expect("scenario agent id")
}

/// A broker configuration with `(agent, allowed targets)` grants and a fixed seed.
pub fn broker_config(grants: &[(&str, &[&str])], seed: u64, delivery: DeliverySettings) -> BrokerConfig {
    let agents: BTreeMap<_, _> =
        grants.iter().map(|(agent, targets)| (id(agent), AgentDefinition::allowing(targets))).collect();
    let mut config = BrokerConfig::new(addr(BROKER_ADDR), agents);
    config.delivery = delivery;
    config.seed = Some(seed);
    config.validate().expect("valid scenario config");
    config
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("scenario address")
}

/// Starts the broker on its own node. The store lives outside the node, so it survives a
/// broker crash (as Redis would); the broker reaches it by shared memory, without faults.
pub fn start_broker(handle: &Handle, store: Store, config: BrokerConfig) -> NodeHandle {
    start_broker_at(handle, "broker", BROKER_ADDR, store, config)
}

/// Every broker a scenario started (including each restart), for checkers that read counters.
pub type Brokers = Arc<Mutex<Vec<Arc<Broker>>>>;

/// Starts a broker named `name` listening on `listen` (several brokers may share `store`).
/// A restarted node runs a fresh broker over the same store.
pub fn start_broker_at(handle: &Handle, name: &str, listen: &str, store: Store, config: BrokerConfig) -> NodeHandle {
    start_observed_broker(handle, name, listen, store, config, &Brokers::default())
}

/// Like [`start_broker_at`], recording every broker instance in `brokers`.
pub fn start_observed_broker(
    handle: &Handle,
    name: &str,
    listen: &str,
    store: Store,
    mut config: BrokerConfig,
    brokers: &Brokers,
) -> NodeHandle {
    let brokers = brokers.clone();
    let listen = addr(listen);
    config.listen_addr = listen;
    let ip: IpAddr = listen.ip();
    handle
        .create_node()
        .name(name)
        .ip(ip)
        .init(move || {
            let broker = Broker::with_store(config.clone(), store.clone()).expect("scenario config is valid");
            brokers.lock().unwrap_or_else(PoisonError::into_inner).push(broker.clone());
            async move {
                if let Err(err) = mas_server::serve::serve_sim(broker, listen, std::future::pending()).await {
                    panic!("broker failed: {err}");
                }
            }
        })
        .build()
}

/// Agent settings for the simulated broker.
pub fn agent_config(agent: &str, instance: &str) -> AgentConfig {
    agent_config_for(agent, instance, &[BROKER_ADDR])
}

/// Agent settings with a list of broker addresses, the first preferred.
pub fn agent_config_for(agent: &str, instance: &str, brokers: &[&str]) -> AgentConfig {
    let mut urls = brokers.iter().map(|b| format!("http://{b}"));
    let mut config = AgentConfig::new(id(agent), urls.next().expect("at least one broker"));
    config.fallback_endpoints = urls.collect();
    config.instance_id = Some(instance.parse().expect("scenario instance id"));
    config
}

/// Starts an agent, retrying with capped exponential backoff while the broker is unreachable
/// (not yet up, packet loss, a stale session of the same instance still being torn down).
pub async fn start_agent(trace: &Trace, node: &str, make: impl Fn() -> AgentBuilder) -> Agent {
    let mut backoff = Duration::from_millis(50);
    loop {
        match make().start().await {
            Ok(agent) => {
                trace.record(node, format_args!("connected as {}", agent.instance_id()));
                return agent;
            }
            Err(err) => {
                trace.record(node, format_args!("connect failed: {}", short(&err)));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Sends, retrying transport failures (a unary RPC under loss fails to connect). Returns the
/// accepted message id. A refusal by the broker's rules is a scenario bug and panics.
pub async fn send_with_retry(
    trace: &Trace,
    node: &str,
    agent: &Agent,
    target: &str,
    message_type: &str,
    data: &serde_json::Value,
) -> String {
    let mut backoff = Duration::from_millis(20);
    loop {
        match agent.send(target, message_type, data).await {
            Ok(message_id) => return message_id,
            Err(err) if retryable(&err) => {
                trace.record(node, format_args!("send failed, retrying: {}", short(&err)));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(err) => panic!("{node}: send refused by the broker: {err}"),
        }
    }
}

/// Transport failures; `session_not_connected` while the sender's own transport is being
/// re-established on another broker after a failover; and `not_authorized` while the target
/// is down (authorization requires a live target; the scenarios grant everything they send).
fn retryable(err: &AgentError) -> bool {
    err.status().is_some_and(|s| {
        matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
            || s.message() == "session_not_connected"
            || s.message() == "not_authorized"
    })
}

fn short(err: &AgentError) -> String {
    match err.status() {
        Some(s) => format!("{:?} {}", s.code(), s.message()),
        None => err.to_string(),
    }
}

/// Waits (virtual time) until `done` holds, checking every 50 ms; false after `limit`.
pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// A fresh embedded store, shared by whichever broker nodes a scenario starts.
pub fn memory_store() -> Store {
    Store::from(mas_server::store::MemoryBackend::new(mas_core::store::MemoryStoreConfig::default()))
}

/// After `after`, cuts the link between `a` and `b` both ways for `duration`, then heals it.
/// (madsim delays, rather than drops, stream traffic over a clogged link.)
/// `label` names the link in the trace.
pub async fn partition(
    trace: &Trace,
    label: &str,
    a: &NodeHandle,
    b: &NodeHandle,
    after: Duration,
    duration: Duration,
) {
    let net = madsim::net::NetSim::current();
    tokio::time::sleep(after).await;
    trace.record("nemesis", format_args!("partition {label}"));
    net.clog_link(a.id(), b.id());
    net.clog_link(b.id(), a.id());
    tokio::time::sleep(duration).await;
    net.unclog_link(a.id(), b.id());
    net.unclog_link(b.id(), a.id());
    trace.record("nemesis", "heal partition");
}

/// When a node was killed and when it was restarted (virtual ms, as the trace counts).
#[derive(Debug, Clone, Copy)]
pub struct Crash {
    /// The kill.
    pub killed_ms: f64,
    /// The restart.
    pub restarted_ms: f64,
}

/// After `after`, kills node `label` (`node`), and restarts it `down_for` later.
pub async fn kill_and_restart(
    handle: &Handle,
    trace: &Trace,
    label: &str,
    node: &NodeHandle,
    after: Duration,
    down_for: Duration,
) -> Crash {
    tokio::time::sleep(after).await;
    let killed_ms = trace.now_ms();
    trace.record("nemesis", format_args!("kill {label}"));
    handle.kill(node.id());
    tokio::time::sleep(down_for).await;
    trace.record("nemesis", format_args!("restart {label}"));
    let restarted_ms = trace.now_ms();
    handle.restart(node.id());
    Crash { killed_ms, restarted_ms }
}

/// Runs `future` on a new node named `name` at `ip`.
pub fn spawn_node<F>(handle: &Handle, name: &str, ip: &str, future: F) -> NodeHandle
where
    F: Future<Output = ()> + Send + 'static,
{
    let node = handle.create_node().name(name).ip(ip.parse().expect("scenario ip")).build();
    node.spawn(future);
    node
}
