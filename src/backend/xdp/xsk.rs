//! Thin AF_XDP socket bindings over the `libc` crate: a UMEM of fixed frames and its four
//! rings (fill, completion, RX, TX), mapped from the kernel. One socket is used by one worker
//! thread only; nothing here locks.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};

/// Bytes per UMEM frame (the kernel accepts 2048 or 4096 in aligned mode).
pub(crate) const FRAME_SIZE: u32 = 2048;

/// How the socket moves packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum XskMode {
    /// The kernel copies between its buffers and the UMEM (any driver, veth included).
    Copy,
    /// The NIC DMAs straight into the UMEM (drivers with AF_XDP zero-copy support).
    ZeroCopy,
}

/// What to bind.
#[derive(Debug, Clone, Copy)]
pub(crate) struct XskConfig {
    pub(crate) ifindex: u32,
    pub(crate) queue: u32,
    /// Frames in the UMEM.
    pub(crate) frames: u32,
    /// Entries per ring (a power of two).
    pub(crate) ring: u32,
    pub(crate) mode: XskMode,
    /// Multi-buffer packets (`XDP_USE_SG`).
    pub(crate) multi_buffer: bool,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// One ring shared with the kernel: entries of `T` (`u64` frame addresses for fill and
/// completion, `xdp_desc` for RX and TX) between a producer and a consumer index.
struct Ring<T> {
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    entries: NonNull<T>,
    size: u32,
    /// Our side's index: the producer index on rings we fill, the consumer index on rings we
    /// drain. Published to the kernel by `publish` / `release`.
    local: u32,
    /// The other side's index as last read.
    cached: u32,
    map: NonNull<libc::c_void>,
    map_len: usize,
}

impl<T: Copy> Ring<T> {
    /// Maps the ring at page offset `pgoff` of socket `fd`.
    fn map(fd: RawFd, off: &libc::xdp_ring_offset, size: u32, pgoff: u64) -> io::Result<Self> {
        let map_len = off.desc as usize + size as usize * size_of::<T>();
        // SAFETY: a fresh shared mapping of the ring the kernel set up for this socket; the
        // kernel validates the offset and length.
        let map = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff as libc::off_t,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = map.cast::<u8>();
        // SAFETY: the kernel's offsets lie inside the mapping it just gave us (map_len covers
        // the descriptors, which come last), and mmap never returns null on success.
        let at = |o: u64| unsafe { NonNull::new_unchecked(base.add(o as usize)) };
        Ok(Ring {
            producer: at(off.producer).cast(),
            consumer: at(off.consumer).cast(),
            flags: at(off.flags).cast(),
            entries: at(off.desc).cast(),
            size,
            local: 0,
            cached: 0,
            // SAFETY: checked against MAP_FAILED above; mmap does not return null.
            map: unsafe { NonNull::new_unchecked(map) },
            map_len,
        })
    }

    fn index(&self, which: NonNull<AtomicU32>) -> u32 {
        // SAFETY: the index lives in the mapping for the ring's lifetime and is only accessed
        // atomically, by us and by the kernel.
        unsafe { which.as_ref() }.load(Ordering::Acquire)
    }

