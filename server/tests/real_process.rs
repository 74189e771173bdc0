//! The `mas serve` binary as a process, attacked the way an outside tester would: a flood of
//! silent TCP connections, an agent opening sessions beyond its bound, and configurations
//! whose files are broken. The ready line must mean ready, and the broker must keep serving.

#![cfg(not(madsim))]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mas_proto::runtime::{ClientEvent, DiscoverRequest, Hello, client_event};
use tokio_stream::wrappers::ReceiverStream;

fn mas(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mas")).args(args).output().expect("run mas")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mas-real-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Dev certificates for alice and bob, and a config for them with `limits` merged in.
fn setup(dir: &Path, limits: serde_json::Value, client_ca: Option<&Path>) -> PathBuf {
    let certs = dir.join("certs");
    let out = mas(&["dev-certs", "--dir", certs.to_str().unwrap(), "--agents", "alice,bob"]);
    assert!(out.status.success(), "dev-certs: {}", String::from_utf8_lossy(&out.stderr));
    let config = serde_json::json!({
        "listen_addr": "127.0.0.1:0",
        "admin": { "listen_addr": "127.0.0.1:0" },
        "data_dir": dir.join("data"),
        "tls": {
            "server_cert_path": certs.join("server.pem"),
            "server_key_path": certs.join("server.key"),
            "client_ca_path": client_ca.map_or_else(|| certs.join("ca.pem"), Path::to_path_buf),
        },
        "agents": { "alice": { "allowed_targets": ["bob"] }, "bob": {} },
        "limits": limits,
    });
    let path = dir.join("broker.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    path
}

/// A running broker; killed when dropped.
struct Broker {
    child: Child,
    addr: SocketAddr,
}

impl Broker {
    fn start(config: &Path) -> Broker {
        Self::start_with_fd_limit(config, None, Stdio::null())
    }

    /// Starts `mas serve`, optionally under `ulimit -n {fds}`, with its stderr to `stderr`.
    fn start_with_fd_limit(config: &Path, fds: Option<u32>, stderr: Stdio) -> Broker {
        let bin = env!("CARGO_BIN_EXE_mas");
        let config = config.to_str().unwrap();
        let mut command = match fds {
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" serve --config \"$1\""), bin, config]);
                c
            }
            None => {
                let mut c = Command::new(bin);
                c.args(["serve", "--config", config]);
                c
            }
        };
        let mut child = command.stdout(Stdio::piped()).stderr(stderr).spawn().expect("start mas serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("ready line");
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready line is JSON");
        let addr = ready["listen_addr"].as_str().expect("listen_addr").parse().expect("address");
        Broker { child, addr }
    }

    /// CPU time (user + system) the broker has used, from /proc.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("read stat");
        // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<u64> = after.split(' ').skip(11).take(2).map(|f| f.parse().expect("ticks")).collect();
        Duration::from_millis((fields[0] + fields[1]) * 10) // USER_HZ is 100 on Linux
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tonic client of `agent` with its dev certificate.
async fn client(dir: &Path, addr: SocketAddr, agent: &str) -> mas_net::client::RuntimeClient {
    let certs = dir.join("certs");
    let files = mas_net::tls::TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{agent}.pem")),
        key: certs.join(format!("{agent}.key")),
    };
    mas_net::tls::install_crypto_provider();
    let tls = files.load().expect("agent files").client_config("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    mas_net::client::runtime_client(channel, &mas_core::ids::AgentId::new(agent).expect("id"))
}

