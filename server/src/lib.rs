//! The mas broker.
//!
//! Agents connect over mutual TLS; their identity is the SPIFFE URI of their certificate. The
//! broker authorizes every message (deny by default), queues it in the store, and delivers it
//! at least once to one instance of the target agent through that instance's `Transport`
//! stream, with per-delivery ack deadlines, retry backoff and a dead-letter queue.
//!
//! Layout: [`config`] (read once), [`broker`] (shared state), [`service`] (gRPC handlers and
//! the admission pipeline), [`session`] (one task per agent instance driving `mas_core`'s
//! delivery machine), [`store`] (the embedded and Redis stores), [`audit`] (file sink,
//! archiving, security events, verification and queries), [`serve`] (listener setup; the only
//! code that differs under madsim), [`metrics`] (Prometheus instruments), [`admin`] (the admin HTTP
//! listener: metrics and health probes), `operator` (the admin gRPC API for operators).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(not(madsim))]
pub mod admin;
pub mod audit;
pub mod broker;
pub mod clock;
pub mod config;
mod delivery_trace;
#[cfg(not(madsim))]
pub mod listener;
pub mod metrics;
#[cfg(not(madsim))]
pub mod operator;
#[cfg(not(madsim))]
pub mod preflight;
pub mod project;
#[cfg(not(madsim))]
pub mod runner;
pub mod serve;
pub mod service;
pub mod session;
#[cfg(not(madsim))]
pub mod status;
pub mod store;

pub use broker::Broker;
pub use config::{AgentDefinition, BrokerConfig};
