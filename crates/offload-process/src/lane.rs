//! Direct lanes: a caller writes a small request straight to an idle worker's socket.
//!
//! A request's usual way is caller -> the reactor thread (a channel, and a wake-up) -> the
//! worker. But when a worker is idle and nothing waits in the queue, the scheduler opens the
//! worker's lane: the first caller to find it open closes it, writes its request to the
//! socket itself, and leaves the job in the lane. The scheduler adopts the job before it
//! handles any event (it looks into the lanes first), so before any answer it reads itself;
//! the reactor thread is not woken to send it: one thread wake-up less on the round trip,
//! which on a machine with few CPUs is most of a tiny task's cost.
//!
//! Frames on a socket must never interleave. The scheduler closes a lane before it sends the
//! worker anything, and opens it only when everything it sent has been written
//! ([`Lane::unwritten`]); a caller writes only into an open lane, and the reactor's writer
//! waits while a caller is writing ([`Lane::wait_for_caller`]). The caller leaves its job in
//! the lane *before* it writes, and writes without holding the lane's lock: on a busy CPU the
//! worker it wakes may run at once, and its answer must not find the lane locked.
//!
//! A caller that then blocks in `wait` reads the answer itself ([`help_wait`], through the
//! connection's [`SharedReader`]): it takes its job back out of the lane and opens the lane
//! again in one step ([`Lane::take_back`]), unless the scheduler adopted the job meanwhile,
//! and finishes it; the reactor thread is not woken for that either. For that, the reactor's
//! watch on the socket is paused: before the write, when the last caller to write here read
//! its own answer ([`Lanes::send`]; a worker on the caller's CPU may answer before the caller
//! reaches `wait`), otherwise when the helper starts ([`CallerReads`]). A caller that does
//! not come to read must not leave its answer unread (its handle not done, a task that logs
//! much blocked in its worker): a handle used any other way drops its unused [`WaitHelp`],
//! which lifts the pause, and the pool's [`Alarm`] lifts pauses nobody came for within a
//! millisecond or so.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Instant;

use offload_core::backend::Fd;
use offload_ipc::fdpass;

use crate::alarm::Alarm;
use crate::job::{Job, Outcome, RequestId};
use crate::reader::SharedReader;

/// Requests larger than this go through the reactor, which writes without blocking anyone.
/// An idle worker's socket buffer is empty, and holds far more than this.
pub(crate) const DIRECT_MAX: usize = 64 * 1024;

/// The lanes of a pool's connected workers, shared by its handles and its reactor.
pub(crate) struct Lanes {
    /// Whether callers read their own answers.
    pub(crate) direct_reads: DirectReads,
    lanes: Mutex<Vec<Arc<Lane>>>,
    /// How many lanes are open: callers skip the lock when none is.
    open: AtomicUsize,
    /// The lane a caller took last: the next starts looking there (see [`Lanes::claim`]).
    next: AtomicUsize,
    /// The fastest round trip a caller timed on any lane, in nanoseconds.
    fastest: AtomicU64,
    /// Set when a caller left a request in a lane, took one back or broke a connection:
    /// the scheduler looks into the lanes before an event only then (see
    /// [`Lanes::take_touched`]).
    touched: AtomicBool,
    /// Rings the reactor to resume watches paused for answers nobody came to read (`None`:
    /// the system would not give a timer).
    alarm: Option<Alarm>,
    /// The reactor waits on the alarm, and the alarm has not failed: only then does a pause
    /// start before anyone waits (at the write, or kept after an answer). Otherwise callers
    /// pause only while they read.
    alarm_live: AtomicBool,
    /// Whether a caller pauses the reactor's watch as it writes, expecting to wait for the
    /// answer: true after a blocking wait read one, false after a pause nobody used (see
    /// [`WaitHelp`]).
    pause_at_write: AtomicBool,
    /// Requests callers finished themselves (see [`help_wait`]), with a result and failed:
    /// the scheduler never saw them, so the pool's stats add these.
    pub(crate) direct_completed: AtomicU64,
    pub(crate) direct_failed: AtomicU64,
}

