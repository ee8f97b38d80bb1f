//! The worker's requests: read from the connection, queued, run one at a time.
//!
//! Every task runs on one thread, the runner (`offload-task`), so thread-locals an initializer
//! sets stay visible to every later task. The runner also reads the connection, whenever it is
//! idle: a request costs the worker one wake-up. While a task runs nobody reads, except the
//! task itself: each [`is_cancelled`](offload_core::is_cancelled) check first reads what has
//! arrived, without blocking and at most every [`CANCEL_POLL`], so a cancel reaches the task
//! that asks for it. A task that never asks is killed by the pool once its cancel grace period
//! is over; requests that arrive meanwhile wait in the socket until the runner is free.

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use offload_core::CancelFlag;

use super::reader::Reader;
use super::{exit_code, lock, run_request, Outbox, WorkerExit};
use crate::protocol::{Blob, ToWorker};
use crate::segment::WorkerSlots;

/// How often a running task's cancel checks read the connection, at most: a check costs a
/// clock read, and one in this long a system call.
const CANCEL_POLL: Duration = Duration::from_micros(50);

/// One unit of work from the parent.
pub(super) enum Request {
    One {
        id: u64,
        task: Cow<'static, str>,
        input: Blob,
    },
    /// A task whose input is in a slot's segment (see [`crate::segment`]).
    InSegment {
        id: u64,
        task: Cow<'static, str>,
        slot: u32,
        len: u64,
        fds: Blob,
    },
    Batch {
        id: u64,
        task: Cow<'static, str>,
        count: u32,
        inputs: Blob,
    },
}

impl Request {
    pub(super) fn id(&self) -> u64 {
        match self {
            Request::One { id, .. } | Request::InSegment { id, .. } | Request::Batch { id, .. } => {
                *id
            }
        }
    }
}

/// The worker's requests and the connection's read side.
pub(super) struct Inbox {
    /// Used by the runner alone, and by the cancel hook on the runner's own thread; a mutex
    /// only because the hook finds the inbox through a static. It is held while the idle
    /// runner waits for a request: nobody else can want it then.
    state: Mutex<InboxState>,
    /// The runner waits here until the worker's setup is done.
    opened: Condvar,
    outbox: &'static Outbox,
    /// Low-latency mode: how long the idle runner polls before it blocks.
    spin: Duration,
}

struct InboxState {
    /// False until the worker's setup is done.
    open: bool,
    reader: Reader,
    queue: VecDeque<Request>,
    /// Queued requests cancelled before they started.
    early: HashSet<u64>,
    /// The running request and its cancel flag.
    running: Option<(u64, CancelFlag)>,
    /// The parent asked the worker to exit once the queue is done.
    exiting: bool,
    /// When the connection was last read to the end: by a cancel check, or by the runner
    /// when its read emptied the socket (see `Reader::drained`).
    last_poll: Instant,
    /// The connection's shared-memory segments.
    slots: WorkerSlots,
}

/// The worker's inbox, for the cancel hook (a plain `fn`, see [`poll_for_cancels`]).
static INBOX: OnceLock<&'static Inbox> = OnceLock::new();

impl Inbox {
    /// Creates the worker's inbox; it lives as long as the process.
    pub(super) fn install(
        reader: Reader,
        outbox: &'static Outbox,
        spin: Duration,
    ) -> &'static Inbox {
        let inbox: &'static Inbox = Box::leak(Box::new(Inbox {
            state: Mutex::new(InboxState {
                open: false,
                reader,
                queue: VecDeque::new(),
                early: HashSet::new(),
                running: None,
                exiting: false,
                last_poll: Instant::now(),
                slots: WorkerSlots::default(),
            }),
            opened: Condvar::new(),
            outbox,
            spin,
        }));
        INBOX.get_or_init(|| inbox)
    }

    pub(super) fn open(&self) {
        lock(&self.state).open = true;
        self.opened.notify_all();
    }

    /// The runner: runs requests in order, answers each as soon as it is done, and reads
    /// when there is nothing to run.
    pub(super) fn run(&self) {
        let mut state = lock(&self.state);
        while !state.open {
            state = self
                .opened
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        loop {
            if let Some(request) = state.queue.pop_front() {
                let flag = CancelFlag::new();
                if state.early.remove(&request.id()) {
                    flag.raise();
                }
                state.running = Some((request.id(), flag.clone()));
                let slot = match request {
                    Request::InSegment { slot, .. } => Some(slot),
                    _ => None,
                };
                let mut segment = slot.map(|slot| state.slots.take(slot));
                drop(state);
                let reply = run_request(
                    request,
                    segment.as_mut().map(|s| s.as_mut().map_err(|e| e.as_str())),
                    &flag,
                    poll_for_cancels,
                );
                if let (Some(slot), Some(Ok(segment))) = (slot, segment) {
                    // Back before the answer: the parent may lend the slot again at once.
                    lock(&self.state).slots.put_back(slot, segment);
                }
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
            let messages = state.reader.read_some(self.spin);
            if state.reader.drained() {
                // Nothing was left in the socket a moment ago: the cancel check before the
                // next task need not read it again (an empty read on the way of every round
                // trip). After a read that may have left something (a cancel behind a large
                // request, or behind one with descriptors), the check reads as before.
                state.last_poll = Instant::now();
            }
            state.apply_or_exit(messages);
        }
    }
}

/// The cancel hook of every task the worker runs: reads what has arrived (cancels raise the
/// running task's flag), at most every [`CANCEL_POLL`].
fn poll_for_cancels() {
    let Some(inbox) = INBOX.get() else {
        return;
    };
    let mut state = lock(&inbox.state);
    let now = Instant::now();
    if now.duration_since(state.last_poll) < CANCEL_POLL {
        return;
    }
    state.last_poll = now;
    let messages = state.reader.read_available();
    state.apply_or_exit(messages);
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
            ToWorker::RunInSegment {
                id,
                task,
                slot,
                segment,
                len,
                fds,
            } => {
                if let Some(segment) = segment {
                    // A segment that could not be mapped fails its request, with the reason.
                    self.slots.install(slot, segment.into_mapped());
                }
                Request::InSegment {
                    id,
                    task,
                    slot,
                    len,
                    fds,
                }
            }
            ToWorker::RunBatch {
                id,
                task,
                count,
                inputs,
            } => Request::Batch {
                id,
                task,
                count,
                inputs,
            },
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
            ToWorker::DropSegments => {
                self.slots = WorkerSlots::default();
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
