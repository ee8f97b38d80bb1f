//! `ThreadPool`: offload's thread backend, a fixed set of OS threads behind the
//! [`Executor`](offload_core::Executor) trait.
//!
//! Threads share the caller's memory, so besides [tasks](offload_core::Task) the pool runs
//! plain closures ([`ThreadPool::submit_fn`]). A panic in a task comes back as a
//! [`TaskError`](offload_core::TaskError) and the thread keeps serving. Cancelling a task that
//! is already running is cooperative: the task sees it through
//! [`is_cancelled`](offload_core::is_cancelled).
//!
//! Users normally reach this crate through `offload::ThreadPool`.
//!
//! # Example
//!
//! ```
//! use offload_core::Executor;
//! use offload_thread::ThreadPool;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = ThreadPool::builder().workers(2).build()?;
//! let handles: Vec<_> = (0..4u64).map(|i| pool.submit_fn(move || i * i)).collect();
//! let squares: Vec<u64> = handles
//!     .into_iter()
//!     .map(|h| h.wait())
//!     .collect::<Result<_, _>>()?;
//! assert_eq!(squares, [0, 1, 4, 9]);
//! pool.join();
//! # Ok(())
//! # }
//! ```

mod builder;
mod job;
mod pool;
mod queue;

pub use builder::{BuildError, ThreadPoolBuilder};
pub use pool::ThreadPool;
