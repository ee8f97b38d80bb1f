//! ProcessPool on real processes and real sockets.
//!
//! `harness = false`: worker processes are re-executions of this test binary, so `main` must
//! call `offload_process::init()` before anything else; then it runs the tests itself, each
//! under a watchdog, and ends with a `N passed, M failed` line.

#![allow(clippy::unwrap_used)] // a test fails loudly by design

mod common;

use std::collections::HashSet;

use common::{alive, children};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use offload_core::{as_completed, Executor, Task, TaskError, TaskHandle};
use offload_process::{BuildError, ProcessPool};
use serde::{Deserialize, Serialize};

const LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- tasks

use common::task;

task!(Pid() -> u32, |_s| std::process::id());
task!(OpenedBeforeInit() -> Option<String>, |_s| {
    let fd = OPENED_BEFORE_INIT.get()?;
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|target| target.to_string_lossy().into_owned())
});

/// A descriptor `main` opens before `init()`, as a program does whose runtime or logging
/// starts first (`#[tokio::main]`): workers run `main` too, and must keep it.
static OPENED_BEFORE_INIT: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
task!(Square(u64) -> u64, |s| s.0 * s.0);
task!(Panic(String) -> u32, |s| panic!("{}", s.0));
task!(Abort() -> u32, |_s| std::process::abort());
task!(ExitWith(i32) -> u32, |s| std::process::exit(s.0));
task!(AbortAfter(u64) -> u32, |s| {
    std::thread::sleep(Duration::from_millis(s.0));
    std::process::abort()
});
task!(KillSelf() -> u32, |_s| {
    // SAFETY: kill(2) on our own pid with a valid signal number.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    0
});
task!(Echo(Vec<u8>) -> Vec<u8>, |s| s.0);
task!(HalfOrPanic(u64) -> u64, |s| {
    assert!(s.0 % 2 == 0, "odd: {}", s.0);
    s.0 / 2
});
task!(Make(usize) -> Vec<u8>, |s| vec![1; s.0]);
task!(SpinUntilCancelled() -> bool, |_s| {
    let deadline = Instant::now() + LIMIT;
    while !offload_core::is_cancelled() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    offload_core::is_cancelled()
});
task!(Append(String, u64) -> u64, |s| {
    // O_APPEND writes of one short line are atomic: the file records every run.
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&s.0).unwrap();
    f.write_all(format!("{}\n", s.1).as_bytes()).unwrap();
    s.1
});
task!(CrashUntil(String, u32) -> u32, |s| {
    // Counts its runs in a file; aborts until the count reaches s.1.
    let runs = std::fs::read_to_string(&s.0).map(|t| t.lines().count()).unwrap_or(0) as u32 + 1;
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&s.0).unwrap();
    f.write_all(b"run\n").unwrap();
    if runs < s.1 {
        std::process::abort();
    }
    runs
});
task!(Allocate(usize) -> usize, |s| {
    let v = vec![7u8; s.0];
    v.iter().map(|&b| b as usize).sum::<usize>() / 7
});
task!(InitOk() -> (), |_s| INITIALIZED.store(true, Ordering::SeqCst));
task!(SleepAbort(u64) -> (), |s| {
    std::thread::sleep(Duration::from_millis(s.0));
    std::process::abort()
});
task!(IsInitialized() -> bool, |_s| INITIALIZED.load(Ordering::SeqCst));
task!(InitFails(String) -> Result<(), String>, |s| {
    if std::path::Path::new(&s.0).exists() {
        Err(format!("model file {} is corrupt", s.0))
    } else {
        Ok(())
    }
});

static INITIALIZED: AtomicBool = AtomicBool::new(false);

task!(InitThreadLocal() -> (), |_s| THREAD_STATE.with(|t| t.set(42)));
task!(ThreadState() -> u32, |_s| THREAD_STATE.with(std::cell::Cell::get));

thread_local! {
    /// State an initializer keeps in a thread-local (say, a handle that is not `Send`).
    static THREAD_STATE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A value whose serialization always fails, as a broken `Serialize` impl would.
#[derive(Debug, Deserialize)]
struct Unserializable;
impl Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "this value refuses to be serialized",
        ))
    }
}
task!(TakesBad(Unserializable) -> u32, |_s| 1);

/// Serializes as the square of its number, which it has a task on the pool in `NESTED`
/// compute: user code that submits while the pool encodes another task.
struct SquaredOnTheWay(u64);
static NESTED: Mutex<Option<ProcessPool>> = Mutex::new(None);
impl Serialize for SquaredOnTheWay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let pool = NESTED.lock().unwrap().clone().expect("a pool to submit to");
        let squared = wait(pool.submit(Square(self.0))).map_err(serde::ser::Error::custom)?;
        s.serialize_u64(squared)
    }
}
impl<'de> Deserialize<'de> for SquaredOnTheWay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64::deserialize(d).map(SquaredOnTheWay)
    }
}
task!(TakesSquared(SquaredOnTheWay) -> u64, |s| s.0 .0);
task!(GivesBad() -> Unserializable, |_s| Unserializable);
task!(Recurse(u64) -> u64, |s| {
    fn deep(n: u64) -> u64 {
        let pad = [n; 64]; // a frame big enough to exhaust the stack quickly
        if n == 0 { 0 } else { deep(n - 1) + std::hint::black_box(pad)[0] % 2 }
    }
    deep(s.0)
});
task!(ForkAndDie() -> (), |_s| {
    // The forked child inherits the worker's connection and keeps it open after the worker
    // dies, so the pool never sees that connection end.
    // SAFETY: the child only sleeps and exits (async-signal-safe calls).
    unsafe {
        if libc::fork() == 0 {
            libc::sleep(5);
            libc::_exit(0);
        }
        libc::_exit(9);
    }
});
task!(CloseStdio() -> (), |_s| {
    // SAFETY: closing our own standard descriptors; nothing else uses them afterwards but
    // std's stdio, which tolerates a closed descriptor.
    unsafe {
        libc::close(1);
        libc::close(2);
    }
});
task!(WriteGarbage() -> u32, |_s| {
    let garbage: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    std::io::stdout().write_all(&garbage).unwrap();
    std::io::stderr().write_all(&garbage).unwrap();
    7
});

fn temp_path(tag: &str) -> String {
    let path = std::env::temp_dir().join(format!(
        "offload-test-{}-{tag}-{:?}",
        std::process::id(),
        Instant::now()
    ));
    let _ = std::fs::remove_file(&path);
    path.to_string_lossy().into_owned()
}
task!(Sleep(u64) -> (), |s| std::thread::sleep(Duration::from_millis(s.0)));
task!(SleepThenAnswer(u64) -> DecodedOn, |s| {
    std::thread::sleep(Duration::from_millis(s.0));
    DecodedOn(None)
});

/// An output that notes which thread of the parent decoded it.
#[derive(Debug, PartialEq)]
struct DecodedOn(Option<String>);

impl Serialize for DecodedOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_unit()
    }
}

impl<'de> Deserialize<'de> for DecodedOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <()>::deserialize(d)?;
        let thread = std::thread::current();
        Ok(DecodedOn(Some(
            thread.name().unwrap_or("unnamed").to_owned(),
        )))
    }
}
task!(MarkThenSleep(String, u64) -> (), |s| {
    // The file says the task has started (sent is not started: a cancel that arrives first
    // keeps it from running at all).
    std::fs::write(&s.0, b"started").unwrap();
    std::thread::sleep(Duration::from_millis(s.1));
});
task!(MarkWith(String, Vec<u8>) -> usize, |s| {
    // The file says the task ran; the input's size decides how it travels.
    std::fs::write(&s.0, b"ran").unwrap();
    s.1.len()
});
task!(WorkerEnv() -> Vec<String>, |_s| std::env::vars()
    .map(|(k, _)| k)
    .filter(|k| k.starts_with("OFFLOAD_WORKER"))
    .collect());
task!(Log(String) -> u32, |s| {
    tracing::info!(answer = 42, "hello from a worker: {}", s.0);
    std::process::id()
});
task!(ChattyThenMark(String, u64) -> (), |s| {
    for i in 0..s.1 {
        tracing::info!("chatty line {i} {}", "x".repeat(200));
    }
    std::fs::write(&s.0, b"done").unwrap();
});
task!(Print(String) -> (), |s| {
    println!("{}", s.0);
    eprintln!("{} (stderr)", s.0);
});

/// A task type the parent knows but that is not registered (no `register_task!`).
#[derive(Serialize, Deserialize)]
struct Unregistered;
impl Task for Unregistered {
    type Output = ();
    const NAME: &'static str = "process_pool::Unregistered";
    fn run(self) {}
}

// ---------------------------------------------------------------- helpers

fn pool(workers: usize) -> ProcessPool {
    ProcessPool::builder().workers(workers).build().unwrap()
}

fn wait<T>(mut handle: TaskHandle<T>) -> Result<T, TaskError> {
    handle
        .wait_timeout(LIMIT)
        .expect("task did not finish within the limit")
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The abstract socket names of this process's pools, from /proc/net/unix.
fn pool_sockets() -> Vec<String> {
    let prefix = format!("@offload-{}-", std::process::id());
    std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|p| p.starts_with(&prefix))
        .map(|p| p.trim_start_matches('@').to_owned())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect()
}

