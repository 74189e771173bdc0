use std::path::{Path, PathBuf};

use mas_core::ids::AgentId;

use super::*;

/// A scratch directory under the target dir's temp area, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mas-project-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A project in the reference's schema using every permission type, as YAML ...
const PROJECT_YAML: &str = r#"
server_listen_addr: 0.0.0.0:50999
tls_ca_path: certs/ca.pem
tls_server_cert_path: certs/server.pem
tls_server_key_path: /etc/mas/server.key
gateway:
  redis:
    url: redis://127.0.0.1:6390
  rate_limit: {per_minute: 7, per_hour: 70}
  features: {dlp: false, rbac: true}
  circuit_breaker: {failure_threshold: 3}
  audit: {file_path: logs/audit.jsonl}
  telemetry: {enabled: true, otlp_endpoint: "http://127.0.0.1:4318", service_namespace: shop}
  roles: {ops: ["send:worker"]}
permissions:
  - {type: allow_bidirectional, agents: [planner, worker]}
  - {type: allow_network, agents: [planner, worker, reporter], bidirectional: false}
  - {type: allow_broadcast, sender: reporter, receivers: [planner]}
  - {type: allow_wildcard, agent_id: admin}
  - {type: allow, sender: worker, targets: [reporter]}
agents:
  - agent_id: planner
    class_path: planner:Planner
    capabilities: [plan]
    metadata: {team: a}
    tls_cert_path: certs/planner.pem
    tls_key_path: certs/planner.key
    init_kwargs: {depth: 3}
  - agent_id: worker
    command: [bin/worker, --fast]
    instances: 2
    tls_cert_path: certs/worker.pem
    tls_key_path: certs/worker.key
  - agent_id: reporter
    command: [echo-agent]
    tls_cert_path: certs/reporter.pem
    tls_key_path: certs/reporter.key
  - agent_id: admin
    tls_cert_path: certs/admin.pem
    tls_key_path: certs/admin.key
    roles: [ops]
delivery: {max_in_flight: 50}
runner: {python: venv/bin/python, stop_timeout_ms: 3000}
"#;

/// ... and the same settings as JSON.
const PROJECT_JSON: &str = r#"{
  "server_listen_addr": "0.0.0.0:50999",
  "tls_ca_path": "certs/ca.pem",
  "tls_server_cert_path": "certs/server.pem",
  "tls_server_key_path": "/etc/mas/server.key",
  "gateway": {
    "redis": {"url": "redis://127.0.0.1:6390"},
    "rate_limit": {"per_minute": 7, "per_hour": 70},
    "features": {"dlp": false, "rbac": true},
    "circuit_breaker": {"failure_threshold": 3},
    "audit": {"file_path": "logs/audit.jsonl"},
    "telemetry": {"enabled": true, "otlp_endpoint": "http://127.0.0.1:4318", "service_namespace": "shop"},
    "roles": {"ops": ["send:worker"]}
  },
  "permissions": [
    {"type": "allow_bidirectional", "agents": ["planner", "worker"]},
    {"type": "allow_network", "agents": ["planner", "worker", "reporter"], "bidirectional": false},
    {"type": "allow_broadcast", "sender": "reporter", "receivers": ["planner"]},
    {"type": "allow_wildcard", "agent_id": "admin"},
    {"type": "allow", "sender": "worker", "targets": ["reporter"]}
  ],
  "agents": [
    {"agent_id": "planner", "class_path": "planner:Planner", "capabilities": ["plan"],
     "metadata": {"team": "a"}, "tls_cert_path": "certs/planner.pem",
     "tls_key_path": "certs/planner.key", "init_kwargs": {"depth": 3}},
    {"agent_id": "worker", "command": ["bin/worker", "--fast"], "instances": 2,
     "tls_cert_path": "certs/worker.pem", "tls_key_path": "certs/worker.key"},
    {"agent_id": "reporter", "command": ["echo-agent"],
     "tls_cert_path": "certs/reporter.pem", "tls_key_path": "certs/reporter.key"},
    {"agent_id": "admin", "tls_cert_path": "certs/admin.pem", "tls_key_path": "certs/admin.key",
     "roles": ["ops"]}
  ],
  "delivery": {"max_in_flight": 50},
  "runner": {"python": "venv/bin/python", "stop_timeout_ms": 3000}
}"#;

