//! A worker's answers through shared memory: a byte ring the worker writes and the pool reads.
//!
//! Through the socket every answer costs the worker a `send`, and the pool a wake-up and a
//! `recv`: for tiny tasks submitted one by one that was most of the work. Holding answers
//! back to share a write would lose them if the worker crashed in the next task; in shared
//! memory they outlive the worker. So after the handshake the worker writes its frames
//! into this ring, in order, and the socket carries only one-byte signals:
//!
//! - [`WAKE`] when the pool said it was about to sleep ([`RingWatch::sleeping`]); while it is
//!   busy, answers pile up in the ring and cost nobody a system call.
//! - [`CARRIER`] bytes that carry the file descriptors of the frames that have some, sent
//!   before those frames' bytes (so the pool has them by the time it decodes the frames) and
//!   counted in the header, so the pool reads the socket for them only when some are due.
//!
//! The ring is a byte stream: a frame larger than the ring goes through it in pieces, the
//! worker waiting (on a futex) for the pool to make room. Each side keeps its own position
//! and only publishes it in the header; the pool checks what the worker publishes, since a
//! worker runs user code.
//!
//! When the worker is gone (its end of the socket closed), everything it published is still
//! in the ring: the pool reads it before it reports the end of the connection, so an answer
//! written just before a crash is not lost.

use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use offload_core::backend::Fd;
use offload_core::SharedBuf;

use crate::fdpass;

/// The signal byte that wakes a pool waiting for answers.
pub const WAKE: u8 = 0;
/// The signal byte that carries descriptors (one per group of them, see
/// [`fdpass::Outgoing`]).
pub const CARRIER: u8 = 1;

/// The bytes of a connection's ring, header excluded.
pub const RING_BYTES: usize = 256 * 1024;

/// Who may be asleep waiting for answers, as bits of the header's `sleeping` word: the
/// pool's I/O thread, and a caller reading its own answer.
pub const IO_THREAD: u32 = 1;
/// See [`IO_THREAD`].
pub const CALLER: u32 = 2;

/// The header, one word per cache line where both sides write often.
const TAIL: usize = 0; // u64, the worker's: bytes published
const HEAD: usize = 64; // u64, the pool's: bytes consumed
const SLEEPING: usize = 128; // u32, the pool's bits (the worker clears them when it wakes it)
const CARRIERS: usize = 136; // u64, the worker's: carrier bytes sent
const ROOM: usize = 192; // u32 futex word, the pool's: bumped when it made room
const WANT_ROOM: usize = 196; // u32, the worker's: set while it waits for room
const HEADER: usize = 256;

/// How long the worker waits for room before it looks again (a wake-up it missed, which
/// the protocol rules out, would cost this much, never a hang).
const ROOM_WAIT: Duration = Duration::from_millis(20);

/// A ring's memory: the shared mapping and where its parts are.
struct Memory {
    /// Keeps the mapping alive (the pool sends it in the `Welcome`); never read or written
    /// through references (see `base`).
    buf: Arc<SharedBuf>,
    /// The mapping's first byte. Both processes write the mapping at once, so it is only
    /// touched through this pointer: as atomics for the header, by copies for the data.
    base: NonNull<u8>,
    /// Data bytes, a power of two.
    cap: u64,
    /// The pool's `head` (bytes consumed), kept out of the mapping: the header's copy is for
    /// the worker, which could overwrite it, and a pool that believed it would look for bytes
    /// forever.
    head: AtomicU64,
}

// SAFETY: `Memory` owns a shared mapping (through `_buf`) and touches it only through atomics
// and copies of bytes it owns the right to at that moment (see `Producer` and `Consumer`).
unsafe impl Send for Memory {}
// SAFETY: as for `Send`; the header words are atomics.
unsafe impl Sync for Memory {}

