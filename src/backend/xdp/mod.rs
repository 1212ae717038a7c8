//! The AF_XDP backend: datagrams for the relay's port skip the kernel's UDP stack.
//!
//! An XDP program ([`program`]) redirects them into one AF_XDP socket per worker ([`xsk`]),
//! bound to the worker's receive queue. A worker copies each datagram's payload out of its
//! UMEM frame into a pool slot (so pieces travel between workers exactly as on the other
//! backends) and gives the frame back to the kernel. To fan a piece out it writes, per
//! subscriber, Ethernet/IPv4/UDP headers ([`frame`]) for that subscriber in front of the
//! payload and queues the frame on the TX ring:
//!
//! - **copy** (default on copy-mode sockets, e.g. veth): headers and payload in one frame per
//!   copy. The kernel copies every frame once anyway in copy mode, and this measured faster
//!   than multi-buffer there.
//! - **multi-buffer** (`XDP_USE_SG`): the payload is written once into a shared frame, and each
//!   copy is a 42-byte header frame plus that payload frame, sent as one two-descriptor packet;
//!   the payload frame's reference count is released as completions come back.
//!
//! The next hop's MAC is the one the subscriber's own datagrams arrived from (the subscriber on
//! the link, else its router), or the kernel's neighbour table (`/proc/net/arp`). A destination
//! with neither, or not IPv4, is sent through the ordinary socket instead (counted).

pub mod frame;
mod program;
pub(crate) mod xsk;

pub use program::{AttachMode, XdpProgram};

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use frame::{Endpoint, Mac, HEADERS_LEN};
use xsk::{XskConfig, XskMode, XskSocket, FRAME_SIZE};

/// Why the XDP backend cannot run.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// The interface does not exist.
    #[error("no network interface named {0:?}")]
    NoInterface(String),
    /// The interface has no IPv4 address to send from.
    #[error("interface {0} has no IPv4 address (the xdp backend sends IPv4)")]
    NoIpv4(String),
    /// Not allowed.
    #[error(
        "{what} needs CAP_BPF and CAP_NET_ADMIN (or root), and AF_XDP needs CAP_NET_RAW; \
         run with those capabilities or use --backend uring"
    )]
    Privilege {
        /// What was refused.
        what: &'static str,
    },
    /// The object could not be loaded.
    #[error("cannot load the XDP program: {0}; use --backend uring")]
    Load(String),
    /// The interface refused the program.
    #[error("cannot attach the XDP program to {interface} in {mode} mode: {reason}; try --xdp-mode generic or --backend uring")]
    Attach {
        /// The interface.
        interface: String,
        /// native or generic.
        mode: &'static str,
        /// The kernel's answer.
        reason: String,
    },
    /// An AF_XDP socket could not be set up.
    #[error("cannot bind an AF_XDP socket to {interface} queue {queue} ({mode}): {source}")]
    Socket {
        /// The interface.
        interface: String,
        /// The queue.
        queue: u32,
        /// copy or zero-copy.
        mode: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
}

/// What the relay needs to know about its interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its index.
    pub index: u32,
    /// Its MAC address.
    pub mac: Mac,
    /// Its first IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Receive queues (one AF_XDP socket each).
    pub rx_queues: u32,
}