async fn open_session(
    client: &mut mas_net::client::RuntimeClient,
    instance: &str,
) -> Result<(mpsc::Sender<()>, tokio::sync::mpsc::Sender<ClientEvent>), tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = ClientEvent { event: Some(client_event::Event::Hello(Hello { instance_id: instance.into() })) };
    tx.send(hello).await.expect("queue hello");
    let mut events = client.transport(ReceiverStream::new(rx)).await?.into_inner();
    events.message().await?.expect("welcome");
    let (keep, _) = mpsc::channel();
    tokio::spawn(async move { while let Ok(Some(_)) = events.message().await {} });
    Ok((keep, tx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_without_spinning_and_the_broker_keeps_serving() {
    let dir = scratch("flood");
    let limits = serde_json::json!({ "tls_handshake_timeout_ms": 1000, "max_sessions_per_agent": 4 });
    let broker = Broker::start(&setup(&dir, limits, None));

    // 1 000 connections that never start a TLS handshake.
    let silent: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(broker.addr).expect("connect")).collect();
    let cpu_before = broker.cpu();
    let waited = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_used = broker.cpu().saturating_sub(cpu_before);
    let mut closed = 0;
    for mut socket in silent {
        socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut byte = [0u8; 1];
        if matches!(socket.read(&mut byte), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    eprintln!(
        "1000 silent connections: {closed} closed by the handshake timeout; broker CPU {cpu_used:?} over {:?}",
        waited.elapsed()
    );
    assert_eq!(closed, 1000, "every silent connection is closed by the handshake timeout");
    assert!(cpu_used < Duration::from_millis(1500), "the broker spun: {cpu_used:?} of CPU in 3 s");

    // Sessions beyond the per-agent bound are refused; the broker still serves everyone.
    let mut alice = client(&dir, broker.addr, "alice").await;
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(open_session(&mut alice, &format!("i{i}")).await.expect("within the bound"));
    }
    let refused = open_session(&mut alice, "i4").await.map(|_| ()).expect_err("beyond the bound");
    assert_eq!((refused.code(), refused.message()), (tonic::Code::ResourceExhausted, "too_many_sessions"));
    let mut bob = client(&dir, broker.addr, "bob").await;
    let _bob_session = open_session(&mut bob, "b0").await.expect("bob is unaffected");
    let found = alice.discover(DiscoverRequest { capabilities: vec![] }).await.expect("discover").into_inner();
    assert_eq!(found.agents.iter().map(|a| a.agent_id.as_str()).collect::<Vec<_>>(), ["bob"]);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Out of file descriptors, the accept loop backs off with a log line instead of spinning on
/// `EMFILE`, and serves again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_broker_backs_off_logs_and_recovers() {
    let dir = scratch("emfile");
    let config = setup(&dir, serde_json::json!({ "tls_handshake_timeout_ms": 60000 }), None);
    let log = dir.join("stderr.log");
    let stderr = std::fs::File::create(&log).expect("log file");
    let broker = Broker::start_with_fd_limit(&config, Some(48), stderr.into());
    let silent: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(broker.addr).expect("connect")).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = broker.cpu();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_used = broker.cpu().saturating_sub(cpu_before);
    let logged = std::fs::read_to_string(&log).expect("read log");
    eprintln!("EMFILE: broker CPU {cpu_used:?} over 3 s");
    assert!(cpu_used < Duration::from_millis(1000), "the accept loop spun: {cpu_used:?} of CPU in 3 s");
    assert!(logged.contains("out of descriptors"), "a warning says why: {logged}");
    assert!(logged.matches("out of descriptors").count() <= 3, "throttled to one line per 5 s: {logged}");
    assert!(!logged.contains('\u{1b}'), "no terminal colour codes in a log that is a file: {logged:?}");
    drop(silent);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut alice = client(&dir, broker.addr, "alice").await;
    alice.discover(DiscoverRequest { capabilities: vec![] }).await.expect("served again");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each broken file fails the start before the ready line, naming the file and the cause.
#[test]
fn broken_tls_material_and_paths_fail_before_the_ready_line() {
    let dir = scratch("preflight");
    let certs = dir.join("certs");
    let leaf_as_ca = setup(&dir, serde_json::json!({}), Some(&certs.join("server.pem")));
    let out = mas(&["serve", "--config", leaf_as_ca.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "no ready line: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("server.pem") && stderr.contains("not a CA"), "{stderr}");

    let good = setup(&dir, serde_json::json!({}), None);
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&good).unwrap()).unwrap();
    config["tls"]["server_key_path"] = certs.join("alice.key").to_str().unwrap().into();
    std::fs::write(&good, config.to_string()).unwrap();
    let out = mas(&["serve", "--config", good.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(stderr.contains("alice.key") && stderr.contains("not the private key"), "{stderr}");

    config["tls"]["server_key_path"] = certs.join("server.key").to_str().unwrap().into();
    config["gateway"] = serde_json::json!({ "audit": { "file_path": dir.join("no/such/dir/audit.jsonl") } });
    std::fs::write(&good, config.to_string()).unwrap();
    let out = mas(&["serve", "--config", good.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(stderr.contains("gateway.audit.file_path") && stderr.contains("no/such/dir"), "{stderr}");

    config["gateway"] = serde_json::json!({});
    config["delivery"] = serde_json::json!({ "retry_backoff_initial_ms": 37_000_000_000_000u64, "retry_backoff_max_ms": 37_000_000_000_000u64 });
    std::fs::write(&good, config.to_string()).unwrap();
    let out = mas(&["serve", "--config", good.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(stderr.contains("delivery.retry_backoff_initial_ms"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
