//! One device as configured — a `[[device]]` table of the agent's config, or the flags of
//! `tend-agent probe` — and the one place where the profile fills in what was left out.
//!
//! The transport is a tagged enum on `transport`: each kind has exactly its own keys, so a
//! key of another transport is refused as unknown rather than silently ignored. `run` and
//! `probe` both turn a [`Transport`] into a [`LinkTarget`] with [`Transport::resolve`], so a
//! device is reached the same way whichever command reads it.

use crate::transport::modbus::Endpoint;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;
use tend_profiles::schema::{Parity, TransportDef, TransportKind};
use tend_profiles::units::Dur;

/// Serial line speed when neither the device entry nor the profile gives one.
pub const DEFAULT_SERIAL_BAUD: u32 = 9600;
/// Modbus RTU line speed when neither the device entry nor the profile gives one.
pub const DEFAULT_RTU_BAUD: u32 = 19200;
/// Modbus RTU parity when neither gives one: even, as the Modbus serial line spec says.
pub const DEFAULT_RTU_PARITY: Parity = Parity::Even;
/// Modbus unit id when neither gives one.
pub const DEFAULT_UNIT: u8 = 1;
/// Modbus TCP port when the address has none and the profile gives none.
pub const DEFAULT_TCP_PORT: u16 = 502;
/// How often a device is read when its entry does not say.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// One `[[device]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DeviceConfig {
    /// The id the fleet file uses for this device.
    pub id: String,
    /// `vendor/model`; the device's firmware picks the profile of that model.
    pub profile: String,
    /// How the device is reached, with that transport's keys.
    #[serde(flatten)]
    pub transport: Transport,
    /// How often to read the device (serial, Modbus). Default 1 s.
    pub poll_interval: Option<Dur>,
    /// Overrides the profile's reply timeout.
    pub reply_timeout: Option<Dur>,
}

impl DeviceConfig {
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
            .map(|d| d.0)
            .unwrap_or(DEFAULT_POLL_INTERVAL)
    }

    pub fn reply_timeout(&self) -> Option<Duration> {
        self.reply_timeout.map(|d| d.0)
    }
}

/// How a device is connected: `transport = "..."` and the keys of that transport.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "transport", rename_all = "kebab-case")]
pub enum Transport {
    /// Framed ASCII request/response on a serial port of its own (LIP-300).
    Serial(SerialLink),
    /// Modbus RTU on a serial port (RS-485), possibly shared with other units.
    ModbusRtu(ModbusRtuLink),
    /// Modbus TCP.
    ModbusTcp(ModbusTcpLink),
    /// The device publishes to an MQTT broker (VM-12).
    Mqtt(MqttLink),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialLink {
    /// Serial port path.
    pub port: String,
    /// Default from the profile.
    pub baud: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusRtuLink {
    /// Serial port path of the RS-485 bus.
    pub port: String,
    /// Default from the profile.
    pub baud: Option<u32>,
    /// Default from the profile.
    pub parity: Option<Parity>,
    /// Modbus unit id; default from the profile.
    pub unit: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTcpLink {
    /// `host:port`, or `host` for the profile's port.
    pub address: String,
    /// Modbus unit id; default from the profile.
    pub unit: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttLink {
    /// The broker the device publishes to.
    pub broker: String,
    /// The device's serial number (names its topics).
    pub serial: String,
    pub username: Option<String>,
    /// The password is read from a file so it never sits in the config or a command line.
    pub password_file: Option<PathBuf>,
    /// On an `mqtts://` broker: the CA bundle (else the system's roots).
    pub ca_file: Option<PathBuf>,
}

impl MqttLink {
    /// The user name, password file and CA file of the device's broker.
    pub fn broker_auth(&self) -> tend_mqtt::BrokerAuth {
        tend_mqtt::BrokerAuth {
            username: self.username.clone(),
            password_file: self.password_file.clone(),
            tls: tend_mqtt::ClientTls {
                ca_file: self.ca_file.clone(),
                ..tend_mqtt::ClientTls::default()
            },
        }
    }
}

impl Transport {
    /// The name written in configs and on probe's command line.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Serial(_) => "serial",
            Transport::ModbusRtu(_) => "modbus-rtu",
            Transport::ModbusTcp(_) => "modbus-tcp",
            Transport::Mqtt(_) => "mqtt",
        }
    }

    /// The profile transport this link carries.
    pub fn profile_kind(&self) -> TransportKind {
        match self {
            Transport::Serial(_) => TransportKind::Serial,
            Transport::ModbusRtu(_) | Transport::ModbusTcp(_) => TransportKind::Modbus,
            Transport::Mqtt(_) => TransportKind::Mqtt,
        }
    }

    /// The Modbus unit id as written, if this is a Modbus link.
    pub fn unit(&self) -> Option<u8> {
        match self {
            Transport::ModbusRtu(l) => l.unit,
            Transport::ModbusTcp(l) => l.unit,
            Transport::Serial(_) | Transport::Mqtt(_) => None,
        }
    }

    /// The link with every default filled in from `profile` (the transport section of any
    /// profile of the device's model: they agree on the line settings).
    pub fn resolve(&self, profile: &TransportDef) -> LinkTarget {
        let unit = |u: Option<u8>| u.or(profile.default_unit).unwrap_or(DEFAULT_UNIT);
        match self {
            Transport::Serial(l) => LinkTarget::Serial {
                port: l.port.clone(),
                baud: l.baud.or(profile.baud).unwrap_or(DEFAULT_SERIAL_BAUD),
            },
            Transport::ModbusRtu(l) => LinkTarget::Modbus {
                endpoint: Endpoint::Rtu {
                    path: l.port.clone(),
                    baud: l.baud.or(profile.baud).unwrap_or(DEFAULT_RTU_BAUD),
                    parity: l.parity.or(profile.parity).unwrap_or(DEFAULT_RTU_PARITY),
                },
                unit: unit(l.unit),
            },
            Transport::ModbusTcp(l) => LinkTarget::Modbus {
                endpoint: Endpoint::Tcp(with_port(
                    &l.address,
                    profile.tcp_port.unwrap_or(DEFAULT_TCP_PORT),
                )),
                unit: unit(l.unit),
            },
            Transport::Mqtt(l) => LinkTarget::Mqtt(l.clone()),
        }
    }
}

/// `address` as written when it has a port, else with `port` added.
fn with_port(address: &str, port: u16) -> String {
    let has_port = address.parse::<std::net::SocketAddr>().is_ok()
        || address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && !h.contains(':') && p.parse::<u16>().is_ok());
    if has_port {
        address.to_string()
    } else {
        format!("{address}:{port}")
    }
}

/// A device link with nothing left to default: what a transport opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkTarget {
    /// A serial port of its own.
    Serial { port: String, baud: u32 },
    /// One unit on a Modbus link (RTU bus or TCP connection).
    Modbus { endpoint: Endpoint, unit: u8 },
    /// A device on an MQTT broker.
    Mqtt(MqttLink),
}

