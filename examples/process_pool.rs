//! ProcessPool: the quickstart's batch in worker processes only, first with `map` (results in
//! input order), then with handles and `wait` for the first one to finish.
//!
//! Run it from the workspace root:
//!
//! ```text
//! cargo run --release --example process_pool
//! ```

use std::time::Duration;

use futures::TryStreamExt;
use offload::prelude::*;
use offload::{wait, ReturnWhen};

/// The quickstart's batch: 64 ranges of 175 000 numbers.
const RANGES: u64 = 64;
const WIDTH: u64 = 175_000;

/// Counts the primes in `lo..hi` by trial division.
#[offload::task]
fn count_primes(lo: u64, hi: u64) -> u64 {
    let is_prime = |n: u64| n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0);
    (lo..hi).filter(|&n| is_prime(n)).count() as u64
}

fn main() -> anyhow::Result<()> {
    // Workers re-run this program: in them, `init` serves tasks and never returns.
    offload::init();
    // The pool needs no runtime of its own (it runs its I/O thread); this one is for `.await`.
    let pool = offload::ProcessPool::builder().workers(2).build()?;
    tokio::runtime::Runtime::new()?.block_on(run(&pool))?;
    // Graceful shutdown, then block until every worker process has exited and been reaped.
    pool.join();
    Ok(())
}

async fn run(pool: &offload::ProcessPool) -> anyhow::Result<()> {
    // 1. `map`: a lazy stream of results in input order (like `pool.imap` in Python).
    let tasks = (0..RANGES).map(|i| CountPrimes {
        lo: i * WIDTH,
        hi: (i + 1) * WIDTH,
    });
    let counts: Vec<u64> = pool.map(tasks).try_collect().await?;
    let total: u64 = counts.iter().sum();
    println!("map: {total} primes below {}", RANGES * WIDTH);
    println!("map: per range, in input order: {:?} ...", &counts[..6]);

    // 2. Handles and `wait`: the small range finishes first; the big one is still running.
    let big = CountPrimes {
        lo: 0,
        hi: 4_000_000,
    };
    let handles = vec![
        pool.submit(big),
        pool.submit(CountPrimes { lo: 0, hi: 1000 }),
    ];
    let timeout = Some(Duration::from_secs(60));
    let waited = wait(handles, ReturnWhen::FirstCompleted, timeout).await;
    for (index, handle) in waited.done {
        let primes = handle.await?;
        println!("wait: task {index} finished first: {primes} primes");
    }
    for (index, handle) in waited.pending {
        println!("wait: task {index} is running: {}", handle.is_running());
        println!("wait: ... and then found {} primes", handle.await?);
    }
    Ok(())
}
