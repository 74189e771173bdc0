//! The Redis backend: every domain step is one Lua script (one round trip, atomic), keys are
//! hash-tagged per agent so each script touches one Redis Cluster slot.
//!
//! Key layout (`A` = agent id, `I` = instance id, `C` = correlation id):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `mas:{A}:work` | stream, group `mas` | A's shared work queue; entry fields `e` (envelope), `a` (attempt) |
//! | `mas:{A}:work:delayed` | zset | retries waiting for their backoff; score = ready time (ms, Redis clock) |
//! | `mas:{A}:replies:{I}` (+ `:delayed`) | stream (+ zset) | replies for instance I; expire an hour after I's lease would (renewals push it on), deleted when I's session ends with none waiting |
//! | `mas:{A}:lease:{I}` | string, PX ttl | owner token of the live session of (A, I) |
//! | `mas:{A}:owners` | zset | owner token → lease deadline; decides whose claimed work is dead |
//! | `mas:{A}:dlq` | stream | dead letters: `e`, `reason`, `attempts`, `at`; at most `redis.max_dead_letters` |
//! | `mas:{A}:dlq:dropped` | integer | dead letters dropped (oldest first) at the bound |
//! | `mas:{A}:state`, `mas:{A}:state:rev` | hash, string | agent state and its revision |
//! | `mas:{A}:rate` | hash `m`, `h` | GCRA arrival times (µs, Redis clock) of sender A's minute and hour windows |
//! | `mas:{A}:pending:{C}` | string JSON, PX ttl+60 s | a request of A awaiting its reply |
//! | `mas:{A}:pending_index` | zset | A's pending correlation ids → when each is forgotten; bounds them |
//! | `mas:{A}:receipt:{C}` | string JSON, PX remaining | the committed reply, for idempotent retries |
//! | `mas:{A}:circuit` | hash | A's circuit breaker (state, failures, window start, open until, probes, successes) |
//! | `mas:{A}:audit`, `mas:{A}:audit:head` | stream (`r` = record JSON; ids `0-n`, n = the record's number in the chain), string | A's audit chain (live part) and its head hash |
//! | `mas:{A}:audit:checkpoint` | hash `archived`, `base` | records archived out of the chain, hash of the last one |
//! | `mas:{#audit}:epoch` | string | this database's epoch: names its archive directory |
//! | `mas:{#security}:audit`, `…:audit:head` | stream, string | the security-event chain (`#` is never in an agent id) |
//! | `mas:{#admin}:authz` | hash `rev`, `doc` | the operators' authorization overlay (JSON) and its revision |
//! | channel `mas:notify:{A}` | pub/sub | "A has new ready work": wakes waiting sessions (not published when a hand-off claimed all of it, see `handoff.rs`) |
//!
//! Settled entries are XACKed and XDELed at once, so streams hold only live work.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use mas_core::delivery::Outcome;
use mas_core::delivery::{EntryId, QueuedMessage, StoreEffect};
use mas_core::ids::{AgentId, InstanceId};
use mas_core::policy::audit::AuditRecord;
use mas_core::policy::circuit::{CircuitConfig, CircuitPhase};
use mas_core::policy::ratelimit::{Grant, Limited, Limits, Window};
use mas_core::store::{
    Admission, Admitted, Correlation, PendingRequest, QueueGauges, QueueKey, REQUEST_EXPIRED_GRACE, ReplyCommit,
    ReplyError, ReplyReceipt, SessionRef, StateError, StateSnapshot, StoreError, TargetGate, envelope_timestamp,
};
use mas_core::time::Now;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, ScriptInvocation, Value};

use super::wake::{ClaimCursor, Claimed, Wake, claim_waiting};
use super::{PendingAhead, requeue_delay};

mod audit;
mod authz;
mod dead_letters;
mod fresh_gates;
mod gather;
mod handoff;
mod opened;
mod operator;
mod replies;

const SCRIPTS: &str = include_str!("scripts.lua");

/// Redis connection settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://…` for TLS.
    pub url: String,
    /// For `rediss://`: the CA (PEM) the server's certificate must chain to; the system's
    /// roots when absent.
    #[serde(default)]
    pub tls_ca_path: Option<std::path::PathBuf>,
    /// Multiplexed connections used round-robin (default 4).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long to wait for a connection (default 5 000 ms).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long to wait for a reply (default 5 000 ms).
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Most entries per queue (default 100 000); beyond it sends get `queue_full`.
    #[serde(default = "default_max_queue_len")]
    pub max_queue_len: usize,
    /// Most dead letters kept per agent (default 10 000, as the embedded store); beyond it the
    /// oldest are dropped and counted in `mas:{A}:dlq:dropped`.
    #[serde(default = "default_max_dead_letters")]
    pub max_dead_letters: usize,
}

