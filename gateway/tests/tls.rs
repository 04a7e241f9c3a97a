//! The hotline API over HTTPS: with `[api] tls_cert` and `tls_key` the gateway serves
//! TLS only; a client trusting the CA gets the API, one that does not is refused, and
//! plain HTTP gets nothing.

use std::path::Path;
use std::time::Duration;
use tend_testkit::certs::{CA_PEM, SERVER_CERT_PEM, SERVER_KEY_PEM};
use tend_testkit::config::{fleet_toml, write_secret, API_TOKEN};
use tend_testkit::ports::free_port;
use tend_testkit::procs::GatewayProc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotline_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let gw_dir = dir.path().join("gw");
    std::fs::create_dir_all(&gw_dir).unwrap();
    std::fs::write(gw_dir.join("server.pem"), SERVER_CERT_PEM).unwrap();
    write_secret(gw_dir.join("server.key"), SERVER_KEY_PEM).unwrap();
    std::fs::write(gw_dir.join("fleet.toml"), fleet_toml(&[])).unwrap();
    write_secret(gw_dir.join("api.token"), API_TOKEN).unwrap();
    let config = gw_dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "gateway_id = \"gw-tls\"\ndata_dir = \"data\"\nfleet = \"fleet.toml\"\n\n[broker]\nlisten = \"127.0.0.1:{}\"\n\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\ntls_cert = \"server.pem\"\ntls_key = \"server.key\"\ntls_handshake_timeout = \"1s\"\n",
            free_port()
        ),
    )
    .unwrap();
    let mut gw = GatewayProc::start(
        Path::new(env!("CARGO_BIN_EXE_tend-gateway")),
        &gw_dir,
        &config,
        &gw_dir.join("gateway.log"),
    )
    .await;
    assert!(gw.api.starts_with("https://127.0.0.1:"), "{}", gw.api);

    let ca = reqwest::Certificate::from_pem(CA_PEM.as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = client
        .get(format!("{}/api/v1/devices", gw.api))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{}/metrics", gw.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Untrusted: refused by the client; plain HTTP: no answer from a TLS port.
    let untrusted = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(untrusted
        .get(format!("{}/metrics", gw.api))
        .send()
        .await
        .is_err());
    let plain = gw.api.replacen("https://", "http://", 1);
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("{plain}/metrics"))
        .send()
        .await;
    assert!(r.is_err() || !r.unwrap().status().is_success());
    // A client that starts a handshake and stalls is let go (tls_handshake_timeout).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = gw.api.trim_start_matches("https://").to_string();
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(30), stalled.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a stalled TLS handshake was not closed: {closed:?}"
    );
    gw.kill().await;
}
