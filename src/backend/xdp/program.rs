//! Loading and attaching the relay's XDP program (`xdp/relay.c`, embedded as `xdp/relay.o`)
//! with aya, and registering AF_XDP sockets in its XSKMAP. The attachment is a bpf_link owned
//! by [`XdpProgram`]: it goes away when the program is dropped, and with the process however it
//! ends (even SIGKILL), so no interface is left redirecting into a dead socket. (Kernels before
//! 5.9 have no XDP links: aya then attaches through netlink, which only a clean exit undoes.)

use std::os::fd::RawFd;

use aya::maps::XskMap;
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};

use super::XdpError;

/// The compiled program (rebuilt from `xdp/relay.c` by `xdp/build`; a test checks they match).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../../xdp/relay.o");
const PROGRAM: &str = "clubcast_relay";
const SOCKETS: &str = "clubcast_xsks";
const COUNTS: &str = "clubcast_counts";

/// Where the kernel runs the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// In the driver, before any socket buffer exists (fastest; veth and most NICs).
    #[default]
    Native,
    /// In the generic network stack (any interface, slower).
    Generic,
}

impl AttachMode {
    /// The name used in flags and config files.
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }
}

impl std::str::FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(AttachMode::Native),
            "generic" => Ok(AttachMode::Generic),
            _ => Err(format!("{s:?} is not an XDP mode (native, generic)")),
        }
    }
}

/// The program, attached to one interface.
pub struct XdpProgram {
    ebpf: Ebpf,
    interface: String,
}

impl std::fmt::Debug for XdpProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpProgram")
            .field("interface", &self.interface)
            .finish()
    }
}

fn is_permission(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

impl XdpProgram {
    /// Loads the program for UDP port `port` and attaches it to `interface`.
    pub fn attach(interface: &str, port: u16, mode: AttachMode) -> Result<Self, XdpError> {
        let mut ebpf = EbpfLoader::new()
            .override_global("relay_port", &port, true)
            .load(OBJECT)
            .map_err(|e| {
                if is_permission(&e) {
                    XdpError::Privilege {
                        what: "loading an XDP program",
                    }
                } else {
                    XdpError::Load(e.to_string())
                }
            })?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| XdpError::Load(format!("no program {PROGRAM} in the object")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| XdpError::Load(e.to_string()))?;
        program.load().map_err(|e| {
            if is_permission(&e) {
                XdpError::Privilege {
                    what: "loading an XDP program",
                }
            } else {
                XdpError::Load(format!("the kernel refused the program: {e}"))
            }
        })?;
        let flags = match mode {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        };
        program.attach(interface, flags).map_err(|e| {
            if is_permission(&e) {
                XdpError::Privilege {
                    what: "attaching an XDP program",
                }
            } else {
                XdpError::Attach {
                    interface: interface.to_string(),
                    mode: mode.name(),
                    reason: error_chain(&e),
                }
            }
        })?;
        Ok(XdpProgram {
            ebpf,
            interface: interface.to_string(),
        })
    }

    /// Sends the datagrams that reach receive queue `queue` to socket `fd`.
    pub fn register(&mut self, queue: u32, fd: RawFd) -> Result<(), XdpError> {
        let map = self
            .ebpf
            .map_mut(SOCKETS)
            .ok_or_else(|| XdpError::Load(format!("no map {SOCKETS} in the object")))?;
        let mut sockets = XskMap::try_from(map).map_err(|e| XdpError::Load(e.to_string()))?;
        // The kernel drops the entry itself when the socket closes.
        sockets
            .set(queue, fd, 0)
            .map_err(|e| XdpError::Load(format!("cannot register queue {queue}: {e}")))
    }

    /// Packets the program sent to AF_XDP sockets and passed to the kernel, over all CPUs.
    pub fn counts(&self) -> (u64, u64) {
        let Some(map) = self.ebpf.map(COUNTS) else {
            return (0, 0);
        };
        let Ok(array) = aya::maps::PerCpuArray::<_, u64>::try_from(map) else {
            return (0, 0);
        };
        let sum = |i: u32| array.get(&i, 0).map_or(0, |v| v.iter().sum::<u64>());
        (sum(0), sum(1))
    }

    /// The interface the program is attached to.
    pub fn interface(&self) -> &str {
        &self.interface
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}
