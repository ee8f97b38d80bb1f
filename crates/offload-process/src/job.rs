//! A submitted task on its way through the pool, with its type erased: the scheduler moves
//! bytes, and only the [`Reply`] knows the output type to decode.

use offload_core::backend::Completer;
use offload_core::{TaskError, TaskHandle};
use offload_ipc::protocol::{Blob, WireError};
use serde::de::DeserializeOwned;

/// Identifies a request on the wire; unique within a pool.
pub(crate) type RequestId = u64;

/// The task(s) of a job, encoded.
pub(crate) enum Payload {
    One(Blob),
    Batch(Vec<Blob>),
}

/// How a job ended, as the scheduler sees it.
pub(crate) enum Outcome {
    One(Result<Blob, WireError>),
    Batch(Vec<Result<Blob, WireError>>),
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
    },
    Broken(String),
}

impl Failure {
    fn into_error(self, name: &'static str) -> TaskError {
        match self {
            Failure::Crashed {
                pid,
                status,
                signal,
                code,
            } => TaskError::worker_crashed(name, pid, status, signal, code),
            Failure::Broken(reason) => TaskError::pool_broken(name, reason),
        }
    }
}

/// The typed end of a job: starts and completes its handle.
pub(crate) trait Reply: Send {
    /// Marks the task running; false when it was cancelled while queued.
    fn start(&self) -> bool;
    fn finish(self: Box<Self>, outcome: Outcome);
}

pub(crate) struct Job {
    pub(crate) id: RequestId,
    pub(crate) name: &'static str,
    /// Taken when the job is sent to a worker.
    pub(crate) payload: Option<Payload>,
    pub(crate) reply: Box<dyn Reply>,
}

fn decode<T: DeserializeOwned>(
    name: &'static str,
    output: Result<Blob, WireError>,
) -> Result<T, TaskError> {
    match output {
        Ok(blob) => postcard::from_bytes(&blob.0).map_err(|e| TaskError::serialization(name, e)),
        Err(e) => Err(wire_error(name, e)),
    }
}

pub(crate) fn wire_error(name: &'static str, e: WireError) -> TaskError {
    match e {
        WireError::Panicked(message) => TaskError::panicked(name, message),
        WireError::Serialization(message) => TaskError::serialization(name, message),
        WireError::UnknownTask(_) => TaskError::unknown_task(name),
        WireError::Cancelled => TaskError::cancelled(name),
    }
}

struct OneReply<T>(Completer<T>);

impl<T: DeserializeOwned + Send + 'static> Reply for OneReply<T> {
    fn start(&self) -> bool {
        self.0.start()
    }

    fn finish(self: Box<Self>, outcome: Outcome) {
        let name = self.0.task_name();
        let result = match outcome {
            Outcome::One(output) => decode(name, output),
            Outcome::Failed(failure) => Err(failure.into_error(name)),
            Outcome::Batch(_) => Err(TaskError::serialization(
                name,
                "a batch answer to a single task",
            )),
        };
        self.0.complete(result);
    }
}

struct BatchReply<T>(Completer<Vec<Result<T, TaskError>>>);

impl<T: DeserializeOwned + Send + 'static> Reply for BatchReply<T> {
    fn start(&self) -> bool {
        self.0.start()
    }

    fn finish(self: Box<Self>, outcome: Outcome) {
        let name = self.0.task_name();
        let result = match outcome {
            Outcome::Batch(outputs) => Ok(outputs.into_iter().map(|o| decode(name, o)).collect()),
            Outcome::Failed(failure) => Err(failure.into_error(name)),
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
    on_cancel: impl FnOnce() + Send + 'static,
) -> (Job, TaskHandle<T>) {
    let (completer, handle) = offload_core::backend::pair(name);
    completer.on_cancel(on_cancel);
    let job = Job {
        id,
        name,
        payload: Some(Payload::One(input)),
        reply: Box::new(OneReply(completer)),
    };
    (job, handle)
}

/// A job for a batch of tasks, and its handle. `on_cancel` runs if the caller cancels it.
pub(crate) fn batch<T: DeserializeOwned + Send + 'static>(
    id: RequestId,
    name: &'static str,
    inputs: Vec<Blob>,
    on_cancel: impl FnOnce() + Send + 'static,
) -> (Job, TaskHandle<Vec<Result<T, TaskError>>>) {
    let (completer, handle) = offload_core::backend::pair(name);
    completer.on_cancel(on_cancel);
    let job = Job {
        id,
        name,
        payload: Some(Payload::Batch(inputs)),
        reply: Box::new(BatchReply(completer)),
    };
    (job, handle)
}
