//! The read side of a worker connection, shared by the pool's I/O thread and a caller
//! blocked on the answer to a request it wrote directly (see `lane`).
//!
//! Through the I/O thread a round trip is three thread hand-offs: caller -> worker -> I/O
//! thread -> caller. A caller blocked in `wait` that reads its answer from the socket itself
//! makes it two, like a plain socket ping-pong. Either side reads only while it holds the
//! [`SharedReader`]'s lock, and hands every frame that is not the caller's own answer to the
//! scheduler, in order, as the I/O thread would. The I/O thread never waits for the lock: it
//! waits for the socket or for [`SharedReader::released`], which a caller signals when it lets
//! go, since it may leave bytes in the decoder or in the socket. While a caller reads its
//! answer, the reactor's watch on the socket is paused (see `watch` and `lane`): the answer
//! wakes the caller alone.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use offload_ipc::fdpass;
use offload_ipc::frame::FrameDecoder;
use offload_ipc::protocol::{Blob, ToParent, WireError};
use offload_ipc::ring::{self, Consumer, RingWatch};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Notify;

use crate::connection::Event;
use crate::forward;
use crate::job::RequestId;
use crate::segments::Segments;
use crate::watch::ReadWatch;

/// How long a helping caller sleeps in `poll` before it looks at its handle and deadline
/// again (a cancel from another thread, say).
const HELP_POLL: Duration = Duration::from_millis(10);

/// One caller in this many reads before it looks at [`SharedReader::answers_wait`].
const HINT_CHECK: u64 = 16;

pub(crate) struct SharedReader {
    pub(crate) pid: u32,
    /// The connection's socket, and the reactor's watch on it.
    watch: Arc<ReadWatch>,
    state: Mutex<ReadState>,
    /// Signalled when a caller lets go of the reader, if the I/O thread wanted it meanwhile
    /// (`contended`) or something is left for it.
    pub(crate) released: Notify,
    /// Set by the I/O thread when it found a caller holding the reader.
    contended: AtomicBool,
    /// The id of the last answer handed to the scheduler (by the I/O thread, or by a caller
    /// reading for its own): a caller that finds its own there knows it came too late.
    handed_on: AtomicU64,
    /// The last caller's answer had not come when it first looked: the next caller waits in
    /// `poll` before it reads, instead of first reading nothing (one system call less per
    /// round trip when the worker runs on another CPU). One caller in [`HINT_CHECK`] reads
    /// first anyway, and clears it if its answer was there (`poll` cannot tell whether it
    /// waited).
    answers_wait: AtomicBool,
    /// The connection's shared-memory segments: answers in them are read here.
    pub(crate) segments: Segments,
    /// Set when the reactor's watch could not be resumed after it was paused: the reactor
    /// would not hear from the socket again, so the connection is given up.
    watch_lost: AtomicBool,
    /// The worker's frames come through this ring (see `offload_ipc::ring`), when the
    /// connection has one; the socket then carries only wake-ups and descriptors.
    ring: Option<RingWatch>,
    /// Someone was woken by the socket (or may have been): the next read looks at it, for
    /// wake-ups to take off and the end of the stream. With a ring, reads that find bytes in
    /// it skip the socket otherwise.
    socket_pending: AtomicBool,
    /// A wake-up byte was read: if a caller read it, the I/O thread's bit in the ring's header
    /// may have gone with it (see [`Self::let_go`]).
    took_wake: AtomicBool,
    events: UnboundedSender<Event>,
}

struct ReadState {
    decoder: FrameDecoder,
    /// The pool's end of the connection's ring.
    ring: Option<Consumer>,
    /// With a ring: the socket reported its end. What the worker published before is read
    /// first.
    socket_ended: bool,
    /// Set once the stream ended or failed; the I/O thread reports it.
    ended: Option<End>,
}

/// How the stream ended.
pub(crate) enum End {
    Eof,
    /// The connection cannot be read any more: why.
    Failed(String),
}

/// What [`SharedReader::drain`] found.
pub(crate) enum Drained {
    /// Everything there was has been handed on; wait for the socket.
    Empty,
    /// A caller is reading; wait for [`SharedReader::released`].
    Busy,
    /// The stream ended; the scheduler must be told.
    Ended(End),
}

/// Runs [`SharedReader::let_go`] once a caller let go of the reader (also if a subscriber it
/// called panicked).
struct Release<'a>(&'a SharedReader);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.let_go();
    }
}

/// What a helping caller found.
enum Found {
    Answer(Result<Blob, WireError>),
    Nothing,
}

impl SharedReader {
    pub(crate) fn new(
        pid: u32,
        watch: Arc<ReadWatch>,
        decoder: FrameDecoder,
        ring: Option<Consumer>,
        events: UnboundedSender<Event>,
    ) -> Self {
        SharedReader {
            pid,
            watch,
            ring: ring.as_ref().map(Consumer::watch),
            socket_pending: AtomicBool::new(true),
            took_wake: AtomicBool::new(false),
            state: Mutex::new(ReadState {
                decoder,
                ring,
                socket_ended: false,
                ended: None,
            }),
            released: Notify::new(),
            contended: AtomicBool::new(false),
            handed_on: AtomicU64::new(0),
            answers_wait: AtomicBool::new(false),
            watch_lost: AtomicBool::new(false),
            segments: Segments::default(),
            events,
        }
    }

