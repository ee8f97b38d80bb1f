//! `Executor::map` / `map_unordered`: order, completeness, bounded memory, batching.
#![allow(clippy::unwrap_used)] // a test fails loudly by design

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{pool, within};
use futures::StreamExt;
use offload::prelude::*;
use offload::{BatchHandle, SubmitError};

#[offload::task]
fn triple(x: u64) -> u64 {
    x * 3
}

#[offload::task]
fn fussy(x: u64) -> u64 {
    assert!(x % 1000 != 7, "no numbers ending in 007");
    x
}

#[tokio::test]
async fn ordered_map_returns_every_result_in_input_order() {
    let pool = pool(2);
    let results: Vec<u64> = within(
        "map",
        pool.map((0..20_000).map(|x| Triple { x }))
            .map(|r| r.expect("task ok"))
            .collect(),
    )
    .await;
    assert_eq!(results, (0..20_000).map(|x| x * 3).collect::<Vec<_>>());
}

#[tokio::test]
async fn unordered_map_returns_every_index_exactly_once() {
    let pool = pool(2);
    let results: Vec<(usize, Result<u64, TaskError>)> = within(
        "map_unordered",
        pool.map_unordered((0..5_000).map(|x| Triple { x }))
            .collect(),
    )
    .await;
    let mut seen = HashSet::new();
    for (index, result) in results {
        assert_eq!(result, Ok(index as u64 * 3));
        assert!(seen.insert(index), "index {index} twice");
    }
    assert_eq!(seen.len(), 5_000);
}

#[tokio::test]
async fn a_panic_fails_only_its_own_item() {
    let pool = pool(2);
    let results: Vec<Result<u64, TaskError>> =
        within("map", pool.map((0..3_000).map(|x| Fussy { x })).collect()).await;
    for (x, result) in results.into_iter().enumerate() {
        if x % 1000 == 7 {
            let err = result.unwrap_err();
            assert_eq!(err.panic_message(), Some("no numbers ending in 007"));
        } else {
            assert_eq!(result, Ok(x as u64));
        }
    }
}

/// An endless iterator that counts how many tasks were pulled from it.
fn endless(pulled: &Arc<AtomicUsize>) -> impl Iterator<Item = Triple> {
    let pulled = pulled.clone();
    (0..).map(move |x| {
        pulled.fetch_add(1, Ordering::SeqCst);
        Triple { x }
    })
}

#[tokio::test]
async fn mapping_an_endless_iterator_stays_within_its_window() {
    let pool = pool(2);
    let pulled = Arc::new(AtomicUsize::new(0));
    let taken = 10_000;
    let results: Vec<u64> = within(
        "endless map",
        pool.map(endless(&pulled))
            .chunk_size(10)
            .window(3)
            .take(taken)
            .map(|r| r.unwrap())
            .collect(),
    )
    .await;
    assert_eq!(results.len(), taken);
    assert_eq!(results[taken - 1], (taken as u64 - 1) * 3);
    // At most `window` batches beyond what was consumed, plus the batch being consumed.
    let bound = taken + 4 * 10;
    assert!(
        pulled.load(Ordering::SeqCst) <= bound,
        "pulled {pulled:?} > {bound}"
    );

    // With adaptive batching the bound is the same shape: window x the largest batch.
    let pulled = Arc::new(AtomicUsize::new(0));
    let results = within(
        "endless map",
        pool.map_unordered(endless(&pulled)).take(taken).count(),
    )
    .await;
    assert_eq!(results, taken);
    let bound = taken + (2 * 2 + 1) * LARGEST_AUTO_BATCH;
    assert!(
        pulled.load(Ordering::SeqCst) <= bound,
        "pulled {pulled:?} > {bound}"
    );
}

/// The largest batch `map` builds on its own, as its docs say.
const LARGEST_AUTO_BATCH: usize = 65_536;

/// Wraps a real pool and records the size of every batch `map` submits.
struct RecordBatches<E> {
    inner: E,
    sizes: Mutex<Vec<usize>>,
}

