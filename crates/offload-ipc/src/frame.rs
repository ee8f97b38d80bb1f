//! Framing: each message is a little-endian `u32` length followed by that many bytes of
//! postcard. The decoder is sans-I/O (the caller reads into its buffer), so the blocking
//! worker and the async parent share one implementation.
//!
//! Limits are checked before anything is allocated: a length over the limit is an error, and
//! the buffer grows only as bytes actually arrive, so a peer that *claims* a huge frame costs
//! nothing until it sends the bytes.

use std::sync::Arc;

use offload_core::backend::attach::{self, Fd};
use serde::{de::DeserializeOwned, Serialize};

use crate::protocol::Blob;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// The default limit on one frame: large enough for big payloads, small enough that a broken
/// peer cannot make us allocate without bound.
pub const DEFAULT_MAX_FRAME: usize = 256 * 1024 * 1024;

/// How much the decoder asks the socket for at once when it has no frame in progress: many
/// small frames arrive in one read.
const READ_CHUNK: usize = 64 * 1024;

/// A frame could not be encoded or decoded. The connection it came from cannot be trusted
/// further and must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A frame's length is over the limit.
    #[error("frame of {len} bytes is over the limit of {max} bytes; raise the pool's max_frame_size if such payloads are intended")]
    TooLarge {
        /// The length the frame claimed (or had, when encoding).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame's bytes are not a valid message.
    #[error("malformed frame ({len} bytes): {reason}")]
    Malformed {
        /// The frame's length.
        len: usize,
        /// What postcard reported.
        reason: String,
    },
    /// A message could not be serialized.
    #[error("could not encode a message: {0}")]
    Encode(String),
    /// More file descriptors arrived than any message may carry.
    #[error("{count} file descriptors received, more than messages may carry ({MAX_QUEUED_FDS})")]
    TooManyFds {
        /// How many are queued.
        count: usize,
    },
    /// A message holds more file descriptors than one message may carry.
    #[error(
        "a message may carry at most {MAX_FDS_PER_MESSAGE} file descriptors (shared buffers), \
         this one holds {count}"
    )]
    FdsOverLimit {
        /// How many it holds.
        count: usize,
    },
    /// File descriptors arrived where none are accepted (before a handshake).
    #[error("{count} file descriptors received before the handshake")]
    UnexpectedFds {
        /// How many arrived.
        count: usize,
    },
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame ({have} of {want} bytes received)")]
    Truncated {
        /// Bytes of the frame received.
        have: usize,
        /// Bytes the frame needed (header included).
        want: usize,
    },
}

/// Appends the frame of `message` to `out`, so several frames can go out in one write.
///
/// # Errors
///
/// [`FrameError::TooLarge`] when the encoding is over `max` (nothing is appended), or
/// [`FrameError::Encode`], which includes a message that holds file descriptors (those need
/// [`encode_with_fds`]).
pub fn encode<M: Serialize + ?Sized>(
    message: &M,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), FrameError> {
    let start = out.len();
    let mut fds = Vec::new();
    encode_with_fds(message, out, &mut fds, max)?;
    if !fds.is_empty() {
        out.truncate(start);
        return Err(FrameError::Encode(
            "the message holds file descriptors, which this write cannot carry".into(),
        ));
    }
    Ok(())
}

/// Like [`encode`], and the file descriptors the message's values hand over are appended to
/// `fds`, to be sent with the frame's bytes ([`fdpass`](crate::fdpass)).
///
/// # Errors
///
/// As for [`encode`]; on error nothing is appended to either.
pub fn encode_with_fds<M: Serialize + ?Sized>(
    message: &M,
    out: &mut Vec<u8>,
    fds: &mut Vec<Fd>,
    max: usize,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let (encoded, collected) =
        attach::collecting(|| offload_core::backend::encode_into(message, out));
    if let Err(e) = encoded {
        out.truncate(start);
        return Err(FrameError::Encode(e));
    }
    let len = out.len() - start - HEADER_LEN;
    let prefix = match u32::try_from(len) {
        Ok(prefix) if len <= max => prefix,
        _ => {
            out.truncate(start);
            return Err(FrameError::TooLarge { len, max });
        }
    };
    if collected.len() > MAX_FDS_PER_MESSAGE {
        out.truncate(start);
        return Err(FrameError::FdsOverLimit {
            count: collected.len(),
        });
    }
    out[start..start + HEADER_LEN].copy_from_slice(&prefix.to_le_bytes());
    fds.extend(collected);
    Ok(())
}

