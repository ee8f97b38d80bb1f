//! The read side of a worker's connection: frames from the parent, decoded.
//!
//! Reads never block in `read(2)`: the reader waits in `poll(2)` for `POLLIN`, then reads with
//! `MSG_DONTWAIT`. A thread blocked in a Unix socket's `read` is woken each time the parent
//! reads what this worker wrote (the kernel wakes the socket's waiters for write space, and a
//! blocked read does not filter by event); one waiting in `poll` is woken for input only. That
//! is one wake-up less per request.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use interprocess::local_socket::Stream;

use super::{exit_code, WorkerExit};
use crate::fdpass;
use crate::frame::{FrameDecoder, FrameError, DEFAULT_MAX_FRAME};
use crate::protocol::ToWorker;

/// Reads and decodes frames from the parent.
pub(super) struct Reader {
    recv: &'static Stream,
    pub(super) decoder: FrameDecoder,
    /// The last read brought one message after a wait: the next request most likely has
    /// not come yet either (a caller's round trips), so [`Reader::read_some`] waits in
    /// `poll` before it reads, instead of first reading nothing. Cleared by a read that
    /// brings more (a burst), where reading first saves the `poll`.
    one_at_a_time: bool,
    /// The last read found the socket empty after it: it came back short of the room it was
    /// given, with no descriptors (a Unix stream read stops after a chunk that carries some,
    /// and the decoder sizes a read to end where a large frame ends). Only such a read may
    /// count as a cancel check's (see `inbox`): a cancel queued behind a large request, or
    /// behind one that brought a descriptor, is still in the socket.
    drained: bool,
}

/// What one non-blocking read found.
enum Read1 {
    Bytes(usize),
    Nothing,
    /// The end of the stream, or an error: the parent is gone either way.
    Closed,
    /// The connection cannot be used any more, for the reason given (descriptors lost or
    /// over the limit): the worker exits with a protocol error saying so.
    Broken(String),
}

impl Reader {
    pub(super) fn new(recv: &'static Stream) -> Self {
        Reader {
            recv,
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME),
            one_at_a_time: false,
            drained: false,
        }
    }

    fn fd(&self) -> RawFd {
        let Stream::UdSocket(socket) = self.recv;
        socket.as_fd().as_raw_fd()
    }

    /// The next message, blocking; `None` at a clean end of stream. For the handshake, before
    /// the worker's threads start.
    pub(super) fn next(&mut self) -> Result<Option<ToWorker>, WorkerExit> {
        loop {
            if let Some(message) = self
                .decoder
                .next_message()
                .map_err(|e| protocol_error(&e))?
            {
                return Ok(Some(message));
            }
            // Blocking: this is the handshake, before anything else runs.
            match self.read(0) {
                Read1::Bytes(n) => self.decoder.filled(n),
                Read1::Nothing => {}
                Read1::Closed => return self.finish().map(|()| None),
                Read1::Broken(reason) => return Err(broken(reason)),
            }
        }
    }

    /// The messages of one read (at least one), waiting for them if need be. With a `spin`,
    /// polls without sleeping for that long first (the low-latency mode), so a request that
    /// arrives soon is read without putting the thread to sleep. The end of the stream is an
    /// error with exit code `DONE`: the parent is gone.
    pub(super) fn read_some(&mut self, spin: Duration) -> Result<Vec<ToWorker>, WorkerExit> {
        let mut spin_until = (!spin.is_zero()).then(|| Instant::now() + spin);
        let mut turns = 0u32;
        let mut waited = false;
        // Nothing buffered (not even part of a frame): whole messages would be returned first.
        if spin_until.is_none() && self.one_at_a_time && !self.decoder.has_partial() {
            self.wait_readable();
            waited = true;
        }
        loop {
            let messages = self.read_available()?;
            if !messages.is_empty() {
                self.one_at_a_time = waited && messages.len() == 1;
                return Ok(messages);
            }
            waited = true;
            match spin_until {
                Some(end) => {
                    turns = turns.wrapping_add(1);
                    if turns % 16 == 0 {
                        if Instant::now() >= end {
                            spin_until = None;
                        } else {
                            // Lets the pool's threads run when every CPU is busy.
                            std::thread::yield_now();
                        }
                    }
                    std::hint::spin_loop();
                }
                None => self.wait_readable(),
            }
        }
    }

    /// Whether the messages last returned came with a read that emptied the socket: nothing
    /// that arrived before it, a cancel say, is left unread.
    pub(super) fn drained(&self) -> bool {
        self.drained
    }

    /// Every whole message that can be had without blocking: those already buffered, else
    /// those of one non-blocking read (maybe none).
    pub(super) fn read_available(&mut self) -> Result<Vec<ToWorker>, WorkerExit> {
        let mut messages = Vec::new();
        self.decoded(&mut messages)?;
        if !messages.is_empty() {
            // From the buffer: what waits in the socket is unknown.
            self.drained = false;
            return Ok(messages);
        }
        match self.try_read() {
            Read1::Bytes(n) => {
                self.decoder.filled(n);
                self.decoded(&mut messages)?;
                Ok(messages)
            }
            Read1::Nothing => Ok(messages),
            Read1::Broken(reason) => Err(broken(reason)),
            Read1::Closed => self.finish().and(Err(WorkerExit {
                code: exit_code::DONE,
                message: None,
            })),
        }
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

    /// At the end of the stream: a frame cut short is a protocol error.
    fn finish(&mut self) -> Result<(), WorkerExit> {
        self.decoder.finish().map_err(|e| protocol_error(&e))
    }

    /// One read that does not block.
    fn try_read(&mut self) -> Read1 {
        self.read(libc::MSG_DONTWAIT)
    }

    /// One read (with `flags`), and the descriptors that came with it queued in the decoder.
    fn read(&mut self, flags: libc::c_int) -> Read1 {
        let fd = self.fd();
        let mut fds = Vec::new();
        let buf = self.decoder.read_buf();
        let room = buf.len();
        let read = fdpass::recv(fd, buf, &mut fds, flags);
        self.drained = fds.is_empty()
            && match &read {
                Ok(n) => *n < room,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            };
        if let Err(e) = self.decoder.received_fds(fds) {
            return Read1::Broken(e.to_string());
        }
        match read {
            Ok(0) => Read1::Closed,
            Ok(n) => Read1::Bytes(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Read1::Nothing,
            // Descriptors lost on the way in (this worker is out of them): say so, rather
            // than exit as if the parent had gone.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Read1::Broken(e.to_string()),
            // A reset is how a dead parent looks from here: as final as an EOF.
            Err(_) => Read1::Closed,
        }
    }

    /// Waits until the connection has something to read (or has ended, or failed: the read
    /// that follows finds out which).
    fn wait_readable(&self) {
        let mut fds = [libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        loop {
            // SAFETY: `fds` is a live array of one pollfd struct, and its length is passed.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
            if rc >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                return;
            }
        }
    }
}

fn broken(reason: String) -> WorkerExit {
    WorkerExit::new(
        exit_code::PROTOCOL,
        format!("cannot read the pool's connection: {reason}"),
    )
}

fn protocol_error(e: &FrameError) -> WorkerExit {
    WorkerExit::new(exit_code::PROTOCOL, format!("bad frame from the pool: {e}"))
}
