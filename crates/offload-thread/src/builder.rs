//! `ThreadPoolBuilder` and the errors of building a pool.

use std::num::NonZeroUsize;
use std::sync::{mpsc, Arc};
use std::time::Duration;
use std::{fmt, io, thread};

use offload_core::backend::catch_task_panic;

use crate::pool::{PoolInner, ThreadPool};
use crate::queue::{run_worker, LiveGuard, Queue};

type Initializer = Arc<dyn Fn() + Send + Sync>;

/// See [`ThreadPoolBuilder::spin`]: 3-7 µs measured alike on two cores; 10 µs slowed round
/// trips threefold.
const DEFAULT_SPIN: Duration = Duration::from_micros(5);

/// Configures and builds a [`ThreadPool`].
///
/// ```
/// use offload_thread::ThreadPool;
///
/// let pool = ThreadPool::builder()
///     .workers(2)
///     .thread_name("resize")
///     .initializer(|| println!("worker thread ready"))
///     .build()?;
/// # Ok::<(), offload_thread::BuildError>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct ThreadPoolBuilder {
    workers: Option<usize>,
    thread_name: String,
    initializer: Option<Initializer>,
    spin: Duration,
}

impl Default for ThreadPoolBuilder {
    fn default() -> Self {
        ThreadPoolBuilder {
            workers: None,
            thread_name: "offload-worker".to_owned(),
            initializer: None,
            spin: DEFAULT_SPIN,
        }
    }
}

impl ThreadPoolBuilder {
    /// A builder with the defaults: one worker per available CPU, threads named
    /// `offload-worker-N`, no initializer, a spin of 5 µs.
    pub fn new() -> Self {
        ThreadPoolBuilder::default()
    }

    /// Number of worker threads. Default: [`std::thread::available_parallelism`].
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Prefix of the worker threads' names: threads are called `{prefix}-0`, `{prefix}-1`, ...
    /// (Linux shows the first 15 bytes in tools such as `top`).
    pub fn thread_name(mut self, prefix: impl Into<String>) -> Self {
        self.thread_name = prefix.into();
        self
    }

    /// Runs `init` on each worker thread before it takes its first task, like the
    /// `initializer` of Python's executors (to warm a cache, set a thread-local, ...).
    /// [`build`](Self::build) waits for every initializer and fails if one panics.
    pub fn initializer(mut self, init: impl Fn() + Send + Sync + 'static) -> Self {
        self.initializer = Some(Arc::new(init));
        self
    }

    /// How long a worker that runs out of work keeps looking for more before it sleeps.
    /// Default: 5 µs.
    ///
    /// Waking a sleeping thread costs the submitter a system call (a few µs), so during a
    /// burst of small tasks a worker that sleeps between tasks makes every submission slow.
    /// A worker that looks for work a little longer, yielding its CPU between looks, is still
    /// awake when the next task comes. Longer is not better: on two cores, with 10 µs or more
    /// the idle workers held the CPUs that a woken caller needed, and a round trip took 16 µs
    /// instead of 5 (see `docs/benchmarks.md`). `Duration::ZERO` makes idle workers sleep at
    /// once.
    pub fn spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }

    /// Starts the worker threads and waits until each has run the initializer.
    ///
    /// # Errors
    ///
    /// [`BuildError::ZeroWorkers`] for `workers(0)`; [`BuildError::Spawn`] when the OS refuses
    /// a thread; [`BuildError::Initializer`] when the initializer panics. On error every
    /// thread already started is stopped and joined.
    pub fn build(self) -> Result<ThreadPool, BuildError> {
        let workers = match self.workers {
            Some(0) => return Err(BuildError::ZeroWorkers),
            Some(n) => n,
            None => thread::available_parallelism().map_or(1, NonZeroUsize::get),
        };
        let queue = Arc::new(Queue::default());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let mut threads = Vec::with_capacity(workers);
        for index in 0..workers {
            let queue_for_worker = queue.clone();
            let ready = ready_tx.clone();
            let init = self.initializer.clone();
            let spin = self.spin;
            queue.add_worker();
            let spawned = thread::Builder::new()
                .name(format!("{}-{index}", self.thread_name))
                .spawn(move || {
                    let queue = &*queue_for_worker;
                    let _live = LiveGuard(queue);
                    let init_result = match init {
                        Some(init) => catch_task_panic("initializer", || init()),
                        None => Ok(()),
                    };
                    let ok = init_result.is_ok();
                    let _ =
                        ready.send(init_result.map_err(|e| {
                            e.panic_message().unwrap_or("initializer failed").to_owned()
                        }));
                    if ok {
                        run_worker(queue, spin);
                    }
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(source) => {
                    // The thread never started, so it never counts itself out.
                    queue.worker_exited();
                    stop(&queue, threads);
                    return Err(BuildError::Spawn { index, source });
                }
            }
        }
        drop(ready_tx);
        let mut failure = None;
        for index in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    failure.get_or_insert(BuildError::Initializer { index, message });
                }
                // A worker thread ended without reporting: only possible if it was torn down
                // by the runtime; report it rather than wait.
                Err(mpsc::RecvError) => {
                    failure.get_or_insert(BuildError::Initializer {
                        index,
                        message: "the worker thread ended before reporting".to_owned(),
                    });
                    break;
                }
            }
        }
        if let Some(error) = failure {
            stop(&queue, threads);
            return Err(error);
        }
        tracing::debug!(workers, prefix = %self.thread_name, "thread pool started");
        Ok(ThreadPool::from_inner(PoolInner::new(
            queue, threads, workers,
        )))
    }
}

fn stop(queue: &Queue, threads: Vec<thread::JoinHandle<()>>) {
    queue.close(true);
    for thread in threads {
        let _ = thread.join();
    }
}

impl fmt::Debug for ThreadPoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadPoolBuilder")
            .field("workers", &self.workers)
            .field("thread_name", &self.thread_name)
            .field("initializer", &self.initializer.is_some())
            .field("spin", &self.spin)
            .finish()
    }
}

/// Why a [`ThreadPool`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// `workers(0)`: a pool needs at least one thread.
    #[error("a thread pool needs at least one worker; use workers(1) or more")]
    ZeroWorkers,
    /// The OS refused to start a thread.
    #[error("could not start worker thread {index}: {source}")]
    Spawn {
        /// Which worker.
        index: usize,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The initializer panicked on a worker thread.
    #[error("the pool initializer panicked on worker thread {index}: {message}")]
    Initializer {
        /// Which worker.
        index: usize,
        /// The panic message.
        message: String,
    },
}
