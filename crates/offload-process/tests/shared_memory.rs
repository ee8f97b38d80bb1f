//! `SharedBuf` through a `ProcessPool`: shared memory that crosses to a worker as a file
//! descriptor beside the request, on real processes and real sockets.
//!
//! `harness = false`, like `process_pool`: workers re-execute this binary.

#![allow(clippy::unwrap_used)] // a test fails loudly by design

mod common;

use std::io::Write;
use std::time::Duration;

use futures::StreamExt;
use offload_core::{Executor, SharedBuf, TaskError, TaskHandle};
use offload_ipc::segment::{MAX_SLOTS, SEGMENT_MIN};
use offload_process::{ProcessPool, TaskOptions};

const LIMIT: Duration = Duration::from_secs(30);
const WATCHDOG: Duration = Duration::from_secs(120);

use common::task;

task!(Invert(SharedBuf) -> SharedBuf, |s| {
    let mut buf = s.0;
    buf.iter_mut().for_each(|b| *b = !*b);
    buf
});
task!(Echo(Vec<u8>) -> Vec<u8>, |s| s.0);
task!(Reverse(Vec<SharedBuf>) -> Vec<SharedBuf>, |s| s
    .0
    .into_iter()
    .rev()
    .collect());
task!(ManyBuffers(usize) -> Vec<SharedBuf>, |s| {
    (0..s.0).map(|_| SharedBuf::new(16).unwrap()).collect()
});
task!(Sum(SharedBuf) -> u64, |s| s.0.iter().map(|&b| u64::from(b)).sum());
task!(Filled(usize, u8) -> SharedBuf, |s| {
    let mut buf = SharedBuf::new(s.0).unwrap();
    buf.fill(s.1);
    buf
});
task!(SerializeItself(SharedBuf) -> (usize, bool), |s| {
    // The task's own serialization must not see the pool's descriptor list.
    let bytes = postcard::to_stdvec(&s.0).unwrap();
    let back: SharedBuf = postcard::from_bytes(&bytes).unwrap();
    (bytes.len(), back == s.0)
});
task!(CrashOnceThenSum(String, SharedBuf) -> u64, |s| {
    let first = !std::path::Path::new(&s.0).exists();
    if first {
        let mut f = std::fs::File::create(&s.0).unwrap();
        f.write_all(b"ran").unwrap();
        std::process::abort();
    }
    s.1.iter().map(|&b| u64::from(b)).sum()
});

task!(Resize(Vec<u8>, usize) -> Vec<u8>, |s| {
    let mut bytes = s.0;
    bytes.resize(s.1, 7);
    bytes
});
task!(
    EchoWithBuffer(Vec<u8>, SharedBuf) -> (Vec<u8>, SharedBuf),
    |s| (s.0, s.1)
);
task!(CrashOnceThenEcho(String, Vec<u8>) -> Vec<u8>, |s| {
    if !std::path::Path::new(&s.0).exists() {
        std::fs::File::create(&s.0)
            .unwrap()
            .write_all(b"ran")
            .unwrap();
        std::process::abort();
    }
    s.1
});

task!(ManyBuffersFrom(Vec<u8>, usize) -> Vec<SharedBuf>, |s| {
    (0..s.1).map(|_| SharedBuf::new(16).unwrap()).collect()
});
task!(Count(Vec<u8>, Vec<SharedBuf>) -> (usize, usize), |s| (
    s.0.len(),
    s.1.len()
));

fn wait<T>(mut handle: TaskHandle<T>) -> Result<T, TaskError> {
    handle
        .wait_timeout(LIMIT)
        .unwrap_or_else(|| panic!("no result within {LIMIT:?}"))
}

fn pattern(len: usize) -> SharedBuf {
    let mut buf = SharedBuf::new(len).unwrap();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    buf
}

