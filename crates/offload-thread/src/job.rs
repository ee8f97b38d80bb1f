//! `Job`: one queued closure, kept in the queue's own slot when it is small.
//!
//! A tiny task's job is its value and its handle's completer: two or three words. Boxing each
//! one meant a `malloc` on the submitting thread and a `free` on the worker thread that ran
//! it; glibc's frees of another thread's memory made allocation the largest single cost of a
//! tiny task (`perf` on the throughput benchmark: `malloc`, `_int_malloc` and `_int_free` were
//! ~25% of all samples). A job of up to [`INLINE_WORDS`] words, aligned no more than a word,
//! is stored inline; a larger one is boxed, and the box (one word) is stored inline.

use std::mem::{align_of, size_of, ManuallyDrop, MaybeUninit};

/// Words of inline storage: a completer, a task of two words, and a spare.
const INLINE_WORDS: usize = 4;

type Storage = MaybeUninit<[usize; INLINE_WORDS]>;

/// A `FnOnce() + Send` closure, run at most once; dropping a job that never ran drops the
/// closure (and what it captured).
pub(crate) struct Job {
    /// Holds an `F` (the closure's type, known only to `call` and `discard`), written by
    /// [`Job::new`] and not yet consumed.
    closure: Storage,
    /// Moves the `F` out of `closure` and runs it.
    call: unsafe fn(*mut Storage),
    /// Drops the `F` in `closure` in place.
    discard: unsafe fn(*mut Storage),
}

// SAFETY: a `Job` owns one `F: Send` (enforced by `Job::new`); moving the job to another thread
// moves the `F`, which `Send` allows. The function pointers are plain code.
unsafe impl Send for Job {}

impl Job {
    /// Wraps `f`, inline when it fits, boxed otherwise.
    pub(crate) fn new<F: FnOnce() + Send + 'static>(f: F) -> Job {
        if fits::<F>() {
            Job::inline(f)
        } else {
            Job::inline(Box::new(f))
        }
    }

    fn inline<F: FnOnce() + Send + 'static>(f: F) -> Job {
        // `new` boxes what does not fit, and a `Box<F>` always does.
        assert!(fits::<F>(), "a job's closure must fit its inline storage");
        let mut closure = Storage::uninit();
        // SAFETY: `fits` checked that an `F` is no larger and no more aligned than `Storage`,
        // whose memory is ours and uninitialized; writing moves `f` in.
        unsafe { closure.as_mut_ptr().cast::<F>().write(f) };
        Job {
            closure,
            call: call::<F>,
            discard: discard::<F>,
        }
    }

    /// Runs the closure, consuming the job.
    pub(crate) fn run(self) {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: the storage holds the `F` that `inline` wrote, not yet consumed (a job runs
        // once: `run` takes it by value); `ManuallyDrop` keeps `Drop` from dropping it again
        // after `call` moved it out, even if the closure unwinds.
        unsafe { (this.call)(&mut this.closure) }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: a job that is dropped never ran (`run` forgets it), so the storage still
        // holds the `F` that `inline` wrote.
        unsafe { (self.discard)(&mut self.closure) }
    }
}

fn fits<F>() -> bool {
    size_of::<F>() <= size_of::<Storage>() && align_of::<F>() <= align_of::<Storage>()
}

/// # Safety
///
/// `storage` holds an initialized `F` that is not used again afterwards.
unsafe fn call<F: FnOnce()>(storage: *mut Storage) {
    // SAFETY: the caller's promise; `read` moves the `F` out.
    let f = unsafe { storage.cast::<F>().read() };
    f();
}

/// # Safety
///
/// `storage` holds an initialized `F` that is not used again afterwards.
unsafe fn discard<F>(storage: *mut Storage) {
    // SAFETY: the caller's promise.
    unsafe { storage.cast::<F>().drop_in_place() }
}

#[cfg(test)]
mod tests {
    use std::mem::{align_of_val, size_of_val};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Counts its drops.
    struct Tracked(Arc<AtomicUsize>);

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_small_closure_runs_once_and_drops_its_captures_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let ran = Arc::new(AtomicUsize::new(0));
        let (tracked, counter) = (Tracked(drops.clone()), ran.clone());
        let closure = move || {
            let _keep = &tracked;
            counter.fetch_add(1, Ordering::SeqCst);
        };
        assert!(
            size_of_val(&closure) <= size_of::<Storage>(),
            "stored inline"
        );
        let job = Job::new(closure);
        // Moved around as the queue moves it.
        let jobs = vec![job];
        for job in jobs {
            job.run();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_large_closure_is_boxed_and_runs() {
        let big = [7u64; 32];
        let sum = Arc::new(AtomicUsize::new(0));
        let out = sum.clone();
        let closure = move || {
            out.fetch_add(big.iter().sum::<u64>() as usize, Ordering::SeqCst);
        };
        assert!(size_of_val(&closure) > size_of::<Storage>());
        Job::new(closure).run();
        assert_eq!(sum.load(Ordering::SeqCst), 7 * 32);
    }

    #[test]
    fn an_over_aligned_closure_is_boxed_and_runs() {
        #[repr(align(64))]
        struct Aligned(u8);
        let value = Aligned(5);
        let seen = Arc::new(AtomicUsize::new(0));
        let out = seen.clone();
        let closure = move || {
            assert_eq!(std::ptr::addr_of!(value) as usize % 64, 0, "misaligned");
            out.store(usize::from(value.0), Ordering::SeqCst);
        };
        assert!(align_of_val(&closure) > align_of::<Storage>());
        Job::new(closure).run();
        assert_eq!(seen.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn a_job_dropped_unrun_drops_its_captures_once_inline_or_boxed() {
        let drops = Arc::new(AtomicUsize::new(0));
        let small = Tracked(drops.clone());
        drop(Job::new(move || drop(small)));
        let large = (Tracked(drops.clone()), [0u64; 16]);
        drop(Job::new(move || drop(large)));
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    }
}
