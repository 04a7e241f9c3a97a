//! HTTPS for the hotline API: the certificate and key from the config, rustls (ring)
//! under hyper's server, the same axum router as plain HTTP.

use axum::extract::ConnectInfo;
use axum::Extension;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Reads a PEM certificate chain and its private key. A key's own parse error is not
/// shown: it could quote key material.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key_pem = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| format!("{}: no usable private key", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .map_err(|e| format!("certificate and key: {e}"))?;
    Ok(Arc::new(config))
}

/// Serves `router` over TLS on `listener` until `shutdown`. Each connection gets the
/// caller's address as `ConnectInfo`, as the plain server gives it.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("hotline API accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = router
            .clone()
            .layer(Extension(ConnectInfo::<SocketAddr>(peer)));
        let sd = shutdown.clone();
        tokio::spawn(async move {
            // A client that never finishes its handshake must not hold a task forever.
            let hs = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
            let stream = match hs.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!("hotline API TLS handshake from {peer}: {e}");
                    return;
                }
                Err(_) => return,
            };
            let service = TowerToHyperService::new(app);
            let builder = Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = sd.cancelled() => {}
            }
        });
    }
}
