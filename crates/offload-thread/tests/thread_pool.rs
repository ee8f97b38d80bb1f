//! ThreadPool behaviour on real threads. Every wait is bounded: a hang fails with a message.
#![allow(clippy::unwrap_used)] // a test fails loudly by design

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use offload_core::{Executor, Task, TaskError};
use offload_thread::{BuildError, ThreadPool};
use serde::{Deserialize, Serialize};

const LIMIT: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
struct Square(u64);

impl Task for Square {
    type Output = u64;
    const NAME: &'static str = "tests::Square";
    fn run(self) -> u64 {
        self.0 * self.0
    }
}

#[derive(Serialize, Deserialize)]
struct Explode;

impl Task for Explode {
    type Output = u32;
    const NAME: &'static str = "tests::Explode";
    fn run(self) -> u32 {
        panic!("kaboom in a task")
    }
}

fn pool(workers: usize) -> ThreadPool {
    ThreadPool::builder().workers(workers).build().unwrap()
}

/// Occupies one worker: submit `blocker()`, wait until it `started()`, and `release()` it.
/// Bounded by `LIMIT`, so a broken test cannot hang.
struct Gate {
    release: mpsc::Sender<()>,
    started: mpsc::Receiver<()>,
    parts: Option<(mpsc::Receiver<()>, mpsc::Sender<()>)>,
}

impl Gate {
    fn new() -> Self {
        let (release, release_rx) = mpsc::channel();
        let (started_tx, started) = mpsc::channel();
        Gate {
            release,
            started,
            parts: Some((release_rx, started_tx)),
        }
    }

    fn blocker(&mut self) -> impl FnOnce() + Send + 'static {
        let (release, started) = self.parts.take().expect("one blocker per gate");
        move || {
            started.send(()).unwrap();
            let _ = release.recv_timeout(LIMIT);
        }
    }

    fn started(&self) {
        self.started
            .recv_timeout(LIMIT)
            .expect("the blocker did not start");
    }

    fn release(&self) {
        self.release.send(()).unwrap();
    }
}

fn wait<T>(mut handle: offload_core::TaskHandle<T>) -> Result<T, TaskError> {
    handle
        .wait_timeout(LIMIT)
        .expect("task did not finish within the limit")
}

#[test]
fn tasks_and_closures_return_their_values() {
    let pool = pool(2);
    assert_eq!(pool.workers(), 2);
    assert_eq!(wait(pool.submit(Square(12))), Ok(144));
    assert_eq!(
        wait(pool.submit_fn(|| "closure".to_owned())),
        Ok("closure".into())
    );
    assert!(pool.join_timeout(LIMIT));
}

#[test]
fn ten_thousand_tasks_from_eight_tokio_tasks_resolve_exactly_once() {
    let pool = pool(4);
    let runs = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_time()
        .build()
        .unwrap();
    let results: Vec<Vec<(u64, u64)>> = rt.block_on(async {
        let submitters = (0..8u64).map(|s| {
            let pool = pool.clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                let handles: Vec<_> = (0..1250u64)
                    .map(|i| {
                        let x = s * 1250 + i;
                        let runs = runs.clone();
                        (
                            x,
                            pool.submit_fn(move || {
                                runs.fetch_add(1, Ordering::SeqCst);
                                x * 3
                            }),
                        )
                    })
                    .collect();
                let mut out = Vec::new();
                for (x, h) in handles {
                    out.push((x, h.await.unwrap()));
                }
                out
            })
        });
        let joined = tokio::time::timeout(LIMIT, futures::future::join_all(submitters))
            .await
            .expect("10,000 tasks did not finish within the limit");
        joined.into_iter().map(Result::unwrap).collect()
    });
    let mut seen: Vec<u64> = Vec::new();
    for (x, y) in results.into_iter().flatten() {
        assert_eq!(y, x * 3);
        seen.push(x);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..10_000).collect::<Vec<_>>());
    assert_eq!(
        runs.load(Ordering::SeqCst),
        10_000,
        "each task ran exactly once"
    );
    assert!(pool.join_timeout(LIMIT));
}

