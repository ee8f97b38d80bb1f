//! The scheduler: one central queue, a small in-flight window per worker, and supervision.
//!
//! It runs on the pool's reactor thread and owns all pool state, so none of it is locked.
//!
//! A worker runs its requests one at a time, in the order it got them, and answers each before
//! starting the next. So the front of a worker's `sent` list is the request it is running, and
//! everything behind it has not started. That gives the supervisor its rules:
//! - a crash fails (or, with retries, re-runs) the front request only, and puts the requests
//!   behind it back at the head of the queue: they never ran;
//! - a timeout or a cancel that outlives its grace period kills the worker only if the request
//!   is at the front, i.e. really running.
//!
//! A worker is done with only when both its exit status (from its reaper thread) and the end of
//! its connection (from its reader) have arrived: results it wrote before dying must be read
//! before its remaining requests are judged lost.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use offload_ipc::protocol::{ToParent, ToWorker, TOKEN_LEN};
use offload_ipc::recycle::Recycler;
use tokio::sync::mpsc::UnboundedSender;

use crate::connection::{Event, Outgoing};
use crate::forward;
use crate::job::{Failure, IdMap, Initializer, Job, Outcome, RequestId};
use crate::lane::{Direct, Lane, Lanes};
use crate::segments;
use crate::spawner::{self, Killer};
use crate::stats::Board;
use crate::PoolStats;

/// How long a worker whose connection ended may take to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// After this many workers in a row fail to start (die before connecting, or fail the
/// initializer), the pool is broken: starting more would only be a crash loop.
const MAX_START_FAILURES: u32 = 3;

/// The adaptive window keeps about this much work queued on each worker: enough to hide the
/// round trip behind tiny tasks, little enough that long tasks do not pile up on one worker
/// while another idles.
const QUEUED_WORK_TARGET: Duration = Duration::from_millis(1);

/// Bounds of the adaptive window.
const WINDOW_MIN: usize = 2;
const WINDOW_MAX: usize = 64;

/// Ids of the scheduler's own requests (initializers), apart from the pool's.
const INTERNAL_IDS: RequestId = 1 << 63;

/// What the pool's handles send to the reactor.
pub(crate) enum Command {
    Submit(Job),
    /// A caller's direct write failed: look at the lanes (see `lane`).
    CheckLanes,
    /// The pool kept a spare encode buffer while its timer was not set to look at them.
    WatchSpares,
    Cancel(RequestId),
    Shutdown {
        now: bool,
    },
}

pub(crate) struct Settings {
    pub(crate) program: PathBuf,
    /// Workers kept running (started at build).
    pub(crate) workers: usize,
    /// Workers started on demand, at most.
    pub(crate) max_workers: usize,
    /// How long a worker beyond `workers` may sit idle before it exits.
    pub(crate) idle_timeout: Duration,
    /// Requests in flight per worker: fixed, or `None` to adapt to the tasks' length.
    pub(crate) window: Option<usize>,
    pub(crate) socket: String,
    pub(crate) token: [u8; TOKEN_LEN],
    pub(crate) cancel_grace: Duration,
    pub(crate) max_requests_per_worker: Option<u64>,
    pub(crate) initializer: Option<Initializer>,
    pub(crate) memory_limit: Option<u64>,
    /// Low-latency mode: how long idle workers poll their sockets before they block.
    pub(crate) spin: Duration,
    /// The pool's spare encode buffers, which the pool's handles keep and this trims.
    pub(crate) recycler: Arc<Recycler>,
}

/// Why the scheduler killed a worker on purpose.
#[derive(Clone, Copy)]
enum Kill {
    TimedOut(Duration),
    Cancelled,
}

/// Exit codes of a worker that could not start serving (see `offload_ipc::worker`).
const WORKER_START_FAILURE: [i32; 2] = [70, 71];

struct Worker {
    /// `None` until the handshake, and again once the connection ended.
    writer: Option<UnboundedSender<Outgoing>>,
    /// Where callers write requests straight to the worker while it is idle; `None` when
    /// `writer` is.
    lane: Option<Arc<Lane>>,
    connected: bool,
    disconnected: bool,
    /// Why the pool closed the connection (a frame it could not read), if it did: the
    /// worker then exits because of the pool, and the error must say so.
    closed: Option<String>,
    status: Option<ExitStatus>,
    /// Asked to exit (shutdown, recycling, failed initializer): its end is not a crash.
    retiring: bool,
    killer: Killer,
    /// Requests sent and not answered, in order: the front one is running.
    sent: VecDeque<RequestId>,
    /// Requests ever sent, for recycling.
    served: u64,
    /// When it last ran out of work, for the idle timeout.
    idle_since: Option<tokio::time::Instant>,
    /// When its front request started running, to learn how long requests take.
    front_since: Option<tokio::time::Instant>,
    /// The initializer's request while it runs; no work is sent before it succeeds.
    init: Option<RequestId>,
    /// The request the scheduler killed this worker for, and why.
    kill: Option<(RequestId, Kill)>,
}