/// Blobs at least this large are not copied into a frame's write buffer: the frame is written
/// in two pieces, everything before the blob's bytes ([`encode_split`]) and then the bytes
/// straight from the blob. For megabytes, copying into the buffer (and, for a worker's
/// answer, faulting in a fresh buffer for it) cost more than the socket write.
pub const SPLIT_MIN: usize = 1 << 20;

/// Encodes the frame of a message whose encoding ends with the bytes `tail` (the bytes of the
/// message's last field, a blob), without copying them: `head` is the same message with
/// those bytes left empty. Appends the frame's header and everything before `tail` to `out`,
/// and the descriptors of values in `head` to `fds`; the frame is what was appended, then
/// `tail`.
///
/// # Errors
///
/// As for [`encode_with_fds`], the size counting `tail`; [`FrameError::Encode`] when `head`
/// does not end with an empty blob. On error nothing is appended to either.
pub fn encode_split<M: Serialize + ?Sized>(
    head: &M,
    tail: &[u8],
    out: &mut Vec<u8>,
    fds: &mut Vec<Fd>,
    max: usize,
) -> Result<(), FrameError> {
    let (start, fds_before) = (out.len(), fds.len());
    encode_with_fds(head, out, fds, max)?;
    let undo = |out: &mut Vec<u8>, fds: &mut Vec<Fd>, e: FrameError| {
        out.truncate(start);
        fds.truncate(fds_before);
        Err(e)
    };
    // An empty blob ends with its length, 0; `tail`'s length goes in its place (postcard
    // writes a length of bytes as a varint, as it writes a u64).
    if out.len() == start + HEADER_LEN || out.last() != Some(&0) {
        return undo(
            out,
            fds,
            FrameError::Encode("a split frame must end with a blob".into()),
        );
    }
    out.pop();
    let mut varint = [0u8; 10];
    match postcard::to_slice(&(tail.len() as u64), &mut varint) {
        Ok(length) => out.extend_from_slice(length),
        Err(e) => return undo(out, fds, FrameError::Encode(e.to_string())),
    }
    let len = out.len() - start - HEADER_LEN + tail.len();
    let prefix = match u32::try_from(len) {
        Ok(prefix) if len <= max => prefix,
        _ => return undo(out, fds, FrameError::TooLarge { len, max }),
    };
    out[start..start + HEADER_LEN].copy_from_slice(&prefix.to_le_bytes());
    Ok(())
}

/// Frames at least this large are decoded in place: their blobs keep their bytes in the
/// frame's buffer rather than copy them out (see [`Blob::decode_in_place`]). Not smaller
/// ones: each such frame leaves the decoder to grow a new buffer, and `map`'s answers
/// (a few hundred KiB) then churned the parent's heap (its RSS over a 10M-task map rose
/// 2-4 MiB, against -3..2 with a copy).
const IN_PLACE_MIN: usize = 4 << 20;

/// The most file descriptors one message may carry (each `SharedBuf` in a task or an output
/// is one). Checked when a task is submitted and when a worker encodes an answer, so the
/// reader's own limit below is only ever reached by a broken peer.
pub const MAX_FDS_PER_MESSAGE: usize = 1024;

/// The most file descriptors a decoder holds for frames not yet complete: more means a
/// broken peer. Room for a few messages at the limit, which one write may carry together.
const MAX_QUEUED_FDS: usize = 4 * MAX_FDS_PER_MESSAGE;

