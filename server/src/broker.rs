//! The broker's shared state: configuration, store, this broker's live sessions, id
//! generation and the shutdown signal. Handlers and session tasks hold an `Arc<Broker>`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use mas_core::ids::{AgentId, BrokerId, InstanceId, random_uuid_v4};
use mas_core::policy::audit::{AuditFilter, AuditRecord};
use mas_core::policy::authz::{Allowance, AuthzPolicy, Denial};
use mas_core::policy::circuit::CircuitConfig;
use mas_core::policy::dlp::{Dlp, DlpSettings};
use mas_core::store::{MemoryStoreConfig, OwnerToken, SessionRef, StoreError};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tokio::sync::watch;

use crate::audit::{AuditReport, AuditTrail};
use crate::clock::Clock;
use crate::config::{AgentDefinition, BrokerConfig};
use crate::metrics::Metrics;
use crate::store::{MemoryBackend, Store};

mod grants;
#[cfg(test)]
mod tests;

pub use grants::GrantChangeError;

/// Key of a live session.
pub type SessionKey = (AgentId, InstanceId);

/// Shared broker state.
#[derive(Debug)]
pub struct Broker {
    config: BrokerConfig,
    /// Authorization; read on every message: the configuration plus the operators' overlay
    /// from the store (see `grants`), or changed in-process by [`Broker::change_authz`].
    authz: RwLock<AuthzPolicy>,
    /// The overlay revision `authz` includes.
    authz_revision: AtomicU64,
    /// The compiled DLP scanner; `None` when the feature is off.
    dlp: Option<Arc<Dlp>>,
    /// Circuit breaker settings; `None` when breakers are off.
    circuit: Option<CircuitConfig>,
    /// File sink and security events.
    audit: AuditTrail,
    store: Store,
    clock: Clock,
    /// This broker's live sessions: owner tokens and when each opened. Touched on connect,
    /// disconnect and the sender check of each RPC; never held across an await.
    sessions: Mutex<BTreeMap<SessionKey, LocalSession>>,
    /// Message and correlation ids; one short lock per message, deterministic under a seed.
    ids: Mutex<ChaCha8Rng>,
    session_seq: AtomicU64,
    /// This broker (stable across restarts) and this process start of it: together they
    /// prefix every owner token, so a restart can recognise its dead predecessor's sessions.
    broker_id: BrokerId,
    broker_tag: u64,
    shutdown: watch::Sender<bool>,
    /// Counts live session tasks; `shutdown` waits for it to reach zero.
    live_tasks: watch::Sender<usize>,
    stats: Counters,
    /// The last shutdown gave up waiting for sessions.
    drain_overran: std::sync::atomic::AtomicBool,
    metrics: Metrics,
    last_verification: Mutex<Option<Verification>>,
}

/// What the last audit verification found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    /// When it ran.
    pub at: mas_core::time::UnixMillis,
    /// Every chain verified.
    pub intact: bool,
    /// Chains checked.
    pub chains: usize,
    /// Live records checked.
    pub records: usize,
}

/// A session on this broker.
#[derive(Debug, Clone)]
struct LocalSession {
    owner: OwnerToken,
    /// Wall-clock milliseconds since the Unix epoch when it opened.
    since: u64,
}

/// Event counters of one broker, for operators and for the simulation's checkers.
#[derive(Debug, Default)]
struct Counters {
    fenced_effects: AtomicU64,
    leases_lost: AtomicU64,
    drain_handed_back: AtomicU64,
}

/// A snapshot of a broker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// Acks, requeues or dead-letterings refused because the session no longer held the entry
    /// (another session had reclaimed it): fencing at work.
    pub fenced_effects: u64,
    /// Sessions ended because their lease could not be renewed.
    pub leases_lost: u64,
    /// Deliveries still unacknowledged when a shutdown's drain deadline passed, handed back
    /// to their queues (not lost: redelivered later, possibly elsewhere).
    pub drain_handed_back: u64,
}

/// How a shutdown's drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Deliveries unacknowledged at the drain deadline, handed back to their queues.
    pub handed_back: u64,
    /// Some session had not ended by the drain deadline plus its margin.
    pub sessions_overran: bool,
}

impl DrainOutcome {
    /// Nothing was cut short.
    pub fn is_clean(&self) -> bool {
        self.handed_back == 0 && !self.sessions_overran
    }
}