impl Worker {
    fn can_take_work(&self, window: usize, max: Option<u64>) -> bool {
        self.writer.is_some()
            && !self.retiring
            && self.init.is_none()
            && self.sent.len() < window
            && max.is_none_or(|max| self.served < max)
    }
}

/// How startup went, for `build`.
pub(crate) enum Startup {
    Starting,
    Ready,
    Failed(String),
}

pub(crate) struct Scheduler {
    settings: Settings,
    events: UnboundedSender<Event>,
    queue: VecDeque<Job>,
    in_flight: IdMap<RequestId, (u32, Job)>,
    workers: IdMap<u32, Worker>,
    shutdown: Option<bool>,
    start_failures: u32,
    /// Why the last worker failed to start, for the error a user sees.
    last_start_error: Option<String>,
    broken: Option<String>,
    /// Moving average of how long a request runs on a worker (for the adaptive window).
    service_time: Option<Duration>,
    next_internal_id: RequestId,
    stats: PoolStats,
    published: Arc<Board>,
    /// Jobs settled in this turn of the reactor, resolved by `flush` after the stats that
    /// count them are published: a caller who has a result sees it counted.
    settled: Vec<(Job, Outcome)>,
    /// The workers' lanes, as the pool's handles see them.
    lanes: Arc<Lanes>,
    pub(crate) startup: Startup,
    /// A `TrimUnused` event is on its way.
    trim_pending: bool,
}

impl Scheduler {
    pub(crate) fn new(
        settings: Settings,
        events: UnboundedSender<Event>,
        published: Arc<Board>,
        lanes: Arc<Lanes>,
    ) -> Self {
        Scheduler {
            settings,
            events,
            queue: VecDeque::new(),
            in_flight: IdMap::default(),
            workers: IdMap::default(),
            shutdown: None,
            start_failures: 0,
            last_start_error: None,
            broken: None,
            service_time: None,
            next_internal_id: INTERNAL_IDS,
            stats: PoolStats::default(),
            published,
            settled: Vec::new(),
            lanes,
            startup: Startup::Starting,
            trim_pending: false,
        }
    }

    /// Starts workers up to the pool's base size (retiring workers do not count).
    pub(crate) fn replenish(&mut self) {
        let needed = self.shutdown.is_none() || !self.queue.is_empty();
        let active = self.workers.values().filter(|w| !w.retiring).count();
        if needed {
            self.spawn_workers(self.settings.workers.saturating_sub(active));
        }
    }

    fn spawn_workers(&mut self, count: usize) {
        if self.broken.is_some() || count == 0 {
            return;
        }
        let spawned = self.start_processes(count);
        for result in spawned {
            match result {
                Ok((pid, killer)) => {
                    tracing::debug!(worker.pid = pid, "worker started");
                    if !matches!(self.startup, Startup::Starting) {
                        self.stats.restarts += 1;
                    }
                    // Recorded even if another start failed and broke the pool: a worker
                    // that is not tracked would never be stopped.
                    self.workers.insert(
                        pid,
                        Worker {
                            writer: None,
                            lane: None,
                            connected: false,
                            disconnected: false,
                            closed: None,
                            status: None,
                            retiring: false,
                            killer,
                            sent: VecDeque::new(),
                            served: 0,
                            idle_since: None,
                            front_since: None,
                            init: None,
                            kill: None,
                        },
                    );
                }
                Err(e) => {
                    if self.broken.is_none() {
                        let program = self.settings.program.display();
                        self.break_pool(format!("cannot start the worker program {program}: {e}"));
                    }
                }
            }
        }
    }

    /// Starts `count` worker processes side by side: each start waits for its `exec`, and a
    /// pool of 8 should not wait for 8 of them in turn.
    fn start_processes(&self, count: usize) -> Vec<std::io::Result<(u32, spawner::Killer)>> {
        let starting: Vec<_> = (0..count)
            .map(|_| {
                let events = self.events.clone();
                spawner::start(
                    &self.settings.program,
                    &self.settings.socket,
                    &self.settings.token,
                    move |pid, status| {
                        let _ = events.send(Event::Exited { pid, status });
                    },
                )
            })
            .collect();
        starting.into_iter().map(spawner::Starting::wait).collect()
    }

    pub(crate) fn on_command(&mut self, command: Command) {
        // A cancel may be for a request a caller wrote directly; shutting down must know
        // every request in flight.
        self.adopt_all();
        match command {
            Command::Submit(job) => {
                if let Some(reason) = &self.broken {
                    let failure = Failure::Broken(reason.clone());
                    self.fail(job, failure);
                } else if self.shutdown == Some(true) {
                    drop(job); // resolves its handle with `Shutdown`
                } else {
                    self.queue.push_back(job);
                }
            }
            Command::Cancel(id) => self.cancel(id),
            // `adopt_all` above did the work.
            Command::CheckLanes => {}
            Command::WatchSpares => self.watch_kept_memory(),
            Command::Shutdown { now } => {
                let now = now || self.shutdown == Some(true);
                self.shutdown = Some(now);
                if now {
                    self.queue.clear(); // each dropped job resolves with `Shutdown`
                }
                tracing::debug!(now, "process pool shutting down");
            }
        }
    }

