//! IO backends: thin layers that move datagrams between sockets and the sans-IO cores.
//!
//! `portable` uses batched `recvmmsg`/`sendmmsg` on an ordinary UDP socket and runs anywhere
//! Linux does. Backends own sockets and buffers; they make no protocol decisions.

pub mod portable;
mod sockaddr;

pub use portable::{FanoutResult, PortableSocket, RecvBatch, SendBatch};
