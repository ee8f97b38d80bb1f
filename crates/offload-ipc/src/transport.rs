//! How a worker finds and reaches its pool: the socket name and the environment contract.

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
