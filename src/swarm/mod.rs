//! The swarm: peers that carry the stream (clubs, re-upload, repair, catch-up). Being built;
//! so far it holds the LEDBAT controller that background transfers (catch-up, repair) run
//! under, so they yield to the live pieces.

pub mod ledbat;

pub use ledbat::{Ledbat, LedbatConfig};