#[test]
fn a_cancelled_queued_task_resolves_cancelled_and_never_runs() {
    let pool = pool(1);
    let mut gate = Gate::new();
    let busy = pool.submit_fn(gate.blocker());
    gate.started();
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let victim = pool.submit_fn(move || flag.store(true, Ordering::SeqCst));
    assert!(victim.cancel());
    assert!(victim.is_cancelled());
    let err = wait(victim).unwrap_err();
    assert!(err.is_cancelled(), "{err}");
    gate.release();
    assert_eq!(wait(busy), Ok(()));
    assert!(pool.join_timeout(LIMIT));
    assert!(!ran.load(Ordering::SeqCst), "a cancelled task ran");
}

#[test]
fn dropping_a_handle_cancels_a_task_that_has_not_started() {
    let pool = pool(1);
    let mut gate = Gate::new();
    let busy = pool.submit_fn(gate.blocker());
    gate.started();
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    drop(pool.submit_fn(move || flag.store(true, Ordering::SeqCst)));
    gate.release();
    wait(busy).unwrap();
    assert!(pool.join_timeout(LIMIT));
    assert!(!ran.load(Ordering::SeqCst));
}

#[test]
fn a_detached_task_runs_with_nobody_waiting() {
    let pool = pool(1);
    let (tx, rx) = mpsc::channel();
    pool.submit_fn(move || tx.send(42).unwrap()).detach();
    assert_eq!(rx.recv_timeout(LIMIT), Ok(42));
    assert!(pool.join_timeout(LIMIT));
}

#[test]
fn a_running_task_sees_its_cancel_cooperatively() {
    let pool = pool(1);
    let (started_tx, started_rx) = mpsc::channel();
    let (stopped_tx, stopped_rx) = mpsc::channel();
    let handle = pool.submit_fn(move || {
        started_tx.send(()).unwrap();
        let deadline = Instant::now() + LIMIT;
        while !offload_core::is_cancelled() && Instant::now() < deadline {
            thread::yield_now();
        }
        stopped_tx.send(offload_core::is_cancelled()).unwrap();
    });
    started_rx.recv_timeout(LIMIT).unwrap();
    assert!(handle.is_running());
    assert!(handle.cancel());
    assert!(!handle.is_running());
    assert!(wait(handle).unwrap_err().is_cancelled());
    assert_eq!(
        stopped_rx.recv_timeout(LIMIT),
        Ok(true),
        "the task saw the cancel"
    );
    assert!(pool.join_timeout(LIMIT));
}

#[test]
fn a_panicking_task_fails_alone_and_its_thread_keeps_serving() {
    let pool = pool(1);
    let thread_of = || wait(pool.submit_fn(|| thread::current().id())).unwrap();
    let before = thread_of();
    let err = wait(pool.submit(Explode)).unwrap_err();
    assert!(err.is_panic());
    assert_eq!(err.panic_message(), Some("kaboom in a task"));
    assert_eq!(
        err.to_string(),
        "task `tests::Explode` panicked: kaboom in a task"
    );
    assert_eq!(thread_of(), before, "the same worker thread still serves");
    assert_eq!(wait(pool.submit(Square(3))), Ok(9));
    assert!(pool.join_timeout(LIMIT));
}

#[test]
fn graceful_shutdown_finishes_queued_work_and_refuses_new_work() {
    let pool = pool(1);
    let mut gate = Gate::new();
    let busy = pool.submit_fn(gate.blocker());
    gate.started();
    let queued: Vec<_> = (0..5).map(|i| pool.submit(Square(i))).collect();
    pool.shutdown();
    assert!(pool.is_shutdown());
    let refused = pool.try_submit(Square(99)).unwrap_err();
    assert!(refused.is_shutdown());
    assert_eq!(refused.into_task().0, 99, "the task is given back");
    let err = wait(pool.submit(Square(1))).unwrap_err();
    assert!(err.is_shutdown(), "{err}");
    assert!(wait(pool.submit_fn(|| ())).unwrap_err().is_shutdown());
    gate.release();
    wait(busy).unwrap();
    let squares: Vec<u64> = queued.into_iter().map(|h| wait(h).unwrap()).collect();
    assert_eq!(squares, [0, 1, 4, 9, 16]);
    assert!(pool.join_timeout(LIMIT));
}

