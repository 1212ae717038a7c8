//! The swarm: members that carry the stream — peers that re-upload, relays that amplify, the
//! publisher that seeds — as one sans-IO state machine ([`SwarmNode`]) shared by the real
//! clients, the relay and the simulator. Clubs, in-club push, paced and congestion-controlled
//! uploads, repair and catch-up under LEDBAT, and the replacement and banning of bad upstreams
//! live here; sockets and clocks do not.

pub mod ledbat;
mod link;
mod node;
mod pacer;
mod ring;
mod seq_window;
mod stats;
mod verified;

pub use ledbat::{Ledbat, LedbatConfig};
pub use link::{Link, LiveRate};
pub use node::{
    Behaviour, ChannelInfo, Datagram, SwarmConfig, SwarmNode, Transmit, ALL_CLUBS, NO_CLUB,
    STARTUP_HOLD,
};
pub use pacer::{TokenBucket, DATAGRAM_OVERHEAD};
pub use ring::{PieceBytes, PieceRing};
pub use stats::SwarmStats;
pub use verified::VerifiedPieces;

#[cfg(test)]
mod tests;
