//! Fixtures for end-to-end tests: a broker on 127.0.0.1 with real mTLS and a throwaway PKI.

#![cfg(not(madsim))]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use mas_agent::{AgentBuilder, AgentConfig};
use mas_core::ids::AgentId;
use mas_core::store::{DeadLetter, QueueKey};
use mas_net::client::{RuntimeClient, runtime_client};
use mas_net::pki::{DevCa, PemPair};
use mas_net::tls::{TlsFiles, TlsPem};
use mas_server::config::DeliverySettings;
use mas_server::{AgentDefinition, Broker, BrokerConfig, serve};

pub mod otlp;
pub mod redis_server;
pub mod scenarios;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

/// A running broker with its CA, so tests can issue any client certificate they need.
pub struct TestBroker {
    /// Broker state (store, sessions) for assertions.
    pub broker: Arc<Broker>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The CA that the broker trusts.
    pub ca: DevCa,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// `(agent, allowed targets)` pairs for the allowlist.
pub type Grants<'a> = &'a [(&'a str, &'a [&'a str])];

/// A fresh, empty directory under the system's temp dir, unique within this process.
pub fn scratch_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir =
        std::env::temp_dir().join(format!("mas-e2e-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Parses an agent id the test wrote.
pub fn id(s: &str) -> AgentId {
    AgentId::new(s).expect("test agent id")
}

impl TestBroker {
    /// Starts a broker with the given allowlist and grants and default delivery settings.
    pub async fn start(grants: Grants<'_>) -> Self {
        Self::start_with(grants, DeliverySettings::default()).await
    }

    /// Starts a broker with explicit delivery settings.
    pub async fn start_with(grants: Grants<'_>, delivery: DeliverySettings) -> Self {
        Self::start_custom(grants, |config| config.delivery = delivery).await
    }

    /// Starts a broker on the Redis server at `url`.
    pub async fn start_on_redis(grants: Grants<'_>, url: &str) -> Self {
        let settings = mas_server::store::redis::RedisSettings::new(url);
        Self::start_custom(grants, |config| config.redis = Some(settings)).await
    }

    /// Starts a broker whose configuration `adjust` may change.
    pub async fn start_custom(grants: Grants<'_>, adjust: impl FnOnce(&mut BrokerConfig)) -> Self {
        let agents: BTreeMap<_, _> =
            grants.iter().map(|(agent, targets)| (id(agent), AgentDefinition::allowing(targets))).collect();
        let mut config = BrokerConfig::new("127.0.0.1:0".parse().expect("addr"), agents);
        config.seed = Some(7);
        let dir = scratch_dir();
        config.data_dir = dir.join("data");
        adjust(&mut config);
        config.validate().expect("valid test config");
        let ca = DevCa::new("mas e2e CA").expect("ca");
        let server = ca.server_cert().expect("server cert");
        let tls = TlsPem { ca: ca.cert_pem(), cert: server.cert, key: server.key };
        let broker = Broker::connect(config).await.expect("broker starts");
        let bound = serve::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let addr = bound.local_addr;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let broker = broker.clone();
            async move {
                serve::serve_tls(broker, bound, &tls, async {
                    let _ = stopped.await;
                })
                .await
                .expect("broker serve");
            }
        });
        TestBroker { broker, addr, ca, dir, stop: Some(stop), task: Some(task) }
    }

    /// Writes `pair` with the CA into files and returns their paths.
    pub fn files(&self, name: &str, pair: &PemPair) -> TlsFiles {
        let files = TlsFiles {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.ca, self.ca.cert_pem()).expect("write ca");
        std::fs::write(&files.cert, &pair.cert).expect("write cert");
        std::fs::write(&files.key, &pair.key).expect("write key");
        files
    }

    /// Agent settings for `agent` with a valid certificate.
    pub fn agent_config(&self, agent: &str) -> AgentConfig {
        let pair = self.ca.agent_cert(&id(agent)).expect("agent cert");
        let mut config = AgentConfig::new(id(agent), format!("https://{}", self.addr), self.files(agent, &pair));
        config.handler_drain_timeout = Duration::from_secs(2);
        config
    }

    /// A builder for `agent`.
    pub fn agent(&self, agent: &str) -> AgentBuilder {
        AgentBuilder::new(self.agent_config(agent))
    }

    /// Starts `agent` with a handler for `message_type` that only counts its runs; the payload
    /// must decode into `T` for the handler to run.
    pub async fn counting_agent<T>(&self, agent: &str, message_type: &str) -> (mas_agent::Agent, Arc<AtomicU32>)
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        let started = self
            .agent(agent)
            .on(message_type, move |_, _msg: mas_agent::Message<T>| {
                counter.fetch_add(1, Ordering::SeqCst);
                async { Ok::<(), mas_agent::HandlerError>(()) }
            })
            .start()
            .await
            .expect("agent starts");
        (started, runs)
    }

    /// A raw gRPC client presenting `pair` (or no certificate), for protocol-level tests.
    pub async fn raw_client(&self, pair: Option<&PemPair>) -> Result<RuntimeClient, tonic::transport::Error> {
        mas_net::tls::install_crypto_provider();
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .domain_name("localhost")
            .ca_certificate(tonic::transport::Certificate::from_pem(self.ca.cert_pem()));
        if let Some(pair) = pair {
            tls = tls.identity(tonic::transport::Identity::from_pem(&pair.cert, &pair.key));
        }
        let channel = Endpoint::from_shared(format!("https://{}", self.addr))?.tls_config(tls)?.connect().await?;
        // The identity stamp is a no-op in production; identity is the certificate.
        Ok(runtime_client(channel, &id("unused")))
    }

    /// Entries in `agent`'s work queue (ready, delayed, claimed).
    pub async fn queue_len(&self, agent: &str) -> usize {
        self.broker.store().queue_len(&QueueKey::Work(id(agent))).await.expect("store reachable")
    }

    /// `agent`'s dead letters.
    pub async fn dead_letters(&self, agent: &str) -> Vec<DeadLetter> {
        self.broker.store().dead_letters(&id(agent), 1000).await.expect("store reachable")
    }

    /// Stops the broker (graceful drain) and waits, bounded, for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("broker stops in time")
                .expect("broker task");
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Polls the async `condition` every 10 ms until it holds or `limit` passes.
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut condition: impl FnMut() -> F,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition().await
}

/// Polls `condition` every 10 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}
