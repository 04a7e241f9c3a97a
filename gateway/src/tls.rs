//! HTTPS for the hotline API: the certificate and key from the config, for rustls (ring).
//! The key is a secret file: only its owner may read it (`tend_mqtt::secret`).
//! [`crate::serve`] serves the same axum router over it as over plain HTTP.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the hotline API's certificate and key cannot be served. A key's own parse error
/// is not kept: it could quote key material.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    NotPem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no usable private key", path.display())]
    NoKey { path: PathBuf },
    #[error("TLS protocol versions: {0}")]
    Protocols(#[source] rustls::Error),
    #[error("certificate and key: {0}")]
    CertificateAndKey(#[source] rustls::Error),
    /// The key is open to group or others.
    #[error(transparent)]
    KeyNotPrivate(tend_mqtt::SecretError),
}

/// Reads a PEM certificate chain and its private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, ServerTlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ServerTlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let pem = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ServerTlsError::NotPem {
            path: cert.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(ServerTlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let key_pem = tend_mqtt::read_private("private key", key).map_err(|e| match e {
        tend_mqtt::SecretError::Unreadable { path, source, .. } => {
            ServerTlsError::Read { path, source }
        }
        e => ServerTlsError::KeyNotPrivate(e),
    })?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| ServerTlsError::NoKey {
        path: key.to_path_buf(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(ServerTlsError::Protocols)?
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .map_err(ServerTlsError::CertificateAndKey)?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_testkit::config::write_secret;

    #[test]
    fn errors_name_the_file_and_never_quote_a_key() {
        let d = tempfile::tempdir().unwrap();
        let (cert, key) = (d.path().join("server.pem"), d.path().join("server.key"));
        let e = server_config(&cert, &key).unwrap_err();
        assert!(matches!(e, ServerTlsError::Read { .. }), "{e}");
        assert!(e.to_string().contains("server.pem"), "{e}");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        let e = server_config(&cert, &key).unwrap_err();
        assert!(matches!(e, ServerTlsError::NoCertificate { .. }), "{e}");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        write_secret(
            &key,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = server_config(&cert, &key).unwrap_err();
        assert!(!matches!(e, ServerTlsError::KeyNotPrivate(_)), "{e}");
        assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
    }

    #[test]
    fn a_key_open_to_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (cert, key) = (d.path().join("server.pem"), d.path().join("server.key"));
        std::fs::write(&cert, tend_testkit::certs::SERVER_CERT_PEM).unwrap();
        write_secret(&key, tend_testkit::certs::SERVER_KEY_PEM).unwrap();
        server_config(&cert, &key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = server_config(&cert, &key).unwrap_err();
        assert!(matches!(e, ServerTlsError::KeyNotPrivate(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains(&format!("chmod 600 {}", key.display())), "{e}");
    }
}
