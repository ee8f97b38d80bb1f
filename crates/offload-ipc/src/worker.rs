//! The worker loop: what a process started as a worker runs instead of `main`.
//!
//! Blocking and thread-based on purpose: no async runtime, so a worker stays small and
//! starts fast. Two threads: the reader takes requests off the socket (many per read) and
//! applies cancels at once, even while a task runs; the main thread runs tasks one at a time
//! and writes each result as soon as it is done.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{BufRead, Read, Write};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, PoisonError};

use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{GenericNamespaced, Stream};
use offload_core::backend;
use offload_core::{find_task, CancelFlag, TaskError};

use crate::frame::{self, FrameDecoder, FrameError, DEFAULT_MAX_FRAME};
use crate::handshake::token_from_hex;
use crate::log_forward::{enter_request, ForwardingSubscriber};
use crate::protocol::{
    build_id, Blob, Blobs, Hello, ToParent, ToWorker, WireError, PROTOCOL_VERSION,
};
use crate::transport::{ENV_PARENT, ENV_SOCKET};

/// Exit codes of a worker, so the parent can say what went wrong.
mod exit_code {
    /// The parent closed the connection or asked the worker to exit.
    pub(super) const DONE: i32 = 0;
    /// The worker could not connect or was refused.
    pub(super) const NO_PARENT: i32 = 70;
    /// The parent sent something that is not the protocol.
    pub(super) const PROTOCOL: i32 = 71;
}

/// Runs this process as a worker of the pool listening at `socket`, and never returns.
///
/// Called by `offload::init()` when the worker environment variable is set.
pub fn run(socket: OsString) -> ! {
    die_with_parent();
    // A task may start this program again, or build a pool of its own: neither must look
    // like a worker. `init` runs first in `main`, before other threads read the environment.
    std::env::remove_var(ENV_SOCKET);
    std::env::remove_var(ENV_PARENT);
    let code = match serve(&socket) {
        Ok(()) => exit_code::DONE,
        Err(WorkerExit { code, message }) => {
            if let Some(message) = message {
                eprintln!("offload worker {}: {message}", std::process::id());
            }
            code
        }
    };
    std::process::exit(code)
}

struct WorkerExit {
    code: i32,
    message: Option<String>,
}

impl WorkerExit {
    fn new(code: i32, message: impl Into<String>) -> Self {
        WorkerExit {
            code,
            message: Some(message.into()),
        }
    }
}

/// Ask the kernel to kill this worker when its parent dies, and close the race where the
/// parent died before the request: then the worker was re-parented already.
fn die_with_parent() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    let expected = std::env::var(ENV_PARENT)
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    if let Some(expected) = expected {
        if std::os::unix::process::parent_id() != expected {
            std::process::exit(exit_code::NO_PARENT);
        }
    }
}

/// Gives tasks `bytes` of memory on top of what the worker uses already. RLIMIT_DATA (Linux
/// 4.7+) counts the heap and private writable mappings, thread stacks included, so the limit
/// is set relative to the worker's own baseline: a small limit does not starve the worker
/// itself. An allocation past it fails, and Rust aborts the worker.
///
/// Called on the task thread before its first task, once the worker's threads exist.
fn limit_memory(bytes: u64) -> Result<(), WorkerExit> {
    let total = data_segment_bytes().saturating_add(bytes);
    let limit = libc::rlimit {
        rlim_cur: total,
        rlim_max: total,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) };
    if rc != 0 {
        return Err(WorkerExit::new(
            exit_code::NO_PARENT,
            format!(
                "cannot set the memory limit: {}",
                std::io::Error::last_os_error()
            ),
        ));
    }
    Ok(())
}

/// What the kernel counts against RLIMIT_DATA now (`VmData`), or 0 where it cannot be read.
fn data_segment_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmData:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