impl Lanes {
    pub(crate) fn new(direct_reads: DirectReads) -> Self {
        Lanes {
            direct_reads,
            lanes: Mutex::default(),
            open: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            fastest: AtomicU64::new(u64::MAX),
            touched: AtomicBool::new(false),
            alarm: Alarm::new().ok(),
            alarm_live: AtomicBool::new(false),
            pause_at_write: AtomicBool::new(false),
            direct_completed: AtomicU64::new(0),
            direct_failed: AtomicU64::new(0),
        }
    }

    /// Whether a caller changed a lane since the last call: then the scheduler must adopt
    /// what callers left there before it handles anything. A caller sets it while it holds
    /// the lane's lock (and before it writes), so a request is never missed: the flag is
    /// cleared before the lanes are looked into, and a request left after that sets it again.
    pub(crate) fn take_touched(&self) -> bool {
        self.touched.swap(false, Ordering::AcqRel)
    }

    /// True when some lane may be open (a hint: the lane's own lock decides).
    pub(crate) fn any_open(&self) -> bool {
        self.open.load(Ordering::Acquire) > 0
    }

    /// Writes `frame`, the request of `job`, to an idle worker, and leaves the job in its
    /// lane. Gives the job back when no lane is open.
    /// `fds` go with the frame's first bytes.
    pub(crate) fn send(&self, job: Job, frame: &[u8], fds: &[Fd]) -> Result<Sent, Job> {
        let id = job.id;
        let lane = self.claim(job)?;
        // Before the write: a worker on this CPU may answer before the write call returns.
        if self.pauses_at_write() && lane.pause_for(id, false) && !self.arm_alarm() {
            lane.forgo(id);
        }
        let written = write_all(&lane.fd, frame, fds);
        lane.writing.store(false, Ordering::Release);
        // A permit, if the writer is not waiting yet: it then checks `writing` again.
        lane.written.notify_one();
        if matches!(written, Written::All) {
            Ok(Sent::Written(Arc::downgrade(&lane)))
        } else {
            // The job is in the lane, and the connection is unusable now: the scheduler
            // replaces the worker, which settles the job like any other the worker held.
            lane.broken.store(true, Ordering::Release);
            self.touched.store(true, Ordering::Release);
            Ok(Sent::Broken)
        }
    }

    fn pauses_at_write(&self) -> bool {
        self.direct_reads.enabled
            && self.pause_at_write.load(Ordering::Relaxed)
            && self.alarm_live.load(Ordering::Relaxed)
    }

    /// Arms the alarm for a pause nobody may come to lift. False when it will not ring: the
    /// caller must not leave the pause in place.
    fn arm_alarm(&self) -> bool {
        let Some(alarm) = self.alarm.as_ref() else {
            return false;
        };
        if !self.alarm_live.load(Ordering::Relaxed) {
            return false;
        }
        if alarm.arm() {
            return true;
        }
        self.alarm_failed();
        false
    }

    /// For the reactor: it waits on the alarm now, so pauses may start before anyone waits.
    pub(crate) fn alarm_watched(&self) {
        self.alarm_live
            .store(self.alarm.is_some(), Ordering::Relaxed);
    }

    /// The alarm failed (it could not be set, or not be read): pauses start only while a
    /// caller reads from now on, and every pause nobody is reading for is lifted.
    pub(crate) fn alarm_failed(&self) {
        self.alarm_live.store(false, Ordering::Relaxed);
        for lane in lock(&self.lanes).iter() {
            let mut state = lane.state();
            if !state.claimed {
                lane.resume_watch(&mut state);
            }
        }
    }

    fn set_pause_at_write(&self, pause: bool) {
        if self.pause_at_write.load(Ordering::Relaxed) != pause {
            self.pause_at_write.store(pause, Ordering::Relaxed);
        }
    }