    /// The caller cancelled request `id`. Queued: nothing to do, its handle is resolved and
    /// `start` will refuse it. Sent: the worker skips it, or raises its flag if it runs; if it
    /// still runs after the grace period, the worker is killed.
    fn cancel(&mut self, id: RequestId) {
        let Some(&(pid, _)) = self.in_flight.get(&id) else {
            return;
        };
        self.send_to(pid, ToWorker::Cancel { id });
        self.after(self.settings.cancel_grace, Event::CancelGrace { pid, id });
    }

    /// Delivers `event` to the scheduler after `delay`.
    fn after(&self, delay: Duration, event: Event) {
        send_after(&self.events, delay, event);
    }

    pub(crate) fn on_event(&mut self, event: Event) {
        // The answer to a request a caller wrote directly may be in this event, and so may
        // the end of the worker it was written to.
        self.adopt_all();
        match event {
            Event::Connected { pid, writer, lane } => self.on_connected(pid, writer, lane),
            Event::Refused { pid, reason } => {
                if self.workers.contains_key(&pid) {
                    self.last_start_error = Some(reason);
                }
            }
            Event::Message { pid, message } => {
                self.on_message(pid, message, tokio::time::Instant::now());
            }
            Event::Messages { pid, messages } => {
                // One reading of the clock for all of them: a request answered in the same
                // look as the one before it counts as taking no time, the first as taking
                // the whole gap, so the average per request is still right (`window`).
                let now = tokio::time::Instant::now();
                for message in messages {
                    self.on_message(pid, message, now);
                }
            }
            Event::Disconnected { pid, closed } => {
                // A caller may have written to the worker's lane since `adopt_all` looked:
                // that request is the worker's too, and is settled with its end (removing the
                // lane would drop it, failing it as if the pool had shut down).
                self.adopt(pid);
                if let Some(worker) = self.workers.get_mut(&pid) {
                    worker.closed = closed;
                    worker.writer = None;
                    if let Some(lane) = worker.lane.take() {
                        self.lanes.remove(&lane);
                    }
                    worker.disconnected = true;
                    if worker.status.is_some() {
                        self.finalize(pid);
                    } else {
                        self.after(EXIT_GRACE, Event::Stale { pid });
                    }
                }
            }
            Event::Stale { pid } => {
                if let Some(worker) = self.workers.get(&pid) {
                    tracing::warn!(
                        worker.pid = pid,
                        "worker {pid} closed its connection but did not exit; killing it"
                    );
                    worker.killer.kill();
                }
            }
            Event::Exited { pid, status } => {
                if let Some(worker) = self.workers.get_mut(&pid) {
                    worker.status = Some(status);
                    // A worker that never got its connection has nothing left to read.
                    if worker.disconnected || worker.writer.is_none() {
                        self.finalize(pid);
                    } else {
                        // Its results are read before it is settled; but if something else
                        // holds its connection open (a child it forked), the end of the
                        // connection may never come: settle it after a grace period anyway.
                        self.after(EXIT_GRACE, Event::Settle { pid });
                    }
                }
            }
            Event::Settle { pid } => self.finalize(pid),
            Event::DirectDone { pid } => self.on_direct_done(pid),
            Event::Deadline { pid, id, timeout } => {
                self.kill_if_running(pid, id, Kill::TimedOut(timeout))
            }
            Event::CancelGrace { pid, id } => self.kill_if_running(pid, id, Kill::Cancelled),
            Event::IdleCheck => self.shrink_idle(),
            Event::TrimUnused => self.trim_unused(),
        }
    }

    /// Drops the spare encode buffers and the segments of idle workers that went unused for
    /// `segments::IDLE`, telling each worker to unmap its own; looks again later while
    /// something is kept.
    fn trim_unused(&mut self) {
        self.trim_pending = false;
        // Cleared before the look: a buffer kept from now on asks for the next one.
        self.settings.recycler.set_watched(false);
        self.settings.recycler.trim_idle(segments::IDLE);
        let mut trimmed = Vec::new();
        let mut kept = Vec::new();
        for (&pid, worker) in &self.workers {
            let Some(lane) = &worker.lane else {
                continue;
            };
            // Nothing outstanding: no request in the connection's writer may use a segment.
            let idle = worker.sent.is_empty() && worker.init.is_none() && !worker.retiring;
            if idle && lane.reader.segments.trim_idle(segments::IDLE) {
                trimmed.push(pid);
            } else if lane.reader.segments.kept() {
                kept.push(pid);
            }
        }
        for pid in trimmed {
            self.send_to(pid, ToWorker::DropSegments);
        }
        if !kept.is_empty() || self.settings.recycler.any() {
            self.watch_kept_memory();
        }
    }

