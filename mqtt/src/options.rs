//! What a client needs beside the broker URL — user name, password file, TLS files
//! ([`BrokerAuth`]) — and the rumqttc options built from the three. Every client reads
//! any packet size it is told to here (see [`ClientSettings::max_incoming`]): a client
//! that refuses oversize payloads itself, unread, stays connected where a smaller packet
//! limit would end the connection at every reconnect.

use crate::secret::{read_secret, SecretError};
use crate::tls::{client_config, ClientTls, TlsError};
use crate::url::BrokerUrl;
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Credentials and TLS files: the `username`, `password_file`, `ca_file`, `client_cert`
/// and `client_key` keys of a broker's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerAuth {
    pub username: Option<String>,
    /// The password is read from a file so it never sits in a config or a command line.
    pub password_file: Option<PathBuf>,
    pub tls: ClientTls,
}

/// A user name and its password, read. The password stays out of `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Why no client options could be made.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("password_file needs a username (MQTT 3.1.1 has no password without one)")]
    PasswordWithoutUser,
    #[error("ca_file / client_cert / client_key need an mqtts:// broker, not {url}")]
    TlsFilesWithoutTls { url: String },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl OptionsError {
    /// The configuration key at fault (`password_file`, `ca_file`, `client_cert`,
    /// `client_key`), for errors that name file, line and key.
    pub fn config_key(&self) -> &'static str {
        match self {
            OptionsError::PasswordWithoutUser | OptionsError::Secret(_) => "password_file",
            OptionsError::TlsFilesWithoutTls { .. } => "ca_file",
            OptionsError::Tls(TlsError::HalfClientIdentity) => "client_key",
            OptionsError::Tls(e) => match e.what() {
                Some("client certificate") => "client_cert",
                Some("client key") => "client_key",
                _ => "ca_file",
            },
        }
    }
}

impl BrokerAuth {
    /// The checks that need no file: a password only with a user name, TLS files only
    /// for `mqtts://`, a client certificate only with its key.
    pub fn check(&self, url: &BrokerUrl) -> Result<(), OptionsError> {
        if self.username.is_none() && self.password_file.is_some() {
            return Err(OptionsError::PasswordWithoutUser);
        }
        if !url.is_tls() && !self.tls.is_empty() {
            return Err(OptionsError::TlsFilesWithoutTls {
                url: url.to_string(),
            });
        }
        if self.tls.client_cert.is_some() != self.tls.client_key.is_some() {
            return Err(TlsError::HalfClientIdentity.into());
        }
        Ok(())
    }

    /// The user name and the password from its file (empty without a file).
    pub fn credentials(&self) -> Result<Option<Credentials>, OptionsError> {
        let Some(username) = &self.username else {
            if self.password_file.is_some() {
                return Err(OptionsError::PasswordWithoutUser);
            }
            return Ok(None);
        };
        let password = match &self.password_file {
            Some(p) => read_secret("password file", p)?,
            None => String::new(),
        };
        Ok(Some(Credentials {
            username: username.clone(),
            password,
        }))
    }
}

/// The client's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    pub client_id: String,
    /// Whole seconds, at least 1 s; zero disables keep-alive.
    pub keep_alive: Duration,
    /// The largest packet read. [`crate::MQTT_MAX_PACKET`] reads anything MQTT allows.
    pub max_incoming: usize,
    /// The largest packet sent.
    pub max_outgoing: usize,
}

/// Options for a clean session to `url`: credentials and TLS from `auth` (the password
/// and TLS files are read now, so a bad file is an error before any connect).
pub fn mqtt_options(
    url: &BrokerUrl,
    auth: &BrokerAuth,
    settings: &ClientSettings,
) -> Result<MqttOptions, OptionsError> {
    auth.check(url)?;
    let credentials = auth.credentials()?;
    options_with(url, credentials, &auth.tls, settings)
}

/// [`mqtt_options`] for a caller that holds the password already.
pub fn options_with(
    url: &BrokerUrl,
    credentials: Option<Credentials>,
    tls: &ClientTls,
    settings: &ClientSettings,
) -> Result<MqttOptions, OptionsError> {
    let mut opts = MqttOptions::new(settings.client_id.clone(), url.host(), url.port());
    opts.set_clean_session(true);
    opts.set_keep_alive(whole_seconds(settings.keep_alive));
    opts.set_max_packet_size(settings.max_incoming, settings.max_outgoing);
    if let Some(c) = credentials {
        opts.set_credentials(c.username, c.password);
    }
    if url.is_tls() {
        let config = client_config(tls)?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    } else if !tls.is_empty() {
        return Err(OptionsError::TlsFilesWithoutTls {
            url: url.to_string(),
        });
    }
    Ok(opts)
}

/// rumqttc takes whole seconds only (and asserts on less than one), or zero.
fn whole_seconds(d: Duration) -> Duration {
    if d.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_secs(d.as_secs().clamp(1, u64::from(u16::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ClientSettings {
        ClientSettings {
            client_id: "c".into(),
            keep_alive: Duration::from_millis(300),
            max_incoming: crate::MQTT_MAX_PACKET,
            max_outgoing: 1024,
        }
    }

    #[test]
    fn checks_in_order() {
        let url = BrokerUrl::parse("mqtt://127.0.0.1:1883").unwrap();
        let mut auth = BrokerAuth::default();
        let opts = mqtt_options(&url, &auth, &settings()).unwrap();
        // Sub-second keep-alive is rounded up instead of tripping rumqttc's assert.
        assert_eq!(opts.keep_alive(), Duration::from_secs(1));
        assert_eq!(opts.max_packet_size(), crate::MQTT_MAX_PACKET);

        auth.password_file = Some("/nonexistent".into());
        assert!(matches!(
            mqtt_options(&url, &auth, &settings()),
            Err(OptionsError::PasswordWithoutUser)
        ));
        auth.username = Some("u".into());
        let e = mqtt_options(&url, &auth, &settings()).unwrap_err();
        assert!(
            matches!(e, OptionsError::Secret(SecretError::Unreadable { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("/nonexistent"), "{e}");

        auth.password_file = None;
        assert_eq!(
            auth.credentials().unwrap(),
            Some(Credentials {
                username: "u".into(),
                password: String::new()
            })
        );
        auth.tls.ca_file = Some("/nonexistent".into());
        assert!(matches!(
            mqtt_options(&url, &auth, &settings()),
            Err(OptionsError::TlsFilesWithoutTls { .. })
        ));
        let tls_url = BrokerUrl::parse("mqtts://127.0.0.1").unwrap();
        let e = mqtt_options(&tls_url, &auth, &settings()).unwrap_err();
        assert!(
            matches!(
                e,
                OptionsError::Tls(TlsError::Unreadable {
                    what: "CA file",
                    ..
                })
            ),
            "{e}"
        );
        auth.tls.ca_file = None;
        auth.tls.client_key = Some("/k".into());
        assert!(matches!(
            mqtt_options(&tls_url, &auth, &settings()),
            Err(OptionsError::Tls(TlsError::HalfClientIdentity))
        ));
    }

    #[test]
    fn the_password_stays_out_of_debug() {
        let c = Credentials {
            username: "u".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
