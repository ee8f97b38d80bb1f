//! The thread group: offload's `ThreadPool` against tokio's `spawn_blocking` and a rayon
//! pool, on tiny tasks, where the cost of the machinery is all there is to see.
//!
//! All three are driven from one current-thread tokio runtime, so the caller's side (parking
//! its thread, being woken by a worker) is the same for each. Every pool has two threads:
//! offload's `ThreadPool` and rayon's are built with two, and tokio's blocking pool is capped
//! at two (`max_blocking_threads`). Uncapped, tokio starts a new thread for nearly every
//! task of a burst and its throughput falls by an order of magnitude: that would measure
//! thread creation, not the pool. The systems take turns within every run, so a noisy
//! neighbour hits them all alike.

use std::time::Instant;

use anyhow::{ensure, Context as _};
use futures::StreamExt;
use offload::prelude::*;
use tokio::runtime::Runtime;

use crate::report::{Better, Row};
use crate::{stats, Settings};

/// The tiniest task: all its cost is the pool's.
#[offload::task]
fn noop(x: u64) -> u64 {
    x
}

/// Threads in every pool of this group.
const WORKERS: usize = 2;

/// Round trips a system makes before the next system takes its turn.
const ROUNDTRIP_BLOCK: usize = 100;

/// The systems compared, in the order they appear in the table.
#[derive(Debug, Clone, Copy)]
enum System {
    Offload,
    SpawnBlocking,
    Rayon,
}

const SYSTEMS: [System; 3] = [System::Offload, System::SpawnBlocking, System::Rayon];

impl System {
    /// The last part of the row id.
    fn name(self) -> &'static str {
        match self {
            System::Offload => "offload",
            System::SpawnBlocking => "spawn_blocking",
            System::Rayon => "rayon",
        }
    }
}

/// How much to measure.
struct Sizes {
    runs: usize,
    roundtrips: usize,
    roundtrip_warmup: usize,
    throughput_tasks: u64,
    map_tasks: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                runs: 3,
                roundtrips: 300,
                roundtrip_warmup: 100,
                throughput_tasks: 20_000,
                map_tasks: 200_000,
            }
        } else {
            Sizes {
                runs: 15,
                roundtrips: 2_000,
                roundtrip_warmup: 500,
                throughput_tasks: 100_000,
                map_tasks: 1_000_000,
            }
        }
    }
}

/// The runtime and the three pools, built once for the whole group.
struct Bench {
    rt: Runtime,
    pool: offload::ThreadPool,
    rayon: rayon::ThreadPool,
}

/// Runs the thread group.
pub(crate) fn run(settings: &Settings) -> anyhow::Result<Vec<Row>> {
    let ids = |metric: &str| -> Vec<String> {
        SYSTEMS
            .iter()
            .map(|s| format!("thread.{metric}.{}", s.name()))
            .collect()
    };
    let roundtrip_ids: Vec<String> = ids("roundtrip_p50_us")
        .into_iter()
        .chain(ids("roundtrip_p99_us"))
        .collect();
    let throughput_ids = ids("throughput_tasks_per_s");
    let map_ids = ["thread.map_tasks_per_s.offload"];
    let want_roundtrip = settings.wants(&roundtrip_ids);
    let want_throughput = settings.wants(&throughput_ids);
    let want_map = settings.wants(&map_ids);
    if !(want_roundtrip || want_throughput || want_map) {
        return Ok(Vec::new());
    }

    let sizes = Sizes::new(settings.quick);
    let bench = Bench {
        rt: tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(WORKERS)
            .build()
            .context("could not build the tokio runtime")?,
        pool: offload::ThreadPool::builder()
            .workers(WORKERS)
            .build()
            .context("could not build the offload pool")?,
        rayon: rayon::ThreadPoolBuilder::new()
            .num_threads(WORKERS)
            .build()
            .context("could not build the rayon pool")?,
    };

    let mut rows = Vec::new();
    if want_roundtrip {
        rows.extend(bench.roundtrips(&sizes)?);
    }
    if want_throughput {
        rows.extend(bench.throughputs(&sizes)?);
    }
    if want_map {
        rows.push(bench.map_throughput(&sizes)?);
    }
    bench.pool.join();
    Ok(rows)
}

