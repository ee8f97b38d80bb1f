//! `offload-bench`: measures offload and its peers side by side in one run, prints a table
//! and writes `{"rows": [{"id", "unit", "median", ...}]}` as JSON.
//!
//! ```text
//! cargo run --release -p offload-bench -- [--quick] [--out PATH] [--filter SUBSTR]
//! ```
//!
//! Each group lives in its own module and returns rows; `docs/benchmarks.md` says what every
//! row measures. Machines are shared and noisy: compare ratios within one run, not figures
//! across runs.

mod cpu;
mod curves;
mod process;
mod procspawn_peer;
mod python;
mod raw_uds;
mod report;
mod stats;
mod svg;
mod thread;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _};

const USAGE: &str = "\
usage: offload-bench [--quick] [--out PATH] [--filter SUBSTR]

  --quick          fewer and shorter runs (a smoke test; well under a minute)
  --out PATH       where to write the JSON results (default: target/bench/results.json
                   in the workspace)
  --filter SUBSTR  run only the benchmarks with a row id containing SUBSTR
                   (e.g. `thread.roundtrip`, `cpu`, `rayon`)
";

/// What every group is told: how long to run, and which rows are wanted.
pub(crate) struct Settings {
    pub(crate) quick: bool,
    filter: Option<String>,
}

impl Settings {
    /// True when a benchmark producing any of `ids` should run.
    pub(crate) fn wants<S: AsRef<str>>(&self, ids: &[S]) -> bool {
        match &self.filter {
            None => true,
            Some(f) => ids.iter().any(|id| id.as_ref().contains(f.as_str())),
        }
    }
}

/// A group of benchmarks: one module, run in order. A group checks the filter per
/// benchmark and skips its own setup when nothing of it is wanted.
///
/// The process group (`process.rs`, rows `process.*`) also runs the Python peers
/// (`python/peers.py`, driven by `python.rs`) and the raw socket floor (`raw_uds.rs`), so
/// that their samples interleave with offload's.
const GROUPS: &[(&str, Group)] = &[
    ("thread", thread::run),
    ("cpu", cpu::run),
    ("process", process::run),
    ("curves", curves::run),
];

/// A group's entry point: its rows, or none when the filter leaves nothing of it.
type Group = fn(&Settings) -> anyhow::Result<Vec<report::Row>>;

struct Args {
    quick: bool,
    out: PathBuf,
    filter: Option<String>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<Option<Args>> {
    let mut parsed = Args {
        quick: false,
        out: default_out(),
        filter: None,
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.into())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> anyhow::Result<String> {
            match inline.clone().or_else(|| args.next()) {
                Some(v) => Ok(v),
                None => bail!("{flag} needs a value\n\n{USAGE}"),
            }
        };
        match flag.as_str() {
            "--quick" => parsed.quick = true,
            "--out" => parsed.out = value()?.into(),
            "--filter" => parsed.filter = Some(value()?),
            "-h" | "--help" => return Ok(None),
            _ => bail!("unknown argument `{arg}`\n\n{USAGE}"),
        }
    }
    Ok(Some(parsed))
}

/// `target/bench/results.json` under the workspace root, wherever we are started from.
fn default_out() -> PathBuf {
    workspace_root()
        .join("target")
        .join("bench")
        .join("results.json")
}

/// The workspace this harness was built in (results and plots are written under it).
pub(crate) fn workspace_root() -> PathBuf {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .ancestors()
        .nth(2)
        .unwrap_or(&crate_dir)
        .to_owned()
}

fn main() -> ExitCode {
    // A worker process of a `ProcessPool` serves tasks here and never returns.
    offload::init();
    // So does the echo server of the raw socket benchmark (this binary, started by itself),
    // and a worker of the procspawn peer.
    raw_uds::serve_if_asked();
    procspawn_peer::init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("offload-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let Some(args) = parse_args(std::env::args().skip(1))? else {
        print!("{USAGE}");
        return Ok(());
    };
    let settings = Settings {
        quick: args.quick,
        filter: args.filter,
    };
    // Other work on the machine changes every figure here: say how busy it was.
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        eprintln!("load average before the run: {}", load.join(" "));
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    for (name, group) in GROUPS {
        let t = Instant::now();
        let group = group(&settings).with_context(|| format!("benchmark group `{name}` failed"))?;
        if !group.is_empty() {
            eprintln!("[{name}] done in {:.1} s", t.elapsed().as_secs_f64());
        }
        rows.extend(group);
    }
    if rows.is_empty() {
        bail!("no benchmark matched the filter");
    }
    report::compute_ratios(&mut rows);
    let goals = report::check_goals(&rows, process::GOALS);
    println!();
    print!("{}", report::table(&rows));
    print!("{}", report::goals_text(&goals));
    report::write_json(&args.out, &rows, &goals)?;
    println!(
        "\n{} rows written to {} ({}, {:.1} s)",
        rows.len(),
        args.out.display(),
        if settings.quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
