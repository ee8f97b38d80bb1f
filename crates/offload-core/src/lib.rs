//! The core of [offload](https://docs.rs/offload): the task model and the API every backend
//! shares, with no transport of its own.
//!
//! - [`Task`]: a serializable unit of work with a stable name, registered in a
//!   link-time [registry](find_task) so worker processes can find it.
//! - [`Executor`]: the one trait behind `ThreadPool` and `ProcessPool`; [`Either`] picks one at
//!   run time.
//! - [`TaskHandle`]: a future of `Result<T, TaskError>` with `cancel()` and blocking `wait()`.
//! - [`as_completed`] and [`wait`]: many handles at once, as in `concurrent.futures`.
//! - [`Executor::map`] / [`Executor::map_unordered`]: bounded, batched streams of results.
//! - [`backend`]: what an executor implementation needs.
//!
//! Users depend on the `offload` crate, which re-exports all of this next to the backends.
//!
//! # Example
//!
//! ```
//! use offload_core::{Task, TaskHandle};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Add(u32, u32);
//!
//! impl Task for Add {
//!     type Output = u32;
//!     const NAME: &'static str = "example::Add";
//!     fn run(self) -> u32 {
//!         self.0 + self.1
//!     }
//! }
//! offload_core::register_task!(Add);
//!
//! // What a backend does with a submitted task, in miniature:
//! let (completer, handle): (_, TaskHandle<u32>) = offload_core::backend::pair(Add::NAME);
//! assert!(completer.start());
//! completer.complete(Ok(Add(2, 3).run()));
//! assert_eq!(handle.wait(), Ok(5));
//! ```

mod batch;
mod cancel;
mod error;
mod executor;
mod handle;
mod map;
mod packed;
mod registry;
#[cfg(target_os = "linux")]
mod shm;
mod task;
mod unwind;
mod wait;

pub mod backend;

pub use batch::BatchResults;
pub use cancel::{is_cancelled, CancelFlag};
pub use error::{SubmitError, TaskError};
pub use executor::{BatchHandle, Either, Executor};
pub use handle::TaskHandle;
pub use map::{Map, MapUnordered};
pub use registry::{encode, find_task, registered_tasks, LookupError, TaskEntry};
#[cfg(target_os = "linux")]
pub use shm::SharedBuf;
pub use task::Task;
pub use unwind::catch_task_panic;
pub use wait::{as_completed, wait, AsCompleted, ReturnWhen, Wait, Waited};

#[doc(hidden)]
pub mod __private {
    //! Used by `register_task!` and `#[offload::task]`; not part of the API.
    pub use inventory;
    pub use serde;
}
