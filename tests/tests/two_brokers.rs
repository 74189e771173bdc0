//! Two broker processes share one `redis-server`. One is killed with SIGKILL while a producer
//! and a consumer are busy on it; both agents reconnect to the other broker and every message
//! the brokers accepted is handled.
//!
//! The brokers are this test binary re-run as child processes (`broker_child`), so the test
//! needs nothing but cargo's own build.

#![cfg(not(madsim))]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mas_agent::{AgentBuilder, AgentConfig, HandlerError, Message};
use mas_net::pki::DevCa;
use mas_net::tls::TlsFiles;
use mas_tests::redis_server::RedisServer;
use mas_tests::{eventually, id};
use serde::Deserialize;

const CHILD_ENV: &str = "MAS_CHILD_BROKER_CONFIG";
const MESSAGES: u32 = 300;

/// Runs a broker from the config file named by `MAS_CHILD_BROKER_CONFIG` until killed. Only
/// meaningful as a child of `sigkill_of_one_broker_loses_no_accepted_message`.
#[test]
#[ignore = "child process of the two-broker test"]
fn broker_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let config = mas_server::BrokerConfig::from_file(Path::new(&path)).expect("child config");
        let tls = config.tls.clone().expect("tls");
        let pem = TlsFiles { ca: tls.client_ca_path, cert: tls.server_cert_path, key: tls.server_key_path }
            .load()
            .expect("pem");
        let bound = mas_server::serve::bind(config.listen_addr).await.expect("bind");
        let broker = mas_server::Broker::connect(config).await.expect("broker");
        mas_server::serve::serve_tls(broker, bound, &pem, std::future::pending()).await.expect("serve");
    });
}

struct ChildBroker {
    child: Child,
    port: u16,
}

impl ChildBroker {
    fn spawn(config: &Path, port: u16) -> ChildBroker {
        let exe = std::env::current_exe().expect("test binary path");
        let child = Command::new(exe)
            .args(["broker_child", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_ENV, config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn broker child");
        ChildBroker { child, port }
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("broker child on port {} did not start", self.port);
    }

    /// SIGKILL: no drain, no lease release, connections reset.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write fixture file");
}

#[derive(Debug, Deserialize)]
struct Job {
    seq: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_one_broker_loses_no_accepted_message() {
    let Some(redis) = RedisServer::start() else { return };
    let dir: PathBuf = std::env::temp_dir().join(format!("mas-two-brokers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = DevCa::new("two brokers CA").unwrap();
    let server = ca.server_cert().unwrap();
    write(&dir.join("ca.pem"), &ca.cert_pem());
    write(&dir.join("server.pem"), &server.cert);
    write(&dir.join("server.key"), &server.key);
    let agent_files = |name: &str| {
        let pair = ca.agent_cert(&id(name)).unwrap();
        write(&dir.join(format!("{name}.pem")), &pair.cert);
        write(&dir.join(format!("{name}.key")), &pair.key);
        TlsFiles { ca: dir.join("ca.pem"), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
    };
    let ports = [free_port(), free_port()];
    let mut brokers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let config = serde_json::json!({
            "listen_addr": format!("127.0.0.1:{port}"),
            "tls": {
                "server_cert_path": dir.join("server.pem"),
                "server_key_path": dir.join("server.key"),
                "client_ca_path": dir.join("ca.pem"),
            },
            "agents": { "alice": { "allowed_targets": ["bob"] }, "bob": {} },
            "session_lease": { "ttl_ms": 1500, "renewal_ms": 500 },
            "admin": { "listen_addr": "127.0.0.1:0" },
            "gateway": { "rate_limit": { "per_minute": 100000, "per_hour": 1000000 } },
            "redis": { "url": redis.url },
        });
        let path = dir.join(format!("broker{i}.json"));
        write(&path, &config.to_string());
        brokers.push(ChildBroker::spawn(&path, *port));
    }
    for b in &brokers {
        b.wait_listening();
    }
    let config_for = |name: &str| {
        let mut c = AgentConfig::new(id(name), format!("https://127.0.0.1:{}", ports[0]), agent_files(name));
        c.fallback_endpoints = vec![format!("https://127.0.0.1:{}", ports[1])];
        c
    };

    let handled: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let h = handled.clone();
    let bob = AgentBuilder::new(config_for("bob"))
        .on("job", move |_, msg: Message<Job>| {
            h.lock().unwrap().push((msg.envelope.message_id.clone(), msg.payload.seq));
            async { Ok::<(), HandlerError>(()) }
        })
        .start()
        .await
        .unwrap();
    let alice = AgentBuilder::new(config_for("alice")).start().await.unwrap();

    let mut accepted: BTreeMap<String, u32> = BTreeMap::new();
    let mut killed_at = None;
    let started = Instant::now();
    for seq in 0..MESSAGES {
        if seq == MESSAGES / 3 {
            brokers[0].kill();
            killed_at = Some(Instant::now());
        }
        loop {
            assert!(started.elapsed() < Duration::from_secs(60), "sending took too long");
            match alice.send("bob", "job", &serde_json::json!({ "seq": seq })).await {
                Ok(message_id) => {
                    accepted.insert(message_id, seq);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    let all_handled = || {
        let ids: BTreeSet<String> = handled.lock().unwrap().iter().map(|(id, _)| id.clone()).collect();
        accepted.keys().all(|id| ids.contains(id))
    };
    if !eventually(Duration::from_secs(30), all_handled).await {
        let ids: BTreeSet<String> = handled.lock().unwrap().iter().map(|(id, _)| id.clone()).collect();
        let missing: Vec<u32> = accepted.iter().filter(|(id, _)| !ids.contains(*id)).map(|(_, s)| *s).collect();
        let xinfo = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "XINFO", "GROUPS", "mas:{bob}:work"])
            .output();
        let keys = Command::new("redis-cli").args(["-p", &redis.port.to_string(), "KEYS", "*"]).output();
        panic!(
            "accepted messages were lost: {} missing (seqs {:?}); handled {}\nxinfo: {}\nkeys: {}",
            missing.len(),
            &missing[..missing.len().min(20)],
            ids.len(),
            xinfo.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default(),
            keys.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default(),
        );
    }
    let handled = handled.lock().unwrap().clone();
    let distinct: BTreeSet<&String> = handled.iter().map(|(id, _)| id).collect();
    eprintln!(
        "two brokers: {} accepted, {} handled ({} distinct, {} redelivered), all handled {:?} after the SIGKILL",
        accepted.len(),
        handled.len(),
        distinct.len(),
        handled.len() - distinct.len(),
        killed_at.map(|at| at.elapsed()),
    );
    assert_eq!(accepted.len() as u32, MESSAGES);
    alice.stop().await;
    bob.stop().await;
    drop(brokers);
    let _ = std::fs::remove_dir_all(&dir);
}
