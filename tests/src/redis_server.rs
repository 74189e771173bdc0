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
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
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
        let server = RedisServer { child, url: format!("redis://127.0.0.1:{port}"), port };
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}
