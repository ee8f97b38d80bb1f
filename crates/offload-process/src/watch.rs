//! The reactor's watch on a worker socket's incoming bytes, which a caller reading its own
//! answer pauses.
//!
//! Bytes a worker writes wake everyone waiting on its socket. When a caller blocked in `wait`
//! reads its own answer (see `reader`), the reactor thread has nothing to do with that answer,
//! yet a socket in the reactor's epoll set wakes it too: on a machine with two CPUs that is
//! an interrupt sent to the other CPU from inside the worker's `send`, and a thread that runs
//! there for nothing. (A profile of a loop of round trips had the worker's `send` at 13% of
//! all samples, most of it that wake-up, and the reactor thread switched in once per round
//! trip.) tokio cannot pause a registration, so the socket sits alone in an epoll set of its
//! own, and the reactor watches the set: a set is readable when its member is. A reading
//! caller stops the set from reporting bytes ([`ReadWatch::pause`]) and lets it again when
//! it lets go ([`ReadWatch::resume`]); resuming while bytes wait makes the set readable at
//! once, so nothing that came meanwhile goes unseen.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// An epoll set holding one worker socket.
pub(crate) struct ReadWatch {
    set: OwnedFd,
    /// A duplicate of the connection's descriptor, the set's member: the kernel knows the
    /// member by this descriptor, so it stays open as long as the set.
    socket: OwnedFd,
}

/// What the set reports about its socket when not paused. (The kernel adds hang-ups and
/// errors to every member's events, so a paused set still reports those.)
const READ_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;

impl ReadWatch {
    /// A set watching (a duplicate of) `socket` for bytes to read.
    pub(crate) fn new(socket: BorrowedFd<'_>) -> std::io::Result<Self> {
        let socket = socket.try_clone_to_owned()?;
        // SAFETY: plain system call with a flag; the result is checked before use.
        let set = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if set < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `set` is a new descriptor nobody else owns.
        let set = unsafe { OwnedFd::from_raw_fd(set) };
        let watch = ReadWatch { set, socket };
        watch.control(libc::EPOLL_CTL_ADD, READ_EVENTS)?;
        Ok(watch)
    }

    /// The watched socket, for reading it.
    pub(crate) fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Stops the set from reporting bytes on the socket (until [`ReadWatch::resume`]).
    pub(crate) fn pause(&self) -> std::io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, 0)?;
        // The set keeps its member on its ready list until someone asks the set: the reactor
        // never does (it reads the socket itself), and resuming wakes the reactor only when
        // the member is not listed already. Asking now, paused, takes it off the list.
        let mut events = [libc::epoll_event { events: 0, u64: 0 }];
        loop {
            // SAFETY: `events` is a live array of one, and its length is passed; no waiting.
            let asked =
                unsafe { libc::epoll_wait(self.set.as_raw_fd(), events.as_mut_ptr(), 1, 0) };
            if asked >= 0 {
                return Ok(());
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                // Not paused, then: the caller goes on as if pausing had failed.
                self.resume()?;
                return Err(error);
            }
        }
    }

    /// Lets the set report bytes again, at once if some are waiting.
    pub(crate) fn resume(&self) -> std::io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, READ_EVENTS)
    }

    fn control(&self, op: libc::c_int, events: u32) -> std::io::Result<()> {
        let mut event = libc::epoll_event { events, u64: 0 };
        // SAFETY: both descriptors are open for as long as `self` is, and `event` is a live
        // epoll_event the kernel only reads.
        let done = unsafe {
            libc::epoll_ctl(
                self.set.as_raw_fd(),
                op,
                self.socket.as_raw_fd(),
                &mut event,
            )
        };
        if done < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The set's descriptor, which the reactor registers.
impl AsRawFd for ReadWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.set.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// Whether the set reports anything within `ms`.
    fn set_ready(watch: &ReadWatch, ms: i32) -> bool {
        let mut fds = [libc::pollfd {
            fd: watch.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: a live array of one pollfd, its length passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        n == 1
    }

    #[test]
    fn a_paused_set_does_not_report_bytes_and_reports_them_when_resumed() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let watch = ReadWatch::new(ours.as_fd()).unwrap();
        assert!(!set_ready(&watch, 0), "nothing was written yet");
        peer.write_all(b"one").unwrap();
        assert!(set_ready(&watch, 1000), "bytes wait: the set reports them");

        watch.pause().unwrap();
        assert!(!set_ready(&watch, 0), "paused with bytes waiting");
        peer.write_all(b"two").unwrap();
        assert!(!set_ready(&watch, 50), "paused while more bytes came");

        watch.resume().unwrap();
        assert!(set_ready(&watch, 0), "resumed with bytes waiting");
    }

    /// The reactor's view: the set in an edge-triggered epoll of its own, as tokio has it.
    struct Outer(OwnedFd);

    impl Outer {
        fn watching(watch: &ReadWatch) -> Outer {
            // SAFETY: a plain system call; checked below.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: a new descriptor nobody else owns.
            let outer = Outer(unsafe { OwnedFd::from_raw_fd(fd) });
            let mut event = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                u64: 0,
            };
            // SAFETY: both descriptors are open; `event` is live.
            let done =
                unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, watch.as_raw_fd(), &mut event) };
            assert_eq!(done, 0);
            outer
        }

        /// Whether the reactor would be woken within `ms`.
        fn woken(&self, ms: i32) -> bool {
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
            // SAFETY: `events` is a live array of four, and its length is passed.
            let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), 4, ms) };
            n > 0
        }
    }

    /// The reactor reads the socket empty after every wake-up, but the set still lists the
    /// socket as ready until someone asks it again: resuming must wake the reactor anyway.
    #[test]
    fn resuming_with_bytes_waiting_wakes_the_reactor_after_it_read_the_socket_empty() {
        let (mut ours, mut peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let watch = ReadWatch::new(ours.as_fd()).unwrap();
        let outer = Outer::watching(&watch);
        for round in 0..3 {
            peer.write_all(b"for the reactor").unwrap();
            assert!(outer.woken(1000), "round {round}: bytes came");
            let mut buf = [0u8; 64];
            while std::io::Read::read(&mut ours, &mut buf).is_ok() {}

            watch.pause().unwrap();
            peer.write_all(b"for a caller").unwrap();
            assert!(!outer.woken(50), "round {round}: woken while paused");
            watch.resume().unwrap();
            assert!(
                outer.woken(0),
                "round {round}: bytes wait, but resuming woke nobody"
            );
            while std::io::Read::read(&mut ours, &mut buf).is_ok() {}
        }
    }

    #[test]
    fn a_paused_set_still_reports_a_hang_up() {
        let (ours, peer) = UnixStream::pair().unwrap();
        let watch = ReadWatch::new(ours.as_fd()).unwrap();
        watch.pause().unwrap();
        drop(peer);
        assert!(set_ready(&watch, 1000), "the peer hung up");
    }
}
