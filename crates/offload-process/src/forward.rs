//! Re-emitting workers' `tracing` events in the parent.

use offload_ipc::protocol::LogRecord;

/// Emits `record` from worker `pid` inside a span with the worker's pid and the task's name,
/// under the target `offload::worker` (the worker's own target is the `origin` field).
pub(crate) fn emit(pid: u32, task: Option<&'static str>, record: &LogRecord) {
    let span = tracing::info_span!(
        "offload.worker",
        worker.pid = pid,
        task.name = task.unwrap_or("")
    );
    let _entered = span.enter();
    let fields = record
        .fields
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    let origin = record.target.as_str();
    let message = record.message.as_str();
    match record.level {
        1 => tracing::error!(target: "offload::worker", origin, fields, "{message}"),
        2 => tracing::warn!(target: "offload::worker", origin, fields, "{message}"),
        3 => tracing::info!(target: "offload::worker", origin, fields, "{message}"),
        4 => tracing::debug!(target: "offload::worker", origin, fields, "{message}"),
        _ => tracing::trace!(target: "offload::worker", origin, fields, "{message}"),
    }
}
