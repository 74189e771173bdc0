//! Policy engines of the admission pipeline, as pure code with time passed in:
//! authorization ([`authz`]), rate limiting ([`ratelimit`]), circuit breaking ([`circuit`]),
//! data-loss prevention ([`dlp`]) and the tamper-evident audit chain ([`audit`]). Their state is
//! plain data the broker keeps in its store; every decision is a function of that state, the
//! message and `now`.

pub mod audit;
pub mod authz;
pub mod circuit;
pub mod dlp;
pub mod overlay;
pub mod ratelimit;
pub mod repeats;
