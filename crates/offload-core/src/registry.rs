//! The task registry: every task type, findable by its stable name.
//!
//! A worker process receives a task as a name and bytes; the registry turns those into a call
//! of the right `run`. Entries are collected at link time (the `inventory` crate), so defining
//! a task with `#[offload::task]` is enough: there is no list to maintain and no ordering rule.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::backend::attach::{self, Fd};
use crate::{catch_task_panic, Task, TaskError};

/// A registered task type: its name and a type-erased way to run it on serialized input.
#[derive(Debug)]
pub struct TaskEntry {
    name: &'static str,
    invoke: InvokeFn,
    run_packed: RunPackedFn,
}

/// Encoded bytes and the descriptors that travel beside them.
type Encoded = (Vec<u8>, Vec<Fd>);
type InvokeFn = fn(Source<'_>, &[Fd]) -> Result<(OutputBytes, Vec<Fd>), TaskError>;

/// Where a task's input is, and where its output may go.
enum Source<'a> {
    /// Input bytes; the output goes into a new buffer.
    Bytes(&'a [u8]),
    /// A buffer whose first this many bytes are the input; the output is written over it
    /// when it fits.
    InPlace(&'a mut [u8], usize),
}

/// Where [`TaskEntry::invoke_in_place`] put a task's encoded output.
#[derive(Debug, PartialEq, Eq)]
pub enum OutputBytes {
    /// In the buffer it was given: its first this many bytes.
    InPlace(usize),
    /// In a new buffer: the output did not fit.
    Encoded(Vec<u8>),
}
type RunPackedFn = fn(&[u8], &[Fd], usize, &mut Vec<u8>, &mut Vec<Fd>) -> usize;

inventory::collect!(TaskEntry);

impl TaskEntry {
    /// The entry for task type `T`. Used by [`register_task!`](crate::register_task) and the
    /// `#[offload::task]` attribute.
    pub const fn of<T: Task>() -> Self {
        TaskEntry {
            name: T::NAME,
            invoke: invoke::<T>,
            run_packed: crate::packed::run_packed::<T>,
        }
    }

    /// The task's stable name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Decodes a task from `input` (postcard), runs it, and returns its encoded output.
    /// Values in the task that travel beside the bytes (see [`attach`]) find their
    /// descriptors in `fds`; the output's such descriptors are returned beside its bytes.
    ///
    /// # Errors
    ///
    /// [`TaskError::Serialization`] when the input does not decode as this task or the output
    /// does not encode; [`TaskError::Panicked`] when the task panics.
    pub fn invoke(&self, input: &[u8], fds: &[Fd]) -> Result<Encoded, TaskError> {
        match (self.invoke)(Source::Bytes(input), fds)? {
            (OutputBytes::Encoded(bytes), fds) => Ok((bytes, fds)),
            // Bytes give the output no room: it is always encoded anew.
            (OutputBytes::InPlace(_), fds) => Ok((Vec::new(), fds)),
        }
    }

    /// Like [`invoke`](Self::invoke) on the first `len` bytes of `buf` (a worker's
    /// shared-memory segment), and then the output is encoded over `buf` when it fits, into a
    /// new buffer otherwise.
    ///
    /// # Errors
    ///
    /// As for [`invoke`](Self::invoke), and a serialization error when `len` is past the end
    /// of `buf`.
    pub fn invoke_in_place(
        &self,
        buf: &mut [u8],
        len: usize,
        fds: &[Fd],
    ) -> Result<(OutputBytes, Vec<Fd>), TaskError> {
        if len > buf.len() {
            let message = format!(
                "the input claims {len} bytes of a {}-byte buffer",
                buf.len()
            );
            return Err(TaskError::serialization(self.name, message));
        }
        (self.invoke)(Source::InPlace(buf, len), fds)
    }

    /// Runs a packed batch: `count` tasks encoded back to back in `input` (see
    /// [`backend::pack`](crate::backend::pack)). Appends one encoded
    /// `Result<Output, WireError>` per task to `output`, in order, whatever happens (a panic
    /// fails its own task; input that stops decoding fails the rest), and returns how many
    /// failed. Checks [`is_cancelled`](crate::is_cancelled) as it goes: tasks after a cancel
    /// fail with [`WireError::Cancelled`](crate::backend::WireError::Cancelled).
    ///
    /// Descriptors work as in [`invoke`](Self::invoke): the tasks' in `fds`, the outputs'
    /// appended to `output_fds`.
    pub fn run_packed(
        &self,
        input: &[u8],
        fds: &[Fd],
        count: usize,
        output: &mut Vec<u8>,
        output_fds: &mut Vec<Fd>,
    ) -> usize {
        (self.run_packed)(input, fds, count, output, output_fds)
    }
}

fn invoke<T: Task>(source: Source<'_>, fds: &[Fd]) -> Result<(OutputBytes, Vec<Fd>), TaskError> {
    let input = match &source {
        Source::Bytes(input) => input,
        Source::InPlace(buf, len) => buf.get(..*len).unwrap_or_default(),
    };
    let task: T =
        attach::decode_with_fds(input, fds).map_err(|e| TaskError::serialization(T::NAME, e))?;
    // No list is collected or provided while the task runs: its own serialization is its own.
    let output = catch_task_panic(T::NAME, move || task.run())?;
    if let Source::InPlace(out, _) = source {
        let (written, fds) =
            attach::collecting(|| postcard::to_slice(&output, out).map(|o| o.len()));
        // Any failure but a full buffer is reported by the encode below.
        if let Ok(len) = written {
            return Ok((OutputBytes::InPlace(len), fds));
        }
    }
    let (bytes, fds) =
        attach::encode_with_fds(&output).map_err(|e| TaskError::serialization(T::NAME, e))?;
    Ok((OutputBytes::Encoded(bytes), fds))
}

/// Encodes `value` with postcard, the format of every task and output on the wire.
///
/// # Errors
///
/// The reason the value does not serialize. Postcard drops the message of a custom
/// `Serialize` error ("Serde Serialization Error"); it is recovered here by serializing
/// again with a format that keeps it, on the error path only.
pub fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(value).map_err(|e| match e {
        postcard::Error::SerdeSerCustom => match serde_json::to_vec(value) {
            Err(json) => json.to_string(),
            Ok(_) => e.to_string(),
        },
        other => other.to_string(),
    })
}

/// Registers a task type that implements [`Task`] by hand, so process workers can find it.
///
/// Tasks made with `#[offload::task]` are registered already. Write this at module level,
/// once per type.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize)]
/// struct Ping;
/// impl offload_core::Task for Ping {
///     type Output = ();
///     const NAME: &'static str = "docs::Ping";
///     fn run(self) {}
/// }
/// offload_core::register_task!(Ping);
///
/// assert!(offload_core::find_task("docs::Ping").is_ok());
/// ```
#[macro_export]
macro_rules! register_task {
    ($task:ty) => {
        $crate::__private::inventory::submit! {
            $crate::TaskEntry::of::<$task>()
        }
    };
}

/// Why [`find_task`] found no single entry for a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// No task of that name is registered in this program.
    #[error(
        "no task named `{0}` is registered in this program; define it with #[offload::task] \
         (or register_task!) in code linked into the worker"
    )]
    Unknown(String),
    /// Two task types share the name, so the name cannot say which one to run.
    #[error("two task types are registered under the name `{0}`; task names must be unique")]
    Duplicate(String),
}

