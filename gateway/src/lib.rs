//! The tend gateway: collects what the agents send, keeps the availability ledger, opens
//! repair tickets in the service backend and serves the hotline.
#![forbid(unsafe_code)]

pub mod fleet;
pub mod ledger;
pub mod sla;
pub mod ticket;
