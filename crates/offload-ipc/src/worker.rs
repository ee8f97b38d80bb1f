//! The worker loop: what a process started as a worker runs instead of `main`.
//!
//! Blocking and thread-based on purpose: no async runtime, so a worker stays small and
//! starts fast. One thread, the runner, reads requests when idle, runs every task in order
//! and writes each result as soon as it is done (`inbox`); `reader` decodes the
//! connection, and the `Outbox` here writes to the pool: into the connection's answer ring
//! (see [`crate::ring`]) once the handshake gave one, through the socket before that.

mod inbox;
mod reader;

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{GenericNamespaced, Stream};
use offload_core::backend::{self, Fd, OutputBytes};
use offload_core::{find_task, CancelFlag, SharedBuf, TaskEntry};

use crate::fdpass;
use crate::frame::{self, FrameError, DEFAULT_MAX_FRAME};
use crate::handshake::token_from_hex;
use crate::log_forward::{enter_request, ForwardingSubscriber};
use crate::protocol::{build_id, Blob, Hello, ToParent, ToWorker, WireError, PROTOCOL_VERSION};
use crate::ring::Producer;
use crate::transport::{self, ENV_INHERITED, ENV_PARENT, ENV_SOCKET};
use inbox::{Inbox, Request};
use reader::Reader;

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
    transport::close_inherited();
    die_with_parent();
    // A task may start this program again, or build a pool of its own: neither must look
    // like a worker. (With `#[tokio::main]` the runtime's threads exist already; they do
    // not read the environment, but a plain `fn main` that calls `init` first is safest.)
    std::env::remove_var(ENV_SOCKET);
    std::env::remove_var(ENV_PARENT);
    std::env::remove_var(ENV_INHERITED);
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
/// Called once the worker's threads exist, before the first task.
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

/// Raises this worker's soft limit on open files to its hard limit. Every shared buffer a
/// request carries is a descriptor while the request is queued or running, and the usual
/// soft limit (1024) is low for that; a worker is the pool's process, so this changes
/// nothing of the user's.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; setrlimit reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn serve(socket: &OsString) -> Result<(), WorkerExit> {
    raise_open_file_limit();
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
    let (max_log_level, max_frame, memory_limit, spin_us, answers) = match reader.next()? {
        Some(ToWorker::Welcome {
            max_log_level,
            max_frame,
            memory_limit,
            spin_us,
            answers,
        }) => (max_log_level, max_frame, memory_limit, spin_us, answers),
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
    if let Some(answers) = answers {
        // The pool reads this connection as a ring from now on: a worker that cannot write
        // to it cannot serve.
        let producer = answers.into_mapped().and_then(Producer::new).map_err(|e| {
            WorkerExit::new(
                exit_code::NO_PARENT,
                format!("cannot use the pool's answer ring: {e}"),
            )
        })?;
        outbox.use_ring(producer);
    }
    reader.decoder.set_max(max_frame);
    if max_log_level > 0 {
        // A worker is a fresh process: nothing else installed a subscriber.
        let _ = tracing::subscriber::set_global_default(ForwardingSubscriber::new(
            outbox,
            max_log_level,
        ));
    }

    let spin = Duration::from_micros(u64::from(spin_us));
    let inbox = Inbox::install(reader, outbox, spin);
    // The runner thread is named so that a panic message reads "thread 'offload-task'
    // panicked" and not like the user's own `main`. It gets a main thread's stack, so deep
    // recursion behaves as it would in the caller.
    let runner = start_thread("offload-task", TASK_STACK, move || inbox.run())?;
    // The limit is relative to what the worker uses with its thread in place, and set
    // before it takes its first request.
    if let Some(limit) = memory_limit {
        limit_memory(limit)?;
    }
    inbox.open();
    // The runner ends the process itself; this join returns only if it panicked outside a
    // task, which is a bug in the worker.
    let _ = runner.join();
    Err(WorkerExit::new(
        exit_code::PROTOCOL,
        "the task thread ended unexpectedly",
    ))
}

fn start_thread(
    name: &str,
    stack: usize,
    body: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, WorkerExit> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(stack)
        .spawn(body)
        .map_err(|e| WorkerExit::new(exit_code::NO_PARENT, format!("cannot start a thread: {e}")))
}

