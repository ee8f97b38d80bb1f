//! The framework's own failures, one type per operation shape.

use std::fmt;

/// Why a task did not produce its output.
///
/// This is the framework's failure, separate from the task's own `Result`: a task that returns
/// `Result<T, E>` resolves to `Ok(Err(e))` when it fails by itself. Like tokio's `JoinError`,
/// it has predicates ([`is_cancelled`](TaskError::is_cancelled),
/// [`is_panic`](TaskError::is_panic), ...) for code that does not want to match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The task was cancelled through its handle before it produced a result.
    #[error("task `{task}` was cancelled before it finished")]
    #[non_exhaustive]
    Cancelled {
        /// The task's name.
        task: &'static str,
    },
    /// The task panicked; the worker survived and keeps serving.
    #[error("task `{task}` panicked: {message}")]
    #[non_exhaustive]
    Panicked {
        /// The task's name.
        task: &'static str,
        /// The panic message, or a placeholder when the payload was not a string.
        message: String,
    },
    /// The pool shut down (or was dropped) before the task started.
    #[error(
        "task `{task}` was not run: the pool shut down before it started; submit to a running pool"
    )]
    #[non_exhaustive]
    Shutdown {
        /// The task's name.
        task: &'static str,
    },
    /// The task's arguments or output could not be serialized or deserialized.
    #[error("task `{task}` could not be (de)serialized: {message}")]
    #[non_exhaustive]
    Serialization {
        /// The task's name.
        task: &'static str,
        /// What the codec reported.
        message: String,
    },
}

impl TaskError {
    /// The name of the task this error belongs to.
    pub fn task_name(&self) -> &'static str {
        match self {
            TaskError::Cancelled { task }
            | TaskError::Panicked { task, .. }
            | TaskError::Shutdown { task }
            | TaskError::Serialization { task, .. } => task,
        }
    }

    /// True when the task was cancelled through its handle.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, TaskError::Cancelled { .. })
    }

    /// True when the task panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self, TaskError::Panicked { .. })
    }

    /// True when the task never ran because its pool shut down.
    pub fn is_shutdown(&self) -> bool {
        matches!(self, TaskError::Shutdown { .. })
    }

    /// The panic message, when the task panicked.
    pub fn panic_message(&self) -> Option<&str> {
        match self {
            TaskError::Panicked { message, .. } => Some(message),
            _ => None,
        }
    }

    /// A cancel error for `task`.
    pub fn cancelled(task: &'static str) -> Self {
        TaskError::Cancelled { task }
    }

    /// A shutdown error for `task`: the pool stopped before the task started.
    pub fn shutdown(task: &'static str) -> Self {
        TaskError::Shutdown { task }
    }

    /// A panic error for `task`; used by backends after catching an unwind.
    pub fn panicked(task: &'static str, message: impl Into<String>) -> Self {
        TaskError::Panicked {
            task,
            message: message.into(),
        }
    }

    /// A codec error for `task`; used by backends that serialize tasks.
    pub fn serialization(task: &'static str, message: impl fmt::Display) -> Self {
        TaskError::Serialization {
            task,
            message: message.to_string(),
        }
    }
}

/// A task could not be submitted; the task is given back.
///
/// Returned by [`Executor::try_submit`](crate::Executor::try_submit). Like crossbeam's
/// `SendError<T>`, it owns the value that could not be sent, so nothing is lost.
#[derive(PartialEq, Eq, Clone)]
pub struct SubmitError<T> {
    task: T,
    kind: SubmitErrorKind,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum SubmitErrorKind {
    Shutdown,
}

impl<T> SubmitError<T> {
    /// The pool no longer accepts work because it was shut down.
    pub fn shutdown(task: T) -> Self {
        SubmitError {
            task,
            kind: SubmitErrorKind::Shutdown,
        }
    }

    /// Gives back the task that could not be submitted.
    pub fn into_task(self) -> T {
        self.task
    }

    /// True when the pool was shut down.
    pub fn is_shutdown(&self) -> bool {
        self.kind == SubmitErrorKind::Shutdown
    }

    /// Converts into the error a handle resolves with when `submit` is used instead of
    /// `try_submit`.
    pub(crate) fn into_task_error(self, task: &'static str) -> TaskError {
        match self.kind {
            SubmitErrorKind::Shutdown => TaskError::shutdown(task),
        }
    }
}

impl<T> fmt::Debug for SubmitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubmitError")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for SubmitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SubmitErrorKind::Shutdown => f.write_str(
                "cannot submit: the pool is shut down; the task was given back (`into_task`)",
            ),
        }
    }
}

impl<T> std::error::Error for SubmitError<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_lower_case_and_name_the_task() {
        let errors = [
            TaskError::cancelled("m::f"),
            TaskError::panicked("m::f", "boom"),
            TaskError::shutdown("m::f"),
            TaskError::serialization("m::f", "eof"),
        ];
        for e in errors {
            let text = e.to_string();
            assert!(text.starts_with("task `m::f`"), "{text}");
            assert!(!text.ends_with('.'), "{text}");
            assert_eq!(e.task_name(), "m::f");
        }
        assert_eq!(
            TaskError::panicked("m::f", "boom").to_string(),
            "task `m::f` panicked: boom"
        );
    }

    #[test]
    fn submit_error_gives_the_task_back() {
        let e = SubmitError::shutdown(vec![1, 2, 3]);
        assert!(e.is_shutdown());
        assert!(e.to_string().starts_with("cannot submit"));
        assert_eq!(format!("{e:?}"), "SubmitError { kind: Shutdown, .. }");
        assert_eq!(e.into_task(), vec![1, 2, 3]);
    }
}
