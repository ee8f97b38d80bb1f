//! Waiting on many handles: `as_completed` and `wait`, after `concurrent.futures`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FusedStream, FuturesUnordered, Stream, StreamExt};
use futures_timer::Delay;

use crate::handle::Shared;
use crate::{TaskError, TaskHandle};

/// Streams results in the order tasks finish, each with its index in `handles`.
///
/// The stream owns the handles: dropping it before the end cancels the tasks whose results
/// were not yet taken.
///
/// ```
/// # use offload_core::{as_completed, TaskHandle};
/// # use futures::StreamExt;
/// # futures::executor::block_on(async {
/// let handles = vec![TaskHandle::ready("a", Ok(1)), TaskHandle::ready("b", Ok(2))];
/// let mut results = as_completed(handles);
/// while let Some((index, result)) = results.next().await {
///     println!("task {index} gave {:?}", result);
/// }
/// # });
/// ```
pub fn as_completed<T, I>(handles: I) -> AsCompleted<T>
where
    I: IntoIterator<Item = TaskHandle<T>>,
{
    AsCompleted {
        pending: handles
            .into_iter()
            .enumerate()
            .map(|(index, handle)| Indexed { index, handle })
            .collect(),
    }
}

/// The stream returned by [`as_completed`]: `(index, result)` in completion order.
#[must_use = "streams do nothing unless polled"]
pub struct AsCompleted<T> {
    pending: FuturesUnordered<Indexed<T>>,
}

impl<T> AsCompleted<T> {
    /// How many results are still to come.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when every result was taken.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

impl<T> Stream for AsCompleted<T> {
    type Item = (usize, Result<T, TaskError>);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.pending.poll_next_unpin(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.pending.len(), Some(self.pending.len()))
    }
}

impl<T> FusedStream for AsCompleted<T> {
    fn is_terminated(&self) -> bool {
        self.pending.is_terminated()
    }
}

impl<T> std::fmt::Debug for AsCompleted<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsCompleted")
            .field("pending", &self.pending.len())
            .finish()
    }
}

struct Indexed<T> {
    index: usize,
    handle: TaskHandle<T>,
}

impl<T> Future for Indexed<T> {
    type Output = (usize, Result<T, TaskError>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let index = self.index;
        Pin::new(&mut self.handle)
            .poll(cx)
            .map(|result| (index, result))
    }
}

/// When [`wait`] returns, as in `concurrent.futures.wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReturnWhen {
    /// As soon as any task is done.
    FirstCompleted,
    /// As soon as any task fails (any [`TaskError`], cancels included); when none fails,
    /// when all are done.
    FirstError,
    /// When every task is done.
    AllCompleted,
}

/// What [`wait`] returns: the handles that are done and those that are not, each with its
/// index in the input. Awaiting a handle from `done` returns at once.
#[derive(Debug)]
#[non_exhaustive]
pub struct Waited<T> {
    /// Finished handles (with a result, an error, or cancelled).
    pub done: Vec<(usize, TaskHandle<T>)>,
    /// Handles still queued or running. Dropping them cancels their tasks.
    pub pending: Vec<(usize, TaskHandle<T>)>,
}

/// Waits until `return_when` is met or `timeout` (if any) passes, then hands every handle
/// back, split into done and pending. Results are not taken: await the handles for them.
///
/// For synchronous code, `futures::executor::block_on(wait(..))` blocks the thread.
///
/// ```
/// # use offload_core::{wait, ReturnWhen, TaskHandle};
/// # use std::time::Duration;
/// # futures::executor::block_on(async {
/// let handles = vec![TaskHandle::ready("a", Ok(1)), TaskHandle::ready("b", Err(
///     offload_core::TaskError::panicked("b", "boom")))];
/// let waited = wait(handles, ReturnWhen::FirstError, Some(Duration::from_secs(5))).await;
/// assert_eq!(waited.done.len(), 2);
/// # });
/// ```
pub fn wait<T, I>(handles: I, return_when: ReturnWhen, timeout: Option<Duration>) -> Wait<T>
where
    I: IntoIterator<Item = TaskHandle<T>>,
{
    let handles: Vec<TaskHandle<T>> = handles.into_iter().collect();
    let watchers = handles
        .iter()
        .map(|handle| Watch {
            shared: handle.shared().clone(),
        })
        .collect();
    Wait {
        handles,
        watchers,
        return_when,
        delay: timeout.map(Delay::new),
    }
}

/// The future returned by [`wait`].
#[must_use = "futures do nothing unless awaited"]
pub struct Wait<T> {
    handles: Vec<TaskHandle<T>>,
    /// One watcher per handle, each woken only by its own task, so waiting on many handles
    /// costs one poll per completion rather than a scan of all of them.
    watchers: FuturesUnordered<Watch<T>>,
    return_when: ReturnWhen,
    delay: Option<Delay>,
}

impl<T> Future for Wait<T> {
    type Output = Waited<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Waited<T>> {
        let this = &mut *self;
        let met = loop {
            match this.watchers.poll_next_unpin(cx) {
                Poll::Ready(Some(failed)) => match this.return_when {
                    ReturnWhen::FirstCompleted => break true,
                    ReturnWhen::FirstError if failed => break true,
                    _ => {}
                },
                Poll::Ready(None) => break true,
                Poll::Pending => break false,
            }
        };
        let timed_out = this
            .delay
            .as_mut()
            .is_some_and(|d| Pin::new(d).poll(cx).is_ready());
        if !met && !timed_out {
            return Poll::Pending;
        }
        let (done, pending) = std::mem::take(&mut this.handles)
            .into_iter()
            .enumerate()
            .partition(|(_, h)| h.is_done());
        Poll::Ready(Waited { done, pending })
    }
}

impl<T> std::fmt::Debug for Wait<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wait")
            .field("handles", &self.handles.len())
            .field("return_when", &self.return_when)
            .finish()
    }
}

struct Watch<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Future for Watch<T> {
    /// True when the task finished with an error.
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        self.shared.poll_done(cx)
    }
}
