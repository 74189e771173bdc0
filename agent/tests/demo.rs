//! The README's first command, `cargo run -p mas-agent --example demo`, as a process: it serves
//! its metrics and probes, the counters move with the greetings, and it stops cleanly with
//! exit 0.

#![cfg(not(madsim))]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The example binary cargo builds beside this test (`target/<profile>/examples/demo`).
fn demo_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>");
    let demo = profile_dir.join("examples").join("demo");
    assert!(
        demo.exists(),
        "{} is missing: cargo test builds the examples; run cargo build -p mas-agent --examples",
        demo.display()
    );
    demo
}

#[test]
fn the_demo_serves_metrics_that_count_its_greetings() {
    let dir = std::env::temp_dir().join(format!("mas-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let certs = dir.join("certs");
    let mut child = Command::new(demo_binary())
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--messages", "3"])
        .args(["--certs-dir", certs.to_str().expect("utf-8 path")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    let metrics_url = lines
        .by_ref()
        .find_map(|line| line.strip_prefix("metrics on ").and_then(|rest| rest.split(',').next()).map(str::to_string))
        .expect("the demo names its metrics address");
    let admin = metrics_url.trim_start_matches("http://").trim_end_matches("/metrics").to_string();
    assert!(lines.by_ref().any(|line| line.starts_with("bob received from alice: #2")), "greetings flow");
    let body = http_get(&admin, "/metrics");
    let delivered = body
        .lines()
        .find_map(|l| l.strip_prefix("mas_deliveries_total{agent=\"bob\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("bob's delivery counter");
    assert!(delivered >= 2, "at least the two greetings bob printed: {delivered}");
    assert!(http_get(&admin, "/readyz").ends_with("ready\n"));
    assert!(lines.any(|line| line.starts_with("stopped cleanly (3 sent, 3 delivered)")));
    assert!(child.wait().expect("demo exits").success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plain HTTP/1.0 GET: the status line must be 200; returns the body.
fn http_get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the admin listener");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}
