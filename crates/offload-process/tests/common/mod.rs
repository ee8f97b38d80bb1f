//! What the process test binaries share: looking at this process's children in /proc.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashSet;

/// Defines a task type with tuple fields and registers it as `<test binary>::<Name>`:
/// `task!(Square(u64) -> u64, |s| s.0 * s.0);`
#[allow(unused_macros)] // each test binary uses its own subset
macro_rules! task {
    ($name:ident ($($field:ty),*) -> $out:ty, |$s:ident| $body:expr) => {
        #[derive(::serde::Serialize, ::serde::Deserialize)]
        struct $name($($field),*);
        impl ::offload_core::Task for $name {
            type Output = $out;
            const NAME: &'static str = concat!(module_path!(), "::", stringify!($name));
            fn run(self) -> $out {
                let $s = self;
                $body
            }
        }
        ::offload_core::register_task!($name);
    };
}
#[allow(unused_imports)]
pub(crate) use task;

/// Direct children of this process (Linux), from /proc.
pub(crate) fn children() -> HashSet<u32> {
    let mut out = HashSet::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// True while `pid` exists and is not a zombie.
pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}