/// Connects to a pool socket as a stranger would.
fn connect(name: &str) -> interprocess::local_socket::Stream {
    use interprocess::local_socket::prelude::*;
    use interprocess::local_socket::{GenericNamespaced, Stream};
    Stream::connect(name.to_ns_name::<GenericNamespaced>().unwrap()).unwrap()
}

/// True if the peer closes the connection without sending a byte, within the limit.
fn closed_by_peer(mut stream: interprocess::local_socket::Stream) -> bool {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = tx.send(stream.read_to_end(&mut buf).map(|_| buf.len()));
    });
    match rx.recv_timeout(LIMIT) {
        Ok(Ok(n)) => n == 0,
        Ok(Err(_)) => true, // reset by the peer
        Err(_) => false,    // still open
    }
}

// ---------------------------------------------------------------- tests

fn tasks_run_in_worker_processes() {
    let pool = pool(2);
    let pid = wait(pool.submit(Pid())).unwrap();
    assert_ne!(pid, std::process::id());
    assert!(children().contains(&pid), "the worker is our child");
    assert_eq!(wait(pool.submit(Square(12))), Ok(144));
    assert!(pool.join_timeout(LIMIT));
}

fn what_main_opened_before_init_stays_open_in_a_worker() {
    // `init` runs after whatever `main` did first (a tokio runtime's epoll and eventfd, a log
    // file); a worker closes only the descriptors it inherited from the pool's process.
    let pool = pool(1);
    assert_eq!(
        wait(pool.submit(OpenedBeforeInit())),
        Ok(Some("/dev/null".to_owned()))
    );
    assert!(pool.join_timeout(LIMIT));
}

fn a_worker_clears_its_environment_contract() {
    // Otherwise a task that starts this program again (or builds a pool) would look like an
    // uninitialised worker.
    let pool = pool(1);
    assert_eq!(wait(pool.submit(WorkerEnv())), Ok(Vec::new()));
    assert!(pool.join_timeout(LIMIT));
}

fn many_callers_at_once_each_get_their_own_answer() {
    // Callers write requests straight to idle workers (`lane.rs`) while the pool's I/O thread
    // writes others (requests too large for a caller to write, cancels): frames must never
    // mix, no answer may reach the wrong caller, and nothing may hang.
    let pool = pool(2);
    let callers: Vec<_> = (0..4u64)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for i in 0..150u64 {
                    // Mostly tiny, every fifth on either side of what a caller may write.
                    let len = if i % 5 == 0 {
                        60_000 + usize::try_from((t * 7 + i) % 10).unwrap() * 1_000
                    } else {
                        usize::try_from(i % 40).unwrap()
                    };
                    let data: Vec<u8> = (0..len).map(|k| (k as u64 ^ t ^ i) as u8).collect();
                    let handle = pool.submit(Echo(data.clone()));
                    if i % 10 == 3 {
                        handle.cancel();
                        match wait(handle) {
                            Ok(back) => assert_eq!(back, data, "caller {t}, request {i}"),
                            Err(e) => assert!(e.is_cancelled(), "caller {t}, request {i}: {e}"),
                        }
                    } else {
                        assert_eq!(wait(handle), Ok(data), "caller {t}, request {i}");
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        caller.join().unwrap();
    }
    let stats = pool.stats();
    assert_eq!((stats.crashed, stats.restarts), (0, 0), "{stats:?}");
    assert!(pool.join_timeout(LIMIT));
}

fn a_quick_result_does_not_wait_behind_the_next_task_on_its_worker() {
    let pool = ProcessPool::builder()
        .workers(1)
        .in_flight_per_worker(2)
        .build()
        .unwrap();
    let quick = pool.submit(Square(7));
    let slow = pool.submit(Sleep(5_000));
    let started = Instant::now();
    assert_eq!(wait(quick), Ok(49));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the quick result waited {:?} for the slow task behind it",
        started.elapsed()
    );
    assert_eq!(wait(slow), Ok(()));
    assert!(pool.join_timeout(LIMIT));
}

