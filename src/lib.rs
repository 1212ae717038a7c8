//! clubcast: live video carried by its viewers, with relay appliances as amplifiers.
//!
//! ```text
//!  MPEG-TS ─▶ publisher ──signed pieces (UDP)──▶ relay ──fan-out──▶ viewers ─▶ ffplay / mpv
//! ```
//!
//! The protocol lives in sans-IO cores that take datagrams and a time and return what to send:
//! [`publisher::Publisher`], [`relay::RelayCore`] and [`viewer::Viewer`]. They read no clock and
//! open no socket, so the same code runs in the real programs, in tests and in the simulator.
//! Around them: [`wire`] (the v1 format), [`crypto`] (channel keys and signatures), [`ts`]
//! (MPEG-TS framing), [`backend`] (sockets), [`engine`] (the relay's IO loop), [`client`] (the
//! publisher's and viewer's IO loops) and [`metrics`] (Prometheus export).

#![warn(missing_docs, unreachable_pub)]

pub mod backend;
pub mod client;
pub mod config;
pub mod crypto;
pub mod engine;
pub mod fault;
pub mod fuzzing;
pub mod loadgen;
pub mod metrics;
pub mod publisher;
pub mod relay;
pub mod sim;
pub mod swarm;
pub mod time;
pub mod tracker;
pub mod ts;
pub mod viewer;
pub mod wire;
