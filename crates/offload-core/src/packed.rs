//! The packed form of a batch: tasks back to back in one buffer, and their results back to back
//! in another.
//!
//! A `map` over a million tiny tasks must not cost a million allocations on either side of a
//! process boundary. Postcard values delimit themselves, so a batch needs no per-item length
//! or buffer: the parent [`pack`]s the tasks, a worker runs them straight from the bytes
//! ([`TaskEntry::run_packed`](crate::TaskEntry::run_packed)) and writes one
//! `Result<Output, WireError>` per task, and the parent [`unpack_results`].

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::attach::{self, Fd};
use crate::{BatchResults, TaskError};

/// Why a worker could not produce a task's output, as it crosses the process boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireError {
    /// The task panicked.
    Panicked(String),
    /// The task's input or output did not (de)serialize.
    Serialization(String),
    /// No task of that name is registered in the worker program.
    UnknownTask(String),
    /// The task was cancelled before it ran.
    Cancelled,
}

impl WireError {
    /// The error a caller of task `name` sees.
    pub fn into_task_error(self, name: &'static str) -> TaskError {
        match self {
            WireError::Panicked(message) => TaskError::panicked(name, message),
            WireError::Serialization(message) => TaskError::serialization(name, message),
            WireError::UnknownTask(_) => TaskError::unknown_task(name),
            WireError::Cancelled => TaskError::cancelled(name),
        }
    }

    /// What a task's failure in a worker sends back.
    pub fn from_task_error(error: TaskError) -> Self {
        match error {
            TaskError::Panicked { message, .. } => WireError::Panicked(message),
            TaskError::Serialization { message, .. } => WireError::Serialization(message),
            TaskError::Cancelled { .. } => WireError::Cancelled,
            other => WireError::Panicked(other.to_string()),
        }
    }
}

/// Appends `value`'s postcard encoding to `out`. On failure `out` is left as it was.
///
/// # Errors
///
/// The reason the value does not serialize (see [`encode`](crate::encode)).
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    let start = out.len();
    postcard::serialize_with_flavor(value, Append(out)).map_err(|_| {
        out.truncate(start);
        // Re-encode on the error path only, to recover the message postcard drops.
        crate::encode(value).err().unwrap_or_default()
    })
}

/// A postcard output that appends to a borrowed `Vec`, copying slices whole.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    // Inlined, always: the compiler declines on its own, and then each number's bytes go
    // through a buffer on the stack and a call. Inlined, the match below folds into
    // postcard's varint loop, and each length writes its bytes straight from registers. In
    // `map` of tiny tasks the call was a third of the caller's time per task (measured: a
    // scratch loop of 1M-task maps, 66M -> 90M tasks/s; the workers' time per task fell too).
    #[inline(always)]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        // Postcard hands over most numbers as a few bytes of varint. A copy of unknown length
        // is a call to `memcpy`, and a loop of `push`es re-reads the length and capacity for
        // each byte: both cost more than the bytes. A copy of known length is a few moves.
        let out = &mut *self.0;
        match *data {
            [a] => out.push(a),
            [a, b] => out.extend_from_slice(&[a, b]),
            [a, b, c] => out.extend_from_slice(&[a, b, c]),
            [a, b, c, d] => out.extend_from_slice(&[a, b, c, d]),
            _ => out.extend_from_slice(data),
        }
        Ok(())
    }

    #[inline(always)]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Encodes `tasks` back to back into `out`, for [`TaskEntry::run_packed`](crate::TaskEntry::run_packed).
///
/// # Errors
///
/// The first task that does not serialize, and why; `out` is then left as it was.
pub fn pack<T: Serialize>(tasks: &[T], out: &mut Vec<u8>) -> Result<(), String> {
    let start = out.len();
    for (i, task) in tasks.iter().enumerate() {
        if let Err(e) = encode_into(task, out) {
            out.truncate(start);
            return Err(e);
        }
        if i == 0 {
            reserve_like_first(out, start, tasks.len());
        }
    }
    Ok(())
}

/// Values of one type tend to encode to one size: once the first of `count` values is in
/// `out` (from `start`), room for the rest is reserved at once instead of by doubling.
fn reserve_like_first(out: &mut Vec<u8>, start: usize, count: usize) {
    out.reserve((out.len() - start) * count.saturating_sub(1));
}

