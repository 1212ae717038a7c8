//! IO backends: thin layers that move datagrams between sockets and the sans-IO cores.
//!
//! `portable` uses batched `recvmmsg`/`sendmmsg` on an ordinary UDP socket and runs anywhere
//! Linux does; `uring` drives the same socket through io_uring (multishot receive into pool
//! slots, one submission per round for all sends). Backends own sockets and kernel
//! interfaces; they make no protocol decisions.

pub mod portable;
mod sockaddr;
pub mod uring;
pub mod xdp;

pub use portable::{FanoutResult, PortableSocket, RecvBatch, SendBatch};
