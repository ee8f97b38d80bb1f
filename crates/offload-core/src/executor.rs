//! The `Executor` trait: what every backend provides, and what generic code is written against.

use std::sync::Arc;

use crate::map::{Map, MapUnordered};
use crate::{BatchResults, SubmitError, Task, TaskHandle};

/// The handle type of a batch: one result per task, in submission order.
pub type BatchHandle<O> = TaskHandle<BatchResults<O>>;

/// Runs tasks: the one trait behind every backend.
///
/// Write service code against it (`async fn f(ex: &impl Executor)`) and choose the backend
/// where the pool is built; [`Either`] picks one at run time, from configuration.
///
/// Backends implement four methods; [`submit`](Executor::submit), [`map`](Executor::map) and
/// [`map_unordered`](Executor::map_unordered) come with the trait.
pub trait Executor {
    /// Submits a task; gives it back when the executor no longer accepts work.
    ///
    /// # Errors
    ///
    /// [`SubmitError`] (with the task inside) when the executor was shut down.
    fn try_submit<T: Task>(&self, task: T) -> Result<TaskHandle<T::Output>, SubmitError<T>>;

    /// Submits tasks to run as one unit of work (one queue entry, one message), with one
    /// result per task in order. A panic in one task fails only that task's result. `map`
    /// uses this to batch tiny tasks.
    ///
    /// # Errors
    ///
    /// [`SubmitError`] (with the tasks inside) when the executor was shut down.
    fn try_submit_batch<T: Task>(
        &self,
        tasks: Vec<T>,
    ) -> Result<BatchHandle<T::Output>, SubmitError<Vec<T>>>;

    /// How many tasks can run at the same time.
    fn workers(&self) -> usize;

    /// Stops accepting work and lets queued and running tasks finish. Does not block.
    fn shutdown(&self);

    /// Stops accepting work and resolves every queued task's handle with
    /// [`TaskError::Shutdown`](crate::TaskError::Shutdown); running tasks finish. Does not block.
    fn shutdown_now(&self);

    /// Submits a task and returns its handle. On an executor that was shut down, the handle
    /// resolves at once with [`TaskError::Shutdown`](crate::TaskError::Shutdown) (use [`try_submit`](Self::try_submit) to
    /// get the task back instead).
    fn submit<T: Task>(&self, task: T) -> TaskHandle<T::Output> {
        match self.try_submit(task) {
            Ok(handle) => handle,
            Err(e) => TaskHandle::ready(T::NAME, Err(e.into_task_error(T::NAME))),
        }
    }

    /// Runs every task of `tasks` and streams the results **in input order**.
    ///
    /// Tasks are pulled from the iterator only as results are consumed, with at most
    /// a bounded window of work in flight, so mapping an endless iterator runs in bounded
    /// memory. Tiny tasks are batched automatically; see [`Map`] for the knobs.
    fn map<I>(&self, tasks: I) -> Map<'_, Self, I::IntoIter>
    where
        Self: Sized,
        I: IntoIterator,
        I::Item: Task,
    {
        Map::new(self, tasks.into_iter())
    }

    /// Like [`map`](Self::map), but streams `(index, result)` pairs **in completion order**,
    /// so one slow task does not hold back the results behind it.
    fn map_unordered<I>(&self, tasks: I) -> MapUnordered<'_, Self, I::IntoIter>
    where
        Self: Sized,
        I: IntoIterator,
        I::Item: Task,
    {
        MapUnordered::new(self, tasks.into_iter())
    }
}

macro_rules! forward_executor {
    ($($ptr:ty),*) => {$(
        impl<E: Executor + ?Sized> Executor for $ptr {
            fn try_submit<T: Task>(&self, task: T) -> Result<TaskHandle<T::Output>, SubmitError<T>> {
                (**self).try_submit(task)
            }
            fn try_submit_batch<T: Task>(
                &self,
                tasks: Vec<T>,
            ) -> Result<BatchHandle<T::Output>, SubmitError<Vec<T>>> {
                (**self).try_submit_batch(tasks)
            }
            fn workers(&self) -> usize {
                (**self).workers()
            }
            fn shutdown(&self) {
                (**self).shutdown()
            }
            fn shutdown_now(&self) {
                (**self).shutdown_now()
            }
        }
    )*};
}

forward_executor!(&E, Box<E>, Arc<E>);

/// One of two executors, chosen at run time: lets a service pick its backend from
/// configuration and still pass one type around.
///
/// ```
/// # use offload_core::{Either, Executor};
/// # fn demo<A: Executor, B: Executor>(use_b: bool, a: impl FnOnce() -> A, b: impl FnOnce() -> B) {
/// let pool: Either<A, B> = if use_b { Either::Right(b()) } else { Either::Left(a()) };
/// println!("{} workers", pool.workers());
/// # }
/// ```
#[derive(Debug, Clone)]
pub enum Either<L, R> {
    /// The first executor type.
    Left(L),
    /// The second executor type.
    Right(R),
}

impl<L: Executor, R: Executor> Executor for Either<L, R> {
    fn try_submit<T: Task>(&self, task: T) -> Result<TaskHandle<T::Output>, SubmitError<T>> {
        match self {
            Either::Left(e) => e.try_submit(task),
            Either::Right(e) => e.try_submit(task),
        }
    }
    fn try_submit_batch<T: Task>(
        &self,
        tasks: Vec<T>,
    ) -> Result<BatchHandle<T::Output>, SubmitError<Vec<T>>> {
        match self {
            Either::Left(e) => e.try_submit_batch(tasks),
            Either::Right(e) => e.try_submit_batch(tasks),
        }
    }
    fn workers(&self) -> usize {
        match self {
            Either::Left(e) => e.workers(),
            Either::Right(e) => e.workers(),
        }
    }
    fn shutdown(&self) {
        match self {
            Either::Left(e) => e.shutdown(),
            Either::Right(e) => e.shutdown(),
        }
    }
    fn shutdown_now(&self) {
        match self {
            Either::Left(e) => e.shutdown_now(),
            Either::Right(e) => e.shutdown_now(),
        }
    }
}