impl Interface {
    /// Looks up `name` in this network namespace.
    pub fn lookup(name: &str) -> Result<Self, XdpError> {
        let c_name =
            std::ffi::CString::new(name).map_err(|_| XdpError::NoInterface(name.into()))?;
        // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        if index == 0 {
            return Err(XdpError::NoInterface(name.into()));
        }
        let sys = format!("/sys/class/net/{name}");
        let mac = std::fs::read_to_string(format!("{sys}/address"))
            .ok()
            .and_then(|t| parse_mac(t.trim()))
            .ok_or_else(|| XdpError::NoInterface(name.into()))?;
        let rx_queues = std::fs::read_dir(format!("{sys}/queues"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                    .count() as u32
            })
            .unwrap_or(1)
            .max(1);
        let ipv4 = interface_ipv4(name).ok_or_else(|| XdpError::NoIpv4(name.into()))?;
        Ok(Interface {
            name: name.into(),
            index,
            mac,
            ipv4,
            rx_queues,
        })
    }
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The first IPv4 address of interface `name`.
fn interface_ipv4(name: &str) -> Option<Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let ifa_name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: ifa_addr is non-null and points at a sockaddr of its family.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if ifa_name.to_bytes() == name.as_bytes() && i32::from(family) == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
            found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            break;
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// IPv4 neighbours (complete entries) from `/proc/net/arp` text, for `device`.
pub fn parse_arp(text: &str, device: &str) -> Vec<(Ipv4Addr, Mac)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (ip, flags, mac, dev) = (f.first()?, f.get(2)?, f.get(3)?, f.get(5)?);
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
            (flags & 0x2 != 0 && *dev == device)
                .then(|| Some((ip.parse().ok()?, parse_mac(mac)?)))?
        })
        .collect()
}

/// How fan-out copies are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxMode {
    /// Headers and payload copied into one frame per subscriber.
    Copy,
    /// A header frame per subscriber plus one shared payload frame (`XDP_USE_SG`).
    MultiBuffer,
}

impl TxMode {
    /// The name shown in logs and `clubcast_build_info`.
    pub fn name(self) -> &'static str {
        match self {
            TxMode::Copy => "copy",
            TxMode::MultiBuffer => "multi-buffer",
        }
    }
}

/// One worker's AF_XDP datapath.
pub(crate) struct XdpIo {
    socket: XskSocket,
    tx_mode: TxMode,
    local: Endpoint,
    interface: String,
    /// Frames the kernel may receive into, waiting for room on the fill ring.
    rx_free: Vec<u64>,
    /// Frames free for sending.
    tx_free: Vec<u64>,
    /// Outstanding TX descriptors per frame (by frame number); the frame is free at zero.
    tx_refs: Vec<u32>,
    /// Next hop for each IPv4 destination.
    next_hop: HashMap<Ipv4Addr, Mac>,
    /// Received descriptors of the current poll.
    descs: Vec<(u64, u32, bool)>,
    /// Inside a multi-fragment packet (its fragments may span polls).
    in_packet: bool,
    completions: Vec<u64>,
}

/// Entries per ring.
const RING: u32 = 2048;
/// TX kicks per flush at most (copy mode sends ~32 descriptors per kick).
const MAX_KICKS: usize = 256;
/// Next hops remembered (a fixed allocation: learning never allocates on the packet path).
const MAX_NEXT_HOPS: usize = 65_536;
/// UMEM frames: one ring's worth for receiving, the rest for sending.
const FRAMES: u32 = 4 * RING;

impl XdpIo {
    /// Binds an AF_XDP socket to `queue` of `interface`; copies are sent from `local`.
    pub(crate) fn bind(
        interface: &Interface,
        queue: u32,
        local: SocketAddrV4,
        zerocopy: bool,
        tx_mode: TxMode,
    ) -> Result<Self, XdpError> {
        let mode = if zerocopy {
            XskMode::ZeroCopy
        } else {
            XskMode::Copy
        };
        let config = XskConfig {
            ifindex: interface.index,
            queue,
            frames: FRAMES,
            ring: RING,
            mode,
            multi_buffer: tx_mode == TxMode::MultiBuffer,
        };
        let socket = XskSocket::bind(&config).map_err(|source| XdpError::Socket {
            interface: interface.name.clone(),
            queue,
            mode: if zerocopy { "zero-copy" } else { "copy" },
            source,
        })?;
        let frame = |i: u32| u64::from(i) * u64::from(FRAME_SIZE);
        let mut io = XdpIo {
            socket,
            tx_mode,
            local: Endpoint {
                mac: interface.mac,
                addr: local,
            },
            interface: interface.name.clone(),
            rx_free: (0..RING).map(frame).collect(),
            tx_free: (RING..FRAMES).map(frame).collect(),
            tx_refs: vec![0; FRAMES as usize],
            next_hop: HashMap::with_capacity(MAX_NEXT_HOPS),
            descs: Vec::with_capacity(RING as usize),
            in_packet: false,
            completions: Vec::with_capacity(FRAMES as usize),
        };
        io.socket.fill(&mut io.rx_free);
        Ok(io)
    }

