//! Scaling curves: round-trip time against payload size (16 B .. 64 MiB, beside the raw
//! Unix-socket echo) and throughput and round-trip time against the number of workers
//! (1, 2, 4, 8). Each point is a row of its own in `results.json`; the curves are drawn as SVG
//! into `docs/bench/` (a quick run draws into `target/bench/curves/` instead, so smoke tests
//! never overwrite the documented plots).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context as _};
use offload::Executor as _;

use crate::process::{map_rate, submit_rate, Bytes, Echo, Noop};
use crate::raw_uds::RawEcho;
use crate::report::{Better, Row};
use crate::svg::{self, Chart, Series};
use crate::Settings;

const PAYLOADS: &[(usize, &str)] = &[
    (16, "16b"),
    (256, "256b"),
    (4 << 10, "4kib"),
    (64 << 10, "64kib"),
    (1 << 20, "1mib"),
    (16 << 20, "16mib"),
    (64 << 20, "64mib"),
];

const WORKER_COUNTS: &[usize] = &[1, 2, 4, 8];

fn payload_id(tag: &str, system: &str) -> String {
    format!("curves.payload_{tag}_roundtrip_p50_us.{system}")
}

fn workers_id(workers: usize, metric: &str) -> String {
    format!("curves.workers_{workers}_{metric}.offload")
}

/// Runs the curves group.
pub(crate) fn run(settings: &Settings) -> anyhow::Result<Vec<Row>> {
    let payload_ids: Vec<String> = PAYLOADS
        .iter()
        .flat_map(|(_, tag)| [payload_id(tag, "offload"), payload_id(tag, "raw_uds")])
        .collect();
    let worker_ids: Vec<String> = WORKER_COUNTS
        .iter()
        .flat_map(|&w| {
            ["map_tasks_per_s", "submit_tasks_per_s", "roundtrip_p50_us"].map(|m| workers_id(w, m))
        })
        .collect();
    let mut rows = Vec::new();
    if settings.wants(&payload_ids) {
        rows.extend(payload_curve(settings.quick)?);
    }
    if settings.wants(&worker_ids) {
        rows.extend(worker_curve(settings.quick)?);
    }
    if !rows.is_empty() {
        draw(&rows, settings.quick)?;
    }
    Ok(rows)
}

/// Round trips of an echo task with a `size`-byte argument, and of the raw echo, taken in
/// turn; p50 of each, microseconds.
fn payload_curve(quick: bool) -> anyhow::Result<Vec<Row>> {
    let pool = offload::ProcessPool::builder().workers(1).build()?;
    let mut raw = RawEcho::start()?;
    let mut rows = Vec::new();
    for &(size, tag) in PAYLOADS {
        let samples = match (size, quick) {
            (s, false) if s <= 64 << 10 => 200,
            (s, false) if s <= 1 << 20 => 40,
            (_, false) => 7,
            (s, true) if s <= 64 << 10 => 50,
            (_, true) => 3,
        };
        eprintln!("[curves] payload {tag}: {samples} round trips each");
        let payload = Bytes((0..size).map(|i| i as u8).collect());
        raw.set_message(size);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for i in 0..samples + 2 {
            let task = Echo {
                data: payload.clone(),
            };
            let start = Instant::now();
            let back = pool.submit(task).wait()?;
            let offload_us = start.elapsed().as_secs_f64() * 1e6;
            ensure!(back == payload, "the echo came back changed");
            let start = Instant::now();
            raw.roundtrip()?;
            let raw_us = start.elapsed().as_secs_f64() * 1e6;
            raw.check()?;
            if i >= 2 {
                ours.push(offload_us);
                theirs.push(raw_us);
            }
        }
        rows.push(
            Row::new(payload_id(tag, "offload"), "us", Better::Lower, ours).with_note(format!(
                "echo task, {size}-byte argument there and back, 1 worker"
            )),
        );
        rows.push(Row::new(
            payload_id(tag, "raw_uds"),
            "us",
            Better::Lower,
            theirs,
        ));
    }
    pool.join();
    Ok(rows)
}

