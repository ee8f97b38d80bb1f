//! Large encode buffers, kept for the next large task.
//!
//! A task of megabytes is encoded into a buffer that lives until its request is answered.
//! Fresh memory costs the kernel a page fault and a zeroed page per 4 KiB, and freeing it
//! hands the pages back (the allocator trims its heap): for 8 MiB, several times what
//! encoding it costs. So a pool keeps a few such buffers and encodes the next large task
//! into one of them, and lets them go once no large task used one for a while: the pool's
//! timer looks ([`trim_idle`](Recycler::trim_idle)), and a buffer kept while nobody looks
//! asks for a look ([`on_kept`](Recycler::on_kept)).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
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
    /// When a large task last gave a buffer back. (A small task's encode borrows a spare
    /// buffer too, and copies its bytes out: that is no use of the memory.)
    last_used: Option<Instant>,
}

/// A pool's spare encode buffers.
#[derive(Default)]
pub struct Recycler {
    spare: Mutex<Spare>,
    /// True while `spare` holds a buffer: small tasks do not take the lock to find out.
    any: AtomicBool,
    /// True while the pool's timer is set to look at the buffers.
    watched: AtomicBool,
    /// Asks the pool to look at the buffers in a while.
    on_kept: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Recycler {
    /// A kept buffer, empty, to encode into; `None` when none is kept.
    pub fn take(&self) -> Option<Vec<u8>> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        let mut buf = spare.buffers.pop()?;
        self.any.store(!spare.buffers.is_empty(), Ordering::Release);
        buf.clear();
        Some(buf)
    }

    /// Keeps `buf` for a later task, if it is large and there is room: a buffer a small
    /// task borrowed, or one a refused task was encoded into.
    pub fn put(&self, buf: Vec<u8>) {
        self.keep(buf, false);
    }

    /// Keeps `buf`, which a large task's request used, if there is room.
    fn give_back(&self, buf: Vec<u8>) {
        self.keep(buf, true);
    }

    fn keep(&self, buf: Vec<u8>, used: bool) {
        if buf.capacity() < RECYCLE_MIN {
            return;
        }
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        if used {
            spare.last_used = Some(Instant::now());
        }
        let kept: usize = spare.buffers.iter().map(Vec::capacity).sum();
        if spare.buffers.len() >= KEEP || kept + buf.capacity() > KEEP_BYTES {
            return;
        }
        spare.buffers.push(buf);
        self.any.store(true, Ordering::Release);
        drop(spare);
        // Nobody looks at the buffers now (the pool's timer found none last time, or never
        // ran): ask for a look. Set before asking: the pool clears it before it looks.
        if !self.watched.swap(true, Ordering::AcqRel) {
            match self.on_kept.get() {
                Some(ask) => ask(),
                None => self.watched.store(false, Ordering::Release),
            }
        }
    }

    /// Sets what asks the pool to look at the buffers in a while (once; later calls are
    /// ignored).
    pub fn on_kept(&self, ask: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_kept.set(Box::new(ask));
    }

    /// For the pool's timer: whether it is set to look at the buffers.
    pub fn set_watched(&self, watched: bool) {
        self.watched.store(watched, Ordering::Release);
    }

    /// True while a buffer is kept.
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Drops the kept buffers if no large task used one for `idle`.
    pub fn trim_idle(&self, idle: Duration) {
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.last_used.is_none_or(|t| t.elapsed() >= idle) {
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
            home.give_back(std::mem::take(&mut self.bytes));
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
    fn buffers_no_large_task_used_are_dropped_and_a_kept_one_asks_for_a_look() {
        let recycler = Arc::new(Recycler::default());
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = asked.clone();
        recycler.on_kept(move || {
            count.fetch_add(1, Ordering::Relaxed);
        });
        drop(crate::protocol::Blob::recycled(
            vec![0; RECYCLE_MIN],
            &recycler,
        ));
        assert!(recycler.any());
        assert_eq!(asked.load(Ordering::Relaxed), 1, "kept while nobody looked");
        // A small task borrows it: no use of the memory, and no new request for a look.
        let buf = recycler.take().unwrap();
        recycler.put(buf);
        assert_eq!(
            asked.load(Ordering::Relaxed),
            1,
            "a look is on its way already"
        );
        recycler.trim_idle(Duration::from_secs(60));
        assert!(recycler.any(), "a large task gave it back just now");
        recycler.set_watched(false);
        recycler.trim_idle(Duration::ZERO);
        assert!(!recycler.any() && recycler.take().is_none());
        // Kept again (a refused task's buffer): a look is asked for. Borrowed by a small
        // task just now, it still goes once no large task used one for the period.
        recycler.put(vec![0; RECYCLE_MIN]);
        assert_eq!(asked.load(Ordering::Relaxed), 2);
        std::thread::sleep(Duration::from_millis(5));
        let buf = recycler.take().unwrap();
        recycler.put(buf);
        recycler.trim_idle(Duration::from_millis(2));
        assert!(!recycler.any());
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
