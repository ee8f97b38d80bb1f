//! The parent's side of a connection's shared-memory segments (see `offload_ipc::segment`):
//! which slot holds which request's input, and which output a reader may lend out.
//!
//! The connection's writer [`place`](Segments::place)s a large input in a free slot; the
//! reader turns the worker's answer into the output, read in place
//! ([`answered`](Segments::answered)). A slot is free again once its request is answered and
//! no clone of that output is left (the scheduler and the caller drop theirs after decoding
//! it). Segments that sat unused for [`IDLE`] are dropped, on both sides (see
//! [`trim_idle`](Segments::trim_idle)).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use offload_core::SharedBuf;
use offload_ipc::frame::MAX_FDS_PER_MESSAGE;
use offload_ipc::protocol::{Blob, ToParent, ToWorker, WireError};
use offload_ipc::segment::{Segment, MAX_SLOTS, SEGMENT_MIN};

/// The most segment memory a connection keeps (the default largest frame fits). Beyond it,
/// large inputs go through the socket.
pub(crate) const MAX_BYTES: usize = 288 << 20;

/// Segments unused for this long are dropped: an idle pool does not hold on to memory it
/// needed once. (Making them again costs about half a millisecond per MiB.)
pub(crate) const IDLE: Duration = Duration::from_secs(2);

/// A connection's segments.
pub(crate) struct Segments {
    inner: Mutex<Inner>,
    /// The most memory its segments may hold.
    max_bytes: usize,
    /// Requests placed in a slot and not answered yet: while there are none, an answer is
    /// passed on without a look at the slots.
    placed: AtomicUsize,
    /// True while the connection keeps a segment.
    kept: AtomicBool,
}

#[derive(Default)]
struct Inner {
    slots: Vec<Option<Arc<SharedBuf>>>,
    /// When a request was last placed or answered.
    last_used: Option<Instant>,
    /// The request each slot is lent to, by slot.
    lent: [Option<Lent>; MAX_SLOTS],
}

#[derive(Clone, Copy)]
struct Lent {
    /// The request.
    id: u64,
    /// It brought the slot's segment to the worker.
    sent_segment: bool,
}

impl Default for Segments {
    fn default() -> Self {
        Segments::with_max_bytes(MAX_BYTES)
    }
}

impl Segments {
    fn with_max_bytes(max_bytes: usize) -> Self {
        Segments {
            inner: Mutex::default(),
            max_bytes,
            placed: AtomicUsize::new(0),
            kept: AtomicBool::new(false),
        }
    }

    /// `message`, with its input moved into a slot's segment when it is large and a slot is
    /// free (or can be made within the bound); otherwise `message` itself, for the socket.
    pub(crate) fn place(&self, message: ToWorker) -> ToWorker {
        let ToWorker::Run { id, task, input } = message else {
            return message;
        };
        // A request with the most descriptors a message may carry has no room for a
        // segment's.
        if input.len() < SEGMENT_MIN || input.fds().len() >= MAX_FDS_PER_MESSAGE {
            return ToWorker::Run { id, task, input };
        }
        let mut inner = self.lock();
        let Some((slot, segment)) = inner.fill(input.as_bytes(), self.max_bytes) else {
            return ToWorker::Run { id, task, input };
        };
        inner.last_used = Some(Instant::now());
        self.kept.store(true, Ordering::Release);
        inner.lent[slot] = Some(Lent {
            id,
            sent_segment: segment.is_some(),
        });
        self.placed.fetch_add(1, Ordering::AcqRel);
        ToWorker::RunInSegment {
            id,
            task,
            slot: slot as u32,
            segment,
            len: input.len() as u64,
            fds: input.without_bytes(),
        }
    }

