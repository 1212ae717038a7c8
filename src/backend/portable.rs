//! The portable backend: one UDP socket, batched `recvmmsg` for receive and `sendmmsg` for
//! fan-out, where every message of a fan-out points at the same payload bytes (the piece is
//! never copied in user space).
//!
//! Sends use `MSG_DONTWAIT`: a full socket buffer is a counted failure for that one copy, never a
//! stalled loop. Nothing here allocates after construction.

use std::io;
use std::mem::size_of;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::sockaddr;

/// Datagrams received per `recvmmsg` call at most.
pub const RECV_BATCH: usize = 32;
/// Bytes of each receive buffer: more than any valid datagram, so longer ones show as malformed.
pub const RECV_BUF_LEN: usize = 2048;
/// Messages per `sendmmsg` call at most.
pub const SEND_BATCH: usize = 64;

/// A UDP socket for relays, publishers and viewers.
#[derive(Debug)]
pub struct PortableSocket {
    socket: UdpSocket,
}

impl PortableSocket {
    /// Binds a socket with send and receive buffers of about `buffer_bytes` each.
    pub fn bind(addr: SocketAddr, buffer_bytes: usize) -> io::Result<Self> {
        Self::bind_with(addr, buffer_bytes, false)
    }

    /// Binds one of several sockets sharing `addr` with `SO_REUSEPORT`: the kernel spreads
    /// senders over them by a hash of their address, so each sender stays on one socket.
    pub fn bind_shared(addr: SocketAddr, buffer_bytes: usize) -> io::Result<Self> {
        Self::bind_with(addr, buffer_bytes, true)
    }

