//! The unit of work: a serializable value with a stable name.

use serde::{de::DeserializeOwned, Serialize};

/// A unit of work that any [`Executor`](crate::Executor) can run.
///
/// Closures cannot cross a process boundary, so work is described by a value: the task's
/// fields are its arguments, [`run`](Task::run) is its body, and [`NAME`](Task::NAME) is how a
/// worker process finds the code to run. The same task type runs unchanged on every backend.
///
/// Write tasks with the `#[offload::task]` attribute on a function, which generates the type
/// and registers it. Implement the trait by hand only for a type of your own, and register it
/// with [`register_task!`](crate::register_task) so that process workers can find it.
///
/// A fallible task returns `Result<T, E>` with a serializable `E`: that result reaches the
/// caller unchanged, separate from the framework's own [`TaskError`](crate::TaskError).
///
/// # Example
///
/// ```
/// use offload_core::Task;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Square(u64);
///
/// impl Task for Square {
///     type Output = u64;
///     const NAME: &'static str = "docs::Square";
///     fn run(self) -> u64 {
///         self.0 * self.0
///     }
/// }
/// offload_core::register_task!(Square);
///
/// assert_eq!(Square(7).run(), 49);
/// ```
pub trait Task: Serialize + DeserializeOwned + Send + 'static {
    /// What the task returns to the caller.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// The task's stable name on the wire: module path and function name for tasks made by
    /// `#[offload::task]`. Two registered tasks must not share a name.
    const NAME: &'static str;

    /// Runs the task. Called on a worker thread or in a worker process, never on the caller's.
    fn run(self) -> Self::Output;
}
