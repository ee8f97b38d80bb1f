//! File descriptors over a Unix socket (`SCM_RIGHTS`), beside a frame's bytes.
//!
//! The kernel delivers descriptors with the first byte of the `sendmsg` that carried them, and
//! a `recvmsg` never reads past a message that carries descriptors. So if the writer attaches
//! every descriptor of the frames in a write to that write's first bytes, the reader has all
//! of a frame's descriptors, in order, by the time the frame is complete: it queues them and
//! each decoded frame takes its own from the front (see
//! [`FrameDecoder`](crate::frame::FrameDecoder)).
//!
//! Every read of a connection must go through [`recv`]: a plain `read` would silently close
//! the descriptors that arrive with its bytes.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use offload_core::backend::Fd;

/// The most descriptors one `sendmsg` may carry (Linux's `SCM_MAX_FD`).
pub const MAX_FDS_PER_SEND: usize = 253;

/// Room for the control message of [`MAX_FDS_PER_SEND`] descriptors, 8-byte aligned.
const CONTROL_LEN: usize = 1056;

#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

/// One `sendmsg` of `data` (non-empty) with `fds` (at most [`MAX_FDS_PER_SEND`]) attached to
/// its first byte; returns the bytes written (the descriptors went with them when that is
/// more than 0). `flags` are added to `MSG_NOSIGNAL`.
///
/// # Errors
///
/// What `sendmsg` reports (`WouldBlock` on a full non-blocking socket).
pub fn send(socket: RawFd, data: &[u8], fds: &[Fd], flags: libc::c_int) -> io::Result<usize> {
    debug_assert!(fds.len() <= MAX_FDS_PER_SEND);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = Control([0; CONTROL_LEN]);
    // SAFETY: a zeroed msghdr is a valid empty one; the fields set below point at `iov` and
    // `control`, which outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload =
            u32::try_from(std::mem::size_of::<RawFd>() * fds.len()).map_err(io::Error::other)?;
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
        let (space, len) = unsafe { (libc::CMSG_SPACE(payload), libc::CMSG_LEN(payload)) };
        if space as usize > CONTROL_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many descriptors",
            ));
        }
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` has a control buffer of `space` bytes, room for one header and
        // `fds.len()` descriptors; CMSG_FIRSTHDR/CMSG_DATA point inside it.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = len as _;
            let mut slot = libc::CMSG_DATA(header).cast::<RawFd>();
            for fd in fds {
                slot.write_unaligned(fd.as_raw_fd());
                slot = slot.add(1);
            }
        }
    }
    loop {
        // SAFETY: `msg` describes live buffers (see above); the kernel only reads them.
        let n = unsafe { libc::sendmsg(socket, &msg, flags | libc::MSG_NOSIGNAL) };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// One `recvmsg` into `buf`; descriptors that arrive with the bytes are appended to `fds`
/// (close-on-exec). Returns the bytes read, 0 at the end of the stream. `flags` are added to
/// `MSG_CMSG_CLOEXEC`.
///
/// # Errors
///
/// What `recvmsg` reports (`WouldBlock` when non-blocking and nothing is there), or
/// `InvalidData` when descriptors that arrived were lost (`MSG_CTRUNC`): with at most
/// [`MAX_FDS_PER_SEND`] per message that means this process ran out of descriptors.
pub fn recv(
    socket: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: libc::c_int,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = Control([0; CONTROL_LEN]);
    // SAFETY: as in `send`; the kernel writes into `buf` and `control`, both live and ours.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_LEN as _;
    let n = loop {
        // SAFETY: see above.
        let n = unsafe { libc::recvmsg(socket, &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
        match usize::try_from(n) {
            Ok(n) => break n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    };
    // SAFETY: the kernel filled `msg`'s control buffer with well-formed headers (up to
    // `msg_controllen`), which the CMSG_* macros walk; each SCM_RIGHTS payload is an array of
    // descriptors now open in this process and owned by nobody else.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header);
                let bytes = (*header).cmsg_len as usize - (data as usize - header as usize);
                let count = bytes / std::mem::size_of::<RawFd>();
                let first = data.cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(first.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "file descriptors sent with a message were lost: this process is probably out of \
             file descriptors (each live SharedBuf holds one; see `ulimit -n`)",
        ));
    }
    Ok(n)
}

/// A write of bytes with descriptors attached to its first bytes, cut into the pieces one
/// `sendmsg` can carry: groups of at most [`MAX_FDS_PER_SEND`] descriptors, each with at least
/// one byte of its own (a message never has fewer bytes than descriptors). Blocking and
/// non-blocking writers drive it alike, retrying [`send_next`](Self::send_next) as they wait.
pub struct Outgoing<'a> {
    data: &'a [u8],
    groups: std::iter::Peekable<std::slice::Chunks<'a, Fd>>,
}

impl<'a> Outgoing<'a> {
    /// A write of `data` with `fds`.
    pub fn new(data: &'a [u8], fds: &'a [Fd]) -> Self {
        Outgoing {
            data,
            groups: fds.chunks(MAX_FDS_PER_SEND).peekable(),
        }
    }

    /// True once every byte (and so every descriptor) is written.
    pub fn is_done(&self) -> bool {
        self.data.is_empty()
    }

    /// One `sendmsg` of what is left (`flags` as for [`send`]); returns the bytes written.
    ///
    /// # Errors
    ///
    /// What `sendmsg` reports (`WouldBlock` included: call again when there is room), or
    /// `WriteZero`.
    pub fn send_next(&mut self, socket: RawFd, flags: libc::c_int) -> io::Result<usize> {
        let group = self.groups.peek().copied().unwrap_or(&[]);
        // While more groups follow, this one goes with a single byte.
        let take = if self.groups.len() > 1 {
            1
        } else {
            self.data.len()
        };
        let n = send(socket, &self.data[..take], group, flags)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if !group.is_empty() {
            self.groups.next();
        }
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Writes all of `data` to a blocking socket, with `fds` attached to its first bytes (see
/// [`Outgoing`]).
///
/// # Errors
///
/// What `sendmsg` reports.
pub fn send_all(socket: RawFd, data: &[u8], fds: &[Fd]) -> io::Result<()> {
    let mut outgoing = Outgoing::new(data, fds);
    while !outgoing.is_done() {
        outgoing.send_next(socket, 0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn memfd() -> Fd {
        let file = std::fs::File::open("/dev/null").expect("open");
        Fd::new(file.into())
    }

    #[test]
    fn descriptors_arrive_with_the_bytes_in_order() {
        let (a, b) = UnixStream::pair().expect("pair");
        let fds: Vec<Fd> = (0..600).map(|_| memfd()).collect();
        let data = vec![7u8; 1000];
        send_all(a.as_raw_fd(), &data, &fds).expect("send");
        let mut got = Vec::new();
        let mut bytes = 0;
        let mut buf = [0u8; 4096];
        while bytes < data.len() {
            bytes += recv(b.as_raw_fd(), &mut buf, &mut got, 0).expect("recv");
        }
        assert_eq!((bytes, got.len()), (1000, 600));
    }

    #[test]
    fn plain_bytes_need_no_descriptors() {
        let (a, b) = UnixStream::pair().expect("pair");
        send_all(a.as_raw_fd(), b"hello", &[]).expect("send");
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        let n = recv(b.as_raw_fd(), &mut buf, &mut got, 0).expect("recv");
        assert_eq!((&buf[..n], got.len()), (&b"hello"[..], 0));
    }
}
