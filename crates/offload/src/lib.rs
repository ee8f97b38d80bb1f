//! Push CPU-heavy work off your async event loop, onto threads or worker processes,
//! with one API: Python's `concurrent.futures`, done the Rust way.
//!
//! # Define a task once
//!
//! A task is a function marked `#[offload::task]`. The attribute generates a serializable
//! task type (named after the function, in `UpperCamelCase`, one field per argument) and
//! registers it under a stable name, so every backend, including worker processes, can run it.
//!
//! ```
//! #[offload::task]
//! fn count_primes(lo: u64, hi: u64) -> u64 {
//!     (lo..hi).filter(|&n| n > 1 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)).count() as u64
//! }
//! // The function is unchanged; the task type sits next to it:
//! let task = CountPrimes { lo: 0, hi: 100 };
//! assert_eq!(count_primes(0, 100), 25);
//! ```
//!
//! # Submit it, await it
//!
//! ```
//! # #[offload::task] fn count_primes(lo: u64, hi: u64) -> u64 { hi - lo }
//! use offload::prelude::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = offload::ThreadPool::builder().workers(2).build()?;
//! let primes = pool.submit(CountPrimes { lo: 0, hi: 1_000 }).await?;
//! # assert_eq!(primes, 1_000);
//! # Ok(())
//! # }
//! ```
//!
//! A [`TaskHandle`] is a future of `Result<T, TaskError>`; the task runs whether or not the
//! handle is polled. [`TaskError`] is the framework's failure (the task panicked, was
//! cancelled, its pool shut down, ...); a task that returns `Result<T, E>` gets its own errors
//! back untouched inside `Ok`. **Dropping a handle cancels its task**; call
//! [`detach`](TaskHandle::detach) to let it run on. Sync code calls
//! [`wait`](TaskHandle::wait) or [`wait_timeout`](TaskHandle::wait_timeout) instead of `.await`.
//!
//! # Many tasks
//!
//! - [`as_completed`]: a stream of `(index, result)` in completion order.
//! - [`wait`](fn@wait): returns when the first task completes, the first fails, or all are done,
//!   with an optional timeout, like `concurrent.futures.wait`.
//! - [`Executor::map`] / [`Executor::map_unordered`]: stream results over any iterator of
//!   tasks, even an endless one, with a bounded window of work in flight and automatic
//!   batching of tiny tasks.
//!
//! ```
//! # #[offload::task] fn count_primes(lo: u64, hi: u64) -> u64 { hi - lo }
//! use offload::prelude::*; // includes StreamExt for `.next()`
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = offload::ThreadPool::builder().workers(2).build()?;
//! let ranges = (0..100u64).map(|i| CountPrimes { lo: i * 1_000, hi: (i + 1) * 1_000 });
//! let mut results = pool.map(ranges);
//! let mut total = 0;
//! while let Some(count) = results.next().await {
//!     total += count?;
//! }
//! # assert_eq!(total, 100_000);
//! # Ok(())
//! # }
//! ```
//!
//! # One trait, any backend
//!
//! Write service code against [`Executor`] and pick the backend where the pool is built;
//! [`Either`] chooses one at run time, from configuration.
//!
//! ```
//! # #[offload::task] fn count_primes(lo: u64, hi: u64) -> u64 { hi - lo }
//! use offload::prelude::*;
//!
//! async fn primes_below(ex: &impl Executor, n: u64) -> Result<u64, TaskError> {
//!     ex.submit(CountPrimes { lo: 0, hi: n }).await
//! }
//! ```
//!
//! # Backends
//!
//! - [`ThreadPool`] (feature `thread`): a fixed set of OS threads; also runs plain closures
//!   with [`ThreadPool::submit_fn`]. Cancelling a running task is cooperative:
//!   the task checks [`is_cancelled`].
//! - [`ProcessPool`] (feature `process`): worker processes, so that a crash, an abort or a
//!   leak in one task cannot take the service down: the task fails with
//!   [`TaskError::WorkerCrashed`] and the worker is replaced. Workers re-execute your program,
//!   so `main` must call [`init`] first:
//!
//! ```
//! # #[offload::task] fn count_primes(lo: u64, hi: u64) -> u64 { hi - lo }
//! use offload::prelude::*;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     offload::init(); // in a worker process, serves tasks and never returns
//!
//!     let pool = offload::ProcessPool::builder().workers(2).build()?;
//!     let primes = pool.submit(CountPrimes { lo: 0, hi: 1_000 }).wait()?;
//!     assert_eq!(primes, 1_000);
//!     pool.join();
//!     Ok(())
//! }
//! ```
//!
//! # Large data: [`SharedBuf`]
//!
//! Small task arguments and outputs cross to a worker process through its socket. An
//! argument of 1 MiB or more (encoded) crosses in shared memory on its own: the pool copies it
//! into a segment it keeps for that worker, and the output comes back in the same segment
//! when it fits (8 MiB there and back: 1.4-1.5x the speed of a bare socket echo). Each worker
//! keeps at most 288 MiB of such segments and the pool two encode buffers of at most 256 MiB
//! in all, for reuse (fresh memory costs more than the copies); both are dropped once they
//! sat unused for two seconds.
//!
//! To skip the copies too, put the bytes in a [`SharedBuf`] (Linux): the worker maps the same
//! shared memory, so the task receives them, may change them in place and return them,
//! without a copy in either direction.
//!
//! ```
//! use offload::prelude::*;
//! use offload::SharedBuf;
//!
//! /// Turns every byte upside down, in place, and hands the buffer back.
//! #[offload::task]
//! fn invert(mut data: SharedBuf) -> SharedBuf {
//!     data.iter_mut().for_each(|b| *b = !*b);
//!     data
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     offload::init();
//!
//!     let mut data = SharedBuf::new(8 << 20)?; // 8 MiB, zero-filled
//!     data[0] = 0x0F;
//!     let pool = offload::ProcessPool::builder().workers(1).build()?;
//!     let back = pool.submit(Invert { data }).wait()?;
//!     assert_eq!((back[0], back[1], back.len()), (0xF0, 0xFF, 8 << 20));
//!     pool.join();
//!     Ok(())
//! }
//! ```
//!
//! # Features
//!
//! - `thread` (default): [`ThreadPool`].
//! - `process` (default): [`ProcessPool`] and [`init`].
//! - `macros` (default): `#[offload::task]`.

