//! A submitted task on its way through the pool, with its type erased: the scheduler moves
//! bytes, and only the [`Reply`] knows the output type to decode.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use offload_core::backend::Completer;
use offload_core::backend::{attach, unpack_results};
use offload_core::{BatchResults, TaskError, TaskHandle};
use offload_ipc::protocol::{Blob, ToWorker, WireError};
use serde::de::DeserializeOwned;

/// Identifies a request on the wire; unique within a pool.
pub(crate) type RequestId = u64;

/// A map keyed by request ids or process ids, hashed with one multiply. Both kinds of key are
/// the pool's own or the kernel's, never chosen by an adversary, so std's SipHash (which
/// resists chosen keys) buys nothing here, and the scheduler hashes several times per answer.
pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// The hasher of [`IdMap`]: a multiply by an odd constant (as `FxHash`), which spreads
/// consecutive ids over a table's buckets and gives its top bits a mix of all of the key.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// The task(s) of a job, encoded. Cloning shares the bytes: a job keeps its payload until it
/// completes, to run it again if its worker is replaced before it started (or, with retries,
/// after a crash).
#[derive(Clone)]
pub(crate) enum Payload {
    One(Blob),
    /// `count` tasks packed back to back.
    Batch {
        count: u32,
        inputs: Blob,
    },
}

/// How a job ended, as the scheduler sees it.
pub(crate) enum Outcome {
    One(Result<Blob, WireError>),
    /// Packed results, one per task, of which `failed` are errors.
    Batch {
        failed: u32,
        outputs: Blob,
    },
    Failed(Failure),
}

/// A failure of the pool rather than of the task.
#[derive(Clone)]
pub(crate) enum Failure {
    Crashed {
        pid: u32,
        status: String,
        signal: Option<i32>,
        code: Option<i32>,
        /// Whether the pool started a worker in its place.
        replaced: bool,
    },
    /// The timeout, and whether the pool started a worker in place of the one killed.
    TimedOut(Duration, bool),
    Broken(String),
}

impl Failure {
    fn into_error(self, name: &'static str, attempts: u32) -> TaskError {
        match self {
            Failure::Crashed {
                pid,
                status,
                signal,
                code,
                replaced,
            } => TaskError::worker_crashed(name, pid, status, signal, code).with_replaced(replaced),
            Failure::TimedOut(after, replaced) => {
                TaskError::timed_out(name, after).with_replaced(replaced)
            }
            Failure::Broken(reason) => TaskError::pool_broken(name, reason),
        }
        .with_attempts(attempts)
    }
}

/// Per-task settings (the pool's defaults unless `submit_with` says otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskOptions {
    /// Longest the task may run; past it the worker is killed and the task fails with
    /// [`TaskError::TimedOut`].
    pub timeout: Option<Duration>,
    /// How many times to run the task again if its worker crashes or it times out. Only for
    /// idempotent tasks: a retried task may have done part of its work already (and finds
    /// what it wrote into a `SharedBuf` argument: the retry maps the same memory).
    pub retries: u32,
}

impl TaskOptions {
    /// No timeout, no retries.
    pub fn new() -> Self {
        TaskOptions::default()
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the number of retries.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
}

/// The typed end of a job: starts and completes its handle.
pub(crate) trait Reply: Send {
    /// Marks the task running; false when it was cancelled while queued.
    fn start(&self) -> bool;
    /// Completes the handle; `attempts` is how many times the task was run.
    fn finish(self: Box<Self>, outcome: Outcome, attempts: u32);
}

pub(crate) struct Job {
    pub(crate) id: RequestId,
    pub(crate) name: &'static str,
    pub(crate) payload: Payload,
    pub(crate) reply: Box<dyn Reply>,
    pub(crate) options: TaskOptions,
    /// Runs that ended in a crash or a timeout.
    pub(crate) attempts: u32,
}

impl Job {
    /// The request that runs this job on a worker.
    pub(crate) fn request(&self) -> ToWorker {
        match &self.payload {
            Payload::One(input) => ToWorker::Run {
                id: self.id,
                task: self.name.into(),
                input: input.clone(),
            },
            Payload::Batch { count, inputs } => ToWorker::RunBatch {
                id: self.id,
                task: self.name.into(),
                count: *count,
                inputs: inputs.clone(),
            },
        }
    }

