//! Shared by the facade's integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

/// The bound on every wait in these tests: a hang fails with a message, never eats CI time.
pub(crate) const LIMIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`LIMIT`].
pub(crate) async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {LIMIT:?}"))
}

pub(crate) fn pool(workers: usize) -> offload::ThreadPool {
    offload::ThreadPool::builder()
        .workers(workers)
        .build()
        .expect("build pool")
}
