//! The Rust agent SDK for mas.
//!
//! ```no_run
//! # async fn demo(config: mas_agent::AgentConfig) -> Result<(), mas_agent::AgentError> {
//! use mas_agent::{AgentBuilder, Message, HandlerError};
//!
//! #[derive(serde::Deserialize)]
//! struct Greeting { text: String }
//!
//! let agent = AgentBuilder::new(config)
//!     .on("greeting", |_agent, msg: Message<Greeting>| async move {
//!         println!("{} says {}", msg.envelope.sender_id, msg.payload.text);
//!         Ok::<(), HandlerError>(())
//!     })
//!     // After Welcome, before `start` returns; a failure stops the agent again.
//!     .on_start(|agent| async move {
//!         agent.send("bob", "greeting", &serde_json::json!({"text": "I am up"})).await?;
//!         Ok(())
//!     })
//!     // First thing in `stop`, while the agent can still send.
//!     .on_stop(|_agent| async { Ok(()) })
//!     .start()
//!     .await?;
//! agent.send("bob", "greeting", &serde_json::json!({"text": "hi"})).await?;
//! let answer = agent.ask("bob", "question", &serde_json::json!({})).await?; // 60 s default
//! println!("bob answered {:?}", answer.data);
//! agent.stop().await;
//! # Ok(()) }
//! ```
//!
//! Typed state, replies and restart, as a `mas run` agent would use them:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use mas_agent::{AgentBuilder, AgentConfig, Message};
//!
//! #[derive(Default, serde::Serialize, serde::Deserialize)]
//! struct Counter { seen: u64 }
//!
//! let builder = AgentBuilder::new(AgentConfig::from_env()?) // MAS_* set by `mas run`
//!     .with_state::<Counter>() // loaded before the first delivery and before on_start
//!     .on("ping", |agent, ping: Message<serde_json::Value>| async move {
//!         let state = agent.state::<Counter>()?;
//!         let mut counter = state.lock().await;
//!         let seen = counter.get().seen + 1;
//!         // A compare-and-set on the loaded revision, merging only the fields given.
//!         counter.update(serde_json::Map::from_iter([("seen".into(), seen.into())])).await?;
//!         ping.reply("pong", &serde_json::json!({ "seen": seen })).await?;
//!         Ok(())
//!     });
//! let agent = builder.start().await?;
//! agent.stop().await;
//! let agent = agent.restart().await?; // same instance id, a new session
//! agent.stop().await;
//! # Ok(()) }
//! ```
//!
//! Delivery is at least once: handlers must tolerate seeing a message twice (deduplicate on
//! `message.envelope.message_id`, which is stable across redeliveries).
//!
//! Tracing: with [`telemetry::install`] (or your own subscriber carrying the layer of
//! `mas_net::telemetry::start`) the SDK emits a CLIENT span per call to the broker, with the
//! context in the call's metadata, and a CONSUMER span around every handler, parented on the
//! delivered envelope's `meta.traceparent`; calls made inside a handler continue its trace.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod agent;
mod config;
mod handler;
mod outbox;
mod requests;
mod state;
mod trace;
mod transport;

/// Distributed tracing for agents: the `telemetry` settings and the subscriber installer,
/// shared with the broker.
pub mod telemetry {
    pub use mas_net::telemetry::TelemetrySettings;
    #[cfg(not(madsim))]
    pub use mas_net::telemetry::{TelemetryError, TelemetryGuard, install};
}

pub use agent::{Agent, AgentBuilder, AgentError, AgentInfo, SharedState};
#[cfg(not(madsim))]
pub use config::shutdown_signal;
pub use config::{AgentConfig, EnvError, env, init_kwargs, instance_index};
pub use handler::{HandlerError, Handlers, Message, Outcome};
pub use state::TypedState;
