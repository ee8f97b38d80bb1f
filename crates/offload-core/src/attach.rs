//! Descriptors that travel beside encoded bytes.
//!
//! Some values cannot cross a process boundary as bytes: a [`SharedBuf`](crate::SharedBuf) is
//! a shared-memory segment, and what the other process needs is its file descriptor. While a
//! backend encodes with [`encode_with_fds`], such a value hands its descriptor to the encoder
//! and writes only its index in the list; the backend sends the list beside the bytes (a Unix
//! socket carries descriptors with `SCM_RIGHTS`), and the receiver decodes with
//! [`decode_with_fds`], which gives the value its descriptor back by index.
//!
//! The lists live in thread-locals for exactly the span of one encode or decode, so a task's
//! own serialization (say, to JSON inside its `run`) never sees them: there, a value falls back
//! to its inline form.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

/// A file descriptor that travels beside encoded bytes, shared by every copy of the message
/// that holds it (a pool keeps a request until it completes, to send it again if its worker
/// is replaced).
#[derive(Clone)]
pub struct Fd(Arc<Inner>);

#[cfg(unix)]
type Inner = std::os::fd::OwnedFd;
// Descriptors are passed on Unix only; elsewhere no `Fd` can exist.
#[cfg(not(unix))]
type Inner = std::convert::Infallible;

#[cfg(unix)]
impl Fd {
    /// Takes ownership of a descriptor.
    pub fn new(fd: std::os::fd::OwnedFd) -> Self {
        Fd(Arc::new(fd))
    }
}

#[cfg(unix)]
impl std::os::fd::AsFd for Fd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(unix)]
impl std::os::fd::AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl std::fmt::Debug for Fd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            write!(f, "Fd({})", self.0.as_raw_fd())
        }
        #[cfg(not(unix))]
        match *self.0 {}
    }
}

