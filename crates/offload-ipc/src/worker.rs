//! The worker loop: what a process started as a worker runs instead of `main`.
//!
//! Blocking and thread-based on purpose: no async runtime, so a worker stays small and
//! starts fast. One thread, the runner, runs every task in order, writes each result as soon as
//! it is done, and reads the connection itself when idle; a watcher reads while a task runs,
//! so cancels apply at once (see `Inbox`).

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{BufRead, Read, Write};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

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
    let (max_log_level, max_frame, memory_limit, spin_us) = match reader.next()? {
        Some(ToWorker::Welcome {
            max_log_level,
            max_frame,
            memory_limit,
            spin_us,
        }) => (max_log_level, max_frame, memory_limit, spin_us),
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

    let wake = Wake::new().map_err(|e| {
        WorkerExit::new(
            exit_code::NO_PARENT,
            format!("cannot create an eventfd: {e}"),
        )
    })?;
    let spin = Duration::from_micros(u64::from(spin_us));
    let inbox: &'static Inbox = Box::leak(Box::new(Inbox::new(reader, outbox, wake, spin)));
    // The runner thread is named so that a panic message reads "thread 'offload-task'
    // panicked" and not like the user's own `main`. It gets a main thread's stack, so deep
    // recursion behaves as it would in the caller.
    let runner = start_thread("offload-task", TASK_STACK, move || inbox.run())?;
    start_thread("offload-watch", WATCHER_STACK, move || inbox.watch())?;
    // The limit is relative to what the worker uses with its threads in place, and set
    // before they take their first request.
    if let Some(limit) = memory_limit {
        limit_memory(limit)?;
    }
    inbox.open();
    // The threads end the process themselves; this join returns only if the runner panicked
    // outside a task, which is a bug in the worker.
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

/// Stack of the watcher, which only reads and decodes.
const WATCHER_STACK: usize = 256 << 10;

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

impl Request {
    fn id(&self) -> u64 {
        match self {
            Request::One { id, .. } | Request::Batch { id, .. } => *id,
        }
    }
}

/// The worker's requests, and which thread reads the connection.
///
/// Every task runs on one thread, the runner (`offload-task`), so thread-locals an
/// initializer sets stay visible to every later task. The runner also reads the connection
/// itself whenever it is idle: a request then costs one wake-up in the worker, the read, not
/// two (a reader thread, then a hand-over to a task thread). While a task runs, the watcher
/// (`offload-watch`) holds the reader instead, so cancels and further requests are read at
/// once; when the runner is idle again it asks for the reader back through an eventfd, which
/// the watcher polls beside the socket. Both hand-overs happen while the runner is not waiting
/// for a request, so neither is on a round trip's path.
struct Inbox {
    state: Mutex<InboxState>,
    /// The runner waits here for work or for the reader.
    runner: Condvar,
    /// The watcher waits here for a running task to watch over.
    watcher: Condvar,
    /// Interrupts the watcher's poll when the runner wants the reader back.
    wake: Wake,
    outbox: &'static Outbox,
    /// Low-latency mode: how long the idle runner polls before it blocks.
    spin: Duration,
}

struct InboxState {
    /// False until the worker's setup is done.
    open: bool,
    /// The connection's read side; `None` while a thread is reading.
    reader: Option<Reader>,
    queue: VecDeque<Request>,
    /// Queued requests cancelled before they started.
    early: HashSet<u64>,
    /// The running request and its cancel flag.
    running: Option<(u64, CancelFlag)>,
    /// The idle runner asked the watcher for the reader.
    reclaim: bool,
    /// The parent asked the worker to exit once the queue is done.
    exiting: bool,
}

impl Inbox {
    fn new(reader: Reader, outbox: &'static Outbox, wake: Wake, spin: Duration) -> Self {
        Inbox {
            state: Mutex::new(InboxState {
                open: false,
                reader: Some(reader),
                queue: VecDeque::new(),
                early: HashSet::new(),
                running: None,
                reclaim: false,
                exiting: false,
            }),
            runner: Condvar::new(),
            watcher: Condvar::new(),
            wake,
            outbox,
            spin,
        }
    }

    fn open(&self) {
        lock(&self.state).open = true;
        self.runner.notify_all();
    }

    /// The runner: runs requests in order, answers each as soon as it is done, and reads
    /// when there is nothing to run.
    fn run(&self) {
        let mut state = lock(&self.state);
        while !state.open {
            state = wait(&self.runner, state);
        }
        loop {
            if let Some(request) = state.queue.pop_front() {
                let flag = CancelFlag::new();
                if state.early.remove(&request.id()) {
                    flag.raise();
                }
                state.running = Some((request.id(), flag.clone()));
                if state.reader.is_some() {
                    // Somebody must read cancels while this runs.
                    self.watcher.notify_one();
                }
                drop(state);
                let reply = run_request(request, &flag);
                // Answered as soon as it is done: the worker cannot know how long the next
                // task runs, and a quick result must not wait behind a slow task (tiny tasks
                // share writes through `map`'s batches instead).
                self.outbox.send_result(reply);
                state = lock(&self.state);
                state.running = None;
                continue;
            }
            if state.exiting {
                std::process::exit(exit_code::DONE);
            }
            if let Some(mut reader) = state.reader.take() {
                state.reclaim = false;
                drop(state);
                let messages = reader.read_some_spinning(self.spin);
                state = lock(&self.state);
                state.reader = Some(reader);
                state.apply_or_exit(messages);
                continue;
            }
            // The watcher has the reader: ask for it back, and wait for it or for work.
            if !state.reclaim {
                state.reclaim = true;
                self.wake.raise();
            }
            if !self.spin.is_zero() {
                drop(state);
                state = self.spin_for_turn();
                if state.reader.is_some() || !state.queue.is_empty() || state.exiting {
                    continue;
                }
            }
            state = wait(&self.runner, state);
        }
    }

    /// Low-latency mode: polls the state for up to `spin` until the runner has something to
    /// do, instead of parking at once.
    fn spin_for_turn(&self) -> MutexGuard<'_, InboxState> {
        let end = Instant::now() + self.spin;
        loop {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            let state = lock(&self.state);
            if state.reader.is_some()
                || !state.queue.is_empty()
                || state.exiting
                || Instant::now() >= end
            {
                return state;
            }
        }
    }

    /// The watcher: holds the reader while a task runs, and gives it back to the idle runner.
    fn watch(&self) {
        let mut state = lock(&self.state);
        loop {
            // Wait for a running task whose reader is free to take.
            let mut reader = loop {
                if state.open && state.running.is_some() {
                    if let Some(reader) = state.reader.take() {
                        break reader;
                    }
                }
                state = wait(&self.watcher, state);
            };
            drop(state);
            loop {
                let readable = reader.poll_with(&self.wake);
                state = lock(&self.state);
                if readable {
                    drop(state);
                    let messages = reader.read_some();
                    state = lock(&self.state);
                    state.apply_or_exit(messages);
                    if !state.queue.is_empty() || state.exiting {
                        self.runner.notify_one();
                    }
                }
                if state.reclaim && state.running.is_none() {
                    state.reader = Some(reader);
                    self.runner.notify_one();
                    break;
                }
                drop(state);
            }
        }
    }
}

