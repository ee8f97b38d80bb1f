//! Starting worker processes, reaping them, and describing how they ended.
//!
//! Each worker gets a small reaper thread blocked in `waitid`. tokio's `Child::wait` is not
//! used: it depends on a process-wide SIGCHLD handler that stops waking runtimes other than
//! the one that installed it, and every pool has its own runtime.

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use offload_ipc::handshake::token_to_hex;
use offload_ipc::protocol::TOKEN_LEN;
use offload_ipc::transport::{inherited_descriptors, ENV_INHERITED, ENV_PARENT, ENV_SOCKET};

/// Kills a worker that has not been reaped yet.
#[derive(Clone)]
pub(crate) struct Killer {
    pid: u32,
    /// True once the worker has exited. Held while signalling, and set before reaping, so a
    /// kill never reaches a pid the OS may already have given to another process.
    exited: Arc<Mutex<bool>>,
}

impl Killer {
    pub(crate) fn kill(&self) {
        let exited = self.exited.lock().unwrap_or_else(PoisonError::into_inner);
        if !*exited {
            if let Ok(pid) = libc::pid_t::try_from(self.pid) {
                // SAFETY: kill(2) takes plain integers. The pid is our unreaped child (checked
                // under the lock above), so it names no other process.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// A worker being started: [`wait`](Starting::wait) for its pid.
pub(crate) struct Starting(
    Result<std::sync::mpsc::Receiver<std::io::Result<(u32, Killer)>>, std::io::Error>,
);

impl Starting {
    /// Blocks until the worker's program was executed (or could not be).
    pub(crate) fn wait(self) -> std::io::Result<(u32, Killer)> {
        self.0?.recv().unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "the thread starting the worker ended without a result",
            ))
        })
    }
}

/// Starts one worker: the program with the pool's socket name in its environment and the
/// token on its stdin (so `ps` and `/proc/<pid>/cmdline` never show it). Its stdout and stderr
/// are the parent's, so nothing it prints is lost. `on_exit` runs with its pid and status once
/// it ended and was reaped.
///
/// Returns at once: several workers start side by side. The worker is started by its own
/// reaper thread, which then waits for it to exit. That thread is the worker's parent as
/// `PR_SET_PDEATHSIG` sees it (the signal fires when the *thread* that forked a child ends),
/// and it outlives the worker, so the signal comes only when the whole parent process dies.
pub(crate) fn start(
    program: &Path,
    socket: &str,
    token: &[u8; TOKEN_LEN],
    on_exit: impl FnOnce(u32, ExitStatus) + Send + 'static,
) -> Starting {
    let (program, socket, token) = (program.to_owned(), socket.to_owned(), *token);
    let (started, result) = std::sync::mpsc::sync_channel(1);
    let reaper = std::thread::Builder::new()
        .name("offload-reaper".into())
        .spawn(move || {
            let mut child = match spawn_child(&program, &socket, &token) {
                Ok(child) => child,
                Err(e) => {
                    let _ = started.send(Err(e));
                    return;
                }
            };
            let pid = child.id();
            let killer = Killer {
                pid,
                exited: Arc::new(Mutex::new(false)),
            };
            let exited = killer.exited.clone();
            let _ = started.send(Ok((pid, killer)));
            wait_without_reaping(pid);
            *exited.lock().unwrap_or_else(PoisonError::into_inner) = true;
            // Reap; an error here means it was reaped already, which cannot happen since only
            // this thread waits for it. Report it as ended either way, so nothing waits forever.
            let status = child.wait().unwrap_or_else(|_| {
                use std::os::unix::process::ExitStatusExt;
                ExitStatus::from_raw(0)
            });
            on_exit(pid, status);
        });
    Starting(reaper.map(|_| result))
}

fn spawn_child(
    program: &Path,
    socket: &str,
    token: &[u8; TOKEN_LEN],
) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // No `pre_exec` hook, on purpose: with one, std must fork, and forking copies the
    // parent's page tables and makes every page it writes afterwards fault (copy-on-write):
    // starting 2 workers took 7.1 ms from a parent with 100 MiB of heap, 22 ms at 400 MiB,
    // paid again for every replacement. Without one, std uses posix_spawn (a vfork: nothing
    // is copied). The worker closes the descriptors it inherited beyond its standard streams
    // as it starts (`offload_ipc::transport::close_inherited`) from the list made here.
    let mut command = Command::new(program);
    let inherited = inherited_descriptors();
    if inherited.is_empty() {
        // Not one of ours from further up (a worker that builds a pool of its own clears it,
        // but a program may have been started with it set).
        command.env_remove(ENV_INHERITED);
    } else {
        command.env(ENV_INHERITED, inherited);
    }
    let mut child = command
        // A terminal's Ctrl-C (SIGINT to the foreground process group) reaches the parent
        // only: it decides whether to drain or stop the pool. If it dies, its workers die
        // with it (PR_SET_PDEATHSIG, and the end of their connection).
        .process_group(0)
        .env(ENV_SOCKET, socket)
        .env(ENV_PARENT, std::process::id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        // 65 bytes fit any pipe buffer, so this never blocks. A worker that died already is
        // reported by its exit, not here.
        let _ = writeln!(stdin, "{}", token_to_hex(token));
    }
    Ok(child)
}

/// Blocks until `pid` has exited, leaving it unreaped (a zombie) so its pid stays reserved.
fn wait_without_reaping(pid: u32) {
    let id: libc::id_t = pid;
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`, which lives across the call.
        let rc = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// How a process ended, in words, with the signal or exit code.
pub(crate) fn describe(status: ExitStatus) -> (String, Option<i32>, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    if let Some(signal) = status.signal() {
        let name = signal_name(signal).map_or_else(String::new, |n| format!(" ({n})"));
        (
            format!("was killed by signal {signal}{name}"),
            Some(signal),
            None,
        )
    } else if let Some(code) = status.code() {
        (format!("exited with code {code}"), None, Some(code))
    } else {
        ("ended".to_owned(), None, None)
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn statuses_are_described_for_people() {
        let (text, signal, code) = describe(ExitStatus::from_raw(9));
        assert_eq!(
            (text.as_str(), signal, code),
            ("was killed by signal 9 (SIGKILL)", Some(9), None)
        );
        let (text, signal, code) = describe(ExitStatus::from_raw(3 << 8));
        assert_eq!(
            (text.as_str(), signal, code),
            ("exited with code 3", None, Some(3))
        );
    }

    #[test]
    fn a_killed_child_is_reaped_and_reported() {
        // A program that waits until it is killed (spawn passes no arguments).
        let script = std::env::temp_dir().join(format!("offload-sleeper-{}", std::process::id()));
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (_pid, killer) = start(&script, "unused", &[0; TOKEN_LEN], move |_, s| {
            let _ = tx.send(s);
        })
        .wait()
        .unwrap();
        killer.kill();
        let status = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(describe(status).1, Some(9));
        killer.kill(); // after the exit: a no-op, never a stray signal
        let _ = std::fs::remove_file(&script);
    }
}
