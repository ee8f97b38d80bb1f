//! Crash recovery: in a ProcessPool one task aborts its worker process and another panics;
//! only those two fail, each with an error that says what happened, and the pool replaces
//! the dead worker and keeps serving.
//!
//! Run it from the workspace root (the panic's default message on stderr is expected):
//!
//! ```text
//! cargo run --release --example crash_recovery
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use offload::prelude::*;

/// Squares `x`, after a pause that spreads the batch over the workers.
#[offload::task]
fn square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(50));
    x * x
}

/// Takes its whole process down, as a segfault in a C library or an `abort()` would.
#[offload::task]
fn abort_worker() -> u64 {
    std::process::abort()
}

/// Fails the Rust way: the panic is caught in the worker, which survives.
#[offload::task]
fn parse(text: String) -> u64 {
    text.parse().expect("not a number")
}

/// The pid of the worker that runs it (after a pause, so that each worker gets one).
#[offload::task]
fn worker_pid() -> u32 {
    std::thread::sleep(Duration::from_millis(100));
    std::process::id()
}

fn main() -> anyhow::Result<()> {
    // Workers re-run this program: in them, `init` serves tasks and never returns.
    offload::init();
    // Tasks queued behind the abort on the same worker never started: the pool runs them
    // on another worker, so only the aborting task fails.
    let pool = offload::ProcessPool::builder().workers(2).build()?;
    println!("worker pids before: {:?}", pids(&pool)?);

    // Six tasks at once: one aborts its worker, one panics, four are fine.
    let jobs = [
        ("square(1)", pool.submit(Square { x: 1 })),
        ("abort_worker()", pool.submit(AbortWorker {})),
        ("square(2)", pool.submit(Square { x: 2 })),
        (
            "parse(\"forty-two\")",
            pool.submit(Parse {
                text: "forty-two".into(),
            }),
        ),
        ("square(3)", pool.submit(Square { x: 3 })),
        ("square(4)", pool.submit(Square { x: 4 })),
    ];
    for (call, handle) in jobs {
        match handle.wait() {
            Ok(value) => println!("{call:<19} = {value}"),
            // The error is typed too: `is_panic()`, `panic_message()`, and for a crash,
            // `TaskError::WorkerCrashed { pid, signal, code, .. }`.
            Err(e) => println!("{call:<19} failed: {e}"),
        }
    }

    // The aborted worker was replaced: one pid is new, and the pool serves as before.
    println!("worker pids after:  {:?}", pids(&pool)?);
    println!("square(12) = {}", pool.submit(Square { x: 12 }).wait()?);
    pool.join();
    Ok(())
}

fn pids(pool: &offload::ProcessPool) -> anyhow::Result<BTreeSet<u32>> {
    let handles: Vec<_> = (0..pool.workers())
        .map(|_| pool.submit(WorkerPid {}))
        .collect();
    handles.into_iter().map(|h| Ok(h.wait()?)).collect()
}
