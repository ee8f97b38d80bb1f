//! `map` over an iterator of tasks: ordered and unordered streams, a bounded window of work in
//! flight (backpressure), and automatic batching of tiny tasks.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::stream::{FuturesOrdered, FuturesUnordered, Stream, StreamExt};

use serde::de::DeserializeOwned;

use crate::executor::BatchHandle;
use crate::{BatchResults, Executor, Task, TaskError, TaskHandle};

/// The largest batch `map` builds on its own: big enough that per-batch costs (a queue entry,
/// a message, a wake-up of a worker process: tens of microseconds) vanish for tasks of tens of
/// nanoseconds, small enough to keep memory (a few MiB per batch) and latency low. Batches
/// only grow this large while they take under half a millisecond.
const MAX_AUTO_CHUNK: usize = 65_536;

/// A batch that finishes faster than this is grown; one much slower is shrunk. About a
/// millisecond keeps the per-batch cost of even a process round trip under a few percent.
const TARGET_CHUNK_TIME: Duration = Duration::from_millis(1);

/// Chooses how many tasks go into the next batch.
#[derive(Debug, Clone)]
struct Chunker {
    size: usize,
    max: usize,
    fixed: bool,
}

impl Chunker {
    /// Adaptive chunking for `tasks` on `workers` workers: start at one task per batch and
    /// double while batches finish quickly. When the iterator knows its length, batches stay
    /// small enough to give every worker about four of them, so the work stays balanced.
    fn adaptive(size_hint: (usize, Option<usize>), workers: usize) -> Self {
        let max = match size_hint.1 {
            Some(n) => (n / (4 * workers.max(1))).clamp(1, MAX_AUTO_CHUNK),
            None => MAX_AUTO_CHUNK,
        };
        Chunker {
            size: 1,
            max,
            fixed: false,
        }
    }

    fn fixed(size: usize) -> Self {
        let size = size.max(1);
        Chunker {
            size,
            max: size,
            fixed: true,
        }
    }

    fn next_size(&self) -> usize {
        self.size
    }

    /// Learns from a batch of `len` tasks that took `elapsed` from submission to result. The
    /// time includes queueing, so it overestimates the work: batches err on the small side.
    fn observe(&mut self, len: usize, elapsed: Duration) {
        if self.fixed || len < self.size {
            return;
        }
        if elapsed < TARGET_CHUNK_TIME / 2 {
            self.size = (self.size * 2).min(self.max);
        } else if elapsed > TARGET_CHUNK_TIME * 4 {
            self.size = (self.size / 2).max(1);
        }
    }
}

/// What a map stream yields for one task of type `T`.
type TaskResult<T> = Result<<T as Task>::Output, TaskError>;

/// One submitted batch: the tasks `start..start + len` of the input.
struct Chunk<O> {
    start: usize,
    len: usize,
    submitted: Instant,
    handle: BatchHandle<O>,
}

struct ChunkDone<O> {
    start: usize,
    len: usize,
    elapsed: Duration,
    results: Result<BatchResults<O>, TaskError>,
}

impl<O: DeserializeOwned> ChunkDone<O> {
    /// One result per task: a failure of the whole batch (a cancel, a shutdown, a lost
    /// worker) becomes the result of each of its tasks.
    fn into_results(self) -> BatchResults<O> {
        let results = match self.results {
            Ok(results) if results.len() == self.len => return results,
            Ok(results) => {
                // A backend that returns the wrong number of results is broken; say so for
                // each task left without one.
                let error = TaskError::serialization(
                    "offload::map",
                    "a batch came back with the wrong number of results",
                );
                let mut results: Vec<_> = results.collect();
                results.resize_with(self.len, || Err(error.clone()));
                results
            }
            Err(e) => (0..self.len).map(|_| Err(e.clone())).collect(),
        };
        results.into()
    }
}

