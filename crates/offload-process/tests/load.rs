//! Load: 1,000,000 tasks through `map` and 100,000 through `submit` from 16 concurrent tokio
//! tasks, with the parent's memory bounded. Prints the counts and the peak RSS.
//!
//! `harness = false`: workers re-execute this binary, so `main` calls `init()` first. Its own
//! binary, so the peak RSS it reads is this test's alone.

#![allow(clippy::unwrap_used)] // a test fails loudly by design

use std::time::{Duration, Instant};

use futures::StreamExt;
use offload_core::{register_task, Executor, Task};
use offload_process::ProcessPool;
use serde::{Deserialize, Serialize};

const WATCHDOG: Duration = Duration::from_secs(240);

/// Peak RSS may grow by at most this much over the run: the map window and the in-flight
/// submissions are bounded, so a million tasks must not cost a million tasks' memory.
const MAX_GROWTH_MIB: u64 = 200;

#[derive(Serialize, Deserialize)]
struct Triple(u64);

impl Task for Triple {
    type Output = u64;
    const NAME: &'static str = "load::Triple";
    fn run(self) -> u64 {
        self.0 * 3
    }
}
register_task!(Triple);

/// This process's peak resident set (VmHWM), in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024
}

fn load() {
    let pool = ProcessPool::builder().workers(2).build().unwrap();
    let base = peak_rss_mib();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let started = Instant::now();
    let mapped = rt.block_on(async {
        let mut results = pool.map((0..1_000_000u64).map(Triple));
        let mut n = 0u64;
        while let Some(r) = results.next().await {
            assert_eq!(r.unwrap(), n * 3, "map keeps input order");
            n += 1;
        }
        n
    });
    assert_eq!(mapped, 1_000_000);
    let map_time = started.elapsed();

    let started = Instant::now();
    let submitted = rt.block_on(async {
        let tasks = (0..16u64).map(|t| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut ok = 0u64;
                for i in 0..6_250u64 {
                    let x = t * 6_250 + i;
                    assert_eq!(pool.submit(Triple(x)).await.unwrap(), x * 3);
                    ok += 1;
                }
                ok
            })
        });
        futures::future::join_all(tasks)
            .await
            .into_iter()
            .map(Result::unwrap)
            .sum::<u64>()
    });
    assert_eq!(submitted, 100_000);
    let submit_time = started.elapsed();

    let growth = peak_rss_mib().saturating_sub(base);
    println!(
        "load: map 1,000,000 in {map_time:.1?}, submit 100,000 from 16 tokio tasks in \
         {submit_time:.1?}; parent peak RSS {} MiB (+{growth} MiB during the run)",
        peak_rss_mib()
    );
    assert!(
        growth <= MAX_GROWTH_MIB,
        "parent memory grew by {growth} MiB"
    );
    assert!(pool.join_timeout(Duration::from_secs(30)));
}

fn main() {
    offload_process::init();
    std::thread::spawn(|| {
        std::thread::sleep(WATCHDOG);
        eprintln!("load test hung for {WATCHDOG:?}");
        std::process::exit(101);
    });
    let ok = std::panic::catch_unwind(load).is_ok();
    println!("test load ... {}", if ok { "ok" } else { "FAILED" });
    println!("\n{} passed, {} failed", u8::from(ok), u8::from(!ok));
    if !ok {
        std::process::exit(101);
    }
}
