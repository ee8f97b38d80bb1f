//! `ThreadPool`: submission, shutdown and joining; the `Executor` implementation.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use offload_core::backend::{self, catch_task_panic, Completer};
use offload_core::{BatchHandle, Executor, SubmitError, Task, TaskError, TaskHandle};

use crate::job::Job;
use crate::queue::Queue;
use crate::ThreadPoolBuilder;

/// A fixed set of OS threads that run tasks and closures.
///
/// Cloning is cheap and shares the pool. When the last clone is dropped the pool shuts down
/// gracefully without blocking: queued tasks still run, their handles resolve, then the
/// threads exit. Call [`join`](Self::join) to wait for that.
///
/// ```
/// use offload_core::Executor;
/// use offload_thread::ThreadPool;
///
/// let pool = ThreadPool::builder().workers(2).build()?;
/// let handle = pool.submit_fn(|| (1..=10).sum::<u32>());
/// assert_eq!(handle.wait(), Ok(55));
/// pool.join();
/// # Ok::<(), offload_thread::BuildError>(())
/// ```
#[derive(Clone)]
pub struct ThreadPool {
    inner: Arc<PoolInner>,
}

pub(crate) struct PoolInner {
    queue: Arc<Queue>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    thread_ids: Vec<ThreadId>,
    workers: usize,
}

impl PoolInner {
    pub(crate) fn new(queue: Arc<Queue>, threads: Vec<JoinHandle<()>>, workers: usize) -> Self {
        PoolInner {
            thread_ids: threads.iter().map(|t| t.thread().id()).collect(),
            threads: Mutex::new(threads),
            queue,
            workers,
        }
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // Graceful and non-blocking: dropping a pool inside an async runtime must not stall
        // it. The threads finish the queue and exit on their own (their handles detach).
        self.queue.close(false);
    }
}

impl ThreadPool {
    /// A pool with the default settings (one thread per available CPU).
    ///
    /// # Errors
    ///
    /// [`BuildError`](crate::BuildError) when a thread cannot be started.
    pub fn new() -> Result<Self, crate::BuildError> {
        ThreadPoolBuilder::new().build()
    }

    /// A builder to choose the number of workers, thread names and an initializer.
    pub fn builder() -> ThreadPoolBuilder {
        ThreadPoolBuilder::new()
    }

    pub(crate) fn from_inner(inner: PoolInner) -> Self {
        ThreadPool {
            inner: Arc::new(inner),
        }
    }

    /// Runs a plain closure on the pool: threads, unlike processes, can run any
    /// `FnOnce + Send`. Everything else works as for tasks: the handle is a future, a panic
    /// becomes [`TaskError::Panicked`], dropping the handle cancels the closure if it has not
    /// started. On a pool that was shut down the handle resolves with
    /// [`TaskError::Shutdown`].
    pub fn submit_fn<F, R>(&self, f: F) -> TaskHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let name = std::any::type_name::<F>();
        self.submit_with(name, f, |f| f)
            .unwrap_or_else(|_| TaskHandle::ready(name, Err(TaskError::shutdown(name))))
    }

    /// Queues `body(value)` as one task named `name`; gives `value` back when the pool is shut
    /// down. The one submission path behind tasks, batches and closures.
    fn submit_with<V, R, F>(
        &self,
        name: &'static str,
        value: V,
        body: impl FnOnce(V) -> F + Send + 'static,
    ) -> Result<TaskHandle<R>, V>
    where
        V: Send + 'static,
        F: FnOnce() -> R,
        R: Send + 'static,
    {
        let (completer, handle) = backend::pair(name);
        match self
            .inner
            .queue
            .try_push(value, move |value| job(completer, move || body(value)()))
        {
            Ok(()) => Ok(handle),
            Err(value) => {
                // Nothing was queued: the handle has no task, dropping it is a no-op.
                drop(handle);
                Err(value)
            }
        }
    }

    /// Shuts the pool down if it is not already (gracefully: queued work still runs), then
    /// blocks until every worker thread has exited.
    ///
    /// # Panics
    ///
    /// When called from one of the pool's own worker threads, which would wait for itself.
    pub fn join(&self) {
        self.join_until(None);
    }

    /// Like [`join`](Self::join), waiting at most `timeout`. Returns true when every worker
    /// thread has exited.
    ///
    /// # Panics
    ///
    /// When called from one of the pool's own worker threads.
    pub fn join_timeout(&self, timeout: Duration) -> bool {
        self.join_until(Some(Instant::now() + timeout))
    }

    fn join_until(&self, deadline: Option<Instant>) -> bool {
        assert!(
            !self.inner.thread_ids.contains(&thread::current().id()),
            "ThreadPool::join called from one of the pool's own threads: it would wait for itself"
        );
        self.inner.queue.close(false);
        if !self.inner.queue.wait_exited(deadline) {
            return false;
        }
        let threads = std::mem::take(
            &mut *self
                .inner
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for thread in threads {
            // Workers never unwind (task panics are caught), so join cannot report a panic.
            let _ = thread.join();
        }
        true
    }

    /// True once the pool stopped accepting work.
    pub fn is_shutdown(&self) -> bool {
        self.inner.queue.is_closed()
    }
}

/// Binds `f` to its completer: the job skips cancelled work, makes the cancel flag current,
/// catches panics (so a job never unwinds), and completes the handle.
fn job<F, R>(completer: Completer<R>, f: F) -> Job
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    Job::new(move || {
        if !completer.start() {
            return;
        }
        let name = completer.task_name();
        let _span = tracing::trace_span!("offload.task", task.name = name).entered();
        let _flag = backend::enter(completer.cancel_flag());
        let result = catch_task_panic(name, f);
        completer.complete(result);
    })
}

impl Executor for ThreadPool {
    fn try_submit<T: Task>(&self, task: T) -> Result<TaskHandle<T::Output>, SubmitError<T>> {
        self.submit_with(T::NAME, task, |task| move || task.run())
            .map_err(SubmitError::shutdown)
    }

    fn try_submit_batch<T: Task>(
        &self,
        tasks: Vec<T>,
    ) -> Result<BatchHandle<T::Output>, SubmitError<Vec<T>>> {
        self.submit_with(T::NAME, tasks, |tasks| {
            move || {
                // Each task fails alone; a cancel stops the tasks not yet started.
                tasks
                    .into_iter()
                    .map(|task| {
                        if offload_core::is_cancelled() {
                            Err(TaskError::cancelled(T::NAME))
                        } else {
                            catch_task_panic(T::NAME, move || task.run())
                        }
                    })
                    .collect::<Vec<_>>()
                    .into()
            }
        })
        .map_err(SubmitError::shutdown)
    }

    fn workers(&self) -> usize {
        self.inner.workers
    }

    fn shutdown(&self) {
        self.inner.queue.close(false);
        tracing::debug!("thread pool shutting down");
    }

    fn shutdown_now(&self) {
        self.inner.queue.close(true);
        tracing::debug!("thread pool shutting down now");
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("workers", &self.inner.workers)
            .field("shutdown", &self.is_shutdown())
            .finish()
    }
}
