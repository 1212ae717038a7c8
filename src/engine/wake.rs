//! Waking a worker that sleeps in `poll` when another worker hands it a piece: an eventfd in its
//! poll set, written only when the sleeper has said it is asleep.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// One worker's doorbell.
#[derive(Debug)]
pub(super) struct Waker {
    fd: OwnedFd,
    sleeping: AtomicBool,
}

impl Waker {
    /// A new doorbell.
    pub(super) fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no pointer arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            // SAFETY: fd is a fresh descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
        })
    }

    /// The descriptor to poll for readability.
    pub(super) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Called by the owner before it sleeps; it must then re-check its queue before polling.
    pub(super) fn set_sleeping(&self, sleeping: bool) {
        self.sleeping.store(sleeping, Ordering::SeqCst);
    }

    /// Called by a sender after queueing work: rings the bell if the owner may be asleep.
    pub(super) fn wake(&self) {
        // Pairs with the fence in the sleeper: the queued hand-off is visible before we look.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A failure (counter
            // saturated) still leaves the fd readable, which is all we need.
            let _ = unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Clears the bell after waking.
    pub(super) fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN when not rung is fine.
        let _ = unsafe { libc::read(self.fd(), (&mut v as *mut u64).cast(), 8) };
    }
}
