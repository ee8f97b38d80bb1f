//! Large payloads through shared memory: segments a connection reuses, request after request.
//!
//! Through the socket, a large input crosses four times: the kernel copies it in and out on
//! the way there, and again on the way back; for megabytes that is most of a round trip. So
//! the parent copies an input of [`SEGMENT_MIN`] bytes or more into a shared-memory segment
//! (a sealed memfd, the memory of a [`SharedBuf`]) and sends a small
//! [`RunInSegment`](crate::protocol::ToWorker::RunInSegment) naming it. The worker decodes the
//! task from the segment and writes the task's output into the same segment when it fits,
//! answering [`DoneInSegment`](crate::protocol::ToParent::DoneInSegment); otherwise it answers
//! through the socket as usual.
//!
//! Segments are made once and kept: new memory costs the kernel a page fault and a zeroed
//! page per 4 KiB, several times what copying it costs. Each connection has up to
//! [`MAX_SLOTS`] numbered slots. The parent sends a segment's descriptor the first time it
//! uses a slot (or when it replaces the slot's segment with a larger one); the worker keeps it
//! mapped, and later requests name the slot only. A slot is the parent's until it lends it to
//! a request, the worker's until it answers that request, and then the parent's again: the
//! parent reads the output in place, and lends the slot again once nothing refers to that
//! output any more.

use std::sync::Arc;

use offload_core::backend::{self, attach};
use offload_core::SharedBuf;
use serde::{Deserialize, Serialize};

/// Inputs at least this large go through a segment.
pub const SEGMENT_MIN: usize = 1 << 20;

/// Segments per connection, at most.
pub const MAX_SLOTS: usize = 4;

/// A segment on its way to a worker: sent as its descriptor, beside the frame.
///
/// On arrival it is mapped; a segment that cannot be (out of memory, say) arrives as the
/// reason, so that only the request that brought it fails, not the connection.
#[derive(Clone)]
pub struct Segment(Result<Arc<SharedBuf>, String>);

impl Segment {
    /// Wraps a segment the sender keeps (it shares it with the message).
    pub fn new(buf: Arc<SharedBuf>) -> Self {
        Segment(Ok(buf))
    }

    /// The segment as the sender holds it (for tests of the sender's side, which map it
    /// as a receiver would); `None` for one that arrived unmapped.
    #[doc(hidden)]
    pub fn sender_side(&self) -> Option<&Arc<SharedBuf>> {
        self.0.as_ref().ok()
    }

    /// The receiver's mapping, which nothing else holds yet; or why there is none.
    pub fn into_mapped(self) -> Result<SharedBuf, String> {
        Arc::into_inner(self.0?).ok_or_else(|| "the segment is shared already".to_owned())
    }
}

impl PartialEq for Segment {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Ok(a), Ok(b)) => Arc::ptr_eq(a, b),
            (Err(a), Err(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Segment {}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Ok(buf) => write!(f, "Segment({} bytes)", buf.len()),
            Err(e) => write!(f, "Segment(unmapped: {e})"),
        }
    }
}

// On the wire: the index of the segment's descriptor in the frame's list, and its length.
impl Serialize for Segment {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let buf = self
            .0
            .as_ref()
            .map_err(|e| S::Error::custom(format!("an unmapped segment cannot be sent: {e}")))?;
        let index = backend::segment_of(buf)
            .and_then(attach::push)
            .ok_or_else(|| {
                S::Error::custom("a segment can only be sent over a pool's connection")
            })?;
        (index, buf.len() as u64).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Segment {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let (index, len) = <(u32, u64)>::deserialize(d)?;
        let fd = attach::get(index).ok_or_else(|| {
            D::Error::custom(attach::decode_failed(format!(
                "segment descriptor #{index} did not arrive with the message"
            )))
        })?;
        let mapped = usize::try_from(len)
            .map_err(|_| "too large for this system".to_owned())
            .and_then(|len| backend::map_segment(fd, len).map_err(|e| e.to_string()))
            .map(Arc::new)
            .map_err(|e| format!("cannot map a shared-memory segment of {len} bytes: {e}"));
        Ok(Segment(mapped))
    }
}

/// A worker's segments, by slot: mapped once, kept until the parent replaces them.
#[derive(Default)]
pub(crate) struct WorkerSlots {
    /// A slot's segment, or why the last one sent could not be mapped.
    slots: Vec<Option<Result<SharedBuf, String>>>,
}

impl WorkerSlots {
    /// Keeps `segment` as slot `slot`'s, in place of the one before it; a segment that could
    /// not be mapped leaves the slot empty, and the reason for its request.
    pub(crate) fn install(&mut self, slot: u32, segment: Result<SharedBuf, String>) {
        if let Ok(index) = Self::index(slot) {
            if self.slots.len() <= index {
                self.slots.resize_with(index + 1, || None);
            }
            self.slots[index] = Some(segment);
        }
    }

    /// Takes slot `slot`'s segment for the request that names it; [`put_back`] returns it.
    ///
    /// # Errors
    ///
    /// Why the slot has no segment: it could not be mapped, or (on a bug) the parent named a
    /// slot it never sent.
    ///
    /// [`put_back`]: Self::put_back
    pub(crate) fn take(&mut self, slot: u32) -> Result<SharedBuf, String> {
        let index = Self::index(slot)?;
        match self.slots.get_mut(index).and_then(Option::take) {
            Some(Ok(segment)) => Ok(segment),
            Some(Err(e)) => Err(e),
            None => Err(format!(
                "the pool named shared-memory slot {slot}, which this worker does not have"
            )),
        }
    }

    /// Returns a segment [`take`](Self::take) lent.
    pub(crate) fn put_back(&mut self, slot: u32, segment: SharedBuf) {
        if let Ok(index) = Self::index(slot) {
            if let Some(place @ None) = self.slots.get_mut(index) {
                *place = Some(Ok(segment));
            }
        }
    }

    fn index(slot: u32) -> Result<usize, String> {
        usize::try_from(slot)
            .ok()
            .filter(|&i| i < MAX_SLOTS)
            .ok_or_else(|| format!("shared-memory slot {slot} is out of range"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_lends_each_slot_to_one_request_at_a_time() {
        let mut slots = WorkerSlots::default();
        assert!(slots.take(0).unwrap_err().contains("does not have"));
        assert!(slots
            .take(MAX_SLOTS as u32)
            .unwrap_err()
            .contains("out of range"));
        slots.install(2, SharedBuf::from_slice(b"in").map_err(|e| e.to_string()));
        let segment = slots.take(2).unwrap();
        assert_eq!(&segment[..], b"in");
        assert!(slots.take(2).is_err(), "lent out");
        slots.put_back(2, segment);
        assert_eq!(&slots.take(2).unwrap()[..], b"in");
    }

    #[test]
    fn a_segment_that_could_not_be_mapped_fails_its_request_with_the_reason() {
        let mut slots = WorkerSlots::default();
        slots.install(0, SharedBuf::from_slice(b"old").map_err(|e| e.to_string()));
        // The replacement failed: the old segment must not be used in its place.
        slots.install(
            0,
            Err("cannot map a shared-memory segment: out of memory".into()),
        );
        assert!(slots.take(0).unwrap_err().contains("out of memory"));
    }
}