    /// `message` as the scheduler takes it: a `DoneInSegment` becomes the `Done` it stands
    /// for, its output read in place. Any answer to a placed request ends the worker's use of
    /// its slot.
    ///
    /// # Errors
    ///
    /// A `DoneInSegment` for a request that was not placed, or longer than its segment: the
    /// worker does not follow the protocol.
    pub(crate) fn answered(&self, message: ToParent) -> Result<ToParent, String> {
        let (id, in_segment) = match &message {
            ToParent::Done { id, .. } => (*id, None),
            ToParent::DoneInSegment { id, len, .. } => (*id, Some(*len)),
            _ => return Ok(message),
        };
        if in_segment.is_none() && self.placed.load(Ordering::Acquire) == 0 {
            return Ok(message);
        }
        let mut inner = self.lock();
        let slot = inner
            .lent
            .iter()
            .position(|lent| lent.is_some_and(|l| l.id == id));
        if let Some(slot) = slot {
            // A task may run longer than the idle period: its answer counts as a use too.
            inner.last_used = Some(Instant::now());
            let lent = inner.lent[slot].take();
            self.placed.fetch_sub(1, Ordering::AcqRel);
            // The request that brought a segment failed to read its input: the worker may
            // not have mapped it (it says why). It gets a new one with the slot's next use.
            if let (
                Some(lent),
                ToParent::Done {
                    output: Err(WireError::Serialization(_)),
                    ..
                },
            ) = (lent, &message)
            {
                if lent.sent_segment {
                    inner.slots[slot] = None;
                }
            }
        }
        let ToParent::DoneInSegment { fds, .. } = message else {
            return Ok(message);
        };
        let len = in_segment.unwrap_or_default();
        let segment = slot
            .and_then(|slot| inner.slots.get(slot)?.clone())
            .ok_or_else(|| {
                format!("the worker answered request {id} in a segment it was not lent")
            })?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= segment.len())
            .ok_or_else(|| {
                format!(
                    "the worker answered request {id} with {len} bytes in a segment of {}",
                    segment.len()
                )
            })?;
        Ok(ToParent::Done {
            id,
            output: Ok(Blob::in_segment(segment, len).with_fds(fds.fds().to_vec())),
        })
    }

    /// True while the connection keeps a segment.
    pub(crate) fn kept(&self) -> bool {
        self.kept.load(Ordering::Acquire)
    }

    /// Drops every segment, if the connection keeps some (or sent one the worker may keep)
    /// and none was used for `idle`, none is lent and no output is still read. True when it
    /// did: the worker must then be told ([`ToWorker::DropSegments`]) before anything else is
    /// placed.
    pub(crate) fn trim_idle(&self, idle: Duration) -> bool {
        let mut inner = self.lock();
        let unused = inner.last_used.is_none_or(|t| t.elapsed() >= idle)
            && inner.lent.iter().all(Option::is_none)
            && inner
                .slots
                .iter()
                .flatten()
                .all(|segment| Arc::strong_count(segment) == 1);
        // Decided on `kept`, not on the slots: a segment dropped here after its first
        // request failed may still be mapped in the worker.
        if !unused || !self.kept() {
            return false;
        }
        inner.slots.clear();
        self.kept.store(false, Ordering::Release);
        true
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Plain bookkeeping: a panic elsewhere cannot leave it half-updated.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Copies `bytes` into a free slot's segment: the smallest one that holds them and is not
    /// more than twice the size a new one would have, or a new one (in place of the largest
    /// free segment, or in a new slot). Returns the slot, and its
    /// segment when it is new (the worker must be sent it). `None` when every slot is lent or
    /// its output still read, or when a new segment would pass `max_bytes` or cannot be made.
    fn fill(&mut self, bytes: &[u8], max_bytes: usize) -> Option<(usize, Option<Segment>)> {
        // A slot is free when its request was answered and nothing reads its output: this
        // lock guards every other holder of the segment, so nobody can clone it meanwhile.
        let free = |slot: usize| {
            self.lent[slot].is_none()
                && self.slots[slot]
                    .as_ref()
                    .is_none_or(|segment| Arc::strong_count(segment) == 1)
        };
        let size = |slot: usize| self.slots[slot].as_ref().map_or(0, |s| s.len());
        // Not one much larger than needed: a small input would keep a huge segment in use.
        let needed = capacity_for(bytes.len());
        let reuse = (0..self.slots.len())
            .filter(|&slot| free(slot) && (bytes.len()..=2 * needed).contains(&size(slot)))
            .min_by_key(|&slot| size(slot));
        if let Some(slot) = reuse {
            let segment = self.slots[slot].as_mut().and_then(Arc::get_mut)?;
            segment[..bytes.len()].copy_from_slice(bytes);
            return Some((slot, None));
        }
        // A new segment: in place of the largest free one (what memory is kept follows what
        // is used), or in a new slot.
        let slot = (0..self.slots.len())
            .filter(|&slot| free(slot))
            .max_by_key(|&slot| size(slot))
            .or((self.slots.len() < MAX_SLOTS).then_some(self.slots.len()))?;
        let kept: usize = (0..self.slots.len())
            .filter(|&other| other != slot)
            .map(size)
            .sum();
        let new_size = needed;
        if kept + new_size > max_bytes {
            return None;
        }
        let mut segment = SharedBuf::new(new_size).ok()?;
        segment[..bytes.len()].copy_from_slice(bytes);
        let segment = Arc::new(segment);
        if slot == self.slots.len() {
            self.slots.push(None);
        }
        self.slots[slot] = Some(segment.clone());
        Some((slot, Some(Segment::new(segment))))
    }
}

