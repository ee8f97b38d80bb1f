//! `TaskHandle`: the caller's end of one submitted task, and the state it shares with the
//! backend's [`Completer`](crate::backend::Completer).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::cancel::HasFlag;
use crate::TaskError;

/// Where a task is in its life. Transitions only go forward: `Queued -> Running -> Done` or
/// `Queued -> Done` (cancelled, or dropped by a pool that shut down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Queued,
    Running,
    Done,
}

/// State shared by a [`TaskHandle`] and its completer.
pub(crate) struct Shared<T> {
    pub(crate) name: &'static str,
    inner: Mutex<Inner<T>>,
    /// Signalled when the task becomes `Done`, for blocking waiters only.
    done: Condvar,
    /// Raised by `cancel()`; the running task reads it through `offload::is_cancelled()`.
    cancelled: AtomicBool,
}

struct Inner<T> {
    status: Status,
    /// `Some` from completion until the handle takes it.
    result: Option<Result<T, TaskError>>,
    waker: Option<Waker>,
    /// Threads blocked in `wait`; the condvar is only notified when there are some, so the
    /// common async path never pays for a futex wake.
    blocked: usize,
    /// Set by a backend that can stop running work (e.g. by sending a cancel frame).
    on_cancel: Option<Box<dyn FnOnce() + Send>>,
    /// Set by a backend whose blocked caller can fetch the result itself; the first blocking
    /// wait runs it (see [`WaitHelper`]).
    helper: Option<WaitHelper>,
}

/// Run by a blocking [`TaskHandle::wait`] before it sleeps: fetches the result on the
/// caller's thread if it can, and returns once the probe says the task is done, the deadline
/// passes, or it cannot help (the wait then sleeps as usual).
pub(crate) type WaitHelper = Box<dyn FnOnce(&dyn Fn() -> bool, Option<Instant>) + Send>;

impl<T> Shared<T> {
    pub(crate) fn new(name: &'static str, status: Status) -> Self {
        Shared {
            name,
            inner: Mutex::new(Inner {
                status,
                result: None,
                waker: None,
                blocked: 0,
                on_cancel: None,
                helper: None,
            }),
            done: Condvar::new(),
            cancelled: AtomicBool::new(false),
        }
    }

    /// With `hook` installed, as [`set_on_cancel`](Self::set_on_cancel) would before anyone
    /// else can see the state.
    pub(crate) fn with_on_cancel(mut self, hook: Box<dyn FnOnce() + Send>) -> Self {
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        inner.on_cancel = Some(hook);
        self
    }

    pub(crate) fn is_cancel_raised(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Nothing panics while holding this lock (user code never runs under it), so a
        // poisoned lock still holds consistent state.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn status(&self) -> Status {
        self.lock().status
    }

    /// The status, for a caller that looks without a blocking wait: drops the wait helper
    /// unused, since such a caller may never wait (see [`help_wait`](crate::backend::help_wait)).
    pub(crate) fn status_forgoing_helper(&self) -> Status {
        let mut inner = self.lock();
        let status = inner.status;
        let helper = inner.helper.take();
        drop(inner);
        drop(helper);
        status
    }

    /// `Queued -> Running`. False when the task was already finished (cancelled): do not run.
    pub(crate) fn start(&self) -> bool {
        let mut inner = self.lock();
        if inner.status == Status::Queued {
            inner.status = Status::Running;
            true
        } else {
            inner.status == Status::Running
        }
    }

    /// Finishes the task with `result` unless it is already finished. Returns whether this
    /// call finished it. A result that arrives after a cancel is dropped, outside the lock,
    /// since its destructor is user code.
    pub(crate) fn finish(&self, result: Result<T, TaskError>) -> bool {
        self.resolve(result, false)
    }

    /// Cancels the task unless it already finished. Returns whether this call cancelled it.
    pub(crate) fn cancel(&self) -> bool {
        self.resolve(Err(TaskError::cancelled(self.name)), true)
    }

