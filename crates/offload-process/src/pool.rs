//! `ProcessPool`: submission, shutdown and joining; the `Executor` implementation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use offload_core::backend::{self, attach, Fd};
use offload_core::{BatchHandle, Executor, SubmitError, Task, TaskError, TaskHandle};
use offload_ipc::frame;
use offload_ipc::protocol::Blob;
use offload_ipc::recycle::{Recycler, RECYCLE_MIN};

use crate::job::{self, Job, Payload, TaskOptions};
use crate::lane::{Lanes, Sent, WaitHelp, DIRECT_MAX};
use crate::reactor::Commands;
use crate::scheduler::Command;
use crate::stats::{Board, Published};
use crate::PoolStats;
use crate::ProcessPoolBuilder;

/// Bytes a request adds to its payload on the wire (ids, the task name, lengths).
const REQUEST_OVERHEAD: usize = 1024;

thread_local! {
    /// Where a caller encodes a request it writes to a worker itself, and the descriptors
    /// that go with it.
    static FRAME: std::cell::RefCell<(Vec<u8>, Vec<Fd>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// Where a caller encodes a task (see `ProcessPool::encode`).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most capacity a caller's scratch buffer keeps between tasks.
const SCRATCH_KEEP: usize = 64 * 1024;

/// A task's encoded bytes: in a buffer that may go back to the pool's spares, or already the
/// blob the request sends.
enum Encoded {
    Spare(Vec<u8>),
    Ready(Blob),
}

impl Encoded {
    fn len(&self) -> usize {
        match self {
            Encoded::Spare(bytes) => bytes.len(),
            Encoded::Ready(blob) => blob.len(),
        }
    }
}

/// A pool of worker processes that run [tasks](Task).
///
/// A crash, an `abort()` or a leak in a task takes down only its worker: the task fails with
/// [`TaskError::WorkerCrashed`] and the pool starts a replacement. Workers are re-executions
/// of the running program (or [`worker_program`](ProcessPoolBuilder::worker_program)), which
/// must call `offload::init()` at the top of `main`.
///
/// Cloning is cheap and shares the pool. When the last clone is dropped the pool shuts down
/// gracefully without blocking; [`join`](Self::join) waits for the workers to exit.
#[derive(Clone)]
pub struct ProcessPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    commands: Commands,
    closed: AtomicBool,
    next_id: AtomicU64,
    workers: usize,
    max_frame: usize,
    defaults: TaskOptions,
    stats: Arc<Board>,
    /// Idle workers that callers may write a request to directly.
    lanes: Arc<Lanes>,
    /// Spare buffers for large tasks' encodes.
    recycler: Arc<Recycler>,
    reactor: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // Graceful and non-blocking; the reactor thread reaps the workers on its own.
        let _ = self.commands.send(Command::Shutdown { now: false });
    }
}

impl ProcessPool {
    /// A pool with the default settings (one worker per available CPU).
    ///
    /// # Errors
    ///
    /// See [`ProcessPoolBuilder::build`].
    pub fn new() -> Result<Self, crate::BuildError> {
        ProcessPoolBuilder::new().build()
    }

    /// A builder for the number of workers, the worker program and limits.
    pub fn builder() -> ProcessPoolBuilder {
        ProcessPoolBuilder::new()
    }

    pub(crate) fn new_started(
        commands: Commands,
        reactor: JoinHandle<()>,
        (workers, max_frame, defaults): (usize, usize, TaskOptions),
        stats: Arc<Board>,
        lanes: Arc<Lanes>,
        recycler: Arc<Recycler>,
    ) -> Self {
        ProcessPool {
            inner: Arc::new(PoolInner {
                commands,
                closed: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                workers,
                max_frame,
                defaults,
                stats,
                lanes,
                recycler,
                reactor: Mutex::new(Some(reactor)),
            }),
        }
    }