fn pattern_vec(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// How many distinct shared-memory segments process `pid` has mapped.
fn mapped_segments(pid: u32) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let inodes: std::collections::HashSet<&str> = maps
        .lines()
        .filter(|line| line.contains("offload-shared-buf"))
        .filter_map(|line| line.split_whitespace().nth(4))
        .collect();
    inodes.len()
}

/// Descriptors of `pid` beyond stdin, stdout and stderr.
fn open_fds(pid: u32) -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: u32 = e.file_name().to_string_lossy().parse().ok()?;
            (fd > 2).then(|| std::fs::read_link(e.path()).ok())?
        })
        .map(|target| target.to_string_lossy().into_owned())
        .collect();
    fds.sort();
    fds
}

fn the_buffer_skips_the_socket_and_comes_back_changed_in_place() {
    // Frames of at most 64 KiB: 8 MiB can only cross in shared memory.
    let pool = ProcessPool::builder()
        .workers(1)
        .max_frame_size(64 << 10)
        .build()
        .unwrap();
    let len = 8 << 20;
    let back = wait(pool.submit(Invert(pattern(len)))).unwrap();
    assert_eq!(back.len(), len);
    let wrong = back
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b != !((i % 251) as u8))
        .count();
    assert_eq!(wrong, 0, "every byte inverted by the worker");
    let err = wait(pool.submit(Echo(vec![0; len]))).unwrap_err();
    assert!(err.to_string().contains("max_frame_size"), "{err}");
    assert!(pool.join_timeout(LIMIT));
}

fn hundreds_of_buffers_in_one_request_and_one_answer_keep_their_order() {
    // More descriptors than one sendmsg carries (253), both ways.
    let pool = ProcessPool::builder().workers(1).build().unwrap();
    let bufs: Vec<SharedBuf> = (0..600)
        .map(|i| {
            let mut buf = SharedBuf::new(4096).unwrap();
            buf.fill((i % 256) as u8);
            buf[0] = (i / 256) as u8;
            buf
        })
        .collect();
    let back = wait(pool.submit(Reverse(bufs))).unwrap();
    assert_eq!(back.len(), 600);
    for (j, buf) in back.iter().enumerate() {
        let i = 599 - j;
        assert_eq!((buf[0], buf[1]), ((i / 256) as u8, (i % 256) as u8), "{j}");
    }
    assert!(pool.join_timeout(LIMIT));
}

fn buffers_travel_in_map_batches_and_nothing_leaks() {
    let parent_before = open_fds(std::process::id());
    let pool = ProcessPool::builder().workers(2).build().unwrap();
    let tasks: Vec<Sum> = (0..500)
        .map(|i| {
            let mut buf = SharedBuf::new(1000).unwrap();
            buf.fill((i % 200) as u8);
            Sum(buf)
        })
        .collect();
    let sums: Vec<u64> =
        futures::executor::block_on(pool.map(tasks).map(|r| r.unwrap()).collect::<Vec<u64>>());
    let expected: Vec<u64> = (0..500).map(|i| (i % 200) * 1000).collect();
    assert_eq!(sums, expected);
    let made: Vec<SharedBuf> = futures::executor::block_on(
        pool.map((0..300).map(|i| Filled(100 + i, (i % 256) as u8)))
            .map(|r| r.unwrap())
            .collect::<Vec<SharedBuf>>(),
    );
    for (i, buf) in made.iter().enumerate() {
        assert_eq!(buf.len(), 100 + i);
        assert!(buf.iter().all(|&b| b == (i % 256) as u8), "{i}");
    }
    drop(made);
    // Workers keep only their connection; the parent is back to where it was. A worker
    // drops an answer's descriptors just after writing it, so the last one may still be
    // closing when its answer arrives: allow it a moment.
    for worker in pool_workers() {
        let deadline = std::time::Instant::now() + LIMIT;
        let mut fds = open_fds(worker);
        while fds.len() != 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            fds = open_fds(worker);
        }
        assert_eq!(fds.len(), 1, "worker {worker} holds {fds:?}");
    }
    assert!(pool.join_timeout(LIMIT));
    drop(pool);
    assert_eq!(open_fds(std::process::id()), parent_before);
}

