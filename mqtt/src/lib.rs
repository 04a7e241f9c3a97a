//! The MQTT plumbing that the agent, the gateway and the simulators share, so each of
//! them keeps only what is its own (topics, sessions, what a message means):
//!
//! - [`url`]: the one broker URL grammar, `mqtt://host[:port]` and `mqtts://host[:port]`;
//! - [`secret`]: the one rule for reading a secret file (password, token, private key):
//!   private to its owner, never empty;
//! - [`tls`]: the rustls client configuration (ring, CA file or system roots, client
//!   certificate), and the embedded broker's server configuration;
//! - [`options`]: credentials and TLS beside the URL ([`BrokerAuth`]) and the rumqttc
//!   options built from them;
//! - [`backoff`]: the reconnect back-off policy every reconnect loop uses;
//! - [`log_limit`]: one log line per source and minute for refusals an attacker can repeat;
//! - `broker` (feature `embedded-broker`): the embedded rumqttd broker, open or behind a
//!   login and TLS.

pub mod backoff;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod log_limit;
pub mod options;
pub mod secret;
pub mod tls;
pub mod url;

pub use backoff::Backoff;
pub use log_limit::LogLimit;
pub use options::{mqtt_options, BrokerAuth, ClientSettings, Credentials, OptionsError};
pub use secret::{check_private, read_private, read_secret, SecretError};
pub use tls::{client_config, ClientTls, TlsError};
pub use url::{BrokerUrl, UrlError};

/// The largest packet MQTT can encode (remaining length 268,435,455 and a 5-byte header).
pub const MQTT_MAX_PACKET: usize = 268_435_455 + 5;