/// The size of a new segment for an input of `len` bytes: room for an output a little
/// larger, in whole MiB (segments are reused for inputs of other sizes).
fn capacity_for(len: usize) -> usize {
    (len + len / 16).next_multiple_of(1 << 20)
}

#[cfg(test)]
mod tests {
    use offload_core::backend;

    use super::*;

    fn run(id: u64, len: usize) -> ToWorker {
        ToWorker::Run {
            id,
            task: "t".into(),
            input: Blob::new((0..len).map(|i| i as u8).collect()),
        }
    }

    /// Places request `id` and maps its segment as the worker would (on first use of a slot).
    fn place(segments: &Segments, id: u64, len: usize) -> (u32, Option<SharedBuf>) {
        match segments.place(run(id, len)) {
            ToWorker::RunInSegment {
                id: placed,
                slot,
                segment,
                len: placed_len,
                ..
            } => {
                assert_eq!((placed, placed_len), (id, len as u64));
                let mapped = segment.map(|segment| {
                    let segment = segment.sender_side().expect("a mapped segment");
                    let fd = backend::segment_of(segment).expect("a segment").clone();
                    backend::map_segment(fd, segment.len()).expect("maps")
                });
                (slot, mapped)
            }
            other => panic!("not placed: {other:?}"),
        }
    }