    /// For the reactor, when the alarm rang: resumes the watch of every lane paused for a
    /// request nobody has come to read for half an [`Alarm::PERIOD`] or more, or paused with
    /// no request (kept after an answer, see [`Lane::take_back`]), and arms the alarm again
    /// while younger ones are paused. (Under the lanes' lock: it rings at most once a
    /// millisecond, and finds a pause to lift only when a handle is held unused, or a caller
    /// paused between requests.)
    pub(crate) fn on_alarm(&self) {
        let mut young = false;
        let mut lifted = false;
        for lane in lock(&self.lanes).iter() {
            let mut state = lane.state();
            if !state.paused || state.claimed {
                continue;
            }
            match &state.direct {
                Some(d) if d.sent.elapsed() >= Alarm::PERIOD / 2 => {
                    lane.resume_watch(&mut state);
                    lifted = true;
                }
                Some(_) => young = true,
                None => lane.resume_watch(&mut state),
            }
        }
        if lifted {
            self.set_pause_at_write(false);
        }
        if young {
            // On failure, `arm_alarm` has lifted them all.
            self.arm_alarm();
        }
    }

    /// The alarm, for the reactor to wait on.
    pub(crate) fn alarm(&self) -> Option<&Alarm> {
        self.alarm.as_ref()
    }

    /// Leaves `job` in the first open lane and returns that lane (its write is marked under
    /// way). Gives the job back when none is open.
    ///
    /// Looks first at the lane taken last, unless the last round trip a caller timed there
    /// (from its write to its read of the answer) took more than twice the fastest timed on
    /// any lane, or none was timed yet: then at the next one. For a tiny task the hand-offs
    /// are the round trip, and what they cost depends on where the two threads run: about
    /// 12 µs when the worker runs on the caller's CPU, about 50 µs when every hand-off wakes
    /// the other CPU from its halt (2-CPU VM). Always the next lane (the old rule) gets the
    /// first case every other time: in-bench p50 19 µs, a lone caller's loop 30 µs mean.
    /// Always the same lane lands in either for good (the kernel soon spreads two busy
    /// threads over two CPUs, as it does for a raw socket ping-pong: 41 µs alone). Staying
    /// while it is fast and moving on when it is not: in-bench p50 12.5-12.9 µs, a lone loop
    /// 28-29 µs mean with p50 18 µs. Tasks that take long move on every time, as before.
    fn claim(&self, mut job: Job) -> Result<Arc<Lane>, Job> {
        let lanes = lock(&self.lanes);
        let count = lanes.len();
        let mut start = self.next.load(Ordering::Relaxed);
        if let Some(last) = lanes.get(start % count.max(1)) {
            let fastest = self.fastest.load(Ordering::Relaxed);
            // Nothing timed (awaiting callers, recycling pools): the next lane, as before.
            if fastest == u64::MAX
                || last.last_round_trip.load(Ordering::Relaxed) > fastest.saturating_mul(2)
            {
                start += 1;
            }
        }
        for i in 0..count {
            let lane = &lanes[(start + i) % count];
            match lane.take(job, self) {
                Ok(()) => {
                    self.next.store((start + i) % count, Ordering::Relaxed);
                    return Ok(lane.clone());
                }
                Err(back) => job = back,
            }
        }
        Err(job)
    }