/// Reassembles frames from a byte stream.
///
/// ```
/// use offload_ipc::frame::{encode, FrameDecoder};
///
/// let mut wire = Vec::new();
/// encode(&("hello", 42u32), &mut wire, 1024)?;
/// let mut decoder = FrameDecoder::new(1024);
/// let space = decoder.read_buf();
/// space[..wire.len()].copy_from_slice(&wire);
/// decoder.filled(wire.len());
/// let (text, n): (String, u32) = decoder.next_message()?.expect("a whole frame");
/// assert_eq!((text.as_str(), n), ("hello", 42));
/// # Ok::<(), offload_ipc::frame::FrameError>(())
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Descriptors received and not yet taken by a frame, in arrival order.
    fds: Vec<Fd>,
    /// False while descriptors are refused (see [`refusing_fds`](Self::refusing_fds)).
    fds_allowed: bool,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that accepts frames of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            fds: Vec::new(),
            fds_allowed: true,
            start: 0,
            end: 0,
            max,
        }
    }

    /// Changes the frame limit (e.g. after a handshake), keeping every byte already buffered:
    /// the next frame may have arrived in the same read as the last one.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// The same decoder, but any file descriptor that arrives is an error (before a peer has
    /// proved who it is).
    pub fn refusing_fds(mut self) -> Self {
        self.fds_allowed = false;
        self
    }

    /// Accepts file descriptors from now on (after a handshake).
    pub fn accept_fds(&mut self) {
        self.fds_allowed = true;
    }

    /// Bytes the next complete frame needs in total (header included), once its header is in.
    fn wanted(&self) -> Option<usize> {
        let have = &self.buf[self.start..self.end];
        let header: [u8; HEADER_LEN] = have.get(..HEADER_LEN)?.try_into().ok()?;
        Some(HEADER_LEN + u32::from_le_bytes(header) as usize)
    }

    /// Free space to read into. Compacts and grows the buffer as needed, but never by more
    /// than the bytes a read can actually deliver next.
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // After a large frame, give the memory back rather than hold it while idle.
            if self.buf.len() > 4 * READ_CHUNK {
                self.buf = Vec::new();
            }
        }
        let pending = self.end - self.start;
        let want = match self.wanted() {
            // Growth follows what has arrived: at most double what the frame has so far.
            Some(total) => (total - pending).min(pending.max(READ_CHUNK)),
            None => READ_CHUNK,
        }
        .max(HEADER_LEN);
        if self.buf.len() - self.end < want {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.start = 0;
                self.end = pending;
            }
            if self.buf.len() - self.end < want {
                self.buf.resize(self.end + want, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// True when part of a frame is buffered (a frame, or its header, not complete yet).
    pub fn has_partial(&self) -> bool {
        self.end > self.start
    }

    /// Records that `n` bytes were read into the slice from [`read_buf`](Self::read_buf).
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Queues descriptors that arrived with the bytes of the last read, for the frames that
    /// refer to them.
    ///
    /// # Errors
    ///
    /// [`FrameError::TooManyFds`] when more are waiting than any honest peer would send.
    pub fn received_fds(
        &mut self,
        fds: impl IntoIterator<Item = std::os::fd::OwnedFd>,
    ) -> Result<(), FrameError> {
        self.fds.extend(fds.into_iter().map(Fd::new));
        if !self.fds_allowed && !self.fds.is_empty() {
            let count = self.fds.len();
            self.fds.clear();
            return Err(FrameError::UnexpectedFds { count });
        }
        if self.fds.len() > MAX_QUEUED_FDS {
            return Err(FrameError::TooManyFds {
                count: self.fds.len(),
            });
        }
        Ok(())
    }

    /// The next complete frame's body, if one is buffered. Takes no file descriptors: for
    /// frames that carry none (decode messages with [`next_message`](Self::next_message)).
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`] as soon as a header claims more than the limit.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        Ok(self.next_body()?.map(|body| &self.buf[body]))
    }

    /// Where the next complete frame's body is in `buf`, if one is buffered; consumes it.
    fn next_body(&mut self) -> Result<Option<std::ops::Range<usize>>, FrameError> {
        let Some(total) = self.wanted() else {
            return Ok(None);
        };
        if total - HEADER_LEN > self.max {
            return Err(FrameError::TooLarge {
                len: total - HEADER_LEN,
                max: self.max,
            });
        }
        if self.end - self.start < total {
            return Ok(None);
        }
        let body = self.start + HEADER_LEN..self.start + total;
        self.start += total;
        Ok(Some(body))
    }

    /// Hands the buffer holding a large frame over to the frame's blobs (keeping the bytes
    /// that follow the frame), so they need not copy their bytes out of it.
    fn take_buffer(&mut self) -> Arc<Vec<u8>> {
        let rest = self.buf[self.start..self.end].to_vec();
        self.end = rest.len();
        self.start = 0;
        Arc::new(std::mem::replace(&mut self.buf, rest))
    }

    /// The next complete frame, decoded as `M`.
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`], or [`FrameError::Malformed`] when the bytes are not an `M`.
    pub fn next_message<M: DeserializeOwned>(&mut self) -> Result<Option<M>, FrameError> {
        let fds = std::mem::take(&mut self.fds);
        let Some(body) = self.next_body()? else {
            self.fds = fds;
            return Ok(None);
        };
        let len = body.len();
        let frame;
        let (bytes, in_place) = if len >= IN_PLACE_MIN {
            frame = self.take_buffer();
            (&frame[body], Some(&frame))
        } else {
            (&self.buf[body], None)
        };
        let decode = || match in_place {
            Some(frame) => Blob::decode_in_place(frame, || postcard::from_bytes(bytes)),
            None => postcard::from_bytes(bytes),
        };
        // The frame's descriptors are the first ones queued; it says how many it took.
        let (decoded, mut rest, used) = attach::decoding(fds, decode);
        rest.drain(..used);
        self.fds = rest;
        decoded.map(Some).map_err(|e| FrameError::Malformed {
            len,
            reason: attach::describe(e),
        })
    }

    /// Call at end of stream: an error if a frame was cut short.
    ///
    /// # Errors
    ///
    /// [`FrameError::Truncated`] when part of a frame is buffered.
    pub fn finish(&self) -> Result<(), FrameError> {
        let have = self.end - self.start;
        if have == 0 {
            return Ok(());
        }
        Err(FrameError::Truncated {
            have,
            want: self.wanted().unwrap_or(HEADER_LEN),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(decoder: &mut FrameDecoder, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let space = decoder.read_buf();
            let n = space.len().min(bytes.len());
            space[..n].copy_from_slice(&bytes[..n]);
            decoder.filled(n);
            bytes = &bytes[n..];
        }
    }

    #[test]
    fn many_frames_round_trip_through_one_buffer() {
        let mut wire = Vec::new();
        for i in 0..1000u32 {
            encode(&(i, format!("msg {i}")), &mut wire, 1 << 20).unwrap();
        }
        let mut decoder = FrameDecoder::new(1 << 20);
        let mut got = Vec::new();
        // Feed in awkward pieces to cross frame boundaries.
        for piece in wire.chunks(7) {
            feed(&mut decoder, piece);
            while let Some(m) = decoder.next_message::<(u32, String)>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 1000);
        assert_eq!(got[999], (999, "msg 999".to_owned()));
        decoder.finish().unwrap();
    }

    #[test]
    fn raising_the_limit_keeps_frames_that_arrived_together() {
        // The handshake answer and the first request often arrive in one read.
        let mut wire = Vec::new();
        encode(&1u32, &mut wire, 16).unwrap();
        encode(&vec![5u8; 100], &mut wire, 1024).unwrap();
        let mut decoder = FrameDecoder::new(16);
        feed(&mut decoder, &wire);
        assert_eq!(decoder.next_message::<u32>().unwrap(), Some(1));
        decoder.set_max(1024);
        assert_eq!(
            decoder.next_message::<Vec<u8>>().unwrap(),
            Some(vec![5u8; 100])
        );
    }

    #[test]
    fn a_large_frame_is_reassembled() {
        let blob = vec![7u8; 3 << 20];
        let mut wire = Vec::new();
        encode(&blob, &mut wire, 8 << 20).unwrap();
        let mut decoder = FrameDecoder::new(8 << 20);
        feed(&mut decoder, &wire);
        assert_eq!(decoder.next_message::<Vec<u8>>().unwrap(), Some(blob));
    }

    #[test]
    fn the_buffer_shrinks_back_after_a_large_frame() {
        let mut wire = Vec::new();
        encode(&vec![1u8; 1 << 20], &mut wire, 2 << 20).unwrap();
        let mut decoder = FrameDecoder::new(2 << 20);
        feed(&mut decoder, &wire);
        assert!(decoder.next_frame().unwrap().is_some());
        let _ = decoder.read_buf();
        assert!(decoder.buf.len() <= READ_CHUNK, "{}", decoder.buf.len());
    }

    #[test]
    fn an_oversized_header_is_refused_before_any_allocation() {
        let mut decoder = FrameDecoder::new(1024);
        feed(&mut decoder, &u32::MAX.to_le_bytes());
        let err = decoder.next_frame().unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 1024
            }
        );
        assert!(
            decoder.buf.len() <= READ_CHUNK,
            "no allocation of the claimed size"
        );
    }

    #[test]
    fn a_claimed_size_under_the_limit_still_grows_only_with_the_data() {
        let mut decoder = FrameDecoder::new(usize::MAX);
        feed(&mut decoder, &(200_000_000u32).to_le_bytes());
        feed(&mut decoder, &[0; 100]);
        assert_eq!(decoder.next_frame().unwrap(), None);
        assert!(decoder.buf.len() < 4 * READ_CHUNK, "{}", decoder.buf.len());
        assert!(matches!(
            decoder.finish(),
            Err(FrameError::Truncated { have: 104, .. })
        ));
    }

    #[test]
    fn garbage_is_a_malformed_frame_not_a_panic() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&5u32.to_le_bytes());
        wire.extend_from_slice(&[0xff; 5]);
        let mut decoder = FrameDecoder::new(1024);
        feed(&mut decoder, &wire);
        let err = decoder.next_message::<(u64, String)>().unwrap_err();
        assert!(matches!(err, FrameError::Malformed { len: 5, .. }), "{err}");
    }

    #[test]
    fn a_split_frame_is_the_frame_with_its_blob_bytes_at_the_end() {
        for len in [0usize, 1, 127, 128, 300, 70_000, 3 << 20] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let message = (42u64, "task".to_string(), Blob::new(bytes.clone()));
            let mut whole = Vec::new();
            encode(&message, &mut whole, 8 << 20).unwrap();
            let head = (42u64, "task".to_string(), Blob::new(Vec::new()));
            let mut split = b"before".to_vec();
            let mut fds = Vec::new();
            encode_split(&head, &bytes, &mut split, &mut fds, 8 << 20).unwrap();
            split.extend_from_slice(&bytes);
            assert_eq!(&split[6..], &whole[..], "{len} bytes");
        }
        let mut out = Vec::new();
        let err = encode_split(
            &(1u8, Blob::new(vec![])),
            &[0; 100],
            &mut out,
            &mut Vec::new(),
            50,
        );
        assert!(
            matches!(err, Err(FrameError::TooLarge { len: 104, max: 50 })),
            "{err:?}"
        );
        let err = encode_split(
            &(Blob::new(vec![]), 5u8),
            &[0; 10],
            &mut out,
            &mut Vec::new(),
            50,
        );
        assert!(matches!(err, Err(FrameError::Encode(_))), "{err:?}");
        assert!(out.is_empty(), "nothing appended on error");
    }

    #[test]
    fn encoding_over_the_limit_appends_nothing() {
        let mut out = b"keep".to_vec();
        let err = encode(&vec![1u8; 100], &mut out, 10).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 10, .. }));
        assert_eq!(out, b"keep");
    }
}
