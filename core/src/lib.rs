//! Sans-IO core of mas.
//!
//! Everything here is plain synchronous code: it never reads a clock, never draws from an
//! unseeded RNG, never touches a socket, a thread, a file or a database. Time comes in as
//! [`time::Now`]; effects go out as values. The tokio/tonic shell in `mas-server` and the
//! madsim simulation in `sim` drive the same machines.
//!
//! Driving contract for every machine: after any `handle_*` call, drain `poll_output` until it
//! returns `None`, then re-read `poll_timeout` and call `handle_timeout` when it is due.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod admission;
pub mod delivery;
pub mod envelope;
pub mod ids;
pub mod limits;
pub mod payload;
pub mod policy;
pub mod reply;
pub mod store;
pub mod time;
