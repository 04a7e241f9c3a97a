//! An MQTT device (VM-12) on an `mqtts://` broker: the agent's link reads it over TLS,
//! trusting the device's `ca_file`, and sends its `username` / `password_file`. The
//! simulator publishes to the plain embedded broker; a TLS-terminating proxy in front of
//! that broker is what the agent connects to (rumqttd is built without TLS here).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tend_agent::config;
use tend_agent::run::{spawn_links, Shared};
use tend_devsim::vm12::{Vm12Config, Vm12Sim};
use tend_testkit::config::write_secret;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

// Test-only certificates (P-256, valid until 2126), the same as the uplink's TLS tests:
// a CA and a server certificate for localhost / 127.0.0.1 signed by it. Throwaway keys.

const CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBlTCCATugAwIBAgIUQvtTLYBH/0cR39aqP11r3kmjjcIwCgYIKoZIzj0EAwIw\n\
FzEVMBMGA1UEAwwMdGVuZCB0ZXN0IENBMCAXDTI2MTEyOTA4MTQ0NloYDzIxMjYx\n\
MTA1MDgxNDQ2WjAXMRUwEwYDVQQDDAx0ZW5kIHRlc3QgQ0EwWTATBgcqhkjOPQIB\n\
BggqhkjOPQMBBwNCAATqMWz5dbSqhRPoulnl4ifwz04U3XxX2B90fxG5R4fc7D4/\n\
1wj8ogTHJmEGIPlsf6mh3hd5UdDeboTpL/IgkScxo2MwYTAdBgNVHQ4EFgQUZ4dr\n\
0ezeKQG13q0NcVENcuQT8C4wHwYDVR0jBBgwFoAUZ4dr0ezeKQG13q0NcVENcuQT\n\
8C4wDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYwCgYIKoZIzj0EAwID\n\
SAAwRQIhAL6YWF5Z1SRtx2nIBQpb3BUFZLq2b3Z4nHhjFJ/D7bL2AiAaiYVKL+fW\n\
DR+kX1KzfZFSMDf+WCMFJVWPnbBzKAPe9A==\n\
-----END CERTIFICATE-----\n\
";

const SERVER_CERT_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBuzCCAWKgAwIBAgIUWZ2U/Ufqk9Ex3eruX7adoCSuDK8wCgYIKoZIzj0EAwIw\n\
FzEVMBMGA1UEAwwMdGVuZCB0ZXN0IENBMCAXDTI2MTEyOTA4MTQ0NloYDzIxMjYx\n\
MTA1MDgxNDQ2WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggq\n\
hkjOPQMBBwNCAATcJmWWRsg3Eg7h87cgDANcS5BwoG02NrmsT/A536t1t9tc5med\n\
imVJF7dFNfHA5htwh1OKJfPazUcmUdJmNjZYo4GMMIGJMBoGA1UdEQQTMBGCCWxv\n\
Y2FsaG9zdIcEfwAAATAJBgNVHRMEAjAAMAsGA1UdDwQEAwIHgDATBgNVHSUEDDAK\n\
BggrBgEFBQcDATAdBgNVHQ4EFgQU8mIYjBSGbfzt4MYfO56hJYOjOZYwHwYDVR0j\n\
BBgwFoAUZ4dr0ezeKQG13q0NcVENcuQT8C4wCgYIKoZIzj0EAwIDRwAwRAIgeGkx\n\
n4Zr4+t7ir5d0bNbWbvw/kB0JlkRp7PkBQa0fhMCID3dTFBLGPbxBedq0/xlKxeq\n\
6C1t7T54CCsjFw2WZXxH\n\
-----END CERTIFICATE-----\n\
";

