//! The wire protocol: every message between a pool (the parent) and its workers.
//!
//! A worker connects and sends [`Hello`]; the parent answers [`ToWorker::Welcome`] or
//! [`ToWorker::Refused`] (see [`handshake`](crate::handshake)). Then the parent sends work
//! and cancels, and the worker sends results and log records, in any interleaving. Requests
//! carry an `id` chosen by the parent; a worker answers each `Run`, `RunInSegment` and
//! `RunBatch` exactly once.

use std::borrow::Cow;
use std::sync::Arc;

use offload_core::backend::attach::{self, Fd};
use offload_core::SharedBuf;
use serde::{Deserialize, Serialize};

use crate::recycle::{Recycled, Recycler};
use crate::segment::Segment;

/// Bumped on every incompatible change to these types; checked in the handshake.
pub const PROTOCOL_VERSION: u32 = 8;

/// Length of the per-pool secret a worker must present.
pub const TOKEN_LEN: usize = 32;

/// Identifies the code on both ends. A worker program built from another version of offload
/// would decode tasks differently, so the handshake refuses it.
pub fn build_id() -> String {
    format!(
        "offload-ipc {} protocol {PROTOCOL_VERSION}",
        env!("CARGO_PKG_VERSION")
    )
}

/// An encoded task or output: bytes that postcard writes as one length and a copy, not
/// element by element, and the file descriptors of values in it that travel beside the bytes
/// (a [`SharedBuf`]'s memory; see [`offload_core::backend::attach`]).
///
/// Owned by default (what a worker decodes and produces: no extra allocation). The pool
/// makes its payloads [`shared`](Blob::shared), so it can keep a request's bytes until the
/// request completes (to run it again if its worker is replaced) and still send them
/// without a copy. Up to [`INLINE_MAX`] bytes are kept in the blob itself
/// ([`copied`](Blob::copied), and every blob decoded that short): most tiny tasks' inputs
/// and outputs are a few bytes, and then neither end allocates for them.
#[derive(Clone, Default)]
pub struct Blob {
    bytes: Repr,
    /// `None` for most blobs; shared by clones (a job keeps its request to send it again).
    fds: Option<Arc<[Fd]>>,
}

/// Blobs of at most this many bytes keep them inline (see [`Blob::copied`]): enough for a few
/// numbers, and the most that keeps a `Blob` as small as a `Vec` makes it (with 16 or more,
/// every `Blob`, and every message and job holding one, grows by 8 bytes).
pub const INLINE_MAX: usize = 15;

#[derive(Clone)]
enum Repr {
    /// The first `len` bytes of the array.
    Inline(u8, [u8; INLINE_MAX]),
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>),
    /// Part of a large frame's buffer, decoded in place (see [`Blob::decode_in_place`]): its
    /// start and end (a frame is at most `u32::MAX` bytes long).
    Slice(Arc<Vec<u8>>, u32, u32),
    /// The first bytes of a shared-memory segment (see [`crate::segment`]): an output read in
    /// place. The segment is lent again once no clone of the blob is left.
    Segment(Arc<SharedBuf>, usize),
    /// Shared bytes that go back to their pool's spare buffers when the last clone drops.
    Recycled(Arc<Recycled>),
}

impl Default for Repr {
    fn default() -> Self {
        Repr::Owned(Vec::new())
    }
}

impl Blob {
    /// Wraps encoded bytes; cloning copies them.
    pub fn new(bytes: Vec<u8>) -> Self {
        Blob {
            bytes: Repr::Owned(bytes),
            fds: None,
        }
    }

    /// A copy of `bytes`: inline when they are at most [`INLINE_MAX`] long (no allocation,
    /// and cloning copies those few bytes), owned otherwise.
    pub fn copied(bytes: &[u8]) -> Self {
        let bytes = if bytes.len() <= INLINE_MAX {
            let mut inline = [0; INLINE_MAX];
            inline[..bytes.len()].copy_from_slice(bytes);
            // At most INLINE_MAX, which fits a u8.
            Repr::Inline(bytes.len() as u8, inline)
        } else {
            Repr::Owned(bytes.to_vec())
        };
        Blob { bytes, fds: None }
    }

