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
//!     .start()
//!     .await?;
//! agent.send("bob", "greeting", &serde_json::json!({"text": "hi"})).await?;
//! agent.stop().await;
//! # Ok(()) }
//! ```
//!
//! Delivery is at least once: handlers must tolerate seeing a message twice (deduplicate on
//! `message.envelope.message_id`, which is stable across redeliveries).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod agent;
mod config;
mod handler;
mod requests;
mod state;
mod trace;
mod transport;

pub use agent::{Agent, AgentBuilder, AgentError, AgentInfo};
pub use config::AgentConfig;
pub use handler::{HandlerError, Handlers, Message, Outcome};
pub use state::TypedState;
