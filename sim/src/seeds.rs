//! Seed selection, the regression file, and reproducible failure reports.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

/// Seeds that failed once; replayed by every run. One decimal seed per line, `#` comments.
const REGRESSIONS: &str = include_str!("../seeds/regressions.txt");

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={value:?} is not a number"),
    }
}

/// The seeds a scenario runs: `SIM_SEED` alone if set; otherwise the regression seeds, then
/// `SIM_SEEDS` (default 50) consecutive seeds from `SIM_SEED_BASE` (default 0).
pub fn selected() -> Vec<u64> {
    if let Some(seed) = env_u64("SIM_SEED") {
        return vec![seed];
    }
    let mut seeds: Vec<u64> = REGRESSIONS
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().unwrap_or_else(|_| panic!("bad seed {l:?} in sim/seeds/regressions.txt")))
        .collect();
    let base = env_u64("SIM_SEED_BASE").unwrap_or(0);
    let count = env_u64("SIM_SEEDS").unwrap_or(50);
    seeds.extend(base..base.saturating_add(count));
    seeds
}

/// Runs `scenario` once per selected seed, each in a fresh simulation. On failure prints the
/// seed and the command that replays exactly that run, then fails the test.
pub fn run_each(test_name: &str, mut scenario: impl FnMut(u64)) {
    let seeds = selected();
    for &seed in &seeds {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| scenario(seed))) {
            eprintln!(
                "\n=== simulation `{test_name}` FAILED with seed {seed}\n    reproduce: SIM_SEED={seed} SIM_ARGS=\"{test_name} --nocapture\" cargo test -p sim\n    (then add {seed} to sim/seeds/regressions.txt)\n"
            );
            resume_unwind(panic);
        }
    }
    eprintln!("simulation `{test_name}`: {} seeds passed ({:?}..={:?})", seeds.len(), seeds.first(), seeds.last());
}

/// Runs `body` in a fresh madsim runtime seeded with `seed`.
pub fn simulate<F: std::future::Future>(seed: u64, config: madsim::Config, body: impl FnOnce() -> F) -> F::Output {
    if std::env::var_os("RUST_LOG").is_some() {
        madsim::runtime::init_logger();
    }
    let runtime = madsim::runtime::Runtime::with_seed_and_config(seed, config);
    runtime.block_on(body())
}