    pub(crate) fn finish(self, outcome: Outcome) {
        let Job {
            payload,
            reply,
            attempts,
            ..
        } = self;
        // Released before the caller is woken: a caller that checks right away finds the
        // task's memory (and shared buffers) given back, not still held by the pool.
        drop(payload);
        reply.finish(outcome, attempts);
    }
}

fn decode<T: DeserializeOwned>(
    name: &'static str,
    output: Result<Blob, WireError>,
) -> Result<T, TaskError> {
    match output {
        Ok(blob) => attach::decode_with_fds(blob.as_bytes(), blob.fds())
            .map_err(|e| TaskError::serialization(name, e)),
        Err(e) => Err(e.into_task_error(name)),
    }
}

struct OneReply<T>(Completer<T>);

impl<T: DeserializeOwned + Send + 'static> Reply for OneReply<T> {
    fn start(&self) -> bool {
        self.0.start()
    }

    fn finish(self: Box<Self>, outcome: Outcome, attempts: u32) {
        let name = self.0.task_name();
        let result = match outcome {
            Outcome::One(output) => decode(name, output),
            Outcome::Failed(failure) => Err(failure.into_error(name, attempts)),
            Outcome::Batch { .. } => Err(TaskError::serialization(
                name,
                "a batch answer to a single task",
            )),
        };
        self.0.complete(result);
    }
}

/// The handle of a batch, and how many tasks it holds.
struct BatchReply<T>(Completer<BatchResults<T>>, usize);

impl<T: DeserializeOwned + Send + 'static> Reply for BatchReply<T> {
    fn start(&self) -> bool {
        self.0.start()
    }

    fn finish(self: Box<Self>, outcome: Outcome, attempts: u32) {
        let name = self.0.task_name();
        let result = match outcome {
            // The worker answers with as many results as it was given tasks; should it not,
            // the missing ones become errors.
            Outcome::Batch { outputs, .. } => {
                let fds = outputs.fds().to_vec();
                Ok(unpack_results(name, outputs.into_vec(), fds, self.1))
            }
            Outcome::Failed(failure) => Err(failure.into_error(name, attempts)),
            Outcome::One(_) => Err(TaskError::serialization(name, "a single answer to a batch")),
        };
        self.0.complete(result);
    }
}

/// A job for one task, and its handle. `on_cancel` runs if the caller cancels it.
pub(crate) fn one<T: DeserializeOwned + Send + 'static>(
    id: RequestId,
    name: &'static str,
    input: Blob,
    options: TaskOptions,
    on_cancel: impl FnOnce() + Send + 'static,
) -> (Job, TaskHandle<T>) {
    let (completer, handle) = offload_core::backend::pair_with_cancel(name, on_cancel);
    let job = Job {
        id,
        name,
        payload: Payload::One(input),
        reply: Box::new(OneReply(completer)),
        options,
        attempts: 0,
    };
    (job, handle)
}

/// A job for a batch of `count` tasks packed in `inputs`, and its handle. `on_cancel` runs if
/// the caller cancels it.
pub(crate) fn batch<T: DeserializeOwned + Send + 'static>(
    id: RequestId,
    name: &'static str,
    count: u32,
    inputs: Blob,
    options: TaskOptions,
    on_cancel: impl FnOnce() + Send + 'static,
) -> (Job, TaskHandle<BatchResults<T>>) {
    let (completer, handle) = offload_core::backend::pair_with_cancel(name, on_cancel);
    let job = Job {
        id,
        name,
        payload: Payload::Batch { count, inputs },
        reply: Box::new(BatchReply(completer, count as usize)),
        options,
        attempts: 0,
    };
    (job, handle)
}

/// The pool's initializer: a task run in each worker before its first task.
#[derive(Debug, Clone)]
pub(crate) struct Initializer {
    pub(crate) name: &'static str,
    pub(crate) input: Blob,
    /// Decodes the initializer's output: `Err` with a message when it failed.
    pub(crate) check: fn(&'static str, Result<Blob, WireError>) -> Result<(), String>,
}

/// What an initializer may return: `()`, or a `Result` whose error says what went wrong.
pub trait InitOutput: DeserializeOwned {
    /// `Err` with a message when initialization failed.
    fn into_result(self) -> Result<(), String>;
}

impl InitOutput for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: DeserializeOwned + std::fmt::Display> InitOutput for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

pub(crate) fn check_init<O: InitOutput>(
    name: &'static str,
    output: Result<Blob, WireError>,
) -> Result<(), String> {
    // The error names the initializer once, so say what happened without the task prefix.
    decode::<O>(name, output)
        .map_err(|e| match e {
            TaskError::Panicked { message, .. } => format!("panicked: {message}"),
            TaskError::Serialization { message, .. } => {
                format!("could not be (de)serialized: {message}")
            }
            TaskError::UnknownTask { .. } => "is not registered in the worker program".to_owned(),
            other => other.to_string(),
        })
        .and_then(InitOutput::into_result)
}