/// Stack of the thread that runs tasks: what a main thread gets on Linux.
const TASK_STACK: usize = 8 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data is plain bookkeeping; a panic elsewhere cannot leave it half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs one request under its cancel flag; `poll` reads cancels when the task checks.
/// `segment` is the slot's segment of a `RunInSegment`, taken from the worker's slots (or why
/// there is none).
fn run_request(
    request: Request,
    segment: Option<Result<&mut SharedBuf, &str>>,
    flag: &CancelFlag,
    poll: fn(),
) -> ToParent {
    let id = request.id();
    let _request = enter_request(id);
    let _flag = backend::enter_polled(flag.clone(), poll);
    match request {
        Request::One { task, input, .. } => ToParent::Done {
            id,
            output: run_one(&task, input.as_bytes(), input.fds()),
        },
        Request::InSegment { task, len, fds, .. } => {
            let segment = segment.unwrap_or(Err("no segment was taken for it"));
            run_in_segment(id, &task, segment, len, &fds)
        }
        Request::Batch {
            task,
            count,
            inputs,
            ..
        } => {
            let mut outputs = Vec::new();
            let mut fds = Vec::new();
            let failed = run_batch(&task, count as usize, &inputs, &mut outputs, &mut fds);
            ToParent::BatchDone {
                id,
                count,
                failed: u32::try_from(failed).unwrap_or(u32::MAX),
                outputs: Blob::new(outputs).with_fds(fds),
            }
        }
    }
}

/// Runs one task whose input is the first `len` bytes of `segment`, and writes its output
/// into the segment when it fits (see [`crate::segment`]).
fn run_in_segment(
    id: u64,
    task: &str,
    segment: Result<&mut SharedBuf, &str>,
    len: u64,
    fds: &Blob,
) -> ToParent {
    let segment = match segment {
        Ok(segment) => segment,
        Err(e) => {
            let error = format!("the task's input did not reach the worker: {e}");
            return ToParent::Done {
                id,
                output: Err(WireError::Serialization(error)),
            };
        }
    };
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let output = entry_to_run(task).and_then(|entry| {
        entry
            .invoke_in_place(segment, len, fds.fds())
            .map_err(WireError::from_task_error)
    });
    match output {
        Ok((OutputBytes::InPlace(len), fds)) => ToParent::DoneInSegment {
            id,
            len: len as u64,
            fds: Blob::default().with_fds(fds),
        },
        Ok((OutputBytes::Encoded(bytes), fds)) => ToParent::Done {
            id,
            output: Ok(Blob::new(bytes).with_fds(fds)),
        },
        Err(e) => ToParent::Done { id, output: Err(e) },
    }
}

/// Runs one task; the request's flag is current, and its cancel hook runs at the check.
fn run_one(task: &str, input: &[u8], fds: &[Fd]) -> Result<Blob, WireError> {
    entry_to_run(task)?
        .invoke(input, fds)
        .map(|(bytes, fds)| Blob::new(bytes).with_fds(fds))
        .map_err(WireError::from_task_error)
}

/// The registered task `task`, unless the request was cancelled before it started.
fn entry_to_run(task: &str) -> Result<&'static TaskEntry, WireError> {
    if offload_core::is_cancelled() {
        return Err(WireError::Cancelled);
    }
    find_task(task).map_err(|e| WireError::UnknownTask(e.to_string()))
}

/// Runs a packed batch of `count` tasks into `outputs` (descriptors into `fds`); returns how
/// many failed.
fn run_batch(
    task: &str,
    count: usize,
    inputs: &Blob,
    outputs: &mut Vec<u8>,
    fds: &mut Vec<Fd>,
) -> usize {
    match find_task(task) {
        Ok(entry) => entry.run_packed(inputs.as_bytes(), inputs.fds(), count, outputs, fds),
        Err(e) => {
            backend::pack_failures(&WireError::UnknownTask(e.to_string()), count, outputs);
            count
        }
    }
}

/// Frames on their way to the parent, written in batches.
pub(crate) struct Outbox {
    inner: Mutex<OutboxInner>,
}

struct OutboxInner {
    send: &'static Stream,
    /// Where frames go after the handshake, when the pool gave a ring.
    ring: Option<Producer>,
    buf: Vec<u8>,
    /// Descriptors to send with `buf`.
    fds: Vec<Fd>,
    max_frame: usize,
}