impl Memory {
    fn new(mut buf: SharedBuf) -> Result<Self, String> {
        let data = buf.len().saturating_sub(HEADER);
        if data == 0 || !data.is_power_of_two() {
            return Err(format!(
                "an answer ring of {} bytes is not a header and a power of two",
                buf.len()
            ));
        }
        let base = NonNull::new(buf.as_mut_ptr()).ok_or("an empty answer ring")?;
        Ok(Memory {
            buf: Arc::new(buf),
            base,
            cap: data as u64,
            head: AtomicU64::new(0),
        })
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: every offset used is inside the header, 8-byte aligned (the mapping is
        // page-aligned), and only ever accessed as this atomic type.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as for `u64_at`, 4-byte aligned.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    /// The data bytes at stream position `at`, up to `len` of them before the ring wraps.
    fn data(&self, at: u64, len: usize) -> (*mut u8, usize) {
        let offset = (at % self.cap) as usize;
        let len = len.min(self.cap as usize - offset);
        // SAFETY: `offset < cap`, and the data region is `cap` bytes after the header.
        (unsafe { self.base.as_ptr().add(HEADER + offset) }, len)
    }
}

/// Creates a connection's ring (in the pool): the pool's end, and the memory to send the
/// worker (as a [`Segment`](crate::segment::Segment) in its `Welcome`).
///
/// # Errors
///
/// When the system gives no shared memory (the connection then goes without a ring).
pub fn create() -> std::io::Result<(Consumer, Arc<SharedBuf>)> {
    let buf = offload_core::backend::named_shared_buf(HEADER + RING_BYTES, c"offload-answers")?;
    let memory = Memory::new(buf).map_err(std::io::Error::other)?;
    let buf = memory.buf.clone();
    let consumer = Consumer {
        memory: Arc::new(memory),
        carriers: 0,
    };
    Ok((consumer, buf))
}

/// The pool's end of a ring: reads what the worker published.
pub struct Consumer {
    memory: Arc<Memory>,
    /// Carrier bytes read from the socket.
    carriers: u64,
}

/// What the worker published does not make sense: the connection must be closed.
#[derive(Debug, thiserror::Error)]
#[error("the worker's answer ring is corrupt: {0}")]
pub struct RingError(&'static str);

impl Consumer {
    /// Bytes published and not read yet.
    ///
    /// # Errors
    ///
    /// When the worker published a position behind the pool's, or more than the ring holds.
    pub fn available(&self) -> Result<usize, RingError> {
        let tail = self.memory.u64_at(TAIL).load(Ordering::Acquire);
        match tail.checked_sub(self.memory.head.load(Ordering::Relaxed)) {
            Some(n) if n <= self.memory.cap => Ok(n as usize),
            _ => Err(RingError("it claims bytes it cannot hold")),
        }
    }

    /// Call once the worker has the ring's memory: the pool keeps it mapped, but holds no
    /// descriptor for it from now on.
    pub fn sent(&mut self) {
        if let Some(memory) = Arc::get_mut(&mut self.memory) {
            if let Some(buf) = Arc::get_mut(&mut memory.buf) {
                offload_core::backend::close_segment(buf);
            }
        }
    }

    /// Carrier bytes the worker sent and the pool has not read: their descriptors belong to
    /// frames already published (call after [`available`](Self::available)).
    pub fn carriers_due(&self) -> u64 {
        self.memory
            .u64_at(CARRIERS)
            .load(Ordering::Acquire)
            .saturating_sub(self.carriers)
    }

    /// Counts carrier bytes read from the socket.
    pub fn carriers_read(&mut self, n: u64) {
        self.carriers += n;
    }

    /// Copies up to `available` published bytes into `out` (as many as fit) and makes room
    /// for the worker; returns how many. `available` is what [`available`](Self::available)
    /// said before [`carriers_due`](Self::carriers_due) was asked: bytes published since may
    /// belong to frames whose descriptors have not been read.
    pub fn read(&mut self, out: &mut [u8], available: usize) -> usize {
        let mut want = available.min(out.len());
        let mut head = self.memory.head.load(Ordering::Relaxed);
        let mut done = 0;
        while want > 0 {
            let (from, n) = self.memory.data(head, want);
            // SAFETY: the worker published these bytes (the `Acquire` load in `available`)
            // and writes them again only after `head` moves past them; `out` is ours.
            unsafe { std::ptr::copy_nonoverlapping(from, out[done..].as_mut_ptr(), n) };
            head += n as u64;
            done += n;
            want -= n;
        }
        if done > 0 {
            self.memory.head.store(head, Ordering::Release);
            self.memory.u64_at(HEAD).store(head, Ordering::SeqCst);
            // Pairs with the worker's store of `WANT_ROOM` before it looks at `HEAD` again.
            fence(Ordering::SeqCst);
            if self.memory.u32_at(WANT_ROOM).swap(0, Ordering::SeqCst) != 0 {
                self.memory.u32_at(ROOM).fetch_add(1, Ordering::SeqCst);
                futex::wake(self.memory.u32_at(ROOM));
            }
        }
        done
    }

    /// A view of the ring for threads that do not hold the consumer.
    pub fn watch(&self) -> RingWatch {
        RingWatch {
            memory: self.memory.clone(),
        }
    }
}

/// What any thread of the pool may do with a ring: tell the worker someone is about to sleep,
/// and see whether bytes wait.
#[derive(Clone)]
pub struct RingWatch {
    memory: Arc<Memory>,
}

impl RingWatch {
    /// Says that `who` ([`IO_THREAD`] or [`CALLER`]) is about to wait on the socket: the next
    /// frame the worker publishes comes with a [`WAKE`]. Returns true when bytes are there
    /// already (then do not wait: no wake-up will come for them).
    pub fn sleeping(&self, who: u32) -> bool {
        self.memory.u32_at(SLEEPING).fetch_or(who, Ordering::SeqCst);
        // Pairs with the worker's fence between publishing and reading `SLEEPING`.
        fence(Ordering::SeqCst);
        self.has_bytes()
    }

    /// Says that `who` is awake again.
    pub fn awake(&self, who: u32) {
        self.memory
            .u32_at(SLEEPING)
            .fetch_and(!who, Ordering::SeqCst);
    }

    /// True when the worker published bytes the pool has not read (or a `tail` that is
    /// corrupt, which the reader then reports, ending the connection).
    pub fn has_bytes(&self) -> bool {
        let tail = self.memory.u64_at(TAIL).load(Ordering::Acquire);
        tail != self.memory.head.load(Ordering::Acquire)
    }
}

/// The worker's end of a ring.
pub struct Producer {
    memory: Memory,
    /// Bytes published; the header's copy is for the pool.
    tail: u64,
    carriers: u64,
}

impl Producer {
    /// The worker's end of the ring the pool sent (mapped from its `Welcome`).
    ///
    /// # Errors
    ///
    /// When the memory is not a ring's.
    pub fn new(mut buf: SharedBuf) -> Result<Self, String> {
        // The worker only writes the memory: it holds no descriptor for it.
        offload_core::backend::close_segment(&mut buf);
        Ok(Producer {
            memory: Memory::new(buf)?,
            tail: 0,
            carriers: 0,
        })
    }

    /// Sends a frame (`buf`, then `tail`) to the pool over `socket`'s connection: its
    /// descriptors first, through the socket with [`CARRIER`] bytes, so the pool has them
    /// when it decodes the frame; then its bytes, into the ring. The pool is woken only if it
    /// said it sleeps.
    ///
    /// # Errors
    ///
    /// When the socket fails: the pool is gone.
    pub fn send(
        &mut self,
        socket: RawFd,
        buf: &[u8],
        fds: &[Fd],
        tail: &[u8],
    ) -> std::io::Result<()> {
        if !fds.is_empty() {
            let carriers = vec![CARRIER; fds.len().div_ceil(fdpass::MAX_FDS_PER_SEND)];
            fdpass::send_all(socket, &carriers, fds)?;
            self.carriers += carriers.len() as u64;
            self.memory
                .u64_at(CARRIERS)
                .store(self.carriers, Ordering::Release);
        }
        let mut wake = || fdpass::send_all(socket, &[WAKE], &[]);
        self.write(buf, &mut wake)?;
        self.write(tail, &mut wake)?;
        if self.should_wake() {
            wake()?;
        }
        Ok(())
    }

    /// Publishes `bytes`, waiting for room as often as it takes. `wake` sends a [`WAKE`]:
    /// it is called whenever a pool's thread said it sleeps, also before waiting for room.
    ///
    /// # Errors
    ///
    /// What `wake` returns.
    fn write(
        &mut self,
        mut bytes: &[u8],
        wake: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let room = self.room();
            if room == 0 {
                self.wait_for_room(wake)?;
                continue;
            }
            let mut n = room.min(bytes.len());
            while n > 0 {
                let (to, len) = self.memory.data(self.tail, n);
                // SAFETY: the pool has consumed these bytes (`room`), and reads them only
                // after `tail` is published past them.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), to, len) };
                self.tail += len as u64;
                bytes = &bytes[len..];
                n -= len;
            }
            self.memory.u64_at(TAIL).store(self.tail, Ordering::Release);
        }
        Ok(())
    }

    /// After a frame is written: true when a pool's thread said it sleeps, which the caller
    /// must then wake with a [`WAKE`] (the bits are cleared: one wake-up per sleep).
    fn should_wake(&self) -> bool {
        // Pairs with the pool's fence between setting `SLEEPING` and looking at `TAIL`.
        fence(Ordering::SeqCst);
        let sleeping = self.memory.u32_at(SLEEPING);
        sleeping.load(Ordering::Relaxed) != 0 && sleeping.swap(0, Ordering::SeqCst) != 0
    }

    fn room(&self) -> usize {
        let head = self.memory.u64_at(HEAD).load(Ordering::Acquire);
        // The pool is trusted; still, a position it never published reads as a full ring.
        let used = self.tail.saturating_sub(head).min(self.memory.cap);
        (self.memory.cap - used) as usize
    }

    fn wait_for_room(
        &mut self,
        wake: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let room = self.memory.u32_at(ROOM);
        let seen = room.load(Ordering::SeqCst);
        self.memory.u32_at(WANT_ROOM).store(1, Ordering::SeqCst);
        // Pairs with the pool's fence between moving `HEAD` and reading `WANT_ROOM`.
        fence(Ordering::SeqCst);
        if self.room() > 0 {
            return Ok(());
        }
        // The pool must read to make room: it may be asleep.
        if self.should_wake() {
            wake()?;
        }
        futex::wait(room, seen, ROOM_WAIT);
        Ok(())
    }
}

/// The futex calls, on words in memory shared between processes (so not `PRIVATE`).
mod futex {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// Sleeps while `word` holds `expected`, at most `timeout`; returns early on a wake-up, a
    /// signal, or a changed value. The caller looks again either way.
    pub(super) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
        let timeout = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `word` is a live, aligned 32-bit word; the kernel only reads it and the
        // timeout, and waits at most that long.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &timeout as *const libc::timespec,
            );
        }
    }

    /// Wakes whoever waits on `word`.
    pub(super) fn wake(word: &AtomicU32) {
        // SAFETY: `word` is a live, aligned 32-bit word; the kernel only looks up its waiters.
        unsafe {
            libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Producer, Consumer) {
        let (consumer, buf) = create().unwrap();
        // The worker maps the same segment again; here a second mapping of the same memfd.
        let fd = offload_core::backend::segment_of(&buf).unwrap().clone();
        let mapped = offload_core::backend::map_segment(fd, buf.len()).unwrap();
        (Producer::new(mapped).unwrap(), consumer)
    }

    fn no_wake() -> impl FnMut() -> std::io::Result<()> {
        || Ok(())
    }

    #[test]
    fn bytes_come_out_in_order_across_the_wrap() {
        let (mut producer, mut consumer) = pair();
        let mut out = vec![0; RING_BYTES];
        let mut expected = Vec::new();
        let mut got = Vec::new();
        for round in 0..5u32 {
            let chunk: Vec<u8> = (0..100_000u32).map(|i| (i ^ round) as u8).collect();
            producer.write(&chunk, &mut no_wake()).unwrap();
            expected.extend_from_slice(&chunk);
            let available = consumer.available().unwrap();
            assert_eq!(available, chunk.len());
            let n = consumer.read(&mut out, available);
            got.extend_from_slice(&out[..n]);
        }
        assert_eq!(got, expected);
        assert_eq!(consumer.available().unwrap(), 0);
    }

    #[test]
    fn a_frame_larger_than_the_ring_passes_in_pieces() {
        let (mut producer, mut consumer) = pair();
        let big: Vec<u8> = (0..3 * RING_BYTES + 17).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = std::thread::spawn(move || producer.write(&sent, &mut no_wake()).unwrap());
        let mut got = Vec::new();
        let mut out = vec![0; 4096];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < big.len() {
            assert!(std::time::Instant::now() < deadline, "the writer stalled");
            let available = consumer.available().unwrap();
            let n = consumer.read(&mut out, available);
            got.extend_from_slice(&out[..n]);
        }
        writer.join().unwrap();
        assert_eq!(got, big);
    }

    #[test]
    fn a_sleeper_is_woken_once_and_a_busy_reader_not_at_all() {
        let (mut producer, consumer) = pair();
        let watch = consumer.watch();
        producer.write(b"one", &mut no_wake()).unwrap();
        assert!(!producer.should_wake(), "nobody sleeps");
        assert!(watch.sleeping(IO_THREAD), "bytes are there: do not sleep");
        producer.write(b"two", &mut no_wake()).unwrap();
        assert!(producer.should_wake());
        assert!(!producer.should_wake(), "one wake-up per sleep");
        assert!(watch.sleeping(CALLER));
        watch.awake(CALLER);
        producer.write(b"three", &mut no_wake()).unwrap();
        assert!(!producer.should_wake(), "the caller woke up on its own");
    }

    #[test]
    fn a_worker_that_claims_more_than_the_ring_holds_is_refused() {
        let (_producer, consumer) = pair();
        consumer
            .memory
            .u64_at(TAIL)
            .store(RING_BYTES as u64 + 1, Ordering::Release);
        assert!(consumer.available().is_err());
    }

    /// The worker has the header mapped writable: a `head` it wrote must not make the pool
    /// look for bytes that are not there (it did, at every turn of the I/O thread).
    #[test]
    fn a_head_the_worker_wrote_does_not_make_bytes_appear() {
        let (mut producer, mut consumer) = pair();
        let watch = consumer.watch();
        producer.write(b"abc", &mut no_wake()).unwrap();
        let available = consumer.available().unwrap();
        assert_eq!(consumer.read(&mut [0; 8], available), 3);
        producer.memory.u64_at(HEAD).store(1, Ordering::Release);
        assert!(!watch.has_bytes());
        assert!(!watch.sleeping(IO_THREAD));
    }

    #[test]
    fn memory_that_is_not_a_ring_is_refused() {
        let buf = SharedBuf::new(HEADER + 1000).unwrap();
        assert!(Producer::new(buf).is_err());
    }
}
