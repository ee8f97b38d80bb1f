//! Forwarding `tracing` events from a worker to its parent.
//!
//! The worker installs [`ForwardingSubscriber`] as its global subscriber; each event becomes a
//! [`LogRecord`] frame, tagged with the request that was running, and the parent re-emits it
//! inside a span with the worker's pid and the task's name. Spans are not forwarded: the
//! parent's span for the task stands in for them.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

use crate::protocol::{LogRecord, ToParent};
use crate::worker::Outbox;

/// `tracing` level as sent on the wire: 1 = error ... 5 = trace; 0 = off.
pub fn level_to_u8(level: Level) -> u8 {
    match level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

thread_local! {
    /// The request whose task runs on this thread, to tag its events.
    static REQUEST: Cell<Option<u64>> = const { Cell::new(None) };
    /// Set while an event is being forwarded, so an event emitted by the forwarding itself
    /// cannot recurse into the outbox lock.
    static FORWARDING: Cell<bool> = const { Cell::new(false) };
}

/// Tags events on this thread with `request` until the guard drops.
pub(crate) fn enter_request(request: u64) -> RequestGuard {
    REQUEST.with(|r| r.set(Some(request)));
    RequestGuard
}

pub(crate) struct RequestGuard;

impl Drop for RequestGuard {
    fn drop(&mut self) {
        REQUEST.with(|r| r.set(None));
    }
}

/// A minimal subscriber that sends events to the parent and nothing else.
pub(crate) struct ForwardingSubscriber {
    outbox: &'static Outbox,
    /// Most verbose level forwarded (wire encoding).
    max: u8,
    next_span: AtomicU64,
}

impl ForwardingSubscriber {
    pub(crate) fn new(outbox: &'static Outbox, max: u8) -> Self {
        ForwardingSubscriber {
            outbox,
            max,
            next_span: AtomicU64::new(1),
        }
    }
}

impl Subscriber for ForwardingSubscriber {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.enabled(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        level_to_u8(*meta.level()) <= self.max
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(match self.max {
            0 => tracing::level_filters::LevelFilter::OFF,
            1 => tracing::level_filters::LevelFilter::ERROR,
            2 => tracing::level_filters::LevelFilter::WARN,
            3 => tracing::level_filters::LevelFilter::INFO,
            4 => tracing::level_filters::LevelFilter::DEBUG,
            _ => tracing::level_filters::LevelFilter::TRACE,
        })
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        if FORWARDING.with(|f| f.replace(true)) {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let record = LogRecord {
            request: REQUEST.with(Cell::get),
            level: level_to_u8(*meta.level()),
            target: meta.target().to_owned(),
            message: fields.message,
            fields: fields.rest,
        };
        // Logs go out at once, not with the next result: a long task's progress should be
        // visible while it runs.
        self.outbox.send_now(&ToParent::Log(record));
        FORWARDING.with(|f| f.set(false));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.rest
                .push((field.name().to_owned(), format!("{value:?}")));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.rest.push((field.name().to_owned(), value.to_owned()));
        }
    }
}