fn serve(socket: &OsString) -> Result<(), WorkerExit> {
    let mut token_line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut token_line)
        .map_err(|e| WorkerExit::new(exit_code::NO_PARENT, format!("reading the token: {e}")))?;
    let token = token_from_hex(&token_line).ok_or_else(|| {
        WorkerExit::new(
            exit_code::NO_PARENT,
            "no pool token on stdin: workers are started by a ProcessPool, not by hand",
        )
    })?;
    let name = socket
        .as_os_str()
        .to_ns_name::<GenericNamespaced>()
        .map_err(|e| WorkerExit::new(exit_code::NO_PARENT, format!("bad socket name: {e}")))?;
    let stream = Stream::connect(name).map_err(|e| {
        WorkerExit::new(exit_code::NO_PARENT, format!("cannot reach the pool: {e}"))
    })?;
    // The connection lives as long as the worker; `&Stream` reads and writes, so the reader
    // thread and the outbox share it.
    let stream: &'static Stream = Box::leak(Box::new(stream));
    let outbox: &'static Outbox = Box::leak(Box::new(Outbox::new(stream, DEFAULT_MAX_FRAME)));
    outbox.send_now(&ToParent::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        build: build_id(),
        token,
        pid: std::process::id(),
    }));

    let mut reader = Reader::new(stream);
    let (max_log_level, max_frame, memory_limit) = match reader.next()? {
        Some(ToWorker::Welcome {
            max_log_level,
            max_frame,
            memory_limit,
        }) => (max_log_level, max_frame, memory_limit),
        Some(ToWorker::Refused { reason }) => {
            return Err(WorkerExit::new(
                exit_code::NO_PARENT,
                format!("refused by the pool: {reason}"),
            ))
        }
        Some(other) => {
            return Err(WorkerExit::new(
                exit_code::PROTOCOL,
                format!("expected a welcome, got {other:?}"),
            ))
        }
        None => return Ok(()),
    };
    let max_frame = usize::try_from(max_frame).unwrap_or(usize::MAX);
    outbox.set_max_frame(max_frame);
    reader.decoder.set_max(max_frame);
    if max_log_level > 0 {
        // A worker is a fresh process: nothing else installed a subscriber.
        let _ = tracing::subscriber::set_global_default(ForwardingSubscriber::new(
            outbox,
            max_log_level,
        ));
    }

    let cancels: &'static Mutex<Cancels> = Box::leak(Box::default());
    let (work_tx, work_rx) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("offload-reader".into())
        .spawn(move || read_requests(reader, work_tx, cancels))
        .map_err(|e| {
            WorkerExit::new(exit_code::NO_PARENT, format!("cannot start a thread: {e}"))
        })?;
    // Tasks run on a thread of their own, named so that a panic message reads
    // "thread 'offload-task' panicked" and not like the user's own `main`. It gets a main
    // thread's stack, so deep recursion behaves as it would in the caller.
    let runner = std::thread::Builder::new()
        .name("offload-task".into())
        .stack_size(TASK_STACK)
        .spawn(move || {
            if let Some(limit) = memory_limit {
                if let Err(WorkerExit { code, message }) = limit_memory(limit) {
                    eprintln!(
                        "offload worker {}: {}",
                        std::process::id(),
                        message.unwrap_or_default()
                    );
                    std::process::exit(code);
                }
            }
            run_requests(&work_rx, outbox, cancels);
        })
        .map_err(|e| {
            WorkerExit::new(exit_code::NO_PARENT, format!("cannot start a thread: {e}"))
        })?;
    let _ = runner.join();
    Ok(())
}

/// Stack of the thread that runs tasks: what a main thread gets on Linux.
const TASK_STACK: usize = 8 << 20;

/// One unit of work from the parent.
enum Request {
    One {
        id: u64,
        task: String,
        input: Blob,
    },
    Batch {
        id: u64,
        task: String,
        inputs: Blobs,
    },
}

/// Which requests the worker holds, for cancels: those queued here, the cancelled ones among
/// them, and the running request's flag. A cancel for a request the worker no longer holds
/// (it finished) is dropped, so nothing accumulates.
#[derive(Default)]
struct Cancels {
    queued: HashSet<u64>,
    early: HashSet<u64>,
    running: Option<(u64, CancelFlag)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data is plain bookkeeping; a panic elsewhere cannot leave it half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The reader thread: requests to the queue, cancels applied at once. When the parent goes
/// away the worker has no reason to live: it exits, even in the middle of a task.
fn read_requests(mut reader: Reader, work: mpsc::Sender<Request>, cancels: &Mutex<Cancels>) {
    let mut work = Some(work);
    loop {
        let message = match reader.next() {
            Ok(Some(message)) => message,
            Ok(None) => std::process::exit(exit_code::DONE),
            Err(WorkerExit { code, message }) => {
                if let Some(message) = message {
                    eprintln!("offload worker {}: {message}", std::process::id());
                }
                std::process::exit(code)
            }
        };
        let request = match message {
            ToWorker::Run { id, task, input } => Request::One { id, task, input },
            ToWorker::RunBatch { id, task, inputs } => Request::Batch { id, task, inputs },
            ToWorker::Cancel { id } => {
                let mut c = lock(cancels);
                match &c.running {
                    Some((running, flag)) if *running == id => flag.raise(),
                    _ if c.queued.contains(&id) => {
                        c.early.insert(id);
                    }
                    _ => {}
                }
                continue;
            }
            // Dropping the sender lets the main thread finish the queue and return.
            ToWorker::Exit => {
                work = None;
                continue;
            }
            other @ (ToWorker::Welcome { .. } | ToWorker::Refused { .. }) => {
                eprintln!(
                    "offload worker {}: unexpected {other:?} after the handshake",
                    std::process::id()
                );
                std::process::exit(exit_code::PROTOCOL)
            }
        };
        if let Some(work) = &work {
            let id = match &request {
                Request::One { id, .. } | Request::Batch { id, .. } => *id,
            };
            lock(cancels).queued.insert(id);
            let _ = work.send(request);
        }
    }
}

/// The main thread: runs requests in order and answers each as soon as it is done. Results
/// are not held back to share a write with the next one: the worker cannot know how long the
/// next task runs, and a quick result must not wait behind a slow task (tiny tasks share
/// writes through `map`'s batches instead).
fn run_requests(work: &mpsc::Receiver<Request>, outbox: &Outbox, cancels: &Mutex<Cancels>) {
    while let Ok(request) = work.recv() {
        let id = match &request {
            Request::One { id, .. } | Request::Batch { id, .. } => *id,
        };
        let flag = CancelFlag::new();
        {
            let mut c = lock(cancels);
            c.queued.remove(&id);
            if c.early.remove(&id) {
                flag.raise();
            }
            c.running = Some((id, flag.clone()));
        }
        let reply = {
            let _request = enter_request(id);
            let _flag = backend::enter(flag.clone());
            match request {
                Request::One { task, input, .. } => ToParent::Done {
                    id,
                    output: run_one(&task, &input, &flag),
                },
                Request::Batch { task, inputs, .. } => ToParent::BatchDone {
                    id,
                    outputs: inputs.iter().map(|i| run_one(&task, i, &flag)).collect(),
                },
            }
        };
        lock(cancels).running = None;
        outbox.send_result(reply);
    }
}

fn run_one(task: &str, input: &Blob, flag: &CancelFlag) -> Result<Blob, WireError> {
    if flag.is_raised() {
        return Err(WireError::Cancelled);
    }
    let entry = find_task(task).map_err(|e| WireError::UnknownTask(e.to_string()))?;
    entry
        .invoke(input.as_bytes())
        .map(Blob::new)
        .map_err(|e| match e {
            TaskError::Panicked { message, .. } => WireError::Panicked(message),
            TaskError::Serialization { message, .. } => WireError::Serialization(message),
            other => WireError::Panicked(other.to_string()),
        })
}

/// Reads and decodes frames from the parent.
struct Reader {
    recv: &'static Stream,
    decoder: FrameDecoder,
}

impl Reader {
    fn new(recv: &'static Stream) -> Self {
        Reader {
            recv,
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME),
        }
    }

