//! The Redis store's wake-ups: an idle claim waits on the `mas:notify:*` subscription instead
//! of polling, and the subscription is made again when it breaks.

#![cfg(not(madsim))]

use std::sync::Arc;
use std::time::Duration;

use mas_core::ids::{AgentId, InstanceId};
use mas_core::store::{OwnerToken, QueueKey, SessionRef};
use mas_server::store::redis::{RedisBackend, RedisSettings};
use mas_server::store::{ClaimCursor, Store};
use mas_tests::redis_server::RedisServer;

const LEASE: Duration = Duration::from_secs(30);

fn bob() -> SessionRef {
    SessionRef {
        agent: AgentId::new("bob").unwrap(),
        instance: InstanceId::new("b1").unwrap(),
        owner: OwnerToken::new("owner-1"),
    }
}

/// A store on a private Redis with bob's session leased, and a plain connection to look at
/// the server with.
async fn leased() -> Option<(RedisServer, Store, redis::aio::MultiplexedConnection, SessionRef)> {
    let redis = RedisServer::start()?;
    let backend =
        RedisBackend::connect(&RedisSettings::new(&redis.url)).await.expect("connect to the test redis-server");
    let admin = redis::Client::open(redis.url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let store = Store::from(backend);
    let session = bob();
    assert!(store.acquire_lease(&session, LEASE).await.unwrap());
    Some((redis, store, admin, session))
}

/// Script calls Redis has answered so far (`INFO commandstats`).
async fn script_calls(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(admin).await.unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// The ids of the clients that hold a subscription.
async fn subscribers(admin: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let list: String = redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub").query_async(admin).await.unwrap();
    list.lines().filter_map(|l| l.split_whitespace().next()?.strip_prefix("id=").map(str::to_string)).collect()
}

#[tokio::test]
async fn an_idle_claim_waits_on_the_subscription_instead_of_polling() {
    let Some((_redis, store, mut admin, session)) = leased().await else { return };
    assert!(store.wakeups_live());

    // Loads the claim script (its first EVALSHA is answered NOSCRIPT and sent again).
    assert!(store.claim(&session, 16, Duration::ZERO).await.unwrap().is_empty());

    let before = script_calls(&mut admin).await;
    let batch = store.claim(&session, 16, Duration::from_secs(2)).await.unwrap();
    let calls = script_calls(&mut admin).await - before;
    assert!(batch.is_empty());
    // One claim when it starts and one when the wait is over; a 250 ms poll made eight or more.
    assert!(calls <= 2, "an idle claim of 2 s made {calls} script calls");
}

#[tokio::test]
async fn a_session_claiming_again_after_a_drained_claim_asks_redis_only_when_its_wait_ends() {
    let Some((_redis, store, mut admin, session)) = leased().await else { return };
    let (_, cursor) = store.claim_next(&session, 16, Duration::ZERO, ClaimCursor::default()).await.unwrap();

    let before = script_calls(&mut admin).await;
    let (batch, cursor) = store.claim_next(&session, 16, Duration::from_millis(1500), cursor).await.unwrap();
    assert!(batch.is_empty());
    assert_eq!(script_calls(&mut admin).await - before, 1, "one claim, at the end of the wait");

    // Each further idle claim of a session costs one script call, not two.
    let before = script_calls(&mut admin).await;
    store.claim_next(&session, 16, Duration::from_millis(500), cursor).await.unwrap();
    assert_eq!(script_calls(&mut admin).await - before, 1);
}

#[tokio::test]
async fn the_subscription_is_made_again_after_it_breaks_and_wakes_claims_again() {
    let Some((_redis, store, mut admin, session)) = leased().await else { return };
    let first = subscribers(&mut admin).await;
    assert_eq!(first.len(), 1, "{first:?}");

    let _: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut admin).await.unwrap();
    let mut again = Vec::new();
    for _ in 0..100 {
        again = subscribers(&mut admin).await;
        if store.wakeups_live() && again.len() == 1 && again != first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.wakeups_live(), "the subscription did not come back");
    assert!(again.len() == 1 && again != first, "subscribers {first:?} then {again:?}");

    // With the subscription live an idle claim does not poll, so only a wake-up can end this
    // one with the message before its 30 s are over.
    let waiting = tokio::spawn({
        let (store, session) = (store.clone(), session.clone());
        async move { store.claim(&session, 16, Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.enqueue(&QueueKey::Work(session.agent.clone()), Arc::from("{\"n\":1}")).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the claim was not woken")
        .unwrap()
        .unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(&*batch[0].envelope, "{\"n\":1}");
}