    /// The socket's fd, for the XSKMAP and for poll.
    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        self.socket.fd()
    }

    /// How fan-out copies are built.
    pub(crate) fn tx_mode(&self) -> TxMode {
        self.tx_mode
    }

    /// Whether the socket runs in zero-copy mode.
    pub(crate) fn zerocopy(&self) -> bool {
        self.socket.mode() == XskMode::ZeroCopy
    }

    /// Reloads next hops from the kernel's neighbour table (not on the per-packet path).
    pub(crate) fn refresh_neighbours(&mut self) {
        if let Ok(text) = std::fs::read_to_string("/proc/net/arp") {
            for (ip, mac) in parse_arp(&text, &self.interface) {
                self.next_hop.entry(ip).or_insert(mac);
            }
        }
    }

    /// Receives up to `max` datagrams: each one's source, bytes are handed to `take`, which
    /// copies what it keeps; returns how many frames were read. Frames that are not whole
    /// IPv4 UDP datagrams are counted in the return of `rejected`.
    pub(crate) fn receive(
        &mut self,
        max: usize,
        mut take: impl FnMut(SocketAddr, &[u8]),
    ) -> (usize, usize) {
        self.descs.clear();
        let n = self.socket.receive(max, &mut self.descs);
        let mut rejected = 0;
        for &(addr, len, more) in &self.descs {
            // A multi-fragment packet is larger than any piece: drop all its fragments.
            let whole = !self.in_packet && !more;
            self.in_packet = more;
            let parsed = whole
                .then(|| frame::parse_udp(self.socket.frame(addr, len as usize)))
                .flatten();
            match parsed {
                Some(f) => {
                    // The next hop back to the sender is the MAC its datagram came from.
                    let ip = *f.src.ip();
                    if self.next_hop.get(&ip) != Some(&f.src_mac)
                        && self.next_hop.len() < MAX_NEXT_HOPS
                    {
                        self.next_hop.insert(ip, f.src_mac);
                    }
                    let data = self.socket.frame(addr, len as usize);
                    take(
                        SocketAddr::V4(f.src),
                        &data[f.payload_offset..f.payload_offset + f.payload_len],
                    );
                }
                None => rejected += 1,
            }
            self.rx_free.push(addr);
        }
        self.socket.fill(&mut self.rx_free);
        (n, rejected)
    }

    /// Queues one copy of `payload` per destination in `dests`; destinations it cannot reach
    /// (no next hop, not IPv4, no free frame) are appended to `fallback`. Returns the copies
    /// queued. Call [`XdpIo::flush`] after a round of fan-outs.
    pub(crate) fn fan_out(
        &mut self,
        payload: &[u8],
        dests: &[SocketAddr],
        fallback: &mut Vec<SocketAddr>,
    ) -> usize {
        if payload.len() + HEADERS_LEN > FRAME_SIZE as usize {
            fallback.extend_from_slice(dests);
            return 0;
        }
        let shared = match self.tx_mode {
            TxMode::Copy => None,
            TxMode::MultiBuffer => match self.tx_free.pop() {
                Some(addr) => {
                    self.socket.frame_mut(addr)[..payload.len()].copy_from_slice(payload);
                    Some(addr)
                }
                None => {
                    fallback.extend_from_slice(dests);
                    return 0;
                }
            },
        };
        let per_copy = if shared.is_some() { 2 } else { 1 };
        let payload_sum = frame::ones_sum(payload);
        let mut queued = 0;
        for dest in dests {
            let SocketAddr::V4(to) = dest else {
                fallback.push(*dest);
                continue;
            };
            let Some(&mac) = self.next_hop.get(to.ip()) else {
                fallback.push(*dest);
                continue;
            };
            if self.socket.tx_room() < per_copy {
                // Let the kernel take what is queued, then try again once.
                let _ = self.socket.flush();
                if self.socket.tx_room() < per_copy {
                    fallback.push(*dest);
                    continue;
                }
            }
            let Some(head) = self.tx_free.pop() else {
                fallback.push(*dest);
                continue;
            };
            let to = Endpoint { mac, addr: *to };
            let buf = self.socket.frame_mut(head);
            frame::write_headers(buf, &self.local, &to, payload.len(), payload_sum);
            self.tx_refs[frame_number(head)] = 1;
            match shared {
                None => {
                    buf[HEADERS_LEN..HEADERS_LEN + payload.len()].copy_from_slice(payload);
                    self.socket
                        .queue(head, (HEADERS_LEN + payload.len()) as u32, false);
                }
                Some(body) => {
                    self.socket.queue(head, HEADERS_LEN as u32, true);
                    self.socket.queue(body, payload.len() as u32, false);
                    self.tx_refs[frame_number(body)] += 1;
                }
            }
            queued += 1;
        }
        if let Some(body) = shared {
            if self.tx_refs[frame_number(body)] == 0 {
                self.tx_free.push(body);
            }
        }
        queued
    }

    /// Hands queued copies to the kernel. In copy mode the kernel sends a bounded number per
    /// call, so this kicks until the ring is empty (or stops moving).
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        for _ in 0..MAX_KICKS {
            self.socket.flush()?;
            if self.socket.mode() == XskMode::ZeroCopy || !self.socket.tx_pending() {
                break;
            }
        }
        Ok(())
    }

    /// Whether copies are queued that the kernel has not taken yet (the worker must not sleep).
    pub(crate) fn tx_pending(&mut self) -> bool {
        self.socket.tx_pending()
    }

    /// Frees the frames of completed sends; true if any completed.
    pub(crate) fn reap(&mut self) -> bool {
        self.completions.clear();
        let n = self.socket.completed(&mut self.completions);
        for &addr in &self.completions {
            let i = frame_number(addr);
            debug_assert!(self.tx_refs[i] > 0, "completion of a free frame");
            if self.tx_refs[i] == 0 {
                continue;
            }
            self.tx_refs[i] -= 1;
            if self.tx_refs[i] == 0 {
                self.tx_free.push(addr - addr % u64::from(FRAME_SIZE));
            }
        }
        if self.socket.fill_needs_wakeup() {
            self.socket.kick_rx();
        }
        n > 0
    }

    /// Whether every sent frame has completed.
    pub(crate) fn idle(&mut self) -> bool {
        !self.socket.tx_pending() && self.tx_free.len() == (FRAMES - RING) as usize
    }
}

