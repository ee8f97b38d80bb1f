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

/// The running task's flag, and what to call before reading it (see [`enter_polled`]).
struct Current {
    flag: CancelFlag,
    poll: Option<fn()>,
}

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
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
    // The hook runs with no borrow held: it may raise the flag read below.
    if let Some(poll) = CURRENT.with(|c| c.borrow().as_ref().and_then(|c| c.poll)) {
        poll();
    }
    CURRENT.with(|c| c.borrow().as_ref().is_some_and(|c| c.flag.is_raised()))
}

/// Makes `flag` the current task's flag until the guard drops.
pub(crate) fn enter(flag: CancelFlag) -> EnterGuard {
    enter_current(Current { flag, poll: None })
}

/// Like [`enter`], and `poll` runs on this thread before each [`is_cancelled`] reads the flag.
pub(crate) fn enter_polled(flag: CancelFlag, poll: fn()) -> EnterGuard {
    enter_current(Current {
        flag,
        poll: Some(poll),
    })
}

fn enter_current(current: Current) -> EnterGuard {
    let previous = CURRENT.with(|c| c.replace(Some(current)));
    EnterGuard { previous }
}

/// Restores the previous flag on drop (tasks may run nested, e.g. a batch runs its items).
#[must_use = "the flag is current only while the guard lives"]
#[derive(Debug)]
pub struct EnterGuard {
    previous: Option<Current>,
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current")
            .field("flag", &self.flag)
            .field("polled", &self.poll.is_some())
            .finish()
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

    thread_local! {
        static POLLED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        static TO_RAISE: RefCell<Option<CancelFlag>> = const { RefCell::new(None) };
    }

    /// Counts its calls and raises the flag left for it, as a backend's hook would on
    /// reading a cancel request.
    fn poll_hook() {
        POLLED.with(|p| p.set(p.get() + 1));
        TO_RAISE.with(|f| {
            if let Some(flag) = f.borrow_mut().take() {
                flag.raise();
            }
        });
    }

    #[test]
    fn a_polled_flag_runs_its_hook_before_each_check_and_sees_what_the_hook_raised() {
        let flag = CancelFlag::new();
        {
            let _guard = enter_polled(flag.clone(), poll_hook);
            assert!(!is_cancelled());
            assert_eq!(POLLED.with(std::cell::Cell::get), 1);
            TO_RAISE.with(|f| *f.borrow_mut() = Some(flag.clone()));
            assert!(
                is_cancelled(),
                "the hook raised the flag before it was read"
            );
            assert_eq!(POLLED.with(std::cell::Cell::get), 2);
        }
        // Out of the task, the hook is no longer called.
        assert!(!is_cancelled());
        assert_eq!(POLLED.with(std::cell::Cell::get), 2);
    }
}
