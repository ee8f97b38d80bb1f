//! One worker connection: the handshake, then a reader task and a writer task.
//!
//! Nothing from the socket is trusted before the handshake: the first frame may be at most
//! [`HELLO_MAX`] bytes and must arrive within [`HANDSHAKE_TIMEOUT`], and a wrong token closes
//! the connection without an answer.

use std::collections::VecDeque;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use interprocess::local_socket::tokio::{prelude::*, Stream};
use offload_core::backend::Fd;
use offload_ipc::frame::{self, FrameDecoder, FrameError};
use offload_ipc::handshake::{check_hello, HandshakeError};
use offload_ipc::protocol::{ToParent, ToWorker, TOKEN_LEN};
use offload_ipc::segment::Segment;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::lane::Lane;
use crate::reader::{Drained, End, SharedReader};
use crate::socket::Socket;

/// The largest first frame accepted from an unauthenticated peer.
const HELLO_MAX: usize = 4096;

/// How long a new connection has to introduce itself.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A write gathers queued frames up to this size, so a burst of tiny tasks costs few syscalls.
const WRITE_BATCH: usize = 1 << 20;

/// What connections and child processes tell the scheduler.
pub(crate) enum Event {
    /// A worker passed the handshake; send it work through `writer` (counting each message
    /// in `lane.unwritten`), or let callers write to it through `lane`.
    Connected {
        pid: u32,
        writer: UnboundedSender<Outgoing>,
        lane: Arc<Lane>,
    },
    /// One of our workers failed the handshake (e.g. another build of offload).
    Refused {
        pid: u32,
        reason: String,
    },
    Message {
        pid: u32,
        message: ToParent,
    },
    /// Several frames from a worker, in the order it wrote them (what one look at its
    /// connection found).
    Messages {
        pid: u32,
        messages: Vec<ToParent>,
    },
    /// A caller read the answer to a request it wrote to this worker and finished it (see
    /// `lane::help_wait`): sent in elastic pools, which time how long a worker idles.
    DirectDone {
        pid: u32,
    },
    /// The connection ended: `closed` says why, when the pool closed it.
    Disconnected {
        pid: u32,
        closed: Option<String>,
    },
    /// A disconnected worker has not exited within its grace period.
    Stale {
        pid: u32,
    },
    /// The worker process ended; it has been reaped.
    Exited {
        pid: u32,
        status: ExitStatus,
    },
    /// Request `id`'s timeout ran out (it may have finished meanwhile).
    Deadline {
        pid: u32,
        id: u64,
        timeout: std::time::Duration,
    },
    /// The grace period after cancelling request `id` ran out.
    CancelGrace {
        pid: u32,
        id: u64,
    },
    /// Time to stop workers that have been idle for the idle timeout.
    IdleCheck,
    /// Time to drop shared-memory segments and spare buffers that sat unused (see
    /// `segments`).
    TrimUnused,
    /// A worker exited some time ago: settle it even if its connection is still open.
    Settle {
        pid: u32,
    },
}

/// What the handshake needs to know about the pool.
pub(crate) struct Accept {
    pub(crate) token: [u8; TOKEN_LEN],
    pub(crate) max_frame: usize,
    pub(crate) memory_limit: Option<u64>,
    pub(crate) spin_us: u32,
}