    /// Requests in lanes that the scheduler has not adopted yet.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.lanes)
            .iter()
            .filter(|lane| lane.state().direct.is_some())
            .count()
    }

    /// For the I/O thread, about to sleep: see [`SharedReader::before_sleep`].
    pub(crate) fn before_sleep(&self) {
        self.each_reader(SharedReader::before_sleep);
    }

    /// For the I/O thread, busy: see [`SharedReader::look_at_ring`].
    pub(crate) fn look_at_rings(&self) {
        self.each_reader(SharedReader::look_at_ring);
    }

    fn each_reader(&self, f: fn(&SharedReader)) {
        for lane in lock(&self.lanes).iter() {
            f(&lane.reader);
        }
    }

    pub(crate) fn add(&self, lane: Arc<Lane>) {
        lock(&self.lanes).push(lane);
    }

    /// Removes a worker's lane, closing it. The scheduler adopts the lane's request first
    /// (a request still in it would be dropped, its handle failed as at a shutdown).
    pub(crate) fn remove(&self, lane: &Arc<Lane>) {
        self.close(lane);
        lock(&self.lanes).retain(|l| !Arc::ptr_eq(l, lane));
    }

    /// Closes `lane` so that no caller writes to it, and returns the job a caller left there
    /// (the scheduler must adopt it: it was written before anything sent from now on). The
    /// reactor reads the worker's answers from now on.
    pub(crate) fn close(&self, lane: &Lane) -> Option<Direct> {
        let mut state = lane.state();
        if state.open {
            state.open = false;
            self.open.fetch_sub(1, Ordering::AcqRel);
        }
        if state.paused && !state.claimed && state.direct.is_some() {
            // Its caller has not come to read (a burst of submissions, say): the next caller
            // pauses only once it waits.
            self.set_pause_at_write(false);
        }
        lane.resume_watch(&mut state);
        state.direct.take()
    }

    /// Opens `lane` for one caller's request, unless a request is still in it or not
    /// everything the scheduler sent has been written.
    pub(crate) fn open(&self, lane: &Lane) {
        let mut state = lane.state();
        if !state.open && state.direct.is_none() && lane.unwritten.load(Ordering::Acquire) == 0 {
            state.open = true;
            self.open.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// What became of a request a lane took.
pub(crate) enum Sent {
    /// Written to the worker of this lane.
    Written(Weak<Lane>),
    /// The write failed: the scheduler must be told (it replaces the worker).
    Broken,
}

/// One worker's lane.
pub(crate) struct Lane {
    /// A duplicate of the connection's descriptor, for callers' writes.
    fd: OwnedFd,
    /// The connection's read side, for a caller waiting on its answer.
    pub(crate) reader: Arc<SharedReader>,
    state: Mutex<LaneState>,
    /// Messages the scheduler handed to the connection's writer that are not fully written:
    /// the lane stays closed until it is back to zero.
    pub(crate) unwritten: AtomicUsize,
    /// A caller is writing to the socket.
    writing: AtomicBool,
    /// Signalled when a caller's write has ended.
    written: tokio::sync::Notify,
    /// A caller's write failed: the connection cannot be used any more.
    pub(crate) broken: AtomicBool,
    /// Requests callers finished themselves ([`help_wait`]), for the scheduler to count as
    /// served by this worker.
    pub(crate) direct_served: AtomicU64,
    /// How long the last round trip a caller timed here took, in nanoseconds (0 before one).
    last_round_trip: AtomicU64,
}

struct LaneState {
    open: bool,
    /// The request a caller wrote, for the scheduler to adopt.
    direct: Option<Direct>,
    /// The reactor's watch on the socket is paused for the caller of `direct`, or with no
    /// request there, for the next one (see [`Lane::take_back`]).
    paused: bool,
    /// The caller of `direct` is reading its answer (see [`CallerReads`]).
    claimed: bool,
}

/// A request a caller wrote to a worker.
pub(crate) struct Direct {
    pub(crate) job: Job,
    /// When it was written: it started running about then.
    pub(crate) sent: Instant,
}

impl Lane {
    /// A lane for the connection whose descriptor is `fd` (duplicated: the lane's copy
    /// closes with the lane), read through `reader`.
    pub(crate) fn new(
        fd: &impl std::os::fd::AsFd,
        reader: Arc<SharedReader>,
    ) -> std::io::Result<Self> {
        Ok(Lane {
            fd: fd.as_fd().try_clone_to_owned()?,
            reader,
            state: Mutex::new(LaneState {
                open: false,
                direct: None,
                paused: false,
                claimed: false,
            }),
            unwritten: AtomicUsize::new(0),
            writing: AtomicBool::new(false),
            written: tokio::sync::Notify::new(),
            broken: AtomicBool::new(false),
            direct_served: AtomicU64::new(0),
            last_round_trip: AtomicU64::new(0),
        })
    }

    /// For the reactor's writer, before it writes: lets a caller's write end first. Rare (the
    /// scheduler closed the lane just as a caller took it) and usually short (one
    /// non-blocking write); but a worker that stopped reading keeps the caller in
    /// [`write_all`] for up to a second, so this waits without blocking the reactor thread:
    /// every other worker's I/O goes on meanwhile.
    pub(crate) async fn wait_for_caller(&self) {
        loop {
            let written = self.written.notified();
            if !self.writing.load(Ordering::Acquire) {
                return;
            }
            // `notify_one` stores a permit when nobody waits yet, so a write that ends
            // between the check and this await still wakes it.
            written.await;
        }
    }

    fn state(&self) -> MutexGuard<'_, LaneState> {
        lock(&self.state)
    }

    /// Takes back request `id`, answered, if it is still the one a caller left here, and
    /// opens the lane again. The scheduler adopts a lane's request whenever it closes the
    /// lane, and closes it before it sends the worker anything (or retires it): so a request
    /// still here means nothing was sent since, and the worker is idle now, as when the
    /// scheduler opens a lane. Both happen under the lane's lock, in one step: opening it
    /// later could undo a close the scheduler made in between.
    fn take_back(&self, id: RequestId, lanes: &Lanes) -> Option<Direct> {
        let mut state = self.state();
        if state.direct.as_ref().is_none_or(|d| d.job.id != id) {
            return None;
        }
        let direct = state.direct.take();
        self.direct_served.fetch_add(1, Ordering::AcqRel);
        lanes.touched.store(true, Ordering::Release);
        if !state.open && self.unwritten.load(Ordering::Acquire) == 0 {
            state.open = true;
            lanes.open.fetch_add(1, Ordering::AcqRel);
        }
        state.claimed = false;
        // The worker is idle and the lane open: nothing comes from the worker but the answer
        // to a caller's next request, who is likely the one that waited now. The watch stays
        // paused for it, which saves it the pause and the resume (three system calls). The
        // scheduler resumes it when it closes the lane to send the worker something, and the
        // alarm when it next rings.
        if !(state.paused && state.open && lanes.arm_alarm()) {
            self.resume_watch(&mut state);
        }
        direct
    }

    /// Takes `job` if the lane is open, closing it, and marks a write under way.
    fn take(&self, job: Job, lanes: &Lanes) -> Result<(), Job> {
        let mut state = self.state();
        if !state.open {
            return Err(job);
        }
        lanes.touched.store(true, Ordering::Release);
        state.open = false;
        lanes.open.fetch_sub(1, Ordering::AcqRel);
        self.writing.store(true, Ordering::Release);
        state.claimed = false;
        state.direct = Some(Direct {
            job,
            sent: Instant::now(),
        });
        Ok(())
    }

    fn resume_watch(&self, state: &mut LaneState) {
        if std::mem::take(&mut state.paused) {
            self.reader.resume_watch();
        }
    }

    /// Pauses the reactor's watch for the caller of request `id`, if the request is still
    /// in the lane, and marks it read by its caller if `reading`. Returns whether the watch
    /// is paused.
    fn pause_for(&self, id: RequestId, reading: bool) -> bool {
        let mut state = self.state();
        if state.direct.as_ref().is_none_or(|d| d.job.id != id) {
            return false;
        }
        state.claimed |= reading;
        if !state.paused {
            state.paused = self.reader.pause_watch();
        }
        state.paused
    }

    /// The caller of request `id` stopped reading: if the request is still in the lane, the
    /// reactor reads its answer.
    fn let_reactor_read(&self, id: RequestId) {
        let mut state = self.state();
        if state.direct.as_ref().is_some_and(|d| d.job.id == id) {
            state.claimed = false;
            self.resume_watch(&mut state);
        }
    }

    /// The caller of request `id` will not read its answer: lets the reactor read it.
    /// Returns whether the watch had been paused for it.
    fn forgo(&self, id: RequestId) -> bool {
        let mut state = self.state();
        let paused =
            state.paused && !state.claimed && state.direct.as_ref().is_some_and(|d| d.job.id == id);
        if paused {
            self.resume_watch(&mut state);
        }
        paused
    }
}

/// The reactor's watch paused for a caller reading the answer to request `id` (see
/// [`help_wait`]); resumed when dropped, unless the request left the lane already.
struct CallerReads<'a> {
    lane: &'a Lane,
    id: RequestId,
}