    /// Moves the task to `Done` with `result`, then, outside the lock, wakes whoever waits and
    /// (for a cancel) runs the backend's cancel hook. The one place a task becomes `Done`.
    fn resolve(&self, result: Result<T, TaskError>, cancelling: bool) -> bool {
        let mut inner = self.lock();
        if inner.status == Status::Done {
            drop(inner);
            drop(result);
            return false;
        }
        if cancelling {
            self.cancelled.store(true, Ordering::Release);
        }
        inner.status = Status::Done;
        inner.result = Some(result);
        // Otherwise the hook stays, and goes with this state: usually on the caller's thread,
        // which made it, as the handle is dropped last. Freed here (on a backend's thread,
        // as a task completes) its allocation and the reference counts it holds moved
        // between CPUs for every task.
        let hook = if cancelling {
            inner.on_cancel.take()
        } else {
            None
        };
        let helper = inner.helper.take();
        let waker = inner.waker.take();
        let blocked = inner.blocked > 0;
        drop(inner);
        // Not needed any more; its captures may be user-visible resources (a connection).
        drop(helper);
        if blocked {
            self.done.notify_all();
        }
        if let Some(hook) = hook {
            hook();
        }
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Installs a hook run once if the task is cancelled while queued or running. Runs it at
    /// once if the task was already cancelled.
    pub(crate) fn set_on_cancel(&self, hook: Box<dyn FnOnce() + Send>) {
        let mut inner = self.lock();
        if inner.status != Status::Done {
            inner.on_cancel = Some(hook);
        } else if self.is_cancel_raised() {
            drop(inner);
            hook();
        }
    }

    /// Installs the helper of the first blocking wait, unless the task already finished.
    pub(crate) fn set_wait_helper(&self, helper: WaitHelper) {
        let mut inner = self.lock();
        if inner.status != Status::Done {
            inner.helper = Some(helper);
        }
    }

    /// Readiness without taking the result: used by `wait` and `as_completed`.
    /// `Ready(true)` means the task finished with an error.
    pub(crate) fn poll_done(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut inner = self.lock();
        if inner.status == Status::Done {
            return Poll::Ready(matches!(inner.result, Some(Err(_))));
        }
        register(&mut inner.waker, cx.waker());
        // An async waiter never runs the helper (its backend must not wait for it).
        let helper = inner.helper.take();
        drop(inner);
        drop(helper);
        Poll::Pending
    }
}

impl<T: Send> HasFlag for Shared<T> {
    fn flag(&self) -> &AtomicBool {
        &self.cancelled
    }
}

fn register(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(old) if old.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

/// The caller's end of a submitted task: a future of its output.
///
/// `pool.submit(task).await?` is the common case. The task runs whether or not the handle is
/// polled. Its methods mirror Python's `concurrent.futures.Future`: [`cancel`](Self::cancel),
/// [`is_cancelled`](Self::is_cancelled), [`is_running`](Self::is_running),
/// [`is_done`](Self::is_done), and blocking [`wait`](Self::wait) /
/// [`wait_timeout`](Self::wait_timeout) for synchronous callers.
///
/// **Dropping a handle cancels its task**, as dropping any Rust future cancels its work: when
/// an axum request is abandoned, its CPU work stops too. A task that has not started never
/// runs; a running task is asked to stop (see [`is_cancelled`](crate::is_cancelled)). Call
/// [`detach`](Self::detach) to let a task run on with nobody waiting for it.
#[must_use = "dropping a TaskHandle cancels its task; `.await` it, or call `.detach()`"]
pub struct TaskHandle<T> {
    shared: Arc<Shared<T>>,
    /// The result was returned; polling again is a bug in the caller.
    taken: bool,
    detached: bool,
}

impl<T> TaskHandle<T> {
    pub(crate) fn from_shared(shared: Arc<Shared<T>>) -> Self {
        TaskHandle {
            shared,
            taken: false,
            detached: false,
        }
    }

    /// A handle that is already finished with `result`: used when there is no task to run,
    /// e.g. `submit` on a pool that was shut down.
    pub fn ready(name: &'static str, result: Result<T, TaskError>) -> Self {
        let shared = Shared::new(name, Status::Done);
        shared.lock().result = Some(result);
        TaskHandle::from_shared(Arc::new(shared))
    }

    /// The task's name ([`Task::NAME`](crate::Task::NAME), or the closure's type for closures).
    pub fn task_name(&self) -> &'static str {
        self.shared.name
    }

    /// Cancels the task. Returns `true` if this call cancelled it, `false` if it had already
    /// finished (with a result, an error or an earlier cancel).
    ///
    /// After a successful cancel the handle resolves to [`TaskError::Cancelled`] at once. A
    /// queued task never runs. A running task is asked to stop: on a `ThreadPool` that is
    /// cooperative only (the task's thread stays busy until the task returns or checks
    /// [`is_cancelled`](crate::is_cancelled)); backends that can stop work harder say so.
    pub fn cancel(&self) -> bool {
        self.shared.cancel()
    }

    /// True when the task was cancelled (through [`cancel`](Self::cancel)).
    pub fn is_cancelled(&self) -> bool {
        let status = self.shared.status_forgoing_helper();
        self.shared.is_cancel_raised() && status == Status::Done
    }

    /// True while a worker is running the task.
    pub fn is_running(&self) -> bool {
        self.shared.status_forgoing_helper() == Status::Running
    }

    /// True when the task finished: with its output, an error, or a cancel. Awaiting a handle
    /// that is done returns at once.
    pub fn is_done(&self) -> bool {
        self.shared.status_forgoing_helper() == Status::Done
    }

    /// Lets the task run to completion with nobody waiting for it; its output is dropped.
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Blocks the current thread until the task finishes, and returns its output.
    ///
    /// For synchronous callers. In async code, `.await` the handle instead: blocking an async
    /// runtime's thread stalls every other future on it.
    ///
    /// # Errors
    ///
    /// The [`TaskError`] the task finished with.
    ///
    /// # Panics
    ///
    /// If the handle already returned its result (it was awaited to completion before).
    pub fn wait(mut self) -> Result<T, TaskError> {
        match self.wait_until(None) {
            Some(result) => result,
            None => unreachable!("a wait without a deadline returns only with a result"),
        }
    }

    /// Blocks for at most `timeout`. Returns `None` when the task has not finished by then; the
    /// handle stays valid (wait again, await it or cancel it).
    ///
    /// # Errors
    ///
    /// `Some(Err(_))`: the [`TaskError`] the task finished with.
    ///
    /// # Panics
    ///
    /// If the handle already returned its result.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Result<T, TaskError>> {
        self.wait_until(Some(Instant::now() + timeout))
    }

