//! Generated gRPC types and stubs for `mas.runtime.v1.RuntimeService`.
//!
//! The `.proto` keeps the Python mas-framework's names and field numbers exactly; it is the
//! compatibility contract with existing agents.

#![allow(missing_docs, clippy::all)]

/// `mas.runtime.v1`: messages, the server trait and the client stub.
pub mod v1 {
    tonic::include_proto!("mas.runtime.v1");
}