    /// Submits a task with its own [`TaskOptions`] (timeout, retries) instead of the pool's
    /// defaults. On a pool that was shut down the handle resolves with
    /// [`TaskError::Shutdown`].
    pub fn submit_with<T: Task>(&self, task: T, options: TaskOptions) -> TaskHandle<T::Output> {
        match self.submit_one(task, options) {
            Ok(handle) => handle,
            Err(_) => TaskHandle::ready(T::NAME, Err(TaskError::shutdown(T::NAME))),
        }
    }

    /// What the pool is doing: queued and running requests, completions, failures, crashes,
    /// restarts and live workers.
    pub fn stats(&self) -> PoolStats {
        let mut stats = self.published().stats;
        // Requests callers wrote to idle workers themselves, which the reactor has not taken
        // over yet.
        stats.running += self.inner.lanes.pending();
        // Requests whose callers read their answers themselves.
        stats.completed += self.inner.lanes.direct_completed.load(Ordering::Relaxed);
        stats.failed += self.inner.lanes.direct_failed.load(Ordering::Relaxed);
        stats
    }

    fn published(&self) -> std::sync::MutexGuard<'_, Published> {
        self.inner.stats.lock()
    }

    /// The error for new work on a broken pool: it cannot run tasks, and says why.
    fn broken<O>(&self, name: &'static str) -> Option<TaskHandle<O>> {
        let reason = self.inner.stats.broken()?;
        Some(TaskHandle::ready(
            name,
            Err(TaskError::pool_broken(name, reason)),
        ))
    }

    fn submit_one<T: Task>(
        &self,
        task: T,
        options: TaskOptions,
    ) -> Result<TaskHandle<T::Output>, SubmitError<T>> {
        if self.is_shutdown() {
            return Err(SubmitError::shutdown(task));
        }
        if let Some(handle) = self.broken(T::NAME) {
            return Ok(handle);
        }
        let input = match self.encode(&task) {
            Ok(input) => input,
            Err(e) => return Ok(TaskHandle::ready(T::NAME, Err(e))),
        };
        let id = self.next_id();
        let (job, handle) = job::one(id, T::NAME, input, options, self.canceller(id));
        match self.send_direct(job, options) {
            Ok(Sent::Written(lane)) if self.inner.lanes.direct_reads.enabled => {
                // A blocking wait reads the answer itself (see `reader`).
                let help = WaitHelp::new(Arc::downgrade(&self.inner.lanes), lane, id, T::NAME);
                backend::help_wait(&handle, move |done, deadline| help.run(done, deadline));
            }
            Ok(Sent::Written(_)) => {}
            Ok(Sent::Broken) => {
                let _ = self.inner.commands.send(Command::CheckLanes);
            }
            Err(job) => self.send(job),
        }
        Ok(handle)
    }

    /// Writes a small request straight to an idle worker, when one is free (see `lane`).
    /// Requests with a timeout go through the reactor, which must start their clock.
    fn send_direct(&self, job: Job, options: TaskOptions) -> Result<Sent, Job> {
        if options.timeout.is_some() || !self.inner.lanes.any_open() {
            return Err(job);
        }
        let Payload::One(input) = &job.payload else {
            return Err(job);
        };
        if input.len() + REQUEST_OVERHEAD > DIRECT_MAX {
            return Err(job);
        }
        let message = job.request();
        FRAME.with_borrow_mut(|(frame, fds)| {
            frame.clear();
            fds.clear();
            if frame::encode_with_fds(&message, frame, fds, self.inner.max_frame).is_err() {
                return Err(job);
            }
            // Started here: it cannot have been cancelled yet, nobody else has its handle.
            job.reply.start();
            let sent = self.inner.lanes.send(job, frame, fds);
            fds.clear();
            sent
        })
    }

    /// Shuts the pool down if it is not already (gracefully: queued work still runs), then
    /// blocks until every worker has exited and been reaped.
    pub fn join(&self) {
        self.join_until(None);
    }

    /// Like [`join`](Self::join), waiting at most `timeout`. True when everything exited.
    pub fn join_timeout(&self, timeout: Duration) -> bool {
        self.join_until(Some(Instant::now() + timeout))
    }

    fn join_until(&self, deadline: Option<Instant>) -> bool {
        self.shutdown();
        let mut slot = self
            .inner
            .reactor
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(thread) = slot.as_ref() else {
            return true;
        };
        while !thread.is_finished() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(thread) = slot.take() {
            let _ = thread.join();
        }
        true
    }

    /// True once the pool stopped accepting work.
    pub fn is_shutdown(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A hook that asks the reactor to cancel request `id` where it runs.
    fn canceller(&self, id: u64) -> impl FnOnce() + Send + 'static {
        let commands = self.inner.commands.clone();
        move || {
            let _ = commands.send(Command::Cancel(id));
        }
    }

    fn send(&self, job: Job) {
        // If the reactor is gone the job is dropped here, which resolves its handle with
        // `Shutdown`: nobody waits forever.
        let _ = self.inner.commands.send(Command::Submit(job));
    }

    /// Encodes a task, with the descriptors of values in it that travel beside the bytes, as
    /// the blob the job keeps and its writes share. A large task is encoded into a spare
    /// buffer, when the pool keeps one (it has run large tasks: see `recycle`), and that
    /// buffer goes back to the spares when the job is done with it. Any other is encoded into
    /// this thread's scratch buffer and copied out at its size: inline in the blob when it
    /// is a few bytes (a tiny task then costs no allocation for its input), else into one
    /// allocation, without the reallocations of growing a fresh `Vec`.
    fn encode<T: Task>(&self, task: &T) -> Result<Blob, TaskError> {
        let (bytes, fds) = match self.inner.recycler.take() {
            Some(mut spare) => {
                let (encoded, fds) = attach::collecting(|| backend::encode_into(task, &mut spare));
                let encoded = match encoded {
                    Ok(()) => Ok(Encoded::Spare(spare)),
                    Err(e) => {
                        self.inner.recycler.put(spare);
                        Err(e)
                    }
                };
                (encoded, fds)
            }
            None => {
                // Out of its cell while the task encodes: a `Serialize` impl is user code, and
                // may submit to a pool itself.
                let mut scratch = SCRATCH.take();
                scratch.clear();
                let (encoded, fds) =
                    attach::collecting(|| backend::encode_into(task, &mut scratch));
                let encoded = encoded.map(|()| {
                    if scratch.len() >= RECYCLE_MIN {
                        Encoded::Spare(std::mem::take(&mut scratch))
                    } else if scratch.len() > SCRATCH_KEEP {
                        // Too large to keep as scratch: it becomes the request's buffer as
                        // it is, rather than be copied out and let go.
                        Encoded::Ready(Blob::shared(std::mem::take(&mut scratch)))
                    } else {
                        Encoded::Ready(Blob::shared_copy(&scratch))
                    }
                });
                if scratch.capacity() <= SCRATCH_KEEP {
                    SCRATCH.set(scratch);
                }
                (encoded, fds)
            }
        };
        let bytes = bytes.map_err(|e| TaskError::serialization(T::NAME, e))?;
        let limit = self.inner.max_frame.saturating_sub(REQUEST_OVERHEAD);
        let refused = check_fds(T::NAME, fds.len(), "").and_then(|()| {
            if bytes.len() <= limit {
                return Ok(());
            }
            Err(TaskError::serialization(
                T::NAME,
                format!(
                    "the task is {} bytes, over the pool's max_frame_size of {} bytes",
                    bytes.len(),
                    self.inner.max_frame
                ),
            ))
        });
        if let Err(e) = refused {
            if let Encoded::Spare(spare) = bytes {
                // It serves the next task instead.
                self.inner.recycler.put(spare);
            }
            return Err(e);
        }
        let blob = match bytes {
            // A small task in a spare buffer: its bytes are copied out, and the buffer kept
            // for a large one.
            Encoded::Spare(spare) if spare.len() < RECYCLE_MIN => {
                let blob = Blob::shared_copy(&spare);
                self.inner.recycler.put(spare);
                blob
            }
            Encoded::Spare(spare) => Blob::recycled(spare, &self.inner.recycler),
            Encoded::Ready(blob) => blob,
        };
        Ok(blob.with_fds(fds))
    }
}