fn frame_number(addr: u64) -> usize {
    (addr / u64::from(FRAME_SIZE)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_macs_and_the_neighbour_table() {
        assert_eq!(
            parse_mac("02:00:0a:ff:00:01"),
            Some([2, 0, 0x0a, 0xff, 0, 1])
        );
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:07"), None);
        assert_eq!(parse_mac("zz:00:0a:ff:00:01"), None);
        let arp =
            "IP address       HW type     Flags       HW address            Mask     Device\n\
                   10.0.0.2         0x1         0x2         0a:00:00:00:00:02     *        vr\n\
                   10.0.0.3         0x1         0x0         00:00:00:00:00:00     *        vr\n\
                   10.0.0.4         0x1         0x6         0a:00:00:00:00:04     *        vr\n\
                   10.0.1.2         0x1         0x2         0a:00:00:00:00:09     *        eth0\n\
                   garbage\n";
        assert_eq!(
            parse_arp(arp, "vr"),
            vec![
                ("10.0.0.2".parse().unwrap(), [10, 0, 0, 0, 0, 2]),
                ("10.0.0.4".parse().unwrap(), [10, 0, 0, 0, 0, 4]),
            ]
        );
    }

    #[test]
    fn loopback_has_no_queue_socket_but_is_found() {
        let lo = Interface::lookup("lo").unwrap();
        assert_eq!(lo.ipv4, Ipv4Addr::LOCALHOST);
        assert!(lo.index > 0 && lo.rx_queues >= 1);
        assert!(matches!(
            Interface::lookup("no-such-if0"),
            Err(XdpError::NoInterface(_))
        ));
    }
}
