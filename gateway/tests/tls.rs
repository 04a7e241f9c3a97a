//! The hotline API over HTTPS: with `[api] tls_cert` and `tls_key` the gateway serves
//! TLS only; a client trusting the CA gets the API, one that does not is refused, and
//! plain HTTP gets nothing.

mod common;

use common::*;
use std::time::Duration;

// Test-only certificates (P-256, valid until 2126), copied from agent/tests/uplink.rs:
// a CA and a server certificate for localhost / 127.0.0.1 signed by it.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotline_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let gw_dir = dir.path().join("gw");
    std::fs::create_dir_all(&gw_dir).unwrap();
    std::fs::write(gw_dir.join("server.pem"), SERVER_CERT_PEM).unwrap();
    std::fs::write(gw_dir.join("server.key"), SERVER_KEY_PEM).unwrap();
    std::fs::write(gw_dir.join("fleet.toml"), fleet_toml(&[])).unwrap();
    std::fs::write(gw_dir.join("api.token"), API_TOKEN).unwrap();
    let config = gw_dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "gateway_id = \"gw-tls\"\ndata_dir = \"data\"\nfleet = \"fleet.toml\"\n\n[broker]\nlisten = \"127.0.0.1:{}\"\n\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\ntls_cert = \"server.pem\"\ntls_key = \"server.key\"\n",
            free_port()
        ),
    )
    .unwrap();
    let mut gw = GatewayProc::start(&gw_dir, &config, &gw_dir.join("gateway.log")).await;
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
    gw.kill().await;
}
