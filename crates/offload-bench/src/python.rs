//! The Python peers: `python/peers.py --serve`, kept running for the whole group and asked
//! for one sample at a time, so that Python's samples interleave with offload's.
//!
//! The script needs nothing but the standard library. When `python3` (or the interpreter
//! named by [`ENV_PYTHON`]) cannot be started, the Python rows are skipped with a message.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

/// Names the Python interpreter to run instead of `python3`.
pub(crate) const ENV_PYTHON: &str = "OFFLOAD_BENCH_PYTHON";

/// The running script.
pub(crate) struct Python {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// `3.11.7`.
    pub(crate) version: String,
    /// The platform's default start method (`fork` on Linux up to 3.13).
    pub(crate) start_method: String,
}

/// Where the script is: next to this crate's sources.
fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join("peers.py")
}

/// One run of `peers.py --recycle N EVERY` in a process of its own, killed after `limit`:
/// Python's `max_tasks_per_child` can hang (CPython issue 115634), and a hang must not stop the
/// harness. `Ok(None)` when it did not finish in time.
pub(crate) fn recycle_once(n: u64, every: u64, limit: Duration) -> anyhow::Result<Option<f64>> {
    let interpreter = std::env::var(ENV_PYTHON).unwrap_or_else(|_| "python3".to_owned());
    let mut child = Command::new(&interpreter)
        .arg(script())
        .args(["--recycle", &n.to_string(), &every.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("could not start `{interpreter}`"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            let mut out = String::new();
            if let Some(mut stdout) = child.stdout.take() {
                std::io::Read::read_to_string(&mut stdout, &mut out)?;
            }
            if !status.success() {
                bail!("peers.py --recycle failed ({status})");
            }
            return Ok(Some(
                out.trim()
                    .parse()
                    .context("peers.py --recycle printed no number")?,
            ));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            // Its forkserver and workers are its children: the kill leaves them without a
            // parent, and they exit when their pipes close.
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Python {
    /// Starts the script; `None` (after saying so) when there is no Python to run it.
    pub(crate) fn start() -> anyhow::Result<Option<Python>> {
        let interpreter = std::env::var(ENV_PYTHON).unwrap_or_else(|_| "python3".to_owned());
        let script = script();
        let spawned = Command::new(&interpreter)
            .arg(&script)
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                eprintln!(
                    "[process] `{interpreter}` not found: the Python rows are skipped \
                     (set {ENV_PYTHON} to use another interpreter)"
                );
                return Ok(None);
            }
            Err(e) => {
                return Err(e).with_context(|| format!("could not start `{interpreter}`"));
            }
        };
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("`{interpreter}` started without pipes");
        };
        let mut python = Python {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            version: String::new(),
            start_method: String::new(),
        };
        let info = python
            .call(&json!({ "cmd": "info" }))
            .with_context(|| format!("`{interpreter} {}` did not answer", script.display()))?;
        python.version = str_field(&info, "python")?.to_owned();
        python.start_method = str_field(&info, "start_method")?.to_owned();
        eprintln!(
            "[process] Python {} (default start method: {})",
            python.version, python.start_method
        );
        Ok(Some(python))
    }

    /// Sends one request and returns its answer.
    pub(crate) fn call(&mut self, request: &Value) -> anyhow::Result<Value> {
        let Some(stdin) = self.stdin.as_mut() else {
            bail!("the Python peers script is closed");
        };
        writeln!(stdin, "{request}")
            .and_then(|()| stdin.flush())
            .context("the Python peers script is gone")?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the Python peers script exited (request: {request})");
        }
        let reply: Value = serde_json::from_str(&line)
            .with_context(|| format!("the Python peers script answered {line:?}"))?;
        if let Some(error) = reply.get("error") {
            bail!("the Python peers script failed on {request}: {error}");
        }
        Ok(reply)
    }

    /// A request whose answer is `{"value": number}`.
    pub(crate) fn value(&mut self, request: &Value) -> anyhow::Result<f64> {
        let reply = self.call(request)?;
        reply
            .get("value")
            .and_then(Value::as_f64)
            .with_context(|| format!("no number in the Python answer {reply}"))
    }
}

fn str_field<'a>(value: &'a Value, field: &str) -> anyhow::Result<&'a str> {
    value
        .get(field)
        .and_then(Value::as_str)
        .with_context(|| format!("no `{field}` in the Python answer {value}"))
}

impl Drop for Python {
    fn drop(&mut self) {
        // End of input: the script shuts its pools down and exits.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
