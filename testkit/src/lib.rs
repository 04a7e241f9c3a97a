//! Test support for tend, kept out of the product: a stand-in for the service backend,
//! the test certificates, and the fixtures the cross-process suites share (free ports,
//! polling, Mosquitto, gateway and agent processes, their config and fleet files,
//! simulated devices, a tap on the broker, memory sampling, reproducible randomness,
//! enrolment and sealed messages).
//!
//! Nothing here knows the gateway's or the agent's internals: the processes are found
//! by the binary path a test passes in (`env!("CARGO_BIN_EXE_...")`), and everything is
//! observed the way an operator would, over the hotline API, `/metrics` and the broker.
#![forbid(unsafe_code)]

pub mod backend_standin;
pub mod browser;
pub mod certs;
pub mod config;
pub mod metrics;
pub mod mosquitto;
pub mod ports;
pub mod postgres;
pub mod procs;
pub mod rng;
pub mod rss;
pub mod sims;
pub mod tls_proxy;
pub mod trust;
pub mod wait;
pub mod wire_tap;
