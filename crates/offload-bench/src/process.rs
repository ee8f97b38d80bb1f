//! The process group: offload's `ProcessPool` against Python's `ProcessPoolExecutor` and
//! `multiprocessing.Pool` (run by `python/peers.py`, see [`crate::python`]) and against the
//! floor, a raw Unix socket ping-pong between two processes ([`crate::raw_uds`]).
//!
//! Every pool has two worker processes, one per core of the machine. Offload is driven from
//! the calling thread with the blocking `TaskHandle::wait` (as Python's `Future.result()`
//! blocks); `map` is a stream and runs under `futures::executor::block_on`. The systems take
//! turns within every run (round trips in blocks of [`ROUNDTRIP_BLOCK`], other benchmarks one
//! sample each), so a change in the machine's load hits them all alike. The pools are built
//! once and stay warm, except in the startup benchmark, which builds a fresh one per sample.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use futures::StreamExt;
use offload::prelude::*;
use serde_json::json;

use crate::procspawn_peer::{self, Procspawn};
use crate::python::Python;
use crate::raw_uds::RawEcho;
use crate::report::{Better, Goal, Row, Target};
use crate::{stats, Settings};

/// The tiniest task: all its cost is the pool's.
#[offload::task]
pub(crate) fn noop(x: u64) -> u64 {
    x
}

/// A payload there and back.
#[offload::task]
pub(crate) fn echo(data: Bytes) -> Bytes {
    data
}

/// A payload in shared memory there and back.
#[offload::task]
pub(crate) fn echo_shared(data: offload::SharedBuf) -> offload::SharedBuf {
    data
}

/// Bytes that serialize as one length and one copy. A plain `Vec<u8>` goes through serde as
/// a sequence, element by element, which is several times slower for megabytes (see
/// `docs/benchmarks.md`).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Bytes(pub(crate) Vec<u8>);

impl serde::Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}

/// Worker processes in every pool of this group.
const WORKERS: usize = 2;

/// Round trips a system makes before the next system takes its turn.
const ROUNDTRIP_BLOCK: usize = 100;

/// The message of a raw round trip: about what a tiny task costs on offload's wire.
const RAW_MESSAGE: usize = 16;

/// The argument of the payload benchmark.
const PAYLOAD: usize = 8 << 20;

/// How much to measure.
struct Sizes {
    submit_runs: usize,
    submit_tasks: u64,
    map_runs: usize,
    map_tasks: u64,
    roundtrip_runs: usize,
    roundtrips: usize,
    roundtrip_warmup: usize,
    startup_runs: usize,
    payload_runs: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                submit_runs: 3,
                submit_tasks: 20_000,
                map_runs: 3,
                map_tasks: 200_000,
                roundtrip_runs: 3,
                roundtrips: 300,
                roundtrip_warmup: 100,
                startup_runs: 5,
                payload_runs: 5,
            }
        } else {
            Sizes {
                submit_runs: 11,
                submit_tasks: 20_000,
                map_runs: 11,
                map_tasks: 1_000_000,
                roundtrip_runs: 15,
                roundtrips: 2_000,
                roundtrip_warmup: 500,
                startup_runs: 15,
                payload_runs: 21,
            }
        }
    }
}

/// The extra heap of the parent in `process.startup_ms.offload_large_parent`, MiB.
const LARGE_PARENT_MIB: usize = 256;

/// The low-latency mode's polling time in the `offload_spin` rows.
const SPIN: std::time::Duration = std::time::Duration::from_micros(100);