fn pool_workers() -> Vec<u32> {
    common::children().into_iter().collect()
}

fn a_task_serializing_its_buffer_itself_gets_the_bytes() {
    let pool = ProcessPool::builder().workers(1).build().unwrap();
    let (len, same) = wait(pool.submit(SerializeItself(pattern(1000)))).unwrap();
    assert!(same, "the buffer survives the task's own round trip");
    assert!(
        len > 1000,
        "written inline, not as a descriptor: {len} bytes"
    );
    // In a batch the whole run is inside the pool's encode and decode: same answer.
    let answers: Vec<(usize, bool)> = futures::executor::block_on(
        pool.map((0..3).map(|_| SerializeItself(pattern(1000))))
            .map(|r| r.unwrap())
            .collect::<Vec<_>>(),
    );
    assert_eq!(answers, vec![(len, true); 3]);
    assert!(pool.join_timeout(LIMIT));
}

fn a_retried_task_gets_its_buffer_again_after_a_crash() {
    let marker = std::env::temp_dir().join(format!("offload-shm-crash-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let pool = ProcessPool::builder().workers(1).build().unwrap();
    let mut buf = SharedBuf::new(1 << 20).unwrap();
    buf.fill(3);
    let task = CrashOnceThenSum(marker.to_string_lossy().into_owned(), buf);
    let sum = wait(pool.submit_with(task, TaskOptions::new().retries(1))).unwrap();
    assert_eq!(sum, 3 << 20);
    let _ = std::fs::remove_file(&marker);
    assert!(pool.join_timeout(LIMIT));
}

fn large_arguments_cross_in_reused_shared_memory_and_come_back_whole() {
    let before = open_segments();
    let pool = ProcessPool::builder().workers(1).build().unwrap();
    for len in [SEGMENT_MIN - 1, SEGMENT_MIN, 3 << 20, 8 << 20, 2 << 20] {
        let input = pattern_vec(len);
        assert_eq!(
            wait(pool.submit(Echo(input.clone()))),
            Ok(input),
            "{len} bytes"
        );
    }
    let worker = pool_workers()[0];
    let mapped = mapped_segments(worker);
    assert!(
        (1..=MAX_SLOTS).contains(&mapped),
        "the worker maps the pool's segments, a bounded number: {mapped}"
    );
    // An output too large for its segment comes back through the socket; a small one in it.
    let grown = wait(pool.submit(Resize(pattern_vec(1 << 20), 20 << 20))).unwrap();
    assert_eq!(grown.len(), 20 << 20);
    assert_eq!(grown[..1 << 20], pattern_vec(1 << 20)[..]);
    assert!(grown[1 << 20..].iter().all(|&b| b == 7));
    let shrunk = wait(pool.submit(Resize(pattern_vec(3 << 20), 10))).unwrap();
    assert_eq!(shrunk, pattern_vec(10));
    // A burst of more large requests than there are slots: the rest take the socket.
    let inputs: Vec<Vec<u8>> = (0..10u8)
        .map(|i| {
            let mut input = pattern_vec(4 << 20);
            input[0] = i;
            input
        })
        .collect();
    let handles: Vec<_> = inputs
        .iter()
        .map(|i| pool.submit(Echo(i.clone())))
        .collect();
    for (handle, input) in handles.into_iter().zip(&inputs) {
        assert!(wait(handle).unwrap() == *input, "request {}", input[0]);
    }
    assert!(mapped_segments(worker) <= MAX_SLOTS);
    // A large argument still carries the shared buffers in it, beside its segment.
    let (bytes, buf) =
        wait(pool.submit(EchoWithBuffer(pattern_vec(2 << 20), pattern(1000)))).unwrap();
    assert_eq!(
        (bytes, &buf[..]),
        (pattern_vec(2 << 20), &pattern(1000)[..])
    );
    drop(buf);
    // Small tasks after large ones: encoded through the pool's spare buffer, and copied out.
    assert_eq!(wait(pool.submit(Echo(vec![1, 2, 3]))), Ok(vec![1, 2, 3]));
    assert_eq!(wait(pool.submit(Sum(pattern(10)))), Ok(45));
    assert!(pool.join_timeout(LIMIT));
    drop(pool);
    assert_eq!(open_segments(), before, "the pool's segments close with it");
}

fn the_limits_of_a_message_hold_for_large_arguments_too() {
    let pool = ProcessPool::builder()
        .workers(1)
        .max_frame_size(5 << 19)
        .build()
        .unwrap();
    // As many descriptors as a message may carry, beside a large argument: no room for a
    // segment's, so it takes the socket.
    let bufs: Vec<SharedBuf> = (0..1024).map(|_| SharedBuf::new(16).unwrap()).collect();
    let counted = wait(pool.submit(Count(pattern_vec(2 << 20), bufs)));
    assert_eq!(counted, Ok((2 << 20, 1024)));
    // An answer in a segment with more descriptors than a message may carry fails its task.
    let err = wait(pool.submit(ManyBuffersFrom(pattern_vec(2 << 20), 1025))).unwrap_err();
    assert!(matches!(err, TaskError::Serialization { .. }), "{err}");
    assert!(err.to_string().contains("at most 1024"), "{err}");
    // An output that fits its segment (3 MiB) but not the pool's max_frame_size (2.5 MiB).
    let err = wait(pool.submit(Resize(pattern_vec(2 << 20), 11 << 18))).unwrap_err();
    assert!(matches!(err, TaskError::Serialization { .. }), "{err}");
    assert!(err.to_string().contains("max_frame_size"), "{err}");
    let input = pattern_vec(2 << 20);
    assert!(
        wait(pool.submit(Echo(input.clone()))).unwrap() == input,
        "the worker serves on"
    );
    assert!(pool.join_timeout(LIMIT));
}

fn a_map_over_twelve_thousand_buffers_gets_every_result() {
    let pool = ProcessPool::builder().workers(2).build().unwrap();
    let n = 12_000;
    let sums: Vec<Result<u64, TaskError>> = futures::executor::block_on(
        pool.map((0..n).map(|i| {
            let mut buf = SharedBuf::new(8).unwrap();
            buf.fill((i % 7) as u8);
            Sum(buf)
        }))
        .collect::<Vec<_>>(),
    );
    let failed: Vec<String> = sums
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .take(3)
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let expected: Vec<u64> = (0..n).map(|i| (i % 7) as u64 * 8).collect();
    assert_eq!(
        sums.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        expected
    );
    assert!(pool.join_timeout(LIMIT));
}

fn an_idle_pool_lets_go_of_its_segments() {
    let before = open_segments();
    let pool = ProcessPool::builder().workers(1).build().unwrap();
    let input = pattern_vec(3 << 20);
    assert!(wait(pool.submit(Echo(input.clone()))).unwrap() == input);
    let worker = pool_workers()[0];
    assert_eq!(mapped_segments(worker), 1);
    assert_eq!(open_segments(), before + 1, "the parent keeps it too");
    // Unused for two seconds: dropped on both sides.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (mapped_segments(worker) > 0 || open_segments() > before)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(mapped_segments(worker), 0, "the worker unmapped it");
    assert_eq!(open_segments(), before, "the parent closed it");
    // The next large argument gets a new one.
    assert!(wait(pool.submit(Echo(input.clone()))).unwrap() == input);
    assert_eq!(mapped_segments(worker), 1);
    assert_eq!(wait(pool.submit(Sum(pattern(10)))), Ok(45));
    assert!(pool.join_timeout(LIMIT));
}

fn a_large_argument_is_run_again_after_its_worker_crashed() {
    let marker = std::env::temp_dir().join(format!("offload-segment-crash-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let pool = ProcessPool::builder().workers(1).build().unwrap();
    let input = pattern_vec(4 << 20);
    let task = CrashOnceThenEcho(marker.to_string_lossy().into_owned(), input.clone());
    let back = wait(pool.submit_with(task, TaskOptions::new().retries(1)));
    let _ = std::fs::remove_file(&marker);
    assert!(back.unwrap() == input, "the retry got the whole argument");
    let input = pattern_vec(5 << 20);
    assert!(wait(pool.submit(Echo(input.clone()))).unwrap() == input);
    assert!(pool.join_timeout(LIMIT));
}

/// Shared-memory segments this process holds open.
fn open_segments() -> usize {
    open_fds(std::process::id())
        .iter()
        .filter(|target| target.contains("offload-shared-buf"))
        .count()
}

fn a_finished_task_leaves_no_buffer_open_in_the_parent() {
    let pool = ProcessPool::builder().workers(1).build().unwrap();
    // Through the pool's I/O thread (a timeout sends it that way) and written directly.
    let via_reactor = TaskOptions::new().timeout(LIMIT);
    let back = wait(pool.submit_with(Sum(pattern(1 << 20)), via_reactor)).unwrap();
    assert_eq!(back, (0..1u64 << 20).map(|i| i % 251).sum::<u64>());
    let back = wait(pool.submit(Sum(pattern(1 << 20)))).unwrap();
    assert_eq!(back, (0..1u64 << 20).map(|i| i % 251).sum::<u64>());
    // The pool is alive and idle: nothing of the finished tasks is held.
    assert_eq!(open_segments(), 0, "{:?}", open_fds(std::process::id()));
    assert!(pool.join_timeout(LIMIT));
}

fn too_many_buffers_in_a_request_or_an_answer_fail_only_that_task() {
    let pool = ProcessPool::builder().workers(1).build().unwrap();
    let bufs: Vec<SharedBuf> = (0..1025).map(|_| SharedBuf::new(64).unwrap()).collect();
    let err = wait(pool.submit(Reverse(bufs))).unwrap_err();
    assert!(matches!(err, TaskError::Serialization { .. }), "{err}");
    assert!(err.to_string().contains("over the limit of 1024"), "{err}");
    let err = wait(pool.submit(ManyBuffers(1025))).unwrap_err();
    assert!(matches!(err, TaskError::Serialization { .. }), "{err}");
    assert!(err.to_string().contains("at most 1024"), "{err}");
    let bufs = wait(pool.submit(ManyBuffers(1024))).unwrap();
    assert_eq!(bufs.len(), 1024, "the limit itself is fine");
    drop(bufs);
    assert_eq!(
        wait(pool.submit(Sum(pattern(10)))),
        Ok(45),
        "the worker serves on"
    );
    assert!(pool.join_timeout(LIMIT));
}

/// Sets this process's soft limit on open descriptors; returns the old limits.
fn set_soft_fd_limit(soft: libc::rlim_t) -> libc::rlimit {
    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass, nothing else.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) };
    let lowered = libc::rlimit {
        rlim_cur: soft.min(ours.rlim_max),
        rlim_max: ours.rlim_max,
    };
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) };
    ours
}