/// Why a session could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The (agent, instance) already has a session, here or on another broker.
    AlreadyConnected,
    /// The agent already holds `limits.max_sessions_per_agent` sessions here.
    TooManySessions,
    /// The broker is draining.
    ShuttingDown,
    /// The store could not be reached.
    Store(StoreError),
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configured store could not be reached.
    #[error("cannot reach the store: {0}")]
    Store(StoreError),
    /// A DLP rule does not compile.
    #[error("invalid DLP configuration: {0}")]
    Dlp(mas_core::policy::dlp::RuleError),
}

impl Broker {
    /// Connects the configured store (Redis when configured, else the embedded one) and
    /// builds the broker. Refuses to start when Redis cannot be reached.
    pub async fn connect(config: BrokerConfig) -> Result<Arc<Self>, StartError> {
        #[cfg(not(madsim))]
        if let Some(settings) = &config.redis {
            let backend = crate::store::redis::RedisBackend::connect(settings)
                .await
                .map_err(StartError::Store)?
                .with_max_audit_records(config.gateway.audit.max_records_per_chain)
                .with_max_pending_requests(config.limits.max_pending_requests_per_agent);
            return Self::with_store(config, Store::from(backend))?.with_overlay_applied().await;
        }
        let store = MemoryBackend::new(MemoryStoreConfig {
            max_queue_len: config.max_queue_len,
            max_audit_records: config.gateway.audit.max_records_per_chain,
            max_pending_requests: config.limits.max_pending_requests_per_agent,
            ..Default::default()
        });
        Self::with_store(config, Store::from(store))?.with_overlay_applied().await
    }

    /// Applies the operators' overlay before the broker serves, so a restarted broker never
    /// admits under grants an operator already revoked. (An unreadable overlay is logged and
    /// retried by the follower; the configured policy holds meanwhile.)
    async fn with_overlay_applied(self: Arc<Self>) -> Result<Arc<Self>, StartError> {
        match self.refresh_authz().await {
            Err(GrantChangeError::Store(err)) => return Err(StartError::Store(err)),
            Err(err) => tracing::error!(error = %err, "authorization overlay not applied at start"),
            Ok(_) => {}
        }
        Ok(self)
    }

    /// A broker over an existing store (shared by several brokers in one process, or tests).
    /// Compiles the policy engines once; fails on a DLP rule that does not compile. Starts
    /// the audit writer tasks, so it must be called inside a runtime.
    pub fn with_store(config: BrokerConfig, store: Store) -> Result<Arc<Self>, StartError> {
        let seed = start_seed(&config);
        let mut ids = ChaCha8Rng::seed_from_u64(seed);
        let broker_tag = ids.next_u64();
        let broker_id = config.broker_id();
        let dlp = match config.gateway.features.dlp {
            true => Some(compiled_dlp(&config.gateway.dlp)?),
            false => None,
        };
        let metrics = Metrics::new(config.agents.keys(), store.metrics());
        metrics.set_dead_letter_capacity(config.dead_letter_capacity());
        let refresh = config.admin.authz_refresh();
        let broker = Arc::new(Broker {
            authz: RwLock::new(config.authz_policy()),
            authz_revision: AtomicU64::new(0),
            dlp,
            circuit: config.gateway.circuit(),
            audit: AuditTrail::start(store.clone(), &config.gateway.audit, config.audit_archive_dir().as_deref()),
            config,
            store,
            clock: Clock::new(),
            sessions: Mutex::new(BTreeMap::new()),
            ids: Mutex::new(ids),
            session_seq: AtomicU64::new(0),
            broker_id,
            broker_tag,
            shutdown: watch::channel(false).0,
            live_tasks: watch::channel(0).0,
            stats: Counters::default(),
            drain_overran: std::sync::atomic::AtomicBool::new(false),
            metrics,
            last_verification: Mutex::new(None),
        });
        tokio::spawn(grants::follow_overlay(Arc::downgrade(&broker), refresh));
        Ok(broker)
    }

    /// The configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The broker's clock (deadlines of its sessions; the store keeps its own).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Decides `sender → target` under the current policy.
    pub fn authorize(&self, sender: &AgentId, target: &AgentId, target_live: bool) -> Result<Allowance, Denial> {
        self.authz.read().unwrap_or_else(PoisonError::into_inner).authorize(sender, target, target_live)
    }

