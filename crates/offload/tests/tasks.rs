//! `#[offload::task]`: generated types, stable names, registration, fallible tasks.
#![allow(clippy::unwrap_used)] // a test fails loudly by design

mod common;

use common::{pool, within};
use offload::prelude::*;

/// Counts primes in `lo..hi`.
#[offload::task]
pub fn count_primes(lo: u64, hi: u64) -> u64 {
    (lo..hi)
        .filter(|&n| n > 1 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0))
        .count() as u64
}

#[offload::task]
fn parse_number(text: String) -> Result<i64, String> {
    text.trim()
        .parse()
        .map_err(|e| format!("`{text}` is not a number: {e}"))
}

#[offload::task]
fn no_arguments() {}

mod nested {
    #[offload::task]
    pub(crate) fn r#type(kind: Vec<u8>) -> usize {
        kind.len()
    }
}

#[test]
fn the_task_type_is_named_after_the_function_and_registered_under_a_stable_name() {
    assert_eq!(CountPrimes::NAME, "tasks::count_primes");
    assert_eq!(nested::Type::NAME, "tasks::nested::type");
    assert_eq!(NoArguments::NAME, "tasks::no_arguments");
    for name in [CountPrimes::NAME, ParseNumber::NAME, nested::Type::NAME] {
        let entry = offload::find_task(name).expect("registered");
        assert_eq!(entry.name(), name);
    }
    // The registry runs a task from its bytes, as a worker process will.
    let input = postcard_bytes(&CountPrimes { lo: 0, hi: 100 });
    let (output, fds) = offload::find_task(CountPrimes::NAME)
        .unwrap()
        .invoke(&input, &[])
        .unwrap();
    assert_eq!(output, postcard_bytes(&25u64));
    assert!(fds.is_empty(), "a number travels without descriptors");
}

/// The registry speaks postcard, as the process transport will.
fn postcard_bytes<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encodes")
}

#[test]
fn an_unknown_name_is_a_clear_error() {
    let err = offload::find_task("tasks::not_a_task").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("no task named `tasks::not_a_task` is registered"),
        "{err}"
    );
}

#[tokio::test]
async fn generated_tasks_run_on_the_pool_and_the_function_stays_callable() {
    let pool = pool(2);
    let task = CountPrimes { lo: 0, hi: 1000 };
    assert_eq!(within("count_primes", pool.submit(task)).await, Ok(168));
    assert_eq!(count_primes(0, 1000), 168);
    assert_eq!(
        within("no_arguments", pool.submit(NoArguments {})).await,
        Ok(())
    );
    let n = within(
        "type",
        pool.submit(nested::Type {
            kind: vec![1, 2, 3],
        }),
    )
    .await;
    assert_eq!(n, Ok(3));
}

#[tokio::test]
async fn a_fallible_task_returns_its_own_error_inside_ok() {
    let pool = pool(1);
    let ok = within(
        "parse",
        pool.submit(ParseNumber {
            text: " 42 ".into(),
        }),
    )
    .await;
    assert_eq!(ok, Ok(Ok(42)));
    let bad = within("parse", pool.submit(ParseNumber { text: "x".into() })).await;
    let own_error = bad.expect("the framework did not fail").unwrap_err();
    assert!(own_error.starts_with("`x` is not a number"), "{own_error}");
}
