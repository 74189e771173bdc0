//! Makes a plain `cargo test -p sim` (and `cargo test --workspace`) run the madsim suite.
//!
//! madsim switches on the rustc cfg `madsim`, which only RUSTFLAGS can set. This test re-runs
//! `cargo test -p sim --tests` with `--cfg madsim` appended to RUSTFLAGS, in the same target
//! directory (cargo hashes RUSTFLAGS into artifact names, so both builds live side by side).
//! Under the cfg this file is empty, so it cannot recurse.
//!
//! * `SIM_ARGS="<filter> --nocapture"` passes arguments to the simulated test binaries.
//! * `SIM_SKIP_MADSIM=1` turns the trampoline off.

#![cfg(not(madsim))]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn madsim_suite() {
    if std::env::var_os("SIM_SKIP_MADSIM").is_some() {
        eprintln!("SIM_SKIP_MADSIM is set: the madsim suite was NOT run");
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    // CARGO_TARGET_TMPDIR is <target>/tmp; its parent is the target directory in use.
    let target_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(PathBuf::from)
        .expect("CARGO_TARGET_TMPDIR has a parent");
    let rustflags = match std::env::var("RUSTFLAGS") {
        Ok(flags) if !flags.trim().is_empty() => format!("{flags} --cfg madsim"),
        _ => "--cfg madsim".to_string(),
    };
    let sim_args = std::env::var("SIM_ARGS").unwrap_or_default();
    let status = Command::new(cargo)
        .args(["test", "-p", "sim", "--tests", "--target-dir"])
        .arg(&target_dir)
        .args(["--", "--test-threads", "1"])
        .args(sim_args.split_whitespace())
        .env("RUSTFLAGS", rustflags)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run the nested cargo");
    assert!(status.success(), "the madsim suite failed (see its output above)");
}