fn a_parent_out_of_descriptors_fails_the_task_saying_so() {
    let pool = ProcessPool::builder().workers(1).build().unwrap();
    wait(pool.submit(Sum(pattern(1)))).unwrap();
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as libc::rlim_t;
    // Room for a few of the answer's buffers, not for 1,000.
    let ours = set_soft_fd_limit(open + 64);
    let answer = wait(pool.submit(ManyBuffers(1000)));
    // SAFETY: restores the limits read above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &ours) };
    let err = answer.unwrap_err();
    assert!(err.is_worker_crash(), "{err}");
    assert!(
        err.to_string()
            .contains("after the pool closed its connection"),
        "the error says the pool, not the worker, ended it: {err}"
    );
    assert!(
        err.to_string().contains("out of file descriptors"),
        "the error says why: {err}"
    );
    assert_eq!(
        wait(pool.submit(Sum(pattern(10)))),
        Ok(45),
        "a replacement serves on"
    );
    assert!(pool.join_timeout(LIMIT));
}

fn a_worker_may_hold_as_many_descriptors_as_the_system_allows() {
    // Workers inherit a soft limit below the hard one, as on most systems (1024).
    let ours = set_soft_fd_limit(512);
    let before = common::children();
    let pool = ProcessPool::builder().workers(1).build();
    // SAFETY: restores the limits read above, before anything can fail.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &ours) };
    let pool = pool.unwrap();
    wait(pool.submit(Sum(pattern(1)))).unwrap();
    let worker = *common::children().difference(&before).next().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{worker}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3], fields[4], "soft = hard: {line}");
    assert!(pool.join_timeout(LIMIT));
}