fn works_from_inside_an_async_runtime() {
    let pool = pool(2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let total = rt.block_on(async {
        let handles: Vec<_> = (0..100).map(|i| pool.submit(Square(i))).collect();
        let mut total = 0;
        for h in handles {
            total += tokio::time::timeout(LIMIT, h).await.unwrap().unwrap();
        }
        total
    });
    assert_eq!(total, (0..100).map(|i| i * i).sum::<u64>());
    assert!(pool.join_timeout(LIMIT));
}

fn a_panic_comes_back_as_an_error_and_the_worker_keeps_serving() {
    let pool = pool(1);
    let before = wait(pool.submit(Pid())).unwrap();
    let err = wait(pool.submit(Panic("bad pixel".into()))).unwrap_err();
    assert_eq!(err.panic_message(), Some("bad pixel"), "{err}");
    assert_eq!(wait(pool.submit(Pid())), Ok(before), "same worker");
    assert!(pool.join_timeout(LIMIT));
}

fn check_crash(task_error: TaskError, signal: Option<i32>, code: Option<i32>, text: &str) {
    match &task_error {
        TaskError::WorkerCrashed {
            pid,
            signal: s,
            code: c,
            ..
        } => {
            assert_eq!((*s, *c), (signal, code), "{task_error}");
            assert!(
                task_error
                    .to_string()
                    .starts_with(&format!("worker {pid} {text}")),
                "{task_error}"
            );
            assert!(
                task_error
                    .to_string()
                    .ends_with("the pool started a replacement"),
                "{task_error}"
            );
        }
        other => panic!("expected a worker crash, got {other}"),
    }
}

fn a_crash_during_shutdown_does_not_claim_a_replacement() {
    let pool = ProcessPool::builder().workers(1).build().unwrap();
    let crash = pool.submit(AbortAfter(200));
    // Running before the shutdown (graceful: it runs on, and its worker is not replaced).
    eventually("the task running", || crash.is_running());
    pool.shutdown();
    match wait(crash).unwrap_err() {
        TaskError::WorkerCrashed { replaced, .. } if !replaced => {}
        other => panic!("expected a crash without a replacement, got {other}"),
    }
    let text = wait(pool.submit(Square(2))).unwrap_err().to_string();
    assert!(text.contains("shut down"), "{text}");
    assert!(pool.join_timeout(LIMIT));
}

fn a_crashing_worker_fails_only_its_task_and_is_replaced() {
    let pool = ProcessPool::builder()
        .workers(2)
        .in_flight_per_worker(1)
        .build()
        .unwrap();
    let first_pids: HashSet<u32> = children();
    // Others submitted around the crash all complete.
    let before: Vec<_> = (0..20).map(|i| pool.submit(Square(i))).collect();
    let crash = pool.submit(Abort());
    let after: Vec<_> = (0..20).map(|i| pool.submit(Square(i))).collect();
    check_crash(
        wait(crash).unwrap_err(),
        Some(6),
        None,
        "was killed by signal 6 (SIGABRT)",
    );
    for (i, h) in before.into_iter().chain(after).enumerate() {
        let i = (i % 20) as u64;
        assert_eq!(wait(h), Ok(i * i));
    }
    check_crash(
        wait(pool.submit(KillSelf())).unwrap_err(),
        Some(9),
        None,
        "was killed by signal 9 (SIGKILL)",
    );
    check_crash(
        wait(pool.submit(ExitWith(3))).unwrap_err(),
        None,
        Some(3),
        "exited with code 3",
    );
    // Replacements serve; the pool is back to full size with new processes.
    let results: Vec<_> = (0..50).map(|i| pool.submit(Square(i))).collect();
    for (i, h) in results.into_iter().enumerate() {
        assert_eq!(wait(h), Ok((i * i) as u64));
    }
    eventually("two live workers", || {
        children().iter().filter(|p| alive(**p)).count() == 2
    });
    assert!(
        children().iter().any(|p| !first_pids.contains(p)),
        "a replacement was started"
    );
    assert!(pool.join_timeout(LIMIT));
}

fn an_unregistered_task_is_an_error_that_names_it() {
    let pool = pool(1);
    let err = wait(pool.submit(Unregistered)).unwrap_err();
    assert!(matches!(err, TaskError::UnknownTask { .. }), "{err}");
    assert!(
        err.to_string().contains("`process_pool::Unregistered`"),
        "{err}"
    );
    assert_eq!(wait(pool.submit(Square(2))), Ok(4));
    assert!(pool.join_timeout(LIMIT));
}

fn map_and_as_completed_work_across_processes() {
    let pool = pool(2);
    let results: Vec<u64> = futures::executor::block_on(async {
        use futures::StreamExt;
        pool.map((0..100_000).map(Square))
            .map(|r| r.unwrap())
            .collect()
            .await
    });
    assert_eq!(results.len(), 100_000);
    assert!(results
        .iter()
        .enumerate()
        .all(|(i, r)| *r == (i * i) as u64));
    let handles: Vec<_> = (0..10).map(|i| pool.submit(Square(i))).collect();
    let mut seen: Vec<usize> = futures::executor::block_on(async {
        use futures::StreamExt;
        as_completed(handles)
            .map(|(i, r)| {
                assert_eq!(r, Ok((i * i) as u64));
                i
            })
            .collect()
            .await
    });
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    assert!(pool.join_timeout(LIMIT));
}

/// Runs `tasks` as one batch (what `map` sends) and waits for its results.
fn batch<T: Task>(pool: &ProcessPool, tasks: Vec<T>) -> Vec<Result<T::Output, TaskError>> {
    let handle = pool
        .try_submit_batch(tasks)
        .unwrap_or_else(|_| panic!("pool is open"));
    wait(handle)
        .expect("the batch itself does not fail")
        .collect()
}

fn a_batch_fails_task_by_task_and_its_worker_keeps_serving() {
    let pool = ProcessPool::builder()
        .workers(1)
        .max_frame_size(1 << 20)
        .build()
        .unwrap();
    // A panic fails its own task only; the tasks after it still run.
    let results = batch(
        &pool,
        (0..5)
            .map(|i| HalfOrPanic(i * 2 + u64::from(i == 2)))
            .collect(),
    );
    assert_eq!(results[..2], [Ok(0), Ok(1)]);
    assert_eq!(
        results[2].as_ref().unwrap_err().panic_message(),
        Some("odd: 5")
    );
    assert_eq!(results[3..], [Ok(3), Ok(4)]);
    // An output that does not serialize fails its task with the reason.
    for result in batch(&pool, vec![GivesBad(), GivesBad()]) {
        let err = result.unwrap_err();
        assert!(
            err.to_string().contains("refuses to be serialized"),
            "{err}"
        );
    }
    // A task type the worker program does not have: every task says so.
    for result in batch(&pool, vec![Unregistered, Unregistered]) {
        assert!(
            matches!(result, Err(TaskError::UnknownTask { .. })),
            "{result:?}"
        );
    }
    // An answer over the frame limit fails each task with the limit, not the connection.
    for result in batch(&pool, (0..3).map(|_| Make(400_000)).collect()) {
        let err = result.unwrap_err();
        assert!(matches!(err, TaskError::Serialization { .. }), "{err}");
        assert!(err.to_string().contains("max_frame_size"), "{err}");
    }
    assert_eq!(batch(&pool, vec![Square(3), Square(4)]), [Ok(9), Ok(16)]);
    assert!(pool.join_timeout(LIMIT));
}

fn large_payloads_round_trip_and_oversized_ones_are_refused() {
    let pool = ProcessPool::builder()
        .workers(1)
        .max_frame_size(16 << 20)
        .build()
        .unwrap();
    let blob: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
    assert_eq!(wait(pool.submit(Echo(blob.clone()))), Ok(blob));
    let err = wait(pool.submit(Echo(vec![0; 20 << 20]))).unwrap_err();
    assert!(matches!(err, TaskError::Serialization { .. }), "{err}");
    assert!(err.to_string().contains("max_frame_size"), "{err}");
    // Outputs from 1 MiB on are written from where they are, beside their frame's head.
    assert_eq!(wait(pool.submit(Make(3 << 20))), Ok(vec![1; 3 << 20]));
    let err = wait(pool.submit(Make(17 << 20))).unwrap_err();
    assert!(matches!(err, TaskError::Serialization { .. }), "{err}");
    assert!(err.to_string().contains("max_frame_size"), "{err}");
    assert_eq!(
        wait(pool.submit(Square(3))),
        Ok(9),
        "the pool is unaffected"
    );
    assert!(pool.join_timeout(LIMIT));
}

fn strangers_and_garbage_are_refused_and_the_pool_keeps_working() {
    let pool = pool(1);
    let sockets = pool_sockets();
    assert_eq!(sockets.len(), 1, "one pool socket: {sockets:?}");
    let name = &sockets[0];

    // A well-formed handshake with the wrong token.
    let hello = offload_ipc::protocol::ToParent::Hello(offload_ipc::protocol::Hello {
        protocol: offload_ipc::protocol::PROTOCOL_VERSION,
        build: offload_ipc::protocol::build_id(),
        token: [7; offload_ipc::protocol::TOKEN_LEN],
        pid: std::process::id(),
    });
    let mut frame = Vec::new();
    offload_ipc::frame::encode(&hello, &mut frame, 1 << 20).unwrap();
    let mut stranger = connect(name);
    stranger.write_all(&frame).unwrap();
    assert!(closed_by_peer(stranger), "wrong token must be refused");
    eventually("the refusal is logged", || {
        LOGS.lock().unwrap().iter().any(|l| {
            l.contains("refused a connection to the pool's socket")
                && l.contains("without the pool's token")
        })
    });
    assert!(
        !LOGS.lock().unwrap().iter().any(|l| l.contains("7, 7, 7")),
        "the token never appears in logs"
    );

    // Garbage, and a header claiming 4 GiB.
    for bytes in [
        vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5],
        u32::MAX.to_le_bytes().to_vec(),
    ] {
        let mut s = connect(name);
        s.write_all(&bytes).unwrap();
        assert!(closed_by_peer(s), "garbage must close the connection");
    }
    eventually("the oversized frame is logged", || {
        LOGS.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("frame of 4294967295 bytes is over the limit"))
    });

    // File descriptors before the handshake: refused, not held.
    let s = connect(name);
    let interprocess::local_socket::Stream::UdSocket(socket) = &s;
    let fds: Vec<offload_core::backend::Fd> = (0..200)
        .map(|_| offload_core::backend::Fd::new(std::fs::File::open("/dev/null").unwrap().into()))
        .collect();
    use std::os::fd::{AsFd, AsRawFd};
    let raw = socket.as_fd().as_raw_fd();
    offload_ipc::fdpass::send_all(raw, &frame[..4], &fds).unwrap();
    assert!(
        closed_by_peer(s),
        "descriptors before a handshake close the connection"
    );
    eventually("the descriptors are logged", || {
        LOGS.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("200 file descriptors received before the handshake"))
    });
    assert_eq!(wait(pool.submit(Square(5))), Ok(25));
    assert!(pool.join_timeout(LIMIT));
}

