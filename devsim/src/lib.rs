#![forbid(unsafe_code)]
//! Device simulators for tend, written from the vendors' interface manuals.
//!
//! One module per manual:
//! - [`lip300`]: Lumen LIP-300 infusion pump, framed ASCII over RS-232 (a pty here);
//! - [`av500`]: Aeris AV-500 ventilator, Modbus RTU (a pty) and Modbus TCP;
//! - [`hm2`]: CryoSense HM-2 helium monitor, Modbus TCP;
//! - [`vm12`]: Vistara VM-12 patient monitor, an MQTT 3.1.1 client.
//!
//! Plus the pieces around them: [`modbus`] framing, [`pty`] helpers, an embedded MQTT
//! [`broker`], scripted fault [`scenario`]s and the [`fleet`] the binary starts.
//!
//! The simulators encode from the manuals on their own and deliberately do not use
//! `tend-profiles`, so that a misreading of a manual on one side is caught by the other.
//! Every encoder (frames, checksums, register images, JSON documents) is a pure function
//! of the device state; the I/O front-ends only read bytes, look at the clock and call them.

pub mod av500;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod duration;
pub mod fleet;
pub mod hm2;
pub mod lip300;
pub mod modbus;
pub mod pty;
pub mod scenario;
pub mod shared;
pub mod vm12;

pub use av500::{Av500Config, Av500Handle, Av500Sim, Av500State};
pub use hm2::{Hm2Config, Hm2Handle, Hm2Sim, Hm2State};
pub use lip300::{Lip300Config, Lip300Handle, Lip300Sim, Lip300State, Noise};
pub use scenario::{Action, Scenario};
pub use vm12::{Vm12Config, Vm12Handle, Vm12Sim, Vm12State};

use std::fmt;
use std::str::FromStr;

/// A firmware version `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
}

impl Version {
    pub const fn new(major: u16, minor: u16, patch: u16) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The error of [`Version::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid firmware version {0:?}: expected major.minor[.patch]")]
pub struct VersionError(pub String);

impl FromStr for Version {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || VersionError(s.to_string());
        let mut parts = s.trim().split('.');
        let major = parts.next().ok_or_else(err)?.parse().map_err(|_| err())?;
        let minor = parts.next().ok_or_else(err)?.parse().map_err(|_| err())?;
        let patch = match parts.next() {
            Some(p) => p.parse().map_err(|_| err())?,
            None => 0,
        };
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self::new(major, minor, patch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parses_and_prints() {
        assert_eq!("3.1.0".parse::<Version>().unwrap(), Version::new(3, 1, 0));
        assert_eq!("5.2".parse::<Version>().unwrap(), Version::new(5, 2, 0));
        assert!("x.1".parse::<Version>().is_err());
        assert!("1.2.3.4".parse::<Version>().is_err());
        assert_eq!(Version::new(7, 4, 2).to_string(), "7.4.2");
    }
}