    fn set_index(&self, which: NonNull<AtomicU32>, v: u32) {
        // SAFETY: as in `index`.
        unsafe { which.as_ref() }.store(v, Ordering::Release);
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as in `index`.
        unsafe { self.flags.as_ref() }.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    // Producer side (fill, TX).

    /// Entries we may write before the kernel consumes more.
    fn room(&mut self) -> u32 {
        self.cached = self.index(self.consumer);
        self.size - self.local.wrapping_sub(self.cached)
    }

    /// Writes one entry; the caller checked `room`.
    fn push(&mut self, v: T) {
        debug_assert!(self.local.wrapping_sub(self.cached) < self.size);
        let i = (self.local & (self.size - 1)) as usize;
        // SAFETY: `i` < size, inside the entry array; the slot is ours until published.
        unsafe { self.entries.as_ptr().add(i).write(v) };
        self.local = self.local.wrapping_add(1);
    }

    /// Hands the entries written so far to the kernel.
    fn publish(&self) {
        self.set_index(self.producer, self.local);
    }

    // Consumer side (RX, completion).

    /// Entries ready to read.
    fn ready(&mut self) -> u32 {
        self.cached = self.index(self.producer);
        self.cached.wrapping_sub(self.local)
    }

    /// The `k`th ready entry; the caller checked `ready`.
    fn peek(&self, k: u32) -> T {
        let i = (self.local.wrapping_add(k) & (self.size - 1)) as usize;
        // SAFETY: `i` < size; the kernel published this entry (producer index past it).
        unsafe { self.entries.as_ptr().add(i).read() }
    }

    /// Gives `n` read entries back to the kernel.
    fn release(&mut self, n: u32) {
        self.local = self.local.wrapping_add(n);
        self.set_index(self.consumer, self.local);
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; nothing borrows it past the ring.
        unsafe { libc::munmap(self.map.as_ptr(), self.map_len) };
    }
}

/// An AF_XDP socket bound to one queue of one interface, with its own UMEM.
pub(crate) struct XskSocket {
    // Field order is drop order: rings and socket go before the UMEM they point into.
    fill: Ring<u64>,
    completion: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    tx: Ring<libc::xdp_desc>,
    fd: OwnedFd,
    umem: Umem,
    mode: XskMode,
}

// SAFETY: the socket owns its mappings; it is moved to a worker thread once and used only there.
unsafe impl Send for XskSocket {}

/// An anonymous mapping registered as the socket's packet memory.
struct Umem {
    area: NonNull<u8>,
    len: usize,
}

impl Umem {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping, owned by the Umem.
        let area = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if area == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Umem {
            // SAFETY: not MAP_FAILED, and mmap does not return null.
            area: unsafe { NonNull::new_unchecked(area.cast()) },
            len,
        })
    }
}

impl Drop for Umem {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the socket that used it was closed first (field order).
        unsafe { libc::munmap(self.area.as_ptr().cast(), self.len) };
    }
}

