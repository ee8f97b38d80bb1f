//! `ProcessPool`: offload's process backend. Tasks run in worker processes, so a crash, an
//! `abort()` or a leak in one task cannot take the service down.
//!
//! - Workers are re-executions of the running program (Linux: `/proc/self/exe`) or a named
//!   worker binary. Either must call [`init`] at the top of `main`.
//! - Each worker connects to a private local socket (Linux abstract namespace) and presents a
//!   per-pool random token, received on its stdin; protocol version and build are checked.
//! - One central queue feeds a small in-flight window per worker; writes and reads are
//!   coalesced, so a burst of tiny tasks costs few syscalls.
//! - A worker that dies fails only the task it was running, with its pid and exit code or
//!   signal in the error; tasks queued behind it run elsewhere, and it is replaced. Workers
//!   die with the parent (socket EOF, and `PR_SET_PDEATHSIG` on Linux).
//! - `tracing` events in tasks reach the parent's subscriber, inside a span with `worker.pid`
//!   and `task.name`.
//! - The pool runs its own small I/O thread, so it works from sync code and any runtime.
//!
//! Users normally reach this crate through `offload::ProcessPool` and `offload::init`.
//!
//! # Example
//!
//! ```
//! use offload_core::{Executor, Task};
//! # use serde::{Serialize, Deserialize};
//! # #[derive(Serialize, Deserialize)] struct Square(u64);
//! # impl Task for Square { type Output = u64; const NAME: &'static str = "doc::Square";
//! #     fn run(self) -> u64 { self.0 * self.0 } }
//! # offload_core::register_task!(Square);
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     offload_process::init(); // a worker process serves tasks here and never returns
//!
//!     let pool = offload_process::ProcessPool::builder().workers(2).build()?;
//!     assert_eq!(pool.submit(Square(12)).wait()?, 144);
//!     pool.join();
//!     Ok(())
//! }
//! ```

mod alarm;
mod builder;
mod connection;
mod forward;
mod job;
mod lane;
mod pool;
mod reactor;
mod reader;
mod scheduler;
mod segments;
mod socket;
mod spawner;
mod stats;
mod watch;

pub use builder::{BuildError, ProcessPoolBuilder};
pub use job::{InitOutput, TaskOptions};
pub use pool::ProcessPool;
pub use stats::PoolStats;

/// Turns a process started as a worker into one: it serves tasks and exits when its pool is
/// done, never returning. In any other process it returns at once and costs nothing.
///
/// Call it first thing in `main`, before any other work (and before starting threads): a
/// worker is a re-execution of your program, and whatever `main` does before `init` runs again
/// in every worker.
///
/// For tests, use an integration test with `harness = false` whose `main` calls `init()` and
/// then runs the test functions (see this crate's `tests/process_pool.rs`).
pub fn init() {
    if let Some(socket) = offload_ipc::transport::worker_socket_from_env() {
        offload_ipc::worker::run(socket);
    }
}
