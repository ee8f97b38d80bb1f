//! Panic policy: a panicking task becomes a [`TaskError`](crate::TaskError), never a dead
//! worker. Kept in one place, as rayon keeps its `unwind.rs`.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::TaskError;

/// Runs `f`, turning a panic into [`TaskError::Panicked`] for the task named `task`.
///
/// `AssertUnwindSafe` is sound here: after a panic, the task's state is dropped and only the
/// message crosses back, so no broken invariant can be observed.
pub fn catch_task_panic<R>(task: &'static str, f: impl FnOnce() -> R) -> Result<R, TaskError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let error = TaskError::panicked(task, panic_message(&*payload));
        // The payload's own destructor may panic; contain that too, so the worker survives.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
        error
    })
}

/// The text of a panic payload: the `&str` or `String` that `panic!` carries.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic payload was not a string".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_errors_with_their_message() {
        let err = catch_task_panic("t", || -> u32 { panic!("bad {}", 42) }).unwrap_err();
        assert_eq!(err.panic_message(), Some("bad 42"));
        let err = catch_task_panic("t", || std::panic::panic_any(7_u8)).unwrap_err();
        assert_eq!(err.panic_message(), Some("panic payload was not a string"));
        assert_eq!(catch_task_panic("t", || 5).unwrap(), 5);
    }
}
