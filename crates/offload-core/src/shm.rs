//! [`SharedBuf`]: a byte buffer in shared memory, which crosses to a worker process without a
//! copy.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use serde::{Deserialize, Serialize};

use crate::backend::attach::{self, Fd};

/// A byte buffer in shared memory: what to put large data in when it goes to a
/// `ProcessPool`.
///
/// A task field of type `SharedBuf` does not travel through the pool's socket: the worker maps
/// the same memory (a sealed `memfd`), and nothing is copied. An 8 MiB argument there and back
/// takes about half a millisecond (mostly mapping and unmapping), 5-6x faster than the bare
/// socket echoes the bytes (see `docs/benchmarks.md`).
/// A `SharedBuf` a task returns comes back the same way. On a `ThreadPool` it simply moves to
/// the thread, like any value. Serialized anywhere else (say, with `serde_json`) it writes its
/// bytes, as `{"Inline": [..]}`, and reads back into a new buffer.
///
/// ```
/// use offload_core::SharedBuf;
///
/// let mut data = SharedBuf::new(1 << 20)?; // 1 MiB, zero-filled
/// data[..4].copy_from_slice(b"head");
/// assert_eq!(&data[..4], b"head");
/// assert_eq!(data.len(), 1 << 20);
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// The `offload` crate's docs show one going to a `ProcessPool` and back.
///
/// Creating one costs what new memory costs: the kernel allocates and zeroes its pages as they
/// are first written (on a small VM, about 0.5 ms per MiB), ten times what sending it costs.
/// So make buffers once and reuse them: a task can hand its argument back (as the `offload`
/// crate's example does), and the caller fills it again for the next task.
///
/// Memory sent to a worker is shared with it until the worker drops its `SharedBuf`: a task
/// may change the bytes in place and return the buffer, and the caller sees the change
/// without a copy. So a task that changes its buffer and is then **retried** (after its
/// worker crashed or it timed out, with `TaskOptions::retries`) finds the first attempt's
/// changes: retry only tasks that read their buffers, or that write them idempotently.
///
/// Each live `SharedBuf` holds a file descriptor, in each process that has it; a request may
/// carry at most 1,024. The length is fixed at creation (the segment is sealed against
/// growing and shrinking, so a mapping can never lose its pages under a reader). Linux only.
pub struct SharedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// The segment; `None` for an empty buffer, which maps nothing.
    fd: Option<Fd>,
}

// SAFETY: a `SharedBuf` owns its mapping (it unmaps it on drop, once) and hands out access
// only through `&self` / `&mut self`, like a `Box<[u8]>`.
unsafe impl Send for SharedBuf {}
// SAFETY: shared references give read-only access; see `Send`.
unsafe impl Sync for SharedBuf {}

impl SharedBuf {
    /// A zero-filled buffer of `len` bytes.
    ///
    /// # Errors
    ///
    /// When the system cannot create or map a shared-memory segment that large (out of
    /// memory, or out of file descriptors).
    pub fn new(len: usize) -> io::Result<Self> {
        Self::named(len, c"offload-shared-buf")
    }

    /// A zero-filled buffer whose segment is named `name` (as `/proc` shows it).
    pub(crate) fn named(len: usize, name: &std::ffi::CStr) -> io::Result<Self> {
        if len == 0 {
            return Ok(Self::empty());
        }
        let fd = create_segment(len, name)?;
        Self::map(fd, len)
    }

    /// A buffer holding a copy of `bytes`.
    ///
    /// # Errors
    ///
    /// As for [`new`](Self::new).
    pub fn from_slice(bytes: &[u8]) -> io::Result<Self> {
        let mut buf = Self::new(bytes.len())?;
        buf.copy_from_slice(bytes);
        Ok(buf)
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn empty() -> Self {
        SharedBuf {
            ptr: NonNull::dangling(),
            len: 0,
            fd: None,
        }
    }

    /// The buffer's segment; `None` for an empty buffer, or one whose descriptor was closed.
    pub(crate) fn segment(&self) -> Option<&Fd> {
        self.fd.as_ref()
    }

    /// Closes the buffer's descriptor and keeps its memory mapped.
    pub(crate) fn close_segment(&mut self) {
        self.fd = None;
    }

    /// Maps a segment that arrived from another process. It must be sealed against shrinking
    /// (as every `SharedBuf`'s is): a segment the sender could truncate would turn our reads
    /// into crashes.
    pub(crate) fn adopt(fd: Fd, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Ok(Self::empty());
        }
        // SAFETY: F_GET_SEALS reads the flags of a descriptor we hold open.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the descriptor is not a sealed shared-memory segment",
            ));
        }
        // SAFETY: fstat fills the struct we pass, for a descriptor we hold open.
        let size = unsafe {
            let mut stat: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut stat) != 0 {
                return Err(io::Error::last_os_error());
            }
            stat.st_size
        };
        if i64::try_from(len).ok() != Some(size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the segment holds {size} bytes, the buffer claims {len}"),
            ));
        }
        Self::map(fd, len)
    }

    fn map(fd: Fd, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of `len` bytes of a segment that holds at least that
        // many (created so, or checked in `adopt`) and cannot shrink (sealed). Pages are
        // mapped as they are touched, not up front: a task that reads part of a large buffer
        // pays for that part, and the kernel maps pages that exist already in runs (16 at a
        // time), which costs about half of what MAP_POPULATE does even for a full read.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedBuf {
            ptr,
            len,
            fd: Some(fd),
        })
    }
}

/// A new memfd of `len` bytes, sealed so that its size can never change.
fn create_segment(len: usize, name: &std::ffi::CStr) -> io::Result<Fd> {
    let size = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer too large"))?;
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just created and own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain calls on a descriptor we own.
    let sized = unsafe { libc::ftruncate(fd.as_raw_fd(), size) };
    if sized != 0 {
        return Err(io::Error::last_os_error());
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Fd::new(fd))
}