fn a_worker_of_another_protocol_version_is_a_clear_error_not_a_hang() {
    // This binary, run with ROLE=old-worker, speaks protocol 999. Tests run one at a time, so
    // setting the variable around `build` affects only this pool's children.
    std::env::set_var(ROLE, "old-worker");
    let result = ProcessPool::builder()
        .worker_program("/proc/self/exe")
        .workers(1)
        .build();
    std::env::remove_var(ROLE);
    let err = result.unwrap_err();
    assert!(matches!(err, BuildError::Startup(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("worker speaks protocol 999"), "{text}");
    assert!(text.contains("rebuild the worker program"), "{text}");
}

/// A worker from "another version": a valid token, a foreign protocol version.
fn old_worker() {
    use interprocess::local_socket::prelude::*;
    use interprocess::local_socket::{GenericNamespaced, Stream};
    use offload_ipc::protocol::{build_id, Hello, ToParent, ToWorker};
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let token = offload_ipc::handshake::token_from_hex(&line).unwrap();
    let socket = std::env::var(offload_ipc::transport::ENV_SOCKET).unwrap();
    let mut stream =
        Stream::connect(socket.as_str().to_ns_name::<GenericNamespaced>().unwrap()).unwrap();
    let hello = ToParent::Hello(Hello {
        protocol: 999,
        build: build_id(),
        token,
        pid: std::process::id(),
    });
    let mut frame = Vec::new();
    offload_ipc::frame::encode(&hello, &mut frame, 1 << 20).unwrap();
    stream.write_all(&frame).unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let mut decoder = offload_ipc::frame::FrameDecoder::new(1 << 20);
    decoder.read_buf()[..reply.len()].copy_from_slice(&reply);
    decoder.filled(reply.len());
    match decoder.next_message::<ToWorker>() {
        Ok(Some(ToWorker::Refused { reason })) => eprintln!("old worker refused: {reason}"),
        other => eprintln!("old worker: unexpected {other:?}"),
    }
    std::process::exit(70);
}

fn shutdown_refuses_new_work_and_now_resolves_pending() {
    let pool = ProcessPool::builder()
        .workers(1)
        .in_flight_per_worker(1)
        .build()
        .unwrap();
    let queued: Vec<_> = (0..200).map(|i| pool.submit(Square(i))).collect();
    pool.shutdown_now();
    let refused = pool.try_submit(Square(9)).unwrap_err();
    assert_eq!(refused.into_task().0, 9);
    let mut done = 0;
    for h in queued {
        match wait(h) {
            Ok(_) => done += 1,
            Err(e) => assert!(e.is_shutdown(), "{e}"),
        }
    }
    assert!(done < 200, "shutdown_now dropped the queue");
    assert!(pool.join_timeout(LIMIT));
}

fn dropping_and_joining_leave_no_zombie_and_no_orphan() {
    let before = children();
    let joined = pool(3);
    let workers: HashSet<u32> = children().difference(&before).copied().collect();
    assert_eq!(workers.len(), 3);
    wait(joined.submit(Square(1))).unwrap();
    let copy = joined.clone();
    drop(joined);
    assert!(copy.join_timeout(LIMIT));
    for pid in &workers {
        assert!(!alive(*pid), "worker {pid} outlived join");
        assert!(!children().contains(pid), "worker {pid} was not reaped");
    }

    // Dropping without join: the pool's thread reaps its workers by itself.
    let before = children();
    let dropped = pool(2);
    let workers: HashSet<u32> = children().difference(&before).copied().collect();
    let started = Instant::now();
    drop(dropped);
    assert!(started.elapsed() < Duration::from_secs(1), "drop blocked");
    eventually("workers reaped after drop", || {
        workers.iter().all(|p| !children().contains(p))
    });
}

/// Starts this binary as an "orphan-parent" (a pool of 2 that prints its workers' pids and
/// waits), optionally in its own process group like a terminal's job; returns it and the pids.
fn spawn_orphan_parent(own_group: bool) -> (std::process::Child, Vec<u32>) {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new("/proc/self/exe");
    command.env(ROLE, "orphan-parent").stdout(Stdio::piped());
    if own_group {
        command.process_group(0);
    }
    let mut parent = command.spawn().unwrap();
    let mut line = String::new();
    let mut stdout = parent.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while !line.ends_with('\n') {
        assert_eq!(stdout.read(&mut byte).unwrap(), 1, "parent ended early");
        line.push(byte[0] as char);
    }
    let workers: Vec<u32> = line
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(workers.len(), 2, "{line}");
    assert!(workers.iter().all(|p| alive(*p)));
    (parent, workers)
}

fn workers_die_with_their_parent() {
    let (mut parent, workers) = spawn_orphan_parent(false);
    parent.kill().unwrap();
    parent.wait().unwrap();
    assert_dead_after_2s(&workers, "its SIGKILLed parent");
}

/// Gives the kernel 2 s to take `workers` down with their parent, then checks none is alive.
fn assert_dead_after_2s(workers: &[u32], cause: &str) {
    std::thread::sleep(Duration::from_secs(2));
    for pid in workers {
        assert!(!alive(*pid), "worker {pid} outlived {cause} by 2 s");
    }
}

/// Run by `workers_die_with_their_parent` in a child process: start a pool, print the
/// workers' pids, and wait to be killed.
fn orphan_parent() {
    let pool = pool(2);
    let pids: Vec<String> = children().iter().map(u32::to_string).collect();
    println!("{}", pids.join(" "));
    std::io::stdout().flush().unwrap();
    std::thread::sleep(LIMIT);
    drop(pool);
}

fn worker_output_reaches_the_parents_streams() {
    let out = Command::new("/proc/self/exe")
        .env(ROLE, "printer")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("printed by a worker"), "stdout: {stdout}");
    assert!(
        stderr.contains("printed by a worker (stderr)"),
        "stderr: {stderr}"
    );
}

fn printer() {
    let pool = pool(1);
    wait(pool.submit(Print("printed by a worker".into()))).unwrap();
    assert!(wait(pool.submit(Panic("a worker's panic".into()))).is_err());
    assert!(pool.join_timeout(LIMIT));
}

fn tracing_events_reach_the_parent_in_a_span_with_pid_and_task() {
    let pool = pool(1);
    let pid = wait(pool.submit(Log("ready".into()))).unwrap();
    eventually("the worker's event", || {
        LOGS.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("hello from a worker: ready"))
    });
    let logs = LOGS.lock().unwrap().clone();
    let line = logs
        .iter()
        .find(|l| l.contains("hello from a worker: ready"))
        .unwrap();
    assert!(line.contains(&format!("worker.pid={pid}")), "{line}");
    assert!(line.contains("task.name=process_pool::Log"), "{line}");
    assert!(line.contains("answer=42"), "{line}");
    assert!(pool.join_timeout(LIMIT));
}

fn misconfiguration_is_a_clear_error() {
    let err = ProcessPool::builder().workers(0).build().unwrap_err();
    assert!(matches!(err, BuildError::ZeroWorkers), "{err}");
    let err = ProcessPool::builder()
        .worker_program("/nonexistent/offload-worker")
        .workers(1)
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/offload-worker"),
        "{err}"
    );
    // A program that never calls init(): it exits at once, and build says what to fix.
    let err = ProcessPool::builder()
        .worker_program("/bin/true")
        .workers(1)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("offload::init()"), "{err}");
}

fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ProcessPool>();
    send_sync::<BuildError>();
}

// ---------------------------------------------------------------- controls (issue 4)

/// CPU time (utime + stime, in clock ticks) of `/proc/<path>/stat`.
fn cpu_ticks(stat_path: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(stat_path) else {
        return 0;
    };
    // The command name, in parentheses, may hold spaces: count fields after it.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the whole line; the 12th and 13th after the name.
    fields
        .get(11)
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0)
}

/// CPU ticks of `worker` plus those of this process's pool I/O threads.
fn pool_cpu_ticks(worker: u32) -> u64 {
    let mut ticks = cpu_ticks(&format!("/proc/{worker}/stat"));
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "offload-io" {
            ticks += cpu_ticks(&task.path().join("stat").to_string_lossy());
        }
    }
    ticks
}

fn the_low_latency_mode_serves_cancels_and_goes_quiet_when_idle() {
    let before = children();
    let pool = ProcessPool::builder()
        .workers(1)
        .spin(Duration::from_micros(200))
        .build()
        .unwrap();
    for x in 0..500 {
        assert_eq!(wait(pool.submit(Square(x))), Ok(x * x));
    }
    let worker = *children().difference(&before).next().unwrap();
    // A running task still hears its cancel, and stops on its own.
    let handle = pool.submit(SpinUntilCancelled());
    eventually("the task runs", || pool.stats().running == 1);
    std::thread::sleep(Duration::from_millis(50));
    assert!(handle.cancel());
    assert!(wait(handle).unwrap_err().is_cancelled());
    assert_eq!(wait(pool.submit(Pid())), Ok(worker));
    assert_eq!(pool.stats().crashed, 0);
    // Idle, nobody keeps spinning: a spinning thread would show ~100 ticks a second.
    std::thread::sleep(Duration::from_millis(100));
    let start = pool_cpu_ticks(worker);
    std::thread::sleep(Duration::from_secs(1));
    let used = pool_cpu_ticks(worker) - start;
    assert!(
        used <= 10,
        "an idle pool in low-latency mode used {used} clock ticks of CPU in 1 s"
    );
    assert!(pool.join_timeout(LIMIT));
}

/// A request cancelled while it waits in the worker behind a running task is skipped, for
/// every way a request travels: small (read with the cancel behind it), over 64 KiB (a read
/// that ends where the frame ends, the cancel still in the socket), and over 1 MiB (a
/// shared-memory segment, whose first use brings a descriptor, where a read stops). With the
/// worker's pre-start cancel check skipped after any read, the last two ran every time.
fn a_request_cancelled_while_queued_in_the_worker_never_runs() {
    let pool = ProcessPool::builder()
        .workers(1)
        .in_flight_per_worker(4)
        // Long: the skip must come from the worker, not from a kill after the grace period.
        .cancel_grace(Duration::from_secs(20))
        .build()
        .unwrap();
    for size in [16, 100_000, 1_500_000] {
        let pid = wait(pool.submit(Pid())).unwrap();
        let running = pool.submit(Sleep(300));
        eventually("the first task runs", || pool.stats().running == 1);
        let path = temp_path("queued-then-cancelled");
        let queued = pool.submit(MarkWith(path.clone(), vec![7; size]));
        // Sent to the worker, queued there behind the running task.
        std::thread::sleep(Duration::from_millis(50));
        assert!(queued.cancel());
        assert!(wait(queued).unwrap_err().is_cancelled());
        wait(running).unwrap();
        // The next request's answer comes after the cancelled one's skip.
        assert_eq!(
            wait(pool.submit(Pid())),
            Ok(pid),
            "{size} B: the worker lives"
        );
        let ran = std::path::Path::new(&path).exists();
        let _ = std::fs::remove_file(&path);
        assert!(!ran, "a {size}-byte request cancelled while queued ran");
    }
    assert!(pool.join_timeout(LIMIT));
}

fn cancelling_a_running_task_reaches_it_cooperatively() {
    let pool = pool(1);
    let before = wait(pool.submit(Pid())).unwrap();
    let handle = pool.submit(SpinUntilCancelled());
    eventually("the task runs", || pool.stats().running == 1);
    std::thread::sleep(Duration::from_millis(50));
    assert!(handle.cancel());
    assert!(wait(handle).unwrap_err().is_cancelled());
    // The task saw the flag and returned: its worker was not killed.
    assert_eq!(wait(pool.submit(Pid())), Ok(before));
    assert_eq!(pool.stats().crashed, 0);
    assert!(pool.join_timeout(LIMIT));
}