    /// Changes grants, blocks or roles of this broker alone, in process, for tests and
    /// embedders; recorded in the security chain with `description`. Not persisted: the
    /// operators' changes go through [`Broker::change_grants`], which every broker on the
    /// store applies.
    pub fn change_authz<T>(&self, description: &str, change: impl FnOnce(&mut AuthzPolicy) -> T) -> T {
        let result = {
            let mut policy = self.authz.write().unwrap_or_else(PoisonError::into_inner);
            change(&mut policy)
        };
        tracing::info!(change = description, "authorization policy changed");
        self.audit.security_event("authz_changed", serde_json::json!({ "change": description }), self.clock.now().wall);
        result
    }

    /// Circuit breaker settings, when breakers are on.
    pub fn circuit(&self) -> Option<&CircuitConfig> {
        self.circuit.as_ref()
    }

    /// The audit trail (file sink, security events).
    pub fn audit(&self) -> &AuditTrail {
        &self.audit
    }

    /// Verifies every audit chain in the store (see [`crate::audit::verify`]), and remembers
    /// the verdict for the status page.
    pub async fn verify_audit(&self) -> Result<AuditReport, StoreError> {
        let report = crate::audit::verify(&self.store, self.config.agents.keys(), self.audit.archive_dir()).await?;
        let verdict = Verification {
            at: self.clock.now().wall,
            intact: report.is_intact(),
            chains: report.chains.len(),
            records: report.records(),
        };
        *self.last_verification.lock().unwrap_or_else(PoisonError::into_inner) = Some(verdict);
        Ok(report)
    }

