//! Session opening against a store that fails in the ways Redis can.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mas_core::ids::{AgentId, InstanceId};
use mas_core::store::MemoryStoreConfig;

use super::{Broker, OpenError};
use crate::config::{AgentDefinition, BrokerConfig};
use crate::store::faults::{Fault, StoreFaults};
use crate::store::{MemoryBackend, Store};

/// Loses the answer of the first lease taken; every other step runs normally.
#[derive(Debug, Default)]
struct LoseFirstLeaseAnswer {
    lost: AtomicBool,
}

impl StoreFaults for LoseFirstLeaseAnswer {
    fn before(&self, op: &'static str) -> Fault {
        if op == "acquire_lease" && !self.lost.swap(true, Ordering::SeqCst) {
            return Fault::LoseAnswer;
        }
        Fault::None
    }
}

fn broker_over(store: Store) -> Arc<Broker> {
    let bob = AgentId::new("bob").expect("valid id");
    let agents = BTreeMap::from([(bob, AgentDefinition::allowing::<&str>(&[]))]);
    let config = BrokerConfig::new("127.0.0.1:0".parse().expect("valid address"), agents);
    Broker::with_store(config, store).expect("valid config")
}

/// A lease the store took but whose answer was lost must not refuse the agent's retry until
/// the lease runs out: the failed open releases it.
#[tokio::test]
async fn an_open_whose_lease_answer_was_lost_can_be_retried_at_once() {
    let backend =
        MemoryBackend::new(MemoryStoreConfig::default()).with_faults(Arc::new(LoseFirstLeaseAnswer::default()));
    let broker = broker_over(Store::from(backend));
    let key = (AgentId::new("bob").expect("valid id"), InstanceId::new("b0").expect("valid id"));

    let first = broker.open_session(key.clone()).await;
    assert!(matches!(first, Err(OpenError::Store(_))), "the first open met the lost answer: {first:?}");
    let (session, _) = broker.open_session(key.clone()).await.expect("the retry opens at once");
    assert!(broker.is_connected(&key).await.expect("store answers"));
    broker.close_session(&session).await;
}
