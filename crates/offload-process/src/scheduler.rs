//! The scheduler: one central queue, a small in-flight window per worker, and supervision
//! (a dead worker fails only the requests it held, and is replaced).
//!
//! It runs on the pool's reactor thread and owns all pool state, so none of it is locked.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use offload_ipc::protocol::{ToParent, ToWorker, TOKEN_LEN};
use tokio::sync::mpsc::UnboundedSender;

use crate::connection::Event;
use crate::forward;
use crate::job::{Failure, Job, Outcome, Payload, RequestId};
use crate::spawner::{self, Killer};

/// How long a worker whose connection ended may take to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// After this many workers in a row die before connecting, the pool is broken: starting more
/// would only be a crash loop.
const MAX_START_FAILURES: u32 = 3;

/// What the pool's handles send to the reactor.
pub(crate) enum Command {
    Submit(Job),
    Cancel(RequestId),
    Shutdown { now: bool },
}

pub(crate) struct Settings {
    pub(crate) program: PathBuf,
    pub(crate) workers: usize,
    pub(crate) window: usize,
    pub(crate) socket: String,
    pub(crate) token: [u8; TOKEN_LEN],
}

struct Worker {
    /// `None` until the handshake, and again once the connection ended.
    writer: Option<UnboundedSender<ToWorker>>,
    in_flight: usize,
    connected: bool,
    /// Asked to exit (shutdown): its end is not a crash.
    retiring: bool,
    killer: Killer,
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
    in_flight: HashMap<RequestId, (u32, Job)>,
    workers: HashMap<u32, Worker>,
    shutdown: Option<bool>,
    start_failures: u32,
    /// Why the last worker failed to start, for the error a user sees.
    last_start_error: Option<String>,
    broken: Option<String>,
    pub(crate) startup: Startup,
}

impl Scheduler {
    pub(crate) fn new(settings: Settings, events: UnboundedSender<Event>) -> Self {
        Scheduler {
            settings,
            events,
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            workers: HashMap::new(),
            shutdown: None,
            start_failures: 0,
            last_start_error: None,
            broken: None,
            startup: Startup::Starting,
        }
    }

    /// Starts workers up to the pool's size.
    pub(crate) fn replenish(&mut self) {
        let needed = self.shutdown.is_none() || !self.queue.is_empty();
        while needed && self.broken.is_none() && self.workers.len() < self.settings.workers {
            let events = self.events.clone();
            let spawned = spawner::spawn(
                &self.settings.program,
                &self.settings.socket,
                &self.settings.token,
                move |pid, status| {
                    let _ = events.send(Event::Exited { pid, status });
                },
            );
            match spawned {
                Ok((pid, killer)) => {
                    tracing::debug!(worker.pid = pid, "worker started");
                    self.workers.insert(
                        pid,
                        Worker {
                            writer: None,
                            in_flight: 0,
                            connected: false,
                            retiring: false,
                            killer,
                        },
                    );
                }
                Err(e) => {
                    let program = self.settings.program.display();
                    self.break_pool(format!("cannot start the worker program {program}: {e}"));
                }
            }
        }
    }

    pub(crate) fn on_command(&mut self, command: Command) {
        match command {
            Command::Submit(job) => {
                if let Some(reason) = &self.broken {
                    job.reply
                        .finish(Outcome::Failed(Failure::Broken(reason.clone())));
                } else if self.shutdown == Some(true) {
                    drop(job); // resolves its handle with `Shutdown`
                } else {
                    self.queue.push_back(job);
                }
            }
            Command::Cancel(id) => {
                // Queued jobs need nothing: their handle is resolved and `start` will refuse.
                if let Some((pid, _)) = self.in_flight.get(&id) {
                    if let Some(writer) = self.workers.get(pid).and_then(|w| w.writer.as_ref()) {
                        let _ = writer.send(ToWorker::Cancel { id });
                    }
                }
            }
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

    pub(crate) fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected { pid, writer } => match self.workers.get_mut(&pid) {
                Some(worker) if !worker.connected => {
                    worker.connected = true;
                    worker.writer = Some(writer);
                    self.start_failures = 0;
                    tracing::debug!(worker.pid = pid, "worker connected");
                }
                _ => tracing::warn!(
                    worker.pid = pid,
                    "a process that is not a worker of this pool presented its token; ignored"
                ),
            },
            Event::Refused { pid, reason } => {
                self.last_start_error = Some(reason);
                let _ = pid;
            }
            Event::Message { pid, message } => self.on_message(pid, message),
            Event::Disconnected { pid } => {
                if let Some(worker) = self.workers.get_mut(&pid) {
                    worker.writer = None;
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(EXIT_GRACE).await;
                        let _ = events.send(Event::Stale { pid });
                    });
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
            Event::Exited { pid, status } => self.on_exit(pid, status),
        }
    }

