//! Quickstart: define a task once, run a CPU-bound batch of it serially, then on a `ThreadPool`
//! and on a `ProcessPool`, stream each pool's results with `as_completed` behind a progress
//! bar, and compare the wall times.
//!
//! Run it from the workspace root (release: the serial baseline takes a few seconds):
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use offload::prelude::*; // `Executor`, `TaskError`, ... and `StreamExt` for `.next()`

/// How many ranges to count primes in, and how wide each one is.
const RANGES: u64 = 64;
const WIDTH: u64 = 175_000;

/// Counts the primes in `lo..hi` by trial division: plain CPU work, no I/O.
///
/// `#[offload::task]` keeps the function as it is and adds a task type next to it,
/// `CountPrimes { lo, hi }`, that any offload executor can run.
#[offload::task]
fn count_primes(lo: u64, hi: u64) -> u64 {
    let is_prime = |n: u64| n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0);
    (lo..hi).filter(|&n| is_prime(n)).count() as u64
}

fn ranges() -> impl Iterator<Item = (u64, u64)> {
    (0..RANGES).map(|i| (i * WIDTH, (i + 1) * WIDTH))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // ProcessPool workers re-run this program: in them, `init` serves tasks and never returns.
    offload::init();

    let limit = RANGES * WIDTH;
    println!("counting the primes below {limit} in {RANGES} ranges");

    // 1. The baseline: one range after another, on this thread. (Blocking an async runtime
    //    like this is exactly what offload is for avoiding; nothing else runs here yet.)
    let start = Instant::now();
    let serial: u64 = ranges().map(|(lo, hi)| count_primes(lo, hi)).sum();
    let serial_time = start.elapsed();
    println!("serial:       {serial} primes in {serial_time:.2?}");

    // 2. A thread pool: one worker thread per CPU.
    let threads = offload::ThreadPool::builder()
        .thread_name("primes")
        .build()?;
    let thread_time = run_batch(&threads, "thread pool", serial).await?;

    // 3. A process pool: one worker process per CPU, running the very same `CountPrimes`
    //    tasks. A crash in a task would take down only its worker, not this program.
    let processes = offload::ProcessPool::builder().build()?;
    let process_time = run_batch(&processes, "process pool", serial).await?;

    println!(
        "speedup:      {:.2}x on threads, {:.2}x on processes",
        speedup(serial_time, thread_time),
        speedup(serial_time, process_time),
    );
    // Dropping the pools shuts them down without blocking; every task has finished already.
    Ok(())
}

/// Runs the batch on any executor and checks its total against the serial one. Submitting
/// returns a handle (a future) at once; `as_completed` yields `(index, result)` as each task
/// finishes, in any order.
async fn run_batch(pool: &impl Executor, name: &str, serial: u64) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let handles: Vec<_> = ranges()
        .map(|(lo, hi)| pool.submit(CountPrimes { lo, hi }))
        .collect();
    let bar = progress_bar(handles.len());
    let mut results = offload::as_completed(handles);
    let mut total = 0;
    while let Some((index, result)) = results.next().await {
        total += result?; // a `TaskError`: the task panicked, its worker crashed, ...
        bar.set_message(format!("range {index} done"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed();
    let workers = pool.workers();
    let label = format!("{name}:");
    println!("{label:<13} {total} primes in {elapsed:.2?} ({workers} workers)");
    anyhow::ensure!(total == serial, "{name}: {total} != serial {serial}");
    Ok(elapsed)
}

/// A bar on stderr; indicatif hides it when stderr is not a terminal, so logs stay clean.
fn progress_bar(len: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} ranges  {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

fn speedup(before: Duration, after: Duration) -> f64 {
    before.as_secs_f64() / after.as_secs_f64()
}
