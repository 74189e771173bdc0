//! Deterministic simulation of the real broker and agent code on madsim.
//!
//! Every scenario runs the production `mas-server` and `mas-agent` code on simulated nodes
//! (virtual clock, simulated network with loss, partitions and node crashes), from one seed
//! that decides the workload and the fault plan. Checkers outside the code under test judge
//! the whole run from a `trace::Trace` of observed events.
//!
//! Seeds: each scenario runs `SIM_SEEDS` seeds (default 50) starting at `SIM_SEED_BASE`
//! (default 0), plus every seed in `sim/seeds/regressions.txt`; `SIM_SEED=<n>` runs one seed.
//! A failing seed prints the exact command that reproduces it.
//!
//! Under a normal build this crate is empty: see `tests/madsim_trampoline.rs`.

#![cfg(madsim)]
#![forbid(unsafe_code)]

pub mod faults;
pub mod seeds;
pub mod trace;
pub mod workload;
pub mod world;
