//! `PoolStats`: what a pool is doing, for dashboards and tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A snapshot of a [`ProcessPool`](crate::ProcessPool)'s counters, from
/// [`stats`](crate::ProcessPool::stats). Counts are since the pool started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Requests waiting for a worker (a `map` batch counts once).
    pub queued: usize,
    /// Requests sent to workers and not answered yet.
    pub running: usize,
    /// Requests answered with results (a batch with failures counts as failed).
    pub completed: u64,
    /// Requests that failed: a task error, a crash, a timeout, a broken pool.
    pub failed: u64,
    /// Workers that died without being asked to (an exit, a signal), busy or idle. Workers the
    /// pool killed itself (timeouts, cancels) are not counted.
    pub crashed: u64,
    /// Tasks that ran past their timeout.
    pub timed_out: u64,
    /// Runs repeated because of `retries`.
    pub retried: u64,
    /// Workers started after the pool's startup: replacements (crashed, killed, recycled) and
    /// growth up to `max_workers`.
    pub restarts: u64,
    /// Workers connected (serving, or running the initializer).
    pub workers: usize,
}

/// What the reactor publishes for the pool's handles to read without a round trip.
#[derive(Debug, Default)]
pub(crate) struct Published {
    pub(crate) stats: PoolStats,
    /// Why the pool cannot run tasks any more, once it cannot.
    pub(crate) broken: Option<String>,
}

/// Where the reactor publishes: under a lock, and whether the pool broke in a flag as well,
/// which every submit reads. (Locking for it on every submit moved the lock between the
/// submitting thread and the reactor, which takes it on every turn.)
#[derive(Debug, Default)]
pub(crate) struct Board {
    published: Mutex<Published>,
    broken: AtomicBool,
}

impl Board {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Published> {
        // Nothing panics while holding it: the state is consistent even if poisoned.
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes `stats`, and `broken` unless a reason is published already.
    pub(crate) fn publish(&self, stats: PoolStats, broken: &Option<String>) {
        let mut published = self.lock();
        published.stats = stats;
        if published.broken.is_none() && broken.is_some() {
            published.broken.clone_from(broken);
            self.broken.store(true, Ordering::Release);
        }
    }

    /// Why the pool is broken, if it is.
    pub(crate) fn broken(&self) -> Option<String> {
        if !self.broken.load(Ordering::Acquire) {
            return None;
        }
        self.lock().broken.clone()
    }
}
