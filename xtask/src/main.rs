//! The workspace's task runner: `cargo xtask <command>` (see `USAGE`).
//!
//! Plain std, no dependencies: it has to build first on a fresh machine and
//! stay quick to compile. Every command runs `$CARGO` from the workspace root,
//! is printed before it runs, and the first failure stops the task with a
//! non-zero exit and the name of the step that failed.

mod cmd;

use std::env;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cmd::{workspace_root, Cmd};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  ci                  everything CI checks, in order, stopping at the first failure:
                      fmt --check, clippy -D warnings, tests (incl. doctests),
                      docs with rustdoc warnings denied, cargo-deny
  deny                cargo-deny: licenses, bans and sources (installs cargo-deny
                      if it is missing; advisories are skipped, see below)
  docs                build the API docs with rustdoc warnings denied
  bench [--quick] [ARGS...]
                      run the offload-bench harness in release mode; ARGS are
                      passed on; results go to target/bench/results.json unless
                      --out is given
  fuzz [--seconds N]  run every cargo-fuzz target (crates/offload-ipc/fuzz) for N
                      seconds in total (default 60), split evenly; installs
                      cargo-fuzz if it is missing; crash inputs land in
                      crates/offload-ipc/fuzz/artifacts/
  help                print this text

The advisory database cannot be fetched on our machines, so `deny` never runs
cargo-deny's advisories check.
";

/// A named step of `cargo xtask ci`.
type Step = (&'static str, fn() -> Result<(), String>);

/// `ci` runs these in order. fmt first: it takes a second and catches the
/// commonest mistake; deny last: it is the only step that may need a download.
const CI_STEPS: [Step; 5] = [
    ("fmt", fmt),
    ("clippy", clippy),
    ("test", test),
    ("docs", docs),
    ("deny", deny),
];

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match command {
        "ci" => no_args(command, rest).and_then(|()| ci()),
        "deny" => no_args(command, rest).and_then(|()| deny()),
        "docs" => no_args(command, rest).and_then(|()| docs()),
        "bench" => bench(rest),
        "fuzz" => fuzz(rest),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            eprint!("xtask: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err}");
            ExitCode::FAILURE
        }
    }
}

fn no_args(command: &str, rest: &[String]) -> Result<(), String> {
    match rest.first() {
        None => Ok(()),
        Some(arg) => Err(format!(
            "`{command}` takes no arguments, got `{arg}` (see `cargo xtask help`)"
        )),
    }
}

fn ci() -> Result<(), String> {
    let start = Instant::now();
    let mut timings = Vec::with_capacity(CI_STEPS.len());
    for (name, step) in CI_STEPS {
        eprintln!("\n==> ci: {name}");
        let step_start = Instant::now();
        let result = step();
        timings.push((name, step_start.elapsed()));
        if let Err(err) = result {
            print_timings(&timings, start.elapsed());
            return Err(format!("ci step `{name}` failed: {err}"));
        }
    }
    print_timings(&timings, start.elapsed());
    eprintln!("ci: all {} steps passed", CI_STEPS.len());
    Ok(())
}

fn print_timings(timings: &[(&str, Duration)], total: Duration) {
    eprintln!("\nci timings:");
    for (name, elapsed) in timings {
        eprintln!("  {name:<8} {:>9}", format_duration(*elapsed));
    }
    eprintln!("  {:<8} {:>9}", "total", format_duration(total));
}

fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:04.1}s", d.as_secs() / 60, secs % 60.0)
    }
}

fn fmt() -> Result<(), String> {
    Cmd::cargo().args(["fmt", "--all", "--", "--check"]).run()
}

fn clippy() -> Result<(), String> {
    Cmd::cargo()
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .run()
}

fn test() -> Result<(), String> {
    // No `--all-targets`: with it cargo skips doctests, and ours must run.
    Cmd::cargo().args(["test", "--workspace"]).run()
}

fn docs() -> Result<(), String> {
    Cmd::cargo()
        .env("RUSTDOCFLAGS", "-D warnings")
        .args(["doc", "--workspace", "--no-deps"])
        .run()
}

/// The cargo-deny release whose `deny.toml` schema we follow.
const CARGO_DENY: &str = "cargo-deny@^0.20";

/// Makes sure `cargo <subcommand>` works, installing `spec` with `cargo install --locked`
/// when it does not.
fn ensure_cargo_tool(subcommand: &str, spec: &str) -> Result<(), String> {
    match Cmd::cargo().args([subcommand, "--version"]).probe() {
        Some(version) => eprintln!("using {version}"),
        None => {
            eprintln!(
                "cargo {subcommand} is not installed; installing {spec} (this takes a while)"
            );
            Cmd::cargo().args(["install", "--locked", spec]).run()?;
        }
    }
    Ok(())
}

fn deny() -> Result<(), String> {
    ensure_cargo_tool("deny", CARGO_DENY)?;
    // No `--offline`: cargo-deny fetches the crate sources it reads licences
    // from, which a fresh machine does not have yet. That fetch only reaches
    // crates.io; the advisory database (the one download we cannot make) is
    // only fetched by the advisories check, which we do not run.
    Cmd::cargo()
        .args(["deny", "check", "licenses", "bans", "sources"])
        .run()?;
    eprintln!(
        "cargo deny: advisories skipped (the advisory database cannot be fetched on this \
         machine); checked licenses, bans, sources"
    );
    Ok(())
}

fn bench(args: &[String]) -> Result<(), String> {
    let mut cmd = Cmd::cargo()
        .args(["run", "--release", "-p", "offload-bench", "--"])
        .args(args);
    let has_out = args
        .iter()
        .any(|arg| arg == "--out" || arg.starts_with("--out="));
    if !has_out {
        let dir = workspace_root().join("target").join("bench");
        std::fs::create_dir_all(&dir)
            .map_err(|err| format!("could not create {}: {err}", dir.display()))?;
        cmd = cmd.args(["--out", "target/bench/results.json"]);
    }
    cmd.run()
}

/// The cargo-fuzz release the fuzz crate is written for.
const CARGO_FUZZ: &str = "cargo-fuzz@^0.13";

/// Where the fuzz targets live (a crate of its own, outside the workspace).
const FUZZ_DIR: &str = "crates/offload-ipc/fuzz";

/// The targets `cargo xtask fuzz` runs.
const FUZZ_TARGETS: [&str; 2] = ["frame_decoder", "handshake"];

fn fuzz(args: &[String]) -> Result<(), String> {
    let seconds = match args {
        [] => 60,
        [flag, n] if flag == "--seconds" => n
            .parse::<u64>()
            .map_err(|_| format!("--seconds takes a whole number, not `{n}`"))?,
        _ => return Err("usage: cargo xtask fuzz [--seconds N]".to_owned()),
    };
    ensure_cargo_tool("fuzz", CARGO_FUZZ)?;
    let each = (seconds / FUZZ_TARGETS.len() as u64).max(1);
    for target in FUZZ_TARGETS {
        // cargo-fuzz builds with sanitizer flags that only nightly accepts; this machine has
        // one stable toolchain, which accepts them with RUSTC_BOOTSTRAP.
        Cmd::cargo()
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target, "--fuzz-dir", FUZZ_DIR, "--"])
            .args([
                format!("-max_total_time={each}"),
                "-rss_limit_mb=2048".to_owned(),
            ])
            .run()?;
    }
    eprintln!(
        "fuzz: {} targets, {each} s each, no crash",
        FUZZ_TARGETS.len()
    );
    Ok(())
}
