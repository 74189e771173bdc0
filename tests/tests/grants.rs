//! Operators' grant changes through `Broker::change_grants`: two brokers on one store see the
//! same policy, a broker started later on that store begins with it, and concurrent changes
//! to different agents are all kept (compare-and-set with retry).

#![cfg(not(madsim))]

use std::collections::BTreeMap;
use std::sync::Arc;

use mas_core::policy::authz::Denial;
use mas_core::policy::overlay::GrantChange;
use mas_core::store::MemoryStoreConfig;
use mas_server::config::{AgentDefinition, PermissionPreset};
use mas_server::store::redis::{RedisBackend, RedisSettings};
use mas_server::store::{MemoryBackend, Store};
use mas_server::{Broker, BrokerConfig};
use mas_tests::id;
use mas_tests::redis_server::RedisServer;

fn config() -> BrokerConfig {
    let agents = BTreeMap::from([
        (id("alice"), AgentDefinition::allowing(&["bob", "carol"])),
        (id("bob"), AgentDefinition::allowing(&["alice"])),
        (id("carol"), AgentDefinition::allowing::<&str>(&[])),
    ]);
    BrokerConfig::new("127.0.0.1:0".parse().unwrap(), agents)
}

fn revoke(target: &str) -> GrantChange {
    GrantChange { revoke: vec![target.into()], ..GrantChange::default() }
}

#[tokio::test]
async fn a_change_through_one_broker_is_the_policy_of_every_broker_on_the_store() {
    let store = Store::from(MemoryBackend::new(MemoryStoreConfig::default()));
    let a = Broker::with_store(config(), store.clone()).unwrap();
    let b = Broker::with_store(config(), store.clone()).unwrap();
    assert!(b.authorize(&id("alice"), &id("bob"), true).is_ok());

    let (revision, grants) = a.change_grants(&id("alice"), &revoke("bob")).await.unwrap();
    assert_eq!(revision, 1);
    assert!(!grants.allowed.contains("bob") && grants.allowed.contains("carol"));
    assert_eq!(a.authorize(&id("alice"), &id("bob"), true), Err(Denial::NotGranted), "at once where it was made");
    assert!(b.refresh_authz().await.unwrap(), "the other broker sees the new revision");
    assert_eq!(b.authorize(&id("alice"), &id("bob"), true), Err(Denial::NotGranted));
    assert!(!b.refresh_authz().await.unwrap(), "nothing new: nothing re-read");

    let later = Broker::with_store(config(), store.clone()).unwrap();
    assert!(later.refresh_authz().await.unwrap());
    assert_eq!(later.grants(&id("alice")), a.grants(&id("alice")), "a broker started later begins with it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_through_two_brokers_are_all_kept() {
    concurrent_changes_are_all_kept(Store::from(MemoryBackend::new(MemoryStoreConfig::default()))).await;
    // On Redis the two brokers' compare-and-sets really race (the memory store never yields).
    let Some(redis) = RedisServer::start() else { return };
    let backend = RedisBackend::connect(&RedisSettings::new(&redis.url)).await.expect("test redis-server");
    concurrent_changes_are_all_kept(Store::from(backend)).await;
}

async fn concurrent_changes_are_all_kept(store: Store) {
    let a = Broker::with_store(config(), store.clone()).unwrap();
    let b = Broker::with_store(config(), store.clone()).unwrap();
    let changes = (0..20).map(|i| {
        let (broker, agent, target): (Arc<Broker>, _, _) =
            if i % 2 == 0 { (a.clone(), "alice", "carol") } else { (b.clone(), "bob", "carol") };
        async move {
            let change = GrantChange { block: vec![format!("{target}{i}")], ..GrantChange::default() };
            broker.change_grants(&id(agent), &change).await.unwrap().0
        }
    });
    let revisions: Vec<u64> = futures_util::future::join_all(changes.map(tokio::spawn))
        .await
        .into_iter()
        .map(|joined| joined.expect("change task"))
        .collect();
    assert_eq!(revisions.iter().max(), Some(&20), "every change got its own revision");
    b.refresh_authz().await.unwrap();
    a.refresh_authz().await.unwrap();
    for broker in [&a, &b] {
        let blocked = |agent: &str| broker.grants(&id(agent)).blocked.len();
        assert_eq!((blocked("alice"), blocked("bob")), (10, 10), "no change was lost");
        assert!(broker.grants(&id("alice")).allowed.contains("bob"), "untouched grants stay");
    }
}

#[tokio::test]
async fn a_preset_applied_through_one_broker_grants_on_the_other() {
    let store = Store::from(MemoryBackend::new(MemoryStoreConfig::default()));
    let a = Broker::with_store(config(), store.clone()).unwrap();
    let b = Broker::with_store(config(), store.clone()).unwrap();
    assert_eq!(b.authorize(&id("carol"), &id("bob"), true), Err(Denial::NotGranted));
    let preset =
        PermissionPreset::AllowNetwork { agents: vec![id("alice"), id("bob"), id("carol")], bidirectional: true };
    let (revision, grants) = a.apply_preset(&preset).await.unwrap();
    assert_eq!((revision, grants.len()), (1, 3));
    b.refresh_authz().await.unwrap();
    assert!(b.authorize(&id("carol"), &id("bob"), true).is_ok());
    assert!(b.authorize(&id("bob"), &id("carol"), true).is_ok());
}