#[test]
fn shutdown_now_resolves_every_pending_handle() {
    let pool = pool(1);
    let mut gate = Gate::new();
    let busy = pool.submit_fn(gate.blocker());
    gate.started();
    let ran = Arc::new(AtomicUsize::new(0));
    let queued: Vec<_> = (0..100)
        .map(|_| {
            let ran = ran.clone();
            pool.submit_fn(move || ran.fetch_add(1, Ordering::SeqCst))
        })
        .collect();
    pool.shutdown_now();
    for handle in queued {
        let err = wait(handle).unwrap_err();
        assert!(err.is_shutdown(), "{err}");
    }
    gate.release();
    assert_eq!(wait(busy), Ok(()), "the running task finishes");
    assert!(pool.join_timeout(LIMIT));
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[test]
fn a_batch_fails_per_task_and_a_refused_batch_is_given_back() {
    let pool = pool(1);
    #[derive(Serialize, Deserialize)]
    struct MaybePanic(u32);
    impl Task for MaybePanic {
        type Output = u32;
        const NAME: &'static str = "tests::MaybePanic";
        fn run(self) -> u32 {
            assert!(self.0 != 2, "two is not allowed");
            self.0
        }
    }
    let results: Vec<_> = wait(
        pool.try_submit_batch((0..4).map(MaybePanic).collect())
            .unwrap(),
    )
    .unwrap()
    .collect();
    assert_eq!(results[0], Ok(0));
    assert_eq!(results[1], Ok(1));
    assert!(results[2].as_ref().unwrap_err().is_panic());
    assert_eq!(results[3], Ok(3));
    let refused = {
        pool.shutdown();
        pool.try_submit_batch(vec![Square(1), Square(2)])
            .unwrap_err()
    };
    assert_eq!(refused.into_task().len(), 2);
    assert!(pool.join_timeout(LIMIT));
}

#[test]
fn cancelling_a_running_batch_skips_its_remaining_tasks() {
    static RAN: AtomicUsize = AtomicUsize::new(0);
    static FIRST_STARTED: AtomicBool = AtomicBool::new(false);
    #[derive(Serialize, Deserialize)]
    struct SpinUntilCancelled(u32);
    impl Task for SpinUntilCancelled {
        type Output = ();
        const NAME: &'static str = "tests::SpinUntilCancelled";
        fn run(self) {
            FIRST_STARTED.store(true, Ordering::SeqCst);
            let deadline = Instant::now() + LIMIT;
            while self.0 == 0 && !offload_core::is_cancelled() && Instant::now() < deadline {
                thread::yield_now();
            }
            RAN.fetch_add(1, Ordering::SeqCst);
        }
    }
    let pool = pool(1);
    let batch = pool
        .try_submit_batch((0..4).map(SpinUntilCancelled).collect())
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    // Wait for the first task itself, not just the batch: a cancel between the two would
    // (rightly) skip every task.
    while !FIRST_STARTED.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the batch did not start");
        thread::yield_now();
    }
    assert!(batch.is_running());
    assert!(batch.cancel());
    assert!(wait(batch).unwrap_err().is_cancelled());
    assert!(pool.join_timeout(LIMIT));
    assert_eq!(
        RAN.load(Ordering::SeqCst),
        1,
        "only the running task finished"
    );
}

