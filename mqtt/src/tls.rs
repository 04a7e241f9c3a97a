//! The rustls client configuration for an `mqtts://` broker: the ring provider (no
//! aws-lc), the CA bundle of `ca_file` or else the system's roots, and for mutual TLS a
//! client certificate chain and key; and the server configuration of the embedded
//! broker's TLS listener. Errors name the file; a key's parse error is not
//! shown, as it could quote key material. The key is a secret file: only its owner may
//! read it ([`crate::secret`]).

use crate::secret::SecretError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The TLS files beside an `mqtts://` URL (`ca_file`, `client_cert`, `client_key`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA bundle; without it the system's roots are trusted.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key for mutual TLS (both or neither).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl ClientTls {
    /// No file named.
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert.is_none() && self.client_key.is_none()
    }
}

/// Why no TLS client configuration could be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {}: {source}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {}: {why}", path.display())]
    Unusable {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("no ca_file given and no system CA certificates found")]
    NoSystemRoots,
    #[error("client_cert and client_key go together")]
    HalfClientIdentity,
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client key is open to group or others.
    #[error(transparent)]
    KeyNotPrivate(SecretError),
}

impl TlsError {
    /// Which file was at fault (`"CA file"`, `"client certificate"`, `"client key"`).
    pub fn what(&self) -> Option<&'static str> {
        match self {
            TlsError::Unreadable { what, .. } | TlsError::Unusable { what, .. } => Some(what),
            TlsError::KeyNotPrivate(SecretError::OpenToOthers { what, .. }) => Some(what),
            _ => None,
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// A private key, read only if its owner alone may read it.
fn read_key(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::secret::read_private(what, path).map_err(|e| match e {
        SecretError::Unreadable { what, path, source } => {
            TlsError::Unreadable { what, path, source }
        }
        e => TlsError::KeyNotPrivate(e),
    })
}

fn unusable(what: &'static str, path: &Path, why: impl ToString) -> TlsError {
    TlsError::Unusable {
        what,
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// The certificates of a PEM file, at least one.
fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unusable(what, path, e))?;
    if certs.is_empty() {
        return Err(unusable(what, path, "no certificate in it"));
    }
    Ok(certs)
}

fn roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let (added, _) = roots.add_parsable_certificates(certificates("CA file", path)?);
            if added == 0 {
                return Err(unusable("CA file", path, "no usable certificate in it"));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::NoSystemRoots);
            }
        }
    }
    Ok(roots)
}

/// The rustls client configuration for `tls`.
pub fn client_config(tls: &ClientTls) -> Result<rustls::ClientConfig, TlsError> {
    let identity = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err(TlsError::HalfClientIdentity),
    };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots(tls.ca_file.as_deref())?);
    let Some((cert, key)) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = certificates("client certificate", cert)?;
    let key_pem = read_key("client key", key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| unusable("client key", key, "no usable private key in it"))?;
    Ok(builder.with_client_auth_cert(chain, key_der)?)
}

/// The rustls server configuration for a PEM certificate chain and its private key (the
/// embedded broker's `tls_cert`, `tls_key`). The key must be private to its owner.
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates("server certificate", cert)?;
    let key_pem = read_key("server key", key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| unusable("server key", key, "no usable private key in it"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .map_err(|e| {
        unusable(
            "server key",
            key,
            format!("does not fit {}: {e}", cert.display()),
        )
    })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let e = client_config(&ClientTls {
            ca_file: Some(missing.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.what(), Some("CA file"));
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );

        std::fs::write(&missing, "not a certificate").unwrap();
        let e = client_config(&ClientTls {
            ca_file: Some(missing.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::Unusable {
                    what: "CA file",
                    ..
                }
            ),
            "{e}"
        );

        let e = client_config(&ClientTls {
            client_cert: Some(missing),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, TlsError::HalfClientIdentity), "{e}");
    }
}
