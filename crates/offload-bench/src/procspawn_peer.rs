//! The Rust peer: `procspawn`'s `Pool` (worker processes that re-execute this binary and talk
//! over `ipc-channel`). Rows `process.*.procspawn`.
//!
//! `procspawn::init()` runs in `main` next to `offload::init()`: a procspawn worker is this
//! binary started with procspawn's own environment variable, and never returns from it.

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{ensure, Context as _};

/// Tasks a submit sample keeps outstanding at most. procspawn holds three file descriptors
/// per queued task, so 20,000 at once exceed the usual limit of open files (which is why
/// the offload and Python samples queue all of theirs, and this one cannot).
pub(crate) const WINDOW: usize = 1024;

/// Starts procspawn's machinery; call first thing in `main`. In a procspawn worker it serves
/// and never returns.
pub(crate) fn init() {
    // SAFETY: procspawn re-executes this binary and calls functions by address; that is
    // sound only if the binary loads no shared library at run time that the child would not
    // load alike (its `safe-shared-libraries` feature checks this; it is off, to keep the
    // bench's dependencies few). The bench loads none: everything is linked at build time.
    unsafe { procspawn::assert_spawn_is_safe() };
    procspawn::init();
}

/// A warm procspawn pool of `workers` processes.
pub(crate) struct Procspawn {
    pool: procspawn::Pool,
}

fn identity(x: u64) -> u64 {
    x
}

impl Procspawn {
    pub(crate) fn start(workers: usize) -> anyhow::Result<Self> {
        let pool = procspawn::Pool::new(workers).context("could not start a procspawn pool")?;
        let me = Procspawn { pool };
        me.roundtrip(0)?;
        Ok(me)
    }

    /// One task there and back.
    pub(crate) fn roundtrip(&self, x: u64) -> anyhow::Result<()> {
        let y = self
            .pool
            .spawn(x, identity)
            .join()
            .context("procspawn task failed")?;
        ensure!(y == x, "procspawn returned {y} for {x}");
        Ok(())
    }

    /// `n` tiny tasks submitted one by one (at most [`WINDOW`] outstanding), all joined;
    /// tasks per second.
    pub(crate) fn submit_rate(&self, n: u64) -> anyhow::Result<f64> {
        let start = Instant::now();
        let mut outstanding = VecDeque::with_capacity(WINDOW);
        for x in 0..n {
            if outstanding.len() == WINDOW {
                join_one(&mut outstanding)?;
            }
            outstanding.push_back((x, self.pool.spawn(x, identity)));
        }
        while !outstanding.is_empty() {
            join_one(&mut outstanding)?;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }

    /// A fresh pool of `workers` to its first result; milliseconds. Shutting it down is not
    /// timed.
    pub(crate) fn startup_ms(workers: usize) -> anyhow::Result<f64> {
        let start = Instant::now();
        let pool = procspawn::Pool::new(workers).context("could not start a procspawn pool")?;
        let y = pool
            .spawn(1, identity)
            .join()
            .context("procspawn task failed")?;
        let elapsed = start.elapsed().as_secs_f64() * 1e3;
        ensure!(y == 1, "procspawn returned {y} for 1");
        drop(pool);
        Ok(elapsed)
    }
}

fn join_one(outstanding: &mut VecDeque<(u64, procspawn::JoinHandle<u64>)>) -> anyhow::Result<()> {
    if let Some((x, handle)) = outstanding.pop_front() {
        let y = handle.join().context("procspawn task failed")?;
        ensure!(y == x, "procspawn returned {y} for {x}");
    }
    Ok(())
}