    fn on_message(&mut self, pid: u32, message: ToParent) {
        let (id, outcome) = match message {
            ToParent::Done { id, output } => (id, Outcome::One(output)),
            ToParent::BatchDone { id, outputs } => (id, Outcome::Batch(outputs)),
            ToParent::Log(record) => {
                let task = record
                    .request
                    .and_then(|id| self.in_flight.get(&id))
                    .map(|(_, job)| job.name);
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
        };
        match self.in_flight.remove(&id) {
            Some((owner, job)) if owner == pid => {
                if let Some(worker) = self.workers.get_mut(&pid) {
                    worker.in_flight -= 1;
                }
                job.reply.finish(outcome);
            }
            Some(other) => {
                tracing::warn!(
                    worker.pid = pid,
                    "worker {pid} answered a request it was not given; ignored"
                );
                self.in_flight.insert(id, other);
            }
            None => tracing::warn!(
                worker.pid = pid,
                "worker {pid} answered an unknown request; ignored"
            ),
        }
    }

    fn on_exit(&mut self, pid: u32, status: std::process::ExitStatus) {
        let Some(worker) = self.workers.remove(&pid) else {
            return;
        };
        let (text, signal, code) = spawner::describe(status);
        let lost: Vec<RequestId> = self
            .in_flight
            .iter()
            .filter(|(_, (owner, _))| *owner == pid)
            .map(|(id, _)| *id)
            .collect();
        if worker.retiring && lost.is_empty() {
            tracing::debug!(worker.pid = pid, "worker {pid} {text}");
        } else if !worker.connected {
            self.start_failures += 1;
            let reason = self.last_start_error.take().unwrap_or_else(|| {
                format!(
                    "worker {pid} {text} before connecting to the pool; does the worker program \
                     call offload::init() at the top of main?"
                )
            });
            tracing::warn!(worker.pid = pid, "{reason}");
            if matches!(self.startup, Startup::Starting)
                || self.start_failures >= MAX_START_FAILURES
            {
                self.break_pool(reason);
            }
        } else {
            tracing::warn!(
                worker.pid = pid,
                lost = lost.len(),
                "worker {pid} {text}; starting a replacement"
            );
        }
        let failure = Failure::Crashed {
            pid,
            status: text,
            signal,
            code,
        };
        for id in lost {
            if let Some((_, job)) = self.in_flight.remove(&id) {
                job.reply.finish(Outcome::Failed(failure.clone()));
            }
        }
        self.replenish();
    }

    /// No worker can be started: fail everything queued, and everything submitted later.
    fn break_pool(&mut self, reason: String) {
        tracing::error!("process pool is broken: {reason}");
        for job in self.queue.drain(..) {
            job.reply
                .finish(Outcome::Failed(Failure::Broken(reason.clone())));
        }
        if matches!(self.startup, Startup::Starting) {
            self.startup = Startup::Failed(reason.clone());
        }
        self.broken = Some(reason);
    }

    /// Sends queued jobs to the least-loaded workers with room in their window.
    pub(crate) fn dispatch(&mut self) {
        while !self.queue.is_empty() {
            let Some((&pid, _)) = self
                .workers
                .iter()
                .filter(|(_, w)| w.writer.is_some() && w.in_flight < self.settings.window)
                .min_by_key(|(_, w)| w.in_flight)
            else {
                break;
            };
            let Some(mut job) = self.queue.pop_front() else {
                break;
            };
            if !job.reply.start() {
                continue; // cancelled while queued; its handle is already resolved
            }
            let message = match job.payload.take() {
                Some(Payload::One(input)) => ToWorker::Run {
                    id: job.id,
                    task: job.name.to_owned(),
                    input,
                },
                Some(Payload::Batch(inputs)) => ToWorker::RunBatch {
                    id: job.id,
                    task: job.name.to_owned(),
                    inputs,
                },
                None => continue,
            };
            if let Some(worker) = self.workers.get_mut(&pid) {
                worker.in_flight += 1;
                if let Some(writer) = &worker.writer {
                    // A closed writer means the connection is dying: the job stays in flight on
                    // this worker and fails with its exit, like any job it held.
                    let _ = writer.send(message);
                }
            }
            self.in_flight.insert(job.id, (pid, job));
        }
    }

    /// Reports startup once every worker is connected.
    pub(crate) fn check_startup(&mut self) {
        if matches!(self.startup, Startup::Starting)
            && self.workers.len() == self.settings.workers
            && self.workers.values().all(|w| w.connected)
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
        for worker in self.workers.values_mut() {
            if worker.retiring {
                continue;
            }
            worker.retiring = true;
            match &worker.writer {
                Some(writer) => {
                    let _ = writer.send(ToWorker::Exit);
                }
                None => worker.killer.kill(),
            }
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
}