    /// A copy of `bytes` to share: inline when they are at most [`INLINE_MAX`] long, else
    /// [`shared`](Self::shared) (one allocation of their size).
    pub fn shared_copy(bytes: &[u8]) -> Self {
        if bytes.len() <= INLINE_MAX {
            Blob::copied(bytes)
        } else {
            Blob::shared(bytes.to_vec())
        }
    }

    /// Wraps encoded bytes to be shared; cloning only counts a reference.
    pub fn shared(bytes: Vec<u8>) -> Self {
        Blob {
            bytes: Repr::Shared(Arc::new(bytes)),
            fds: None,
        }
    }

    /// Wraps encoded bytes to be shared, like [`shared`](Self::shared); when the last clone
    /// drops, the buffer goes back to `home` for a later encode.
    pub fn recycled(bytes: Vec<u8>, home: &Arc<Recycler>) -> Self {
        Blob {
            bytes: Repr::Recycled(Arc::new(Recycled::new(bytes, home))),
            fds: None,
        }
    }

    /// The first `len` bytes of `segment` (at most its length), where a worker wrote them.
    pub fn in_segment(segment: Arc<SharedBuf>, len: usize) -> Self {
        let len = len.min(segment.len());
        Blob {
            bytes: Repr::Segment(segment, len),
            fds: None,
        }
    }

    /// The same bytes, with the descriptors their values refer to (index 0 first).
    pub fn with_fds(mut self, fds: Vec<Fd>) -> Self {
        self.fds = (!fds.is_empty()).then(|| Arc::from(fds));
        self
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.bytes {
            Repr::Inline(len, bytes) => bytes.get(..*len as usize).unwrap_or_default(),
            Repr::Owned(v) => v,
            Repr::Shared(v) => v,
            Repr::Slice(v, start, end) => v.get(*start as usize..*end as usize).unwrap_or_default(),
            Repr::Segment(segment, len) => segment.get(..*len).unwrap_or_default(),
            Repr::Recycled(recycled) => &recycled.bytes,
        }
    }

    /// The bytes, as a `Vec`: moved out when the blob owns them alone, copied otherwise.
    pub fn into_vec(self) -> Vec<u8> {
        match self.bytes {
            Repr::Owned(v) => v,
            _ => self.as_bytes().to_vec(),
        }
    }

    /// Runs `decode`, a decode of a message from `frame`, so that the blobs in it keep their
    /// bytes where they are (as ranges of `frame`) instead of copying them out. For large
    /// frames: a task's megabytes are then copied once (into the task), not twice.
    pub fn decode_in_place<R>(frame: &Arc<Vec<u8>>, decode: impl FnOnce() -> R) -> R {
        let outer = FRAME.with_borrow_mut(|slot| slot.replace(frame.clone()));
        let result = decode();
        FRAME.with_borrow_mut(|slot| *slot = outer);
        result
    }

    /// A blob of `bytes`, as a range of the frame being decoded in place when they lie in it
    /// (unless they are short enough to keep inline).
    fn from_decoded(bytes: &[u8]) -> Blob {
        if bytes.len() <= INLINE_MAX {
            return Blob::copied(bytes);
        }
        let in_frame = FRAME.with_borrow(|frame| {
            let frame = frame.as_ref()?;
            let base = frame.as_ptr() as usize;
            let start = (bytes.as_ptr() as usize).checked_sub(base)?;
            let end = start.checked_add(bytes.len())?;
            if end > frame.len() {
                return None;
            }
            Some((
                frame.clone(),
                u32::try_from(start).ok()?,
                u32::try_from(end).ok()?,
            ))
        });
        match in_frame {
            Some((frame, start, end)) => Blob {
                bytes: Repr::Slice(frame, start, end),
                fds: None,
            },
            None => Blob::copied(bytes),
        }
    }

    /// The descriptors that travel with the bytes.
    pub fn fds(&self) -> &[Fd] {
        self.fds.as_deref().unwrap_or(&[])
    }

