//! A one-shot timer that a caller arms without waking anyone, and that wakes the reactor
//! when it rings: a `timerfd` the reactor watches.
//!
//! A caller that writes its request to a worker itself pauses the reactor's watch on that
//! socket at once, expecting to block in `wait` and read the answer itself (see `lane`). A
//! caller that never does would leave the answer unread; the alarm bounds that: when it
//! rings, the reactor resumes every watch paused for a request nobody has come to read.
//! Arming it is one system call, made only when it is not armed already, so a loop of round
//! trips arms it about once per [`Alarm::PERIOD`]. (tokio's own timers cannot be armed from
//! another thread without waking the reactor, which is the wake-up the pause saves.)

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The pool's alarm.
pub(crate) struct Alarm {
    timer: OwnedFd,
    /// Set while the timer runs: callers then leave it alone.
    armed: AtomicBool,
}

impl Alarm {
    /// How long after it is armed the alarm rings.
    pub(crate) const PERIOD: Duration = Duration::from_millis(1);

    pub(crate) fn new() -> std::io::Result<Self> {
        // SAFETY: plain system call with flags; the result is checked before use.
        let timer = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if timer < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Alarm {
            // SAFETY: `timer` is a new descriptor nobody else owns.
            timer: unsafe { OwnedFd::from_raw_fd(timer) },
            armed: AtomicBool::new(false),
        })
    }

    /// Makes the alarm ring [`Alarm::PERIOD`] from now, unless it is armed already. False
    /// when it will not ring: the timer could not be set.
    pub(crate) fn arm(&self) -> bool {
        if self.armed.swap(true, Ordering::AcqRel) {
            return true;
        }
        let period = libc::timespec {
            tv_sec: Self::PERIOD
                .as_secs()
                .try_into()
                .unwrap_or(libc::time_t::MAX),
            tv_nsec: Self::PERIOD.subsec_nanos().into(),
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: period,
        };
        // SAFETY: `timer` is open for as long as `self` is; `spec` is a live itimerspec the
        // kernel only reads, and the old value is not asked for.
        let set = unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        };
        if set < 0 {
            // Cannot happen with a valid descriptor and value.
            self.armed.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// For the reactor: the alarm's descriptor, to wait on with [`Alarm::rung`].
    pub(crate) fn watch(&self) -> std::io::Result<AsyncFd<OwnedFd>> {
        let timer = self.timer.try_clone()?;
        // SAFETY: the `AsyncFd` owns the duplicate, which stays open until it drops it, after
        // deregistering.
        unsafe { AsyncFd::register_with_interest(timer, Interest::READABLE) }
            .map_err(std::io::Error::from)
    }

    /// Waits until the alarm rings, then lets callers arm it again.
    pub(crate) async fn rung(&self, watch: &AsyncFd<OwnedFd>) -> std::io::Result<()> {
        loop {
            let mut ready = watch.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live 8-byte buffer from an open descriptor.
            let read = unsafe {
                libc::read(
                    watch.as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            if read == 8 {
                // Not readable again before it is armed and rings again: a new edge.
                ready.clear_ready();
                self.armed.store(false, Ordering::Release);
                return Ok(());
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::WouldBlock {
                return Err(error);
            }
            ready.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn the_alarm_rings_once_per_arming_and_can_be_armed_again() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let alarm = Alarm::new().unwrap();
            let watch = alarm.watch().unwrap();
            for _ in 0..3 {
                let start = Instant::now();
                assert!(alarm.arm());
                assert!(alarm.arm(), "armed already: it rings (no second timer)");
                let rang = tokio::time::timeout(Duration::from_secs(5), alarm.rung(&watch)).await;
                assert!(
                    matches!(rang, Ok(Ok(()))),
                    "the alarm did not ring within 5 s"
                );
                assert!(start.elapsed() >= Alarm::PERIOD);
            }
            // Not armed: it does not ring.
            let rang = tokio::time::timeout(Duration::from_millis(20), alarm.rung(&watch)).await;
            assert!(rang.is_err(), "an alarm nobody armed rang");
        });
    }
}