/// A request may carry at most [`frame::MAX_FDS_PER_MESSAGE`] descriptors (shared buffers):
/// refused at submit, with `hint`, rather than failing the worker that would receive them.
fn check_fds(name: &'static str, count: usize, hint: &str) -> Result<(), TaskError> {
    if count <= frame::MAX_FDS_PER_MESSAGE {
        return Ok(());
    }
    Err(TaskError::serialization(
        name,
        format!(
            "the request holds {count} shared buffers, over the limit of {} per request{hint}",
            frame::MAX_FDS_PER_MESSAGE
        ),
    ))
}

impl Executor for ProcessPool {
    fn try_submit<T: Task>(&self, task: T) -> Result<TaskHandle<T::Output>, SubmitError<T>> {
        self.submit_one(task, self.inner.defaults)
    }

    fn try_submit_batch<T: Task>(
        &self,
        tasks: Vec<T>,
    ) -> Result<BatchHandle<T::Output>, SubmitError<Vec<T>>> {
        if self.is_shutdown() {
            return Err(SubmitError::shutdown(tasks));
        }
        if let Some(handle) = self.broken(T::NAME) {
            return Ok(handle);
        }
        let Ok(count) = u32::try_from(tasks.len()) else {
            let e = TaskError::serialization(T::NAME, "a batch holds at most 2^32 - 1 tasks");
            return Ok(TaskHandle::ready(T::NAME, Err(e)));
        };
        // One buffer for the whole batch: no allocation per task on either side.
        let mut inputs = Vec::new();
        let (packed, fds) = attach::collecting(|| offload_core::backend::pack(&tasks, &mut inputs));
        if let Err(e) = packed {
            return Ok(TaskHandle::ready(
                T::NAME,
                Err(TaskError::serialization(T::NAME, e)),
            ));
        }
        if let Err(e) = check_fds(T::NAME, fds.len(), "; use a smaller chunk_size") {
            return Ok(TaskHandle::ready(T::NAME, Err(e)));
        }
        if inputs.len() + REQUEST_OVERHEAD > self.inner.max_frame {
            let e = TaskError::serialization(
                T::NAME,
                format!(
                    "the batch is {} bytes, over the pool's max_frame_size of {} bytes; \
                     use a smaller chunk_size",
                    inputs.len(),
                    self.inner.max_frame
                ),
            );
            return Ok(TaskHandle::ready(T::NAME, Err(e)));
        }
        let id = self.next_id();
        let (job, handle) = job::batch(
            id,
            T::NAME,
            count,
            Blob::shared(inputs).with_fds(fds),
            self.inner.defaults,
            self.canceller(id),
        );
        self.send(job);
        Ok(handle)
    }

    /// The most workers the pool runs at once: its size, or `max_workers` when elastic (so
    /// `map` keeps enough work in flight for the pool to grow).
    fn workers(&self) -> usize {
        self.inner.workers
    }

    fn shutdown(&self) {
        if !self.inner.closed.swap(true, Ordering::AcqRel) {
            let _ = self.inner.commands.send(Command::Shutdown { now: false });
        }
    }

    fn shutdown_now(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let _ = self.inner.commands.send(Command::Shutdown { now: true });
    }
}

impl std::fmt::Debug for ProcessPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessPool")
            .field("workers", &self.inner.workers)
            .field("shutdown", &self.is_shutdown())
            .finish()
    }
}