/// Serves one accepted connection until it ends.
pub(crate) async fn serve(stream: Stream, accept: Arc<Accept>, events: UnboundedSender<Event>) {
    // The kernel's word on who connected, which a peer cannot forge (unlike its Hello).
    let peer_pid = stream
        .peer_creds()
        .ok()
        .and_then(|c| c.pid())
        .and_then(|p| u32::try_from(p).ok());
    let stream = match Socket::new(stream) {
        Ok(socket) => Arc::new(socket),
        Err(e) => {
            tracing::warn!(peer.pid = ?peer_pid, "could not take a connection to the pool's socket: {e}");
            return;
        }
    };
    let mut reader = Reader {
        stream: stream.clone(),
        // Nobody sends descriptors before the handshake: a stranger must not be able to park
        // thousands of them in this process.
        decoder: FrameDecoder::new(HELLO_MAX).refusing_fds(),
    };
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(ToParent::Hello(hello)))) => hello,
        Ok(Ok(None)) => return,
        Ok(Ok(Some(_))) => {
            tracing::warn!(peer.pid = ?peer_pid, "refused a connection to the pool's socket: it did not start with a handshake");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(peer.pid = ?peer_pid, "refused a connection to the pool's socket: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(peer.pid = ?peer_pid, "refused a connection to the pool's socket: no handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let pid = peer_pid.unwrap_or(hello.pid);
    if let Err(e) = check_hello(&hello, &accept.token) {
        tracing::warn!(
            peer.pid = pid,
            "refused a connection to the pool's socket: {e}"
        );
        if !matches!(e, HandshakeError::WrongToken) {
            let reason = e.to_string();
            let _ = write_one(
                &stream,
                &ToWorker::Refused {
                    reason: reason.clone(),
                },
            )
            .await;
            let _ = events.send(Event::Refused { pid, reason });
        }
        return;
    }
    // The worker's frames come through shared memory from now on (see `offload_ipc::ring`);
    // without it (no memory to be had) through the socket, as before the handshake.
    let (mut ring, answers) = match offload_ipc::ring::create() {
        Ok((ring, memory)) => (Some(ring), Some(Segment::new(memory))),
        Err(e) => {
            tracing::debug!(
                worker.pid = pid,
                "worker {pid} answers through its socket: no shared memory for a ring: {e}"
            );
            (None, None)
        }
    };
    let welcome = ToWorker::Welcome {
        max_log_level: parent_log_level(),
        max_frame: accept.max_frame as u64,
        memory_limit: accept.memory_limit,
        spin_us: accept.spin_us,
        answers,
    };
    if write_one(&stream, &welcome).await.is_err() {
        return;
    }
    drop(welcome);
    if let Some(ring) = &mut ring {
        ring.sent();
    }
    reader.decoder.set_max(accept.max_frame);
    reader.decoder.accept_fds();
    // Callers read the socket through the watch's duplicate, and write to the lane's.
    let shared = SharedReader::new(
        pid,
        stream.watch().clone(),
        reader.decoder,
        ring,
        events.clone(),
    );
    let lane = match Lane::new(stream.get_ref(), Arc::new(shared)).map(Arc::new) {
        Ok(lane) => lane,
        Err(e) => {
            let reason = format!("cannot duplicate the socket of worker {pid}: {e}");
            tracing::warn!(
                worker.pid = pid,
                "closing the connection to worker {pid}: {reason}"
            );
            // It never served: the pool reports this as why the worker failed to start.
            let _ = events.send(Event::Refused { pid, reason });
            return;
        }
    };
    let shared = lane.reader.clone();
    let (writer, outgoing) = tokio::sync::mpsc::unbounded_channel();
    let connected = Event::Connected {
        pid,
        writer,
        lane: lane.clone(),
    };
    if events.send(connected).is_err() {
        return;
    }
    tokio::spawn(write_loop(
        stream.clone(),
        outgoing,
        lane,
        accept.max_frame,
        pid,
    ));
    // Hand every frame to the scheduler, unless a caller waiting for its answer is reading
    // (see `reader`): then wait until it lets go.
    let closed = loop {
        match shared.drain() {
            Drained::Ended(End::Eof) => break None,
            Drained::Ended(End::Failed(e)) => {
                tracing::warn!(
                    worker.pid = pid,
                    "closing the connection to worker {pid}: {e}"
                );
                break Some(e);
            }
            Drained::Empty | Drained::Busy => {}
        }
        tokio::select! {
            ready = stream.readable() => {
                if let Err(e) = ready {
                    tracing::warn!(worker.pid = pid, "closing the connection to worker {pid}: {e}");
                    break Some(e.to_string());
                }
                shared.socket_woke();
            }
            () = shared.released.notified() => {}
        }
    };
    let _ = events.send(Event::Disconnected { pid, closed });
}

/// The most verbose level the parent's subscriber wants, so workers send nothing that would
/// be thrown away. Read at each handshake: a subscriber installed later applies to workers
/// started later.
fn parent_log_level() -> u8 {
    tracing::level_filters::LevelFilter::current()
        .into_level()
        .map_or(0, offload_ipc::level_to_u8)
}

async fn write_one(stream: &Socket, message: &ToWorker) -> std::io::Result<()> {
    let (mut buf, mut fds) = (Vec::new(), Vec::new());
    frame::encode_with_fds(message, &mut buf, &mut fds, usize::MAX)
        .map_err(std::io::Error::other)?;
    stream.write_all(&buf, &fds).await
}

/// What the scheduler hands a connection's writer: one message, or several (its turn's
/// requests for this worker: one channel operation for all of them).
pub(crate) enum Outgoing {
    One(ToWorker),
    Many(Vec<ToWorker>),
}

impl Outgoing {
    /// How many messages.
    pub(crate) fn len(&self) -> usize {
        match self {
            Outgoing::One(_) => 1,
            Outgoing::Many(messages) => messages.len(),
        }
    }

    /// The messages of `batch`, at least one: a lone one as it is, several together.
    pub(crate) fn of(mut batch: Vec<ToWorker>) -> Outgoing {
        match batch.pop() {
            Some(message) if batch.is_empty() => Outgoing::One(message),
            Some(message) => {
                batch.push(message);
                Outgoing::Many(batch)
            }
            None => Outgoing::Many(batch),
        }
    }

    fn queue_into(self, pending: &mut VecDeque<ToWorker>) {
        match self {
            Outgoing::One(message) => pending.push_back(message),
            Outgoing::Many(messages) => pending.extend(messages),
        }
    }
}

/// Writes queued messages, many per write. Ends when the scheduler drops the sender or the
/// socket fails (the reader then reports the disconnect). Each message written in full is
/// taken off `lane.unwritten`.
async fn write_loop(
    stream: Arc<Socket>,
    mut outgoing: UnboundedReceiver<Outgoing>,
    lane: Arc<Lane>,
    max_frame: usize,
    pid: u32,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut fds = Vec::new();
    let mut pending = VecDeque::new();
    loop {
        if pending.is_empty() {
            match outgoing.recv().await {
                Some(more) => more.queue_into(&mut pending),
                None => return,
            }
        }
        buf.clear();
        fds.clear();
        let mut count = 0;
        // A request with a large input is written on its own, after what is batched before
        // it, its input straight from the request (`frame::encode_split`).
        let mut large = None;
        while let Some(message) = pending.pop_front() {
            // A large input goes into shared memory if it can, and the request is then small.
            let message = lane.reader.segments.place(message);
            if has_large_input(&message) {
                large = Some(message);
                break;
            }
            encode(&message, &mut buf, &mut fds, max_frame, pid);
            count += 1;
            if buf.len() >= WRITE_BATCH {
                break;
            }
            if pending.is_empty() {
                if let Ok(more) = outgoing.try_recv() {
                    more.queue_into(&mut pending);
                }
            }
        }
        lane.wait_for_caller().await;
        if count > 0 {
            let written = stream.write_all(&buf, &fds).await;
            // Sent: the worker has its own copies now. Holding ours until the next message
            // would pin a finished task's shared memory for as long as this worker idles.
            fds.clear();
            if written.is_err() {
                return;
            }
            lane.unwritten.fetch_sub(count, Ordering::AcqRel);
        }
        if let Some(message) = large {
            buf.clear();
            if write_split(&stream, &message, &mut buf, &mut fds, max_frame, pid)
                .await
                .is_err()
            {
                return;
            }
            fds.clear();
            lane.unwritten.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// True for a request whose input is large enough to be written from where it is.
fn has_large_input(message: &ToWorker) -> bool {
    matches!(message, ToWorker::Run { input, .. } if input.len() >= frame::SPLIT_MIN)
}

/// Writes one request with a large input: its frame up to the input's bytes, then the bytes.
async fn write_split(
    stream: &Socket,
    message: &ToWorker,
    buf: &mut Vec<u8>,
    fds: &mut Vec<Fd>,
    max_frame: usize,
    pid: u32,
) -> std::io::Result<()> {
    if let ToWorker::Run { id, task, input } = message {
        let head = ToWorker::Run {
            id: *id,
            task: task.clone(),
            input: input.without_bytes(),
        };
        let tail = input.as_bytes();
        if frame::encode_split(&head, tail, buf, fds, max_frame).is_ok() {
            stream.write_all(buf, fds).await?;
            return stream.write_all(tail, &[]).await;
        }
    }
    // Over the limit (sizes are checked at submit, so only on a bug): the usual encode logs
    // what is wrong.
    encode(message, buf, fds, max_frame, pid);
    stream.write_all(buf, fds).await
}

fn encode(message: &ToWorker, buf: &mut Vec<u8>, fds: &mut Vec<Fd>, max_frame: usize, pid: u32) {
    // Sizes are checked at submit, so this only fails on a bug; the request then fails when
    // the worker is replaced, rather than hanging.
    if let Err(e) = frame::encode_with_fds(message, buf, fds, max_frame) {
        tracing::error!(worker.pid = pid, "could not encode a request: {e}");
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
}

struct Reader {
    stream: Arc<Socket>,
    decoder: FrameDecoder,
}

impl Reader {
    async fn next(&mut self) -> Result<Option<ToParent>, ReadError> {
        loop {
            if let Some(message) = self.decoder.next_message()? {
                return Ok(Some(message));
            }
            let n = self.stream.read(&mut self.decoder).await?;
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
            self.decoder.filled(n);
        }
    }
}