/// The goals the process backend is held to, checked after every run that measures them.
pub(crate) const GOALS: &[Goal] = &[
    Goal {
        what: "tiny tasks submitted one by one: offload / ProcessPoolExecutor",
        row: "process.submit_tasks_per_s.offload",
        against: Some("process.submit_tasks_per_s.python_ppe"),
        target: Target::AtLeast(20.0),
    },
    Goal {
        what: "tiny tasks submitted one by one: offload / ProcessPoolExecutor (issue 6)",
        row: "process.submit_tasks_per_s.offload",
        against: Some("process.submit_tasks_per_s.python_ppe"),
        target: Target::AtLeast(100.0),
    },
    Goal {
        what: "tiny tasks submitted one by one: offload / procspawn",
        row: "process.submit_tasks_per_s.offload",
        against: Some("process.submit_tasks_per_s.procspawn"),
        target: Target::AtLeast(30.0),
    },
    Goal {
        what: "round trip p50: offload / raw Unix socket",
        row: "process.roundtrip_p50_us.offload",
        against: Some("process.roundtrip_p50_us.raw_uds"),
        target: Target::AtMost(1.5),
    },
    Goal {
        what: "round trip p50: offload / raw Unix socket (issue 6)",
        row: "process.roundtrip_p50_us.offload",
        against: Some("process.roundtrip_p50_us.raw_uds"),
        target: Target::AtMost(1.2),
    },
    Goal {
        what: "round trip p50 in the low-latency mode (spin), us",
        row: "process.roundtrip_p50_us.offload_spin",
        against: None,
        target: Target::AtMost(25.0),
    },
    Goal {
        what: "round trip p99: offload / raw Unix socket",
        row: "process.roundtrip_p99_us.offload",
        against: Some("process.roundtrip_p99_us.raw_uds"),
        target: Target::None,
    },
    Goal {
        what: "startup of 2 workers to the first result, ms",
        row: "process.startup_ms.offload",
        against: None,
        target: Target::AtMost(20.0),
    },
    Goal {
        what: "startup of 2 workers: offload / raw spawn of 2 children",
        row: "process.startup_ms.offload",
        against: Some("process.startup_ms.raw_spawn"),
        target: Target::AtMost(1.5),
    },
    Goal {
        what: "startup of 8 workers: offload / raw spawn of 8 children",
        row: "process.startup_8_workers_ms.offload",
        against: Some("process.startup_8_workers_ms.raw_spawn"),
        target: Target::AtMost(1.5),
    },
    Goal {
        what: "startup of 2 workers from a parent holding 256 MiB more / from the bench as is",
        row: "process.startup_ms.offload_large_parent",
        against: Some("process.startup_ms.offload"),
        target: Target::AtMost(1.5),
    },
    Goal {
        what: "parent memory over a 10M-task map: second-half peak - first-half peak, MiB",
        row: "process.map_10m_parent_rss_growth_mib.offload",
        against: None,
        target: Target::AtMost(1.0),
    },
    Goal {
        what: "8 MiB argument round trip: offload / raw Unix socket",
        row: "process.payload_8mib_mb_per_s.offload",
        against: Some("process.payload_8mib_mb_per_s.raw_uds"),
        target: Target::AtLeast(0.7),
    },
    Goal {
        what: "8 MiB argument in shared memory: offload SharedBuf / raw Unix socket",
        row: "process.payload_8mib_mb_per_s.offload_shm",
        against: Some("process.payload_8mib_mb_per_s.raw_uds"),
        target: Target::AtLeast(2.0),
    },
    Goal {
        what: "map of tiny tasks: offload / multiprocessing.Pool.map (issue 6)",
        row: "process.map_tasks_per_s.offload",
        against: Some("process.map_tasks_per_s.python_pool"),
        target: Target::AtLeast(5.0),
    },
];

/// What the group needs, started once.
struct Bench {
    sizes: Sizes,
    pool: offload::ProcessPool,
    /// The same pool in low-latency mode, for the round trips only.
    spin_pool: Option<offload::ProcessPool>,
    python: Option<Python>,
    raw: Option<RawEcho>,
    /// The Rust peer, for submits and round trips.
    procspawn: Option<Procspawn>,
}

