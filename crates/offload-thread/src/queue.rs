//! The job queue shared by the pool and its worker threads, and the worker loop.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::job::Job;

/// A FIFO of jobs with a closed flag, plus the count of live workers for `join`.
#[derive(Default)]
pub(crate) struct Queue {
    state: Mutex<State>,
    /// Workers wait here for jobs (or for the queue to close).
    work: Condvar,
    /// `join` waits here for the last worker to exit.
    exited: Condvar,
    /// How many jobs are queued, readable without the lock: what an idle worker watches while
    /// it spins (see [`Queue::spin`]). Written under the lock.
    queued: AtomicUsize,
    /// Whether the queue is closed. Written under the lock, so that a push or a worker reading
    /// it under the lock sees the close in order with the jobs; others read a snapshot.
    closed: AtomicBool,
    /// Times a worker began to spin, for the tests.
    #[cfg(test)]
    spins: AtomicUsize,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers blocked on `work`: a push only pays for a wake-up when someone sleeps.
    idle: usize,
    /// Wake-ups sent but not yet taken by a worker. A notified worker counts as busy at once,
    /// as in tokio's blocking pool: otherwise every push of a burst would see the same sleeping
    /// workers and pay for another futex wake.
    notified: usize,
    /// Wake-ups sent, and times a worker went to sleep, for the test that keeps wake-ups to
    /// at most one per sleep.
    #[cfg(test)]
    wakes: usize,
    #[cfg(test)]
    sleeps: usize,
    live: usize,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside the lock and never unwind, so the state is never left half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn add_worker(&self) {
        self.lock().live += 1;
    }