fn id(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

#[test]
fn the_same_settings_from_yaml_and_json_are_equal() {
    let scratch = Scratch::new("formats");
    let yaml = Project::load(&scratch.write("mas.yaml", PROJECT_YAML)).unwrap();
    let mut json = Project::load(&scratch.write("mas.json", PROJECT_JSON)).unwrap();
    json.path = yaml.path.clone();
    assert_eq!(yaml, json);
}

#[test]
fn relative_paths_resolve_against_the_files_directory() {
    let scratch = Scratch::new("paths");
    let project = Project::load(&scratch.write("proj/mas.yaml", PROJECT_YAML)).unwrap();
    let dir = scratch.0.join("proj");
    let tls = project.broker.tls.as_ref().unwrap();
    assert_eq!(tls.client_ca_path, dir.join("certs/ca.pem"));
    assert_eq!(tls.server_cert_path, dir.join("certs/server.pem"));
    assert_eq!(tls.server_key_path, Path::new("/etc/mas/server.key"), "absolute paths stay");
    assert_eq!(project.broker.gateway.audit.file_path, Some(dir.join("logs/audit.jsonl")));
    assert_eq!(project.broker.data_dir, dir.join("mas-data"));
    let worker = &project.agents[1];
    assert_eq!(worker.tls_cert_path, dir.join("certs/worker.pem"));
    assert_eq!(worker.tls_key_path, dir.join("certs/worker.key"));
    let program = dir.join("bin/worker").to_string_lossy().into_owned();
    assert_eq!(worker.launch, Some(Launch::Command(vec![program, "--fast".into()])));
    assert_eq!(
        project.agents[2].launch,
        Some(Launch::Command(vec!["echo-agent".into()])),
        "a bare program name is looked up on PATH"
    );
    assert_eq!(project.runner.python, dir.join("venv/bin/python"));
}

#[test]
fn the_reference_schema_becomes_the_broker_configuration() {
    let scratch = Scratch::new("schema");
    let project = Project::load(&scratch.write("mas.yaml", PROJECT_YAML)).unwrap();
    let b = &project.broker;
    assert_eq!(b.listen_addr.to_string(), "0.0.0.0:50999");
    #[cfg(not(madsim))]
    assert_eq!(b.redis.as_ref().map(|r| r.url.as_str()), Some("redis://127.0.0.1:6390"));
    assert_eq!((b.gateway.rate_limit.per_minute, b.gateway.rate_limit.per_hour), (7, 70));
    assert!(!b.gateway.features.dlp && b.gateway.features.rbac && b.gateway.features.circuit_breaker);
    assert_eq!(b.gateway.circuit_breaker.failure_threshold, 3);
    assert_eq!(b.telemetry.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4318/v1/traces"));
    assert_eq!(b.delivery.max_in_flight, 50);
    assert_eq!(b.agents.keys().map(AgentId::as_str).collect::<Vec<_>>(), ["admin", "planner", "reporter", "worker"]);
    assert_eq!(b.agents[&id("planner")].capabilities, ["plan"]);
    assert_eq!(b.agents[&id("planner")].metadata["team"], "a");
    let planner = &project.agents[0];
    assert_eq!(planner.launch, Some(Launch::Python { class_path: "planner:Planner".into() }));
    assert_eq!(planner.init_kwargs["depth"], 3);
    assert_eq!((planner.instances, project.agents[1].instances), (1, 2));
    assert_eq!(project.agents[3].launch, None, "allowlisted only");
    assert_eq!(project.runner.stop_timeout_ms, 3000);
    assert_eq!(project.runner.restart_backoff_initial_ms, RunnerSettings::default().restart_backoff_initial_ms);
}

/// Each preset type grants what the reference's runner grants.
#[test]
fn every_permission_type_grants_what_the_reference_grants() {
    let scratch = Scratch::new("permissions");
    let policy = Project::load(&scratch.write("mas.yaml", PROJECT_YAML)).unwrap().broker.authz_policy();
    let may = |a: &str, b: &str| policy.visible(&id(a), &id(b));
    // allow_bidirectional planner <-> worker
    assert!(may("planner", "worker") && may("worker", "planner"));
    // allow_network, chain: planner -> worker -> reporter
    assert!(may("worker", "reporter"));
    // allow_broadcast replaces reporter's grants with exactly [planner]
    assert!(may("reporter", "planner") && !may("reporter", "worker"));
    // allow_wildcard
    assert!(may("admin", "planner") && may("admin", "reporter") && may("admin", "worker"));
    // allow adds: worker -> reporter (already), nobody else gained anything
    assert!(!may("planner", "reporter"));
    assert!(!may("planner", "admin") && !may("worker", "admin"));
}

#[test]
fn unknown_keys_are_refused_with_the_key_and_its_line() {
    let scratch = Scratch::new("unknown");
    let cases = [
        ("top: level\n", "top", 1),
        ("gateway:\n  rate_limit:\n    per_second: 5\n", "per_second", 3),
        ("agents:\n  - agent_id: a\n    tls_cert_path: a.pem\n    tls_key_path: a.key\n    colour: red\n", "colour", 5),
        ("permissions:\n  - {type: allow_everything, agent_id: a}\n", "allow_everything", 2),
    ];
    let base = "tls_ca_path: ca.pem\ntls_server_cert_path: s.pem\ntls_server_key_path: s.key\n";
    for (extra, key, line) in cases {
        let path = scratch.write("mas.yaml", &format!("{base}{extra}"));
        let err = Project::load(&path).unwrap_err().to_string();
        let line = line + 3;
        assert!(err.contains(key), "{key}: {err}");
        assert!(err.contains(&format!("line {line}")), "{key} should be reported at line {line}: {err}");
    }
    let path =
        scratch.write("mas.json", r#"{"tls_ca_path":"a","tls_server_cert_path":"b","tls_server_key_path":"c","x":1}"#);
    let err = Project::load(&path).unwrap_err().to_string();
    assert!(err.contains("`x`") && err.contains("line 1"), "{err}");
}

#[test]
fn runner_rules_are_checked_before_anything_starts() {
    let scratch = Scratch::new("rules");
    let base = "tls_ca_path: ca.pem\ntls_server_cert_path: s.pem\ntls_server_key_path: s.key\nagents:\n";
    let entry =
        |rest: &str| format!("{base}  - agent_id: a\n    tls_cert_path: a.pem\n    tls_key_path: a.key\n{rest}");
    let cases = [
        (entry("    class_path: no_colon\n"), "module:ClassName"),
        (entry("    class_path: m:C\n    command: [x]\n"), "not both"),
        (entry("    command: []\n"), "must name a program"),
        (entry("    command: [x]\n    instances: 0\n"), "instances must be at least 1"),
        (entry("    command: [x]\n    init_kwargs: {server_addr: x}\n"), "reserved key \"server_addr\""),
        (format!("{}  - agent_id: a\n    tls_cert_path: b\n    tls_key_path: c\n", entry("")), "listed twice"),
        (format!("{}permissions:\n  - {{type: allow, sender: a, targets: [ghost]}}\n", entry("")), "ghost"),
        (format!("{}permissions:\n  - {{type: allow_network, agents: [a]}}\n", entry("")), "too few"),
        (format!("{}server_listen_addr: example.com:1\n", entry("")), "server_listen_addr"),
        (format!("{}runner: {{restart_backoff_initial_ms: 0}}\n", entry("")), "restart_backoff_initial_ms"),
    ];
    for (text, expected) in cases {
        let err = Project::load(&scratch.write("mas.yaml", &text)).unwrap_err().to_string();
        assert!(err.contains(expected), "expected {expected:?} in: {err}\n{text}");
    }
}

#[test]
fn discovery_walks_up_from_a_subdirectory_and_explicit_names_win() {
    let scratch = Scratch::new("discover");
    let project_file = scratch.write("mas.yaml", PROJECT_YAML);
    let deep = scratch.0.join("src/agents/deep");
    std::fs::create_dir_all(&deep).unwrap();
    assert_eq!(locate(None, None, &deep).unwrap(), project_file);
    let other = scratch.write("elsewhere/other.yaml", PROJECT_YAML);
    assert_eq!(locate(None, Some(&other), &deep).unwrap(), other, "the environment beats discovery");
    let explicit = Path::new("/explicit.yaml");
    assert_eq!(locate(Some(explicit), Some(&other), &deep).unwrap(), explicit, "--config beats the environment");
    let err = Project::load(Path::new("/no/such/mas.yaml")).unwrap_err().to_string();
    assert!(err.contains("config file not found: /no/such/mas.yaml"), "{err}");
    let empty = Scratch::new("discover-none");
    let err = locate(None, None, &empty.0).unwrap_err().to_string();
    assert!(err.contains("mas.yaml not found"), "{err}");
}

/// mas's earlier JSON broker files (`agents` as a map) still load, and the same file in YAML
/// syntax is the same configuration.
#[test]
fn broker_files_keep_working_in_json_and_yaml() {
    let scratch = Scratch::new("legacy");
    let json = r#"{"listen_addr":"127.0.0.1:0","tls":{"server_cert_path":"s.pem","server_key_path":"s.key",
        "client_ca_path":"/abs/ca.pem"},"agents":{"alice":{"allowed_targets":["bob"]},"bob":{}}}"#;
    let yaml = "listen_addr: 127.0.0.1:0\ntls:\n  server_cert_path: s.pem\n  server_key_path: s.key\n  \
                client_ca_path: /abs/ca.pem\nagents:\n  alice: {allowed_targets: [bob]}\n  bob: {}\n";
    let from_json = Project::load(&scratch.write("broker.json", json)).unwrap();
    let from_yaml = Project::load(&scratch.write("broker.yaml", yaml)).unwrap();
    assert_eq!(from_json.broker, from_yaml.broker);
    assert!(from_json.agents.is_empty());
    let tls = from_json.broker.tls.clone().unwrap();
    assert_eq!(tls.server_cert_path, scratch.0.join("s.pem"));
    assert_eq!(tls.client_ca_path, Path::new("/abs/ca.pem"));
    assert!(from_json.broker.authz_policy().visible(&id("alice"), &id("bob")));
}

/// A `gateway` as the reference writes it, with its Redis and audit-retention keys.
#[cfg(not(madsim))]
const REFERENCE_GATEWAY: &str = r#"
gateway:
  redis:
    url: redis://127.0.0.1:6391/2
    socket_timeout: 2.5
    pool: {max_connections: 2, acquire_timeout_seconds: 1.5}
    durability: {replica_count: 0, timeout_ms: 1000, wait_for_aof: false}
  audit:
    file_path: audit.jsonl
    retention: {max_messages: 40000, max_security_events: 60000, batch_size: 500, archive_directory: archive}
"#;

#[cfg(not(madsim))] // no Redis backend under simulation
#[test]
fn the_references_redis_and_audit_retention_keys_map_onto_mass_settings() {
    let scratch = Scratch::new("reference-gateway");
    let base = "tls_ca_path: ca.pem\ntls_server_cert_path: s.pem\ntls_server_key_path: s.key\n\
                agents: [{agent_id: a, tls_cert_path: a.pem, tls_key_path: a.key}]\n";
    let project = Project::load(&scratch.write("mas.yaml", &format!("{base}{REFERENCE_GATEWAY}"))).unwrap();
    let redis = project.broker.redis.as_ref().expect("a redis section");
    assert_eq!(redis.url, "redis://127.0.0.1:6391/2");
    assert_eq!(redis.response_timeout_ms, 2_500, "socket_timeout is seconds");
    assert_eq!(redis.pool_size, 2, "max_connections caps the pool");
    let audit = &project.broker.gateway.audit;
    assert_eq!(audit.max_records_per_chain, 60_000, "every chain gets the larger bound");
    assert_eq!(audit.archive_batch, 500);
    assert_eq!(audit.archive_dir.as_deref(), Some(scratch.0.join("archive").as_path()), "resolved");
    assert_eq!(audit.on_full, crate::config::OnFullChain::Archive);

    let bare = Project::load(&scratch.write("mas.yaml", &format!("{base}gateway:\n  redis: {{}}\n"))).unwrap();
    assert_eq!(bare.broker.redis.unwrap().url, "redis://localhost:6379", "the reference's default URL");
}

#[test]
fn reference_keys_mas_cannot_honour_are_refused_by_name() {
    let scratch = Scratch::new("reference-refused");
    let base = "tls_ca_path: ca.pem\ntls_server_cert_path: s.pem\ntls_server_key_path: s.key\ngateway:\n";
    let cases = [
        ("  redis: {sentinel: {service_name: m, sentinels: [[h, 26379]]}}\n", "gateway.redis.sentinel"),
        ("  redis: {durability: {replica_count: 1}}\n", "gateway.redis.durability"),
        ("  redis: {durability: {wait_for_aof: true}}\n", "WAIT/WAITAOF"),
        ("  redis: {socket_timeout: 0}\n", "gateway.redis.socket_timeout"),
        ("  redis: {socket_timeout: 1, response_timeout_ms: 5}\n", "give one"),
        ("  redis: {pool: {max_connections: 0}}\n", "pool.max_connections"),
        ("  audit: {retention: {batch_size: 20000}}\n", "retention.batch_size"),
        ("  audit: {retention: {}, max_records_per_chain: 5}\n", "retention and max_records_per_chain"),
    ];
    for (extra, expected) in cases {
        let err = Project::load(&scratch.write("mas.yaml", &format!("{base}{extra}"))).unwrap_err().to_string();
        assert!(err.contains(expected), "expected {expected:?} in: {err}\n{extra}");
    }
}