impl Bench {
    /// One tiny task through `system`: submit, await the result.
    async fn once(&self, system: System, x: u64) -> anyhow::Result<u64> {
        Ok(match system {
            System::Offload => self.pool.submit(Noop { x }).await?,
            System::SpawnBlocking => tokio::task::spawn_blocking(move || x).await?,
            System::Rayon => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.rayon.spawn(move || {
                    let _ = tx.send(x);
                });
                rx.await?
            }
        })
    }

    /// `n` sequential round trips through `system`, each one's latency in microseconds
    /// appended to `latencies`.
    fn roundtrip_block(
        &self,
        system: System,
        n: usize,
        latencies: &mut Vec<f64>,
    ) -> anyhow::Result<()> {
        self.rt.block_on(async {
            for x in 0..n as u64 {
                let start = Instant::now();
                let y = self.once(system, x).await?;
                latencies.push(start.elapsed().as_secs_f64() * 1e6);
                ensure!(y == x, "{} returned {y} for {x}", system.name());
            }
            Ok(())
        })
    }

    /// `thread.roundtrip_p50_us.*` and `thread.roundtrip_p99_us.*`: per run, the p50 and
    /// p99 of `roundtrips` sequential round trips per system; the rows hold the median over
    /// runs. Within a run the systems take turns in blocks of [`ROUNDTRIP_BLOCK`], so that
    /// a change in the machine's load (and with it the cost of waking a CPU) is shared.
    fn roundtrips(&self, sizes: &Sizes) -> anyhow::Result<Vec<Row>> {
        for system in SYSTEMS {
            self.roundtrip_block(system, sizes.roundtrip_warmup, &mut Vec::new())?;
        }
        let mut p50 = vec![Vec::new(); SYSTEMS.len()];
        let mut p99 = vec![Vec::new(); SYSTEMS.len()];
        for run in 0..sizes.runs {
            eprintln!("[thread] round trips, run {}/{}", run + 1, sizes.runs);
            let mut latencies = vec![Vec::with_capacity(sizes.roundtrips); SYSTEMS.len()];
            for _ in 0..sizes.roundtrips.div_ceil(ROUNDTRIP_BLOCK) {
                for (i, system) in SYSTEMS.into_iter().enumerate() {
                    self.roundtrip_block(system, ROUNDTRIP_BLOCK, &mut latencies[i])?;
                }
            }
            for (i, latencies) in latencies.iter().enumerate() {
                p50[i].push(stats::percentile(latencies, 0.50));
                p99[i].push(stats::percentile(latencies, 0.99));
            }
        }
        let mut rows = system_rows("roundtrip_p50_us", "us", Better::Lower, p50);
        rows.extend(system_rows("roundtrip_p99_us", "us", Better::Lower, p99));
        Ok(rows)
    }

    /// Submits `n` tiny tasks at once, then awaits them all in order; tasks per second.
    fn throughput_sample(&self, system: System, n: u64) -> anyhow::Result<f64> {
        self.rt.block_on(async {
            let start = Instant::now();
            let mut sum = 0;
            match system {
                System::Offload => {
                    let handles: Vec<_> = (0..n).map(|x| self.pool.submit(Noop { x })).collect();
                    for handle in handles {
                        sum += handle.await?;
                    }
                }
                System::SpawnBlocking => {
                    let handles: Vec<_> = (0..n)
                        .map(|x| tokio::task::spawn_blocking(move || x))
                        .collect();
                    for handle in handles {
                        sum += handle.await?;
                    }
                }
                System::Rayon => {
                    let receivers: Vec<_> = (0..n)
                        .map(|x| {
                            let (tx, rx) = tokio::sync::oneshot::channel();
                            self.rayon.spawn(move || {
                                let _ = tx.send(x);
                            });
                            rx
                        })
                        .collect();
                    for rx in receivers {
                        sum += rx.await?;
                    }
                }
            }
            let elapsed = start.elapsed().as_secs_f64();
            ensure!(sum == n * (n - 1) / 2, "{} lost results", system.name());
            Ok(n as f64 / elapsed)
        })
    }

    /// `thread.throughput_tasks_per_s.*`: the median over runs of `throughput_sample`.
    fn throughputs(&self, sizes: &Sizes) -> anyhow::Result<Vec<Row>> {
        let n = sizes.throughput_tasks;
        for system in SYSTEMS {
            self.throughput_sample(system, n / 10)?;
        }
        let mut samples = vec![Vec::new(); SYSTEMS.len()];
        for run in 0..sizes.runs {
            eprintln!("[thread] throughput, run {}/{}", run + 1, sizes.runs);
            for (i, system) in SYSTEMS.into_iter().enumerate() {
                samples[i].push(self.throughput_sample(system, n)?);
            }
        }
        Ok(system_rows(
            "throughput_tasks_per_s",
            "tasks/s",
            Better::Higher,
            samples,
        ))
    }

    /// `pool.map` over `n` tiny tasks, results consumed in order; tasks per second.
    fn map_sample(&self, n: u64) -> anyhow::Result<f64> {
        self.rt.block_on(async {
            let start = Instant::now();
            let mut results = self.pool.map((0..n).map(|x| Noop { x }));
            let mut sum = 0;
            while let Some(y) = results.next().await {
                sum += y?;
            }
            let elapsed = start.elapsed().as_secs_f64();
            ensure!(sum == n * (n - 1) / 2, "map lost results");
            Ok(n as f64 / elapsed)
        })
    }

    /// `thread.map_tasks_per_s.offload`: the median over runs of `map_sample`.
    fn map_throughput(&self, sizes: &Sizes) -> anyhow::Result<Row> {
        self.map_sample(sizes.map_tasks / 10)?;
        let mut samples = Vec::new();
        for run in 0..sizes.runs {
            eprintln!("[thread] map, run {}/{}", run + 1, sizes.runs);
            samples.push(self.map_sample(sizes.map_tasks)?);
        }
        Ok(Row::new(
            "thread.map_tasks_per_s.offload",
            "tasks/s",
            Better::Higher,
            samples,
        ))
    }
}

/// One row per system, `thread.{metric}.{system}`, from each system's per-run samples.
fn system_rows(
    metric: &str,
    unit: &'static str,
    better: Better,
    samples: Vec<Vec<f64>>,
) -> Vec<Row> {
    SYSTEMS
        .into_iter()
        .zip(samples)
        .map(|(system, s)| {
            Row::new(
                format!("thread.{metric}.{}", system.name()),
                unit,
                better,
                s,
            )
        })
        .collect()
}
