//! Chaos: 20,000 tasks on 3 workers while a killer SIGKILLs a random worker every ~50 ms.
//!
//! Every handle must resolve exactly once, with its correct result or a worker-crash error;
//! nothing may hang; no process may outlive the pool; the pool must work afterwards. With
//! `retries(5)` every result must be correct. Bounded: the whole run has a watchdog.
//!
//! `harness = false`: workers re-execute this binary, so `main` calls `init()` first.

#![allow(clippy::unwrap_used)] // a test fails loudly by design

mod common;

use common::{alive, children};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use offload_core::{register_task, Executor, Task, TaskError, TaskHandle};
use offload_process::ProcessPool;
use serde::{Deserialize, Serialize};

const TASKS: u64 = 20_000;
const KILL_EVERY: Duration = Duration::from_millis(50);
const WATCHDOG: Duration = Duration::from_secs(240);

/// About a millisecond of work, so kills land on running tasks.
#[derive(Serialize, Deserialize)]
struct Work(u64);

impl Task for Work {
    type Output = u64;
    const NAME: &'static str = "chaos::Work";
    fn run(self) -> u64 {
        std::thread::sleep(Duration::from_micros(700));
        self.0.wrapping_mul(2_654_435_761)
    }
}
register_task!(Work);

fn expected(i: u64) -> u64 {
    i.wrapping_mul(2_654_435_761)
}

fn start_killer(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut seed = u64::from(std::process::id()) | 1;
        let mut kills = 0;
        loop {
            std::thread::sleep(KILL_EVERY);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let mut pids: Vec<u32> = children().into_iter().filter(|p| alive(*p)).collect();
            if pids.is_empty() {
                continue;
            }
            pids.sort_unstable();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let pid = pids[(seed % pids.len() as u64) as usize];
            // SAFETY: kill(2) on our own unreaped child (it is listed in /proc as ours).
            if unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
                kills += 1;
            }
        }
        kills
    })
}

struct Counts {
    completed: u64,
    crashed: u64,
}

/// Submits every task, waits for every handle, checks each result.
fn run_phase(pool: &ProcessPool, retries: bool) -> Counts {
    let handles: Vec<TaskHandle<u64>> = (0..TASKS).map(|i| pool.submit(Work(i))).collect();
    let mut counts = Counts {
        completed: 0,
        crashed: 0,
    };
    for (i, mut handle) in handles.into_iter().enumerate() {
        let result = handle
            .wait_timeout(WATCHDOG)
            .unwrap_or_else(|| panic!("task {i} never resolved"));
        match result {
            Ok(value) => {
                assert_eq!(value, expected(i as u64), "task {i} gave a wrong result");
                counts.completed += 1;
            }
            Err(e @ TaskError::WorkerCrashed { .. }) if !retries => {
                assert_eq!(e.task_name(), Work::NAME);
                counts.crashed += 1;
            }
            Err(e) => panic!("task {i} failed with an unexpected error: {e}"),
        }
    }
    counts
}

fn chaos(retries: u32) {
    let before = children();
    let pool = ProcessPool::builder()
        .workers(3)
        .retries(retries)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let killer = start_killer(stop.clone());
    let started = Instant::now();
    let counts = run_phase(&pool, retries > 0);
    stop.store(true, Ordering::Relaxed);
    let kills = killer.join().unwrap();
    let stats = pool.stats();
    println!(
        "chaos retries={retries}: {TASKS} tasks in {:.1?}: completed {}, crashed {}, retried {}, \
         kills {kills}, restarts {}",
        started.elapsed(),
        counts.completed,
        counts.crashed,
        stats.retried,
        stats.restarts
    );
    assert_eq!(
        counts.completed + counts.crashed,
        TASKS,
        "every handle resolved once"
    );
    assert!(
        kills >= 10,
        "the killer must actually have killed ({kills})"
    );
    if retries > 0 {
        assert_eq!(
            counts.completed, TASKS,
            "with retries every result is correct"
        );
    }
    // The pool still works after the storm, once it has noticed the last kill: a worker killed
    // a moment ago may not be known dead yet, and its first request would fail as a crash.
    let deadline = Instant::now() + WATCHDOG;
    while pool.stats().restarts < kills || pool.stats().workers < 3 {
        assert!(
            Instant::now() < deadline,
            "the pool did not recover: {:?}",
            pool.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let after: Vec<_> = (0..100).map(|i| pool.submit(Work(i))).collect();
    for (i, mut h) in after.into_iter().enumerate() {
        assert_eq!(h.wait_timeout(WATCHDOG), Some(Ok(expected(i as u64))));
    }
    assert!(pool.join_timeout(Duration::from_secs(30)), "join hung");
    let leftover: Vec<u32> = children()
        .difference(&before)
        .copied()
        .filter(|p| alive(*p))
        .collect();
    assert!(
        leftover.is_empty(),
        "processes outlived the pool: {leftover:?}"
    );
}

static DONE: AtomicU64 = AtomicU64::new(0);

fn main() {
    offload_process::init();
    // A watchdog: a hang fails this binary with a message instead of eating CI's time.
    std::thread::spawn(|| {
        std::thread::sleep(WATCHDOG);
        eprintln!(
            "chaos test hung for {WATCHDOG:?}; {} phases done",
            DONE.load(Ordering::Relaxed)
        );
        std::process::exit(101);
    });
    let mut failed = 0;
    for (name, retries) in [("chaos_without_retries", 0), ("chaos_with_retries", 5)] {
        match std::panic::catch_unwind(|| chaos(retries)) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
        DONE.fetch_add(1, Ordering::Relaxed);
    }
    println!("\n{} passed, {failed} failed", 2 - failed);
    if failed > 0 {
        std::process::exit(101);
    }
}