fn a_task_that_ignores_its_cancel_is_killed_after_the_grace_period() {
    let pool = ProcessPool::builder()
        .workers(2)
        .cancel_grace(Duration::from_millis(200))
        .build()
        .unwrap();
    let bystander = pool.submit(Sleep(600));
    let started = temp_path("stubborn");
    let stubborn = pool.submit(MarkThenSleep(started.clone(), 60_000));
    eventually("both run", || {
        pool.stats().running == 2 && std::path::Path::new(&started).exists()
    });
    let _ = std::fs::remove_file(&started);
    let victim_pids = children();
    let started = Instant::now();
    drop(stubborn); // dropping the handle cancels, like cancel()
    assert_eq!(wait(bystander), Ok(()), "other tasks are untouched");
    eventually("the stubborn worker is replaced", || {
        pool.stats().restarts == 1 && pool.stats().workers == 2
    });
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(children().iter().any(|p| !victim_pids.contains(p)));
    assert_eq!(wait(pool.submit(Square(4))), Ok(16));
    assert!(pool.join_timeout(LIMIT));
}

fn a_task_past_its_timeout_fails_and_its_worker_is_replaced() {
    let pool = ProcessPool::builder()
        .workers(2)
        .task_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = wait(pool.submit_with(
        Sleep(60_000),
        offload_process::TaskOptions::new().timeout(Duration::from_millis(300)),
    ))
    .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        err.to_string(),
        "task `process_pool::Sleep` ran longer than its timeout of 300ms; its worker was killed and replaced"
    );
    // The pool default applies to plain submits, and short tasks are unaffected.
    assert_eq!(wait(pool.submit(Sleep(10))), Ok(()));
    let stats = pool.stats();
    assert_eq!((stats.timed_out, stats.failed), (1, 1), "{stats:?}");
    assert!(pool.join_timeout(LIMIT));
}

fn recycling_every_three_tasks_loses_and_repeats_nothing() {
    let log = temp_path("recycle");
    let pool = ProcessPool::builder()
        .workers(2)
        .max_tasks_per_worker(3)
        .build()
        .unwrap();
    let n = 10_000;
    let handles: Vec<_> = (0..n)
        .map(|i| pool.submit(Append(log.clone(), i)))
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(wait(h), Ok(i as u64));
    }
    let mut runs: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    runs.sort_unstable();
    assert_eq!(
        runs,
        (0..n).collect::<Vec<_>>(),
        "every task ran exactly once"
    );
    let restarts = pool.stats().restarts;
    assert!(
        restarts >= n / 3 - 2,
        "only {restarts} workers were recycled"
    );
    assert!(pool.join_timeout(LIMIT));
    let _ = std::fs::remove_file(&log);
}

/// One caller waiting on each task in turn: every request goes straight to an idle worker,
/// and no worker serves more than its limit.
fn sequential_waits_on_a_recycling_pool_keep_to_the_limit() {
    let pool = ProcessPool::builder()
        .workers(2)
        .max_tasks_per_worker(3)
        .build()
        .unwrap();
    let mut served: std::collections::HashMap<u32, usize> = Default::default();
    for _ in 0..60 {
        *served.entry(wait(pool.submit(Pid())).unwrap()).or_default() += 1;
    }
    assert!(served.values().all(|&n| n <= 3), "{served:?}");
    assert!(served.len() >= 20, "{served:?}");
    assert!(pool.join_timeout(LIMIT));
}

fn the_initializer_runs_in_every_worker_before_its_first_task() {
    let pool = ProcessPool::builder()
        .workers(2)
        .initializer(InitOk())
        .build()
        .unwrap();
    for h in (0..20)
        .map(|_| pool.submit(IsInitialized()))
        .collect::<Vec<_>>()
    {
        assert_eq!(wait(h), Ok(true));
    }
    // Replacements are initialized too.
    assert!(wait(pool.submit(Abort())).unwrap_err().is_worker_crash());
    for h in (0..20)
        .map(|_| pool.submit(IsInitialized()))
        .collect::<Vec<_>>()
    {
        assert_eq!(wait(h), Ok(true));
    }
    assert!(pool.join_timeout(LIMIT));
}

fn thread_locals_an_initializer_sets_are_seen_by_every_task() {
    let pool = ProcessPool::builder()
        .workers(1)
        .initializer(InitThreadLocal())
        .build()
        .unwrap();
    // One by one (each request read by an idle worker) and in a burst (read while a task
    // runs): every task runs on the thread the initializer ran on.
    for _ in 0..50 {
        assert_eq!(wait(pool.submit(ThreadState())), Ok(42));
    }
    for h in (0..200)
        .map(|_| pool.submit(ThreadState()))
        .collect::<Vec<_>>()
    {
        assert_eq!(wait(h), Ok(42));
    }
    assert!(pool.join_timeout(LIMIT));
}

fn a_failing_initializer_fails_build_and_later_breaks_the_pool_without_a_crash_loop() {
    let flag = temp_path("init-flag");
    std::fs::write(&flag, "").unwrap();
    let err = ProcessPool::builder()
        .workers(1)
        .initializer(InitFails(flag.clone()))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("is corrupt"), "{err}");
    assert!(err.to_string().contains("process_pool::InitFails"), "{err}");

    // Healthy at start; then every replacement fails its initializer.
    std::fs::remove_file(&flag).unwrap();
    let pool = ProcessPool::builder()
        .workers(1)
        .initializer(InitFails(flag.clone()))
        .build()
        .unwrap();
    std::fs::write(&flag, "").unwrap();
    let crash = pool.submit(Abort());
    let pending: Vec<_> = (0..5).map(|i| pool.submit(Square(i))).collect();
    assert!(wait(crash).unwrap_err().is_worker_crash());
    for h in pending {
        let err = wait(h).unwrap_err();
        assert!(matches!(err, TaskError::PoolBroken { .. }), "{err}");
        assert!(err.to_string().contains("is corrupt"), "{err}");
        assert!(err.to_string().contains("3 times in a row"), "{err}");
    }
    // Even once every worker is gone, new work is told why, not "shut down".
    eventually("the broken pool's workers exit", || {
        pool.stats().workers == 0
    });
    std::thread::sleep(Duration::from_millis(100));
    let later = wait(pool.submit(Square(1))).unwrap_err();
    assert!(matches!(later, TaskError::PoolBroken { .. }), "{later}");
    let later = futures::executor::block_on(async {
        use futures::StreamExt;
        pool.map((0..3).map(Square)).next().await
    });
    assert!(
        matches!(later, Some(Err(TaskError::PoolBroken { .. }))),
        "{later:?}"
    );
    assert!(
        pool.stats().restarts <= 3,
        "no crash loop: {:?}",
        pool.stats()
    );
    assert!(pool.join_timeout(LIMIT));
    let _ = std::fs::remove_file(&flag);
}

fn a_task_over_the_memory_limit_fails_naming_the_limit() {
    let pool = ProcessPool::builder()
        .workers(1)
        .memory_limit(256 << 20)
        .build()
        .unwrap();
    assert_eq!(wait(pool.submit(Allocate(16 << 20))), Ok(16 << 20));
    let err = wait(pool.submit(Allocate(1 << 30))).unwrap_err();
    assert!(err.is_worker_crash(), "{err}");
    assert!(
        err.to_string()
            .contains(", perhaps for exceeding the pool's memory limit of 256 MiB, while running"),
        "{err}"
    );
    assert_eq!(
        wait(pool.submit(Allocate(16 << 20))),
        Ok(16 << 20),
        "replaced"
    );
    assert!(pool.join_timeout(LIMIT));
}

fn retries_rerun_a_crashed_task_and_say_how_many_attempts_were_made() {
    let pool = pool(1);
    let counter = temp_path("retries-ok");
    let ok = pool.submit_with(
        CrashUntil(counter.clone(), 3),
        offload_process::TaskOptions::new().retries(2),
    );
    assert_eq!(wait(ok), Ok(3), "third attempt succeeds");
    let counter2 = temp_path("retries-fail");
    let err = wait(pool.submit_with(
        CrashUntil(counter2.clone(), 5),
        offload_process::TaskOptions::new().retries(1),
    ))
    .unwrap_err();
    assert!(err.is_worker_crash(), "{err}");
    assert!(err.to_string().contains("(after 2 attempts)"), "{err}");
    assert_eq!(pool.stats().retried, 3, "{:?}", pool.stats());
    assert!(pool.join_timeout(LIMIT));
    let _ = std::fs::remove_file(&counter);
    let _ = std::fs::remove_file(&counter2);
}

fn the_pool_grows_on_demand_and_shrinks_back_when_idle() {
    let pool = ProcessPool::builder()
        .workers(1)
        .max_workers(3)
        .in_flight_per_worker(1)
        .idle_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert_eq!(pool.stats().workers, 1);
    let busy: Vec<_> = (0..3).map(|_| pool.submit(Sleep(1_500))).collect();
    eventually("three workers", || pool.stats().workers == 3);
    for h in busy {
        assert_eq!(wait(h), Ok(()));
    }
    eventually("back to one worker", || {
        pool.stats().workers == 1 && children().iter().filter(|p| alive(**p)).count() == 1
    });
    assert_eq!(
        wait(pool.submit(Square(6))),
        Ok(36),
        "the minimum still serves"
    );
    assert!(pool.join_timeout(LIMIT));
}