#[test]
fn the_initializer_runs_on_every_thread_before_tasks() {
    let inits = Arc::new(Mutex::new(Vec::new()));
    let seen = inits.clone();
    let pool = ThreadPool::builder()
        .workers(3)
        .thread_name("init-test")
        .initializer(move || {
            let name = thread::current().name().unwrap_or("").to_owned();
            seen.lock().unwrap().push(name);
        })
        .build()
        .unwrap();
    let mut names = inits.lock().unwrap().clone();
    names.sort();
    assert_eq!(names, ["init-test-0", "init-test-1", "init-test-2"]);
    assert!(pool.join_timeout(LIMIT));
}

#[test]
fn a_panicking_initializer_fails_the_build_and_stops_every_thread() {
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let err = ThreadPool::builder()
        .workers(3)
        .initializer(move || {
            if s.fetch_add(1, Ordering::SeqCst) == 1 {
                panic!("no model file");
            }
        })
        .build()
        .unwrap_err();
    assert!(matches!(err, BuildError::Initializer { .. }), "{err}");
    assert!(err.to_string().contains("no model file"), "{err}");
}

#[test]
fn zero_workers_is_a_clear_error() {
    let err = ThreadPool::builder().workers(0).build().unwrap_err();
    assert!(matches!(err, BuildError::ZeroWorkers));
    assert_eq!(
        err.to_string(),
        "a thread pool needs at least one worker; use workers(1) or more"
    );
}

/// Names of this process's threads that start with `prefix` (Linux: /proc/self/task).
#[cfg(target_os = "linux")]
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with(prefix))
        .count()
}

#[cfg(target_os = "linux")]
#[test]
fn dropping_the_pool_does_not_block_finishes_queued_work_and_ends_its_threads() {
    let pool = ThreadPool::builder()
        .workers(2)
        .thread_name("droptest")
        .build()
        .unwrap();
    assert_eq!(threads_named("droptest"), 2);
    let mut gate = Gate::new();
    let busy = pool.submit_fn(gate.blocker());
    gate.started();
    let queued = pool.submit(Square(5));
    let started = Instant::now();
    drop(pool);
    assert!(started.elapsed() < Duration::from_secs(1), "drop blocked");
    gate.release();
    assert_eq!(wait(busy), Ok(()));
    assert_eq!(wait(queued), Ok(25), "queued work still ran after the drop");
    let deadline = Instant::now() + LIMIT;
    while threads_named("droptest") > 0 {
        assert!(
            Instant::now() < deadline,
            "worker threads outlived the pool"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[should_panic(expected = "would wait for itself")]
fn joining_from_a_worker_thread_is_refused() {
    let pool = pool(1);
    let inner = pool.clone();
    let result = wait(pool.submit_fn(move || inner.join()));
    if let Err(TaskError::Panicked { message, .. }) = result {
        panic!("{message}");
    }
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ThreadPool>();
    send_sync::<BuildError>();
    send_sync::<offload_thread::ThreadPoolBuilder>();
}

/// CPU time (user + system, clock ticks) of this process's threads whose name starts with
/// `prefix`.
fn threads_cpu_ticks(prefix: &str) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = entry.unwrap().path();
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if !name.trim_end().starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis: utime and stime are the 12th and
        // 13th of them.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        total += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    total
}

/// An idle pool uses no CPU: its workers sleep once a burst is done (a worker that kept
/// looking for work would show here).
#[test]
fn an_idle_pool_goes_quiet_after_a_burst() {
    let pool = ThreadPool::builder()
        .workers(2)
        .thread_name("quiet-check")
        .build()
        .unwrap();
    let handles: Vec<_> = (0..10_000u64).map(|x| pool.submit_fn(move || x)).collect();
    for (x, handle) in handles.into_iter().enumerate() {
        assert_eq!(wait(handle), Ok(x as u64));
    }
    thread::sleep(Duration::from_millis(20));
    let before = threads_cpu_ticks("quiet-check");
    thread::sleep(Duration::from_millis(300));
    let used = threads_cpu_ticks("quiet-check") - before;
    // A clock tick is 10 ms: a worker still spinning would show about 30.
    assert!(used <= 2, "idle workers used {used} ticks of CPU in 300 ms");
    pool.join();
}