thread_local! {
    /// Descriptors handed over by the values being encoded, in order.
    static OUTGOING: RefCell<Option<Vec<Fd>>> = const { RefCell::new(None) };
    /// Descriptors that arrived with the bytes being decoded, and how many of them (from the
    /// front) the values took.
    static INCOMING: RefCell<Option<Incoming>> = const { RefCell::new(None) };
    /// True while a task's own code runs inside an encode or decode of ours: its values must
    /// not see our lists.
    static PAUSED: Cell<bool> = const { Cell::new(false) };
    /// Why a value failed to decode: postcard keeps only "custom error", not the message.
    static DECODE_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records why a value could not be decoded, for [`decode_with_fds`] to report (postcard
/// drops the message of a custom error). Returns the message, for the value's own error.
pub fn decode_failed(message: String) -> String {
    DECODE_ERROR.with_borrow_mut(|slot| *slot = Some(message.clone()));
    message
}

struct Incoming {
    fds: Vec<Fd>,
    used: usize,
}

/// Runs `encode` with a fresh list for the descriptors it hands over ([`push`]), and returns
/// its result with the list. An encode already under way on this thread keeps its own list.
pub fn collecting<R>(encode: impl FnOnce() -> R) -> (R, Vec<Fd>) {
    let outer = OUTGOING.with_borrow_mut(|slot| slot.replace(Vec::new()));
    let paused = PAUSED.replace(false);
    let result = encode();
    PAUSED.set(paused);
    let fds = OUTGOING.with_borrow_mut(|slot| std::mem::replace(slot, outer));
    (result, fds.unwrap_or_default())
}

/// Runs `f`, a task's own code, with the lists of the encode or decode under way out of its
/// reach: a value it serializes itself (say, to JSON) is written inline.
pub fn suspended<R>(f: impl FnOnce() -> R) -> R {
    let paused = PAUSED.replace(true);
    let result = f();
    PAUSED.set(paused);
    result
}

/// Runs `decode`, one decode of ours, with `fds` for the values to take ([`get`]) and no
/// failure recorded ([`decode_failed`]) by an earlier, unrelated decode. Returns the result,
/// the list, and how many descriptors from its front the values referred to.
///
/// The list is installed even when it is empty: a decode nested in another (a task's input
/// decoded inside a batch's) must not find the outer decode's descriptors.
pub fn decoding<R>(fds: Vec<Fd>, decode: impl FnOnce() -> R) -> (R, Vec<Fd>, usize) {
    DECODE_ERROR.with_borrow_mut(|slot| *slot = None);
    let outer = INCOMING.with_borrow_mut(|slot| slot.replace(Incoming { fds, used: 0 }));
    let paused = PAUSED.replace(false);
    let result = decode();
    PAUSED.set(paused);
    let inner = INCOMING.with_borrow_mut(|slot| std::mem::replace(slot, outer));
    let Incoming { fds, used } = inner.unwrap_or(Incoming {
        fds: Vec::new(),
        used: 0,
    });
    (result, fds, used)
}

/// Hands `fd` to the encode under way and returns its index in the list; `None` when no
/// encode collects descriptors here (the value must then encode itself inline).
pub fn push(fd: &Fd) -> Option<u32> {
    if PAUSED.get() {
        return None;
    }
    OUTGOING.with_borrow_mut(|slot| {
        let list = slot.as_mut()?;
        let index = u32::try_from(list.len()).ok()?;
        list.push(fd.clone());
        Some(index)
    })
}

/// The descriptor at `index` of the decode under way; `None` when there is no such
/// descriptor (or no decode provides any here).
pub fn get(index: u32) -> Option<Fd> {
    if PAUSED.get() {
        return None;
    }
    INCOMING.with_borrow_mut(|slot| {
        let incoming = slot.as_mut()?;
        let index = usize::try_from(index).ok()?;
        let fd = incoming.fds.get(index)?.clone();
        incoming.used = incoming.used.max(index + 1);
        Some(fd)
    })
}

/// Encodes `value` like [`encode`](crate::encode), collecting the descriptors of the values in
/// it that travel beside the bytes.
///
/// # Errors
///
/// The reason the value does not serialize.
pub fn encode_with_fds<T: serde::Serialize + ?Sized>(
    value: &T,
) -> Result<(Vec<u8>, Vec<Fd>), String> {
    let (bytes, fds) = collecting(|| crate::encode(value));
    Ok((bytes?, fds))
}

/// Decodes a `T` from `bytes` (postcard), giving the values in it their descriptors from
/// `fds`.
///
/// # Errors
///
/// What postcard reports, or a value's own message (e.g. a descriptor it refers to is
/// missing).
pub fn decode_with_fds<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    fds: &[Fd],
) -> Result<T, String> {
    decoding(fds.to_vec(), || postcard::from_bytes(bytes))
        .0
        .map_err(describe)
}

/// What went wrong in a decode: postcard's error, or the message a value recorded with
/// [`decode_failed`].
pub fn describe(e: postcard::Error) -> String {
    match e {
        postcard::Error::SerdeDeCustom => DECODE_ERROR
            .with_borrow_mut(Option::take)
            .unwrap_or_else(|| e.to_string()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_collects_outside_an_encode() {
        let fd = Fd::new(std::fs::File::open("/dev/null").expect("open").into());
        assert_eq!(push(&fd), None);
        let ((a, b), fds) = collecting(|| (push(&fd), push(&fd)));
        assert_eq!((a, b, fds.len()), (Some(0), Some(1), 2));
        assert_eq!(push(&fd), None, "the list ends with the encode");
    }

    #[test]
    fn a_task_running_inside_an_encode_does_not_see_its_list() {
        let fd = Fd::new(std::fs::File::open("/dev/null").expect("open").into());
        let ((ours, theirs, nested), fds) = collecting(|| {
            let theirs = suspended(|| push(&fd));
            let nested = suspended(|| collecting(|| push(&fd)).1.len());
            (push(&fd), theirs, nested)
        });
        assert_eq!((ours, theirs, nested, fds.len()), (Some(0), None, 1, 1));
    }

    #[test]
    fn nested_encodes_keep_their_own_lists() {
        let fd = Fd::new(std::fs::File::open("/dev/null").expect("open").into());
        let ((first, inner), outer) = collecting(|| {
            let first = push(&fd);
            let ((), inner) = collecting(|| {
                push(&fd);
                push(&fd);
            });
            (first, inner)
        });
        assert_eq!((first, inner.len(), outer.len()), (Some(0), 2, 1));
    }

    #[test]
    fn a_decode_reports_how_many_descriptors_it_used() {
        let fd = Fd::new(std::fs::File::open("/dev/null").expect("open").into());
        let list = vec![fd.clone(), fd.clone(), fd];
        let (found, list, used) = decoding(list, || (get(1).is_some(), get(7).is_some()));
        assert_eq!((found, list.len(), used), ((true, false), 3, 2));
        assert!(get(0).is_none(), "nothing is provided after the decode");
    }

    #[test]
    fn a_nested_decode_without_descriptors_does_not_see_the_outer_ones() {
        let fd = Fd::new(std::fs::File::open("/dev/null").expect("open").into());
        /// A value that looks for the descriptor at index 0 as it decodes.
        struct Probe(bool);
        impl<'de> serde::Deserialize<'de> for Probe {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <u8 as serde::Deserialize>::deserialize(d)?;
                Ok(Probe(get(0).is_some()))
            }
        }
        let ((outer, inner), _, _) = decoding(vec![fd], || {
            let outer = decode_with_fds::<Probe>(&[0], &[]).map(|p| p.0);
            (get(0).is_some(), outer)
        });
        assert_eq!((outer, inner), (true, Ok(false)));
    }

    #[test]
    fn a_decode_does_not_report_an_earlier_decodes_failure() {
        decode_failed("an earlier failure".into());
        let (described, _, _) = decoding(Vec::new(), || describe(postcard::Error::SerdeDeCustom));
        assert_ne!(described, "an earlier failure");
    }
}