    /// A blob with the same descriptors and no bytes: the head of a split frame
    /// ([`frame::encode_split`](crate::frame::encode_split)).
    pub fn without_bytes(&self) -> Blob {
        Blob {
            bytes: Repr::Owned(Vec::new()),
            fds: self.fds.clone(),
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }
}

impl PartialEq for Blob {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes() && self.fds().len() == other.fds().len()
    }
}

impl Eq for Blob {}

impl std::fmt::Debug for Blob {
    // Never log payloads: only their size.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.fds().len() {
            0 => write!(f, "Blob({} bytes)", self.len()),
            fds => write!(f, "Blob({} bytes, {fds} fds)", self.len()),
        }
    }
}

// On the wire: the index of the blob's first descriptor in the frame's list, how many it has,
// and the bytes. The descriptors themselves go beside the frame (see `crate::fdpass`).
impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeTuple};
        let mut first = 0;
        for (i, fd) in self.fds().iter().enumerate() {
            let index = attach::push(fd).ok_or_else(|| {
                S::Error::custom("file descriptors can only be sent over a pool's connection")
            })?;
            if i == 0 {
                first = index;
            }
        }
        let count = u32::try_from(self.fds().len())
            .map_err(|_| S::Error::custom("too many file descriptors in one message"))?;
        let mut tuple = s.serialize_tuple(3)?;
        tuple.serialize_element(&first)?;
        tuple.serialize_element(&count)?;
        tuple.serialize_element(&BytesRef(self.as_bytes()))?;
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Blob;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a blob: first descriptor, descriptor count, bytes")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
                use serde::de::Error;
                let missing = || A::Error::custom("a blob is cut short");
                let first: u32 = seq.next_element()?.ok_or_else(missing)?;
                let count: u32 = seq.next_element()?.ok_or_else(missing)?;
                let BlobBytes(blob) = seq.next_element()?.ok_or_else(missing)?;
                let fds = (0..count)
                    .map(|i| {
                        first.checked_add(i).and_then(attach::get).ok_or_else(|| {
                            A::Error::custom(attach::decode_failed(format!(
                                "a message refers to {count} file descriptors that did not \
                                 arrive with it"
                            )))
                        })
                    })
                    .collect::<Result<Vec<Fd>, A::Error>>()?;
                Ok(blob.with_fds(fds))
            }
        }
        d.deserialize_tuple(3, Visitor)
    }
}

struct BytesRef<'a>(&'a [u8]);

impl Serialize for BytesRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// A blob's bytes on their way in: borrowed from the frame when the decoder can lend them
/// (and then kept in place if the frame is decoded in place), copied otherwise.
struct BlobBytes(Blob);

impl<'de> Deserialize<'de> for BlobBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = BlobBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(
                self,
                v: &'de [u8],
            ) -> Result<Self::Value, E> {
                Ok(BlobBytes(Blob::from_decoded(v)))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(BlobBytes(Blob::copied(v)))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
                Ok(BlobBytes(Blob::new(v)))
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

thread_local! {
    /// The frame being decoded in place, if any.
    static FRAME: std::cell::RefCell<Option<Arc<Vec<u8>>>> = const { std::cell::RefCell::new(None) };
}

/// The first message of a worker.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the worker.
    pub protocol: u32,
    /// [`build_id`] of the worker.
    pub build: String,
    /// The pool's secret, received on the worker's stdin (never on a command line).
    pub token: [u8; TOKEN_LEN],
    /// The worker's process id.
    pub pid: u32,
}