    /// Queues the job `make(value)`; gives `value` back when the queue is closed. The job is
    /// made under the lock so that a closed queue never swallows the value.
    pub(crate) fn try_push<V>(&self, value: V, make: impl FnOnce(V) -> Job) -> Result<(), V> {
        let mut state = self.lock();
        if self.closed.load(Ordering::Relaxed) {
            return Err(value);
        }
        state.jobs.push_back(make(value));
        self.queued.store(state.jobs.len(), Ordering::Relaxed);
        let wake = state.idle > state.notified;
        if wake {
            state.notified += 1;
            #[cfg(test)]
            {
                state.wakes += 1;
            }
        }
        drop(state);
        if wake {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Stops accepting jobs. With `drop_pending`, queued jobs are dropped (which resolves their
    /// handles with `Shutdown`); otherwise workers finish them and then exit.
    pub(crate) fn close(&self, drop_pending: bool) {
        let mut state = self.lock();
        self.closed.store(true, Ordering::Relaxed);
        let dropped = if drop_pending {
            std::mem::take(&mut state.jobs)
        } else {
            VecDeque::new()
        };
        self.queued.store(state.jobs.len(), Ordering::Relaxed);
        drop(state);
        self.work.notify_all();
        // Dropping a job runs user destructors and wakes callers: never under the lock.
        drop(dropped);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// The next job, blocking while the queue is empty; `None` once it is closed and drained.
    /// An idle worker first spins for up to `spin` (see [`Queue::spin`]), then sleeps.
    fn next(&self, spin: Duration) -> Option<Job> {
        let mut state = self.lock();
        let mut spun = false;
        loop {
            if let Some(job) = state.jobs.pop_front() {
                self.queued.store(state.jobs.len(), Ordering::Relaxed);
                return Some(job);
            }
            if self.closed.load(Ordering::Relaxed) {
                return None;
            }
            if !spun && !spin.is_zero() {
                spun = true;
                drop(state);
                self.spin(spin);
                state = self.lock();
                continue;
            }
            state.idle += 1;
            #[cfg(test)]
            {
                state.sleeps += 1;
            }
            state = self
                .work
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.idle -= 1;
            // Spurious wake-ups take no notification; `close` wakes everyone without one.
            state.notified = state.notified.saturating_sub(1);
            spun = false;
        }
    }

    /// Waits for a job (or the close) without sleeping, for up to `spin`: a burst of
    /// submissions then finds its workers awake instead of paying for a futex wake per job
    /// (perf: 14% of a submitting thread's time). The worker yields its CPU between looks,
    /// so on a busy machine the threads with work (the submitter) run first.
    fn spin(&self, spin: Duration) {
        #[cfg(test)]
        self.spins.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + spin;
        while self.queued.load(Ordering::Relaxed) == 0
            && !self.closed.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            thread::yield_now();
        }
    }

    pub(crate) fn worker_exited(&self) {
        let mut state = self.lock();
        state.live -= 1;
        let last = state.live == 0;
        drop(state);
        if last {
            self.exited.notify_all();
        }
    }

    /// Blocks until every worker exited or `deadline` passes; true when all exited.
    pub(crate) fn wait_exited(&self, deadline: Option<Instant>) -> bool {
        let mut state = self.lock();
        while state.live > 0 {
            state = match deadline {
                None => self
                    .exited
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.exited
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        true
    }
}

/// Counts a worker out when its thread ends, however it ends.
pub(crate) struct LiveGuard<'a>(pub(crate) &'a Queue);

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.worker_exited();
    }
}

/// A worker thread's life after its initializer: run jobs until the queue closes and drains.
pub(crate) fn run_worker(queue: &Queue, spin: Duration) {
    while let Some(job) = queue.next(spin) {
        job.run();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_burst_wakes_each_sleeping_worker_at_most_once() {
        let queue = Arc::new(Queue::default());
        let ran = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let queue = queue.clone();
                queue.add_worker();
                std::thread::spawn(move || {
                    let _live = LiveGuard(&queue);
                    run_worker(&queue, std::time::Duration::ZERO);
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while queue.lock().idle < 2 {
            assert!(Instant::now() < deadline, "workers did not go to sleep");
            std::thread::yield_now();
        }
        for _ in 0..10_000 {
            let ran = ran.clone();
            let pushed = queue.try_push((), move |()| {
                Job::new(move || {
                    ran.fetch_add(1, Ordering::Relaxed);
                })
            });
            assert!(pushed.is_ok());
        }
        let (wakes, sleeps) = {
            let state = queue.lock();
            (state.wakes, state.sleeps)
        };
        queue.close(false);
        assert!(queue.wait_exited(Some(deadline)));
        for worker in workers {
            worker.join().unwrap();
        }
        assert_eq!(ran.load(Ordering::Relaxed), 10_000);
        // Before the fix: one wake per push while a worker slept (thousands for a few sleeps).
        // A fixed bound (at most 100) was flaky: when the workers drain the queue faster than
        // the burst fills it, they sleep and are woken again and again, rightly.
        assert!(
            wakes <= sleeps,
            "{wakes} wake-ups for {sleeps} sleeps in a burst of 10,000 jobs"
        );
    }

    #[test]
    fn a_spinning_worker_takes_a_job_without_a_wake_up_and_stops_spinning_at_close() {
        let queue = Arc::new(Queue::default());
        queue.add_worker();
        let ran = Arc::new(AtomicUsize::new(0));
        let worker = {
            let queue = queue.clone();
            // A spin far longer than the test: only a job or the close can end it.
            std::thread::spawn(move || {
                let _live = LiveGuard(&queue);
                run_worker(&queue, Duration::from_secs(60));
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let wait_for = |what: &str, done: &dyn Fn() -> bool| {
            while !done() {
                assert!(Instant::now() < deadline, "{what}");
                std::thread::yield_now();
            }
        };
        wait_for("the worker did not start spinning", &|| {
            queue.spins.load(Ordering::SeqCst) == 1
        });
        let counter = ran.clone();
        let pushed = queue.try_push((), move |()| {
            Job::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            })
        });
        assert!(pushed.is_ok());
        wait_for("the job did not run", &|| ran.load(Ordering::SeqCst) == 1);
        // The worker spins again, and a close ends that spin at once, not after a minute.
        wait_for("the worker did not spin again", &|| {
            queue.spins.load(Ordering::SeqCst) == 2
        });
        let (wakes, sleeps) = {
            let state = queue.lock();
            (state.wakes, state.sleeps)
        };
        assert_eq!(
            (wakes, sleeps),
            (0, 0),
            "a spinning worker needs no wake-up"
        );
        queue.close(false);
        assert!(
            queue.wait_exited(Some(deadline)),
            "the close did not end the spin"
        );
        worker.join().unwrap();
    }
}