fn set_option<T>(fd: RawFd, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size passed.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_XDP,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

impl XskSocket {
    /// Creates the socket, registers a UMEM of `config.frames` frames, maps the rings and binds
    /// to the queue.
    pub(crate) fn bind(config: &XskConfig) -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd =
            check(unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        let umem = Umem::new(config.frames as usize * FRAME_SIZE as usize)?;
        // SAFETY: xdp_umem_reg is plain old data; zero is valid for every field.
        let mut reg: libc::xdp_umem_reg = unsafe { zeroed() };
        reg.addr = umem.area.as_ptr() as u64;
        reg.len = umem.len as u64;
        reg.chunk_size = FRAME_SIZE;
        set_option(raw, libc::XDP_UMEM_REG, &reg)?;
        for opt in [
            libc::XDP_UMEM_FILL_RING,
            libc::XDP_UMEM_COMPLETION_RING,
            libc::XDP_RX_RING,
            libc::XDP_TX_RING,
        ] {
            set_option(raw, opt, &config.ring)?;
        }
        // SAFETY: plain old data, filled by the kernel.
        let mut off: libc::xdp_mmap_offsets = unsafe { zeroed() };
        let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: `off` and `len` are live and sized as the call expects.
        check(unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                (&mut off as *mut libc::xdp_mmap_offsets).cast(),
                &mut len,
            )
        })?;
        let fill = Ring::map(raw, &off.fr, config.ring, libc::XDP_UMEM_PGOFF_FILL_RING)?;
        let completion = Ring::map(
            raw,
            &off.cr,
            config.ring,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
        )?;
        let rx = Ring::map(raw, &off.rx, config.ring, libc::XDP_PGOFF_RX_RING as u64)?;
        let tx = Ring::map(raw, &off.tx, config.ring, libc::XDP_PGOFF_TX_RING as u64)?;

        // SAFETY: plain old data.
        let mut addr: libc::sockaddr_xdp = unsafe { zeroed() };
        addr.sxdp_family = libc::AF_XDP as u16;
        addr.sxdp_ifindex = config.ifindex;
        addr.sxdp_queue_id = config.queue;
        addr.sxdp_flags = libc::XDP_USE_NEED_WAKEUP
            | match config.mode {
                XskMode::Copy => libc::XDP_COPY,
                XskMode::ZeroCopy => libc::XDP_ZEROCOPY,
            }
            | if config.multi_buffer {
                libc::XDP_USE_SG
            } else {
                0
            };
        // A queue whose previous socket is still being torn down answers EBUSY for a moment.
        let mut tries = 0;
        loop {
            // SAFETY: `addr` is a live sockaddr_xdp of the size passed.
            let r = unsafe {
                libc::bind(
                    raw,
                    (&addr as *const libc::sockaddr_xdp).cast(),
                    size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
                )
            };
            match check(r) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(XskSocket {
            fill,
            completion,
            rx,
            tx,
            fd,
            umem,
            mode: config.mode,
        })
    }

    /// The socket, for the XSKMAP and for poll.
    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// How the socket was bound.
    pub(crate) fn mode(&self) -> XskMode {
        self.mode
    }

    /// The bytes of frame `addr` (a UMEM offset), `len` long.
    pub(crate) fn frame(&self, addr: u64, len: usize) -> &[u8] {
        let start = (addr as usize).min(self.umem.len);
        let len = len.min(self.umem.len - start);
        // SAFETY: clamped to the UMEM, which lives as long as `self`; the kernel writes a frame
        // only while it owns it (on the fill ring), never while we read it off the RX ring.
        unsafe { std::slice::from_raw_parts(self.umem.area.as_ptr().add(start), len) }
    }

    /// Frame `addr` to write into (the whole frame).
    pub(crate) fn frame_mut(&mut self, addr: u64) -> &mut [u8] {
        let start = (addr as usize).min(self.umem.len);
        let len = (FRAME_SIZE as usize).min(self.umem.len - start);
        // SAFETY: clamped to the UMEM; `&mut self` makes this the only view, and a frame we
        // write is one we own (not on the fill or TX ring).
        unsafe { std::slice::from_raw_parts_mut(self.umem.area.as_ptr().add(start), len) }
    }

    /// Gives free frames to the kernel to receive into; how many were taken.
    pub(crate) fn fill(&mut self, frames: &mut Vec<u64>) -> usize {
        let n = (self.fill.room() as usize).min(frames.len());
        for _ in 0..n {
            if let Some(addr) = frames.pop() {
                self.fill.push(addr);
            }
        }
        if n > 0 {
            self.fill.publish();
        }
        n
    }

    /// Takes up to `max` received descriptors: (frame address, length, more fragments follow).
    pub(crate) fn receive(&mut self, max: usize, out: &mut Vec<(u64, u32, bool)>) -> usize {
        let n = (self.rx.ready() as usize).min(max);
        for k in 0..n {
            let d = self.rx.peek(k as u32);
            out.push((d.addr, d.len, d.options & libc::XDP_PKT_CONTD != 0));
        }
        if n > 0 {
            self.rx.release(n as u32);
        }
        n
    }

    /// Free TX ring entries.
    pub(crate) fn tx_room(&mut self) -> u32 {
        self.tx.room()
    }

    /// Queues one TX descriptor; `more` marks a fragment followed by another of the same
    /// packet. The caller checked `tx_room`.
    pub(crate) fn queue(&mut self, addr: u64, len: u32, more: bool) {
        self.tx.push(libc::xdp_desc {
            addr,
            len,
            options: if more { libc::XDP_PKT_CONTD } else { 0 },
        });
    }

    /// Publishes queued descriptors and asks the kernel to send them (in copy mode the kernel
    /// sends only inside this call, a bounded number per call).
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        self.tx.publish();
        if self.mode == XskMode::ZeroCopy && !self.tx.needs_wakeup() {
            return Ok(());
        }
        // SAFETY: a zero-length sendto on our own socket only kicks the TX ring.
        let r = unsafe {
            libc::sendto(
                self.fd(),
                ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                ptr::null(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Busy or out of buffers: the descriptors stay queued for the next kick.
                Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS) => Ok(()),
                _ => Err(e),
            };
        }
        Ok(())
    }

    /// Asks the kernel to refill receive buffers from the fill ring (the RX wakeup).
    pub(crate) fn kick_rx(&self) {
        // SAFETY: a zero-length non-blocking recvfrom on our own socket only wakes the driver.
        unsafe {
            libc::recvfrom(
                self.fd(),
                ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
    }

    /// Whether the TX ring still holds descriptors the kernel has not taken.
    pub(crate) fn tx_pending(&mut self) -> bool {
        self.tx.room() < self.tx.size
    }

    /// Frames whose transmission completed, appended to `out`.
    pub(crate) fn completed(&mut self, out: &mut Vec<u64>) -> usize {
        let n = self.completion.ready();
        for k in 0..n {
            out.push(self.completion.peek(k));
        }
        if n > 0 {
            self.completion.release(n);
        }
        n as usize
    }

    /// Whether the kernel wants a wakeup to refill from the fill ring.
    pub(crate) fn fill_needs_wakeup(&self) -> bool {
        self.fill.needs_wakeup()
    }
}