impl std::fmt::Debug for Hello {
    // The token never appears in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("protocol", &self.protocol)
            .field("build", &self.build)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// Parent to worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// The handshake succeeded.
    Welcome {
        /// The most verbose `tracing` level the parent wants forwarded (0 = off, 1 = error,
        /// ..., 5 = trace).
        max_log_level: u8,
        /// The largest frame the parent accepts.
        max_frame: u64,
        /// A limit on the worker's data segment (heap) in bytes, applied with
        /// `setrlimit(RLIMIT_DATA)`: a task that allocates past it fails its worker.
        memory_limit: Option<u64>,
        /// Low-latency mode: how long the worker polls for its next request before it
        /// blocks, in microseconds (0 = off).
        spin_us: u32,
        /// The ring the worker writes its frames into from now on (see [`crate::ring`]);
        /// `None` when the pool could not make one: frames then go through the socket.
        answers: Option<Segment>,
    },
    /// The handshake failed; the worker prints the reason and exits.
    Refused {
        /// Why, for the worker's stderr.
        reason: String,
    },
    /// Run one task.
    Run {
        /// Request id.
        id: u64,
        /// The task's registered name (borrowed when sent: no allocation per request).
        task: Cow<'static, str>,
        /// The task, postcard-encoded.
        input: Blob,
    },
    /// Run one task whose input is in a shared-memory segment: a large input (see
    /// [`crate::segment`]).
    RunInSegment {
        /// Request id.
        id: u64,
        /// The task's registered name (borrowed when sent: no allocation per request).
        task: Cow<'static, str>,
        /// The connection's slot that holds the input.
        slot: u32,
        /// The slot's new segment, when the parent made one (the worker keeps it mapped
        /// for later requests, which name the slot only).
        segment: Option<Segment>,
        /// The input's length: the segment's first `len` bytes.
        len: u64,
        /// The input's descriptors (its bytes are in the segment).
        fds: Blob,
    },
    /// Run several tasks of one type, in order, answering once.
    RunBatch {
        /// Request id.
        id: u64,
        /// The tasks' registered name.
        task: Cow<'static, str>,
        /// How many tasks `inputs` holds.
        count: u32,
        /// The tasks, postcard-encoded back to back (see [`offload_core::backend::pack`]).
        inputs: Blob,
    },
    /// The caller cancelled request `id`: skip it if queued, raise its flag if running.
    Cancel {
        /// Request id.
        id: u64,
    },
    /// Finish the queued work, then exit.
    Exit,
    /// The parent let go of this connection's shared-memory segments (they sat unused):
    /// unmap them. Sent only while no request is outstanding.
    DropSegments,
}

/// Worker to parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToParent {
    /// The first message: who the worker is.
    Hello(Hello),
    /// The answer to `Run`, and to a `RunInSegment` whose output does not fit its segment.
    Done {
        /// Request id.
        id: u64,
        /// The output, postcard-encoded, or why there is none.
        output: Result<Blob, WireError>,
    },
    /// The answer to `RunInSegment` when the output fits in its segment: the output is the
    /// segment's first `len` bytes. (Otherwise the answer is a `Done`.)
    DoneInSegment {
        /// Request id.
        id: u64,
        /// The output's length.
        len: u64,
        /// The output's descriptors (its bytes are in the segment).
        fds: Blob,
    },
    /// The answer to `RunBatch`: one result per task, in order.
    BatchDone {
        /// Request id.
        id: u64,
        /// How many tasks the batch held (as in `RunBatch`).
        count: u32,
        /// How many of them failed.
        failed: u32,
        /// One postcard-encoded `Result<Output, WireError>` per task, back to back.
        outputs: Blob,
    },
    /// A `tracing` event emitted in the worker.
    Log(LogRecord),
}

pub use offload_core::backend::WireError;