struct Index {
    by_name: HashMap<&'static str, &'static TaskEntry>,
    duplicates: Vec<&'static str>,
}

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut by_name = HashMap::new();
        let mut duplicates = Vec::new();
        for entry in inventory::iter::<TaskEntry> {
            if by_name.insert(entry.name, entry).is_some() {
                duplicates.push(entry.name);
            }
        }
        Index {
            by_name,
            duplicates,
        }
    })
}

/// Finds the registered task called `name`.
///
/// # Errors
///
/// [`LookupError::Unknown`] when no task has that name; [`LookupError::Duplicate`] when two
/// do.
pub fn find_task(name: &str) -> Result<&'static TaskEntry, LookupError> {
    let index = index();
    if index.duplicates.contains(&name) {
        return Err(LookupError::Duplicate(name.to_owned()));
    }
    index
        .by_name
        .get(name)
        .copied()
        .ok_or_else(|| LookupError::Unknown(name.to_owned()))
}

/// Every registered task, in no particular order.
pub fn registered_tasks() -> impl Iterator<Item = &'static TaskEntry> {
    index().by_name.values().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct Double(u32);
    impl Task for Double {
        type Output = u32;
        const NAME: &'static str = "offload_core::registry::tests::Double";
        fn run(self) -> u32 {
            if self.0 == 13 {
                panic!("unlucky");
            }
            self.0 * 2
        }
    }
    crate::register_task!(Double);

    #[derive(Serialize, Deserialize)]
    struct Twin;
    impl Task for Twin {
        type Output = ();
        const NAME: &'static str = "offload_core::registry::tests::twin";
        fn run(self) {}
    }
    #[derive(Serialize, Deserialize)]
    struct OtherTwin;
    impl Task for OtherTwin {
        type Output = ();
        const NAME: &'static str = "offload_core::registry::tests::twin";
        fn run(self) {}
    }
    crate::register_task!(Twin);
    crate::register_task!(OtherTwin);

    #[test]
    fn a_registered_task_runs_from_bytes() {
        let entry = find_task(Double::NAME).expect("registered");
        assert_eq!(entry.name(), Double::NAME);
        let input = postcard::to_stdvec(&Double(21)).expect("encode");
        let (output, fds) = entry.invoke(&input, &[]).expect("runs");
        assert_eq!(postcard::from_bytes::<u32>(&output).expect("decode"), 42);
        assert!(fds.is_empty());
        assert!(registered_tasks().any(|e| e.name() == Double::NAME));
    }

    #[test]
    fn an_output_is_written_in_place_when_it_fits() {
        let entry = find_task(Double::NAME).expect("registered");
        let input = postcard::to_stdvec(&Double(200)).expect("encode");
        let mut buf = [0; 4];
        buf[..input.len()].copy_from_slice(&input);
        let (output, _) = entry
            .invoke_in_place(&mut buf, input.len(), &[])
            .expect("runs");
        assert_eq!(output, OutputBytes::InPlace(2));
        assert_eq!(postcard::from_bytes::<u32>(&buf[..2]).expect("decode"), 400);
        // 100 encodes in one byte, its double in two: the output does not fit.
        let mut small = postcard::to_stdvec(&Double(100)).expect("encode");
        assert_eq!(small.len(), 1);
        let (output, _) = entry.invoke_in_place(&mut small, 1, &[]).expect("runs");
        let expected = postcard::to_stdvec(&200u32).expect("encode");
        assert_eq!(output, OutputBytes::Encoded(expected));
        let err = entry.invoke_in_place(&mut small, 3, &[]).unwrap_err();
        assert!(matches!(err, TaskError::Serialization { .. }), "{err}");
    }

    #[test]
    fn bad_input_and_panics_are_errors() {
        let entry = find_task(Double::NAME).expect("registered");
        let err = entry.invoke(&[], &[]).unwrap_err();
        assert!(matches!(err, TaskError::Serialization { .. }), "{err}");
        let input = postcard::to_stdvec(&Double(13)).expect("encode");
        assert_eq!(
            entry.invoke(&input, &[]).unwrap_err().panic_message(),
            Some("unlucky")
        );
    }

    #[test]
    fn a_custom_serialize_error_keeps_its_message() {
        struct Refuses;
        impl serde::Serialize for Refuses {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("refused: no network handles"))
            }
        }
        assert_eq!(encode(&Refuses).unwrap_err(), "refused: no network handles");
        assert_eq!(encode(&7u8).unwrap(), vec![7]);
    }

    #[test]
    fn unknown_and_duplicate_names_are_clear_errors() {
        let err = find_task("nope::missing").unwrap_err();
        assert_eq!(err, LookupError::Unknown("nope::missing".into()));
        assert!(err.to_string().contains("`nope::missing`"));
        let err = find_task("offload_core::registry::tests::twin").unwrap_err();
        assert!(matches!(err, LookupError::Duplicate(_)), "{err}");
    }
}