    fn wait_until(&mut self, deadline: Option<Instant>) -> Option<Result<T, TaskError>> {
        let mut inner = self.shared.lock();
        if let Some(helper) = inner.helper.take() {
            if inner.result.is_none() {
                drop(inner);
                let shared = &self.shared;
                helper(&|| shared.status() == Status::Done, deadline);
                inner = self.shared.lock();
            }
        }
        loop {
            if let Some(result) = inner.result.take() {
                self.taken = true;
                return Some(result);
            }
            assert!(
                !self.taken,
                "TaskHandle waited on after it returned its result"
            );
            inner.blocked += 1;
            inner = match deadline {
                None => self
                    .shared
                    .done
                    .wait(inner)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let (guard, _) = self
                        .shared
                        .done
                        .wait_timeout(inner, left)
                        .unwrap_or_else(PoisonError::into_inner);
                    guard
                }
            };
            inner.blocked -= 1;
            if inner.result.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
        }
    }

    /// The shared state, for watchers that observe completion without taking the result.
    pub(crate) fn shared(&self) -> &Arc<Shared<T>> {
        &self.shared
    }
}

impl<T> Future for TaskHandle<T> {
    type Output = Result<T, TaskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut inner = this.shared.lock();
        if let Some(result) = inner.result.take() {
            this.taken = true;
            return Poll::Ready(result);
        }
        assert!(
            !this.taken,
            "TaskHandle polled after it returned its result"
        );
        register(&mut inner.waker, cx.waker());
        // An async waiter never runs the helper (its backend must not wait for it).
        let helper = inner.helper.take();
        drop(inner);
        drop(helper);
        Poll::Pending
    }
}

impl<T> Drop for TaskHandle<T> {
    fn drop(&mut self) {
        if !self.detached && !self.taken {
            // Drops the helper too.
            self.shared.cancel();
        } else {
            self.shared.status_forgoing_helper();
        }
    }
}

