//! A worker connection's socket on the reactor, registered for reading only.
//!
//! tokio's own socket types register with epoll for reading *and* writing. A Unix socket
//! reports "writable" each time its peer reads what was written to it, so every request a
//! worker read would wake the reactor thread once for nothing, before the answer woke it
//! again. Here the socket is registered for reading alone; a write that finds the socket full
//! (rare: large payloads, floods) registers a duplicate for writing just while it waits.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use interprocess::local_socket::tokio::Stream;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

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

    /// Reads what is there, waiting for something if need be; 0 at the end of the stream.
    pub(crate) async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|socket| socket.get_ref().read(buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    pub(crate) async fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            match self.fd.get_ref().write(buf) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
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