    fn bind_with(addr: SocketAddr, buffer_bytes: usize, reuse_port: bool) -> io::Result<Self> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        socket.bind(&addr.into())?;
        let socket: UdpSocket = socket.into();
        let s = PortableSocket { socket };
        s.set_buffers(buffer_bytes);
        Ok(s)
    }

    /// Sets SO_RCVBUF and SO_SNDBUF, beyond the system maximum where privileges allow. Failure
    /// leaves the system default, which is smaller but works.
    fn set_buffers(&self, bytes: usize) {
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt_int(self.fd(), force, value).is_err() {
                let _ = setsockopt_int(self.fd(), plain, value);
            }
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The socket as a std socket, for one-off blocking use.
    pub fn as_std(&self) -> &UdpSocket {
        &self.socket
    }

    /// The file descriptor, for `poll` sets.
    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Waits until a datagram can be read or `timeout` passes; true if readable.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: pfd is a valid pollfd for the duration of the call and nfds is 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        match r {
            r if r < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
            0 => Ok(false),
            _ => Ok(true),
        }
    }

    /// Receives up to [`RECV_BATCH`] waiting datagrams without blocking; returns how many.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.prepare();
        // SAFETY: every header points at buffers, iovecs and address slots owned by `batch`,
        // which outlives the call and is not moved during it; vlen matches the arrays' length.
        let n = unsafe {
            libc::recvmmsg(
                self.fd(),
                batch.hdrs.as_mut_ptr(),
                batch.active as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        batch.count = n as usize;
        Ok(batch.count)
    }

    /// Sends one datagram without blocking.
    pub fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        let mut storage = sockaddr::zeroed();
        let len = sockaddr::write(&to, &mut storage);
        // SAFETY: the data pointer and length describe `datagram`; storage holds `len` valid
        // address bytes; both outlive the call.
        let r = unsafe {
            libc::sendto(
                self.fd(),
                datagram.as_ptr().cast(),
                datagram.len(),
                libc::MSG_DONTWAIT,
                (&storage as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends the same `datagram` to every address in `dests`, in batches of [`SEND_BATCH`].
    pub fn send_fanout(
        &self,
        datagram: &[u8],
        dests: &[SocketAddr],
        batch: &mut SendBatch,
    ) -> FanoutResult {
        self.send_fanout_with(datagram, dests, batch, |_| {})
    }

    /// Like [`PortableSocket::send_fanout`], calling `on_fail` with each destination whose copy
    /// the kernel refused.
    pub fn send_fanout_with(
        &self,
        datagram: &[u8],
        dests: &[SocketAddr],
        batch: &mut SendBatch,
        mut on_fail: impl FnMut(&SocketAddr),
    ) -> FanoutResult {
        let mut result = FanoutResult::default();
        for chunk in dests.chunks(SEND_BATCH) {
            batch.prepare(datagram, chunk);
            let mut start = 0;
            while start < chunk.len() {
                // SAFETY: headers [start, len) point at batch.addrs and batch.iov, which hold
                // valid addresses and a iovec over `datagram`; all outlive the call and the
                // kernel only reads them.
                let r = unsafe {
                    libc::sendmmsg(
                        self.fd(),
                        batch.hdrs.as_mut_ptr().add(start),
                        (chunk.len() - start) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r > 0 {
                    result.sent += r as usize;
                    start += r as usize;
                } else {
                    // The message at `start` failed (full buffer, unreachable): skip it.
                    on_fail(&chunk[start]);
                    result.failed += 1;
                    start += 1;
                }
            }
        }
        result
    }
}

fn setsockopt_int(fd: RawFd, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: value is a c_int that lives across the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Outcome of a fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FanoutResult {
    /// Copies the kernel accepted.
    pub sent: usize,
    /// Copies refused (counted as drops for those subscribers).
    pub failed: usize,
}

/// Buffers and kernel headers for one `recvmmsg` call, allocated once. By default it receives
/// into its own buffers; an engine can point each slot at memory of its own (a buffer pool) with
/// [`RecvBatch::set_buffer`] so that datagrams land where they will be sent from.
pub struct RecvBatch {
    own: Vec<[u8; RECV_BUF_LEN]>,
    bufs: [(*mut u8, usize); RECV_BATCH],
    active: usize,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    count: usize,
}

// SAFETY: the raw pointers point into this batch's own buffers, or into memory the caller
// promised (set_buffer) stays valid; they are rebuilt before every use. Moving the batch to
// another thread is sound.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// An empty batch of [`RECV_BATCH`] buffers of its own.
    pub fn new() -> Self {
        let mut own = vec![[0u8; RECV_BUF_LEN]; RECV_BATCH];
        let mut bufs = [(std::ptr::null_mut(), 0); RECV_BATCH];
        for (b, o) in bufs.iter_mut().zip(own.iter_mut()) {
            *b = (o.as_mut_ptr(), RECV_BUF_LEN);
        }
        RecvBatch {
            own,
            bufs,
            active: RECV_BATCH,
            addrs: vec![sockaddr::zeroed(); RECV_BATCH],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                RECV_BATCH
            ],
            // SAFETY: mmsghdr is plain old data; zero is a valid empty header.
            hdrs: vec![unsafe { std::mem::zeroed() }; RECV_BATCH],
            count: 0,
        }
    }

    /// Points slot `i` at `len` bytes of caller memory for the following receives.
    ///
    /// # Safety
    /// `ptr` must be valid for writes of `len` bytes, and not accessed otherwise, from now until
    /// the slot is pointed elsewhere or [`RecvBatch::reset_buffers`] is called, and its data is
    /// read back only through [`RecvBatch::get`] after a receive.
    pub unsafe fn set_buffer(&mut self, i: usize, ptr: *mut u8, len: usize) {
        self.bufs[i] = (ptr, len);
    }

    /// Points slot `i` back at the batch's own buffer and forgets its datagram: call it before
    /// the caller's memory behind slot `i` is handed on.
    pub fn detach(&mut self, i: usize) {
        self.bufs[i] = (self.own[i].as_mut_ptr(), RECV_BUF_LEN);
        self.hdrs[i].msg_len = 0;
    }

    /// Points every slot back at the batch's own buffers.
    pub fn reset_buffers(&mut self) {
        for (b, o) in self.bufs.iter_mut().zip(self.own.iter_mut()) {
            *b = (o.as_mut_ptr(), RECV_BUF_LEN);
        }
    }

    /// Receive into the first `n` slots only (at most [`RECV_BATCH`]).
    pub fn set_active(&mut self, n: usize) {
        self.active = n.min(RECV_BATCH);
    }

    fn prepare(&mut self) {
        self.count = 0;
        for i in 0..self.active {
            let (ptr, len) = self.bufs[i];
            self.iovs[i] = libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            };
        }
        let iovs = self.iovs.as_mut_ptr();
        let addrs = self.addrs.as_mut_ptr();
        for (i, h) in self.hdrs.iter_mut().enumerate().take(self.active) {
            // SAFETY (pointer arithmetic): i < RECV_BATCH, the length of both vectors.
            h.msg_hdr.msg_name = unsafe { addrs.add(i) }.cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = unsafe { iovs.add(i) };
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
    }

    /// Datagrams in the batch after the last receive.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the last receive got nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Datagram `i`: its source (`None` for an unknown address family) and bytes. A datagram
    /// longer than its buffer arrives cut short and fails to parse.
    pub fn get(&self, i: usize) -> (Option<SocketAddr>, &[u8]) {
        debug_assert!(i < self.count, "datagram {i} of a batch of {}", self.count);
        let h = &self.hdrs[i];
        let (ptr, cap) = self.bufs[i];
        let len = (h.msg_len as usize).min(cap);
        // SAFETY: the kernel wrote msg_len (≤ cap) bytes at ptr in the last receive, and ptr is
        // valid for cap bytes (own buffer, or the set_buffer contract).
        let data = unsafe { std::slice::from_raw_parts(ptr, len) };
        (sockaddr::read(&self.addrs[i], h.msg_hdr.msg_namelen), data)
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// Kernel headers for one `sendmmsg` fan-out, allocated once.
pub struct SendBatch {
    addrs: Vec<libc::sockaddr_storage>,
    iov: Box<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: as for RecvBatch: the raw pointers point into this batch (or at the caller's
// datagram during a call) and are rebuilt before every use.
unsafe impl Send for SendBatch {}

impl SendBatch {
    /// Headers for up to [`SEND_BATCH`] messages.
    pub fn new() -> Self {
        SendBatch {
            addrs: vec![sockaddr::zeroed(); SEND_BATCH],
            iov: Box::new(libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }),
            // SAFETY: mmsghdr is plain old data; zero is a valid empty header.
            hdrs: vec![unsafe { std::mem::zeroed() }; SEND_BATCH],
        }
    }

    /// Points every header at the one iovec over `datagram`, each with its own destination.
    fn prepare(&mut self, datagram: &[u8], dests: &[SocketAddr]) {
        *self.iov = libc::iovec {
            iov_base: datagram.as_ptr() as *mut libc::c_void,
            iov_len: datagram.len(),
        };
        let iov: *mut libc::iovec = &mut *self.iov;
        for (i, dest) in dests.iter().enumerate() {
            let namelen = sockaddr::write(dest, &mut self.addrs[i]);
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = namelen;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
    }
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> PortableSocket {
        PortableSocket::bind("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap()
    }

    #[test]
    fn fanout_reaches_every_destination_with_the_same_bytes() {
        let sender = loopback();
        let receivers: Vec<PortableSocket> = (0..100).map(|_| loopback()).collect();
        let dests: Vec<SocketAddr> = receivers.iter().map(|r| r.local_addr().unwrap()).collect();
        let mut batch = SendBatch::new();
        let r = sender.send_fanout(b"piece bytes", &dests, &mut batch);
        assert_eq!(
            r,
            FanoutResult {
                sent: 100,
                failed: 0
            }
        );
        let mut rb = RecvBatch::new();
        for r in &receivers {
            assert!(r.wait_readable(Duration::from_secs(2)).unwrap());
            assert_eq!(r.recv_batch(&mut rb).unwrap(), 1);
            let (from, bytes) = rb.get(0);
            assert_eq!(from, Some(sender.local_addr().unwrap()));
            assert_eq!(bytes, b"piece bytes");
        }
    }

    #[test]
    fn recv_batch_takes_many_and_cuts_oversized() {
        let a = loopback();
        let b = loopback();
        let to = b.local_addr().unwrap();
        for i in 0..5u8 {
            a.send_to(&[i; 10], to).unwrap();
        }
        a.send_to(&[9; 3000], to).unwrap();
        let mut rb = RecvBatch::new();
        let mut got = Vec::new();
        while got.len() < 6 && b.wait_readable(Duration::from_secs(2)).unwrap() {
            let n = b.recv_batch(&mut rb).unwrap();
            got.extend((0..n).map(|i| rb.get(i).1.to_vec()));
        }
        assert_eq!(got.len(), 6);
        assert_eq!(got[4], vec![4u8; 10]);
        assert_eq!(got[5].len(), RECV_BUF_LEN);
        assert_eq!(b.recv_batch(&mut rb).unwrap(), 0);
    }
}
