//! A TLS-terminating proxy in front of a plain MQTT broker: the embedded rumqttd is built
//! without TLS, so the tests of `mqtts://` clients (the agent's uplink, an MQTT device's
//! link) put this in front of it, serving [`crate::certs::SERVER_CERT_PEM`] and, when
//! asked, requiring a client certificate from [`crate::certs::CA_PEM`].

use crate::certs::{CA_PEM, SERVER_CERT_PEM, SERVER_KEY_PEM};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// The running proxy; it stops when dropped.
pub struct ProxyTask(tokio::task::JoinHandle<()>);

impl Drop for ProxyTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts a proxy on a free loopback port that forwards every TLS connection to the
/// plain broker at `upstream`; its address, and the task that keeps it running.
pub async fn tls_proxy(upstream: SocketAddr, require_client_cert: bool) -> (SocketAddr, ProxyTask) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(CA_PEM.as_bytes()).unwrap())
            .unwrap();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let chain = vec![CertificateDer::from_pem_slice(SERVER_CERT_PEM.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(SERVER_KEY_PEM.as_bytes()).unwrap();
    let config = builder.with_single_cert(chain, key).unwrap();
    let acceptor = rumqttc::tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (addr, ProxyTask(task))
}
