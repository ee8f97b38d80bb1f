//! The pool's own I/O thread: a small single-threaded tokio runtime that owns the socket, the
//! workers and the scheduler. Owning it makes the pool work from sync code and from any async
//! runtime (or none), and keeps pool I/O off the caller's runtime.

use std::os::fd::OwnedFd;
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::{GenericNamespaced, ListenerOptions};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::connection::{self, Accept, Event};
use crate::lane::Lanes;
use crate::scheduler::{Command, Scheduler, Settings, Startup};
use crate::stats::Board;
use crate::BuildError;

/// How commands reach the reactor.
pub(crate) type Commands = UnboundedSender<Command>;

/// Starts the reactor thread and waits until every worker has connected (or startup failed).
pub(crate) fn start(
    settings: Settings,
    max_frame: usize,
    startup_timeout: Duration,
    stats: Arc<Board>,
    lanes: Arc<Lanes>,
) -> Result<(Commands, JoinHandle<()>), BuildError> {
    let (commands, incoming) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("offload-io".into())
        .spawn(move || {
            // Workers wake this thread only when it said it sleeps (see `offload_ipc::ring`):
            // it says so here, just before it does, so answers that come while it is busy
            // cost no wake-up.
            let sleeping = lanes.clone();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(move || sleeping.before_sleep())
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(BuildError::Io(e)));
                    return;
                }
            };
            runtime.block_on(run(
                settings,
                max_frame,
                startup_timeout,
                incoming,
                ready_tx,
                stats,
                lanes,
            ));
        })
        .map_err(BuildError::Io)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((commands, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(std_mpsc::RecvError) => {
            let _ = thread.join();
            Err(BuildError::Startup(
                "the pool's I/O thread ended during startup".into(),
            ))
        }
    }
}

/// Waits for the lanes' alarm (see `alarm`), or forever if there is none.
async fn rung(lanes: &Lanes, watch: Option<&AsyncFd<OwnedFd>>) -> std::io::Result<()> {
    match (lanes.alarm(), watch) {
        (Some(alarm), Some(watch)) => alarm.rung(watch).await,
        _ => std::future::pending().await,
    }
}

async fn run(
    settings: Settings,
    max_frame: usize,
    startup_timeout: Duration,
    mut commands: UnboundedReceiver<Command>,
    ready: std_mpsc::Sender<Result<(), BuildError>>,
    stats: Arc<Board>,
    lanes: Arc<Lanes>,
) {
    let listener = match settings
        .socket
        .as_str()
        .to_ns_name::<GenericNamespaced>()
        .and_then(|name| ListenerOptions::new().name(name).create_tokio())
    {
        Ok(listener) => listener,
        Err(e) => {
            let _ = ready.send(Err(BuildError::Io(e)));
            return;
        }
    };
    let accept = Arc::new(Accept {
        token: settings.token,
        max_frame,
        memory_limit: settings.memory_limit,
        spin_us: u32::try_from(settings.spin.as_micros()).unwrap_or(u32::MAX),
    });
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel::<Event>();
    // Without it (no timer to be had), callers pause the watch only while they read.
    let mut alarm = lanes.alarm().and_then(|alarm| alarm.watch().ok());
    if alarm.is_some() {
        lanes.alarm_watched();
    }
    let mut scheduler = Scheduler::new(settings, events_tx.clone(), stats, lanes.clone());
    scheduler.replenish();
    let mut ready = Some(ready);
    let startup_deadline = tokio::time::sleep(startup_timeout);
    tokio::pin!(startup_deadline);
    let mut commands_open = true;

    loop {
        // State changes can come from the loop's own actions (a failed spawn, a dispatch), so
        // act on them before waiting for the next event. Stats are published before `build`
        // hears that startup is over, so a new pool's `stats()` is already true.
        scheduler.check_startup();
        scheduler.dispatch();
        // Before the results go out: a caller woken by one may submit at once.
        scheduler.open_lanes();
        scheduler.flush();
        if ready.is_some() {
            match &scheduler.startup {
                Startup::Starting => {}
                Startup::Ready => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                }
                Startup::Failed(reason) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(BuildError::Startup(reason.clone())));
                    }
                    scheduler.kill_all();
                    break;
                }
            }
        }
        if scheduler.finished() {
            break;
        }
        // A thread that never sleeps is never woken: it looks for answers itself.
        lanes.look_at_rings();
        tokio::select! {
            Some(event) = events.recv() => {
                scheduler.on_event(event);
            }
            command = commands.recv(), if commands_open => match command {
                Some(command) => {
                        scheduler.on_command(command);
                }
                // Every handle to the pool is gone: shut down gracefully.
                None => {
                    commands_open = false;
                    scheduler.on_command(Command::Shutdown { now: false });
                }
            },
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    tokio::spawn(connection::serve(stream, accept.clone(), events_tx.clone()));
                }
                Err(e) => tracing::warn!("accepting a worker connection failed: {e}"),
            },
            rang = rung(&lanes, alarm.as_ref()) => match rang {
                Ok(()) => lanes.on_alarm(),
                // Cannot happen with an open timer. Callers then pause only while they read.
                Err(e) => {
                    tracing::warn!("the pool's alarm failed: {e}");
                    alarm = None;
                    lanes.alarm_failed();
                }
            },
            () = &mut startup_deadline, if ready.is_some() => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(BuildError::Startup(format!(
                        "the workers did not all connect within {startup_timeout:?}"
                    ))));
                }
                scheduler.kill_all();
                break;
            }
        }
        // Drain what else is waiting before dispatching, so a burst of submissions becomes
        // one write per worker.
        while let Ok(event) = events.try_recv() {
            scheduler.on_event(event);
        }
        if commands_open {
            while let Ok(command) = commands.try_recv() {
                scheduler.on_command(command);
            }
        }
    }
    // Reap whatever is left (killed above, or exiting), so no zombie outlives the pool.
    scheduler.flush();
    while scheduler.has_workers() {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(event)) => {
                scheduler.on_event(event);
                scheduler.flush();
            }
            _ => {
                scheduler.kill_all();
                break;
            }
        }
    }
}
