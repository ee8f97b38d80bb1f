//! For implementing an [`Executor`](crate::Executor): the producer side of a [`TaskHandle`].
//!
//! A backend calls [`pair`] when a task is submitted, keeps the [`Completer`] with the queued
//! work, and returns the handle to the caller. When a worker picks the task up it calls
//! [`Completer::start`] (false: the task was cancelled meanwhile, skip it), runs the task under
//! [`enter`] so that [`is_cancelled`](crate::is_cancelled) works, and calls
//! [`Completer::complete`]. A completer dropped without completing resolves its handle with
//! [`TaskError::Shutdown`], so a pool that drops its queue can never leave a caller hanging.

use std::sync::Arc;

use crate::handle::{Shared, Status};
use crate::{CancelFlag, TaskError, TaskHandle};

#[path = "attach.rs"]
pub mod attach;
pub use crate::cancel::EnterGuard;
pub use crate::packed::{encode_into, pack, pack_failures, unpack_results, WireError};
pub use crate::registry::OutputBytes;
pub use crate::unwind::{catch_task_panic, panic_message};
pub use attach::Fd;

/// A shared buffer's segment, to send to another process; `None` for an empty buffer, which
/// has none.
pub fn segment_of(buf: &crate::SharedBuf) -> Option<&Fd> {
    buf.segment()
}

/// A zero-filled shared buffer whose segment is named `name` (as `/proc` shows it), for
/// memory a pool's machinery shares with its workers.
///
/// # Errors
///
/// As for [`SharedBuf::new`](crate::SharedBuf::new).
pub fn named_shared_buf(len: usize, name: &std::ffi::CStr) -> std::io::Result<crate::SharedBuf> {
    crate::SharedBuf::named(len, name)
}

/// Closes a shared buffer's descriptor, keeping its memory mapped: a process that only uses
/// the memory need not hold one more descriptor. The buffer can no longer be sent to another
/// process as a segment (its bytes would go inline).
pub fn close_segment(buf: &mut crate::SharedBuf) {
    buf.close_segment();
}

/// Maps a segment of `len` bytes that arrived from another process, as a [`SharedBuf`]
/// would be on arrival (the segment must be sealed against shrinking, and hold `len` bytes).
///
/// # Errors
///
/// When the descriptor is not such a segment, or cannot be mapped.
///
/// [`SharedBuf`]: crate::SharedBuf
pub fn map_segment(fd: Fd, len: usize) -> std::io::Result<crate::SharedBuf> {
    crate::SharedBuf::adopt(fd, len)
}

/// Creates a queued task's handle and its completer. `name` is the task's name, for errors.
pub fn pair<T>(name: &'static str) -> (Completer<T>, TaskHandle<T>) {
    paired(Shared::new(name, Status::Queued))
}

/// Like [`pair`], with `hook` registered as by [`Completer::on_cancel`] (without taking the
/// handle's lock for it).
pub fn pair_with_cancel<T>(
    name: &'static str,
    hook: impl FnOnce() + Send + 'static,
) -> (Completer<T>, TaskHandle<T>) {
    paired(Shared::new(name, Status::Queued).with_on_cancel(Box::new(hook)))
}

fn paired<T>(shared: Shared<T>) -> (Completer<T>, TaskHandle<T>) {
    let shared = Arc::new(shared);
    (
        Completer {
            shared: Some(shared.clone()),
        },
        TaskHandle::from_shared(shared),
    )
}

/// Gives the first blocking [`wait`](TaskHandle::wait) (or
/// [`wait_timeout`](TaskHandle::wait_timeout)) on `handle` a way to fetch the result on its
/// own thread: it calls `helper(done, deadline)` before it sleeps. The helper must complete
/// the handle itself (through the task's [`Completer`]) or leave that to the backend, and
/// return once `done()` is true, `deadline` has passed, or it cannot help; the wait then goes
/// on as usual. A process pool uses it to let a caller read its answer from the worker's
/// socket instead of being woken by the pool's I/O thread: one thread hand-off less per
/// round trip. Dropped unused when the task finishes some other way, and as soon as the handle
/// is used in any other way (polled as a future or by [`as_completed`](crate::as_completed)
/// and [`wait`](crate::wait()), queried, detached, dropped): a backend that holds something
/// back for the helper (the process pool keeps its I/O thread from being woken by the answer)
/// lets go when it is dropped.
pub fn help_wait<T>(
    handle: &TaskHandle<T>,
    helper: impl FnOnce(&dyn Fn() -> bool, Option<std::time::Instant>) + Send + 'static,
) {
    handle.shared().set_wait_helper(Box::new(helper));
}

/// Makes `flag` the current task's cancel flag on this thread until the guard drops.
pub fn enter(flag: CancelFlag) -> EnterGuard {
    crate::cancel::enter(flag)
}

/// Like [`enter`], and `poll` runs on this thread each time the task checks
/// [`is_cancelled`](crate::is_cancelled), just before the flag is read.
///
/// For backends whose cancel requests arrive where the task runs (a worker process reads them
/// from its connection): the hook can look for one without a second thread, and raise the
/// flag. It is called often, so it must be cheap when there is nothing new, and it must not
/// call `is_cancelled` itself.
pub fn enter_polled(flag: CancelFlag, poll: fn()) -> EnterGuard {
    crate::cancel::enter_polled(flag, poll)
}

/// The backend's end of a submitted task: starts and completes it.
pub struct Completer<T> {
    /// `None` once completed; the `Option` lets `complete` consume without running `Drop`'s
    /// fallback.
    shared: Option<Arc<Shared<T>>>,
}

impl<T> Completer<T> {
    fn shared(&self) -> &Shared<T> {
        match &self.shared {
            Some(shared) => shared,
            None => unreachable!("a completer is only emptied by `complete`, which consumes it"),
        }
    }

    /// The task's name.
    pub fn task_name(&self) -> &'static str {
        self.shared().name
    }

    /// Marks the task running. Returns `false` when it was cancelled while queued: the
    /// backend must then not run it.
    pub fn start(&self) -> bool {
        self.shared().start()
    }

    /// True once the caller cancelled the task (or dropped its handle).
    pub fn is_cancelled(&self) -> bool {
        self.shared().is_cancel_raised()
    }

    /// The task's cancel flag, to make current with [`enter`] while the task runs. It is the
    /// handle's own: no allocation.
    pub fn cancel_flag(&self) -> CancelFlag
    where
        T: Send + 'static,
    {
        match &self.shared {
            Some(shared) => CancelFlag::of(shared.clone()),
            None => unreachable!("a completer is only emptied by `complete`, which consumes it"),
        }
    }

    /// Registers `hook`, run once if the caller cancels the task before it completes (at once,
    /// if it was already cancelled). Backends that can stop running work use it. Unless it
    /// runs, it is dropped with the task's shared state, once both the handle and this
    /// completer are gone (not when the task completes): it should hold little.
    pub fn on_cancel(&self, hook: impl FnOnce() + Send + 'static) {
        self.shared().set_on_cancel(Box::new(hook));
    }

    /// Resolves the handle with `result`. A result that arrives after a cancel is dropped.
    pub fn complete(mut self, result: Result<T, TaskError>) {
        if let Some(shared) = self.shared.take() {
            shared.finish(result);
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            let name = shared.name;
            shared.finish(Err(TaskError::shutdown(name)));
        }
    }
}

impl<T> std::fmt::Debug for Completer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completer")
            .field("task", &self.shared.as_ref().map(|s| s.name))
            .finish()
    }
}
