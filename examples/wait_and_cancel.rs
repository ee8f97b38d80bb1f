//! Waiting and cancelling: `wait` with `ReturnWhen::FirstCompleted`, `cancel()` of a queued
//! task, dropping a handle (which cancels too), and a panicking task coming back as a
//! `TaskError` with its message.
//!
//! Run it from the workspace root:
//!
//! ```text
//! cargo run --release --example wait_and_cancel
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use offload::prelude::*;
use offload::{wait, ReturnWhen};

/// Stands in for real work: sleeps for `ms` milliseconds and returns them.
#[offload::task]
fn nap(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[offload::task]
fn parse(text: String) -> u32 {
    text.parse().expect("not a number")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pool = offload::ThreadPool::builder().workers(2).build()?;

    // 1. Wait for the first of two tasks; the other stays pending, still running.
    let handles = vec![pool.submit(Nap { ms: 400 }), pool.submit(Nap { ms: 40 })];
    let timeout = Some(Duration::from_secs(5));
    let waited = wait(handles, ReturnWhen::FirstCompleted, timeout).await;
    for (index, handle) in waited.done {
        println!("wait: task {index} finished first with {:?}", handle.await);
    }
    for (index, handle) in waited.pending {
        println!("wait: task {index} still running: {}", handle.is_running());
        println!("      ... and then finished with {:?}", handle.await);
    }

    // 2. Both workers busy: a third task waits in the queue, and a cancel means it never runs.
    let busy = [pool.submit(Nap { ms: 200 }), pool.submit(Nap { ms: 200 })];
    let queued = pool.submit(Nap { ms: 1 });
    println!("cancel: cancelled = {}", queued.cancel());
    if let Err(e) = queued.await {
        println!("cancel: the handle resolves at once: {e}");
    }

    // 3. Dropping a handle cancels its task too (`detach()` would let it run).
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    drop(pool.submit_fn(move || flag.store(true, Ordering::SeqCst)));

    // 4. A panic is caught on the worker thread, which keeps serving. (The default panic
    //    hook still reports it on stderr.)
    let bad_input = Parse {
        text: "forty-two".into(),
    };
    match pool.submit(bad_input).await {
        Err(e) if e.is_panic() => println!("panic: {e}\n       message: {:?}", e.panic_message()),
        other => println!("panic: unexpected {other:?}"),
    }

    for handle in busy {
        handle.await?;
    }
    // `join` blocks until the workers exit, so run it off the async runtime's threads.
    tokio::task::spawn_blocking(move || pool.join()).await?;
    let ran = ran.load(Ordering::SeqCst);
    println!("drop: the dropped closure ran: {ran}");
    Ok(())
}