fn work_put_back_after_the_pool_broke_still_resolves() {
    // Two workers; every replacement fails its initializer. `q1` and `q2` wait behind tasks
    // that abort: `q1`'s worker dies first and the pool breaks; `q2` is put back in the queue
    // only when its worker dies later, after the break. It must fail, not wait forever.
    let flag = temp_path("broken-requeue");
    let pool = ProcessPool::builder()
        .workers(2)
        .initializer(InitFails(flag.clone()))
        .build()
        .unwrap();
    std::fs::write(&flag, "").unwrap();
    let a = pool.submit(SleepAbort(200));
    let b = pool.submit(SleepAbort(3_000));
    let q1 = pool.submit(Square(1));
    let q2 = pool.submit(Square(2));
    assert!(wait(a).unwrap_err().is_worker_crash());
    assert!(wait(b).unwrap_err().is_worker_crash());
    for q in [q1, q2] {
        let err = wait(q).unwrap_err();
        assert!(matches!(err, TaskError::PoolBroken { .. }), "{err}");
    }
    assert!(pool.join_timeout(LIMIT), "a broken pool still shuts down");
    let _ = std::fs::remove_file(&flag);
}

fn a_small_memory_limit_leaves_the_worker_itself_enough() {
    // The limit is what tasks may use on top of the worker's own memory (its task thread's
    // stack alone is 8 MiB), so even 4 MiB neither fails the worker nor crash-loops.
    let pool = ProcessPool::builder()
        .workers(1)
        .memory_limit(4 << 20)
        .build()
        .unwrap();
    assert_eq!(wait(pool.submit(Allocate(1 << 20))), Ok(1 << 20));
    let err = wait(pool.submit(Allocate(64 << 20))).unwrap_err();
    assert!(err.to_string().contains("memory limit of 4 MiB"), "{err}");
    assert_eq!(wait(pool.submit(Allocate(1 << 20))), Ok(1 << 20));
    assert!(pool.stats().restarts <= 1, "{:?}", pool.stats());
    assert!(pool.join_timeout(LIMIT));
}

fn eight_workers_start_side_by_side_and_all_stay_up() {
    // Workers start concurrently, each from a thread of its own; none may die with the
    // thread that started it (PR_SET_PDEATHSIG fires when the forking *thread* ends).
    let pool = ProcessPool::builder().workers(8).build().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let stats = pool.stats();
    assert_eq!(
        (stats.workers, stats.restarts, stats.crashed),
        (8, 0, 0),
        "{stats:?}"
    );
    let results: Vec<u64> = (0..64)
        .map(|i| pool.submit(Square(i)))
        .map(|h| wait(h).unwrap())
        .collect();
    assert_eq!(results, (0..64).map(|i| i * i).collect::<Vec<_>>());
    assert_eq!(pool.stats().restarts, 0);
    assert!(pool.join_timeout(LIMIT));
}

fn map_grows_an_elastic_pool() {
    let pool = ProcessPool::builder()
        .workers(1)
        .max_workers(3)
        .build()
        .unwrap();
    assert_eq!(
        pool.workers(),
        3,
        "an elastic pool can run up to its maximum"
    );
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = std::thread::spawn({
        let (pool, peak, stop) = (pool.clone(), peak.clone(), stop.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(pool.stats().workers, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    let done = futures::executor::block_on(async {
        use futures::StreamExt;
        pool.map((0..60).map(|_| Sleep(20))).count().await
    });
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert_eq!(done, 60);
    assert!(peak.load(Ordering::Relaxed) > 1, "map never grew the pool");
    assert!(pool.join_timeout(LIMIT));
}

fn extra_workers_that_never_get_work_still_time_out() {
    let pool = ProcessPool::builder()
        .workers(1)
        .max_workers(3)
        .in_flight_per_worker(1)
        .idle_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let first = pool.submit(Sleep(500));
    // These make the pool grow, then vanish before the new workers could take them.
    drop((0..2).map(|i| pool.submit(Square(i))).collect::<Vec<_>>());
    assert_eq!(wait(first), Ok(()));
    eventually("back to one worker", || pool.stats().workers == 1);
    assert!(pool.join_timeout(LIMIT));
}

/// A caller blocked in `wait` reads its answer from the worker's socket itself, rather than
/// being woken by the pool's I/O thread (one thread hand-off less per round trip): the
/// output is decoded on the caller's thread. The I/O thread still reads whatever the caller
/// does not wait for, and every request is counted.
fn a_blocked_caller_reads_its_own_answer_and_the_pool_counts_it() {
    let pool = pool(1);
    let caller = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned();
    for _ in 0..3 {
        let output = wait(pool.submit(SleepThenAnswer(30))).unwrap();
        assert_eq!(output, DecodedOn(Some(caller.clone())));
    }
    // Awaited, not waited: the I/O thread delivers it.
    let output = futures::executor::block_on(pool.submit(SleepThenAnswer(30))).unwrap();
    assert_eq!(output, DecodedOn(Some("offload-io".into())));
    for i in 0..100 {
        assert_eq!(wait(pool.submit(Square(i))), Ok(i * i));
    }
    let stats = pool.stats();
    assert_eq!((stats.completed, stats.failed), (104, 0), "{stats:?}");
    assert_eq!((stats.queued, stats.running), (0, 0), "{stats:?}");
    assert!(pool.join_timeout(LIMIT));
}

/// A wait that times out while its caller reads the worker's socket leaves the answer to
/// the pool's I/O thread: a later wait (or await) gets it.
fn a_wait_that_times_out_leaves_the_answer_to_the_pool() {
    let pool = pool(1);
    let mut handle = pool.submit(SleepThenAnswer(300));
    assert_eq!(handle.wait_timeout(Duration::from_millis(30)), None);
    assert_eq!(
        handle.wait_timeout(LIMIT),
        Some(Ok(DecodedOn(Some("offload-io".into()))))
    );
    assert_eq!(wait(pool.submit(Square(3))), Ok(9), "the lane works again");
    assert!(pool.join_timeout(LIMIT));
}

/// A caller that does not block in `wait` never reads its answer itself: the pool's I/O
/// thread must, though the caller's write paused the pool's watch on the worker's socket (so
/// that a blocked caller's answer wakes the caller alone). Handles that are awaited, polled
/// with `is_done`, detached or dropped, in turns with blocking waits, all resolve; the pool
/// keeps serving. (The first version left an awaited answer unread: the watch, resumed while
/// the answer waited, did not wake the I/O thread.)
fn answers_nobody_blocks_for_are_read_by_the_pool() {
    let pool = pool(2);
    let runtime = current_thread_runtime();
    for x in 0..400u64 {
        let how = [Use::Wait, Use::Await, Use::PollDone, Use::Detach, Use::Drop][x as usize % 5];
        use_square(pool.submit(Square(x)), x, how, &runtime);
    }
    settles_everything_and_serves_on(&pool);
}

/// A way to use a task's handle.
#[derive(Debug, Clone, Copy)]
enum Use {
    Wait,
    Await,
    /// `is_done` until it is, then `wait`.
    PollDone,
    /// A `wait_timeout` that may give up, then another.
    WaitTimeout,
    Detach,
    Drop,
}

/// Uses the handle of `Square(x)` as `how` says, checking the answer where there is one.
fn use_square(handle: TaskHandle<u64>, x: u64, how: Use, runtime: &tokio::runtime::Runtime) {
    const SOON: Duration = Duration::from_secs(10);
    match how {
        Use::Wait => assert_eq!(wait(handle), Ok(x * x), "waiting for {x}"),
        Use::Await => {
            let awaited = runtime.block_on(async { tokio::time::timeout(SOON, handle).await });
            assert_eq!(awaited.ok(), Some(Ok(x * x)), "awaiting {x}");
        }
        Use::PollDone => {
            let deadline = Instant::now() + SOON;
            while !handle.is_done() {
                assert!(Instant::now() < deadline, "{x} never done");
                std::thread::sleep(Duration::from_micros(50));
            }
            assert_eq!(wait(handle), Ok(x * x));
        }
        Use::WaitTimeout => {
            let mut handle = handle;
            let answer = match handle.wait_timeout(Duration::from_micros(1)) {
                Some(answer) => answer,
                None => handle.wait_timeout(SOON).expect("no answer within 10 s"),
            };
            assert_eq!(answer, Ok(x * x), "wait_timeout for {x}");
        }
        Use::Detach => handle.detach(),
        Use::Drop => drop(handle),
    }
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Every request submitted so far settles, and the pool still serves, then shuts down.
fn settles_everything_and_serves_on(pool: &ProcessPool) {
    eventually("every request settled", || {
        let stats = pool.stats();
        stats.queued + stats.running == 0
    });
    assert_eq!(wait(pool.submit(Square(3))), Ok(9));
    assert!(pool.join_timeout(LIMIT));
}

/// Several caller threads on one pool, each mixing every way of using a handle (blocking
/// wait, `.await`, `is_done` polling, a `wait_timeout` that may time out, detach, drop, and a
/// task that takes a millisecond): nothing hangs, every answer is right, and the pool
/// settles everything. (Found no fault in review of the early pause; kept as a guard.)
fn callers_mixing_every_use_of_a_handle_never_hang() {
    const THREADS: u64 = 4;
    const USES: [Use; 7] = [
        Use::Wait,
        Use::Wait,
        Use::Wait,
        Use::Await,
        Use::PollDone,
        Use::WaitTimeout,
        Use::Drop,
    ];
    let pool = pool(2);
    let (tx, rx) = mpsc::channel();
    for t in 0..THREADS {
        let pool = pool.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let runtime = current_thread_runtime();
            let mut seed = t * 7919 + 1;
            for x in 0..400u64 {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let handle = pool.submit(Square(x));
                let pick = (seed >> 33) as usize % (USES.len() + 1);
                match USES.get(pick) {
                    Some(&how) => use_square(handle, x, how, &runtime),
                    None => {
                        handle.detach();
                        let slept = pool.submit(Sleep(1)).wait_timeout(LIMIT);
                        assert_eq!(slept, Some(Ok(())), "thread {t}, sleep after {x}");
                    }
                }
            }
            let _ = tx.send(t);
        });
    }
    drop(tx);
    for _ in 0..THREADS {
        rx.recv_timeout(LIMIT).expect("a caller thread hung");
    }
    settles_everything_and_serves_on(&pool);
}

/// A handle held without a wait does not hold its task back: the pool reads the answer (and
/// the task's log records) as they come, so the task runs to its end, is counted and is done,
/// and a late cancel finds it finished. (A first version paused the pool's reading from the
/// moment a caller wrote its request, for the wait it expected: a held handle's answer then
/// sat unread, `is_done` stayed false, a late `cancel` returned true, and a task that logged
/// more than the socket holds blocked in its worker.)
fn a_held_handle_does_not_hold_its_task_back() {
    let pool = pool(1);
    for i in 0..3 {
        assert_eq!(
            wait(pool.submit(Square(i))),
            Ok(i * i),
            "warm-up: the lane is used"
        );
    }
    let completed = pool.stats().completed;
    let handle = pool.submit(Square(7));
    eventually("the held task is counted", || {
        pool.stats().completed == completed + 1
    });
    assert!(handle.is_done());
    assert!(!handle.cancel(), "the task had finished");
    assert_eq!(wait(handle), Ok(49));

    let mark = std::env::temp_dir().join(format!("offload-held-chatty-{}", std::process::id()));
    let _ = std::fs::remove_file(&mark);
    let handle = pool.submit(ChattyThenMark(mark.display().to_string(), 5000));
    eventually("the held chatty task reaches its end", || mark.exists());
    assert_eq!(wait(handle), Ok(()));
    let _ = std::fs::remove_file(&mark);
    assert!(pool.join_timeout(LIMIT));
}

/// The same while another caller keeps the pool busy with blocking round trips, which send
/// the pool's I/O thread nothing.
fn a_held_handle_does_not_hold_its_task_back_in_a_busy_pool() {
    let pool = pool(2);
    for i in 0..3 {
        assert_eq!(wait(pool.submit(Square(i))), Ok(i * i));
    }
    let mark = std::env::temp_dir().join(format!("offload-held-busy-{}", std::process::id()));
    let _ = std::fs::remove_file(&mark);
    let handle = pool.submit(ChattyThenMark(mark.display().to_string(), 5000));
    let mut trips = 0u64;
    eventually("the held task reaches its end", || {
        assert_eq!(wait(pool.submit(Square(trips))), Ok(trips * trips));
        trips += 1;
        std::thread::sleep(Duration::from_millis(1));
        mark.exists()
    });
    assert_eq!(wait(handle), Ok(()));
    let _ = std::fs::remove_file(&mark);
    assert!(pool.join_timeout(LIMIT));
}

fn stats_count_what_happened() {
    let pool = pool(2);
    for h in (0..10).map(|i| pool.submit(Square(i))).collect::<Vec<_>>() {
        wait(h).unwrap();
    }
    assert!(wait(pool.submit(Panic("x".into()))).is_err());
    assert!(wait(pool.submit(Abort())).is_err());
    eventually("the replacement connects", || pool.stats().workers == 2);
    let stats = pool.stats();
    assert_eq!(stats.completed, 10, "{stats:?}");
    assert_eq!(stats.failed, 2, "{stats:?}");
    assert_eq!((stats.crashed, stats.restarts), (1, 1), "{stats:?}");
    assert_eq!((stats.queued, stats.running), (0, 0), "{stats:?}");
    assert!(pool.join_timeout(LIMIT));
}

fn sigint_and_sigterm_of_the_parent_leave_no_worker_behind() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let (mut parent, workers) = spawn_orphan_parent(true);
        // SAFETY: kill(2) with a negative pid signals the parent's process group.
        unsafe { libc::kill(-(parent.id() as i32), signal) };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(parent.wait());
        });
        let status = rx
            .recv_timeout(LIMIT)
            .expect("the parent hung on the signal")
            .unwrap();
        assert!(!status.success());
        assert_dead_after_2s(&workers, &format!("its parent's signal {signal}"));
    }
}