fn default_pool_size() -> usize {
    4
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_response_timeout_ms() -> u64 {
    5_000
}
fn default_max_queue_len() -> usize {
    100_000
}
fn default_max_dead_letters() -> usize {
    mas_core::store::MemoryStoreConfig::default().max_dead_letters
}

impl RedisSettings {
    /// Settings for `url` with defaults for the rest.
    pub fn new(url: impl Into<String>) -> Self {
        RedisSettings {
            url: url.into(),
            tls_ca_path: None,
            pool_size: default_pool_size(),
            connect_timeout_ms: default_connect_timeout_ms(),
            response_timeout_ms: default_response_timeout_ms(),
            max_queue_len: default_max_queue_len(),
            max_dead_letters: default_max_dead_letters(),
        }
    }
}

struct Scripts {
    enqueue: Script,
    claim: Script,
    own_pending: Script,
    settle: Script,
    release: Script,
    lease_acquire: Script,
    lease_renew: Script,
    lease_release: Script,
    live: Script,
    open_request: Script,
    correlation: Script,
    commit_replies: Script,
    state_get: Script,
    state_update: Script,
    state_reset: Script,
    rate_admit: Script,
    gate: Script,
    queue_gauges: Script,
    admit: Script,
    audit_append: Script,
    audit_tail: Script,
    audit_trim: Script,
    dlq_list: Script,
    dlq_redrive: Script,
    authz_get: Script,
    authz_put: Script,
    rate_backlog: Script,
    lease_revoke: Script,
}

impl Scripts {
    fn load() -> Self {
        let mut sections = BTreeMap::new();
        let mut name = None;
        for line in SCRIPTS.lines() {
            if let Some(n) = line.strip_prefix("--@") {
                name = Some(n.trim().to_string());
            } else if let Some(n) = &name {
                sections.entry(n.clone()).or_insert_with(String::new).push_str(&format!("{line}\n"));
            }
        }
        // The file is compiled in; a missing section is a build defect caught by every test.
        let section = |n: &str| sections.get(n).cloned().unwrap_or_else(|| panic!("script {n} missing"));
        // `--#include _lib` lines pull in a library section (Lua scripts cannot share
        // functions); a library may include another, and each goes in once, where it is first
        // included.
        fn expand(name: &str, section: &dyn Fn(&str) -> String, included: &mut Vec<String>, body: &mut String) {
            for line in section(name).lines() {
                match line.strip_prefix("--#include ").map(str::trim) {
                    Some(lib) if included.iter().any(|done| done == lib) => {}
                    Some(lib) => {
                        included.push(lib.to_string());
                        expand(lib, section, included, body);
                    }
                    None => {
                        body.push_str(line);
                        body.push('\n');
                    }
                }
            }
        }
        let get = |n: &str| {
            let mut body = String::new();
            expand(n, &section, &mut Vec::new(), &mut body);
            Script::new(&body)
        };
        Scripts {
            enqueue: get("enqueue"),
            claim: get("claim"),
            own_pending: get("own_pending"),
            settle: get("settle"),
            release: get("release"),
            lease_acquire: get("lease_acquire"),
            lease_renew: get("lease_renew"),
            lease_release: get("lease_release"),
            live: get("live"),
            open_request: get("open_request"),
            correlation: get("correlation"),
            commit_replies: get("commit_replies"),
            state_get: get("state_get"),
            state_update: get("state_update"),
            state_reset: get("state_reset"),
            rate_admit: get("rate_admit"),
            gate: get("gate"),
            queue_gauges: get("queue_gauges"),
            admit: get("admit"),
            audit_append: get("audit_append"),
            audit_tail: get("audit_tail"),
            audit_trim: get("audit_trim"),
            dlq_list: get("dlq_list"),
            dlq_redrive: get("dlq_redrive"),
            authz_get: get("authz_get"),
            authz_put: get("authz_put"),
            rate_backlog: get("rate_backlog"),
            lease_revoke: get("lease_revoke"),
        }
    }
}

/// A client for the configured URL; with `tls_ca_path`, TLS trusts exactly that CA.
///
/// Every connection sets `TCP_NODELAY`: the hot path is one small script call per batch, and
/// Nagle's algorithm would hold each one back until the previous reply's ACK (tens of ms).
fn client(settings: &RedisSettings) -> Result<redis::Client, StoreError> {
    use redis::IntoConnectionInfo;

    mas_net::tls::install_crypto_provider();
    let info = settings
        .url
        .as_str()
        .into_connection_info()
        .map_err(unavailable)?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    match &settings.tls_ca_path {
        None => redis::Client::open(info).map_err(unavailable),
        Some(path) => {
            let root_cert = std::fs::read(path)
                .map_err(|e| StoreError::Unavailable(format!("cannot read Redis CA {}: {e}", path.display())))?;
            let certificates = redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) };
            redis::Client::build_with_tls(info, certificates).map_err(unavailable)
        }
    }
}

fn key(agent: &AgentId, rest: &str) -> String {
    format!("mas:{{{agent}}}:{rest}")
}

fn channel(agent: &AgentId) -> String {
    format!("mas:notify:{agent}")
}

fn unavailable(err: RedisError) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

/// Wake-ups from the `mas:notify:*` channels, per agent.
#[derive(Default)]
struct Wakers {
    by_agent: Mutex<BTreeMap<String, Weak<Wake>>>,
    /// True while the subscription is live, so that no wake-up can be missed: idle claims then
    /// need no polling of their own (see [`RedisBackend::claim`]).
    subscribed: AtomicBool,
}