    /// The verdict of the last [`Broker::verify_audit`] on this broker, if any.
    pub fn last_verification(&self) -> Option<Verification> {
        *self.last_verification.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Audit records matching `filter`, oldest first, at most `limit`.
    pub async fn query_audit(&self, filter: &AuditFilter, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        crate::audit::query(&self.store, self.config.agents.keys(), filter, limit).await
    }

    /// The DLP scanner, if DLP is on.
    pub fn dlp(&self) -> Option<&Dlp> {
        self.dlp.as_deref()
    }

    /// The broker's Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The broker's counters.
    pub fn stats(&self) -> BrokerStats {
        BrokerStats {
            fenced_effects: self.stats.fenced_effects.load(Ordering::Relaxed),
            leases_lost: self.stats.leases_lost.load(Ordering::Relaxed),
            drain_handed_back: self.stats.drain_handed_back.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_fenced(&self, n: u64) {
        self.stats.fenced_effects.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn count_drain_cut_short(&self, handed_back: u64) {
        self.stats.drain_handed_back.fetch_add(handed_back, Ordering::Relaxed);
    }

    pub(crate) fn count_lease_lost(&self) {
        self.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
    }

    /// The allowlist entry of `agent`, if it is allowlisted.
    pub fn agent(&self, agent: &AgentId) -> Option<&AgentDefinition> {
        self.config.agents.get(agent)
    }

    fn rng(&self) -> MutexGuard<'_, ChaCha8Rng> {
        self.ids.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh message id (uuid v4 text).
    pub fn next_message_id(&self) -> String {
        random_uuid_v4(&mut *self.rng())
    }

    /// A fresh correlation id for a request of `requester`: 32 hex characters, a dot, and the
    /// requester's id. Clients treat it as opaque; the broker reads the requester back out of
    /// it to find the request in the requester's store partition (one Redis Cluster slot).
    pub fn next_correlation_id(&self, requester: &AgentId) -> String {
        let mut bytes = [0u8; 16];
        self.rng().fill_bytes(&mut bytes);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("{hex}.{requester}")
    }

    /// The (agent, instance) of every session on this broker, and when it opened (wall-clock
    /// milliseconds since the Unix epoch).
    pub fn local_sessions(&self) -> Vec<(SessionKey, u64)> {
        self.sessions().iter().map(|(key, session)| (key.clone(), session.since)).collect()
    }

    fn sessions(&self) -> MutexGuard<'_, BTreeMap<SessionKey, LocalSession>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session here and takes its lease in the store (refused if any broker holds
    /// it). Returns the session and its delivery seed.
    pub async fn open_session(&self, key: SessionKey) -> Result<(SessionRef, u64), OpenError> {
        if *self.shutdown.borrow() {
            return Err(OpenError::ShuttingDown);
        }
        let seq = self.session_seq.fetch_add(1, Ordering::Relaxed);
        let owner = OwnerToken::for_session(&self.broker_id, self.broker_tag, &key.0, &key.1, seq);
        {
            let mut sessions = self.sessions();
            if sessions.contains_key(&key) {
                return Err(OpenError::AlreadyConnected);
            }
            let held = sessions.keys().filter(|(agent, _)| *agent == key.0).count();
            if held >= self.config.limits.max_sessions_per_agent {
                return Err(OpenError::TooManySessions);
            }
            let since = self.clock.now().wall.0;
            sessions.insert(key.clone(), LocalSession { owner: owner.clone(), since });
        }
        let session = SessionRef { agent: key.0.clone(), instance: key.1.clone(), owner: owner.clone() };
        match self.store.acquire_lease(&session, self.config.session_lease.ttl()).await {
            Ok(true) => {
                self.live_tasks.send_modify(|n| *n += 1);
                self.metrics.session_changed(&key.0, 1);
                Ok((session, self.broker_tag ^ seq.rotate_left(32)))
            }
            Ok(false) => {
                self.forget(&key, &owner);
                Err(OpenError::AlreadyConnected)
            }
            Err(err) => {
                self.forget(&key, &owner);
                // The store may have taken the lease and lost only its answer. Left alone, that
                // lease would refuse the agent's retry (`instance_already_connected`) until it
                // expired; the release is owner-checked, so it can only drop our own.
                if let Err(release) = self.store.release_lease(&session).await {
                    tracing::debug!(error = %release, "could not release a lease of a failed open; it expires on its own");
                }
                Err(OpenError::Store(err))
            }
        }
    }

    fn forget(&self, key: &SessionKey, owner: &OwnerToken) {
        let mut sessions = self.sessions();
        if sessions.get(key).is_some_and(|session| &session.owner == owner) {
            sessions.remove(key);
        }
    }

    /// Deregisters a session that `open_session` registered, and drops its lease.
    pub async fn close_session(&self, session: &SessionRef) {
        self.forget(&(session.agent.clone(), session.instance.clone()), &session.owner);
        if let Err(err) = self.store.release_lease(session).await {
            tracing::warn!(agent = %session.agent, error = %err, "lease release failed; it expires on its own");
        }
        self.live_tasks.send_modify(|n| *n = n.saturating_sub(1));
        self.metrics.session_changed(&session.agent, -1);
    }

    /// Whether `key` has a live session: here, or (leased) on another broker sharing the store.
    pub async fn is_connected(&self, key: &SessionKey) -> Result<bool, StoreError> {
        if self.sessions().contains_key(key) {
            return Ok(true);
        }
        self.store.instance_live(&key.0, &key.1).await
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
        self.metrics.draining();
        let mut live = self.live_tasks.subscribe();
        let limit = self.config.delivery.drain_timeout() + Duration::from_secs(2);
        let all_ended = live.wait_for(|n| *n == 0);
        if tokio::time::timeout(limit, all_ended).await.is_err() {
            self.drain_overran.store(true, Ordering::Relaxed);
            tracing::warn!("sessions still open after the drain limit; stopping anyway");
        }
    }

    /// How the last shutdown's drain went: clean when every delivery was settled by its agent
    /// before the deadline and every session ended in time.
    pub fn drain_outcome(&self) -> DrainOutcome {
        DrainOutcome {
            handed_back: self.stats.drain_handed_back.load(Ordering::Relaxed),
            sessions_overran: self.drain_overran.load(Ordering::Relaxed),
        }
    }
}

/// Compiles the DLP rules. The default rule set is compiled once per process and shared:
/// compiling a few dozen regexes is milliseconds of work that every broker start (and every
/// simulated broker restart) would otherwise repeat.
fn compiled_dlp(settings: &DlpSettings) -> Result<Arc<Dlp>, StartError> {
    static DEFAULT: std::sync::OnceLock<Arc<Dlp>> = std::sync::OnceLock::new();
    if *settings == DlpSettings::default() {
        if let Some(dlp) = DEFAULT.get() {
            return Ok(dlp.clone());
        }
        let dlp = Arc::new(Dlp::new(settings).map_err(StartError::Dlp)?);
        return Ok(DEFAULT.get_or_init(|| dlp).clone());
    }
    Ok(Arc::new(Dlp::new(settings).map_err(StartError::Dlp)?))
}

/// The seed of this broker start: the configured seed mixed with the wall clock, the process id
/// and the listen address, so that a restarted broker, or two brokers started at once, never
/// repeat ids. Under simulation clock and pid are virtual and fixed, so runs stay reproducible.
fn start_seed(config: &BrokerConfig) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let addr = config
        .listen_addr
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    [config.seed.unwrap_or(0), nanos, u64::from(std::process::id()), addr]
        .into_iter()
        .fold(0, |acc, x| splitmix(acc ^ x))
}

/// One step of splitmix64: a cheap, well-mixing bijection for combining seed material.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
