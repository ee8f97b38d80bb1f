//! Large encode buffers, kept for the next large task.
//!
//! A task of megabytes is encoded into a buffer that lives until its request is answered.
//! Fresh memory costs the kernel a page fault and a zeroed page per 4 KiB, and freeing it
//! hands the pages back (the allocator trims its heap): for 8 MiB, several times what
//! encoding it costs. So a pool keeps a few such buffers and encodes the next large task
//! into one of them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// Buffers at least this large are kept.
pub const RECYCLE_MIN: usize = 1 << 20;

/// Buffers kept, at most.
const KEEP: usize = 2;

/// The most memory kept in buffers.
const KEEP_BYTES: usize = 256 << 20;

#[derive(Default)]
struct Spare {
    buffers: Vec<Vec<u8>>,
    /// When a buffer was last taken.
    last_taken: Option<Instant>,
}

/// A pool's spare encode buffers.
#[derive(Default)]
pub struct Recycler {
    spare: Mutex<Spare>,
    /// True while `spare` holds a buffer: small tasks do not take the lock to find out.
    any: AtomicBool,
}

impl Recycler {
    /// A kept buffer, empty, to encode into; `None` when none is kept.
    pub fn take(&self) -> Option<Vec<u8>> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        let mut buf = spare.buffers.pop()?;
        spare.last_taken = Some(Instant::now());
        self.any.store(!spare.buffers.is_empty(), Ordering::Release);
        buf.clear();
        Some(buf)
    }

    /// Keeps `buf` for a later task, if it is large and there is room.
    pub fn put(&self, buf: Vec<u8>) {
        if buf.capacity() < RECYCLE_MIN {
            return;
        }
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        let kept: usize = spare.buffers.iter().map(Vec::capacity).sum();
        if spare.buffers.len() < KEEP && kept + buf.capacity() <= KEEP_BYTES {
            spare.buffers.push(buf);
            self.any.store(true, Ordering::Release);
        }
    }

    /// True while a buffer is kept.
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Drops the kept buffers if none was taken for `idle`.
    pub fn trim_idle(&self, idle: Duration) {
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.last_taken.is_none_or(|t| t.elapsed() >= idle) {
            let buffers = std::mem::take(&mut spare.buffers);
            self.any.store(false, Ordering::Release);
            drop(spare);
            drop(buffers);
        }
    }
}

/// Encoded bytes that go back to their pool's [`Recycler`] when the last clone of their blob
/// drops.
pub(crate) struct Recycled {
    pub(crate) bytes: Vec<u8>,
    home: Weak<Recycler>,
}

impl Recycled {
    pub(crate) fn new(bytes: Vec<u8>, home: &Arc<Recycler>) -> Self {
        Recycled {
            bytes,
            home: Arc::downgrade(home),
        }
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        if let Some(home) = self.home.upgrade() {
            home.put(std::mem::take(&mut self.bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_kept_within_bounds_and_small_ones_are_not() {
        let recycler = Recycler::default();
        assert!(recycler.take().is_none());
        recycler.put(Vec::with_capacity(RECYCLE_MIN - 1));
        assert!(recycler.take().is_none(), "too small to keep");
        for _ in 0..KEEP + 1 {
            recycler.put(vec![1; RECYCLE_MIN]);
        }
        recycler.put(Vec::with_capacity(KEEP_BYTES));
        let mut taken = Vec::new();
        while let Some(buf) = recycler.take() {
            assert!(buf.is_empty() && buf.capacity() >= RECYCLE_MIN);
            taken.push(buf);
        }
        assert_eq!(taken.len(), KEEP);
    }

    #[test]
    fn unused_buffers_are_dropped() {
        let recycler = Recycler::default();
        recycler.put(vec![0; RECYCLE_MIN]);
        assert!(recycler.any());
        let buf = recycler.take().unwrap();
        recycler.put(buf);
        recycler.trim_idle(Duration::from_secs(60));
        assert!(recycler.any(), "taken just now");
        recycler.trim_idle(Duration::ZERO);
        assert!(!recycler.any() && recycler.take().is_none());
    }

    #[test]
    fn a_blob_s_bytes_go_home_when_its_last_clone_drops() {
        let recycler = Arc::new(Recycler::default());
        let blob = crate::protocol::Blob::recycled(vec![7; RECYCLE_MIN], &recycler);
        let clone = blob.clone();
        drop(blob);
        assert!(recycler.take().is_none(), "a clone still reads it");
        assert_eq!(clone.len(), RECYCLE_MIN);
        drop(clone);
        assert!(recycler.take().is_some());
        // A pool that is gone takes nothing back.
        let gone = crate::protocol::Blob::recycled(vec![7; RECYCLE_MIN], &recycler);
        drop(recycler);
        drop(gone);
    }
}