/// Appends `count` copies of one failure, the answer to a batch none of whose tasks could run.
/// The encoding of an `Err` does not depend on the output type.
pub fn pack_failures(error: &WireError, count: usize, out: &mut Vec<u8>) {
    let mut one = Vec::new();
    put_result::<()>(&Err(error.clone()), &mut one);
    for _ in 0..count {
        out.extend_from_slice(&one);
    }
}

/// The `count` results of a packed batch of task `name`, for the caller to take. Results that
/// are missing or do not decode become [`TaskError::Serialization`]: each task gets exactly
/// one result.
///
/// Results are decoded as they are taken, by whoever takes them, not here: on a pool's I/O
/// thread, decoding a million tiny results into `Result`s (tens of bytes each) cost more than
/// the rest of the batch's trip. Outputs that refer to descriptors (see [`attach`]) must find
/// them while decoding, so those batches are decoded at once.
pub fn unpack_results<O: DeserializeOwned>(
    name: &'static str,
    bytes: Vec<u8>,
    fds: Vec<Fd>,
    count: usize,
) -> BatchResults<O> {
    let results = BatchResults::packed(name, bytes, count);
    if fds.is_empty() {
        return results;
    }
    let decoded: Vec<_> = attach::decoding(fds, || results.collect()).0;
    decoded.into()
}

// A `Result` in postcard is its variant index (one byte: 0 = `Ok`, 1 = `Err`) and then the
// value. Reading and writing the byte directly is postcard's own format, without the
// generic enum machinery: per tiny task, that machinery costs as much as the task.
const OK: u8 = 0;
const ERR: u8 = 1;

/// Decodes one `Result<O, WireError>` from where `decoder` is.
pub(crate) fn take_result<'de, O: DeserializeOwned>(
    decoder: &mut postcard::Deserializer<'de, postcard::de_flavors::Slice<'de>>,
) -> postcard::Result<Result<O, WireError>> {
    match u8::deserialize(&mut *decoder)? {
        OK => O::deserialize(&mut *decoder).map(Ok),
        ERR => WireError::deserialize(&mut *decoder).map(Err),
        _ => Err(postcard::Error::DeserializeBadEnum),
    }
}

/// Appends one encoded `Result<O, WireError>`: the output, or the error if the output does
/// not encode. Returns false when an error was written.
fn put_result<O: Serialize>(result: &Result<O, WireError>, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let error = match result {
        Ok(output) => {
            out.push(OK);
            match encode_into(output, out) {
                Ok(()) => return true,
                Err(message) => {
                    out.truncate(start);
                    &WireError::Serialization(message)
                }
            }
        }
        Err(e) => e,
    };
    out.push(ERR);
    if encode_into(error, out).is_err() {
        // A WireError always encodes; should it not, the answer must still hold a result.
        out.truncate(start);
        out.extend_from_slice(&[ERR, 3]); // WireError::Cancelled
    }
    false
}

/// How often a packed batch checks for a cancel. A check costs a clock read and, at times, a
/// system call: more than a tiny task. So the batch checks before its first task, then every
/// `stride` tasks, the stride doubling while checks come closer than `CHECK_GAP_MIN` and
/// halving while they are further apart than `CHECK_GAP_MAX`: long tasks are checked one by
/// one, tiny ones in runs of up to `MAX_STRIDE`.
const CHECK_GAP_MIN: Duration = Duration::from_micros(10);
const CHECK_GAP_MAX: Duration = Duration::from_micros(100);
const MAX_STRIDE: usize = 1024;

/// Runs the `count` tasks of type `T` packed in `input`, appending one encoded
/// `Result<T::Output, WireError>` per task to `out`. Returns how many failed.
/// Values in the tasks find their descriptors in `fds`; descriptors of values in the outputs
/// are appended to `out_fds`.
pub(crate) fn run_packed<T: crate::Task>(
    input: &[u8],
    fds: &[Fd],
    count: usize,
    out: &mut Vec<u8>,
    out_fds: &mut Vec<Fd>,
) -> usize {
    let ((failed, _, _), collected) = attach::collecting(|| {
        attach::decoding(fds.to_vec(), || run_packed_here::<T>(input, count, out))
    });
    out_fds.extend(collected);
    failed
}

