//! The tend gateway: collects what the agents send, keeps the availability ledger, opens
//! repair tickets in the service backend and serves the hotline.
//!
//! The pure core (no sockets, no clock reads, no disk but the fleet file when asked):
//! [`fleet`] (customers, sites, devices), [`ledger`] (availability arithmetic),
//! [`sla`] (deadlines, warranty, clinical impact) and [`ticket`] (backend bodies, keys and
//! what an episode change becomes).
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod audit;
pub mod backend;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod check;
pub mod cli;
pub mod clock;
pub mod command_line;
pub mod config;
pub mod diag;
pub mod digest;
pub mod enrol;
pub mod fleet;
pub mod forwarder;
pub mod ingest;
pub mod ledger;
pub mod limits;
pub mod link;
pub mod maintenance;
pub mod metrics;
pub mod page;
pub mod refusals;
pub mod report;
pub mod run;
pub mod serve;
pub mod service_watch;
pub mod sla;
pub mod sla_watch;
pub mod store;
pub mod ticket;
pub mod tls;
pub mod trust;