impl<O> Future for Chunk<O> {
    type Output = ChunkDone<O>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ChunkDone<O>> {
        let this = &mut *self;
        Pin::new(&mut this.handle)
            .poll(cx)
            .map(|results| ChunkDone {
                start: this.start,
                len: this.len,
                elapsed: this.submitted.elapsed(),
                results,
            })
    }
}

/// The part shared by both map streams: pulls tasks, batches them, keeps the window full.
struct Feeder<'a, E, I> {
    executor: &'a E,
    tasks: I,
    exhausted: bool,
    next_index: usize,
    chunker: Chunker,
    window: usize,
}

impl<'a, E: Executor, I: Iterator> Feeder<'a, E, I>
where
    I::Item: Task,
{
    fn new(executor: &'a E, tasks: I) -> Self {
        let workers = executor.workers().max(1);
        Feeder {
            chunker: Chunker::adaptive(tasks.size_hint(), workers),
            window: 2 * workers,
            executor,
            tasks,
            exhausted: false,
            next_index: 0,
        }
    }

    /// Submits the next batch, if the iterator has more tasks. After a failed submit (the
    /// executor shut down) the batch's tasks resolve with that error and no more are pulled.
    fn next_chunk(&mut self) -> Option<Chunk<<I::Item as Task>::Output>> {
        if self.exhausted {
            return None;
        }
        let size = self.chunker.next_size();
        let tasks: Vec<I::Item> = self.tasks.by_ref().take(size).collect();
        if tasks.len() < size {
            // Not every iterator is fused: stop at the first end.
            self.exhausted = true;
        }
        if tasks.is_empty() {
            return None;
        }
        let len = tasks.len();
        let start = self.next_index;
        self.next_index += len;
        let name = <I::Item as Task>::NAME;
        let handle = self.executor.try_submit_batch(tasks).unwrap_or_else(|e| {
            self.exhausted = true;
            TaskHandle::ready(name, Err(e.into_task_error(name)))
        });
        Some(Chunk {
            start,
            len,
            submitted: Instant::now(),
            handle,
        })
    }
}

macro_rules! map_knobs {
    () => {
        /// Puts exactly `size` tasks in each batch instead of choosing adaptively. Use 1 for
        /// tasks that are long or vary widely in length. Set before the first poll.
        pub fn chunk_size(mut self, size: usize) -> Self {
            self.feeder.chunker = Chunker::fixed(size);
            self
        }

        /// Allows at most `batches` batches in flight (default: twice the executor's
        /// workers). Results not yet taken count as in flight, so this bounds memory too.
        pub fn window(mut self, batches: usize) -> Self {
            self.feeder.window = batches.max(1);
            self
        }
    };
}

/// The stream of [`Executor::map`]: results in input order.
///
/// Batching: unless [`chunk_size`](Self::chunk_size) fixes it, the first batch holds one
/// task, and the size doubles while batches come back in under half a millisecond and halves
/// when one takes over 4 ms. It never exceeds 65,536 tasks, nor `len / (4 x workers)` when
/// the iterator knows its length, so every worker gets work.
#[must_use = "streams do nothing unless polled: nothing is submitted before the first poll"]
pub struct Map<'a, E, I>
where
    I: Iterator,
    I::Item: Task,
{
    feeder: Feeder<'a, E, I>,
    in_flight: FuturesOrdered<Chunk<<I::Item as Task>::Output>>,
    /// The results of the oldest finished batch, not yet taken (taken in place: a batch can
    /// hold many thousands of results).
    ready: BatchResults<<I::Item as Task>::Output>,
}

impl<'a, E: Executor, I: Iterator> Map<'a, E, I>
where
    I::Item: Task,
{
    pub(crate) fn new(executor: &'a E, tasks: I) -> Self {
        Map {
            feeder: Feeder::new(executor, tasks),
            in_flight: FuturesOrdered::new(),
            ready: Vec::new().into(),
        }
    }

    map_knobs!();
}