    /// The next message; `None` at a clean end of stream.
    fn next(&mut self) -> Result<Option<ToWorker>, WorkerExit> {
        loop {
            match self.decoder.next_message::<ToWorker>() {
                Ok(Some(message)) => return Ok(Some(message)),
                Ok(None) => {}
                Err(e) => return Err(protocol_error(&e)),
            }
            let n = match self.recv.read(self.decoder.read_buf()) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A reset is how a dead parent looks from here: as final as an EOF.
                Err(_) => 0,
            };
            if n == 0 {
                return match self.decoder.finish() {
                    Ok(()) => Ok(None),
                    Err(e) => Err(protocol_error(&e)),
                };
            }
            self.decoder.filled(n);
        }
    }
}

fn protocol_error(e: &FrameError) -> WorkerExit {
    WorkerExit::new(exit_code::PROTOCOL, format!("bad frame from the pool: {e}"))
}

/// Frames on their way to the parent, written in batches.
pub(crate) struct Outbox {
    inner: Mutex<OutboxInner>,
}

struct OutboxInner {
    send: &'static Stream,
    buf: Vec<u8>,
    max_frame: usize,
}

impl Outbox {
    fn new(send: &'static Stream, max_frame: usize) -> Self {
        Outbox {
            inner: Mutex::new(OutboxInner {
                send,
                buf: Vec::with_capacity(KEEP_BUFFER),
                max_frame,
            }),
        }
    }

    fn set_max_frame(&self, max_frame: usize) {
        lock(&self.inner).max_frame = max_frame;
    }

    /// Writes a task's result. An output over the frame limit fails its own request (with a
    /// serialization error) instead of the connection.
    pub(crate) fn send_result(&self, message: ToParent) {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        inner.buf.clear();
        if let Err(e) = frame::encode(&message, &mut inner.buf, inner.max_frame) {
            let failed = match message {
                ToParent::Done { id, .. } => ToParent::Done {
                    id,
                    output: Err(WireError::Serialization(e.to_string())),
                },
                ToParent::BatchDone { id, outputs } => ToParent::BatchDone {
                    id,
                    outputs: outputs
                        .iter()
                        .map(|_| Err(WireError::Serialization(e.to_string())))
                        .collect(),
                },
                other => other,
            };
            inner.buf.clear();
            if frame::encode(&failed, &mut inner.buf, inner.max_frame).is_err() {
                return;
            }
        }
        write_or_exit(inner);
    }

    /// Writes a message (a handshake, a log record).
    pub(crate) fn send_now(&self, message: &ToParent) {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        inner.buf.clear();
        if frame::encode(message, &mut inner.buf, inner.max_frame).is_ok() {
            write_or_exit(inner);
        }
    }
}

/// Writes the encoded buffer. A failed write means the parent is gone: the worker exits.
fn write_or_exit(inner: &mut OutboxInner) {
    let mut send = inner.send;
    if send.write_all(&inner.buf).is_err() {
        std::process::exit(exit_code::DONE);
    }
    inner.buf.clear();
    // One large result must not keep its buffer for the worker's whole life.
    inner.buf.shrink_to(KEEP_BUFFER);
}

/// Buffer capacity kept between messages.
const KEEP_BUFFER: usize = 64 * 1024;