// ---------------------------------------------------------------- bad input (issue 5)

fn arguments_and_outputs_that_fail_to_serialize_are_clear_errors() {
    let pool = pool(1);
    let err = wait(pool.submit(TakesBad(Unserializable))).unwrap_err();
    assert!(matches!(err, TaskError::Serialization { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("this value refuses to be serialized"),
        "{err}"
    );
    let err = wait(pool.submit(GivesBad())).unwrap_err();
    assert!(matches!(err, TaskError::Serialization { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("this value refuses to be serialized"),
        "{err}"
    );
    assert_eq!(wait(pool.submit(Square(2))), Ok(4));
    assert!(pool.join_timeout(LIMIT));
}

/// A task's `Serialize` runs while the pool encodes it, on the caller's thread: it may
/// submit to a pool itself (it panicked with "already borrowed" when the pool's encode
/// buffer stayed borrowed through it).
fn a_task_whose_serialize_submits_to_a_pool_is_encoded() {
    let pool = pool(1);
    *NESTED.lock().unwrap() = Some(pool.clone());
    let result = wait(pool.submit(TakesSquared(SquaredOnTheWay(7))));
    *NESTED.lock().unwrap() = None;
    assert_eq!(result, Ok(49));
    assert!(pool.join_timeout(LIMIT));
}

fn a_stack_overflow_kills_only_its_worker_and_the_error_names_the_signal() {
    let pool = pool(1);
    let err = wait(pool.submit(Recurse(u64::MAX))).unwrap_err();
    match &err {
        TaskError::WorkerCrashed {
            signal: Some(_), ..
        } => {}
        other => panic!("expected a crash by signal, got {other}"),
    }
    assert!(err.to_string().contains("was killed by signal"), "{err}");
    assert_eq!(wait(pool.submit(Square(3))), Ok(9));
    assert!(pool.join_timeout(LIMIT));
}

fn garbage_or_closed_stdio_in_a_task_does_not_disturb_the_pool() {
    let out = Command::new("/proc/self/exe")
        .env(ROLE, "stdio-abuser")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.windows(4).any(|w| w == [252, 253, 254, 255]),
        "garbage passed through"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("stdio-abuser done"));
}

fn stdio_abuser() {
    let pool = pool(1);
    assert_eq!(wait(pool.submit(WriteGarbage())), Ok(7));
    assert_eq!(wait(pool.submit(CloseStdio())), Ok(()));
    assert_eq!(wait(pool.submit(Square(5))), Ok(25), "the worker serves on");
    assert_eq!(wait(pool.submit(Print("into the void".into()))), Ok(()));
    assert!(pool.join_timeout(LIMIT));
    println!("stdio-abuser done");
}

fn a_worker_that_skipped_init_cannot_start_a_cascade_of_pools() {
    // What a worker process whose `main` forgot `init()` sees when it reaches its own pool.
    std::env::set_var(
        offload_ipc::transport::ENV_SOCKET,
        "offload-test-not-a-pool",
    );
    let result = ProcessPool::builder().workers(1).build();
    std::env::remove_var(offload_ipc::transport::ENV_SOCKET);
    let err = result.unwrap_err();
    assert!(matches!(err, BuildError::InsideWorker), "{err}");
    assert_eq!(
        err.to_string(),
        "this process was started as an offload worker but is building a pool: call \
         offload::init() at the top of main, before anything else"
    );
}

fn a_worker_whose_connection_outlives_it_is_still_settled() {
    let pool = pool(1);
    let started = Instant::now();
    let err = wait(pool.submit(ForkAndDie())).unwrap_err();
    assert!(err.to_string().contains("exited with code 9"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(wait(pool.submit(Square(8))), Ok(64));
    assert!(pool.join_timeout(LIMIT));
}

fn a_worker_program_that_is_not_executable_is_a_clear_error() {
    let path = temp_path("not-executable");
    std::fs::write(&path, "not a program").unwrap();
    let err = ProcessPool::builder()
        .worker_program(&path)
        .workers(1)
        .build()
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&path), "{text}");
    assert!(text.contains("ermission denied"), "{text}");
    let _ = std::fs::remove_file(&path);
}

// ---------------------------------------------------------------- security (issue 5)

/// True if `text` contains a run of 64 hex digits: what a leaked token would look like.
fn has_token_like(text: &str) -> bool {
    let mut run = 0;
    for c in text.chars() {
        run = if c.is_ascii_hexdigit() { run + 1 } else { 0 };
        if run >= 64 {
            return true;
        }
    }
    false
}

fn the_token_is_on_no_command_line_in_no_environment_and_in_no_log() {
    let before = children();
    let pool = pool(2);
    wait(pool.submit(Log("security".into()))).unwrap();
    for pid in children().difference(&before) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            args,
            ["/proc/self/exe"],
            "a worker's command line is the program alone"
        );
        let environ =
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
                .into_owned();
        assert!(
            !has_token_like(&environ),
            "no token in a worker's environment"
        );
    }
    assert!(
        !LOGS.lock().unwrap().iter().any(|l| has_token_like(l)),
        "no token in logs"
    );
    assert!(pool.join_timeout(LIMIT));
}

fn a_worker_holds_only_its_standard_streams_and_its_connection() {
    let before = children();
    let pool = pool(1);
    wait(pool.submit(Square(1))).unwrap();
    let worker = *children().difference(&before).next().unwrap();
    let fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{worker}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let fd = e.file_name().to_string_lossy().parse().unwrap();
            let target = std::fs::read_link(e.path())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (fd, target)
        })
        .collect();
    // Beyond 0-2, and beyond what this test binary's `main` opens before `init` (which the
    // worker, running the same `main`, opened itself).
    let own = OPENED_BEFORE_INIT
        .get()
        .and_then(|&fd| u32::try_from(fd).ok());
    let mut extra: Vec<&str> = fds
        .iter()
        .filter(|(fd, _)| *fd > 2 && Some(*fd) != own)
        .map(|(_, target)| target.as_str())
        .collect();
    extra.sort_unstable();
    // Its connection, nothing else.
    assert_eq!(extra.len(), 1, "one descriptor beyond 0-2: {fds:?}");
    assert!(extra[0].starts_with("socket:"), "{fds:?}");
    assert!(pool.join_timeout(LIMIT));
}