impl<T> std::fmt::Debug for TaskHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle")
            .field("task", &self.shared.name)
            .field("status", &self.shared.status())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::thread;

    use super::*;
    use crate::backend::{pair, pair_with_cancel};

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn a_completed_task_resolves_its_handle() {
        let (completer, mut handle) = pair::<u32>("t");
        assert!(!handle.is_done() && !handle.is_running());
        assert!(completer.start());
        assert!(handle.is_running());
        completer.complete(Ok(7));
        assert!(handle.is_done() && !handle.is_cancelled());
        assert_eq!(handle.wait_timeout(LONG), Some(Ok(7)));
    }

    #[test]
    fn cancelling_a_queued_task_resolves_at_once_and_it_never_starts() {
        let (completer, mut handle) = pair::<u32>("t");
        assert!(handle.cancel());
        assert!(!handle.cancel(), "a second cancel finds it finished");
        assert!(handle.is_cancelled() && handle.is_done());
        assert!(!completer.start(), "a cancelled task must not run");
        assert!(completer.is_cancelled());
        completer.complete(Ok(1)); // late results are dropped
        assert_eq!(
            handle.wait_timeout(LONG),
            Some(Err(TaskError::cancelled("t")))
        );
    }

    /// A hook given with the pair runs on a cancel like one registered later; after a
    /// completion it never runs, and what it holds is let go once the handle and the
    /// completer are both gone (the caller's handle, usually last).
    #[test]
    fn a_cancel_hook_runs_only_on_a_cancel_and_goes_with_the_handle() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = |runs: &Arc<AtomicUsize>| {
            let runs = runs.clone();
            move || {
                runs.fetch_add(1, Ordering::SeqCst);
            }
        };
        let (completer, handle) = pair_with_cancel::<u32>("t", counted(&runs));
        assert!(completer.start());
        assert!(handle.cancel());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        drop(completer);

        let (completer, handle) = pair_with_cancel::<u32>("t", counted(&runs));
        assert_eq!(Arc::strong_count(&runs), 2, "the hook holds its captures");
        completer.complete(Ok(7));
        assert!(!handle.cancel(), "finished already");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "no run after a completion");
        assert_eq!(handle.wait(), Ok(7));
        assert_eq!(Arc::strong_count(&runs), 1, "let go with the handle");
    }

    #[test]
    fn cancelling_a_running_task_raises_its_flag_and_runs_the_backend_hook() {
        let (completer, handle) = pair::<u32>("t");
        let hooked = Arc::new(AtomicBool::new(false));
        let h = hooked.clone();
        completer.on_cancel(move || h.store(true, Ordering::SeqCst));
        assert!(completer.start());
        let flag = completer.cancel_flag();
        assert!(handle.cancel());
        assert!(flag.is_raised());
        assert!(hooked.load(Ordering::SeqCst));
        assert_eq!(handle.wait(), Err(TaskError::cancelled("t")));
    }

    #[test]
    fn a_hook_installed_after_the_cancel_runs_at_once() {
        let (completer, handle) = pair::<u32>("t");
        drop(handle);
        let hooked = Arc::new(AtomicBool::new(false));
        let h = hooked.clone();
        completer.on_cancel(move || h.store(true, Ordering::SeqCst));
        assert!(hooked.load(Ordering::SeqCst));
    }

    #[test]
    fn dropping_a_handle_cancels_but_detaching_does_not() {
        let (dropped, handle) = pair::<u32>("t");
        drop(handle);
        assert!(dropped.is_cancelled());
        assert!(!dropped.start());

        let (detached, handle) = pair::<u32>("t");
        handle.detach();
        assert!(!detached.is_cancelled());
        assert!(detached.start());
    }

    #[test]
    fn a_completer_dropped_without_a_result_resolves_shutdown() {
        let (completer, handle) = pair::<u32>("t");
        drop(completer);
        assert_eq!(handle.wait(), Err(TaskError::shutdown("t")));
    }

    #[test]
    fn wait_timeout_gives_up_and_keeps_the_handle_usable() {
        let (completer, mut handle) = pair::<u32>("t");
        assert_eq!(handle.wait_timeout(Duration::from_millis(20)), None);
        let worker = thread::spawn(move || completer.complete(Ok(3)));
        assert_eq!(handle.wait_timeout(LONG), Some(Ok(3)));
        worker.join().unwrap();
    }

    #[test]
    fn a_blocked_waiter_is_woken_from_another_thread() {
        let (completer, handle) = pair::<String>("t");
        let worker = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            completer.complete(Ok("done".into()));
        });
        let mut handle = handle;
        assert_eq!(handle.wait_timeout(LONG), Some(Ok("done".to_owned())));
        worker.join().unwrap();
    }

    #[test]
    fn the_future_resolves_when_completed_from_another_thread() {
        let (completer, handle) = pair::<u32>("t");
        let worker = thread::spawn(move || completer.complete(Ok(9)));
        let result = futures::executor::block_on(handle);
        assert_eq!(result, Ok(9));
        worker.join().unwrap();
    }

    #[test]
    #[should_panic(expected = "polled after it returned its result")]
    fn polling_after_completion_is_a_clear_panic() {
        let mut handle = TaskHandle::ready("t", Ok(1));
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(Pin::new(&mut handle).poll(&mut cx), Poll::Ready(Ok(1)));
        let _ = Pin::new(&mut handle).poll(&mut cx);
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<TaskHandle<String>>();
        send_sync::<crate::backend::Completer<String>>();
    }
}
