//! `as_completed`, `wait`, generic executors and `Either`, on real threads.
#![allow(clippy::unwrap_used)] // a test fails loudly by design

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{pool, within, LIMIT};
use futures::StreamExt;
use offload::prelude::*;
use offload::{as_completed, wait, Either, ReturnWhen};

/// A task that finishes when its sender fires (or after `LIMIT`, so nothing hangs).
fn gated(pool: &offload::ThreadPool, value: u32) -> (mpsc::Sender<()>, TaskHandle<u32>) {
    let (tx, rx) = mpsc::channel::<()>();
    let handle = pool.submit_fn(move || {
        let _ = rx.recv_timeout(LIMIT);
        value
    });
    (tx, handle)
}

#[tokio::test]
async fn as_completed_yields_in_completion_order_with_the_callers_index() {
    let pool = pool(3);
    let (gates, handles): (Vec<_>, Vec<_>) = (0..3).map(|i| gated(&pool, i * 10)).unzip();
    let mut results = as_completed(handles);
    assert_eq!(results.len(), 3);
    for index in [2, 0, 1] {
        gates[index].send(()).unwrap();
        let (got, value) = within("next result", results.next()).await.unwrap();
        assert_eq!(got, index);
        assert_eq!(value, Ok(index as u32 * 10));
    }
    assert!(within("end", results.next()).await.is_none());
}

#[tokio::test]
async fn wait_first_completed_returns_as_soon_as_one_is_done() {
    let pool = pool(3);
    let (slow_gate, slow) = gated(&pool, 1);
    let quick = pool.submit_fn(|| 2);
    let waited = within(
        "wait",
        wait(vec![slow, quick], ReturnWhen::FirstCompleted, None),
    )
    .await;
    let done: Vec<usize> = waited.done.iter().map(|(i, _)| *i).collect();
    let pending: Vec<usize> = waited.pending.iter().map(|(i, _)| *i).collect();
    assert_eq!((done, pending), (vec![1], vec![0]));
    let (_, quick) = waited.done.into_iter().next().unwrap();
    assert_eq!(quick.await, Ok(2), "a done handle still holds its result");
    slow_gate.send(()).unwrap();
    let (_, slow) = waited.pending.into_iter().next().unwrap();
    assert_eq!(within("slow", slow).await, Ok(1));
}

#[tokio::test]
async fn wait_first_error_returns_on_a_failure_and_otherwise_waits_for_all() {
    let pool = pool(3);
    let (gate, blocked) = gated(&pool, 1);
    let failing = pool.submit_fn(|| -> u32 { panic!("bad input") });
    let waited = within(
        "wait",
        wait(vec![blocked, failing], ReturnWhen::FirstError, None),
    )
    .await;
    assert_eq!(waited.done.len(), 1);
    assert_eq!(waited.done[0].0, 1);
    gate.send(()).unwrap();
    drop(waited);

    let handles: Vec<_> = (0..4).map(|i| pool.submit_fn(move || i)).collect();
    let waited = within("wait", wait(handles, ReturnWhen::FirstError, None)).await;
    assert_eq!((waited.done.len(), waited.pending.len()), (4, 0));
}

#[tokio::test]
async fn wait_all_completed_and_timeouts() {
    let pool = pool(2);
    let (gate, blocked) = gated(&pool, 5);
    let quick = pool.submit_fn(|| 6);
    let waited = within(
        "timed wait",
        wait(
            vec![blocked, quick],
            ReturnWhen::AllCompleted,
            Some(Duration::from_millis(50)),
        ),
    )
    .await;
    assert_eq!(waited.pending.len(), 1, "the blocked task is still pending");
    assert_eq!(waited.done.len(), 1);
    gate.send(()).unwrap();
    let handles = waited
        .pending
        .into_iter()
        .chain(waited.done)
        .map(|(_, h)| h);
    let waited = within("wait all", wait(handles, ReturnWhen::AllCompleted, None)).await;
    assert_eq!(waited.done.len(), 2);
    assert!(waited.pending.is_empty());
}

#[offload::task]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

async fn sum_on(ex: &impl Executor, n: u64) -> Result<u64, TaskError> {
    let handles: Vec<_> = (0..n).map(|i| ex.submit(Add { a: i, b: 1 })).collect();
    let mut total = 0;
    for h in handles {
        total += h.await?;
    }
    Ok(total)
}

#[tokio::test]
async fn generic_code_runs_on_any_backend_chosen_at_run_time() {
    for use_right in [false, true] {
        let ex: Either<offload::ThreadPool, std::sync::Arc<offload::ThreadPool>> = if use_right {
            Either::Right(std::sync::Arc::new(pool(1)))
        } else {
            Either::Left(pool(2))
        };
        assert_eq!(within("sum", sum_on(&ex, 100)).await, Ok(5050));
        assert_eq!(ex.workers(), if use_right { 1 } else { 2 });
        ex.shutdown();
        assert!(within("after shutdown", ex.submit(Add { a: 1, b: 1 }))
            .await
            .unwrap_err()
            .is_shutdown());
    }
}

#[test]
fn public_types_are_send_and_sync_as_documented() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<offload::ThreadPool>();
    send_sync::<TaskHandle<String>>();
    send_sync::<TaskError>();
    send_sync::<offload::SubmitError<Add>>();
    send_sync::<offload::AsCompleted<String>>();
    send_sync::<Either<offload::ThreadPool, offload::ThreadPool>>();
    fn send<T: Send>() {}
    send::<offload::Wait<String>>();
}
