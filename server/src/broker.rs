//! The broker's shared state: configuration, store, live sessions, id generation and the
//! shutdown signal. Handlers and session tasks hold an `Arc<Broker>`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mas_core::ids::{AgentId, InstanceId, random_uuid_v4};
use mas_core::store::{MemoryStoreConfig, OwnerToken};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::{AgentDefinition, BrokerConfig};
use crate::store::Store;

/// Key of a live session.
pub type SessionKey = (AgentId, InstanceId);

/// Shared broker state.
#[derive(Debug)]
pub struct Broker {
    config: BrokerConfig,
    store: Store,
    clock: Clock,
    /// Live sessions and their owner tokens. Touched on connect, disconnect and the sender
    /// check of each send; never held across an await.
    sessions: Mutex<BTreeMap<SessionKey, OwnerToken>>,
    /// Message ids; one short lock per message, deterministic under a fixed seed.
    ids: Mutex<ChaCha8Rng>,
    session_seq: AtomicU64,
    broker_tag: u64,
    shutdown: watch::Sender<bool>,
    /// Counts live session tasks; `shutdown` waits for it to reach zero.
    live_tasks: watch::Sender<usize>,
}

/// Why a session could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// The (agent, instance) already has a session.
    AlreadyConnected,
    /// The broker is draining.
    ShuttingDown,
}

impl Broker {
    /// A broker with an empty embedded store.
    pub fn new(config: BrokerConfig) -> Arc<Self> {
        let store =
            Store::new(MemoryStoreConfig { max_queue_len: config.max_queue_len, ..MemoryStoreConfig::default() });
        Self::with_store(config, store)
    }

    /// A broker over an existing store (shared with tests or other brokers in one process).
    pub fn with_store(config: BrokerConfig, store: Store) -> Arc<Self> {
        let seed = config.seed.unwrap_or_else(entropy_seed);
        let mut ids = ChaCha8Rng::seed_from_u64(seed);
        let broker_tag = ids.next_u64();
        Arc::new(Broker {
            config,
            store,
            clock: Clock::new(),
            sessions: Mutex::new(BTreeMap::new()),
            ids: Mutex::new(ids),
            session_seq: AtomicU64::new(0),
            broker_tag,
            shutdown: watch::channel(false).0,
            live_tasks: watch::channel(0).0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The allowlist entry of `agent`, if it is allowlisted.
    pub fn agent(&self, agent: &AgentId) -> Option<&AgentDefinition> {
        self.config.agents.get(agent)
    }

    /// A fresh message id (uuid v4 text).
    pub fn next_message_id(&self) -> String {
        random_uuid_v4(&mut *self.ids.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn sessions(&self) -> MutexGuard<'_, BTreeMap<SessionKey, OwnerToken>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session; returns its owner token and delivery seed.
    pub fn open_session(&self, key: SessionKey) -> Result<(OwnerToken, u64), OpenError> {
        if *self.shutdown.borrow() {
            return Err(OpenError::ShuttingDown);
        }
        let mut sessions = self.sessions();
        if sessions.contains_key(&key) {
            return Err(OpenError::AlreadyConnected);
        }
        let seq = self.session_seq.fetch_add(1, Ordering::Relaxed);
        let owner = OwnerToken::new(format!("{:016x}-{seq}", self.broker_tag));
        sessions.insert(key, owner.clone());
        self.live_tasks.send_modify(|n| *n += 1);
        Ok((owner, self.broker_tag ^ seq.rotate_left(32)))
    }

    /// Removes a session registration (only if `owner` still holds it).
    pub fn close_session(&self, key: &SessionKey, owner: &OwnerToken) {
        let mut sessions = self.sessions();
        if sessions.get(key) == Some(owner) {
            sessions.remove(key);
        }
        drop(sessions);
        self.live_tasks.send_modify(|n| *n = n.saturating_sub(1));
    }

    /// Whether `key` has a live session on this broker.
    pub fn is_connected(&self, key: &SessionKey) -> bool {
        self.sessions().contains_key(key)
    }

    /// Whether the broker is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// A receiver that turns `true` when shutdown begins.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Begins a graceful shutdown: no new sessions or messages; every session drains (waits
    /// for in-flight acks up to the drain timeout, then hands the rest back). Resolves when all
    /// sessions have ended, or after the drain timeout plus a margin.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let mut live = self.live_tasks.subscribe();
        let limit = self.config.delivery.drain_timeout() + Duration::from_secs(2);
        let all_ended = live.wait_for(|n| *n == 0);
        if tokio::time::timeout(limit, all_ended).await.is_err() {
            tracing::warn!("sessions still open after the drain limit; stopping anyway");
        }
    }
}

/// A seed for production runs without a configured one: wall-clock nanoseconds mixed with the
/// process id. (Under simulation the clock is virtual, so this is deterministic there too.)
fn entropy_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(40)
}
