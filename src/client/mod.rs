//! The publisher's and viewer's IO loops: real sockets, real clocks, real input and output
//! around the sans-IO [`crate::publisher::Publisher`] and [`crate::viewer::Viewer`].

pub mod publish;
pub mod swarm;
pub mod watch;

use std::io;
use std::net::SocketAddr;

use crate::backend::PortableSocket;

/// Socket buffer size for clients: a few hundred milliseconds of a fast stream.
pub(crate) const CLIENT_SOCKET_BUFFER: usize = 4 << 20;

/// A socket on an ephemeral port of the same address family as `peer`, with buffers of about
/// `buffer` bytes.
pub(crate) fn socket_towards(peer: SocketAddr, buffer: usize) -> io::Result<PortableSocket> {
    let local: SocketAddr = match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    PortableSocket::bind(local, buffer)
}