const SERVER_KEY_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgd9xyUaR2swgVhMNN\n\
UIoNYICN2NBDN4+S90rgTXcaRtGhRANCAATcJmWWRsg3Eg7h87cgDANcS5BwoG02\n\
NrmsT/A536t1t9tc5medimVJF7dFNfHA5htwh1OKJfPazUcmUdJmNjZY\n\
-----END PRIVATE KEY-----\n\
";

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A TLS-terminating proxy in front of the plain broker at `upstream`.
async fn tls_proxy(upstream: SocketAddr) -> (SocketAddr, AbortOnDrop) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![CertificateDer::from_pem_slice(SERVER_CERT_PEM.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(SERVER_KEY_PEM.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
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
    (addr, AbortOnDrop(task))
}

fn agent_config(dir: &Path, broker: &str) -> String {
    format!(
        r#"
agent_id = "agent-tls-device"
site_id = "s-1"
data_dir = "data"
[uplink]
broker = "mqtt://127.0.0.1:1"
[[device]]
id = "monitor"
profile = "vistara/vm-12"
transport = "mqtt"
broker = "{broker}"
serial = "VM12-00A4471"
ca_file = "{ca}"
username = "agent"
password_file = "{pw}"
"#,
        ca = dir.join("ca.pem").display(),
        pw = dir.join("broker.password").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_an_mqtts_broker_is_read_over_tls() {
    let broker = tend_devsim::broker::spawn_embedded().unwrap();
    let mut vm_cfg = Vm12Config::v7("127.0.0.1", broker.port());
    vm_cfg.status_interval = Duration::from_millis(300);
    let _vm = Vm12Sim::spawn(vm_cfg).await.unwrap();
    let (tls_addr, _proxy) = tls_proxy(broker.addr()).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), CA_PEM).unwrap();
    write_secret(dir.path().join("broker.password"), "s3cret\n").unwrap();
    // By name: the server certificate is for localhost.
    let url = format!("mqtts://localhost:{}", tls_addr.port());
    let src = agent_config(dir.path(), &url);
    let loaded = config::parse("agent.toml", &src, dir.path()).unwrap();

    let (tx, mut rx) = mpsc::channel(64);
    let tasks = spawn_links(&loaded, Arc::new(Shared::default()), tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut errors = Vec::new();
    let read = loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(obs)) => match obs.result {
                Ok(read) => break read,
                Err(e) => errors.push(e.to_string()),
            },
            Ok(None) => panic!("the link stopped: {errors:?}"),
            Err(_) => panic!("no status over TLS within 20 s: {errors:?}"),
        }
    };
    assert_eq!(read.identity.firmware, "7.4.2");
    for t in tasks {
        t.abort();
    }
}

#[test]
fn a_device_broker_the_link_cannot_use_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), CA_PEM).unwrap();
    let load = |src: &str| config::parse("agent.toml", src, dir.path());

    // The password file is missing: refused, naming the file and the key.
    let src = agent_config(dir.path(), "mqtts://localhost:8883");
    let e = load(&src).unwrap_err();
    assert_eq!(e.key, "device[0].password_file", "{e}");
    assert!(e.message.contains("broker.password"), "{e}");
    assert!(e.line > 1, "{e}");

    // An empty one too: it must not become an empty password.
    write_secret(dir.path().join("broker.password"), "\n").unwrap();
    let e = load(&src).unwrap_err();
    assert_eq!(e.key, "device[0].password_file", "{e}");
    assert!(e.message.contains("empty"), "{e}");

    write_secret(dir.path().join("broker.password"), "s3cret").unwrap();
    assert!(load(&src).is_ok());

    // A CA file for a broker without TLS, and a broker URL of another grammar.
    let e = load(&agent_config(dir.path(), "mqtt://localhost:1883")).unwrap_err();
    assert_eq!(e.key, "device[0].ca_file", "{e}");
    let e = load(&agent_config(dir.path(), "tcp://localhost:1883")).unwrap_err();
    assert_eq!(e.key, "device[0].broker", "{e}");
    assert!(e.message.contains("tcp://localhost:1883"), "{e}");
}