impl<E: Executor> Executor for RecordBatches<E> {
    fn try_submit<T: Task>(&self, task: T) -> Result<TaskHandle<T::Output>, SubmitError<T>> {
        self.inner.try_submit(task)
    }
    fn try_submit_batch<T: Task>(
        &self,
        tasks: Vec<T>,
    ) -> Result<BatchHandle<T::Output>, SubmitError<Vec<T>>> {
        self.sizes.lock().expect("not poisoned").push(tasks.len());
        self.inner.try_submit_batch(tasks)
    }
    fn workers(&self) -> usize {
        self.inner.workers()
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
    fn shutdown_now(&self) {
        self.inner.shutdown_now()
    }
}

#[tokio::test]
async fn tiny_tasks_are_batched_automatically() {
    let ex = RecordBatches {
        inner: pool(2),
        sizes: Mutex::new(Vec::new()),
    };
    let n = 100_000;
    let count = within("map", ex.map((0..n).map(|x| Triple { x })).count()).await;
    assert_eq!(count as u64, n);
    let sizes = ex.sizes.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>() as u64, n);
    assert!(
        sizes.len() < 1_000,
        "{} batches for {n} tiny tasks: batching did not kick in",
        sizes.len()
    );
    assert!(sizes.iter().all(|&s| s <= LARGEST_AUTO_BATCH));
}

#[tokio::test]
async fn mapping_on_a_shut_down_pool_yields_shutdown_errors_and_ends() {
    let pool = pool(1);
    pool.shutdown();
    let results: Vec<_> = within("map", pool.map(endless(&Arc::default())).collect()).await;
    assert!(!results.is_empty());
    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap_err().is_shutdown()));
}

/// A broken backend: runs each batch on a real pool, then answers with `extra` results more
/// (or fewer, when negative) than it was given tasks.
struct MiscountingBatches {
    inner: offload::ThreadPool,
    extra: isize,
}

impl Executor for MiscountingBatches {
    fn try_submit<T: Task>(&self, task: T) -> Result<TaskHandle<T::Output>, SubmitError<T>> {
        self.inner.try_submit(task)
    }
    fn try_submit_batch<T: Task>(
        &self,
        tasks: Vec<T>,
    ) -> Result<BatchHandle<T::Output>, SubmitError<Vec<T>>> {
        let mut handle = self.inner.try_submit_batch(tasks)?;
        let mut results: Vec<_> = handle
            .wait_timeout(common::LIMIT)
            .expect("the batch finishes")
            .expect("the batch runs")
            .collect();
        let len = results.len().saturating_add_signed(self.extra);
        results.resize_with(len, || Ok(results_filler()));
        Ok(TaskHandle::ready(T::NAME, Ok(results.into())))
    }
    fn workers(&self) -> usize {
        self.inner.workers()
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
    fn shutdown_now(&self) {
        self.inner.shutdown_now()
    }
}

/// An output no task of this file returns, to invent results with.
fn results_filler<O: serde::de::DeserializeOwned>() -> O {
    postcard::from_bytes(&[0; 16]).unwrap()
}

#[tokio::test]
async fn a_backend_that_miscounts_a_batch_gives_each_task_exactly_one_result() {
    for extra in [-1, 1] {
        let ex = MiscountingBatches {
            inner: pool(2),
            extra,
        };
        let results: Vec<_> = within(
            "map",
            ex.map((0..10).map(|x| Triple { x }))
                .chunk_size(5)
                .collect(),
        )
        .await;
        assert_eq!(results.len(), 10, "extra {extra}: one result per task");
        for (x, result) in results.iter().enumerate() {
            let last_of_batch = x % 5 == 4;
            match result {
                Err(e) if extra < 0 && last_of_batch => {
                    assert!(e.to_string().contains("wrong number of results"), "{e}");
                }
                Ok(y) if extra > 0 || !last_of_batch => assert_eq!(*y, x as u64 * 3),
                other => panic!("extra {extra}, task {x}: {other:?}"),
            }
        }
    }
}