impl LinkTarget {
    /// One line for a person: `modbus-tcp 10.0.0.5:502 unit 1`.
    pub fn describe(&self) -> String {
        match self {
            LinkTarget::Serial { port, baud } => format!("serial {port} at {baud} baud"),
            LinkTarget::Modbus {
                endpoint: e @ Endpoint::Rtu { .. },
                unit,
            } => format!("modbus-rtu {e} unit {unit}"),
            LinkTarget::Modbus {
                endpoint: e @ Endpoint::Tcp(_),
                unit,
            } => format!("modbus-tcp {e} unit {unit}"),
            LinkTarget::Mqtt(m) => format!("mqtt {} serial {}", m.broker, m.serial),
        }
    }

    /// The link this target shares with others: one task owns each serial port, RS-485
    /// bus or Modbus TCP connection. Two entries with the same key and unit read the same
    /// device.
    pub fn link_key(&self) -> String {
        match self {
            LinkTarget::Serial { port, .. } => format!("serial {port}"),
            LinkTarget::Modbus {
                endpoint: Endpoint::Rtu { path, .. },
                ..
            } => format!("rtu {path}"),
            LinkTarget::Modbus {
                endpoint: Endpoint::Tcp(a),
                ..
            } => format!("tcp {a}"),
            LinkTarget::Mqtt(m) => format!("mqtt {} {}", m.broker, m.serial),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(src: &str) -> TransportDef {
        toml::from_str(src).unwrap()
    }

    #[test]
    fn defaults_come_from_the_profile_then_the_standard() {
        let av = profile(
            "kind = \"modbus\"\nbaud = 19200\nparity = \"even\"\ntcp_port = 1502\ndefault_unit = 7\n",
        );
        let bare = profile("kind = \"modbus\"\n");
        let tcp = Transport::ModbusTcp(ModbusTcpLink {
            address: "10.0.0.5".into(),
            unit: None,
        });
        assert_eq!(
            tcp.resolve(&av),
            LinkTarget::Modbus {
                endpoint: Endpoint::Tcp("10.0.0.5:1502".into()),
                unit: 7
            }
        );
        assert_eq!(
            tcp.resolve(&bare),
            LinkTarget::Modbus {
                endpoint: Endpoint::Tcp("10.0.0.5:502".into()),
                unit: 1
            }
        );
        for written in ["[::1]:1502", "10.0.0.5:600", "host:600"] {
            let t = Transport::ModbusTcp(ModbusTcpLink {
                address: written.into(),
                unit: Some(3),
            });
            assert_eq!(
                t.resolve(&bare),
                LinkTarget::Modbus {
                    endpoint: Endpoint::Tcp(written.into()),
                    unit: 3
                }
            );
        }
        let rtu = Transport::ModbusRtu(ModbusRtuLink {
            port: "/dev/ttyUSB0".into(),
            baud: None,
            parity: None,
            unit: None,
        });
        assert_eq!(
            rtu.resolve(&bare),
            LinkTarget::Modbus {
                endpoint: Endpoint::Rtu {
                    path: "/dev/ttyUSB0".into(),
                    baud: 19200,
                    parity: Parity::Even
                },
                unit: 1
            }
        );
        let serial = Transport::Serial(SerialLink {
            port: "/dev/ttyS0".into(),
            baud: None,
        });
        assert_eq!(
            serial.resolve(&bare),
            LinkTarget::Serial {
                port: "/dev/ttyS0".into(),
                baud: 9600
            }
        );
    }
}
