//! A worker connection's socket on the reactor, watched for reading only.
//!
//! tokio's own socket types register with epoll for reading *and* writing. A Unix socket
//! reports "writable" each time its peer reads what was written to it, so every request a
//! worker read would wake the reactor thread once for nothing, before the answer woke it
//! again. Here the reactor watches the socket for reading alone, through a [`ReadWatch`] that
//! a caller reading its own answer can pause; a write that finds the socket full (rare: large
//! payloads, floods) registers a duplicate for writing just while it waits.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use interprocess::local_socket::tokio::Stream;
use offload_core::backend::Fd;
use offload_ipc::fdpass;
use offload_ipc::frame::FrameDecoder;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::connection::ReadError;
use crate::watch::ReadWatch;

pub(crate) struct Socket {
    stream: UnixStream,
    /// The reactor's registration of the socket's read watch.
    readable: AsyncFd<Arc<ReadWatch>>,
}

impl Socket {
    /// Takes over an accepted connection (already non-blocking).
    pub(crate) fn new(stream: Stream) -> std::io::Result<Socket> {
        let Stream::UdSocket(stream) = stream;
        let stream = UnixStream::from(OwnedFd::try_from(stream)?);
        let watch = Arc::new(ReadWatch::new(stream.as_fd())?);
        // SAFETY: the `Arc` keeps the watch, and so the set's descriptor, open until the
        // `AsyncFd` drops it, which it does last, after deregistering.
        let readable = unsafe { AsyncFd::register_with_interest(watch, Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Socket { stream, readable })
    }

    pub(crate) fn get_ref(&self) -> &UnixStream {
        &self.stream
    }

    /// The watch the reactor waits on, for a caller that reads the socket itself.
    pub(crate) fn watch(&self) -> &Arc<ReadWatch> {
        self.readable.get_ref()
    }

    /// Reads what is there into `decoder`, waiting for something if need be; 0 at the end of
    /// the stream. Descriptors that arrive with the bytes are queued in the decoder.
    pub(crate) async fn read(&self, decoder: &mut FrameDecoder) -> Result<usize, ReadError> {
        let mut fds = Vec::new();
        let n = loop {
            let mut ready = self.readable.readable().await?;
            let socket = self.stream.as_raw_fd();
            match ready.try_io(|_| fdpass::recv(socket, decoder.read_buf(), &mut fds, 0)) {
                Ok(result) => break result?,
                Err(_would_block) => continue,
            }
        };
        decoder.received_fds(fds)?;
        Ok(n)
    }

    /// Waits until the socket has something to read (or has ended). Readiness is cleared at
    /// once: the caller reads until the socket is empty after every wake-up (a caller
    /// helping in `reader` may have taken the bytes that woke it).
    pub(crate) async fn readable(&self) -> std::io::Result<()> {
        let mut ready = self.readable.readable().await?;
        ready.clear_ready();
        Ok(())
    }

    /// Writes all of `buf`, `fds` with its first bytes (see [`fdpass::Outgoing`]).
    pub(crate) async fn write_all(&self, buf: &[u8], fds: &[Fd]) -> std::io::Result<()> {
        let socket = self.stream.as_raw_fd();
        let mut outgoing = fdpass::Outgoing::new(buf, fds);
        while !outgoing.is_done() {
            match outgoing.send_next(socket, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Waits until the socket has room, through a registration that lasts only this wait.
    async fn writable(&self) -> std::io::Result<()> {
        let duplicate = self.stream.try_clone()?;
        // SAFETY: a `UnixStream` owns its descriptor: it stays open, and `as_raw_fd` returns
        // that same descriptor, until the stream is dropped, which the `AsyncFd` does last.
        let waiter = unsafe { AsyncFd::register_with_interest(duplicate, Interest::WRITABLE) }
            .map_err(std::io::Error::from)?;
        let _ready = waiter.writable().await?;
        Ok(())
    }
}
