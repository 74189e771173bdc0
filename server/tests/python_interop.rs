//! The Python interop suite (`tests/python/run`): real third-party clients — grpcio stubs for
//! `mas.runtime.v1`, the PyPI `mas.Agent` of mas-framework 0.4.5 for `mas.v1` — against this
//! build's `mas` binary started as a process, on the embedded store and on Redis.
//!
//! Outside CI the script skips with a loud message when Python 3.13 or its packages are
//! missing; with `CI=true` that is a failure.

#![cfg(not(madsim))]

use std::path::Path;
use std::process::Command;

#[test]
fn python_clients_of_both_wire_generations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let status = Command::new(root.join("tests/python/run"))
        .arg("-v")
        .env("MAS_BIN", env!("CARGO_BIN_EXE_mas"))
        .current_dir(root)
        .status()
        .expect("tests/python/run starts");
    assert!(status.success(), "the Python interop suite failed: {status}");
}