/// Runs the process group.
pub(crate) fn run(settings: &Settings) -> anyhow::Result<Vec<Row>> {
    let ids = |metric: &str, systems: &[&str]| -> Vec<String> {
        systems
            .iter()
            .map(|s| format!("process.{metric}.{s}"))
            .collect()
    };
    let submit_ids = ids(
        "submit_tasks_per_s",
        &["offload", "python_ppe", "procspawn"],
    );
    let map_ids = ids("map_tasks_per_s", &["offload", "python_pool"]);
    let roundtrip_ids: Vec<String> = ["roundtrip_p50_us", "roundtrip_p99_us"]
        .iter()
        .flat_map(|m| {
            ids(
                m,
                &[
                    "offload",
                    "python_ppe",
                    "raw_uds",
                    "offload_spin",
                    "procspawn",
                ],
            )
        })
        .collect();
    let mut startup_ids = ids(
        "startup_ms",
        &[
            "offload",
            "python_ppe",
            "python_ppe_spawn",
            "raw_spawn",
            "procspawn",
        ],
    );
    startup_ids.extend(ids("startup_8_workers_ms", &["offload", "raw_spawn"]));
    startup_ids.extend(ids("startup_ms", &["offload_large_parent"]));
    let payload_ids = ids(
        "payload_8mib_mb_per_s",
        &[
            "offload",
            "python_ppe",
            "raw_uds",
            "offload_shm",
            "offload_shm_copy_in",
        ],
    );
    let recycle_ids = ids("recycle_tasks_per_s", &["offload", "python_ppe"]);
    let rss_ids = ids("idle_worker_rss_mib", &["offload"]);
    let flat_ids = ids("map_10m_parent_rss_growth_mib", &["offload"]);
    let want = |ids: &[String]| settings.wants(ids);
    let (submit, map, roundtrip, startup, payload, recycle) = (
        want(&submit_ids),
        want(&map_ids),
        want(&roundtrip_ids),
        want(&startup_ids),
        want(&payload_ids),
        want(&recycle_ids),
    );
    let rss = want(&rss_ids);
    let flat = want(&flat_ids);
    if !(submit || map || roundtrip || startup || payload || recycle || rss || flat) {
        return Ok(Vec::new());
    }

    let python = Python::start()?;
    let raw = if roundtrip || payload {
        Some(RawEcho::start()?)
    } else {
        None
    };
    let pool = offload::ProcessPool::builder()
        .workers(WORKERS)
        .build()
        .context("could not build the offload process pool")?;
    let spin_pool = if roundtrip {
        Some(
            offload::ProcessPool::builder()
                .workers(WORKERS)
                .spin(SPIN)
                .build()
                .context("could not build the low-latency offload process pool")?,
        )
    } else {
        None
    };
    let procspawn = if submit || roundtrip {
        Some(Procspawn::start(WORKERS)?)
    } else {
        None
    };
    let mut bench = Bench {
        sizes: Sizes::new(settings.quick),
        pool,
        spin_pool,
        python,
        raw,
        procspawn,
    };

    let mut rows = Vec::new();
    if submit {
        rows.extend(bench.submits()?);
    }
    if map {
        rows.extend(bench.maps()?);
    }
    if roundtrip {
        rows.extend(bench.roundtrips()?);
    }
    if startup {
        rows.extend(bench.startups()?);
    }
    if payload {
        rows.extend(bench.payloads()?);
    }
    if recycle {
        rows.extend(bench.recycles()?);
    }
    if rss {
        rows.push(Bench::idle_rss()?);
    }
    if flat {
        rows.push(bench.map_memory()?);
    }
    bench.pool.join();
    if let Some(pool) = &bench.spin_pool {
        pool.join();
    }
    if let Some(python) = &bench.python {
        let note = format!(
            "Python {}, start method {} (the default)",
            python.version, python.start_method
        );
        for row in &mut rows {
            let system = row.id.rsplit('.').next().unwrap_or_default();
            if system.starts_with("python") && row.note.is_none() {
                row.note = Some(note.clone());
            }
        }
    }
    Ok(rows)
}

/// Direct children of this process (Linux), from /proc.
fn children() -> std::collections::HashSet<u32> {
    let mut out = std::collections::HashSet::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// Tasks in the recycling benchmark, and how often a worker is replaced.
const RECYCLE_TASKS: u64 = 20_000;
const RECYCLE_EVERY: u64 = 100;

/// The resident memory (VmRSS) of process `pid` (`"self"` for this one), MiB.
fn rss_mib(pid: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))?;
    Ok(kib / 1024.0)
}