fn the_socket_is_abstract_so_no_file_can_have_the_wrong_mode() {
    let before: HashSet<String> = pool_sockets().into_iter().collect();
    let pool = pool(1);
    let sockets: Vec<String> = pool_sockets()
        .into_iter()
        .filter(|s| !before.contains(s))
        .collect();
    assert_eq!(sockets.len(), 1);
    // /proc/net/unix lists abstract names with a leading '@' (see pool_sockets): no path
    // exists on disk for another user to open, whatever the umask.
    assert!(!std::path::Path::new(&sockets[0]).exists());
    assert!(!std::env::temp_dir().join(&sockets[0]).exists());
    assert!(pool.join_timeout(LIMIT));
}

// ---------------------------------------------------------------- runner

const ROLE: &str = "OFFLOAD_TEST_ROLE";

/// `(name, fn)` pairs from plain test function names.
macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), $name as fn())),*]
    };
}

static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A parent-side subscriber that records each event with the fields of its spans.
struct Capture;

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::INFO)
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut text = String::new();
        attrs.record(&mut Fields(&mut text));
        let mut spans = SPANS.lock().unwrap();
        spans.push(text);
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut text = CURRENT.with(|c| {
            let spans = SPANS.lock().unwrap();
            c.borrow()
                .iter()
                .map(|id: &u64| spans[*id as usize - 1].clone())
                .collect::<Vec<_>>()
                .join(" ")
        });
        event.record(&mut Fields(&mut text));
        LOGS.lock().unwrap().push(text);
    }
    fn enter(&self, id: &tracing::span::Id) {
        CURRENT.with(|c| c.borrow_mut().push(id.into_u64()));
    }
    fn exit(&self, _: &tracing::span::Id) {
        CURRENT.with(|c| c.borrow_mut().pop());
    }
}

static SPANS: Mutex<Vec<String>> = Mutex::new(Vec::new());
thread_local! {
    static CURRENT: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        use std::fmt::Write;
        let _ = write!(self.0, " {}={}", field.name(), value);
    }
}

fn main() {
    if std::env::var(ROLE).as_deref() == Ok("old-worker") {
        return old_worker(); // instead of init(): this one speaks another protocol
    }
    let opened = std::fs::File::open("/dev/null").expect("/dev/null opens");
    OPENED_BEFORE_INIT
        .set(std::os::fd::IntoRawFd::into_raw_fd(opened))
        .expect("set once");
    offload_process::init();
    match std::env::var(ROLE).as_deref() {
        Ok("orphan-parent") => return orphan_parent(),
        Ok("printer") => return printer(),
        Ok("stdio-abuser") => return stdio_abuser(),
        _ => {}
    }
    tracing::subscriber::set_global_default(Capture).unwrap();

    let tests: &[(&str, fn())] = tests![
        tasks_run_in_worker_processes,
        a_quick_result_does_not_wait_behind_the_next_task_on_its_worker,
        many_callers_at_once_each_get_their_own_answer,
        a_worker_clears_its_environment_contract,
        what_main_opened_before_init_stays_open_in_a_worker,
        works_from_inside_an_async_runtime,
        a_panic_comes_back_as_an_error_and_the_worker_keeps_serving,
        a_crashing_worker_fails_only_its_task_and_is_replaced,
        a_crash_during_shutdown_does_not_claim_a_replacement,
        an_unregistered_task_is_an_error_that_names_it,
        map_and_as_completed_work_across_processes,
        a_batch_fails_task_by_task_and_its_worker_keeps_serving,
        large_payloads_round_trip_and_oversized_ones_are_refused,
        strangers_and_garbage_are_refused_and_the_pool_keeps_working,
        shutdown_refuses_new_work_and_now_resolves_pending,
        dropping_and_joining_leave_no_zombie_and_no_orphan,
        workers_die_with_their_parent,
        worker_output_reaches_the_parents_streams,
        tracing_events_reach_the_parent_in_a_span_with_pid_and_task,
        misconfiguration_is_a_clear_error,
        a_worker_of_another_protocol_version_is_a_clear_error_not_a_hang,
        cancelling_a_running_task_reaches_it_cooperatively,
        a_request_cancelled_while_queued_in_the_worker_never_runs,
        a_task_that_ignores_its_cancel_is_killed_after_the_grace_period,
        a_task_past_its_timeout_fails_and_its_worker_is_replaced,
        recycling_every_three_tasks_loses_and_repeats_nothing,
        the_initializer_runs_in_every_worker_before_its_first_task,
        thread_locals_an_initializer_sets_are_seen_by_every_task,
        the_low_latency_mode_serves_cancels_and_goes_quiet_when_idle,
        a_failing_initializer_fails_build_and_later_breaks_the_pool_without_a_crash_loop,
        a_task_over_the_memory_limit_fails_naming_the_limit,
        retries_rerun_a_crashed_task_and_say_how_many_attempts_were_made,
        the_pool_grows_on_demand_and_shrinks_back_when_idle,
        work_put_back_after_the_pool_broke_still_resolves,
        a_small_memory_limit_leaves_the_worker_itself_enough,
        map_grows_an_elastic_pool,
        eight_workers_start_side_by_side_and_all_stay_up,
        extra_workers_that_never_get_work_still_time_out,
        stats_count_what_happened,
        a_blocked_caller_reads_its_own_answer_and_the_pool_counts_it,
        a_wait_that_times_out_leaves_the_answer_to_the_pool,
        answers_nobody_blocks_for_are_read_by_the_pool,
        callers_mixing_every_use_of_a_handle_never_hang,
        a_held_handle_does_not_hold_its_task_back,
        a_held_handle_does_not_hold_its_task_back_in_a_busy_pool,
        sequential_waits_on_a_recycling_pool_keep_to_the_limit,
        sigint_and_sigterm_of_the_parent_leave_no_worker_behind,
        the_token_is_on_no_command_line_in_no_environment_and_in_no_log,
        a_worker_holds_only_its_standard_streams_and_its_connection,
        the_socket_is_abstract_so_no_file_can_have_the_wrong_mode,
        arguments_and_outputs_that_fail_to_serialize_are_clear_errors,
        a_task_whose_serialize_submits_to_a_pool_is_encoded,
        a_stack_overflow_kills_only_its_worker_and_the_error_names_the_signal,
        garbage_or_closed_stdio_in_a_task_does_not_disturb_the_pool,
        a_worker_program_that_is_not_executable_is_a_clear_error,
        a_worker_that_skipped_init_cannot_start_a_cascade_of_pools,
        a_worker_whose_connection_outlives_it_is_still_settled,
        public_types_are_send_and_sync,
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    println!("\nrunning {} tests", tests.len());
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let (tx, rx) = mpsc::channel();
        let test = *test;
        let finished = Arc::new(AtomicBool::new(false));
        std::thread::spawn(move || {
            let result = std::panic::catch_unwind(test);
            let _ = tx.send(result.is_ok());
        });
        // Tests run one at a time: several assert on this process's children.
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(true) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Ok(false) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED (hung for 120 s)");
                println!("{passed} passed, {} failed", failed + 1);
                std::process::exit(101);
            }
        }
        finished.store(true, Ordering::Relaxed);
    }
    println!("\n{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(101);
    }
}