    /// Sets the timer that lets go of unused segments and spare buffers, unless it is set.
    fn watch_kept_memory(&mut self) {
        arm_trim_timer(
            &mut self.trim_pending,
            &self.settings.recycler,
            &self.events,
        );
    }

    fn on_connected(&mut self, pid: u32, writer: UnboundedSender<Outgoing>, lane: Arc<Lane>) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            tracing::warn!(
                worker.pid = pid,
                "a process that is not a worker of this pool presented its token; ignored"
            );
            return;
        };
        if worker.connected {
            return;
        }
        worker.connected = true;
        tracing::debug!(worker.pid = pid, "worker connected");
        worker.writer = Some(writer);
        self.lanes.add(lane.clone());
        worker.lane = Some(lane);
        if let Some(init) = &self.settings.initializer {
            let id = self.next_internal_id;
            self.next_internal_id += 1;
            worker.init = Some(id);
            let message = ToWorker::Run {
                id,
                task: init.name.into(),
                input: init.input.clone(),
            };
            self.send_to(pid, message);
        } else {
            self.start_failures = 0;
        }
        let initializing = self.workers.get(&pid).is_some_and(|w| w.init.is_some());
        if !initializing {
            // An extra worker that never gets work must still be able to time out.
            self.note_if_idle(pid);
        }
    }

    /// Handles a frame from worker `pid`, read at about `now`.
    fn on_message(&mut self, pid: u32, message: ToParent, now: tokio::time::Instant) {
        let (id, outcome) = match message {
            ToParent::Done { id, output } => (id, Outcome::One(output)),
            ToParent::BatchDone {
                id,
                failed,
                outputs,
                ..
            } => (id, Outcome::Batch { failed, outputs }),
            ToParent::Log(record) => {
                let task = record
                    .request
                    .and_then(|id| self.in_flight.get(&id))
                    .map(|(_, job)| job.name)
                    .or(self.settings.initializer.as_ref().map(|i| i.name));
                forward::emit(pid, task, &record);
                return;
            }
            ToParent::Hello(_) => {
                tracing::warn!(
                    worker.pid = pid,
                    "worker {pid} sent a second handshake; ignored"
                );
                return;
            }
            // The connection's reader turns these into `Done` (see `segments`).
            ToParent::DoneInSegment { .. } => {
                tracing::warn!(
                    worker.pid = pid,
                    "an answer in shared memory from worker {pid} reached the scheduler; ignored"
                );
                return;
            }
        };
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        // Spare buffers ask for the timer themselves (`Command::WatchSpares`).
        if worker
            .lane
            .as_ref()
            .is_some_and(|lane| lane.reader.segments.kept())
        {
            arm_trim_timer(
                &mut self.trim_pending,
                &self.settings.recycler,
                &self.events,
            );
        }
        if worker.init == Some(id) {
            self.on_init_done(pid, outcome);
            return;
        }
        let Some(position) = worker.sent.iter().position(|&s| s == id) else {
            tracing::warn!(
                worker.pid = pid,
                "worker {pid} answered a request it was not given; ignored"
            );
            return;
        };
        worker.sent.remove(position);
        // The end of this request, and the start of the next.
        if position == 0 {
            if let Some(since) = worker.front_since.take() {
                let took = now.saturating_duration_since(since);
                self.service_time = Some(match self.service_time {
                    None => took,
                    Some(avg) => (avg * 7 + took) / 8,
                });
            }
        }
        if let Some((_, job)) = self.in_flight.remove(&id) {
            let ok = match &outcome {
                Outcome::One(r) => r.is_ok(),
                Outcome::Batch { failed, .. } => *failed == 0,
                Outcome::Failed(_) => false,
            };
            if ok {
                self.stats.completed += 1;
            } else {
                self.stats.failed += 1;
            }
            self.settled.push((job, outcome));
        }
        self.arm_front(pid, now);
        self.recycle_if_due(pid);
        self.note_if_idle(pid);
    }

    /// A caller finished a request it wrote to worker `pid` (see `lane::help_wait`), in a
    /// pool that shrinks idle workers: the worker's idle time starts now. (`adopt_all`, run
    /// before this event, counted the request as served.)
    fn on_direct_done(&mut self, pid: u32) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        worker.idle_since = None;
        self.note_if_idle(pid);
    }

    /// A worker beyond the pool's base size that ran out of work starts its idle timeout.
    fn note_if_idle(&mut self, pid: u32) {
        if self.settings.max_workers <= self.settings.workers {
            return;
        }
        if let Some(worker) = self.workers.get_mut(&pid) {
            if worker.sent.is_empty() && worker.init.is_none() && worker.idle_since.is_none() {
                worker.idle_since = Some(tokio::time::Instant::now());
                self.after(self.settings.idle_timeout, Event::IdleCheck);
            }
        }
    }

    /// Retires workers idle for the idle timeout, down to the pool's base size.
    fn shrink_idle(&mut self) {
        let now = tokio::time::Instant::now();
        let timeout = self.settings.idle_timeout;
        let mut active = self.workers.values().filter(|w| !w.retiring).count();
        let idle: Vec<u32> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.retiring && w.idle_since.is_some_and(|t| now - t >= timeout))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in idle {
            if active <= self.settings.workers {
                break;
            }
            tracing::debug!(
                worker.pid = pid,
                "worker {pid} idle for {timeout:?}; stopping it"
            );
            self.retire(pid);
            active -= 1;
        }
    }

    /// Starts extra workers (up to `max_workers`) while work waits and every worker is full.
    fn grow(&mut self) {
        if self.queue.is_empty() || self.broken.is_some() || self.shutdown.is_some() {
            return;
        }
        let active = self.workers.values().filter(|w| !w.retiring).count();
        let starting = self
            .workers
            .values()
            .filter(|w| !w.retiring && (w.writer.is_none() || w.init.is_some()))
            .count();
        let wanted = self.queue.len().div_ceil(self.window());
        let extra = wanted
            .saturating_sub(starting)
            .min(self.settings.max_workers.saturating_sub(active));
        if extra > 0 {
            self.spawn_workers(extra);
        }
    }

    fn on_init_done(&mut self, pid: u32, outcome: Outcome) {
        let Some(init) = &self.settings.initializer else {
            return;
        };
        let result = match outcome {
            Outcome::One(output) => (init.check)(init.name, output),
            _ => Err("the initializer got a malformed answer".to_owned()),
        };
        match result {
            Ok(()) => {
                if let Some(worker) = self.workers.get_mut(&pid) {
                    worker.init = None;
                }
                self.start_failures = 0;
                self.note_if_idle(pid);
            }
            Err(message) => {
                let reason = format!("the pool initializer `{}` failed: {message}", init.name);
                tracing::warn!(worker.pid = pid, "{reason}");
                self.last_start_error = Some(reason);
                self.retire(pid);
                self.start_failed();
            }
        }
    }

    /// A worker failed to start (died before connecting or failed its initializer).
    fn start_failed(&mut self) {
        self.start_failures += 1;
        let reason = self
            .last_start_error
            .clone()
            .unwrap_or_else(|| "a worker failed to start".to_owned());
        if matches!(self.startup, Startup::Starting) || self.start_failures >= MAX_START_FAILURES {
            let reason = if self.start_failures > 1 {
                format!("{reason}, {} times in a row", self.start_failures)
            } else {
                reason
            };
            self.break_pool(reason);
        }
    }

    /// Starts the timeout of the request now at the front of a worker (running since `now`).
    fn arm_front(&mut self, pid: u32, now: tokio::time::Instant) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        let Some(&id) = worker.sent.front() else {
            return;
        };
        worker.front_since = Some(now);
        if let Some(timeout) = self.in_flight.get(&id).and_then(|(_, j)| j.options.timeout) {
            self.after(timeout, Event::Deadline { pid, id, timeout });
        }
    }

    /// Kills worker `pid` if request `id` is what it is running (a timeout, or a cancel the
    /// task did not honour in time). A request still queued behind another is left alone: the
    /// worker skips it (cancel) or its own timeout starts when it reaches the front.
    fn kill_if_running(&mut self, pid: u32, id: RequestId, kill: Kill) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if worker.sent.front() != Some(&id) || worker.kill.is_some() {
            return;
        }
        let name = self.in_flight.get(&id).map_or("?", |(_, j)| j.name);
        match kill {
            Kill::TimedOut(timeout) => {
                self.stats.timed_out += 1;
                tracing::warn!(worker.pid = pid, task.name = name, "task `{name}` ran longer than its timeout of {timeout:?}; killing worker {pid}");
            }
            Kill::Cancelled => tracing::warn!(
                worker.pid = pid,
                task.name = name,
                "task `{name}` did not stop within {:?} of its cancel; killing worker {pid}",
                self.settings.cancel_grace
            ),
        }
        worker.kill = Some((id, kill));
        worker.killer.kill();
    }

    /// Retires a worker that has served its share (`max_tasks_per_worker`) once it is idle;
    /// its replacement starts at once.
    fn recycle_if_due(&mut self, pid: u32) {
        let Some(max) = self.settings.max_requests_per_worker else {
            return;
        };
        let due = self
            .workers
            .get(&pid)
            .is_some_and(|w| !w.retiring && w.served >= max && w.sent.is_empty());
        if due {
            tracing::debug!(
                worker.pid = pid,
                "recycling worker {pid} after {max} requests"
            );
            self.retire(pid);
            self.replenish();
        }
    }

    /// Asks a worker to exit after its current work.
    fn retire(&mut self, pid: u32) {
        if let Some(worker) = self.workers.get_mut(&pid) {
            worker.retiring = true;
            if worker.writer.is_some() {
                self.send_to(pid, ToWorker::Exit);
            } else {
                worker.killer.kill();
            }
        }
    }

    /// Sends a worker a message through the reactor's writer. Its lane is closed first, and
    /// a request a caller wrote there adopted: that request is ahead of this message on the
    /// wire.
    fn send_to(&mut self, pid: u32, message: ToWorker) {
        self.adopt(pid);
        self.hand_to_writer(pid, Outgoing::One(message));
    }

    /// Hands `outgoing` to worker `pid`'s writer; its lane must be closed (see `send_to`).
    fn hand_to_writer(&self, pid: u32, outgoing: Outgoing) {
        let Some(worker) = self.workers.get(&pid) else {
            return;
        };
        if let (Some(writer), Some(lane)) = (&worker.writer, &worker.lane) {
            let count = outgoing.len();
            lane.unwritten.fetch_add(count, Ordering::AcqRel);
            if writer.send(outgoing).is_err() {
                // The connection is dying; its end is on its way.
                lane.unwritten.fetch_sub(count, Ordering::AcqRel);
            }
        }
    }

    /// Takes over the request a caller wrote to worker `pid`, if any, and closes its lane.
    fn adopt(&mut self, pid: u32) {
        if let Some(worker) = self.workers.get_mut(&pid) {
            adopt_into(pid, worker, &self.lanes, &mut self.in_flight);
        }
    }

    /// Takes over every request callers wrote to workers, closing their lanes. Runs before
    /// every event and command, so it allocates nothing, and looks into the lanes only when
    /// a caller changed one since ([`Lanes::take_touched`](crate::lane::Lanes::take_touched)).
    fn adopt_all(&mut self) {
        if !self.lanes.take_touched() {
            return;
        }
        for (&pid, worker) in &mut self.workers {
            adopt_into(pid, worker, &self.lanes, &mut self.in_flight);
        }
    }

    /// Opens the lanes of idle workers, when nothing waits in the queue: the next caller may
    /// write its request to one of them directly.
    pub(crate) fn open_lanes(&mut self) {
        if !self.queue.is_empty() || self.shutdown.is_some() || self.broken.is_some() {
            return;
        }
        let max = self.settings.max_requests_per_worker;
        for worker in self.workers.values() {
            // A window of 1: only a worker with nothing sent.
            if worker.kill.is_none() && worker.can_take_work(1, max) {
                if let Some(lane) = &worker.lane {
                    self.lanes.open(lane);
                }
            }
        }
    }

    /// The worker is gone and everything it wrote has been read: settle its requests.
    fn finalize(&mut self, pid: u32) {
        self.adopt(pid);
        let Some(worker) = self.workers.remove(&pid) else {
            return;
        };
        if let Some(lane) = &worker.lane {
            self.lanes.remove(lane);
        }
        let status = worker.status.unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            ExitStatus::from_raw(0)
        });
        let (mut text, signal, code) = spawner::describe(status);
        if let Some(reason) = &worker.closed {
            text.push_str(&format!(" after the pool closed its connection ({reason})"));
        }
        if let (Some(limit), Some(6 | 9 | 11)) = (self.settings.memory_limit, signal) {
            text.push_str(&format!(
                ", perhaps for exceeding the pool's memory limit of {},",
                human_bytes(limit)
            ));
        }
        let mut sent = worker.sent.into_iter();
        let front = sent.next();
        // Requests behind the front never started: they go back to the head of the queue.
        let unstarted: Vec<Job> = sent
            .filter_map(|id| self.in_flight.remove(&id).map(|(_, job)| job))
            .collect();
        for job in unstarted.into_iter().rev() {
            self.queue.push_front(job);
        }
        let front = front.and_then(|id| self.in_flight.remove(&id).map(|(_, job)| job));

        // The request the kill was for, if it is still the one running. Its answer may have
        // come in just before the kill landed: then whatever ran next was killed through no
        // fault of its own, and is treated as an honest crash.
        let kill = worker
            .kill
            .filter(|(id, _)| front.as_ref().is_some_and(|job| job.id == *id))
            .map(|(_, kill)| kill);
        let failed_to_start = !worker.connected
            || worker.init.is_some()
            || (worker.served == 0 && code.is_some_and(|c| WORKER_START_FAILURE.contains(&c)));
        // What `replenish` below will do (the worker is out of `workers` already, and the
        // requests behind it are back in the queue); a retried job goes there too, and then
        // its message is not shown.
        let active = self.workers.values().filter(|w| !w.retiring).count();
        let replaced = self.broken.is_none()
            && (self.shutdown.is_none() || !self.queue.is_empty())
            && active < self.settings.workers;
        match (kill, front) {
            (Some(Kill::TimedOut(timeout)), Some(job)) => {
                self.retry_or_fail(job, Failure::TimedOut(timeout, replaced));
            }
            // Its handle already resolved as cancelled; the late result has nowhere to go.
            (Some(Kill::Cancelled), Some(job)) => drop(job),
            (_, front) if failed_to_start => {
                if worker.retiring && front.is_none() {
                    tracing::debug!(worker.pid = pid, "worker {pid} {text}");
                } else {
                    let reason = self.last_start_error.take().unwrap_or_else(|| {
                        if !worker.connected {
                            format!(
                                "worker {pid} {text} before connecting to the pool; does the \
                                 worker program call offload::init() at the top of main?"
                            )
                        } else if worker.init.is_some() {
                            format!("worker {pid} {text} while running the pool initializer")
                        } else {
                            format!("worker {pid} {text} before serving (its stderr says why)")
                        }
                    });
                    tracing::warn!(worker.pid = pid, "{reason}");
                    self.last_start_error = Some(reason);
                    self.start_failed();
                }
                if let Some(job) = front {
                    self.queue.push_front(job);
                }
            }
            (_, None) if worker.retiring => {
                tracing::debug!(worker.pid = pid, "worker {pid} {text}")
            }
            (_, None) => {
                self.stats.crashed += 1;
                let then = if replaced {
                    "; starting a replacement"
                } else {
                    ""
                };
                tracing::warn!(worker.pid = pid, "idle worker {pid} {text}{then}");
            }
            (_, Some(job)) => {
                self.stats.crashed += 1;
                let name = job.name;
                let then = if replaced {
                    "; starting a replacement"
                } else {
                    ""
                };
                tracing::warn!(
                    worker.pid = pid,
                    task.name = name,
                    "worker {pid} {text} while running `{name}`{then}"
                );
                let failure = Failure::Crashed {
                    pid,
                    status: text,
                    signal,
                    code,
                    replaced,
                };
                self.retry_or_fail(job, failure);
            }
        }
        self.replenish();
    }

    /// With retries left, runs the job again (first in line); otherwise fails it.
    fn retry_or_fail(&mut self, mut job: Job, failure: Failure) {
        job.attempts += 1;
        if job.attempts <= job.options.retries {
            self.stats.retried += 1;
            tracing::debug!(
                task.name = job.name,
                attempt = job.attempts + 1,
                "running the task again"
            );
            self.queue.push_front(job);
        } else {
            self.fail(job, failure);
        }
    }

    fn fail(&mut self, job: Job, failure: Failure) {
        self.stats.failed += 1;
        self.settled.push((job, Outcome::Failed(failure)));
    }

    /// No worker can be started: fail everything queued, and everything submitted later.
    fn break_pool(&mut self, reason: String) {
        tracing::error!("process pool is broken: {reason}");
        self.fail_queued(&reason);
        if matches!(self.startup, Startup::Starting) {
            self.startup = Startup::Failed(reason.clone());
        }
        self.broken = Some(reason);
    }

    /// Fails every queued job: the pool is broken for `reason`.
    fn fail_queued(&mut self, reason: &str) {
        let queued: Vec<Job> = self.queue.drain(..).collect();
        for job in queued {
            self.fail(job, Failure::Broken(reason.to_owned()));
        }
    }

    /// Requests in flight per worker: the configured number, or enough to keep about
    /// `QUEUED_WORK_TARGET` of work queued on each worker at the measured request length.
    fn window(&self) -> usize {
        if let Some(fixed) = self.settings.window {
            return fixed;
        }
        match self.service_time {
            None => WINDOW_MIN,
            Some(t) => {
                let fits = QUEUED_WORK_TARGET.as_nanos() / t.as_nanos().max(1);
                usize::try_from(fits)
                    .unwrap_or(WINDOW_MAX)
                    .clamp(WINDOW_MIN, WINDOW_MAX)
            }
        }
    }

    /// Sends queued jobs to the least-loaded workers with room in their window. On a broken
    /// pool, fails them instead: whatever reached the queue after the pool broke (work put
    /// back from a lost worker, a retry) must not wait for workers that will never come.
    pub(crate) fn dispatch(&mut self) {
        if let Some(reason) = self.broken.clone() {
            self.fail_queued(&reason);
            return;
        }
        let window = self.window();
        let max = self.settings.max_requests_per_worker;
        // Each worker's requests, handed to its writer together at the end.
        let mut batches: Vec<(u32, Vec<ToWorker>)> = Vec::new();
        while !self.queue.is_empty() {
            let Some((&pid, _)) = self
                .workers
                .iter()
                .filter(|(_, w)| w.can_take_work(window, max))
                .min_by_key(|(_, w)| w.sent.len())
            else {
                break;
            };
            let Some(job) = self.queue.pop_front() else {
                break;
            };
            if !job.reply.start() {
                continue; // cancelled while queued; its handle is already resolved
            }
            let slot = match batches.iter().position(|(p, _)| *p == pid) {
                Some(slot) => slot,
                None => {
                    // Closes the lane first, so a request a caller wrote there comes first in
                    // `sent`, as on the wire. (It stays closed until `open_lanes`, after
                    // this.)
                    self.adopt(pid);
                    batches.push((pid, Vec::new()));
                    batches.len() - 1
                }
            };
            batches[slot].1.push(job.request());
            let id = job.id;
            // A closed writer means the connection is dying: the job stays on this worker
            // and is settled with its exit, like any job it held.
            self.in_flight.insert(id, (pid, job));
            if let Some(worker) = self.workers.get_mut(&pid) {
                worker.sent.push_back(id);
                worker.served += 1;
                worker.idle_since = None;
                if worker.sent.len() == 1 {
                    self.arm_front(pid, tokio::time::Instant::now());
                }
            }
        }
        for (pid, batch) in batches {
            self.hand_to_writer(pid, Outgoing::of(batch));
        }
        self.grow();
    }

    /// Reports startup once every worker is connected and initialized.
    pub(crate) fn check_startup(&mut self) {
        if matches!(self.startup, Startup::Starting)
            && self.workers.len() == self.settings.workers
            && self
                .workers
                .values()
                .all(|w| w.connected && w.init.is_none())
        {
            self.startup = Startup::Ready;
        }
    }

    /// During shutdown, once the work is done, asks every worker to exit. True when the last
    /// worker has exited and the reactor can stop.
    pub(crate) fn finished(&mut self) -> bool {
        if self.shutdown.is_none() && self.broken.is_none() {
            return false;
        }
        if !self.queue.is_empty() || !self.in_flight.is_empty() {
            return false;
        }
        let pids: Vec<u32> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.retiring)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in pids {
            self.retire(pid);
        }
        self.workers.is_empty()
    }

    /// Kills every worker at once (startup failed, or the reactor must stop).
    pub(crate) fn kill_all(&mut self) {
        for worker in self.workers.values_mut() {
            worker.retiring = true;
            worker.killer.kill();
        }
    }

    pub(crate) fn has_workers(&self) -> bool {
        !self.workers.is_empty()
    }

    /// Publishes the counts for `ProcessPool::stats`, then resolves the jobs settled since the
    /// last call, in that order.
    pub(crate) fn flush(&mut self) {
        self.stats.queued = self.queue.len();
        self.stats.running = self.in_flight.len();
        self.stats.workers = self
            .workers
            .values()
            .filter(|w| w.connected && !w.retiring)
            .count();
        self.published.publish(self.stats, &self.broken);
        for (job, outcome) in self.settled.drain(..) {
            job.finish(outcome);
        }
    }
}