    /// For the I/O thread: reads what is there without waiting and hands every frame to the
    /// scheduler. Never blocks on the lock, and holds it only while bytes are there to read.
    pub(crate) fn drain(&self) -> Drained {
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::WouldBlock) => {
                // The caller checks this after it lets go, and wakes this thread. It may have
                // let go just now, before seeing it: try once more.
                self.contended.store(true, Ordering::SeqCst);
                match self.state.try_lock() {
                    Ok(state) => state,
                    Err(TryLockError::WouldBlock) => return Drained::Busy,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                }
            }
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        if self.watch_lost.load(Ordering::Acquire) {
            return Drained::Ended(End::Failed(
                "the pool lost its watch on the socket".to_owned(),
            ));
        }
        // Handed on together when the reading stops, still under the lock (callers hand on
        // frames under it too, so the scheduler gets them in order): one event per look
        // instead of one per frame, which a burst of answers made most of this thread's work.
        let mut batch = Vec::new();
        let drained = loop {
            match self.next_message(&mut state) {
                Ok(Some(message)) => {
                    self.note_handed_on(&message);
                    batch.push(message);
                    continue;
                }
                Ok(None) => {}
                Err(e) => break Drained::Ended(End::Failed(e)),
            }
            if let Some(end) = state.ended.take() {
                break Drained::Ended(end);
            }
            match self.recv(&mut state, true) {
                Ok(true) => {}
                Ok(false) => break Drained::Empty,
                Err(end) => break Drained::Ended(end),
            }
        };
        if self.send_all(batch).is_err() {
            return Drained::Ended(End::Eof);
        }
        drained
    }

    /// For a caller blocked on request `id`, which it wrote to this worker: reads until its
    /// answer comes, handing other frames to the scheduler in order. With the answer it calls
    /// `claim`, still holding the reader: `Some` (the request was still the caller's) returns
    /// it with the answer; `None` (the scheduler took the request over) hands the answer to
    /// the scheduler, in its place among the frames. Returns `None` also when the I/O thread
    /// read the answer first, when `done()` says the handle resolved some other way, when
    /// `deadline` passes, or when the stream ended (the I/O thread reports that).
    ///
    /// Waits for the lock if the I/O thread holds it: it does only while it reads what is
    /// there, a few microseconds. Giving up instead lost the race now and then to an I/O
    /// thread woken by the previous answer, and the caller slept on its handle.
    pub(crate) fn read_answer<R>(
        &self,
        (id, name): (RequestId, &'static str),
        done: &dyn Fn() -> bool,
        deadline: Option<Instant>,
        claim: impl FnOnce() -> Option<R>,
    ) -> Option<(R, Result<Blob, WireError>)> {
        // Declared first, dropped last: after the lock is let go, even if a subscriber that
        // `forward::emit` calls panics.
        let _release = Release(self);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut claimed = None;
        if self.handed_on.load(Ordering::Acquire) != id {
            let found = self.read_answer_locked(&mut state, (id, name), done, deadline);
            if let Found::Answer(output) = found {
                match claim() {
                    Some(request) => claimed = Some((request, output)),
                    None => {
                        let _ = self.send(ToParent::Done { id, output });
                    }
                }
            }
        }
        // Frames read past the answer go on; the socket is not read again. Bytes that come
        // after the caller's last read are not lost: the paused watch reports them when it is
        // resumed, and a running one wakes the I/O thread, which waits for this caller to let
        // go (`contended`: `let_go` reads them). A read that finds nothing cost every round
        // trip a system call. (With a ring, later frames reach the I/O thread the same way:
        // they come with a wake-up byte once it said it sleeps, and `let_go` makes sure it
        // still says so after this caller took a wake-up.)
        if self.hand_on_decoded(&mut state) {
            // Something is left for the I/O thread: `let_go` wakes it.
            self.contended.store(true, Ordering::SeqCst);
        }
        claimed
    }

    /// After a caller let go: if the I/O thread found the reader taken meanwhile, the bytes
    /// that woke it may have come after the caller's last read, and it will not be woken for
    /// them again. The caller takes the reader once more and reads the socket until it is
    /// empty; only if something is left for the I/O thread (the end of the stream, a partial
    /// frame) does it wake it. Waking it every time cost a system call and a thread on the
    /// other CPU per round trip (the low-latency mode's p50 went from 22 to 31-36 µs).
    ///
    /// With a ring, a caller that read a wake-up byte re-arms the I/O thread's bit first: the
    /// worker cleared every sleeper's bit as it sent that byte, and the I/O thread, asleep
    /// behind a paused watch, never saw it; without its bit, later frames would not wake it.
    fn let_go(&self) {
        if self.took_wake.swap(false, Ordering::AcqRel) {
            if let Some(ring) = &self.ring {
                if ring.sleeping(ring::IO_THREAD) {
                    // Bytes came in between, with no wake-up: this caller reads them, below.
                    self.contended.store(true, Ordering::SeqCst);
                }
            }
        }
        while self.contended.swap(false, Ordering::SeqCst) {
            let mut state = match self.state.try_lock() {
                Ok(state) => state,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                // The I/O thread has it now, and reads until the socket is empty.
                Err(TryLockError::WouldBlock) => return,
            };
            if self.hand_on_rest(&mut state) {
                drop(state);
                self.released.notify_one();
                return;
            }
        }
    }

    /// For a caller that found the I/O thread waiting for it (see [`Self::let_go`]): hands on
    /// the frames it read, and reads the socket until it is empty. True when something is
    /// left for the I/O thread (a partial frame, the end of the stream, a frame the scheduler
    /// could not take).
    fn hand_on_rest(&self, state: &mut ReadState) -> bool {
        loop {
            if self.hand_on_decoded(state) {
                return true;
            }
            match self.recv(state, true) {
                Ok(true) => {}
                Ok(false) => return false,
                Err(end) => {
                    state.ended = Some(end);
                    return true;
                }
            }
        }
    }

    /// Hands on the whole frames the decoder holds; reads nothing. True when something is left
    /// for the I/O thread, as for [`Self::hand_on_rest`].
    fn hand_on_decoded(&self, state: &mut ReadState) -> bool {
        loop {
            match self.next_message(state) {
                Ok(Some(message)) => {
                    if self.send(message).is_err() {
                        return true;
                    }
                }
                Ok(None) => return state.ended.is_some() || state.decoder.has_partial(),
                Err(e) => {
                    state.ended = Some(End::Failed(e));
                    return true;
                }
            }
        }
    }

    fn read_answer_locked(
        &self,
        state: &mut MutexGuard<'_, ReadState>,
        (id, name): (RequestId, &'static str),
        done: &dyn Fn() -> bool,
        deadline: Option<Instant>,
    ) -> Found {
        let hint = self.answers_wait.load(Ordering::Relaxed) && id % HINT_CHECK != 0;
        let mut poll_first = hint;
        let mut waited = false;
        loop {
            match self.next_message(state) {
                Ok(Some(ToParent::Done {
                    id: answered,
                    output,
                })) if answered == id => {
                    if self.answers_wait.load(Ordering::Relaxed) != waited {
                        self.answers_wait.store(waited, Ordering::Relaxed);
                    }
                    return Found::Answer(output);
                }
                // An event the task emitted: re-emitted here, under the task's name (the
                // scheduler may never see the request, so it could not name it).
                Ok(Some(ToParent::Log(record))) if record.request == Some(id) => {
                    forward::emit(self.pid, Some(name), &record);
                    continue;
                }
                Ok(Some(message)) => {
                    if self.send(message).is_err() {
                        return Found::Nothing;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    state.ended = Some(End::Failed(e));
                    return Found::Nothing;
                }
            }
            if state.ended.is_some() || done() {
                return Found::Nothing;
            }
            if std::mem::take(&mut poll_first) {
                // Past its deadline it still reads once: the answer may be there.
                if let Some(wait) = wait_time(deadline) {
                    self.wait_readable(wait);
                    waited = true;
                }
            }
            match self.recv(state, false) {
                Ok(true) => {}
                Ok(false) => {
                    let Some(wait) = wait_time(deadline) else {
                        return Found::Nothing;
                    };
                    self.wait_readable(wait);
                    waited = true;
                }
                Err(end) => {
                    state.ended = Some(end);
                    return Found::Nothing;
                }
            }
        }
    }

    /// The next whole frame the decoder holds, as the scheduler takes it (an answer in a
    /// shared-memory segment becomes a plain one: see `segments`).
    fn next_message(&self, state: &mut ReadState) -> Result<Option<ToParent>, String> {
        match state.decoder.next_message::<ToParent>() {
            Ok(Some(message)) => self.segments.answered(message).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// One non-blocking read into the decoder: true when bytes came, false when there were
    /// none; the end of the stream or an error as `Err`. With a ring, `to_the_end` reads the
    /// socket's signals until it is empty (the I/O thread: its watch reports an edge once, and
    /// the end of the stream may have come with the bytes that woke it); a caller stops at a
    /// short read, and leaves the end of the stream to the I/O thread.
    fn recv(&self, state: &mut ReadState, to_the_end: bool) -> Result<bool, End> {
        if state.ring.is_some() {
            self.recv_ring(state, to_the_end)
        } else {
            self.recv_socket(state)
        }
    }

    /// [`Self::recv`] for a connection with a ring: the socket is read only when it woke
    /// someone or descriptors are due, the ring otherwise. At the end of the stream, what the
    /// worker published before it went is read first.
    fn recv_ring(&self, state: &mut ReadState, to_the_end: bool) -> Result<bool, End> {
        let ReadState {
            decoder,
            ring: Some(ring),
            socket_ended,
            ..
        } = state
        else {
            return Ok(false);
        };
        let failed = |e: ring::RingError| End::Failed(e.to_string());
        // In this order: the descriptors of every frame published so far were sent before
        // it, so they are in the socket by the time `carriers_due` counts them.
        let mut available = ring.available().map_err(failed)?;
        let due = ring.carriers_due();
        let look = due > 0 || self.socket_pending.swap(false, Ordering::AcqRel);
        if look && self.read_signals(decoder, ring, due, to_the_end)? {
            *socket_ended = true;
            // The worker is gone: all it published is there now.
            available = ring.available().map_err(failed)?;
        }
        if available > 0 {
            let n = ring.read(decoder.read_buf(), available);
            decoder.filled(n);
            return Ok(true);
        }
        if *socket_ended {
            return match decoder.finish() {
                Ok(()) => Err(End::Eof),
                Err(e) => Err(End::Failed(e.to_string())),
            };
        }
        Ok(false)
    }

    /// Reads the socket of a connection with a ring: wake-ups, and the carrier bytes of `due`
    /// descriptors' messages (which must be there), queueing the descriptors in `decoder`;
    /// until the socket is empty if `to_the_end`. True at the end of the stream. A wake-up
    /// taken here may have been meant for the I/O thread too (the worker clears every
    /// sleeper's bit as it wakes them): `took_wake` has the caller re-arm it as it lets go.
    fn read_signals(
        &self,
        decoder: &mut FrameDecoder,
        ring: &mut Consumer,
        mut due: u64,
        to_the_end: bool,
    ) -> Result<bool, End> {
        let mut bytes = [0u8; 256];
        loop {
            let mut fds = Vec::new();
            let read = fdpass::recv(
                self.watch.socket().as_raw_fd(),
                &mut bytes,
                &mut fds,
                libc::MSG_DONTWAIT,
            );
            match read {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    let signals = &bytes[..n];
                    if signals.iter().any(|&b| b > ring::CARRIER) {
                        return Err(End::Failed(
                            "the worker wrote to the socket past its answer ring".to_owned(),
                        ));
                    }
                    let carriers = signals.iter().filter(|&&b| b == ring::CARRIER).count();
                    if carriers < n {
                        self.took_wake.store(true, Ordering::Release);
                    }
                    ring.carriers_read(carriers as u64);
                    due = due.saturating_sub(carriers as u64);
                    if let Err(e) = decoder.received_fds(fds) {
                        return Err(End::Failed(e.to_string()));
                    }
                    if due == 0 && n < bytes.len() && !to_the_end {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if due > 0 {
                        return Err(End::Failed(
                            "the worker announced descriptors it did not send".to_owned(),
                        ));
                    }
                    return Ok(false);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Failed(e.to_string())),
            }
        }
    }

    /// [`Self::recv`] for a connection without a ring: the frames come through the socket.
    fn recv_socket(&self, state: &mut ReadState) -> Result<bool, End> {
        let mut fds = Vec::new();
        loop {
            let read = fdpass::recv(
                self.watch.socket().as_raw_fd(),
                state.decoder.read_buf(),
                &mut fds,
                libc::MSG_DONTWAIT,
            );
            match read {
                Ok(0) => {
                    return match state.decoder.finish() {
                        Ok(()) => Err(End::Eof),
                        Err(e) => Err(End::Failed(e.to_string())),
                    }
                }
                Ok(n) => {
                    state.decoder.filled(n);
                    if let Err(e) = state.decoder.received_fds(fds) {
                        return Err(End::Failed(e.to_string()));
                    }
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Failed(e.to_string())),
            }
        }
    }

    fn wait_readable(&self, timeout: Duration) {
        if let Some(ring) = &self.ring {
            // Bytes published before this are read now; after it, the worker wakes us.
            if ring.sleeping(ring::CALLER) {
                ring.awake(ring::CALLER);
                return;
            }
        }
        self.poll(timeout);
        if let Some(ring) = &self.ring {
            ring.awake(ring::CALLER);
        }
        self.socket_pending.store(true, Ordering::Release);
    }

    fn poll(&self, timeout: Duration) {
        let mut fds = [libc::pollfd {
            fd: self.watch.socket().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fds` is a live array of one pollfd, and its length is passed; the timeout
        // bounds the wait, and the caller reads (or gives up) whatever woke it.
        unsafe {
            libc::poll(fds.as_mut_ptr(), 1, ms);
        }
    }

    /// Hands `message` to the scheduler (noting the id of an answer: see `handed_on`).
    fn send(&self, message: ToParent) -> Result<(), ()> {
        self.note_handed_on(&message);
        self.events
            .send(Event::Message {
                pid: self.pid,
                message,
            })
            .map_err(|_| ())
    }

    /// Hands `messages` to the scheduler in one event (one alone as it is), for a reader
    /// that noted each as handed on.
    fn send_all(&self, mut messages: Vec<ToParent>) -> Result<(), ()> {
        let event = match messages.len() {
            0 => return Ok(()),
            1 => match messages.pop() {
                Some(message) => Event::Message {
                    pid: self.pid,
                    message,
                },
                None => return Ok(()),
            },
            _ => Event::Messages {
                pid: self.pid,
                messages,
            },
        };
        self.events.send(event).map_err(|_| ())
    }

    /// Notes the id of an answer about to be handed on: see `handed_on`.
    fn note_handed_on(&self, message: &ToParent) {
        if let ToParent::Done { id, .. } = message {
            self.handed_on.store(*id, Ordering::Release);
        }
    }

    /// For the I/O thread, after the socket woke it: the next read looks at the socket.
    pub(crate) fn socket_woke(&self) {
        self.socket_pending.store(true, Ordering::Release);
    }

    /// For the I/O thread, about to sleep (and now and then while it is busy): from now on
    /// the worker wakes it with its next frame. Frames it published meanwhile came with no
    /// wake-up, so the I/O thread is told to read them first (through `released`), or, when
    /// a caller holds the reader, the caller is (`contended`: it reads them as it lets go).
    pub(crate) fn before_sleep(&self) {
        let Some(ring) = &self.ring else {
            return;
        };
        if !ring.sleeping(ring::IO_THREAD) {
            return;
        }
        if self.wake_reader() {
            // Not sleeping after all: no wake-up is needed for these.
            ring.awake(ring::IO_THREAD);
        }
        // Otherwise a caller reads them as it lets go, and the I/O thread sleeps with its bit
        // set: later frames wake it.
    }

    /// For the I/O thread while it is busy: frames in the ring are read (see
    /// [`Self::before_sleep`]).
    pub(crate) fn look_at_ring(&self) {
        if self.ring.as_ref().is_some_and(RingWatch::has_bytes) {
            let _ = self.wake_reader();
        }
    }

    /// Has the connection's reader run: the I/O thread's (true), or a caller's that holds it
    /// (false: it reads as it lets go).
    fn wake_reader(&self) -> bool {
        match self.state.try_lock() {
            Err(TryLockError::WouldBlock) => {
                // As in `drain`: the caller checks this after it lets go; it may have let go
                // just now, before seeing it.
                self.contended.store(true, Ordering::SeqCst);
                if let Err(TryLockError::WouldBlock) = self.state.try_lock() {
                    return false;
                }
            }
            Ok(_) | Err(TryLockError::Poisoned(_)) => {}
        }
        self.released.notify_one();
        true
    }

    /// Stops the reactor's watch from reporting bytes (see `watch`); false if it could not
    /// (then the reactor is woken by every answer, which costs time, nothing else).
    pub(crate) fn pause_watch(&self) -> bool {
        self.watch.pause().is_ok()
    }

    /// Lets the reactor's watch report bytes again (at once, if some wait).
    pub(crate) fn resume_watch(&self) {
        if self.watch.resume().is_err() {
            // Cannot happen with both descriptors open; if it did, the reactor would wait on
            // this socket forever. It is woken now, and ends the connection.
            self.watch_lost.store(true, Ordering::Release);
            self.released.notify_one();
        }
    }

    /// Tells the scheduler a caller finished request(s) it wrote to this worker.
    pub(crate) fn notify_direct_done(&self) {
        let _ = self.events.send(Event::DirectDone { pid: self.pid });
    }
}

/// How long a helping caller waits in one `poll`: until its deadline, at most [`HELP_POLL`];
/// `None` once the deadline has passed.
fn wait_time(deadline: Option<Instant>) -> Option<Duration> {
    match deadline {
        None => Some(HELP_POLL),
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            (!left.is_zero()).then(|| left.min(HELP_POLL))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use offload_ipc::frame;
    use offload_ipc::protocol::LogRecord;
    use offload_ipc::ring::Producer;
    use tokio::sync::mpsc::UnboundedReceiver;

    use super::*;

    fn wire(messages: &[ToParent]) -> Vec<u8> {
        let mut out = Vec::new();
        for message in messages {
            frame::encode(message, &mut out, 1 << 20).unwrap();
        }
        out
    }

    fn done(id: u64, byte: u8) -> ToParent {
        ToParent::Done {
            id,
            output: Ok(Blob::new(vec![byte])),
        }
    }

    fn log(message: &str) -> ToParent {
        ToParent::Log(LogRecord {
            request: Some(8),
            level: 3,
            target: "t".into(),
            message: message.into(),
            fields: Vec::new(),
        })
    }

    fn setup() -> (SharedReader, UnixStream, UnboundedReceiver<Event>) {
        let (ours, peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let (events, received) = tokio::sync::mpsc::unbounded_channel();
        let watch = Arc::new(ReadWatch::new(ours.as_fd()).unwrap());
        let reader = SharedReader::new(5, watch, FrameDecoder::new(1 << 20), None, events);
        (reader, peer, received)
    }

    /// The frames the scheduler got, in order, with the worker's pid (one event may carry
    /// several); `other` for any other event.
    fn frames(received: &mut UnboundedReceiver<Event>) -> Vec<Option<(u32, ToParent)>> {
        let mut out = Vec::new();
        while let Ok(event) = received.try_recv() {
            match event {
                Event::Message { pid, message } => out.push(Some((pid, message))),
                Event::Messages { pid, messages } => {
                    assert!(messages.len() > 1, "a lone frame goes as a Message");
                    out.extend(messages.into_iter().map(|m| Some((pid, m))));
                }
                _ => out.push(None),
            }
        }
        out
    }

    fn forwarded(received: &mut UnboundedReceiver<Event>) -> Vec<String> {
        frames(received)
            .into_iter()
            .map(|frame| match frame {
                Some((5, ToParent::Done { id, .. })) => format!("done {id}"),
                Some((5, ToParent::Log(record))) => format!("log {}", record.message),
                _ => "other".into(),
            })
            .collect()
    }

    fn soon() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(5))
    }

    /// The caller takes its own answer; every other frame reaches the scheduler in order,
    /// including those that came in the same read after the answer, and a partial frame is
    /// left for the I/O thread.
    #[test]
    fn a_caller_takes_its_answer_and_hands_on_everything_else_in_order() {
        let (reader, mut peer, mut received) = setup();
        let mut bytes = wire(&[log("before"), done(7, 1), done(9, 2), log("after")]);
        let tail = wire(&[log("split")]);
        bytes.extend_from_slice(&tail[..5]);
        peer.write_all(&bytes).unwrap();

        let answer = reader.read_answer((9, "t"), &|| false, soon(), || Some(()));
        assert_eq!(answer, Some(((), Ok(Blob::new(vec![2])))));
        assert_eq!(
            forwarded(&mut received),
            ["log before", "done 7", "log after"]
        );

        peer.write_all(&tail[5..]).unwrap();
        assert!(matches!(reader.drain(), Drained::Empty));
        assert_eq!(forwarded(&mut received), ["log split"]);
    }

    /// A caller waits for an answer that comes later, within its deadline.
    #[test]
    fn a_caller_waits_for_its_answer() {
        let (reader, mut peer, _received) = setup();
        // The second and third callers wait in `poll` first (the first one's answer had not
        // come when it looked); they get their answers, late or there, all the same.
        for (id, late) in [(3, true), (4, false), (5, true)] {
            if !late {
                peer.write_all(&wire(&[done(id, 4)])).unwrap();
            }
            let writer = std::thread::spawn(move || {
                if late {
                    std::thread::sleep(Duration::from_millis(50));
                    peer.write_all(&wire(&[done(id, 4)])).unwrap();
                }
                peer
            });
            assert_eq!(
                reader.read_answer((id, "t"), &|| false, soon(), || Some(())),
                Some(((), Ok(Blob::new(vec![4])))),
                "request {id}"
            );
            peer = writer.join().unwrap();
        }
    }

    /// The hint to wait in `poll` first, set by an answer that came late, is cleared again
    /// within [`HINT_CHECK`] answers that were there at the first look.
    #[test]
    fn the_poll_first_hint_is_cleared_when_answers_are_there() {
        let (reader, mut peer, _received) = setup();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            peer.write_all(&wire(&[done(1, 4)])).unwrap();
            peer
        });
        assert!(reader
            .read_answer((1, "t"), &|| false, soon(), || Some(()))
            .is_some());
        let mut peer = writer.join().unwrap();
        assert!(
            reader.answers_wait.load(Ordering::Relaxed),
            "a late answer sets it"
        );
        for id in 2..2 + HINT_CHECK {
            peer.write_all(&wire(&[done(id, 4)])).unwrap();
            assert!(reader
                .read_answer((id, "t"), &|| false, soon(), || Some(()))
                .is_some());
        }
        assert!(
            !reader.answers_wait.load(Ordering::Relaxed),
            "{HINT_CHECK} answers were there at the first look, yet the hint is still set"
        );
    }

    /// A caller whose deadline has passed still takes an answer that is there, also when
    /// the hint says to wait in `poll` first.
    #[test]
    fn an_expired_wait_still_takes_an_answer_that_is_there() {
        let (reader, mut peer, _received) = setup();
        reader.answers_wait.store(true, Ordering::Relaxed);
        peer.write_all(&wire(&[done(3, 4)])).unwrap();
        assert_eq!(
            reader.read_answer((3, "t"), &|| false, Some(Instant::now()), || Some(())),
            Some(((), Ok(Blob::new(vec![4])))),
            "the answer was in the socket"
        );
    }

    /// Past its deadline, or once its handle resolved some other way, a caller gives up and
    /// the I/O thread reads on; the end of the stream is left for the I/O thread to report.
    #[test]
    fn a_caller_gives_up_at_its_deadline_at_done_and_at_the_end_of_the_stream() {
        let (reader, mut peer, mut received) = setup();
        let start = Instant::now();
        let deadline = Some(start + Duration::from_millis(30));
        assert_eq!(
            reader.read_answer((1, "t"), &|| false, deadline, || Some(())),
            None
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(
            reader.read_answer((1, "t"), &|| true, None, || Some(())),
            None
        );

        peer.write_all(&wire(&[done(1, 1)])).unwrap();
        assert!(matches!(reader.drain(), Drained::Empty));
        assert_eq!(forwarded(&mut received), ["done 1"]);

        drop(peer);
        assert_eq!(
            reader.read_answer((2, "t"), &|| false, soon(), || Some(())),
            None
        );
        assert!(matches!(reader.drain(), Drained::Ended(End::Eof)));
    }

    /// An answer the I/O thread handed to the scheduler before the caller came is not
    /// waited for.
    #[test]
    fn a_caller_that_comes_after_the_io_thread_read_its_answer_does_not_wait_for_it() {
        let (reader, mut peer, mut received) = setup();
        peer.write_all(&wire(&[done(4, 1)])).unwrap();
        assert!(matches!(reader.drain(), Drained::Empty));
        assert_eq!(forwarded(&mut received), ["done 4"]);
        let start = Instant::now();
        assert_eq!(
            reader.read_answer((4, "t"), &|| false, soon(), || Some(())),
            None
        );
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    /// An answer whose request the scheduler took over goes to the scheduler in its place
    /// among the frames, before those that came after it.
    #[test]
    fn an_answer_the_caller_cannot_claim_goes_to_the_scheduler_in_order() {
        let (reader, mut peer, mut received) = setup();
        peer.write_all(&wire(&[done(9, 1), log("after")])).unwrap();
        let claimed: Option<((), _)> = reader.read_answer((9, "t"), &|| false, soon(), || None);
        assert_eq!(claimed, None);
        assert_eq!(forwarded(&mut received), ["done 9", "log after"]);
    }

    /// If the I/O thread found the reader taken while a caller read, the caller wakes it when
    /// it lets go: bytes that woke it may have come after the caller's last read.
    #[test]
    fn a_caller_wakes_the_io_thread_that_found_the_reader_taken() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let woken = |reader: &SharedReader| {
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_millis(50), reader.released.notified())
                    .await
                    .is_ok()
            })
        };
        let (reader, mut peer, mut received) = setup();
        peer.write_all(&wire(&[done(1, 1)])).unwrap();
        let tail = wire(&[done(2, 2)]);
        let claimed = reader.read_answer((1, "t"), &|| false, soon(), || {
            // Called with the reader held: the I/O thread finds it taken, woken by bytes that
            // came after the caller's last read: half a frame.
            peer.write_all(&tail[..3]).unwrap();
            assert!(matches!(reader.drain(), Drained::Busy));
            Some(())
        });
        assert!(claimed.is_some());
        assert!(woken(&reader), "the I/O thread was not told to look again");
        // The rest of the frame wakes the I/O thread as usual.
        peer.write_all(&tail[3..]).unwrap();
        assert!(matches!(reader.drain(), Drained::Empty));
        assert_eq!(forwarded(&mut received), ["done 2"]);

        // Whole frames that came while the I/O thread waited: the caller reads them itself
        // when it lets go, and saves the wake-up (a system call on its way back).
        peer.write_all(&wire(&[done(3, 3)])).unwrap();
        let claimed = reader.read_answer((3, "t"), &|| false, soon(), || {
            peer.write_all(&wire(&[done(4, 4)])).unwrap();
            assert!(matches!(reader.drain(), Drained::Busy));
            Some(())
        });
        assert!(claimed.is_some());
        assert_eq!(forwarded(&mut received), ["done 4"]);
        assert!(!woken(&reader));
    }

    /// While a caller reads, the I/O thread does not wait for the lock.
    #[test]
    fn the_io_thread_never_waits_for_a_reading_caller() {
        let (reader, _peer, _received) = setup();
        let state = reader.state.lock().unwrap();
        assert!(matches!(reader.drain(), Drained::Busy));
        drop(state);
        assert!(matches!(reader.drain(), Drained::Empty));
    }

    /// A reader whose worker writes into a ring, as after a handshake: the reader, the
    /// worker's end of the ring, and the worker's end of the socket.
    fn setup_ring() -> (SharedReader, Producer, UnixStream, UnboundedReceiver<Event>) {
        let (ours, peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let (events, received) = tokio::sync::mpsc::unbounded_channel();
        let watch = Arc::new(ReadWatch::new(ours.as_fd()).unwrap());
        let (consumer, memory) = ring::create().unwrap();
        // The worker maps the same memory again, as it does from its `Welcome`.
        let fd = offload_core::backend::segment_of(&memory).unwrap().clone();
        let producer =
            Producer::new(offload_core::backend::map_segment(fd, memory.len()).unwrap()).unwrap();
        let decoder = FrameDecoder::new(1 << 20);
        let reader = SharedReader::new(5, watch, decoder, Some(consumer), events);
        (reader, producer, peer, received)
    }

    /// What the worker does with a frame (`offload_ipc::worker`'s outbox).
    fn publish(producer: &mut Producer, peer: &UnixStream, message: &ToParent) {
        let (mut buf, mut fds) = (Vec::new(), Vec::new());
        frame::encode_with_fds(message, &mut buf, &mut fds, 1 << 20).unwrap();
        producer
            .send(peer.as_fd().as_raw_fd(), &buf, &fds, &[])
            .unwrap();
    }

    fn drain_until(reader: &SharedReader, received: &mut UnboundedReceiver<Event>, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = 0;
        while got < n {
            assert!(Instant::now() < deadline, "{got} of {n} frames in 10 s");
            match reader.drain() {
                Drained::Ended(End::Failed(e)) => panic!("after {got} frames: {e}"),
                Drained::Ended(End::Eof) => panic!("the end after {got} frames"),
                Drained::Empty | Drained::Busy => {}
            }
            // Everything the scheduler would see must decode, descriptors included.
            for frame in frames(received) {
                match frame {
                    Some((_, ToParent::Done { output, .. })) => {
                        assert_eq!(output.unwrap().fds().len(), 2);
                        got += 1;
                    }
                    _ => panic!("not an answer"),
                }
            }
            reader.socket_woke();
        }
    }

    /// A frame's descriptors come through the socket before its bytes are published; a
    /// reader that takes bytes published after it counted the descriptors due would decode
    /// a frame without them (this failed now and then before the reader kept to the bytes
    /// it had counted for).
    #[test]
    fn with_a_ring_every_frame_has_its_descriptors_while_the_worker_keeps_writing() {
        let (reader, mut producer, peer, mut received) = setup_ring();
        let n = 3000;
        let writer = std::thread::spawn(move || {
            let null = std::fs::File::open("/dev/null").unwrap();
            for id in 0..n {
                let fds = (0..2)
                    .map(|_| offload_core::backend::Fd::new(null.try_clone().unwrap().into()))
                    .collect();
                let output = Blob::new(vec![1]).with_fds(fds);
                publish(
                    &mut producer,
                    &peer,
                    &ToParent::Done {
                        id,
                        output: Ok(output),
                    },
                );
            }
            (producer, peer)
        });
        drain_until(&reader, &mut received, n as usize);
        let _ends = writer.join().unwrap();
    }

    /// Frames a worker published and nobody read yet are read at the end of its stream:
    /// an answer written just before a crash is not lost.
    #[test]
    fn with_a_ring_what_a_worker_published_before_it_went_is_read_before_the_end() {
        let (reader, mut producer, peer, mut received) = setup_ring();
        publish(&mut producer, &peer, &done(1, 1));
        publish(&mut producer, &peer, &done(2, 2));
        drop(peer);
        let ended = loop {
            match reader.drain() {
                Drained::Ended(end) => break end,
                Drained::Empty | Drained::Busy => reader.socket_woke(),
            }
        };
        assert!(matches!(ended, End::Eof));
        assert_eq!(forwarded(&mut received), ["done 1", "done 2"]);
    }

    /// What one look at the connection finds reaches the scheduler as one event, in the order
    /// the worker wrote it: a burst of answers costs one channel operation, not one each.
    #[test]
    fn one_look_hands_on_its_frames_in_one_event_in_order() {
        let (reader, mut producer, peer, mut received) = setup_ring();
        for id in 1..=3 {
            publish(&mut producer, &peer, &done(id, 1));
        }
        assert!(matches!(reader.drain(), Drained::Empty));
        let Ok(Event::Messages { pid: 5, messages }) = received.try_recv() else {
            panic!("not one event of several frames");
        };
        let ids: Vec<u64> = messages
            .iter()
            .map(|m| match m {
                ToParent::Done { id, .. } => *id,
                _ => panic!("not an answer"),
            })
            .collect();
        assert_eq!(ids, [1, 2, 3]);
        assert!(received.try_recv().is_err(), "a second event");
    }

    /// With a ring the socket carries one-byte signals only: anything else is not the
    /// protocol, and ends the connection.
    #[test]
    fn with_a_ring_other_bytes_on_the_socket_end_the_connection() {
        let (reader, _producer, mut peer, _received) = setup_ring();
        peer.write_all(b"x").unwrap();
        match reader.drain() {
            Drained::Ended(End::Failed(e)) => assert!(e.contains("past its answer ring"), "{e}"),
            _ => panic!("a stray byte was accepted"),
        }
    }

    /// A caller waiting for its answer sleeps in `poll` and is woken by the worker's signal;
    /// frames that came while nobody slept are read without one.
    #[test]
    fn with_a_ring_a_sleeping_caller_is_woken_by_its_answer() {
        let (reader, mut producer, peer, _received) = setup_ring();
        publish(&mut producer, &peer, &done(1, 1));
        assert_eq!(
            reader.read_answer((1, "t"), &|| false, soon(), || Some(())),
            Some(((), Ok(Blob::new(vec![1]))))
        );
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            publish(&mut producer, &peer, &done(2, 2));
            (producer, peer)
        });
        let started = Instant::now();
        assert_eq!(
            reader.read_answer((2, "t"), &|| false, soon(), || Some(())),
            Some(((), Ok(Blob::new(vec![2]))))
        );
        // Woken, not found by a `poll` that timed out.
        assert!(
            started.elapsed() < HELP_POLL * 50,
            "{:?}",
            started.elapsed()
        );
        let _ends = writer.join().unwrap();
    }

    /// Frames that came while the I/O thread was busy bring no wake-up: before it sleeps it
    /// is told to read them.
    #[test]
    fn with_a_ring_the_io_thread_reads_what_came_before_it_sleeps() {
        let (reader, mut producer, peer, mut received) = setup_ring();
        assert!(matches!(reader.drain(), Drained::Empty));
        publish(&mut producer, &peer, &done(3, 3));
        reader.before_sleep();
        let told = futures::FutureExt::now_or_never(reader.released.notified());
        assert!(
            told.is_some(),
            "not told to read the frame waiting in the ring"
        );
        assert!(matches!(reader.drain(), Drained::Empty));
        assert_eq!(forwarded(&mut received), ["done 3"]);
        // Asleep now: the next frame wakes it through the socket.
        reader.before_sleep();
        publish(&mut producer, &peer, &done(4, 4));
        let mut signal = [0u8; 4];
        let socket = reader.watch.socket().as_raw_fd();
        let n = fdpass::recv(socket, &mut signal, &mut Vec::new(), libc::MSG_DONTWAIT).unwrap();
        assert_eq!(&signal[..n], &[ring::WAKE]);
    }

    /// The signal bytes waiting on the reader's socket, read without waiting.
    fn signals(reader: &SharedReader) -> Vec<u8> {
        let mut bytes = [0u8; 16];
        let socket = reader.watch.socket().as_raw_fd();
        match fdpass::recv(socket, &mut bytes, &mut Vec::new(), libc::MSG_DONTWAIT) {
            Ok(n) => bytes[..n].to_vec(),
            Err(_) => Vec::new(),
        }
    }

    /// The I/O thread's watch reports an edge once: if the worker's end came in the same
    /// read as a wake-up, one look must find both (it found the wake-up only, and the
    /// disconnect waited for the worker's exit to be noticed).
    #[test]
    fn with_a_ring_one_look_finds_the_end_behind_a_wake_up() {
        let (reader, mut producer, peer, mut received) = setup_ring();
        assert!(matches!(reader.drain(), Drained::Empty));
        reader.before_sleep();
        publish(&mut producer, &peer, &done(1, 1));
        drop(peer);
        reader.socket_woke();
        assert!(matches!(reader.drain(), Drained::Ended(End::Eof)));
        assert_eq!(forwarded(&mut received), ["done 1"]);
    }

    /// A wake-up the worker sent while both the I/O thread and a caller slept clears both
    /// their bits, and only the caller reads it: it must re-arm the I/O thread's, or the
    /// next frame for the scheduler wakes nobody.
    #[test]
    fn with_a_ring_a_caller_that_took_a_wake_up_leaves_the_io_thread_armed() {
        let (reader, mut producer, peer, _received) = setup_ring();
        assert!(matches!(reader.drain(), Drained::Empty));
        reader.before_sleep();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            publish(&mut producer, &peer, &done(2, 2));
            (producer, peer)
        });
        assert!(reader
            .read_answer((2, "t"), &|| false, soon(), || Some(()))
            .is_some());
        let (mut producer, peer) = writer.join().unwrap();
        assert!(signals(&reader).is_empty(), "the caller read its wake-up");
        publish(&mut producer, &peer, &done(3, 3));
        assert_eq!(
            signals(&reader),
            [ring::WAKE],
            "the sleeping I/O thread was not woken"
        );
    }

    /// Frames a caller holding the reader is told to read (the I/O thread found it busy as
    /// it went to sleep) leave the I/O thread's bit set: the next frame wakes it.
    #[test]
    fn with_a_ring_frames_left_to_a_caller_leave_the_io_thread_armed() {
        let (reader, mut producer, peer, mut received) = setup_ring();
        assert!(matches!(reader.drain(), Drained::Empty));
        publish(&mut producer, &peer, &done(1, 1));
        let held = reader.state.lock().unwrap();
        reader.before_sleep();
        drop(held);
        // What a caller does as it lets go.
        reader.let_go();
        assert_eq!(forwarded(&mut received), ["done 1"]);
        publish(&mut producer, &peer, &done(2, 2));
        assert_eq!(
            signals(&reader),
            [ring::WAKE],
            "the sleeping I/O thread was not woken"
        );
    }
}