fn run_packed_here<T: crate::Task>(input: &[u8], count: usize, out: &mut Vec<u8>) -> usize {
    // One decoder over the whole batch: a new one per task costs as much as a tiny task.
    let mut decoder = postcard::Deserializer::from_bytes(input);
    let mut failed = 0;
    let mut cancelled = false;
    let mut stride = 1;
    let mut next_check = 0;
    let mut last_check = Instant::now();
    for i in 0..count {
        if !cancelled && i == next_check {
            cancelled = crate::is_cancelled();
            let now = Instant::now();
            let gap = now - last_check;
            last_check = now;
            if gap < CHECK_GAP_MIN {
                stride = (stride * 2).min(MAX_STRIDE);
            } else if gap > CHECK_GAP_MAX {
                stride = (stride / 2).max(1);
            }
            next_check = i + stride;
        }
        let result = if cancelled {
            Err(WireError::Cancelled)
        } else {
            match T::deserialize(&mut decoder) {
                Ok(task) => {
                    attach::suspended(|| crate::catch_task_panic(T::NAME, move || task.run()))
                        .map_err(WireError::from_task_error)
                }
                Err(e) => {
                    // Where the next task starts is unknown now: the rest fail alike.
                    let error = WireError::Serialization(attach::describe(e));
                    pack_failures(&error, count - i, out);
                    return failed + count - i;
                }
            }
        };
        let before = out.len();
        if !put_result(&result, out) {
            failed += 1;
        }
        if i == 0 {
            reserve_like_first(out, before, count);
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Task;

    #[derive(Serialize, Deserialize)]
    struct Halve(u32);
    impl Task for Halve {
        type Output = u32;
        const NAME: &'static str = "offload_core::packed::tests::Halve";
        fn run(self) -> u32 {
            assert!(self.0 % 2 == 0, "odd: {}", self.0);
            self.0 / 2
        }
    }

    /// Every result of a packed batch, decoded.
    fn unpacked<O: DeserializeOwned>(
        name: &'static str,
        bytes: &[u8],
        count: usize,
    ) -> Vec<Result<O, TaskError>> {
        let results = unpack_results(name, bytes.to_vec(), Vec::new(), count);
        assert_eq!(results.len(), count, "one result per task");
        results.collect()
    }

    fn run(tasks: &[Halve]) -> (Vec<Result<u32, TaskError>>, usize) {
        let mut input = Vec::new();
        pack(tasks, &mut input).expect("packs");
        let mut output = Vec::new();
        let failed = run_packed::<Halve>(&input, &[], tasks.len(), &mut output, &mut Vec::new());
        (unpacked(Halve::NAME, &output, tasks.len()), failed)
    }

    #[test]
    fn a_packed_batch_gives_one_result_per_task_in_order() {
        let tasks: Vec<Halve> = (0..1000).map(|i| Halve(i * 2)).collect();
        let (results, failed) = run(&tasks);
        assert_eq!(failed, 0);
        let expected: Vec<Result<u32, TaskError>> = (0..1000).map(Ok).collect();
        assert_eq!(results, expected);
    }

    #[test]
    fn a_panic_fails_only_its_own_task() {
        let (results, failed) = run(&[Halve(2), Halve(3), Halve(4)]);
        assert_eq!(failed, 1);
        assert_eq!(results[0], Ok(1));
        assert_eq!(
            results[1].as_ref().unwrap_err().panic_message(),
            Some("odd: 3")
        );
        assert_eq!(results[2], Ok(2));
    }

    #[test]
    fn garbage_and_short_answers_fail_each_remaining_task() {
        // Input that is not a `Halve` (a varint that never ends) fails every task.
        let mut output = Vec::new();
        let failed = run_packed::<Halve>(&[0xFF; 3], &[], 4, &mut output, &mut Vec::new());
        assert_eq!(failed, 4);
        let results = unpacked::<u32>(Halve::NAME, &output, 4);
        assert_eq!(results.len(), 4);
        assert!(results
            .iter()
            .all(|r| matches!(r, Err(TaskError::Serialization { .. }))));

        // An answer with fewer results than tasks: the missing ones are errors, not absent.
        let mut two = Vec::new();
        encode_into(&Ok::<u32, WireError>(7), &mut two).unwrap();
        encode_into(&Ok::<u32, WireError>(8), &mut two).unwrap();
        let results = unpacked::<u32>(Halve::NAME, &two, 3);
        assert_eq!(results[..2], [Ok(7), Ok(8)]);
        assert!(matches!(results[2], Err(TaskError::Serialization { .. })));
    }

    #[test]
    fn a_cancelled_batch_stops_running_its_tasks() {
        let flag = crate::CancelFlag::new();
        flag.raise();
        let _guard = crate::backend::enter(flag);
        let (results, failed) = run(&[Halve(2), Halve(4)]);
        assert_eq!(failed, 2);
        assert!(results
            .iter()
            .all(|r| matches!(r, Err(TaskError::Cancelled { .. }))));
    }

    #[test]
    fn values_are_appended_exactly_as_postcard_writes_them() {
        // Varints of every length from 1 to 10 bytes, and slices of more than 4 bytes.
        let numbers: Vec<u64> = (0..64).map(|shift| (1u64 << shift) - 1).collect();
        let mut out = vec![0xAA];
        for n in &numbers {
            encode_into(n, &mut out).unwrap();
        }
        encode_into("a string longer than four bytes", &mut out).unwrap();
        let mut expected = vec![0xAA];
        for n in &numbers {
            expected.extend(postcard::to_stdvec(n).unwrap());
        }
        expected.extend(postcard::to_stdvec("a string longer than four bytes").unwrap());
        assert_eq!(out, expected);
    }

    #[test]
    fn results_are_written_exactly_as_postcard_writes_a_result() {
        let cases: [Result<String, WireError>; 3] = [
            Ok("out".into()),
            Err(WireError::Panicked("p".into())),
            Err(WireError::Cancelled),
        ];
        for case in cases {
            let mut ours = Vec::new();
            put_result(&case, &mut ours);
            assert_eq!(ours, postcard::to_stdvec(&case).unwrap(), "{case:?}");
            let mut decoder = postcard::Deserializer::from_bytes(&ours);
            let back = take_result::<String>(&mut decoder).unwrap();
            assert_eq!(back, case);
            assert!(decoder.finalize().unwrap().is_empty(), "read to the end");
        }
        // The fallback written when an error does not encode is `Cancelled`.
        assert_eq!(
            postcard::to_stdvec(&Err::<(), _>(WireError::Cancelled)).unwrap(),
            [ERR, 3]
        );
    }

    /// Sleeps, and raises the current cancel flag when told to: a caller cancelling while a
    /// batch runs.
    #[derive(Serialize, Deserialize)]
    struct SlowThenCancel(bool);
    impl Task for SlowThenCancel {
        type Output = ();
        const NAME: &'static str = "offload_core::packed::tests::SlowThenCancel";
        fn run(self) {
            std::thread::sleep(Duration::from_micros(300));
            if self.0 {
                RAISE.with(|f| f.borrow().as_ref().map(crate::CancelFlag::raise));
            }
        }
    }
    thread_local! {
        static RAISE: std::cell::RefCell<Option<crate::CancelFlag>> = const { std::cell::RefCell::new(None) };
    }

    #[test]
    fn long_tasks_in_a_long_batch_see_a_cancel_at_the_next_task() {
        // 300 us tasks: the stride stays at one, so the task after the cancel does not run.
        let flag = crate::CancelFlag::new();
        RAISE.with(|f| *f.borrow_mut() = Some(flag.clone()));
        let _guard = crate::backend::enter(flag);
        let tasks: Vec<_> = (0..200).map(|i| SlowThenCancel(i == 100)).collect();
        let mut input = Vec::new();
        pack(&tasks, &mut input).unwrap();
        let mut output = Vec::new();
        let failed =
            run_packed::<SlowThenCancel>(&input, &[], tasks.len(), &mut output, &mut Vec::new());
        let results = unpacked::<()>(SlowThenCancel::NAME, &output, tasks.len());
        assert_eq!(failed, 99, "tasks 101.. are cancelled");
        assert!(results[..=100].iter().all(Result::is_ok));
        assert!(results[101..]
            .iter()
            .all(|r| matches!(r, Err(TaskError::Cancelled { .. }))));
    }

    #[test]
    fn failures_of_a_whole_batch_decode_as_any_output_type() {
        let mut out = Vec::new();
        pack_failures(&WireError::UnknownTask("x".into()), 3, &mut out);
        let results = unpacked::<String>("x", &out, 3);
        assert!(results
            .iter()
            .all(|r| matches!(r, Err(TaskError::UnknownTask { .. }))));
    }
}