fn wait<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// An eventfd the runner raises to interrupt the watcher's poll.
struct Wake {
    fd: std::os::fd::OwnedFd,
}

impl Wake {
    fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes plain integers; a non-negative result is a new descriptor
        // that nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Wake {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    fn raise(&self) {
        use std::os::fd::AsRawFd;
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. It cannot block
        // (EFD_NONBLOCK); a full counter (EAGAIN) leaves it readable, which is all we need.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    fn clear(&self) {
        use std::os::fd::AsRawFd;
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own non-blocking eventfd.
        unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                std::ptr::from_mut(&mut count).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }
}

impl InboxState {
    /// Applies what a read brought, or ends the process when the read failed: when the
    /// parent goes away the worker has no reason to live, even in the middle of a task.
    fn apply_or_exit(&mut self, messages: Result<Vec<ToWorker>, WorkerExit>) {
        match messages {
            Ok(messages) => {
                for message in messages {
                    self.apply(message);
                }
            }
            Err(WorkerExit { code, message }) => {
                if let Some(message) = message {
                    eprintln!("offload worker {}: {message}", std::process::id());
                }
                std::process::exit(code)
            }
        }
    }

    fn apply(&mut self, message: ToWorker) {
        let request = match message {
            ToWorker::Run { id, task, input } => Request::One { id, task, input },
            ToWorker::RunBatch { id, task, inputs } => Request::Batch { id, task, inputs },
            ToWorker::Cancel { id } => {
                match &self.running {
                    Some((running, flag)) if *running == id => flag.raise(),
                    _ if self.queue.iter().any(|r| r.id() == id) => {
                        self.early.insert(id);
                    }
                    // Finished already: nothing to keep.
                    _ => {}
                }
                return;
            }
            ToWorker::Exit => {
                self.exiting = true;
                return;
            }
            other @ (ToWorker::Welcome { .. } | ToWorker::Refused { .. }) => {
                eprintln!(
                    "offload worker {}: unexpected {other:?} after the handshake",
                    std::process::id()
                );
                std::process::exit(exit_code::PROTOCOL)
            }
        };
        if !self.exiting {
            self.queue.push_back(request);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data is plain bookkeeping; a panic elsewhere cannot leave it half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn run_request(request: Request, flag: &CancelFlag) -> ToParent {
    let id = request.id();
    let _request = enter_request(id);
    let _flag = backend::enter(flag.clone());
    match request {
        Request::One { task, input, .. } => ToParent::Done {
            id,
            output: run_one(&task, &input, flag),
        },
        Request::Batch { task, inputs, .. } => ToParent::BatchDone {
            id,
            outputs: inputs.iter().map(|i| run_one(&task, i, flag)).collect(),
        },
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

    /// The messages of one read (at least one), waiting for them if need be. The end of the
    /// stream is an error with exit code `DONE`: the parent is gone.
    fn read_some(&mut self) -> Result<Vec<ToWorker>, WorkerExit> {
        let first = self.next()?.ok_or(WorkerExit {
            code: exit_code::DONE,
            message: None,
        })?;
        let mut messages = vec![first];
        self.decoded(&mut messages)?;
        Ok(messages)
    }

    /// Appends every whole message the decoder holds; reads nothing.
    fn decoded(&mut self, messages: &mut Vec<ToWorker>) -> Result<(), WorkerExit> {
        while let Some(message) = self
            .decoder
            .next_message::<ToWorker>()
            .map_err(|e| protocol_error(&e))?
        {
            messages.push(message);
        }
        Ok(())
    }

    /// Like `read_some`, but first polls the socket without blocking for up to `spin`, so a
    /// request that arrives soon is read without putting the thread to sleep.
    fn read_some_spinning(&mut self, spin: Duration) -> Result<Vec<ToWorker>, WorkerExit> {
        if !spin.is_zero() {
            let end = Instant::now() + spin;
            let mut turns = 0u32;
            loop {
                match self.try_read() {
                    Some(n) => {
                        self.decoder.filled(n);
                        let mut messages = Vec::new();
                        self.decoded(&mut messages)?;
                        if !messages.is_empty() {
                            return Ok(messages);
                        }
                    }
                    None => {
                        turns = turns.wrapping_add(1);
                        if turns % 16 == 0 {
                            if Instant::now() >= end {
                                break;
                            }
                            // Lets the pool's threads run when every CPU is busy.
                            std::thread::yield_now();
                        }
                        std::hint::spin_loop();
                    }
                }
            }
        }
        self.read_some()
    }

    /// One read that does not block: the number of bytes read, or `None` when nothing was
    /// there (or the stream ended or failed: the blocking read that follows reports it).
    fn try_read(&mut self) -> Option<usize> {
        use std::os::fd::{AsFd, AsRawFd};
        let Stream::UdSocket(socket) = self.recv;
        let fd = socket.as_fd().as_raw_fd();
        let buf = self.decoder.read_buf();
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`, a live, exclusively
        // borrowed slice; MSG_DONTWAIT makes this one call non-blocking without changing the
        // descriptor's flags.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        usize::try_from(n).ok().filter(|&n| n > 0)
    }

    /// Waits until the connection has something to read (true; also at its end) or `wake`
    /// was raised (false, and `wake` is cleared). `read_some` leaves no whole message in the
    /// decoder, so the socket alone says whether there is more.
    fn poll_with(&self, wake: &Wake) -> bool {
        use std::os::fd::{AsFd, AsRawFd};
        let Stream::UdSocket(socket) = self.recv;
        let mut fds = [
            libc::pollfd {
                fd: socket.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a live array of two pollfd structs, and its length is passed.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc >= 0 {
                break;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                // Cannot wait: let the read find out what is wrong.
                return true;
            }
        }
        if fds[1].revents != 0 {
            wake.clear();
        }
        fds[0].revents != 0
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
