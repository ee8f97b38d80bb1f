//! Cooperative cancellation: the flag a running task can check.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A shared flag raised when a task is cancelled. Backends make one current while a task runs
/// (see [`backend::enter`](crate::backend::enter)) so that [`is_cancelled`] can read it.
#[derive(Clone)]
pub struct CancelFlag(Arc<dyn HasFlag>);

/// Something that holds a cancel flag. A task handle's shared state holds its own, so the
/// flag of a submitted task costs no allocation of its own.
pub(crate) trait HasFlag: Send + Sync {
    fn flag(&self) -> &AtomicBool;
}

impl HasFlag for AtomicBool {
    fn flag(&self) -> &AtomicBool {
        self
    }
}

impl CancelFlag {
    /// A flag that is not raised.
    pub fn new() -> Self {
        CancelFlag(Arc::new(AtomicBool::new(false)))
    }

    /// The flag held by `holder`.
    pub(crate) fn of(holder: Arc<dyn HasFlag>) -> Self {
        CancelFlag(holder)
    }

    /// Raises the flag. It stays raised.
    pub fn raise(&self) {
        self.0.flag().store(true, Ordering::Release);
    }

    /// True once the flag was raised.
    pub fn is_raised(&self) -> bool {
        self.0.flag().load(Ordering::Acquire)
    }
}

impl Default for CancelFlag {
    fn default() -> Self {
        CancelFlag::new()
    }
}

impl std::fmt::Debug for CancelFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CancelFlag")
            .field(&self.is_raised())
            .finish()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<CancelFlag>> = const { RefCell::new(None) };
}

/// True when the task running on this thread has been cancelled.
///
/// Long-running tasks can call this now and then and return early: cancellation of running
/// work on a `ThreadPool` is cooperative, so a task that never checks runs to completion (its
/// output is then dropped). Outside a task it returns `false`.
///
/// ```
/// # use offload_core::is_cancelled;
/// fn sum_slowly(n: u64) -> Option<u64> {
///     let mut total = 0;
///     for i in 0..n {
///         if i % 1024 == 0 && is_cancelled() {
///             return None; // nobody wants the answer any more
///         }
///         total += i;
///     }
///     Some(total)
/// }
/// assert_eq!(sum_slowly(10), Some(45));
/// ```
pub fn is_cancelled() -> bool {
    CURRENT.with(|c| c.borrow().as_ref().is_some_and(CancelFlag::is_raised))
}

/// Makes `flag` the current task's flag until the guard drops.
pub(crate) fn enter(flag: CancelFlag) -> EnterGuard {
    let previous = CURRENT.with(|c| c.replace(Some(flag)));
    EnterGuard { previous }
}

/// Restores the previous flag on drop (tasks may run nested, e.g. a batch runs its items).
#[must_use = "the flag is current only while the guard lives"]
#[derive(Debug)]
pub struct EnterGuard {
    previous: Option<CancelFlag>,
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_cancelled_reads_the_current_flag_and_restores_the_previous_one() {
        assert!(!is_cancelled());
        let outer = CancelFlag::new();
        let inner = CancelFlag::new();
        let _outer_guard = enter(outer.clone());
        {
            let _inner_guard = enter(inner.clone());
            inner.raise();
            assert!(is_cancelled());
        }
        assert!(!is_cancelled());
        outer.raise();
        assert!(is_cancelled());
    }
}
