//! A private `redis-server` per test: started on a free loopback port with persistence off,
//! stopped by pid. Never touches a Redis the machine may already run.
//!
//! When `redis-server` is missing, tests fail under `CI=true` and are skipped with a loud
//! message elsewhere.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` child process.
pub struct RedisServer {
    child: Child,
    /// `redis://127.0.0.1:{port}`.
    pub url: String,
    /// Its port.
    pub port: u16,
}

impl RedisServer {
    /// Starts a server, or returns `None` (outside CI only) when `redis-server` is unavailable.
    pub fn start() -> Option<RedisServer> {
        let port = free_port();
        Self::spawn(port, &["--port", &port.to_string()], format!("redis://127.0.0.1:{port}"))
    }

    /// Starts a TLS-only server (`rediss://`) with the given PEM files; clients need no
    /// certificate of their own.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> Option<RedisServer> {
        let port = free_port();
        let (port_s, cert, key, ca) =
            (port.to_string(), cert.display().to_string(), key.display().to_string(), ca.display().to_string());
        let args = [
            "--port",
            "0",
            "--tls-port",
            &port_s,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ];
        Self::spawn(port, &args, format!("rediss://127.0.0.1:{port}"))
    }

    /// Stops the server process (SIGSTOP) so that every request to it times out.
    pub fn freeze(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.id(), "-CONT");
    }

    fn spawn(port: u16, args: &[&str], url: String) -> Option<RedisServer> {
        let spawned = Command::new("redis-server")
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(err) => {
                let msg = format!("cannot start redis-server ({err}); install it (apt-get install redis-server)");
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("{msg}: Redis tests must run in CI");
                }
                eprintln!("\n!!!!! SKIPPING a Redis test: {msg} !!!!!\n");
                return None;
            }
        };
        let server = RedisServer { child, url, port };
        server.wait_ready();
        Some(server)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start listening within 10 s", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, which: &str) {
    let status = Command::new("kill").args([which, &pid.to_string()]).status().expect("run kill");
    assert!(status.success(), "kill {which} {pid} failed");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Rewrites the audit chain stream `stream` at `url` entry by entry, each record through
/// `edit(index, record)`, with Redis's time-based entry ids — what an attacker with write
/// access to Redis would have to do (entries cannot be changed in place), and how versions
/// before `0-n` audit ids wrote chains. Returns the ids the entries had.
pub async fn rewrite_audit_stream(url: &str, stream: &str, edit: impl Fn(usize, &str) -> String) -> Vec<String> {
    let client = redis::Client::open(url).expect("redis url");
    let mut con = client.get_multiplexed_async_connection().await.expect("connect to the test redis-server");
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query_async(&mut con).await.expect("XRANGE");
    let _: i64 = redis::cmd("DEL").arg(stream).query_async(&mut con).await.expect("DEL");
    let mut ids = Vec::with_capacity(entries.len());
    for (n, (id, fields)) in entries.into_iter().enumerate() {
        let record = fields.iter().find(|(k, _)| k == "r").map(|(_, v)| v.as_str()).unwrap_or_default();
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("r")
            .arg(edit(n, record))
            .query_async(&mut con)
            .await
            .expect("XADD");
        ids.push(id);
    }
    ids
}