/// For each worker count: `map` of tiny tasks, tiny tasks submitted one by one, and
/// sequential round trips.
fn worker_curve(quick: bool) -> anyhow::Result<Vec<Row>> {
    let (runs, map_tasks, submit_tasks, roundtrips) = if quick {
        (2, 200_000, 5_000, 200)
    } else {
        (5, 1_000_000, 20_000, 1_000)
    };
    let mut rows = Vec::new();
    for &workers in WORKER_COUNTS {
        eprintln!("[curves] {workers} workers");
        let pool = offload::ProcessPool::builder()
            .workers(workers)
            .build()
            .with_context(|| format!("could not build a pool of {workers} workers"))?;
        map_rate(&pool, map_tasks / 10)?;
        let (mut maps, mut submits) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            maps.push(map_rate(&pool, map_tasks)?);
            submits.push(submit_rate(&pool, submit_tasks)?);
        }
        let mut latencies = Vec::with_capacity(roundtrips);
        for x in 0..roundtrips as u64 + 100 {
            let start = Instant::now();
            let y = pool.submit(Noop { x }).wait()?;
            let us = start.elapsed().as_secs_f64() * 1e6;
            ensure!(y == x, "a round trip came back changed");
            if x >= 100 {
                latencies.push(us);
            }
        }
        pool.join();
        rows.push(Row::new(
            workers_id(workers, "map_tasks_per_s"),
            "tasks/s",
            Better::Higher,
            maps,
        ));
        rows.push(Row::new(
            workers_id(workers, "submit_tasks_per_s"),
            "tasks/s",
            Better::Higher,
            submits,
        ));
        // One p50 over all round trips: the row's samples are the round trips themselves.
        rows.push(Row::new(
            workers_id(workers, "roundtrip_p50_us"),
            "us",
            Better::Lower,
            latencies,
        ));
    }
    Ok(rows)
}

/// Where the plots go: the documentation for a full run, `target/` for a quick one.
fn plot_dir(quick: bool) -> PathBuf {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = crate_dir
        .ancestors()
        .nth(2)
        .unwrap_or(&crate_dir)
        .to_owned();
    if quick {
        root.join("target").join("bench").join("curves")
    } else {
        root.join("docs").join("bench")
    }
}

fn size_label(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

/// Draws every curve whose rows were measured.
fn draw(rows: &[Row], quick: bool) -> anyhow::Result<()> {
    let median_of = |id: &str| rows.iter().find(|r| r.id == id).map(|r| r.median);
    let dir = plot_dir(quick);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, chart: Chart<'_>| -> anyhow::Result<()> {
        if chart.series.iter().all(|s| s.points.is_empty()) {
            return Ok(());
        }
        let path = dir.join(name);
        std::fs::write(&path, svg::render(&chart))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("[curves] wrote {}", path.display());
        Ok(())
    };

    let payload_series = |system: &str, name: &str, as_rate: bool| Series {
        name: name.to_owned(),
        points: PAYLOADS
            .iter()
            .filter_map(|&(size, tag)| {
                let us = median_of(&payload_id(tag, system))?;
                let y = if as_rate { size as f64 / us } else { us }; // bytes/us = MB/s
                Some((size as f64, y))
            })
            .collect(),
    };
    let size_ticks: Vec<(f64, String)> = PAYLOADS
        .iter()
        .map(|&(size, _)| (size as f64, size_label(size)))
        .collect();
    write(
        "payload_roundtrip_p50.svg",
        Chart {
            title: "Round trip p50 against argument size (echo, there and back)",
            x_label: "argument size",
            y_label: "round trip p50, us",
            x_ticks: size_ticks.clone(),
            x_log: true,
            y_log: true,
            series: vec![
                payload_series("offload", "offload ProcessPool", false),
                payload_series("raw_uds", "raw Unix socket", false),
            ],
        },
    )?;
    write(
        "payload_throughput.svg",
        Chart {
            title: "Throughput against argument size (argument bytes / round trip)",
            x_label: "argument size",
            y_label: "MB/s",
            x_ticks: size_ticks,
            x_log: true,
            y_log: true,
            series: vec![
                payload_series("offload", "offload ProcessPool", true),
                payload_series("raw_uds", "raw Unix socket", true),
            ],
        },
    )?;

    let worker_series = |metric: &str, name: &str| Series {
        name: name.to_owned(),
        points: WORKER_COUNTS
            .iter()
            .filter_map(|&w| Some((w as f64, median_of(&workers_id(w, metric))?)))
            .collect(),
    };
    let worker_ticks: Vec<(f64, String)> = WORKER_COUNTS
        .iter()
        .map(|&w| (w as f64, w.to_string()))
        .collect();
    write(
        "workers_throughput.svg",
        Chart {
            title: "Tiny-task throughput against workers (2-core machine)",
            x_label: "workers",
            y_label: "tasks/s",
            x_ticks: worker_ticks.clone(),
            x_log: true,
            y_log: true,
            series: vec![
                worker_series("map_tasks_per_s", "map"),
                worker_series("submit_tasks_per_s", "submit one by one"),
            ],
        },
    )?;
    write(
        "workers_roundtrip_p50.svg",
        Chart {
            title: "Round trip p50 against workers (one caller)",
            x_label: "workers",
            y_label: "round trip p50, us",
            x_ticks: worker_ticks,
            x_log: true,
            y_log: false,
            series: vec![worker_series("roundtrip_p50_us", "offload ProcessPool")],
        },
    )
}