impl<E: Executor, I: Iterator> Stream for Map<'_, E, I>
where
    I::Item: Task,
{
    type Item = TaskResult<I::Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.ready.len() > 0 {
                // Handed on as it comes (not taken apart and rebuilt, as `if let Some(r)`
                // does): rebuilt, the result is written in pieces and read back whole, which
                // stalls the CPU for a few ns, a fifth of the time per tiny task (measured).
                return Poll::Ready(this.ready.next());
            }
            while this.in_flight.len() < this.feeder.window {
                match this.feeder.next_chunk() {
                    Some(chunk) => this.in_flight.push_back(chunk),
                    None => break,
                }
            }
            match this.in_flight.poll_next_unpin(cx) {
                Poll::Ready(Some(done)) => {
                    this.feeder.chunker.observe(done.len, done.elapsed);
                    this.ready = done.into_results();
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

// The streams never pin their iterator or futures in place (futures live in boxed queues,
// the iterator is only called through `&mut`), so they are `Unpin` whatever the iterator is.
impl<E, I: Iterator> Unpin for Map<'_, E, I> where I::Item: Task {}
impl<E, I: Iterator> Unpin for MapUnordered<'_, E, I> where I::Item: Task {}

/// The stream of [`Executor::map_unordered`]: `(index, result)` in completion order.
#[must_use = "streams do nothing unless polled: nothing is submitted before the first poll"]
pub struct MapUnordered<'a, E, I>
where
    I: Iterator,
    I::Item: Task,
{
    feeder: Feeder<'a, E, I>,
    in_flight: FuturesUnordered<Chunk<<I::Item as Task>::Output>>,
    /// The results of the last finished batch not yet taken, with their input indices.
    ready: std::iter::Zip<std::ops::RangeFrom<usize>, BatchResults<<I::Item as Task>::Output>>,
}

impl<'a, E: Executor, I: Iterator> MapUnordered<'a, E, I>
where
    I::Item: Task,
{
    pub(crate) fn new(executor: &'a E, tasks: I) -> Self {
        MapUnordered {
            feeder: Feeder::new(executor, tasks),
            in_flight: FuturesUnordered::new(),
            ready: (0..).zip(BatchResults::from(Vec::new())),
        }
    }

    map_knobs!();
}

impl<E: Executor, I: Iterator> Stream for MapUnordered<'_, E, I>
where
    I::Item: Task,
{
    type Item = (usize, TaskResult<I::Item>);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.ready.next() {
                return Poll::Ready(Some(item));
            }
            while this.in_flight.len() < this.feeder.window {
                match this.feeder.next_chunk() {
                    Some(chunk) => this.in_flight.push(chunk),
                    None => break,
                }
            }
            match this.in_flight.poll_next_unpin(cx) {
                Poll::Ready(Some(done)) => {
                    this.feeder.chunker.observe(done.len, done.elapsed);
                    this.ready = (done.start..).zip(done.into_results());
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_grow_while_fast_shrink_when_slow_and_respect_the_cap() {
        let mut c = Chunker::adaptive((1_000_000, Some(1_000_000)), 2);
        assert_eq!(c.next_size(), 1);
        for _ in 0..20 {
            let n = c.next_size();
            c.observe(n, Duration::from_micros(10));
        }
        assert_eq!(c.next_size(), MAX_AUTO_CHUNK);
        c.observe(MAX_AUTO_CHUNK, Duration::from_millis(50));
        assert_eq!(c.next_size(), MAX_AUTO_CHUNK / 2);
        // A short final batch teaches nothing.
        c.observe(3, Duration::from_micros(1));
        assert_eq!(c.next_size(), MAX_AUTO_CHUNK / 2);
    }

    #[test]
    fn known_lengths_keep_every_worker_busy() {
        let mut c = Chunker::adaptive((100, Some(100)), 4);
        for _ in 0..20 {
            let n = c.next_size();
            c.observe(n, Duration::ZERO);
        }
        assert_eq!(c.next_size(), 100 / 16);
    }

    #[test]
    fn fixed_chunks_never_change() {
        let mut c = Chunker::fixed(0);
        c.observe(1, Duration::ZERO);
        assert_eq!(c.next_size(), 1);
    }
}