impl<'a> CallerReads<'a> {
    fn new(lane: &'a Lane, id: RequestId) -> Self {
        lane.pause_for(id, true);
        CallerReads { lane, id }
    }
}

impl Drop for CallerReads<'_> {
    fn drop(&mut self) {
        self.lane.let_reactor_read(self.id);
    }
}

/// Whether callers read their own answers, and what they tell the scheduler.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirectReads {
    /// Callers blocked in `wait` read their answers ([`help_wait`]). Not in pools that
    /// recycle workers: the scheduler must count every request a worker serves before it
    /// lets the worker take another.
    pub(crate) enabled: bool,
    /// Tell the scheduler each time (elastic pools time how long a worker idles).
    pub(crate) notify: bool,
}

/// The helper of a blocking wait on request `id`, which its caller wrote to `lane`: reads
/// the answer from the worker's socket on the caller's thread (see `reader`), and finishes
/// the request itself while the scheduler has not taken it over. Holds the lanes weakly: a
/// pool that is gone must still be able to drop its requests (and resolve their handles).
pub(crate) fn help_wait(
    lanes: &Weak<Lanes>,
    lane: &Weak<Lane>,
    (id, name): (RequestId, &'static str),
    done: &dyn Fn() -> bool,
    deadline: Option<Instant>,
) {
    let (Some(lanes), Some(lane)) = (lanes.upgrade(), lane.upgrade()) else {
        return;
    };
    lanes.set_pause_at_write(true);
    let reading = CallerReads::new(&lane, id);
    let taken = lane
        .reader
        .read_answer((id, name), done, deadline, || lane.take_back(id, &lanes));
    drop(reading);
    // Otherwise the scheduler settles it (if the answer came, it has it).
    let Some((direct, output)) = taken else {
        return;
    };
    let counter = if output.is_ok() {
        &lanes.direct_completed
    } else {
        &lanes.direct_failed
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let round_trip = u64::try_from(direct.sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
    lane.last_round_trip.store(round_trip, Ordering::Relaxed);
    lanes.fastest.fetch_min(round_trip, Ordering::Relaxed);
    direct.job.finish(Outcome::One(output));
    if lanes.direct_reads.notify {
        lane.reader.notify_direct_done();
    }
}

/// The wait helper of a request a caller wrote to a lane: the first blocking wait on its handle
/// runs it ([`help_wait`]); dropped unused (the handle was polled, queried, detached, dropped
/// or cancelled, or the task finished another way), it lets the reactor read the answer, in
/// case the caller paused the watch as it wrote.
pub(crate) struct WaitHelp {
    lanes: Weak<Lanes>,
    lane: Weak<Lane>,
    id: RequestId,
    name: &'static str,
    ran: bool,
}

impl WaitHelp {
    pub(crate) fn new(
        lanes: Weak<Lanes>,
        lane: Weak<Lane>,
        id: RequestId,
        name: &'static str,
    ) -> Self {
        WaitHelp {
            lanes,
            lane,
            id,
            name,
            ran: false,
        }
    }

    /// Runs [`help_wait`].
    pub(crate) fn run(mut self, done: &dyn Fn() -> bool, deadline: Option<Instant>) {
        self.ran = true;
        help_wait(
            &self.lanes,
            &self.lane,
            (self.id, self.name),
            done,
            deadline,
        );
    }
}

impl Drop for WaitHelp {
    fn drop(&mut self) {
        if self.ran {
            return;
        }
        if let (Some(lanes), Some(lane)) = (self.lanes.upgrade(), self.lane.upgrade()) {
            if lane.forgo(self.id) {
                // Its caller did not come to read: the next caller pauses only once it waits.
                lanes.set_pause_at_write(false);
            }
        }
    }
}

enum Written {
    All,
    Failed,
}

/// How many times a frame waits for room (100 ms each) before the connection is given up on.
const PARTIAL_WAITS: u32 = 10;

/// Writes `frame` to the socket. The descriptor is non-blocking (it is shared with the
/// reactor), and an idle worker's socket has room for a whole [`DIRECT_MAX`] frame; if it has
/// not, the write waits for room in `poll` (the worker is idle, so it is reading), a bounded
/// time.
fn write_all(fd: &OwnedFd, frame: &[u8], fds: &[Fd]) -> Written {
    let mut outgoing = fdpass::Outgoing::new(frame, fds);
    let mut waits = 0;
    while !outgoing.is_done() {
        // Non-blocking; the descriptors go with the first bytes written.
        match outgoing.send_next(fd.as_raw_fd(), libc::MSG_DONTWAIT) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && waits < PARTIAL_WAITS => {
                waits += 1;
                wait_writable(fd);
            }
            Err(_) => return Written::Failed,
        }
    }
    Written::All
}

fn wait_writable(fd: &OwnedFd) {
    let mut fds = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    }];
    // SAFETY: `fds` is a live array of one pollfd struct, and its length is passed. A timeout
    // bounds the wait; the caller's loop retries the write.
    unsafe {
        libc::poll(fds.as_mut_ptr(), 1, 100);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain bookkeeping; a panic elsewhere cannot leave it half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use offload_ipc::protocol::Blob;

    use crate::job::{self, TaskOptions};

    /// A pool's lanes with one lane, over `ours` (the parent's end of a worker connection),
    /// and the reactor's watch on it.
    fn one_lane(ours: &UnixStream) -> (Arc<Lanes>, Arc<Lane>, Arc<crate::watch::ReadWatch>) {
        let lanes = Arc::new(Lanes::new(DirectReads {
            enabled: true,
            notify: false,
        }));
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let decoder = offload_ipc::frame::FrameDecoder::new(1024);
        let watch = Arc::new(crate::watch::ReadWatch::new(ours.as_fd()).unwrap());
        let reader = Arc::new(SharedReader::new(1, watch.clone(), decoder, None, events));
        let lane = Arc::new(Lane::new(ours, reader).unwrap());
        lanes.add(lane.clone());
        // As the reactor does once it waits on the alarm.
        lanes.alarm_watched();
        (lanes, lane, watch)
    }

    /// A lane over a connection on which the worker has written an answer already; the
    /// sockets stay open as long as the first value is held.
    fn answered_lane() -> (
        (UnixStream, UnixStream),
        Arc<Lanes>,
        Arc<Lane>,
        Arc<crate::watch::ReadWatch>,
    ) {
        let (ours, mut worker) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let (lanes, lane, watch) = one_lane(&ours);
        worker.write_all(b"an answer").unwrap();
        ((ours, worker), lanes, lane, watch)
    }

    /// Whether the watch reports bytes within `ms`.
    fn reports(watch: &crate::watch::ReadWatch, ms: i32) -> bool {
        let mut fds = [libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(watch),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: a live array of one pollfd, its length passed.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) == 1 }
    }

    /// A caller that waited for an answer pauses the reactor's watch as it writes its next
    /// request. A handle used any other way (its helper dropped unused) lifts the pause at
    /// once; the alarm lifts it for a handle nobody touches, but not while its caller reads.
    #[test]
    fn a_pause_made_at_the_write_is_lifted_when_nobody_comes_to_read() {
        let (_sockets, lanes, lane, watch) = answered_lane();
        let mut handles = Vec::new();
        let mut send = |id: RequestId| {
            lanes.set_pause_at_write(true);
            lanes.open(&lane);
            let (job, handle) =
                job::one::<u64>(id, "t", Blob::new(vec![]), TaskOptions::new(), || {});
            handles.push(handle);
            match lanes.send(job, b"request", &[]) {
                Ok(Sent::Written(lane)) => lane,
                _ => panic!("the open lane did not take request {id}"),
            }
        };

        let written = send(1);
        assert!(
            !reports(&watch, 50),
            "paused at the write, with bytes waiting"
        );
        drop(WaitHelp::new(Arc::downgrade(&lanes), written, 1, "t"));
        assert!(
            reports(&watch, 0),
            "the helper was dropped: the reactor must read"
        );
        assert!(
            !lanes.pause_at_write.load(Ordering::Relaxed),
            "nobody read: stop pausing early"
        );
        assert!(lanes.close(&lane).is_some());

        send(2);
        assert!(!reports(&watch, 0), "paused at the write");
        lanes.on_alarm();
        assert!(
            !reports(&watch, 0),
            "lifted before anyone had the time to come"
        );
        std::thread::sleep(Alarm::PERIOD);
        lanes.on_alarm();
        assert!(
            reports(&watch, 0),
            "the alarm lifts a pause nobody came for"
        );
        assert!(lanes.close(&lane).is_some());

        send(3);
        lane.pause_for(3, true);
        std::thread::sleep(Alarm::PERIOD);
        lanes.on_alarm();
        assert!(!reports(&watch, 0), "lifted while the caller reads");
        lane.let_reactor_read(3);
        assert!(reports(&watch, 0), "the caller stopped reading");
        assert!(lanes.close(&lane).is_some());

        // A caller that read its answer leaves the watch paused for its next request: until
        // the alarm rings, or the scheduler closes the lane to send the worker work.
        send(4);
        lane.pause_for(4, true);
        assert!(lane.take_back(4, &lanes).is_some());
        assert!(!reports(&watch, 0), "kept paused for the next request");
        lanes.on_alarm();
        assert!(reports(&watch, 0), "still paused after the alarm rang");
        send(5);
        lane.pause_for(5, true);
        assert!(lane.take_back(5, &lanes).is_some());
        assert!(!reports(&watch, 0), "kept paused for the next request");
        assert!(lanes.close(&lane).is_none());
        assert!(
            reports(&watch, 0),
            "the scheduler closed the lane: the reactor must read"
        );
    }

    /// Without an alarm the reactor waits on (none to be had, or it failed), a pause lasts
    /// only while a caller reads: nobody would lift one nobody came for.
    #[test]
    fn without_a_live_alarm_a_pause_lasts_only_while_a_caller_reads() {
        let (_sockets, lanes, lane, watch) = answered_lane();
        lanes.set_pause_at_write(true);
        lanes.open(&lane);
        let (job, _handle) = job::one::<u64>(1, "t", Blob::new(vec![]), TaskOptions::new(), || {});
        assert!(matches!(
            lanes.send(job, b"request", &[]),
            Ok(Sent::Written(_))
        ));
        assert!(!reports(&watch, 0), "paused at the write");

        lanes.alarm_failed();
        assert!(reports(&watch, 0), "the alarm failed: the pause is lifted");
        lanes.set_pause_at_write(true);
        assert!(lanes.close(&lane).is_some());
        lanes.open(&lane);
        let (job, _handle) = job::one::<u64>(2, "t", Blob::new(vec![]), TaskOptions::new(), || {});
        assert!(matches!(
            lanes.send(job, b"request", &[]),
            Ok(Sent::Written(_))
        ));
        assert!(
            reports(&watch, 0),
            "no pause at the write without the alarm"
        );
        lane.pause_for(2, true);
        assert!(!reports(&watch, 0), "paused while the caller reads");
        assert!(lane.take_back(2, &lanes).is_some());
        assert!(
            reports(&watch, 0),
            "not kept paused after the answer without the alarm"
        );
    }

    /// A worker that stops reading keeps a caller's direct write waiting for room; the
    /// reactor's writer, waiting for that write to end, must not stop the reactor thread
    /// (every other worker's I/O runs on it).
    #[test]
    fn waiting_for_a_slow_caller_write_does_not_block_the_reactor() {
        let (ours, _peer_not_reading) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let chunk = [0u8; 4096];
        while (&ours).write(&chunk).is_ok() {}

        let (lanes, lane, _) = one_lane(&ours);
        lanes.open(&lane);
        let (job, _handle) = job::one::<u64>(1, "t", Blob::new(vec![]), TaskOptions::new(), || {});
        let caller = {
            let lanes = lanes.clone();
            std::thread::spawn(move || {
                let frame = vec![0u8; DIRECT_MAX];
                matches!(lanes.send(job, &frame, &[]), Ok(Sent::Broken))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !lane.writing.load(Ordering::Acquire) {
            assert!(
                Instant::now() < deadline,
                "the caller never started its write"
            );
            std::thread::sleep(Duration::from_millis(1));
        }

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let ticks = runtime.block_on(async {
            let ticks = Arc::new(AtomicUsize::new(0));
            let counter = ticks.clone();
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
            let waited = tokio::time::timeout(Duration::from_secs(5), lane.wait_for_caller()).await;
            assert!(waited.is_ok(), "the caller's write did not end within 5 s");
            ticker.abort();
            ticks.load(Ordering::Relaxed)
        });
        // The caller waits ten times 100 ms for room before it gives up on the connection.
        assert!(
            caller.join().unwrap(),
            "the write to a full socket should fail"
        );
        assert!(
            ticks >= 20,
            "the reactor thread ran other work only {ticks} times while it waited ~1 s"
        );
    }
}
