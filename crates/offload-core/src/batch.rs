//! The results of a batch: what a [`BatchHandle`](crate::BatchHandle) resolves to.

use std::fmt;

use serde::de::DeserializeOwned;

use crate::backend::attach;
use crate::packed::take_result;
use crate::TaskError;

/// The results of a batch submitted with
/// [`try_submit_batch`](crate::Executor::try_submit_batch): one per task, in submission order.
///
/// An iterator: take the results with a `for` loop, or `collect()` them into a `Vec`. From a
/// process pool, the results stay in the worker's compact encoding until they are taken, each
/// decoded as it is reached: a batch of a million small outputs costs no million-element
/// array of `Result`s, and the pool's I/O thread does not spend its time decoding them.
///
/// ```
/// # use offload_core::{BatchResults, TaskError};
/// let results: BatchResults<u64> = vec![Ok(1), Ok(2)].into();
/// assert_eq!(results.len(), 2);
/// let sum: u64 = results.map(|r| r.unwrap_or(0)).sum();
/// assert_eq!(sum, 3);
/// ```
pub struct BatchResults<O> {
    inner: Inner<O>,
}

enum Inner<O> {
    Decoded(std::vec::IntoIter<Result<O, TaskError>>),
    Packed(Packed),
}

/// Results in their encoded form: `left` more of them from `at` in `bytes`.
struct Packed {
    name: &'static str,
    bytes: Vec<u8>,
    at: usize,
    left: usize,
    /// Set once a result did not decode: nothing after it can be found, so the rest fail so.
    broken: Option<TaskError>,
}

impl<O> BatchResults<O> {
    /// `count` results of task `name`, encoded back to back in `bytes` as a worker writes
    /// them, decoded as they are taken. Results that are missing or do not decode become
    /// [`TaskError::Serialization`]: the iterator yields exactly `count` results.
    pub(crate) fn packed(name: &'static str, bytes: Vec<u8>, count: usize) -> Self {
        BatchResults {
            inner: Inner::Packed(Packed {
                name,
                bytes,
                at: 0,
                left: count,
                broken: None,
            }),
        }
    }
}

impl<O> From<Vec<Result<O, TaskError>>> for BatchResults<O> {
    fn from(results: Vec<Result<O, TaskError>>) -> Self {
        BatchResults {
            inner: Inner::Decoded(results.into_iter()),
        }
    }
}

impl<O: DeserializeOwned> Iterator for BatchResults<O> {
    type Item = Result<O, TaskError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Inner::Decoded(results) => results.next(),
            Inner::Packed(packed) => packed.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let len = self.len();
        (len, Some(len))
    }
}

impl<O: DeserializeOwned> ExactSizeIterator for BatchResults<O> {
    fn len(&self) -> usize {
        match &self.inner {
            Inner::Decoded(results) => results.len(),
            Inner::Packed(packed) => packed.left,
        }
    }
}

impl Packed {
    #[inline]
    fn next<O: DeserializeOwned>(&mut self) -> Option<Result<O, TaskError>> {
        self.left = self.left.checked_sub(1)?;
        if let Some(error) = &self.broken {
            return Some(Err(error.clone()));
        }
        let rest = self.bytes.get(self.at..).unwrap_or_default();
        let mut decoder = postcard::Deserializer::from_bytes(rest);
        let taken = take_result::<O>(&mut decoder);
        let unread = decoder.finalize().map_or(0, <[u8]>::len);
        match taken {
            Ok(result) => {
                self.at = self.bytes.len() - unread;
                Some(result.map_err(|e| e.into_task_error(self.name)))
            }
            Err(e) => {
                let error = TaskError::serialization(self.name, attach::describe(e));
                self.broken = Some(error.clone());
                Some(Err(error))
            }
        }
    }
}

impl<O> fmt::Debug for BatchResults<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (form, left) = match &self.inner {
            Inner::Decoded(results) => ("decoded", results.len()),
            Inner::Packed(packed) => ("packed", packed.left),
        };
        f.debug_struct("BatchResults")
            .field("form", &form)
            .field("left", &left)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::WireError;

    /// Encodes results as a worker writes them.
    fn encoded(results: &[Result<u64, WireError>]) -> Vec<u8> {
        let mut out = Vec::new();
        for result in results {
            crate::backend::encode_into(result, &mut out).expect("encodes");
        }
        out
    }

    #[test]
    fn packed_results_are_decoded_one_at_a_time_as_they_are_taken() {
        let bytes = encoded(&[Ok(7), Err(WireError::Panicked("boom".into())), Ok(300)]);
        let mut results = BatchResults::<u64>::packed("t", bytes, 3);
        assert_eq!(results.len(), 3);
        assert_eq!(results.next(), Some(Ok(7)));
        assert_eq!(results.len(), 2);
        assert_eq!(results.size_hint(), (2, Some(2)));
        let failed = results.next().unwrap().unwrap_err();
        assert_eq!(failed.panic_message(), Some("boom"));
        assert_eq!(failed.task_name(), "t");
        assert_eq!(results.next(), Some(Ok(300)));
        assert_eq!(results.len(), 0);
        assert_eq!(results.next(), None);
        assert_eq!(results.next(), None, "stays exhausted");
    }

    #[test]
    fn after_an_undecodable_result_every_remaining_task_fails_and_the_count_holds() {
        let mut bytes = encoded(&[Ok(1)]);
        bytes.extend_from_slice(&[7, 0xFF]); // neither `Ok` (0) nor `Err` (1)
        let results: Vec<_> = BatchResults::<u64>::packed("t", bytes, 4).collect();
        assert_eq!(results.len(), 4);
        assert_eq!(results[0], Ok(1));
        for result in &results[1..] {
            let error = result.as_ref().unwrap_err();
            assert!(matches!(error, TaskError::Serialization { .. }), "{error}");
        }
    }

    #[test]
    fn decoded_results_pass_through_and_debug_says_how_many_are_left() {
        let mut results: BatchResults<u64> = vec![Ok(1), Err(TaskError::cancelled("t"))].into();
        assert_eq!(
            format!("{results:?}"),
            r#"BatchResults { form: "decoded", left: 2 }"#
        );
        assert_eq!(results.next(), Some(Ok(1)));
        assert!(results.next().unwrap().unwrap_err().is_cancelled());
        assert_eq!(results.next(), None);
        let packed = BatchResults::<u64>::packed("t", encoded(&[Ok(1)]), 1);
        assert_eq!(
            format!("{packed:?}"),
            r#"BatchResults { form: "packed", left: 1 }"#
        );
    }
}
