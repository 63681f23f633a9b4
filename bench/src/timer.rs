//! A sleep with microsecond precision for the injectors.
//!
//! tokio's timer ticks once a millisecond and fires at the first tick after
//! the deadline, so an injector sleeping with it sends each call up to a
//! millisecond late, in bursts of every call due in that tick. Latency is
//! measured from the *scheduled* send, so that lateness would be reported as
//! the server's. A `timerfd` armed with the exact deadline and awaited
//! through the runtime's reactor wakes within the kernel's timer slack
//! (~50 µs) without blocking the generator's thread.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Instant;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;

struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// One precise timer; awaits one deadline at a time.
pub(crate) struct Timer {
    fd: AsyncFd<Fd>,
}

impl Timer {
    /// A monotonic, non-blocking timerfd registered with the current runtime.
    pub(crate) fn new() -> io::Result<Timer> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // Deprecated because the registered fd could be one the caller closes
        // while registered; `Fd` owns its TimerFd, so the fd lives exactly as
        // long as the registration (the safe-by-construction case).
        #[allow(deprecated)]
        let fd = AsyncFd::new(Fd(fd))?;
        Ok(Timer { fd })
    }

    /// Returns at `deadline` (at once if it passed).
    pub(crate) async fn until(&self, deadline: Instant) -> io::Result<()> {
        let now = Instant::now();
        if deadline <= now {
            return Ok(());
        }
        let wait = TimeSpec::from_duration(deadline - now);
        self.fd
            .get_ref()
            .0
            .set(Expiration::OneShot(wait), TimerSetTimeFlags::empty())?;
        loop {
            let mut ready = self.fd.readable().await?;
            // Non-blocking: EAGAIN until the timer expired, then the count.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn never_wakes_before_the_deadline() {
        let timer = Timer::new().unwrap();
        let mut late = Vec::new();
        for _ in 0..20 {
            let deadline = Instant::now() + Duration::from_micros(300);
            timer.until(deadline).await.unwrap();
            let now = Instant::now();
            assert!(now >= deadline, "woke early");
            late.push(now - deadline);
        }
        late.sort();
        // A figure, not a check: tokio's timer is late by up to a 1 ms tick.
        println!("median lateness {:?}", late[10]);
    }
}
