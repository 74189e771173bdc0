//! Generated gRPC types and stubs for both generations of the wire protocol:
//! `mas.runtime.v1.RuntimeService` (mas-framework 0.5 and later) and `mas.v1.MasService`
//! (mas-framework 0.4.x, the release on PyPI); and mas's own operator plane,
//! `mas.admin.v1.AdminService`.
//!
//! The `.proto` files keep the Python mas-framework's names and field numbers exactly; they are
//! the compatibility contract with existing agents.

#![allow(missing_docs, clippy::all)]

/// The proto packages, nested as their names are (`mas.runtime.v1`, `mas.v1`), so that the
/// generated cross-package paths resolve.
pub mod mas {
    pub mod runtime {
        /// `mas.runtime.v1`: messages, the server trait and the client stub.
        pub mod v1 {
            tonic::include_proto!("mas.runtime.v1");
        }
    }

    /// `mas.v1`: the `MasService` server trait and client stub over the runtime messages.
    pub mod v1 {
        tonic::include_proto!("mas.v1");
    }

    /// `mas.admin.v1`: the operator plane.
    pub mod admin {
        /// Messages, the `AdminService` server trait and its client stub.
        pub mod v1 {
            tonic::include_proto!("mas.admin.v1");
        }
    }
}

#[cfg(not(madsim))]
pub mod codec;

/// `mas.admin.v1`, the operator plane (`AdminService`).
pub use mas::admin::v1 as admin;

/// `mas.runtime.v1`, the current generation: messages, `RuntimeService` server and client.
pub use mas::runtime::v1 as runtime;

/// `mas.v1`, the earlier generation (`MasService`); its messages are [`runtime`]'s.
pub use mas::v1 as mas_v1;
