//! `ProcessPoolBuilder` and the errors of building a process pool.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use offload_ipc::frame::DEFAULT_MAX_FRAME;
use offload_ipc::handshake::new_token;
use offload_ipc::transport::{new_socket_name, worker_socket_from_env};

use std::sync::Arc;

use offload_core::Task;
use offload_ipc::protocol::Blob;

use crate::job::{check_init, InitOutput, Initializer, TaskOptions};
use crate::pool::ProcessPool;
use crate::reactor;
use crate::scheduler::Settings;

/// Configures and builds a [`ProcessPool`].
///
/// ```no_run
/// let pool = offload_process::ProcessPool::builder()
///     .workers(4)
///     .build()?;
/// # Ok::<(), offload_process::BuildError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct ProcessPoolBuilder {
    workers: Option<usize>,
    max_workers: Option<usize>,
    idle_timeout: Duration,
    program: Option<PathBuf>,
    window: Option<usize>,
    max_frame: usize,
    startup_timeout: Duration,
    cancel_grace: Duration,
    max_tasks_per_worker: Option<u64>,
    initializer: Option<Result<Initializer, String>>,
    memory_limit: Option<u64>,
    spin: Duration,
    defaults: TaskOptions,
}

impl Default for ProcessPoolBuilder {
    fn default() -> Self {
        ProcessPoolBuilder {
            workers: None,
            max_workers: None,
            idle_timeout: Duration::from_secs(60),
            program: None,
            window: None,
            max_frame: DEFAULT_MAX_FRAME,
            startup_timeout: Duration::from_secs(10),
            cancel_grace: Duration::from_secs(1),
            max_tasks_per_worker: None,
            initializer: None,
            memory_limit: None,
            spin: Duration::ZERO,
            defaults: TaskOptions::default(),
        }
    }
}

impl ProcessPoolBuilder {
    /// A builder with the defaults: one worker per available CPU, re-executing this program.
    pub fn new() -> Self {
        ProcessPoolBuilder::default()
    }

    /// Number of worker processes (the minimum, with [`max_workers`](Self::max_workers)).
    /// Default: [`std::thread::available_parallelism`].
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Lets the pool grow on demand: it keeps [`workers`](Self::workers) processes running
    /// (its minimum) and starts more, up to `max`, while tasks wait and every worker is busy.
    /// Extra workers exit after [`idle_timeout`](Self::idle_timeout) without work.
    pub fn max_workers(mut self, max: usize) -> Self {
        self.max_workers = Some(max);
        self
    }