fn main() {
    offload_process::init();
    std::thread::spawn(|| {
        std::thread::sleep(WATCHDOG);
        eprintln!("shared_memory tests hung for {WATCHDOG:?}");
        std::process::exit(101);
    });
    let tests: &[(&str, fn())] = &[
        (
            "large_arguments_cross_in_reused_shared_memory_and_come_back_whole",
            large_arguments_cross_in_reused_shared_memory_and_come_back_whole,
        ),
        (
            "the_limits_of_a_message_hold_for_large_arguments_too",
            the_limits_of_a_message_hold_for_large_arguments_too,
        ),
        (
            "a_map_over_twelve_thousand_buffers_gets_every_result",
            a_map_over_twelve_thousand_buffers_gets_every_result,
        ),
        (
            "an_idle_pool_lets_go_of_its_segments",
            an_idle_pool_lets_go_of_its_segments,
        ),
        (
            "a_large_argument_is_run_again_after_its_worker_crashed",
            a_large_argument_is_run_again_after_its_worker_crashed,
        ),
        (
            "the_buffer_skips_the_socket_and_comes_back_changed_in_place",
            the_buffer_skips_the_socket_and_comes_back_changed_in_place,
        ),
        (
            "hundreds_of_buffers_in_one_request_and_one_answer_keep_their_order",
            hundreds_of_buffers_in_one_request_and_one_answer_keep_their_order,
        ),
        (
            "buffers_travel_in_map_batches_and_nothing_leaks",
            buffers_travel_in_map_batches_and_nothing_leaks,
        ),
        (
            "a_task_serializing_its_buffer_itself_gets_the_bytes",
            a_task_serializing_its_buffer_itself_gets_the_bytes,
        ),
        (
            "a_retried_task_gets_its_buffer_again_after_a_crash",
            a_retried_task_gets_its_buffer_again_after_a_crash,
        ),
        (
            "a_finished_task_leaves_no_buffer_open_in_the_parent",
            a_finished_task_leaves_no_buffer_open_in_the_parent,
        ),
        (
            "too_many_buffers_in_a_request_or_an_answer_fail_only_that_task",
            too_many_buffers_in_a_request_or_an_answer_fail_only_that_task,
        ),
        (
            "a_parent_out_of_descriptors_fails_the_task_saying_so",
            a_parent_out_of_descriptors_fails_the_task_saying_so,
        ),
        (
            "a_worker_may_hold_as_many_descriptors_as_the_system_allows",
            a_worker_may_hold_as_many_descriptors_as_the_system_allows,
        ),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        // One at a time: tests look at this process's children and descriptors.
        if std::panic::catch_unwind(test).is_ok() {
            println!("test {name} ... ok");
            passed += 1;
        } else {
            println!("test {name} ... FAILED");
            failed += 1;
        }
    }
    println!("\n{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(101);
    }
}