/// Closes `worker`'s lane and moves the request a caller left there, if any, to the worker's
/// `sent` list and `in_flight`. A lane a caller could not write to replaces the worker.
fn adopt_into(
    pid: u32,
    worker: &mut Worker,
    lanes: &Lanes,
    in_flight: &mut IdMap<RequestId, (u32, Job)>,
) {
    let Some(lane) = &worker.lane else {
        return;
    };
    // Requests callers finished themselves count as served (see `lane::help_wait`).
    worker.served += lane.direct_served.swap(0, Ordering::AcqRel);
    if lane.broken.swap(false, Ordering::AcqRel) {
        tracing::warn!(
            worker.pid = pid,
            "a request to worker {pid} could not be written; replacing the worker"
        );
        worker.killer.kill();
    }
    let Some(Direct { job, sent }) = lanes.close(lane) else {
        return;
    };
    worker.sent.push_back(job.id);
    worker.served += 1;
    worker.idle_since = None;
    if worker.sent.len() == 1 {
        worker.front_since = Some(tokio::time::Instant::from_std(sent));
    }
    in_flight.insert(job.id, (pid, job));
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("connected", &self.connected)
            .field("sent", &self.sent.len())
            .finish_non_exhaustive()
    }
}

/// A byte count for people: "256 MiB", "512 KiB", "100 bytes".
fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// Sets the timer that lets go of unused segments and spare buffers, unless `pending` says it
/// is set. (Takes the scheduler's fields, not the scheduler: `on_message` holds a worker.)
fn arm_trim_timer(pending: &mut bool, recycler: &Recycler, events: &UnboundedSender<Event>) {
    if !*pending {
        *pending = true;
        recycler.set_watched(true);
        send_after(events, segments::IDLE, Event::TrimUnused);
    }
}

/// Sends `event` to the scheduler after `delay`.
fn send_after(events: &UnboundedSender<Event>, delay: Duration, event: Event) {
    let events = events.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = events.send(event);
    });
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(256 << 20), "256 MiB");
        assert_eq!(human_bytes(2 << 30), "2 GiB");
        assert_eq!(human_bytes(512 << 10), "512 KiB");
        assert_eq!(human_bytes(100), "100 bytes");
    }
}
