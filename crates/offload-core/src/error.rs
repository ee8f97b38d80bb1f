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
    /// The worker process running the task died (it exited, aborted, or was killed). Only
    /// the task(s) it held fail; the pool starts a replacement (unless it is shutting down,
    /// or has more workers than its base size).
    #[error(
        "worker {pid} {status} while running `{task}`{}; {}",
        attempts_note(*.attempts),
        if *.replaced { "the pool started a replacement" } else { NOT_REPLACED }
    )]
    #[non_exhaustive]
    WorkerCrashed {
        /// The task's name.
        task: &'static str,
        /// The worker's process id.
        pid: u32,
        /// How it ended, in words: "was killed by signal 9 (SIGKILL)", "exited with code 3".
        status: String,
        /// The signal that killed it, if any.
        signal: Option<i32>,
        /// Its exit code, if it exited.
        code: Option<i32>,
        /// How many times the task was run (more than 1 with retries).
        attempts: u32,
        /// Whether the pool started a worker in its place.
        replaced: bool,
    },
    /// The task ran longer than its timeout; its worker was killed (and replaced, unless the
    /// pool is shutting down or has more workers than its base size).
    #[error(
        "task `{task}` ran longer than its timeout of {timeout:?}{}; its worker was killed{}",
        attempts_note(*.attempts),
        if *.replaced { " and replaced" } else { " (no replacement was started: the pool is shutting down or has workers enough)" }
    )]
    #[non_exhaustive]
    TimedOut {
        /// The task's name.
        task: &'static str,
        /// The timeout it exceeded.
        timeout: std::time::Duration,
        /// How many times the task was run (more than 1 with retries).
        attempts: u32,
        /// Whether the pool started a worker in its place.
        replaced: bool,
    },
    /// No task of this name is registered in the worker program.
    #[error("task `{task}` is not registered in the worker program; define it with #[offload::task] (or register_task!) in code the worker links")]
    #[non_exhaustive]
    UnknownTask {
        /// The task's name.
        task: &'static str,
    },
    /// The pool cannot run tasks any more: its workers cannot be started.
    #[error("task `{task}` was not run: the pool is broken ({reason}); fix the cause and build a new pool")]
    #[non_exhaustive]
    PoolBroken {
        /// The task's name.
        task: &'static str,
        /// Why the workers cannot be started.
        reason: String,
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

/// The end of a crash message when no worker was started in the dead one's place.
const NOT_REPLACED: &str =
    "no replacement was started (the pool is shutting down or has workers enough)";

fn attempts_note(attempts: u32) -> String {
    if attempts > 1 {
        format!(" (after {attempts} attempts)")
    } else {
        String::new()
    }
}

impl TaskError {
    /// The name of the task this error belongs to.
    pub fn task_name(&self) -> &'static str {
        match self {
            TaskError::Cancelled { task }
            | TaskError::Panicked { task, .. }
            | TaskError::Shutdown { task }
            | TaskError::WorkerCrashed { task, .. }
            | TaskError::TimedOut { task, .. }
            | TaskError::UnknownTask { task }
            | TaskError::PoolBroken { task, .. }
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

    /// True when the task ran longer than its timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, TaskError::TimedOut { .. })
    }

    /// True when the worker process running the task died.
    pub fn is_worker_crash(&self) -> bool {
        matches!(self, TaskError::WorkerCrashed { .. })
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

    /// A crash error for `task`: worker `pid` ended as `status` says (see
    /// [`TaskError::WorkerCrashed`]).
    pub fn worker_crashed(
        task: &'static str,
        pid: u32,
        status: impl Into<String>,
        signal: Option<i32>,
        code: Option<i32>,
    ) -> Self {
        TaskError::WorkerCrashed {
            task,
            pid,
            status: status.into(),
            signal,
            code,
            attempts: 1,
            replaced: true,
        }
    }

    /// A timeout error for `task`.
    pub fn timed_out(task: &'static str, timeout: std::time::Duration) -> Self {
        TaskError::TimedOut {
            task,
            timeout,
            attempts: 1,
            replaced: true,
        }
    }

    /// The same error, saying whether the pool started a worker in place of the one that
    /// died (for crash and timeout errors; others are returned unchanged).
    pub fn with_replaced(mut self, yes: bool) -> Self {
        if let TaskError::WorkerCrashed { replaced, .. } | TaskError::TimedOut { replaced, .. } =
            &mut self
        {
            *replaced = yes;
        }
        self
    }

    /// The same error, saying the task was run `attempts` times (for crash and timeout
    /// errors; others are returned unchanged).
    pub fn with_attempts(mut self, n: u32) -> Self {
        if let TaskError::WorkerCrashed { attempts, .. } | TaskError::TimedOut { attempts, .. } =
            &mut self
        {
            *attempts = n;
        }
        self
    }

    /// A broken-pool error for `task`.
    pub fn pool_broken(task: &'static str, reason: impl Into<String>) -> Self {
        TaskError::PoolBroken {
            task,
            reason: reason.into(),
        }
    }

    /// An unknown-task error for `task`.
    pub fn unknown_task(task: &'static str) -> Self {
        TaskError::UnknownTask { task }
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
            TaskError::worker_crashed("m::f", 7, "was killed by signal 9 (SIGKILL)", Some(9), None),
            TaskError::unknown_task("m::f"),
            TaskError::pool_broken("m::f", "worker program not found"),
            TaskError::timed_out("m::f", std::time::Duration::from_millis(5)),
        ];
        for e in errors {
            let text = e.to_string();
            assert!(text.contains("`m::f`"), "{text}");
            assert!(!text.ends_with('.'), "{text}");
            assert_eq!(e.task_name(), "m::f");
        }
        assert_eq!(
            TaskError::panicked("m::f", "boom").to_string(),
            "task `m::f` panicked: boom"
        );
        let crash = TaskError::worker_crashed("m::f", 7, "exited with code 3", None, Some(3));
        assert!(crash.is_worker_crash());
        assert_eq!(
            crash.clone().with_attempts(3).to_string(),
            "worker 7 exited with code 3 while running `m::f` (after 3 attempts); the pool \
             started a replacement"
        );
        let timeout = TaskError::timed_out("m::f", std::time::Duration::from_secs(2));
        assert!(timeout.is_timeout());
        assert_eq!(
            timeout.to_string(),
            "task `m::f` ran longer than its timeout of 2s; its worker was killed and replaced"
        );
        assert_eq!(
            crash.to_string(),
            "worker 7 exited with code 3 while running `m::f`; the pool started a replacement"
        );
        assert_eq!(
            crash.with_replaced(false).to_string(),
            "worker 7 exited with code 3 while running `m::f`; no replacement was started (the \
             pool is shutting down or has workers enough)"
        );
        assert!(timeout
            .with_replaced(false)
            .to_string()
            .ends_with("its worker was killed (no replacement was started: the pool is shutting down or has workers enough)"));
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