impl Outbox {
    fn new(send: &'static Stream, max_frame: usize) -> Self {
        Outbox {
            inner: Mutex::new(OutboxInner {
                send,
                ring: None,
                buf: Vec::with_capacity(KEEP_BUFFER),
                fds: Vec::new(),
                max_frame,
            }),
        }
    }

    fn set_max_frame(&self, max_frame: usize) {
        lock(&self.inner).max_frame = max_frame;
    }

    fn use_ring(&self, producer: Producer) {
        lock(&self.inner).ring = Some(producer);
    }

    /// Writes a task's result. An output over the frame limit fails its own request (with a
    /// serialization error) instead of the connection.
    pub(crate) fn send_result(&self, message: ToParent) {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        inner.buf.clear();
        inner.fds.clear();
        if let ToParent::Done {
            id,
            output: Ok(output),
        } = &message
        {
            if output.len() >= frame::SPLIT_MIN {
                // The output's bytes go out from where they are, not through `buf`.
                let head = ToParent::Done {
                    id: *id,
                    output: Ok(output.without_bytes()),
                };
                let tail = output.as_bytes();
                if frame::encode_split(&head, tail, &mut inner.buf, &mut inner.fds, inner.max_frame)
                    .is_ok()
                {
                    write_or_exit(inner, tail);
                    return;
                }
                // Over the limit: the usual path below reports it.
            }
        }
        // An output in its request's segment is not a frame, but the pool's limit holds
        // for it all the same.
        let message = match message {
            ToParent::DoneInSegment { id, len, .. } if len > inner.max_frame as u64 => {
                let e = FrameError::TooLarge {
                    len: usize::try_from(len).unwrap_or(usize::MAX),
                    max: inner.max_frame,
                };
                ToParent::Done {
                    id,
                    output: Err(WireError::Serialization(e.to_string())),
                }
            }
            other => other,
        };
        if let Err(e) =
            frame::encode_with_fds(&message, &mut inner.buf, &mut inner.fds, inner.max_frame)
        {
            let failed = match message {
                // Too many descriptors, say: the request fails, never its answer.
                ToParent::Done { id, .. } | ToParent::DoneInSegment { id, .. } => ToParent::Done {
                    id,
                    output: Err(WireError::Serialization(e.to_string())),
                },
                ToParent::BatchDone { id, count, .. } => {
                    let mut outputs = Vec::new();
                    let error = WireError::Serialization(e.to_string());
                    backend::pack_failures(&error, count as usize, &mut outputs);
                    ToParent::BatchDone {
                        id,
                        count,
                        failed: count,
                        outputs: Blob::new(outputs),
                    }
                }
                other => other,
            };
            inner.buf.clear();
            if frame::encode(&failed, &mut inner.buf, inner.max_frame).is_err() {
                return;
            }
        }
        write_or_exit(inner, &[]);
    }

    /// Writes a message (a handshake, a log record).
    pub(crate) fn send_now(&self, message: &ToParent) {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        inner.buf.clear();
        if frame::encode(message, &mut inner.buf, inner.max_frame).is_ok() {
            write_or_exit(inner, &[]);
        }
    }
}

/// Writes the encoded buffer, then `tail` (the rest of a split frame). A failed write means
/// the parent is gone: the worker exits.
fn write_or_exit(inner: &mut OutboxInner, tail: &[u8]) {
    let Stream::UdSocket(socket) = inner.send;
    let fd = socket.as_fd().as_raw_fd();
    let mut send = inner.send;
    let written = if let Some(ring) = &mut inner.ring {
        ring.send(fd, &inner.buf, &inner.fds, tail)
    } else if inner.fds.is_empty() {
        send.write_all(&inner.buf)
            .and_then(|()| send.write_all(tail))
    } else {
        fdpass::send_all(fd, &inner.buf, &inner.fds).and_then(|()| send.write_all(tail))
    };
    if written.is_err() {
        std::process::exit(exit_code::DONE);
    }
    inner.buf.clear();
    inner.fds.clear();
    // One large result must not keep its buffer for the worker's whole life.
    inner.buf.shrink_to(KEEP_BUFFER);
}

/// Buffer capacity kept between messages.
const KEEP_BUFFER: usize = 64 * 1024;