    /// How long a worker beyond the minimum may sit idle before it exits (default 60 s).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Runs workers from this program instead of re-executing the current one. It must call
    /// `offload::init()` at the top of `main` and link the tasks it is sent.
    pub fn worker_program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }

    /// Fixes the number of requests in flight per worker. By default it adapts: about a
    /// millisecond of work per worker at the measured task length, from 2 (long tasks, which
    /// should not queue behind each other on one worker) to 64 (tiny tasks, whose round trips
    /// it hides).
    pub fn in_flight_per_worker(mut self, requests: usize) -> Self {
        self.window = Some(requests.max(1));
        self
    }

    /// The largest message accepted on a worker connection (default 256 MiB). Larger task
    /// arguments or outputs fail with a serialization error; a peer that sends more is cut off.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// How long `build` waits for every worker to connect (default 10 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// After cancelling a running task (by `cancel()` or dropping its handle), how long the
    /// task has to notice ([`is_cancelled`](offload_core::is_cancelled)) and return before its
    /// worker is killed and replaced (default 1 s). The handle resolves at once either way.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = grace;
        self
    }

    /// Replaces each worker after it has served `requests` requests (a `map` batch counts as
    /// one), like Python's `max_tasks_per_child`: bounds what a leaky task can accumulate.
    /// Queued work is neither lost nor run twice; the replacement starts at once.
    pub fn max_tasks_per_worker(mut self, requests: u64) -> Self {
        self.max_tasks_per_worker = Some(requests.max(1));
        self
    }

    /// Runs `task` in each worker before its first task (to load a model, warm a cache, ...).
    /// It may return `()` or `Result<(), E>`; a panic or an `Err` is a failure. A failure at
    /// startup fails [`build`](Self::build); later, 3 failures in a row break the pool
    /// (every queued and later task fails with [`TaskError::PoolBroken`](offload_core::TaskError))
    /// instead of crash-looping.
    pub fn initializer<T>(mut self, task: T) -> Self
    where
        T: Task,
        T::Output: InitOutput,
    {
        self.initializer = Some(
            offload_core::encode(&task)
                .map(|bytes| Initializer {
                    name: T::NAME,
                    input: Blob::new(bytes),
                    check: check_init::<T::Output>,
                })
                .map_err(|e| format!("the initializer `{}` does not serialize: {e}", T::NAME)),
        );
        self
    }

    /// Caps each worker's heap at `bytes` (Linux: `RLIMIT_DATA`). A task that allocates past
    /// it kills its worker; the task fails with a crash error that names the limit, and the
    /// worker is replaced.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Low-latency mode: after each message, an idle worker keeps polling its socket for up
    /// to `spin` before it blocks, so a short round trip does not pay for putting it to sleep
    /// and waking it (see `docs/benchmarks.md` for the figures). It costs CPU: up to `spin` of
    /// busy polling per worker each time it goes idle. Off by default; about 100 µs suits
    /// services that submit one task at a time and care about its latency. Only the workers
    /// spin: on two cores, spinning the pool's I/O thread (or the caller) as well made round
    /// trips two to three times slower, busy threads taking the CPU from the ones with work.
    pub fn spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }

    /// The default timeout of every task (see [`TaskOptions::timeout`]); none by default.
    pub fn task_timeout(mut self, timeout: Duration) -> Self {
        self.defaults.timeout = Some(timeout);
        self
    }

    /// The default number of retries of every task (see [`TaskOptions::retries`]); 0 by
    /// default. Only for idempotent tasks.
    pub fn retries(mut self, retries: u32) -> Self {
        self.defaults.retries = retries;
        self
    }

    /// Starts the workers and waits until every one has connected and passed the handshake.
    ///
    /// # Errors
    ///
    /// [`BuildError::ZeroWorkers`]; [`BuildError::InsideWorker`] when called in a process
    /// that was started as a worker but did not call `offload::init()`;
    /// [`BuildError::Startup`] when a worker exits or is refused before connecting (the error
    /// says how it ended) or the workers do not connect in time; [`BuildError::Io`] when the
    /// socket or the I/O thread cannot be created.
    pub fn build(self) -> Result<ProcessPool, BuildError> {
        if worker_socket_from_env().is_some() {
            return Err(BuildError::InsideWorker);
        }
        let workers = match self.workers {
            Some(0) => return Err(BuildError::ZeroWorkers),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        };
        let program = match self.program {
            Some(program) => program,
            None => current_program()?,
        };
        let initializer = self.initializer.transpose().map_err(BuildError::Startup)?;
        let token = new_token().map_err(BuildError::Io)?;
        let socket = new_socket_name().map_err(BuildError::Io)?;
        let max_workers = self.max_workers.unwrap_or(workers).max(workers);
        let settings = Settings {
            program,
            workers,
            max_workers,
            idle_timeout: self.idle_timeout,
            window: self.window,
            socket,
            token,
            cancel_grace: self.cancel_grace,
            max_requests_per_worker: self.max_tasks_per_worker,
            initializer,
            memory_limit: self.memory_limit,
            spin: self.spin,
            recycler: Arc::default(),
        };
        let recycler = settings.recycler.clone();
        let direct_reads = crate::lane::DirectReads {
            enabled: self.max_tasks_per_worker.is_none(),
            notify: max_workers > workers,
        };
        let stats = Arc::new(crate::stats::Board::default());
        let lanes = Arc::new(crate::lane::Lanes::new(direct_reads));
        let (commands, thread) = reactor::start(
            settings,
            self.max_frame,
            self.startup_timeout,
            stats.clone(),
            lanes.clone(),
        )?;
        tracing::debug!(workers, "process pool started");
        let watch = commands.clone();
        recycler.on_kept(move || {
            let _ = watch.send(crate::scheduler::Command::WatchSpares);
        });
        Ok(ProcessPool::new_started(
            commands,
            thread,
            (max_workers, self.max_frame, self.defaults),
            stats,
            lanes,
            recycler,
        ))
    }
}

/// The running program. On Linux `/proc/self/exe`, which stays the binary this process runs
/// even if the file on disk is replaced during an upgrade.
fn current_program() -> Result<PathBuf, BuildError> {
    if cfg!(target_os = "linux") {
        Ok(PathBuf::from("/proc/self/exe"))
    } else {
        std::env::current_exe().map_err(BuildError::Io)
    }
}

/// Why a [`ProcessPool`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// `workers(0)`: a pool needs at least one process.
    #[error("a process pool needs at least one worker; use workers(1) or more")]
    ZeroWorkers,
    /// This process was started as a worker, yet it is building a pool: `main` did not call
    /// `offload::init()` first. Refusing avoids an endless cascade of processes.
    #[error(
        "this process was started as an offload worker but is building a pool: call \
         offload::init() at the top of main, before anything else"
    )]
    InsideWorker,
    /// The workers could not be started or did not connect.
    #[error("the process pool could not start: {0}")]
    Startup(String),
    /// The OS refused a socket, a thread or a random number.
    #[error("the process pool could not start: {0}")]
    Io(#[source] std::io::Error),
}