/// `n` tiny tasks submitted one by one, then waited for in order; tasks per second.
pub(crate) fn submit_rate(pool: &offload::ProcessPool, n: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let handles: Vec<_> = (0..n).map(|x| pool.submit(Noop { x })).collect();
    let mut sum = 0;
    for handle in handles {
        sum += handle.wait()?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    ensure!(sum == n * (n - 1) / 2, "submit lost results");
    Ok(n as f64 / elapsed)
}

/// `pool.map` over `n` tiny tasks, the stream consumed in order; tasks per second.
pub(crate) fn map_rate(pool: &offload::ProcessPool, n: u64) -> anyhow::Result<f64> {
    futures::executor::block_on(async {
        let start = Instant::now();
        let mut results = pool.map((0..n).map(|x| Noop { x }));
        let mut sum = 0;
        while let Some(y) = results.next().await {
            sum += y?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        ensure!(sum == n * (n - 1) / 2, "map lost results");
        Ok(n as f64 / elapsed)
    })
}

impl Bench {
    /// `process.map_10m_parent_rss_growth_mib.offload`: the parent's resident memory while
    /// `map` streams 10,000,000 tiny tasks (quick: 2,000,000), read every 500,000 results;
    /// the row is the highest reading of the second half minus the highest of the first half.
    /// Memory that grows with the number of tasks shows as a positive figure that scales with
    /// it; a bounded window gives about zero.
    fn map_memory(&self) -> anyhow::Result<Row> {
        let n: u64 = if self.sizes.map_tasks < 1_000_000 {
            2_000_000
        } else {
            10_000_000
        };
        const EVERY: u64 = 500_000;
        let mut readings = Vec::new();
        futures::executor::block_on(async {
            let mut results = self.pool.map((0..n).map(|x| Noop { x }));
            let (mut i, mut sum) = (0u64, 0u64);
            while let Some(y) = results.next().await {
                sum += y?;
                i += 1;
                if i % EVERY == 0 {
                    readings.push(rss_mib("self")?);
                }
            }
            ensure!(sum == n * (n - 1) / 2, "map lost results");
            Ok::<_, anyhow::Error>(())
        })?;
        eprintln!("[process] {n} tasks through map: parent RSS every {EVERY}, MiB: {readings:.1?}");
        let (first, second) = readings.split_at(readings.len() / 2);
        let peak = |r: &[f64]| r.iter().copied().fold(f64::MIN, f64::max);
        Ok(Row::new(
            "process.map_10m_parent_rss_growth_mib.offload",
            "MiB",
            Better::Lower,
            vec![peak(second) - peak(first)],
        )
        .with_note(format!(
            "pool.map over {n} tiny tasks: the parent's VmRSS read every {EVERY} results; \
             the highest reading of the second half minus the highest of the first"
        )))
    }

    /// `process.idle_worker_rss_mib.offload`: the resident memory (VmRSS) of each worker of a
    /// fresh pool that has served one task and sits idle, one sample per worker.
    fn idle_rss() -> anyhow::Result<Row> {
        let before = children();
        let pool = offload::ProcessPool::builder().workers(WORKERS).build()?;
        pool.submit(Noop { x: 1 }).wait()?;
        std::thread::sleep(Duration::from_millis(200));
        let mut samples = Vec::new();
        for pid in children().difference(&before) {
            samples.push(rss_mib(&pid.to_string())?);
        }
        pool.join();
        ensure!(!samples.is_empty(), "found no worker processes");
        let mut row = Row::new(
            "process.idle_worker_rss_mib.offload",
            "MiB",
            Better::Lower,
            samples,
        );
        row.note = Some(
            "VmRSS of each idle worker of a fresh 2-worker pool (the bench binary re-executed) \
             after one task"
                .to_owned(),
        );
        Ok(row)
    }

    /// `RECYCLE_TASKS` tiny tasks on a pool whose workers are replaced every
    /// `RECYCLE_EVERY` tasks, pool start included; tasks per second.
    fn recycle_sample() -> anyhow::Result<f64> {
        let start = Instant::now();
        let pool = offload::ProcessPool::builder()
            .workers(WORKERS)
            .max_tasks_per_worker(RECYCLE_EVERY)
            .build()?;
        let handles: Vec<_> = (0..RECYCLE_TASKS)
            .map(|x| pool.submit(Noop { x }))
            .collect();
        let mut sum = 0;
        for handle in handles {
            sum += handle.wait()?;
        }
        pool.join();
        let elapsed = start.elapsed().as_secs_f64();
        ensure!(
            sum == RECYCLE_TASKS * (RECYCLE_TASKS - 1) / 2,
            "recycling lost results"
        );
        Ok(RECYCLE_TASKS as f64 / elapsed)
    }

    /// `process.recycle_tasks_per_s.{offload,python_ppe}`. Python's runs each get a process of
    /// their own and a time limit: on Python 3.11 `max_tasks_per_child` hangs (CPython issue
    /// 115634), which is recorded as 0 tasks/s with a note rather than stalling the harness.
    fn recycles(&mut self) -> anyhow::Result<Vec<Row>> {
        let runs = if self.sizes.submit_runs > 3 { 3 } else { 1 };
        let limit = Duration::from_secs(30);
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let mut hung = 0;
        for run in 0..runs {
            eprintln!("[process] recycle, run {}/{runs}", run + 1);
            ours.push(Self::recycle_sample()?);
            if self.python.is_some() {
                match crate::python::recycle_once(RECYCLE_TASKS, RECYCLE_EVERY, limit)? {
                    Some(rate) => theirs.push(rate),
                    None => {
                        hung += 1;
                        theirs.push(0.0);
                    }
                }
            }
        }
        let mut rows = vec![Row::new(
            "process.recycle_tasks_per_s.offload",
            "tasks/s",
            Better::Higher,
            ours,
        )];
        if self.python.is_some() {
            let mut row = Row::new(
                "process.recycle_tasks_per_s.python_ppe",
                "tasks/s",
                Better::Higher,
                theirs,
            );
            row.note = Some(if hung > 0 {
                format!(
                    "ProcessPoolExecutor(2, forkserver, max_tasks_per_child={RECYCLE_EVERY}): \
                     {hung} of {runs} runs did not finish within {limit:?} (hung: CPython issue \
                     115634) and count as 0"
                )
            } else {
                format!("ProcessPoolExecutor(2, forkserver, max_tasks_per_child={RECYCLE_EVERY})")
            });
            rows.push(row);
        }
        Ok(rows)
    }

    fn submit_sample(&self, n: u64) -> anyhow::Result<f64> {
        submit_rate(&self.pool, n)
    }

    /// `process.submit_tasks_per_s.{offload,python_ppe}`.
    fn submits(&mut self) -> anyhow::Result<Vec<Row>> {
        let n = self.sizes.submit_tasks;
        self.submit_sample(n / 10)?;
        if let Some(python) = &mut self.python {
            python.value(&json!({ "cmd": "submit", "n": n / 10 }))?;
        }
        if let Some(procspawn) = &self.procspawn {
            procspawn.submit_rate(n / 10)?;
        }
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let mut rust_peer = Vec::new();
        for run in 0..self.sizes.submit_runs {
            eprintln!(
                "[process] submit, run {}/{}",
                run + 1,
                self.sizes.submit_runs
            );
            ours.push(self.submit_sample(n)?);
            if let Some(python) = &mut self.python {
                theirs.push(python.value(&json!({ "cmd": "submit", "n": n }))?);
            }
            if let Some(procspawn) = &self.procspawn {
                rust_peer.push(procspawn.submit_rate(n)?);
            }
        }
        let mut rows = vec![Row::new(
            "process.submit_tasks_per_s.offload",
            "tasks/s",
            Better::Higher,
            ours,
        )];
        if self.python.is_some() {
            rows.push(Row::new(
                "process.submit_tasks_per_s.python_ppe",
                "tasks/s",
                Better::Higher,
                theirs,
            ));
        }
        if !rust_peer.is_empty() {
            rows.push(
                Row::new(
                    "process.submit_tasks_per_s.procspawn",
                    "tasks/s",
                    Better::Higher,
                    rust_peer,
                )
                .with_note(format!(
                    "procspawn 1.0 Pool::new(2), pool.spawn(x, identity) then join, at most \
                     {} outstanding (it holds 3 file descriptors per queued task: 20,000 at \
                     once exceed the open-file limit)",
                    procspawn_peer::WINDOW
                )),
            );
        }
        Ok(rows)
    }

    fn map_sample(&self, n: u64) -> anyhow::Result<f64> {
        map_rate(&self.pool, n)
    }

    /// `process.map_tasks_per_s.{offload,python_pool}`.
    fn maps(&mut self) -> anyhow::Result<Vec<Row>> {
        let n = self.sizes.map_tasks;
        self.map_sample(n / 10)?;
        if let Some(python) = &mut self.python {
            python.value(&json!({ "cmd": "map", "n": n / 10 }))?;
        }
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for run in 0..self.sizes.map_runs {
            eprintln!("[process] map, run {}/{}", run + 1, self.sizes.map_runs);
            ours.push(self.map_sample(n)?);
            if let Some(python) = &mut self.python {
                theirs.push(python.value(&json!({ "cmd": "map", "n": n }))?);
            }
        }
        let mut rows = vec![Row::new(
            "process.map_tasks_per_s.offload",
            "tasks/s",
            Better::Higher,
            ours,
        )];
        if self.python.is_some() {
            rows.push(
                Row::new(
                    "process.map_tasks_per_s.python_pool",
                    "tasks/s",
                    Better::Higher,
                    theirs,
                )
                .with_note(format!(
                    "multiprocessing.Pool(2).map(noop, range({n})), default chunksize ({})",
                    n.div_ceil(4 * WORKERS as u64)
                )),
            );
        }
        Ok(rows)
    }

    /// `n` sequential round trips of each system, appended to its latencies (us).
    fn roundtrip_block(
        &mut self,
        system: usize,
        n: usize,
        latencies: &mut Vec<f64>,
    ) -> anyhow::Result<()> {
        match system {
            0 => {
                for x in 0..n as u64 {
                    let start = Instant::now();
                    let y = self.pool.submit(Noop { x }).wait()?;
                    latencies.push(start.elapsed().as_secs_f64() * 1e6);
                    ensure!(y == x, "offload returned {y} for {x}");
                }
            }
            1 => {
                if let Some(python) = &mut self.python {
                    let reply = python.call(&json!({ "cmd": "roundtrip", "n": n }))?;
                    let got = reply
                        .get("latencies_us")
                        .and_then(|v| v.as_array())
                        .context("no latencies in the Python answer")?;
                    latencies.extend(got.iter().filter_map(serde_json::Value::as_f64));
                }
            }
            4 => {
                if let Some(procspawn) = &self.procspawn {
                    for x in 0..n as u64 {
                        let start = Instant::now();
                        procspawn.roundtrip(x)?;
                        latencies.push(start.elapsed().as_secs_f64() * 1e6);
                    }
                }
            }
            3 => {
                if let Some(pool) = &self.spin_pool {
                    for x in 0..n as u64 {
                        let start = Instant::now();
                        let y = pool.submit(Noop { x }).wait()?;
                        latencies.push(start.elapsed().as_secs_f64() * 1e6);
                        ensure!(y == x, "offload (spin) returned {y} for {x}");
                    }
                }
            }
            _ => {
                if let Some(raw) = &mut self.raw {
                    for _ in 0..n {
                        let start = Instant::now();
                        raw.roundtrip()?;
                        latencies.push(start.elapsed().as_secs_f64() * 1e6);
                        raw.check()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `process.roundtrip_p{50,99}_us.{offload,python_ppe,raw_uds}`: per run, the p50 and
    /// p99 of `roundtrips` sequential round trips per system; rows hold the median over runs.
    fn roundtrips(&mut self) -> anyhow::Result<Vec<Row>> {
        const SYSTEMS: [&str; 5] = [
            "offload",
            "python_ppe",
            "raw_uds",
            "offload_spin",
            "procspawn",
        ];
        if let Some(raw) = &mut self.raw {
            raw.set_message(RAW_MESSAGE);
        }
        let runs = self.sizes.roundtrip_runs;
        for system in 0..SYSTEMS.len() {
            self.roundtrip_block(system, self.sizes.roundtrip_warmup, &mut Vec::new())?;
        }
        let mut p50 = vec![Vec::new(); SYSTEMS.len()];
        let mut p99 = vec![Vec::new(); SYSTEMS.len()];
        for run in 0..runs {
            eprintln!("[process] round trips, run {}/{runs}", run + 1);
            let mut latencies = vec![Vec::with_capacity(self.sizes.roundtrips); SYSTEMS.len()];
            for _ in 0..self.sizes.roundtrips.div_ceil(ROUNDTRIP_BLOCK) {
                for (system, latencies) in latencies.iter_mut().enumerate() {
                    self.roundtrip_block(system, ROUNDTRIP_BLOCK, latencies)?;
                }
            }
            for (i, latencies) in latencies.iter().enumerate() {
                if !latencies.is_empty() {
                    p50[i].push(stats::percentile(latencies, 0.50));
                    p99[i].push(stats::percentile(latencies, 0.99));
                }
            }
        }
        let mut rows = Vec::new();
        for (metric, samples) in [("roundtrip_p50_us", p50), ("roundtrip_p99_us", p99)] {
            for (system, samples) in SYSTEMS.iter().zip(samples) {
                if samples.is_empty() {
                    continue;
                }
                let mut row = Row::new(
                    format!("process.{metric}.{system}"),
                    "us",
                    Better::Lower,
                    samples,
                );
                if *system == "offload_spin" && metric == "roundtrip_p50_us" {
                    row = row.with_note(format!(
                        "ProcessPool::builder().workers(2).spin({SPIN:?}): the low-latency mode"
                    ));
                }
                if *system == "raw_uds" && metric == "roundtrip_p50_us" {
                    row = row.with_note(format!(
                        "ping-pong of a {RAW_MESSAGE}-byte message (plus a 4-byte length) \
                         between this process and an echo process over a Unix stream socket"
                    ));
                }
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// A fresh pool of `workers` workers to its first result; milliseconds. Joining it is
    /// not timed.
    fn startup_sample(workers: usize) -> anyhow::Result<f64> {
        let start = Instant::now();
        let pool = offload::ProcessPool::builder()
            .workers(workers)
            .build()
            .context("could not build an offload process pool")?;
        let y = pool.submit(Noop { x: 1 }).wait()?;
        let elapsed = start.elapsed().as_secs_f64() * 1e3;
        pool.join();
        ensure!(y == 1, "the first task returned {y}");
        Ok(elapsed)
    }

    /// [`Self::startup_sample`] while this process holds [`LARGE_PARENT_MIB`] MiB more of
    /// written memory (made and freed outside the clock). One untimed start comes first:
    /// writing the memory just evicted the CPU caches, which is not what is measured here.
    fn large_parent_startup_sample() -> anyhow::Result<f64> {
        let ballast = vec![1u8; LARGE_PARENT_MIB << 20];
        Self::startup_sample(WORKERS)?;
        let ms = Self::startup_sample(WORKERS)?;
        ensure!(std::hint::black_box(&ballast)[LARGE_PARENT_MIB << 19] == 1);
        Ok(ms)
    }

    /// `children` raw echo children spawned at once, to their connection and one echo each;
    /// milliseconds. Stopping them is not timed.
    fn raw_spawn_sample(children: usize) -> anyhow::Result<f64> {
        let start = Instant::now();
        let echoes = std::thread::scope(|scope| {
            let starting: Vec<_> = (0..children)
                .map(|_| {
                    scope.spawn(|| {
                        let mut echo = RawEcho::start()?;
                        echo.set_message(RAW_MESSAGE);
                        echo.roundtrip()?;
                        Ok::<_, anyhow::Error>(echo)
                    })
                })
                .collect();
            starting
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a spawning thread panicked")))
                })
                .collect::<anyhow::Result<Vec<RawEcho>>>()
        })?;
        let elapsed = start.elapsed().as_secs_f64() * 1e3;
        for echo in &echoes {
            echo.check()?;
        }
        drop(echoes);
        Ok(elapsed)
    }

    /// `process.startup_ms.{offload,python_ppe,python_ppe_spawn,raw_spawn}`.
    fn startups(&mut self) -> anyhow::Result<Vec<Row>> {
        let runs = self.sizes.startup_runs;
        // The first start pages the programs in; every later one finds them cached.
        Self::startup_sample(WORKERS)?;
        let python_methods = [(None, "python_ppe"), (Some("spawn"), "python_ppe_spawn")];
        let mut used_methods = vec![String::new(); python_methods.len()];
        if let Some(python) = &mut self.python {
            for (method, _) in python_methods {
                python.call(&json!({ "cmd": "startup", "method": method }))?;
            }
        }
        Self::raw_spawn_sample(WORKERS)?;
        let mut ours = Vec::new();
        let mut raw = Vec::new();
        let (mut ours_8, mut raw_8) = (Vec::new(), Vec::new());
        let mut large_parent = Vec::new();
        let mut rust_peer = Vec::new();
        Procspawn::startup_ms(WORKERS)?;
        let mut theirs = vec![Vec::new(); python_methods.len()];
        for run in 0..runs {
            eprintln!("[process] startup, run {}/{runs}", run + 1);
            ours.push(Self::startup_sample(WORKERS)?);
            raw.push(Self::raw_spawn_sample(WORKERS)?);
            ours_8.push(Self::startup_sample(8)?);
            raw_8.push(Self::raw_spawn_sample(8)?);
            large_parent.push(Self::large_parent_startup_sample()?);
            rust_peer.push(Procspawn::startup_ms(WORKERS)?);
            if let Some(python) = &mut self.python {
                for (i, (method, _)) in python_methods.iter().enumerate() {
                    let reply = python.call(&json!({ "cmd": "startup", "method": method }))?;
                    let ms = reply
                        .get("value")
                        .and_then(serde_json::Value::as_f64)
                        .context("no startup time in the Python answer")?;
                    theirs[i].push(ms);
                    if let Some(m) = reply.get("method").and_then(|m| m.as_str()) {
                        m.clone_into(&mut used_methods[i]);
                    }
                }
            }
        }
        let mut rows =
            vec![Row::new(
            "process.startup_ms.offload",
            "ms",
            Better::Lower,
            ours,
        )
        .with_note(
            "ProcessPool::builder().workers(2).build() (spawns /proc/self/exe twice, waits \
             for both handshakes) + one submit().wait()",
        )];
        rows.push(
            Row::new("process.startup_ms.raw_spawn", "ms", Better::Lower, raw).with_note(
                "this binary spawned twice at once, each child connecting to a Unix socket \
                 of the parent, + one 16-byte echo from each: the floor of starting workers",
            ),
        );
        rows.push(
            Row::new(
                "process.startup_8_workers_ms.offload",
                "ms",
                Better::Lower,
                ours_8,
            )
            .with_note("the same with workers(8): waits for 8 handshakes"),
        );
        rows.push(
            Row::new(
                "process.startup_8_workers_ms.raw_spawn",
                "ms",
                Better::Lower,
                raw_8,
            )
            .with_note("8 raw echo children spawned at once, + one echo from each"),
        );
        rows.push(
            Row::new(
                "process.startup_ms.offload_large_parent",
                "ms",
                Better::Lower,
                large_parent,
            )
            .with_note(format!(
                "as process.startup_ms.offload, from a parent holding {LARGE_PARENT_MIB} MiB \
                 more of written heap (a service's caches): starting a worker must not copy \
                 the parent"
            )),
        );
        rows.push(
            Row::new(
                "process.startup_ms.procspawn",
                "ms",
                Better::Lower,
                rust_peer,
            )
            .with_note("procspawn 1.0 Pool::new(2) + one spawn().join()"),
        );
        if self.python.is_some() {
            for (((_, system), samples), method) in
                python_methods.iter().zip(theirs).zip(used_methods)
            {
                rows.push(
                    Row::new(
                        format!("process.startup_ms.{system}"),
                        "ms",
                        Better::Lower,
                        samples,
                    )
                    .with_note(format!(
                        "ProcessPoolExecutor(2) with start method {method} + one \
                         submit().result()"
                    )),
                );
            }
        }
        Ok(rows)
    }

    /// `process.payload_8mib_mb_per_s.{offload,python_ppe,raw_uds}`: an 8 MiB argument there
    /// and back; MB/s = argument bytes / round-trip time / 10^6. One round trip per sample,
    /// the systems in turn.
    fn payloads(&mut self) -> anyhow::Result<Vec<Row>> {
        let payload = Bytes((0..PAYLOAD).map(|i| i as u8).collect());
        if let Some(raw) = &mut self.raw {
            raw.set_message(PAYLOAD);
        }
        let runs = self.sizes.payload_runs;
        let mut samples = vec![Vec::new(); 5];
        // Two warm-up round trips each, then `runs` measured ones.
        for run in 0..runs + 2 {
            if run >= 2 {
                eprintln!("[process] 8 MiB payload, run {}/{runs}", run - 1);
            }
            let mut take = |i: usize, v: f64| {
                if run >= 2 {
                    samples[i].push(v);
                }
            };
            // Offload: the argument is cloned before the clock starts (submit consumes it).
            let task = Echo {
                data: payload.clone(),
            };
            let start = Instant::now();
            let back = self.pool.submit(task).wait()?;
            let elapsed = start.elapsed().as_secs_f64();
            ensure!(back == payload, "offload's echo came back changed");
            take(0, PAYLOAD as f64 / elapsed / 1e6);

            if let Some(python) = &mut self.python {
                take(
                    1,
                    python.value(&json!({ "cmd": "payload", "bytes": PAYLOAD }))?,
                );
            }

            if let Some(raw) = &mut self.raw {
                let start = Instant::now();
                raw.roundtrip()?;
                let elapsed = start.elapsed().as_secs_f64();
                raw.check()?;
                take(2, PAYLOAD as f64 / elapsed / 1e6);
            }
        }
        // Shared memory, in a phase of its own: interleaved with the others, its page
        // churn (a fresh segment per copy-in sample) slowed offload's socket path by half
        // and sped the raw echo up by as much (the CPUs stay awake).
        let mut buf = offload::SharedBuf::new(PAYLOAD)?;
        for run in 0..runs + 2 {
            let mut take = |i: usize, v: f64| {
                if run >= 2 {
                    samples[i].push(v);
                }
            };
            // The argument already in a SharedBuf, filled before the clock starts; the
            // echo hands it back, and it is the next sample's argument (made once, reused,
            // as the type's docs advise) ...
            buf.copy_from_slice(&payload.0);
            let start = Instant::now();
            let back = self.pool.submit(EchoShared { data: buf }).wait()?;
            let elapsed = start.elapsed().as_secs_f64();
            ensure!(
                back[..] == payload.0[..],
                "offload's shm echo came back changed"
            );
            take(3, PAYLOAD as f64 / elapsed / 1e6);
            buf = back;
            // ... and copied into a new one inside the clock.
            let start = Instant::now();
            let data = offload::SharedBuf::from_slice(&payload.0)?;
            let back = self.pool.submit(EchoShared { data }).wait()?;
            let elapsed = start.elapsed().as_secs_f64();
            ensure!(
                back[..] == payload.0[..],
                "offload's shm echo came back changed"
            );
            take(4, PAYLOAD as f64 / elapsed / 1e6);
        }
        let mut rows = Vec::new();
        let systems = [
            "offload",
            "python_ppe",
            "raw_uds",
            "offload_shm",
            "offload_shm_copy_in",
        ];
        for (system, samples) in systems.iter().zip(samples) {
            if samples.is_empty() {
                continue;
            }
            let mut row = Row::new(
                format!("process.payload_8mib_mb_per_s.{system}"),
                "MB/s",
                Better::Higher,
                samples,
            );
            if *system == "offload_shm" {
                row = row.with_note(
                    "the 8 MiB argument in an offload::SharedBuf (made once, filled before \
                     the clock starts), to an echo task and back: the worker maps the same \
                     memory, its pages as they are touched (the echo touches none; the check \
                     after the clock touches all). Measured after the other systems, not \
                     interleaved with them",
                );
            }
            if *system == "offload_shm_copy_in" {
                row = row.with_note(
                    "as offload_shm, with a new SharedBuf made and filled inside the clock \
                     (the kernel allocates and zeroes its pages)",
                );
            }
            if *system == "offload" {
                row = row.with_note(
                    "8 MiB (8,388,608 bytes) argument to an echo task and back; MB/s = \
                     argument bytes / round-trip time / 10^6; the argument is a newtype \
                     serialized with serialize_bytes",
                );
            }
            rows.push(row);
        }
        Ok(rows)
    }
}
