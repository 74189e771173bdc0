//! Transport plumbing shared by the mas broker and the agent SDK.
//!
//! * [`identity`]: the SPIFFE identity rules (`spiffe://mas/agent/{id}`) and where the
//!   identity comes from: the verified client certificate in production, a metadata header
//!   under simulation (madsim does not simulate TLS; that path only exists under `cfg(madsim)`).
//! * [`status`]: the one mapping from our errors to gRPC status codes and the reference's
//!   detail strings, which clients match on.
//! * [`client`]: the interceptor-carrying client type, named once for both modes.
//! * [`telemetry`]: tracing settings, the OTLP pipeline, W3C context on the wire.
//! * `tls` and `pki` (production only): rustls configuration and the pure-Rust dev PKI.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod identity;
#[cfg(not(madsim))]
pub mod pki;
pub mod status;
pub mod telemetry;
#[cfg(not(madsim))]
pub mod tls;
