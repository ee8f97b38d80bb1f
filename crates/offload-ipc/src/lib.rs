//! offload's interprocess runtime, shared by pools and their worker processes.
//!
//! - [`fdpass`]: file descriptors beside a frame's bytes (`SCM_RIGHTS`).
//! - [`frame`]: length-prefixed postcard frames with a size limit checked before allocation.
//! - [`protocol`]: every message between a pool and its workers.
//! - [`recycle`]: large encode buffers, kept for the next large task.
//! - [`ring`]: a worker's frames to the pool through shared memory.
//! - [`segment`]: large payloads through shared-memory segments a connection reuses.
//! - [`handshake`]: token, protocol-version and build checks.
//! - [`transport`]: socket names and the environment contract of a worker.
//! - [`worker`]: the blocking worker loop a worker process runs instead of `main`.
//!
//! The task registry lives in `offload-core`; the async parent side in `offload-process`.
//! Users do not depend on this crate directly.

pub mod fdpass;
pub mod frame;
pub mod handshake;
mod log_forward;
pub mod protocol;
pub mod recycle;
pub mod ring;
pub mod segment;
pub mod transport;
pub mod worker;

pub use log_forward::level_to_u8;