impl Wakers {
    fn get(&self, agent: &AgentId) -> Arc<Wake> {
        let mut map = self.by_agent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get(agent.as_str()).and_then(Weak::upgrade) {
            return n;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let n = Arc::new(Wake::default());
        map.insert(agent.to_string(), Arc::downgrade(&n));
        n
    }

    fn wake(&self, agent: &str) {
        let map = self.by_agent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get(agent).and_then(Weak::upgrade) {
            n.wake();
        }
    }

    /// Wakes every waiting claim: on a change of the subscription, work published while it
    /// was down must be looked for now.
    fn wake_all(&self) {
        let map = self.by_agent.lock().unwrap_or_else(PoisonError::into_inner);
        for n in map.values().filter_map(Weak::upgrade) {
            n.wake();
        }
    }

    fn subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    fn set_subscribed(&self, live: bool) {
        self.subscribed.store(live, Ordering::Release);
        self.wake_all();
    }
}

/// The Redis store. Cheap to clone.
#[derive(Clone)]
pub struct RedisBackend {
    pool: Arc<Vec<ConnectionManager>>,
    next: Arc<AtomicUsize>,
    scripts: Arc<Scripts>,
    wakers: Arc<Wakers>,
    max_queue_len: usize,
    max_dead_letters: usize,
    max_pending_requests: usize,
    /// Most records one audit chain may hold.
    max_audit_records: usize,
    /// This database's epoch (see `Store::epoch`), kept at `mas:{#audit}:epoch`.
    epoch: Arc<str>,
    writers: Arc<audit::ChainWriters>,
    /// Concurrent gate reads of one target, gathered (see `gather.rs`).
    gates: Arc<gather::Gather<(), Result<TargetGate, StoreError>>>,
    /// Targets whose gate read all clear moments ago (see `fresh_gates.rs`).
    fresh_gates: Arc<fresh_gates::FreshGates>,
    /// Concurrent rate-limit steps of one sender, gathered: (limits, messages) each.
    rates: Arc<gather::Gather<(Limits, usize), Result<Grant, StoreError>>>,
    /// When each queue was last swept for dead owners' work.
    reclaims: Arc<Reclaims>,
    /// Requests this broker opened and has not seen answered (see `opened.rs`).
    opened: Arc<opened::OpenedRequests>,
    /// The seats of this broker's sessions, for hand-offs (see `handoff.rs`).
    seats: Arc<handoff::Seats>,
}

/// How often each queue (an agent's work, an instance's replies) is swept for work held by
/// expired sessions, by whichever of this broker's sessions claims from it first.
const RECLAIM_EVERY: Duration = Duration::from_millis(500);

/// When each queue was last swept for dead owners' work: an agent's work queue at most every
/// `RECLAIM_EVERY` by whichever of this broker's sessions claims from it first, a session's
/// replies queue at most every `RECLAIM_EVERY` by that session — and both at a session's first
/// claim, so a restarted broker's session takes its dead predecessor's work at once. Entries
/// older than `RECLAIM_EVERY * 20` are pruned at most that often, so neither the maps nor the
/// pruning grow with the number of sessions per claim (a pruned session merely sweeps once
/// more). Lookups borrow the agent id and owner token: a claim allocates only when it sweeps.
#[derive(Default)]
struct Reclaims {
    inner: Mutex<ReclaimTimes>,
}

#[derive(Default)]
struct ReclaimTimes {
    /// Last sweep of each agent's work queue.
    work: std::collections::HashMap<String, tokio::time::Instant>,
    /// Last sweep of each session's replies queue, by owner token.
    replies: std::collections::HashMap<String, tokio::time::Instant>,
    pruned: Option<tokio::time::Instant>,
}

impl Reclaims {
    /// Whether `session`'s claim sweeps (its agent's work queue, its replies queue); records
    /// the sweeps it makes.
    fn due(&self, session: &SessionRef) -> (bool, bool) {
        let mut times = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        let keep = RECLAIM_EVERY * 20;
        if times.pruned.is_none_or(|at| now.duration_since(at) >= keep) {
            times.work.retain(|_, at| now.duration_since(*at) < keep);
            times.replies.retain(|_, at| now.duration_since(*at) < keep);
            times.pruned = Some(now);
        }
        let stale = |at: Option<&tokio::time::Instant>| at.is_none_or(|at| now.duration_since(*at) >= RECLAIM_EVERY);
        let first = !times.replies.contains_key(session.owner.as_str());
        let replies = stale(times.replies.get(session.owner.as_str()));
        let work = first || stale(times.work.get(session.agent.as_str()));
        if replies {
            times.replies.insert(session.owner.to_string(), now);
        }
        if work {
            times.work.insert(session.agent.to_string(), now);
        }
        (work, replies)
    }
}

/// Longest sleep between claims when no wake-up arrives while the subscription is down (a
/// notification may have been lost). While it is live, a claim waits its whole `max_wait`.
const IDLE_POLL: Duration = Duration::from_millis(250);

/// Pauses between attempts to subscribe again after the subscription ended, doubling.
const RESUBSCRIBE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

impl RedisBackend {
    /// Connects, checks the server answers `PING`, and starts listening for wake-ups.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        let client = client(settings)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
            .set_response_timeout(Some(Duration::from_millis(settings.response_timeout_ms)));
        let mut pool = Vec::with_capacity(settings.pool_size.max(1));
        for _ in 0..settings.pool_size.max(1) {
            let mut con = client.get_connection_manager_with_config(config.clone()).await.map_err(unavailable)?;
            let _: String = redis::cmd("PING").query_async(&mut con).await.map_err(unavailable)?;
            pool.push(con);
        }
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut pool[0]).await.map_err(unavailable)?;
        check_server_version(&info)?;
        // The first broker to connect names the database's epoch; every later one reads it.
        let _: i64 = redis::cmd("SETNX")
            .arg("mas:{#audit}:epoch")
            .arg(super::fresh_epoch())
            .query_async(&mut pool[0])
            .await
            .map_err(unavailable)?;
        let epoch: String =
            redis::cmd("GET").arg("mas:{#audit}:epoch").query_async(&mut pool[0]).await.map_err(unavailable)?;
        let wakers = Arc::new(Wakers::default());
        let pubsub = subscribe(&client).await.map_err(unavailable)?;
        wakers.set_subscribed(true);
        tokio::spawn(listen(client, pubsub, Arc::downgrade(&wakers)));
        Ok(RedisBackend {
            pool: Arc::new(pool),
            next: Arc::new(AtomicUsize::new(0)),
            scripts: Arc::new(Scripts::load()),
            wakers,
            max_queue_len: settings.max_queue_len,
            max_dead_letters: settings.max_dead_letters,
            max_pending_requests: mas_core::store::MemoryStoreConfig::default().max_pending_requests,
            max_audit_records: mas_core::store::MemoryStoreConfig::default().max_audit_records,
            writers: Arc::default(),
            gates: Arc::default(),
            fresh_gates: Arc::default(),
            rates: Arc::default(),
            epoch: epoch.into(),
            reclaims: Arc::default(),
            opened: Arc::default(),
            seats: Arc::default(),
        })
    }

    pub(super) fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Sets the bound of each audit chain (`gateway.audit.max_records_per_chain`).
    pub fn with_max_audit_records(mut self, max: usize) -> Self {
        self.max_audit_records = max;
        self
    }

    /// Bounds the requests of one requester awaiting replies (`limits.max_pending_requests_per_agent`).
    pub fn with_max_pending_requests(mut self, max: usize) -> Self {
        self.max_pending_requests = max;
        self
    }

    fn con(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        self.pool[i].clone()
    }

    fn queue_keys(queue: &QueueKey) -> (String, String) {
        let stream = match queue {
            QueueKey::Work(agent) => key(agent, "work"),
            QueueKey::Replies(agent, instance) => key(agent, &format!("replies:{instance}")),
        };
        let delayed = format!("{stream}:delayed");
        (stream, delayed)
    }

    fn session_keys(session: &SessionRef) -> [String; 4] {
        let (work, work_delayed) = Self::queue_keys(&QueueKey::Work(session.agent.clone()));
        let (replies, replies_delayed) =
            Self::queue_keys(&QueueKey::Replies(session.agent.clone(), session.instance.clone()));
        [work, work_delayed, replies, replies_delayed]
    }

    fn lease_key(agent: &AgentId, instance: &InstanceId) -> String {
        key(agent, &format!("lease:{instance}"))
    }

    pub(super) async fn enqueue(&self, queue: &QueueKey, envelope: Arc<str>) -> Result<EntryId, StoreError> {
        let (stream, delayed) = Self::queue_keys(queue);
        let result: Result<String, RedisError> = self
            .scripts
            .enqueue
            .key(stream)
            .key(delayed)
            .arg(&*envelope)
            .arg(self.max_queue_len)
            .arg(channel(queue.agent()))
            .invoke_async(&mut self.con())
            .await;
        match result {
            Ok(id) => Ok(EntryId::new(format!("w:{id}"))),
            Err(err) if err.to_string().contains("queue_full") => Err(StoreError::QueueFull),
            Err(err) => Err(unavailable(err)),
        }
    }

    pub(super) async fn claim(
        &self,
        session: &SessionRef,
        max: usize,
        max_wait: Duration,
        cursor: ClaimCursor,
    ) -> Result<Claimed, StoreError> {
        let waker = self.wakers.get(&session.agent);
        // Polling only covers wake-ups that may have been lost: with 10 000 idle sessions, a
        // poll every 250 ms each was 40 000 script calls a second doing nothing.
        let poll = if self.wakers.subscribed() { max_wait } else { IDLE_POLL };
        let sitting = self.seats.sit(session, max);
        let handed = Some(sitting.handed());
        claim_waiting(waker, handed, cursor, max, max_wait, poll, || self.claim_seated(&sitting, max)).await
    }

    /// Whether the wake-up subscription is live (it is made again after it breaks).
    pub(super) fn wakeups_live(&self) -> bool {
        self.wakers.subscribed()
    }

    /// One attempt of a seated claim: what a hand-off claimed for it, or its own store step.
    async fn claim_seated(&self, sitting: &handoff::Sitting, max: usize) -> handoff::ClaimAnswer {
        let answer = match sitting.before_asking().await {
            handoff::Before::Handed(answer) => answer,
            handoff::Before::Ask => self.claim_once(sitting.session(), max).await,
        };
        if matches!(&answer, Ok((batch, _)) if batch.is_empty()) {
            sitting.found_nothing();
        }
        answer
    }

    /// The keys of a claim for `session`, in the order the `_claim` library takes them.
    fn claim_keys(session: &SessionRef) -> [String; 6] {
        let [work, work_delayed, replies, replies_delayed] = Self::session_keys(session);
        let lease = Self::lease_key(&session.agent, &session.instance);
        [lease, key(&session.agent, "owners"), work, work_delayed, replies, replies_delayed]
    }

    /// Adds a hand-off's keys and arguments to a step's invocation (after the step's own
    /// keys, at the step's fixed argument positions), or the "no hand-off" arguments.
    fn add_hand_off(&self, invocation: &mut ScriptInvocation<'_>, hand_off: Option<&handoff::HandOff>) {
        match hand_off {
            Some(hand_off) => {
                let session = hand_off.session();
                for key in Self::claim_keys(session) {
                    invocation.key(key);
                }
                let (work, replies) = self.reclaims.due(session);
                let flags = format!("{}{}", u8::from(work), u8::from(replies));
                invocation.arg(session.owner.as_str()).arg(hand_off.room()).arg(flags);
            }
            None => {
                invocation.arg("").arg(0).arg("00");
            }
        }
    }

    async fn claim_once(
        &self,
        session: &SessionRef,
        max: usize,
    ) -> Result<(Vec<QueuedMessage>, Option<Duration>), StoreError> {
        let (reclaim_work, reclaim_replies) = self.reclaims.due(session);
        let mut invocation = self.scripts.claim.prepare_invoke();
        for key in Self::claim_keys(session) {
            invocation.key(key);
        }
        let reply: Vec<Value> = invocation
            .arg(session.owner.as_str())
            .arg(max)
            .arg(if reclaim_work { "1" } else { "0" })
            .arg(channel(&session.agent))
            .arg(if reclaim_replies { "1" } else { "0" })
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        claim_answer(reply)
    }

    pub(super) async fn own_pending(&self, session: &SessionRef, max: usize) -> Result<Vec<QueuedMessage>, StoreError> {
        let [work, _, replies, _] = Self::session_keys(session);
        let reply: Vec<Value> = self
            .scripts
            .own_pending
            .key(work)
            .key(replies)
            .arg(session.owner.as_str())
            .arg(max)
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        Ok(queued_messages(reply))
    }

    pub(super) async fn apply(
        &self,
        session: &SessionRef,
        effects: Vec<StoreEffect>,
        now: Now,
        circuit: Option<&CircuitConfig>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        if effects.is_empty() {
            return Ok(Vec::new());
        }
        let [work, work_delayed, replies, replies_delayed] = Self::session_keys(session);
        let mut invocation = self.scripts.settle.prepare_invoke();
        invocation.key(work).key(work_delayed).key(replies).key(replies_delayed).key(key(&session.agent, "dlq"));
        invocation.key(key(&session.agent, "circuit")).key(key(&session.agent, "dlq:dropped"));
        invocation.arg(session.owner.as_str()).arg(channel(&session.agent));
        for arg in audit::circuit_args(circuit) {
            invocation.arg(arg);
        }
        invocation.arg(self.max_dead_letters);
        for effect in &effects {
            let delay_ms = u64::try_from(requeue_delay(effect, now).as_millis()).unwrap_or(u64::MAX);
            let (tag, id) = effect.entry().0.split_once(':').unwrap_or(("w", &effect.entry().0));
            let (op, attempt, reason) = match effect {
                StoreEffect::Ack { .. } => ("ack", 0, ""),
                StoreEffect::Requeue { attempt, .. } => ("requeue", *attempt, ""),
                StoreEffect::DeadLetter { attempts, reason, .. } => ("dead", *attempts, reason.as_str()),
            };
            let outcome = match effect.circuit_outcome() {
                Some(Outcome::Success) => "s",
                Some(Outcome::Failure) => "f",
                None => "",
            };
            invocation.arg(op).arg(tag).arg(id).arg(attempt).arg(delay_ms).arg(reason).arg(outcome);
        }
        let applied = invocation.invoke_async::<Vec<i64>>(&mut self.con()).await;
        if effects.iter().any(|effect| effect.circuit_outcome() == Some(Outcome::Failure)) {
            // A failure may have opened the circuit: the next admission reads the gate again
            // (and a read that was under way is not kept).
            self.fresh_gates.forget(&session.agent);
        }
        let applied = applied.map_err(unavailable)?;
        Ok(applied.into_iter().map(|ok| if ok == 1 { Ok(()) } else { Err(StoreError::NotOwner) }).collect())
    }

    pub(super) async fn release(&self, session: &SessionRef) -> Result<usize, StoreError> {
        let [work, _, replies, _] = Self::session_keys(session);
        let n: usize = self
            .scripts
            .release
            .key(work)
            .key(replies)
            .arg(session.owner.as_str())
            .arg(channel(&session.agent))
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        Ok(n)
    }

    pub(super) async fn acquire_lease(&self, session: &SessionRef, ttl: Duration) -> Result<bool, StoreError> {
        let [work, _, replies, replies_delayed] = Self::session_keys(session);
        let (broker_prefix, incarnation_prefix) = session.owner.origin_prefixes().unwrap_or(("", ""));
        let taken: i64 = self
            .scripts
            .lease_acquire
            .key(Self::lease_key(&session.agent, &session.instance))
            .key(key(&session.agent, "owners"))
            .key(work)
            .key(replies)
            .key(replies_delayed)
            .arg(session.owner.as_str())
            .arg(ttl.as_millis().max(1) as u64)
            .arg(broker_prefix)
            .arg(incarnation_prefix)
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        Ok(taken == 1)
    }

    pub(super) async fn renew_lease(&self, session: &SessionRef, ttl: Duration) -> Result<bool, StoreError> {
        let [_, _, replies, replies_delayed] = Self::session_keys(session);
        let renewed: i64 = self
            .scripts
            .lease_renew
            .key(Self::lease_key(&session.agent, &session.instance))
            .key(key(&session.agent, "owners"))
            .key(replies)
            .key(replies_delayed)
            .arg(session.owner.as_str())
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        Ok(renewed == 1)
    }

    pub(super) async fn release_lease(&self, session: &SessionRef) -> Result<(), StoreError> {
        self.fresh_gates.forget(&session.agent);
        self.seats.leave(session);
        let [_, _, replies, replies_delayed] = Self::session_keys(session);
        let _: i64 = self
            .scripts
            .lease_release
            .key(Self::lease_key(&session.agent, &session.instance))
            .key(key(&session.agent, "owners"))
            .key(replies)
            .key(replies_delayed)
            .arg(session.owner.as_str())
            .arg(channel(&session.agent))
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn instance_live(&self, agent: &AgentId, instance: &InstanceId) -> Result<bool, StoreError> {
        // The lease key expires with the lease (PX), so existence is liveness.
        let n: i64 = redis::cmd("EXISTS")
            .arg(Self::lease_key(agent, instance))
            .query_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    pub(super) async fn live_agents(&self, agents: &[AgentId]) -> Result<Vec<bool>, StoreError> {
        let mut live = Vec::with_capacity(agents.len());
        for agent in agents {
            let n: i64 =
                self.scripts.live.key(key(agent, "owners")).invoke_async(&mut self.con()).await.map_err(unavailable)?;
            live.push(n > 0);
        }
        Ok(live)
    }

    /// Records `pending` in the requester's slot ahead of the request's admission, so the
    /// request's policy steps and this write share a round trip (see
    /// [`super::Store::begin_request`]).
    pub(super) async fn begin_request(
        &self,
        correlation_id: &str,
        pending: &PendingRequest,
        ttl: Duration,
    ) -> Result<PendingAhead, StoreError> {
        let at = tokio::time::Instant::now();
        let opened: i64 = self
            .scripts
            .open_request
            .key(key(&pending.requester, &format!("pending:{correlation_id}")))
            .key(key(&pending.requester, "pending_index"))
            .arg(pending.requester.as_str())
            .arg(pending.requester_instance.as_str())
            .arg(pending.target.as_str())
            .arg(ttl.as_millis().max(1) as u64)
            .arg(REQUEST_EXPIRED_GRACE.as_millis() as u64)
            .arg(self.max_pending_requests)
            .arg(correlation_id)
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        match opened {
            0 => Err(StoreError::TooManyPending),
            _ => Ok(PendingAhead::Written { at }),
        }
    }

    /// Forgets a pending record written ahead whose request was not queued. Best effort: it
    /// expires on its own if this fails too.
    pub(super) async fn abandon_request(&self, requester: &AgentId, correlation_id: &str) {
        let _: Result<(), _> = redis::pipe()
            .del(key(requester, &format!("pending:{correlation_id}")))
            .ignore()
            .zrem(key(requester, "pending_index"), correlation_id)
            .ignore()
            .query_async(&mut self.con())
            .await;
    }

    pub(super) async fn open_request(
        &self,
        correlation_id: &str,
        pending: PendingRequest,
        ttl: Duration,
        admission: Admission,
        circuit: Option<&CircuitConfig>,
        ahead: PendingAhead,
    ) -> Result<Admitted, StoreError> {
        let ahead = match ahead {
            PendingAhead::Deferred => self.begin_request(correlation_id, &pending, ttl).await?,
            written => written,
        };
        // Noted before the admission, so that a reply racing its end never finds it noted
        // after the reply's commit forgot it.
        if let PendingAhead::Written { at } = ahead {
            self.opened.note(correlation_id, pending.clone(), at, ttl);
        }
        let admitted = self.admit(admission, circuit).await;
        let refused = match &admitted {
            Ok(admitted) => admitted.entry.is_none(),
            Err(err) => !matches!(err, StoreError::Unavailable(_)),
        };
        if refused {
            // Not queued (circuit, queue bound, full chain): nobody can answer it. After a
            // failure the request may be queued all the same, so its record stays for a reply.
            self.opened.forget(correlation_id);
            self.abandon_request(&pending.requester, correlation_id).await;
        }
        admitted
    }

    pub(super) async fn correlation(
        &self,
        requester: &AgentId,
        correlation_id: &str,
    ) -> Result<Correlation, StoreError> {
        if let Some(pending) = self.opened.pending(correlation_id, tokio::time::Instant::now()) {
            return Ok(Correlation::Pending(pending));
        }
        let reply: Vec<Value> = self
            .scripts
            .correlation
            .key(key(requester, &format!("pending:{correlation_id}")))
            .key(key(requester, &format!("receipt:{correlation_id}")))
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        let fields: Vec<String> = reply.into_iter().map(text).collect();
        let parse_pending = |f: &[String]| -> Option<PendingRequest> {
            Some(PendingRequest {
                requester: AgentId::new(f.get(1)?).ok()?,
                requester_instance: InstanceId::new(f.get(2)?).ok()?,
                target: AgentId::new(f.get(3)?).ok()?,
            })
        };
        Ok(match fields.first().map(String::as_str) {
            Some("answered") => {
                match (fields.get(1).and_then(|s| AgentId::new(s).ok()), fields.get(2), fields.get(3)) {
                    (Some(sender), Some(fp), Some(id)) => {
                        Correlation::Answered(ReplyReceipt { sender, fingerprint: fp.clone(), message_id: id.clone() })
                    }
                    _ => Correlation::Unknown,
                }
            }
            // A malformed record is treated as unknown, as the reference does.
            Some("pending") => parse_pending(&fields).map_or(Correlation::Unknown, Correlation::Pending),
            Some("expired") => Correlation::Expired,
            _ => Correlation::Unknown,
        })
    }

    pub(super) async fn commit_reply(
        &self,
        correlation_id: &str,
        expected: &PendingRequest,
        receipt: ReplyReceipt,
        envelope: Arc<str>,
        record: AuditRecord,
    ) -> Result<Result<(ReplyCommit, Option<AuditRecord>), ReplyError>, StoreError> {
        let reply = replies::ReplyToCommit {
            correlation_id: correlation_id.to_string(),
            expected: expected.clone(),
            receipt,
            envelope,
            record,
        };
        let outcome = self.commit_reply_grouped(reply).await;
        // Whatever the store made of it, it knows better now than what this broker noted.
        self.opened.forget(correlation_id);
        outcome
    }

    /// The sender's rate-limit step for `count` messages, made together with the steps of
    /// other RPCs of the sender that wait for the same round trip: one grant for them all,
    /// shared out in arrival order ([`Grant::share`]) — what each would get asking alone.
    pub(super) async fn admit_rate(&self, sender: &AgentId, limits: Limits, count: usize) -> Result<Grant, StoreError> {
        let backend = self.clone();
        let owner = sender.clone();
        let step = move |demands: Vec<(Limits, usize)>| {
            let (backend, sender) = (backend.clone(), owner.clone());
            async move { backend.admit_rate_shared(&sender, &demands).await }
        };
        self.rates
            .call(sender.as_str(), (limits, count), step)
            .await
            .unwrap_or_else(|| Err(StoreError::Unavailable("rate limit step abandoned".into())))
    }

    /// One rate-limit step per run of equal limits (the limits of a sender change only when
    /// the configuration does), each grant shared among its run's demands.
    async fn admit_rate_shared(&self, sender: &AgentId, demands: &[(Limits, usize)]) -> Vec<Result<Grant, StoreError>> {
        let mut answers = Vec::with_capacity(demands.len());
        for run in demands.chunk_by(|a, b| a.0 == b.0) {
            let counts: Vec<usize> = run.iter().map(|(_, count)| *count).collect();
            match self.admit_rate_once(sender, run[0].0, counts.iter().sum()).await {
                Ok(grant) => answers.extend(grant.share(&counts).into_iter().map(Ok)),
                Err(err) => answers.extend(run.iter().map(|_| Err(err.clone()))),
            }
        }
        answers
    }

    async fn admit_rate_once(&self, sender: &AgentId, limits: Limits, count: usize) -> Result<Grant, StoreError> {
        let reply: Vec<i64> = self
            .scripts
            .rate_admit
            .key(key(sender, "rate"))
            .arg(limits.per_minute)
            .arg(limits.per_hour)
            .arg(count)
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        let malformed = || StoreError::Unavailable("malformed rate limit reply".into());
        let (admitted, refused) = match reply.as_slice() {
            [admitted] => (*admitted, None),
            [admitted, window, retry_us] => {
                let window = if *window == 0 { Window::Minute } else { Window::Hour };
                (
                    *admitted,
                    Some(Limited { window, retry_after: u64::try_from(*retry_us).ok().map(Duration::from_micros) }),
                )
            }
            _ => return Err(malformed()),
        };
        let admitted = usize::try_from(admitted).ok().filter(|n| *n <= count).ok_or_else(malformed)?;
        Ok(Grant { admitted, refused })
    }

    pub(super) async fn get_state(&self, agent: &AgentId) -> Result<StateSnapshot, StoreError> {
        let reply: Vec<Value> = self
            .scripts
            .state_get
            .key(key(agent, "state"))
            .key(key(agent, "state:rev"))
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        let mut items = reply.into_iter();
        let revision = items.next().map(int).unwrap_or(0).max(0) as u64;
        let rest: Vec<String> = items.map(text).collect();
        let fields = rest.chunks_exact(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect();
        Ok(StateSnapshot { fields, revision })
    }

    pub(super) async fn update_state(
        &self,
        agent: &AgentId,
        updates: BTreeMap<String, String>,
        expected_revision: Option<u64>,
        max_bytes: usize,
    ) -> Result<Result<u64, StateError>, StoreError> {
        let mut invocation = self.scripts.state_update.prepare_invoke();
        invocation.key(key(agent, "state")).key(key(agent, "state:rev"));
        invocation.arg(expected_revision.map(|r| r.to_string()).unwrap_or_default()).arg(max_bytes);
        for (field, value) in &updates {
            invocation.arg(field).arg(value);
        }
        let reply: (i64, u64) = invocation.invoke_async(&mut self.con()).await.map_err(unavailable)?;
        Ok(revision_outcome(reply))
    }

    pub(super) async fn reset_state(
        &self,
        agent: &AgentId,
        expected_revision: Option<u64>,
    ) -> Result<Result<u64, StateError>, StoreError> {
        let reply: (i64, u64) = self
            .scripts
            .state_reset
            .key(key(agent, "state"))
            .key(key(agent, "state:rev"))
            .arg(expected_revision.map(|r| r.to_string()).unwrap_or_default())
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        Ok(revision_outcome(reply))
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING").query_async::<()>(&mut self.con()).await.map_err(unavailable)
    }

    pub(super) async fn queue_gauges(&self, agent: &AgentId) -> Result<QueueGauges, StoreError> {
        let (stream, delayed) = Self::queue_keys(&QueueKey::Work(agent.clone()));
        let (depth, envelope, phase, audit_len, dead_letters, dead_letters_dropped): (
            usize,
            String,
            String,
            usize,
            usize,
            u64,
        ) = self
            .scripts
            .queue_gauges
            .key(stream)
            .key(delayed)
            .key(key(agent, "circuit"))
            .key(key(agent, "audit"))
            .key(key(agent, "dlq"))
            .key(key(agent, "dlq:dropped"))
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        let circuit = match phase.as_str() {
            "o" => CircuitPhase::Open,
            "h" => CircuitPhase::HalfOpen,
            _ => CircuitPhase::Closed,
        };
        Ok(QueueGauges {
            depth,
            oldest_timestamp: envelope_timestamp(&envelope),
            circuit,
            audit_len,
            dead_letters,
            dead_letters_dropped,
        })
    }

    pub(super) async fn queue_len(&self, queue: &QueueKey) -> Result<usize, StoreError> {
        let (stream, delayed) = Self::queue_keys(queue);
        let (len, waiting): (usize, usize) = redis::pipe()
            .cmd("XLEN")
            .arg(stream)
            .cmd("ZCARD")
            .arg(delayed)
            .query_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        Ok(len + waiting)
    }
}

/// Messages from a script's flat `{tag, id, envelope, attempt, ...}` list.
/// The values are taken, not cloned: an envelope is copied once, into its `Arc<str>`.
/// A claim's answer (see the `_claim` library): status, when the earliest delayed entry is due
/// (ms, -1 for none), then the claimed messages.
fn claim_answer(reply: Vec<Value>) -> handoff::ClaimAnswer {
    let mut items = reply.into_iter();
    let status = items.next().map(text).unwrap_or_default();
    if status == "lost" {
        return Err(StoreError::NotOwner);
    }
    let next_delayed = items.next().map(int).filter(|ms| *ms >= 0).map(|ms| Duration::from_millis(ms as u64));
    Ok((queued_messages(items.collect()), next_delayed))
}

fn queued_messages(flat: Vec<Value>) -> Vec<QueuedMessage> {
    let mut items = flat.into_iter();
    let mut messages = Vec::with_capacity(items.len() / 4);
    while let (Some(tag), Some(id), Some(envelope), Some(attempt)) =
        (items.next(), items.next(), items.next(), items.next())
    {
        messages.push(QueuedMessage {
            entry: EntryId::new(format!("{}:{}", text(tag), text(id))),
            envelope: Arc::from(text(envelope)),
            attempt: u32::try_from(int(attempt)).unwrap_or(0),
        });
    }
    messages
}

/// A state script's `{outcome, value}`: `{1, revision}` written, `{0, revision}` a conflict,
/// `{2, bytes}` too large.
fn revision_outcome((ok, value): (i64, u64)) -> Result<u64, StateError> {
    match ok {
        1 => Ok(value),
        2 => Err(StateError::TooLarge { bytes: usize::try_from(value).unwrap_or(usize::MAX) }),
        _ => Err(StateError::RevisionConflict { current: value }),
    }
}

fn text(v: Value) -> String {
    match v {
        // Valid UTF-8 (everything the broker wrote) becomes the String without a copy.
        Value::BulkString(bytes) => {
            String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        }
        Value::SimpleString(s) => s,
        Value::Int(i) => i.to_string(),
        Value::Okay => "OK".to_string(),
        _ => String::new(),
    }
}

fn int(v: Value) -> i64 {
    match v {
        Value::Int(i) => i,
        other => text(other).parse().unwrap_or(0),
    }
}

async fn subscribe(client: &redis::Client) -> Result<redis::aio::PubSub, RedisError> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.psubscribe("mas:notify:*").await?;
    Ok(pubsub)
}

/// Forwards `mas:notify:{agent}` messages to the sessions of that agent, for as long as the
/// backend exists. When the subscription breaks (Redis restarted, the connection was killed),
/// sessions poll every [`IDLE_POLL`] until it is made again, with backoff.
async fn listen(client: redis::Client, mut pubsub: redis::aio::PubSub, wakers: Weak<Wakers>) {
    loop {
        forward(&mut pubsub, &wakers).await;
        let Some(live) = wakers.upgrade() else { return };
        live.set_subscribed(false);
        drop(live);
        tracing::warn!("Redis notification subscription ended; sessions poll every {IDLE_POLL:?} until it is back");
        let Some(again) = resubscribe(&client, &wakers).await else { return };
        pubsub = again;
        let Some(live) = wakers.upgrade() else { return };
        live.set_subscribed(true);
        tracing::info!("Redis notification subscription is back");
    }
}

/// Wakes the sessions each message names, until the subscription ends or the backend is gone.
async fn forward(pubsub: &mut redis::aio::PubSub, wakers: &Weak<Wakers>) {
    use tokio_stream::StreamExt;
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let Some(wakers) = wakers.upgrade() else { return };
        if let Some(agent) = message.get_channel_name().strip_prefix("mas:notify:") {
            wakers.wake(agent);
        }
    }
}