/// A `tracing` event from a worker, to re-emit in the parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The request the event was emitted under, if any.
    pub request: Option<u64>,
    /// 1 = error ... 5 = trace.
    pub level: u8,
    /// The event's target (usually its module path).
    pub target: String,
    /// The `message` field.
    pub message: String,
    /// The other fields, formatted.
    pub fields: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode, FrameDecoder};

    #[test]
    fn messages_round_trip_and_blobs_are_compact() {
        let run = ToWorker::Run {
            id: 7,
            task: "m::f".into(),
            input: Blob::new(vec![9; 1000]),
        };
        let bytes = postcard::to_stdvec(&run).unwrap();
        // Variant, id, name (1 + 4), then the blob: first descriptor, descriptor count,
        // length (2), and the bytes as one copy.
        assert_eq!(
            bytes.len(),
            1 + 1 + 5 + 1 + 1 + 2 + 1000,
            "a blob costs its length plus a few bytes"
        );
        assert_eq!(postcard::from_bytes::<ToWorker>(&bytes).unwrap(), run);

        let mut wire = Vec::new();
        let hello = ToParent::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            build: build_id(),
            token: [1; TOKEN_LEN],
            pid: 42,
        });
        encode(&hello, &mut wire, 1 << 20).unwrap();
        let mut decoder = FrameDecoder::new(1 << 20);
        decoder.read_buf()[..wire.len()].copy_from_slice(&wire);
        decoder.filled(wire.len());
        assert_eq!(decoder.next_message::<ToParent>().unwrap(), Some(hello));
    }

    /// A tiny task's bytes live in the blob itself, whichever way it was made, and come out
    /// as they went in; one byte more and they are allocated.
    #[test]
    fn short_blobs_are_inline_and_longer_ones_are_not() {
        for len in [0, 1, 9, INLINE_MAX, INLINE_MAX + 1, 100] {
            let bytes: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
            let inline = len <= INLINE_MAX;
            for blob in [Blob::copied(&bytes), Blob::shared_copy(&bytes)] {
                assert_eq!(blob.as_bytes(), bytes);
                assert_eq!(blob.clone().into_vec(), bytes);
                assert_eq!(
                    matches!(blob.bytes, Repr::Inline(..)),
                    inline,
                    "{len} bytes"
                );
            }
            // Decoded from a frame decoded in place: short ones do not keep the frame.
            let wire = postcard::to_stdvec(&Blob::new(bytes.clone())).unwrap();
            let frame = Arc::new(wire);
            let decoded =
                Blob::decode_in_place(&frame, || postcard::from_bytes::<Blob>(&frame).unwrap());
            assert_eq!(decoded.as_bytes(), bytes);
            assert_eq!(matches!(decoded.bytes, Repr::Inline(..)), inline);
            assert_eq!(Arc::strong_count(&frame), if inline { 1 } else { 2 });
        }
        assert!(
            matches!(
                Blob::shared_copy(&[1; INLINE_MAX + 1]).bytes,
                Repr::Shared(_)
            ),
            "a longer copy to share is shared, not copied on every clone"
        );
    }

    #[test]
    fn a_large_frame_s_blob_keeps_its_bytes_in_the_frame_and_what_follows_survives() {
        let big = ToWorker::Run {
            id: 1,
            task: "t".into(),
            input: Blob::new((0..5 << 20).map(|i| i as u8).collect()),
        };
        let small = ToWorker::Cancel { id: 1 };
        let mut wire = Vec::new();
        encode(&big, &mut wire, 8 << 20).unwrap();
        encode(&small, &mut wire, 8 << 20).unwrap();
        let mut decoder = FrameDecoder::new(8 << 20);
        let mut fed = 0;
        let mut got = Vec::new();
        while fed < wire.len() {
            let space = decoder.read_buf();
            let n = space.len().min(wire.len() - fed);
            space[..n].copy_from_slice(&wire[fed..fed + n]);
            decoder.filled(n);
            fed += n;
            while let Some(m) = decoder.next_message::<ToWorker>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![big, small]);
        let ToWorker::Run { input, .. } = &got[0] else {
            panic!("{got:?}")
        };
        assert!(matches!(input.bytes, Repr::Slice(..)), "not copied out");
        let copy = Blob::decode_in_place(&Arc::new(Vec::new()), || {
            postcard::from_bytes::<Blob>(&postcard::to_stdvec(input).unwrap()).unwrap()
        });
        assert!(
            matches!(copy.bytes, Repr::Owned(_)),
            "bytes outside the frame are copied"
        );
    }

    #[test]
    fn the_token_and_payloads_stay_out_of_debug_output() {
        let hello = Hello {
            protocol: 1,
            build: "b".into(),
            token: [0xAB; TOKEN_LEN],
            pid: 1,
        };
        let text = format!("{hello:?}");
        assert!(
            !text.contains("171") && !text.to_lowercase().contains("ab, "),
            "{text}"
        );
        assert_eq!(format!("{:?}", Blob::new(vec![1, 2, 3])), "Blob(3 bytes)");
    }
}