    fn answer_in_segment(segments: &Segments, id: u64, len: usize) -> Blob {
        let done = ToParent::DoneInSegment {
            id,
            len: len as u64,
            fds: Blob::default(),
        };
        match segments.answered(done) {
            Ok(ToParent::Done {
                id: answered,
                output: Ok(output),
            }) if answered == id => output,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn small_inputs_stay_on_the_socket_and_large_ones_reuse_their_segment() {
        let segments = Segments::default();
        assert!(matches!(
            segments.place(run(1, SEGMENT_MIN - 1)),
            ToWorker::Run { .. }
        ));
        let (slot, worker_side) = place(&segments, 2, SEGMENT_MIN);
        let mut worker_side = worker_side.expect("the first use sends the segment");
        assert_eq!(
            worker_side[..4],
            [0, 1, 2, 3],
            "the input is in shared memory"
        );
        worker_side[..3].copy_from_slice(b"out");
        let output = answer_in_segment(&segments, 2, 3);
        assert_eq!(
            output.as_bytes(),
            b"out",
            "the worker's output, read in place"
        );
        // Lent again only once nothing reads that output.
        let (other, sent) = place(&segments, 3, SEGMENT_MIN);
        assert_ne!(other, slot, "the output is still read");
        assert!(sent.is_some());
        drop(output);
        assert!(segments
            .answered(ToParent::Done {
                id: 3,
                output: Err(WireError::Cancelled)
            })
            .is_ok());
        let (again, sent) = place(&segments, 4, SEGMENT_MIN / 2 + SEGMENT_MIN);
        assert!(sent.is_none(), "a segment the worker has is not sent again");
        assert!(again == slot || again == other);
    }

    #[test]
    fn any_answer_frees_the_slot_and_a_stray_one_is_a_protocol_error() {
        let segments = Segments::default();
        let (slot, _) = place(&segments, 1, SEGMENT_MIN);
        // Cancelled, failed, or too large for the segment: answered through the socket.
        let failed = ToParent::Done {
            id: 1,
            output: Err(WireError::Cancelled),
        };
        assert!(matches!(
            segments.answered(failed),
            Ok(ToParent::Done { id: 1, .. })
        ));
        let (reused, sent) = place(&segments, 2, SEGMENT_MIN);
        assert_eq!((reused, sent.is_some()), (slot, false));
        let stray = ToParent::DoneInSegment {
            id: 9,
            len: 1,
            fds: Blob::default(),
        };
        let err = segments.answered(stray).unwrap_err();
        assert!(
            err.contains("request 9") && err.contains("not lent"),
            "{err}"
        );
        let too_long = ToParent::DoneInSegment {
            id: 2,
            len: u64::MAX,
            fds: Blob::default(),
        };
        let err = segments.answered(too_long).unwrap_err();
        assert!(err.contains("bytes in a segment of"), "{err}");
    }

    #[test]
    fn a_segment_the_worker_could_not_map_is_sent_anew_and_a_task_failure_keeps_it() {
        let segments = Segments::default();
        let (slot, sent) = place(&segments, 1, SEGMENT_MIN);
        assert!(sent.is_some());
        let unmapped = ToParent::Done {
            id: 1,
            output: Err(WireError::Serialization(
                "the task's input did not reach the worker: cannot map".into(),
            )),
        };
        segments.answered(unmapped).unwrap();
        // Dropped here; the worker may still map it, and is told when the pool is idle.
        let idle = Segments::default();
        place(&idle, 1, SEGMENT_MIN);
        idle.answered(ToParent::Done {
            id: 1,
            output: Err(WireError::Serialization("cannot map".into())),
        })
        .unwrap();
        assert!(idle.trim_idle(Duration::ZERO) && !idle.kept());
        let (again, sent) = place(&segments, 2, SEGMENT_MIN);
        assert_eq!(again, slot);
        assert!(sent.is_some(), "the worker may not have it: sent again");
        // A task that panics read its input: the worker has the segment.
        let panicked = ToParent::Done {
            id: 2,
            output: Err(WireError::Panicked("boom".into())),
        };
        segments.answered(panicked).unwrap();
        let (_, sent) = place(&segments, 3, SEGMENT_MIN);
        assert!(sent.is_none());
    }

    #[test]
    fn an_input_with_the_most_descriptors_a_message_may_carry_stays_on_the_socket() {
        let segments = Segments::default();
        let fd = backend::segment_of(&SharedBuf::new(1).unwrap())
            .unwrap()
            .clone();
        let input = Blob::new(vec![0; SEGMENT_MIN]).with_fds(vec![fd; MAX_FDS_PER_MESSAGE]);
        let message = ToWorker::Run {
            id: 1,
            task: "t".into(),
            input,
        };
        assert!(matches!(segments.place(message), ToWorker::Run { .. }));
    }

    #[test]
    fn unused_segments_are_dropped_but_never_while_lent_or_read() {
        let segments = Segments::default();
        assert!(!segments.kept() && !segments.trim_idle(Duration::ZERO));
        place(&segments, 1, SEGMENT_MIN);
        assert!(segments.kept());
        assert!(!segments.trim_idle(Duration::ZERO), "lent to a request");
        let output = answer_in_segment(&segments, 1, 8);
        assert!(
            !segments.trim_idle(Duration::ZERO),
            "its output is still read"
        );
        drop(output);
        assert!(
            !segments.trim_idle(Duration::from_secs(60)),
            "used just now"
        );
        assert!(segments.trim_idle(Duration::ZERO));
        assert!(!segments.kept() && !segments.trim_idle(Duration::ZERO));
        let (_, sent) = place(&segments, 2, SEGMENT_MIN);
        assert!(sent.is_some(), "a new segment, sent to the worker");
    }

    #[test]
    fn a_small_input_does_not_keep_a_large_segment_in_use() {
        let segments = Segments::default();
        let (large, _) = place(&segments, 1, 16 << 20);
        answer_in_segment(&segments, 1, 0);
        let (slot, sent) = place(&segments, 2, SEGMENT_MIN);
        assert_eq!(slot, large, "in its place");
        assert!(sent.is_some(), "a new, smaller segment");
        answer_in_segment(&segments, 2, 0);
        let (again, sent) = place(&segments, 3, SEGMENT_MIN + 1);
        assert_eq!(
            (again, sent.is_none()),
            (slot, true),
            "reused at about its size"
        );
    }

    #[test]
    fn slots_and_memory_are_bounded_and_what_does_not_fit_takes_the_socket() {
        let segments = Segments::default();
        for id in 0..MAX_SLOTS as u64 {
            place(&segments, id, SEGMENT_MIN);
        }
        assert!(
            matches!(segments.place(run(99, SEGMENT_MIN)), ToWorker::Run { .. }),
            "every slot is lent"
        );
        let segments = Segments::with_max_bytes(16 << 20);
        let large = 8 << 20;
        place(&segments, 1, large);
        assert!(
            matches!(segments.place(run(2, large)), ToWorker::Run { .. }),
            "a second segment would pass the bound"
        );
        // Once the first is free, a larger input (past its headroom) replaces it within the
        // bound.
        segments
            .answered(ToParent::Done {
                id: 1,
                output: Err(WireError::Cancelled),
            })
            .unwrap();
        let (_, sent) = place(&segments, 3, large * 3 / 2);
        assert!(sent.is_some(), "a new, larger segment");
    }
}