impl Drop for SharedBuf {
    fn drop(&mut self) {
        // Every buffer but the empty one is mapped (with or without its descriptor).
        if self.len != 0 {
            // SAFETY: `ptr..ptr+len` is the mapping `map` made, unmapped only here.
            unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.len);
            }
        }
    }
}

impl std::ops::Deref for SharedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes while the mapping lives (dangling but
        // aligned when `len` is 0), and `&self` keeps it alive.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for SharedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only access in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for SharedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for SharedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl PartialEq for SharedBuf {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for SharedBuf {}

impl std::fmt::Debug for SharedBuf {
    // Like a `Blob`, never the contents: a buffer is usually large.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBuf({} bytes)", self.len)
    }
}

/// How a `SharedBuf` is written: its descriptor's index when an encode collects descriptors
/// (see [`attach`](crate::backend::attach)), its bytes otherwise.
#[derive(Serialize)]
#[serde(rename = "SharedBuf")]
enum WireRef<'a> {
    Inline(InlineBytes<'a>),
    Fd(u32, u64),
}

/// What [`WireRef`] reads back as.
#[derive(Deserialize)]
#[serde(rename = "SharedBuf")]
enum Wire {
    Inline(ByteBuf),
    Fd(u32, u64),
}

impl Serialize for SharedBuf {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.fd.as_ref().and_then(attach::push) {
            Some(index) => WireRef::Fd(index, self.len as u64).serialize(s),
            None => WireRef::Inline(InlineBytes(self)).serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for SharedBuf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let failed = |message: String| D::Error::custom(attach::decode_failed(message));
        use serde::de::Error;
        match Wire::deserialize(d)? {
            Wire::Inline(ByteBuf(bytes)) => SharedBuf::from_slice(&bytes).map_err(|e| {
                failed(format!(
                    "cannot create a shared buffer of {} bytes: {e}",
                    bytes.len()
                ))
            }),
            Wire::Fd(index, len) => {
                let fd = attach::get(index).ok_or_else(|| {
                    failed(format!(
                        "shared buffer descriptor #{index} did not arrive with the message"
                    ))
                })?;
                let len = usize::try_from(len)
                    .map_err(|_| failed("shared buffer too large for this system".into()))?;
                SharedBuf::adopt(fd, len)
                    .map_err(|e| failed(format!("cannot map a shared buffer of {len} bytes: {e}")))
            }
        }
    }
}

struct InlineBytes<'a>(&'a [u8]);

impl Serialize for InlineBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ByteBuf, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element()? {
                    bytes.push(b);
                }
                Ok(ByteBuf(bytes))
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_zeroed_writable_and_reads_back() {
        let mut buf = SharedBuf::new(10_000).expect("create");
        assert_eq!(buf.len(), 10_000);
        assert!(buf.iter().all(|&b| b == 0));
        buf[9_999] = 7;
        assert_eq!(buf[9_999], 7);
        assert!(SharedBuf::new(0).expect("empty").is_empty());
    }

    #[test]
    fn a_buffer_without_its_descriptor_keeps_its_memory() {
        let mut buf = SharedBuf::from_slice(b"kept").expect("create");
        buf.close_segment();
        assert!(buf.segment().is_none());
        buf[0] = b'K';
        assert_eq!(&buf[..], b"Kept");
    }

    #[test]
    fn outside_a_pool_it_serializes_as_its_bytes() {
        let buf = SharedBuf::from_slice(b"hello").expect("create");
        let json = serde_json::to_string(&buf).expect("json");
        assert_eq!(json, r#"{"Inline":[104,101,108,108,111]}"#);
        let back: SharedBuf = serde_json::from_str(&json).expect("from json");
        assert_eq!(&*back, b"hello");
        let bytes = postcard::to_stdvec(&buf).expect("postcard");
        let back: SharedBuf = postcard::from_bytes(&bytes).expect("from postcard");
        assert_eq!(back, buf);
    }

    #[test]
    fn through_descriptors_the_memory_is_shared_not_copied() {
        let mut buf = SharedBuf::from_slice(&[1, 2, 3]).expect("create");
        let (bytes, fds) = attach::encode_with_fds(&buf).expect("encode");
        assert_eq!(fds.len(), 1);
        assert!(bytes.len() < 8, "the bytes stay behind: {bytes:?}");
        let mut other: SharedBuf = attach::decode_with_fds(&bytes, &fds).expect("decode");
        other[0] = 9;
        buf[2] = 8;
        assert_eq!((&*buf, &*other), (&[9, 2, 8][..], &[9, 2, 8][..]));
    }

    #[test]
    fn a_missing_or_unsealed_descriptor_is_an_error_not_a_crash() {
        let buf = SharedBuf::from_slice(&[1; 64]).expect("create");
        let (bytes, _fds) = attach::encode_with_fds(&buf).expect("encode");
        let err = attach::decode_with_fds::<SharedBuf>(&bytes, &[]).unwrap_err();
        assert!(err.contains("descriptor #0 did not arrive"), "{err}");
        let unsealed = Fd::new(std::fs::File::open("/dev/zero").expect("open").into());
        let err = SharedBuf::adopt(unsealed, 64).unwrap_err();
        assert!(err.to_string().contains("not a sealed"), "{err}");
        let (_, fds) = attach::encode_with_fds(&buf).expect("encode");
        let fd = fds.into_iter().next().expect("one descriptor");
        let err = SharedBuf::adopt(fd, 65).unwrap_err();
        assert!(err.to_string().contains("holds 64 bytes"), "{err}");
    }
}