pub use offload_core::{
    as_completed, find_task, is_cancelled, register_task, registered_tasks, wait, AsCompleted,
    BatchHandle, CancelFlag, Either, Executor, LookupError, Map, MapUnordered, ReturnWhen,
    SubmitError, Task, TaskEntry, TaskError, TaskHandle, Wait, Waited,
};

#[cfg(target_os = "linux")]
pub use offload_core::SharedBuf;

/// For implementing an executor of your own.
pub use offload_core::backend;

#[cfg(feature = "macros")]
pub use offload_macros::task;

#[cfg(feature = "thread")]
pub use offload_thread::{ThreadPool, ThreadPoolBuilder};

/// The thread backend, with its build error.
#[cfg(feature = "thread")]
pub mod thread {
    pub use offload_thread::{BuildError, ThreadPool, ThreadPoolBuilder};
}

#[cfg(feature = "process")]
pub use offload_process::{init, ProcessPool, ProcessPoolBuilder};

/// The process backend: its build error, per-task options and statistics.
#[cfg(feature = "process")]
pub mod process {
    pub use offload_process::{
        init, BuildError, InitOutput, PoolStats, ProcessPool, ProcessPoolBuilder, TaskOptions,
    };
}

/// The names most code needs: `use offload::prelude::*;`. Includes `futures`' `StreamExt`,
/// to consume the streams of [`as_completed`] and [`Executor::map`] without another dependency.
pub mod prelude {
    pub use futures::StreamExt as _;
    pub use offload_core::{Executor, Task, TaskError, TaskHandle};
}

#[doc(hidden)]
pub mod __private {
    //! Used by `#[offload::task]`; not part of the API.
    pub use offload_core::__private::*;
}

/// The README's examples, compiled and run as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
