//! How a worker finds and reaches its pool: the socket name and the environment contract,
//! including the list of descriptors it inherited (both ends of that list are here).

use std::ffi::OsString;

/// Environment variable that marks a process as a worker and names the pool's socket.
pub const ENV_SOCKET: &str = "OFFLOAD_WORKER_SOCKET";

/// Environment variable with the pool's process id, so a worker whose parent already died
/// exits at once instead of waiting for a connection that will never be accepted.
pub const ENV_PARENT: &str = "OFFLOAD_WORKER_PARENT";

/// Environment variable listing, comma-separated, the descriptors above 2 a worker inherits
/// from the pool's process (open there without close-on-exec). The worker closes exactly
/// these as it starts, and nothing it opened itself before `init`.
pub const ENV_INHERITED: &str = "OFFLOAD_WORKER_INHERITED";

/// A private socket name for a new pool. On Linux it lives in the abstract namespace (no file,
/// nothing to clean up); elsewhere interprocess maps it to a socket file. The name is visible
/// to other local users (`/proc/net/unix`), so it shares nothing with the token: the random
/// part only avoids collisions, the token in the handshake is the security boundary.
///
/// # Errors
///
/// When the OS random source cannot be read.
pub fn new_socket_name() -> std::io::Result<String> {
    let random = crate::handshake::new_token()?;
    let tag: String = random.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(format!("offload-{}-{tag}.sock", std::process::id()))
}

/// The socket name, when this process was started as a worker.
pub fn worker_socket_from_env() -> Option<OsString> {
    std::env::var_os(ENV_SOCKET)
}

/// Parent side of [`ENV_INHERITED`]: the descriptors above 2 a child started now would
/// inherit (open in this process without close-on-exec), as `fd:dev:ino` entries,
/// comma-separated. Rust opens everything close-on-exec, so this is usually empty, or what
/// this process inherited itself (a jobserver pipe, ...). A descriptor another thread opens
/// without close-on-exec between this and the spawn is not listed, and stays open in the
/// worker.
pub fn inherited_descriptors() -> String {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return String::new();
    };
    let mut list = String::new();
    for entry in entries.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<libc::c_int>() else {
            continue;
        };
        if fd <= 2 {
            continue;
        }
        // SAFETY: F_GETFD only reads a descriptor's flags; a number that is not open any more
        // gives -1. The listing's own descriptor is close-on-exec (opendir), so it is skipped.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 || flags & libc::FD_CLOEXEC != 0 {
            continue;
        }
        if let Some((dev, ino)) = identity(fd) {
            if !list.is_empty() {
                list.push(',');
            }
            list.push_str(&format!("{fd}:{dev}:{ino}"));
        }
    }
    list
}

/// Worker side of [`ENV_INHERITED`]: closes each listed descriptor while its number still
/// names the listed file (device and inode). Things the parent had open without
/// close-on-exec (a jobserver pipe, a server framework's socket, ...) would otherwise keep
/// their other ends from seeing them closed. Only those: `main` may have opened descriptors
/// of its own before it called `init` (a tokio runtime's epoll and eventfd, a log file), and
/// the worker keeps them, even one that reused the number of a descriptor the parent closed
/// after listing it. The pool spawns workers without a pre-exec hook, which would make it
/// fork the whole parent, so this is done in the worker. (Code before `init` that takes
/// ownership of an inherited descriptor, such as a jobserver client, loses it: `init`
/// belongs first in `main`.)
pub(crate) fn close_inherited() {
    let Some(list) = std::env::var_os(ENV_INHERITED) else {
        return;
    };
    for entry in list.to_string_lossy().split(',') {
        let mut parts = entry.trim().split(':').map(str::parse::<u64>);
        let (Some(Ok(fd)), Some(Ok(dev)), Some(Ok(ino))) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        match libc::c_int::try_from(fd) {
            Ok(fd) if fd > 2 && identity(fd) == Some((dev, ino)) => {
                // SAFETY: closes a descriptor the parent handed down, checked just now to be
                // the file the parent listed and not one this process opened before `init`.
                unsafe { libc::close(fd) };
            }
            _ => {}
        }
    }
}

/// The device and inode of the file open as `fd`, or `None` if `fd` is not open.
fn identity(fd: libc::c_int) -> Option<(u64, u64)> {
    // SAFETY: an all-zero stat is a valid value of this plain C struct; fstat writes into it
    // and reads nothing else of ours.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return None;
    }
    Some((stat.st_dev, stat.st_ino))
}