/// Subscribes again, backing off between attempts; `None` once the backend is gone.
async fn resubscribe(client: &redis::Client, wakers: &Weak<Wakers>) -> Option<redis::aio::PubSub> {
    let (mut pause, longest) = RESUBSCRIBE_BACKOFF;
    loop {
        tokio::time::sleep(pause).await;
        if wakers.strong_count() == 0 {
            return None;
        }
        match subscribe(client).await {
            Ok(pubsub) => return Some(pubsub),
            Err(err) => {
                tracing::debug!(error = %err, "Redis notification subscription not back yet");
                pause = (pause * 2).min(longest);
            }
        }
    }
}

/// The oldest Redis the scripts run on: `XADD key 0-*` (audit ids) and `PEXPIRE … NX` came
/// in 7.0.
const OLDEST_REDIS: (u32, u32) = (7, 0);

/// Refuses a server older than [`OLDEST_REDIS`] when the broker connects, naming its version,
/// instead of letting requests and audit appends fail script by script later. A server whose
/// `INFO` does not say (a proxy) is let through: a script it cannot run fails loudly.
fn check_server_version(info: &str) -> Result<(), StoreError> {
    let Some(version) = info.lines().find_map(|line| line.strip_prefix("redis_version:")).map(str::trim) else {
        return Ok(());
    };
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) < OLDEST_REDIS => Err(StoreError::Unavailable(format!(
            "Redis {version} is too old: mas needs {}.{} or newer",
            OLDEST_REDIS.0, OLDEST_REDIS.1
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_older_than_7_0_is_refused_by_name_and_newer_ones_pass() {
        let info = |version: &str| format!("# Server\r\nredis_version:{version}\r\nredis_mode:standalone\r\n");
        for fine in ["7.0.15", "7.2.4", "8.0.1", "10.0.0"] {
            assert_eq!(check_server_version(&info(fine)), Ok(()), "{fine}");
        }
        for old in ["6.2.14", "5.0.7"] {
            let err = check_server_version(&info(old)).expect_err(old).to_string();
            assert!(err.contains(old) && err.contains("7.0 or newer"), "{err}");
        }
        assert_eq!(check_server_version("# Server\r\nproxy:yes\r\n"), Ok(()), "a server that does not say");
    }

    /// Without it every small script call waits out Nagle's algorithm behind the previous one.
    #[test]
    fn connections_set_tcp_nodelay() {
        for url in ["redis://127.0.0.1:6379", "rediss://127.0.0.1:6380"] {
            let client = client(&RedisSettings::new(url)).expect("client");
            assert!(client.get_connection_info().tcp_settings().nodelay(), "{url}");
        }
    }
}
