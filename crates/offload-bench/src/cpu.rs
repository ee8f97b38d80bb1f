//! The CPU group: real work, where the pool should pay for itself. Eight equal tasks of
//! calibrated length run one after another on the calling thread, then on a two-worker
//! `ThreadPool` and a two-worker `ProcessPool`; each row is serial time / pool time (2.0 is
//! perfect on two workers).

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use offload::prelude::*;

use crate::report::{Better, Row};
use crate::{stats, Settings};

/// Counts the primes in `lo..hi` by trial division: deterministic, CPU-bound, no memory
/// traffic to speak of.
#[offload::task]
fn count_primes(lo: u64, hi: u64) -> u64 {
    (lo..hi).filter(|&n| is_prime(n)).count() as u64
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

/// Where the counted ranges start: large enough that every number costs the same order of
/// work, so the cost of a range grows linearly with its length.
const LO: u64 = 1_000_000_000;
const TASKS: usize = 8;
const WORKERS: usize = 2;

/// Runs the CPU group.
pub(crate) fn run(settings: &Settings) -> anyhow::Result<Vec<Row>> {
    if !settings.wants(&["cpu.speedup.thread", "cpu.speedup.process"]) {
        return Ok(Vec::new());
    }
    let (target, runs) = if settings.quick {
        (Duration::from_millis(50), 3)
    } else {
        (Duration::from_millis(300), 3)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .context("could not build the tokio runtime")?;
    let pool = offload::ThreadPool::builder()
        .workers(WORKERS)
        .build()
        .context("could not build the offload pool")?;
    let processes = offload::ProcessPool::builder()
        .workers(WORKERS)
        .build()
        .context("could not build the offload process pool")?;

    let len = calibrate(target);
    let hi = LO + len;
    let expected = count_primes(LO, hi);

    let mut speedups = Vec::new();
    let mut process_speedups = Vec::new();
    let mut serial_s = Vec::new();
    let mut pool_s = Vec::new();
    let mut process_s = Vec::new();
    for run in 0..runs {
        eprintln!("[cpu] run {}/{runs}", run + 1);
        let start = Instant::now();
        for _ in 0..TASKS {
            let count = count_primes(black_box(LO), black_box(hi));
            ensure!(count == expected, "serial count changed");
        }
        let serial = start.elapsed().as_secs_f64();

        let parallel = timed_on(&rt, &pool, hi, expected)?;
        let in_processes = timed_on(&rt, &processes, hi, expected)?;

        serial_s.push(serial);
        pool_s.push(parallel);
        process_s.push(in_processes);
        speedups.push(serial / parallel);
        process_speedups.push(serial / in_processes);
    }
    pool.join();
    processes.join();

    let per_task = stats::median(&serial_s) / TASKS as f64;
    let note = format!(
        "{TASKS} tasks of {per_task:.3} s (count_primes over {len} numbers above {LO}) on \
         {WORKERS} workers: serial {:.2} s, pool {:.2} s (medians)",
        stats::median(&serial_s),
        stats::median(&pool_s),
    );
    let process_note = format!(
        "the same tasks on ProcessPool::builder().workers({WORKERS}) (warm): {:.2} s (median)",
        stats::median(&process_s),
    );
    Ok(vec![
        Row::new("cpu.speedup.thread", "x", Better::Higher, speedups).with_note(note),
        Row::new("cpu.speedup.process", "x", Better::Higher, process_speedups)
            .with_note(process_note),
    ])
}

/// Seconds `pool` takes to run the [`TASKS`] tasks, all submitted at once; checks every
/// count against the serial one.
fn timed_on(
    rt: &tokio::runtime::Runtime,
    pool: &impl Executor,
    hi: u64,
    expected: u64,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let counts = rt.block_on(async {
        let handles: Vec<_> = (0..TASKS)
            .map(|_| pool.submit(CountPrimes { lo: LO, hi }))
            .collect();
        let mut counts = Vec::with_capacity(TASKS);
        for handle in handles {
            counts.push(handle.await?);
        }
        Ok::<_, TaskError>(counts)
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    ensure!(
        counts.iter().all(|&c| c == expected),
        "a pool's count differs from the serial one"
    );
    Ok(elapsed)
}

/// The length of a range above [`LO`] whose primes take about `target` to count here.
fn calibrate(target: Duration) -> u64 {
    let mut len: u64 = 1_000;
    loop {
        let start = Instant::now();
        black_box(count_primes(black_box(LO), black_box(LO + len)));
        let elapsed = start.elapsed();
        // Scale from a measurement long enough to trust (a few timer ticks and a
        // scheduler hiccup are lost in 20 ms), then once more from near the target.
        if elapsed >= target / 2 || (elapsed >= Duration::from_millis(20) && len > 1_000) {
            let scaled = len as f64 * target.as_secs_f64() / elapsed.as_secs_f64();
            let scaled = (scaled as u64).max(1);
            if elapsed >= target / 2 {
                return scaled;
            }
            len = scaled;
        } else {
            len *= 4;
        }
    }
}
