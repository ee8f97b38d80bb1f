//! A worker connection's socket on the reactor, registered for reading only.
//!
//! tokio's own socket types register with epoll for reading *and* writing. A Unix socket
//! reports "writable" each time its peer reads what was written to it, so every request a
//! worker read would wake the reactor thread once for nothing, before the answer woke it
//! again. Here the socket is registered for reading alone; a write that finds the socket full
//! (rare: large payloads, floods) registers a duplicate for writing just while it waits.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use interprocess::local_socket::tokio::Stream;
use offload_core::backend::Fd;
use offload_ipc::fdpass;
use offload_ipc::frame::FrameDecoder;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::connection::ReadError;

pub(crate) struct Socket {
    fd: AsyncFd<UnixStream>,
}

impl Socket {
    /// Takes over an accepted connection (already non-blocking).
    pub(crate) fn new(stream: Stream) -> std::io::Result<Socket> {
        let Stream::UdSocket(stream) = stream;
        let stream = UnixStream::from(OwnedFd::try_from(stream)?);
        Ok(Socket {
            fd: register(stream, Interest::READABLE)?,
        })
    }

    pub(crate) fn get_ref(&self) -> &UnixStream {
        self.fd.get_ref()
    }

    /// Reads what is there into `decoder`, waiting for something if need be; 0 at the end of
    /// the stream. Descriptors that arrive with the bytes are queued in the decoder.
    pub(crate) async fn read(&self, decoder: &mut FrameDecoder) -> Result<usize, ReadError> {
        let mut fds = Vec::new();
        let n = loop {
            let mut ready = self.fd.readable().await?;
            let socket = ready.get_inner().as_raw_fd();
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
        let mut ready = self.fd.readable().await?;
        ready.clear_ready();
        Ok(())
    }

    /// Writes all of `buf`, `fds` with its first bytes (see [`fdpass::Outgoing`]).
    pub(crate) async fn write_all(&self, buf: &[u8], fds: &[Fd]) -> std::io::Result<()> {
        let socket = self.fd.get_ref().as_raw_fd();
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
        let waiter = register(self.fd.get_ref().try_clone()?, Interest::WRITABLE)?;
        let _ready = waiter.writable().await?;
        Ok(())
    }
}

fn register(stream: UnixStream, interest: Interest) -> std::io::Result<AsyncFd<UnixStream>> {
    // SAFETY: a `UnixStream` owns its descriptor: it stays open, and `as_raw_fd` returns that
    // same descriptor, until the stream is dropped, which the `AsyncFd` does last.
    unsafe { AsyncFd::register_with_interest(stream, interest) }.map_err(std::io::Error::from)
}
