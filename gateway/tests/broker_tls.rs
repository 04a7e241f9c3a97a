//! The embedded broker over TLS: with `[broker] tls_cert` and `tls_key` the gateway's
//! broker speaks only TLS to agents, its own MQTT link still works (it uses the plain
//! loopback side), only enrolled agents get a session, and the refused-connection count
//! is a metric.

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tend_testkit::certs::{CA_PEM, SERVER_CERT_PEM, SERVER_KEY_PEM};
use tend_testkit::config::{fleet_toml, write_secret, API_TOKEN};
use tend_testkit::ports::free_port;
use tend_testkit::procs::GatewayProc;

/// A bound on each wait, so a hang fails the test; nothing is asserted about time.
const BOUND: Duration = Duration::from_secs(60);

fn options(id: &str, url: &str, ca: Option<&Path>) -> MqttOptions {
    let hostport = url
        .trim_start_matches("mqtts://")
        .trim_start_matches("mqtt://");
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let mut o = MqttOptions::new(id, host, port.parse::<u16>().unwrap());
    if let Some(ca) = ca {
        let config = tend_mqtt::client_config(&tend_mqtt::ClientTls {
            ca_file: Some(ca.to_path_buf()),
            ..Default::default()
        })
        .unwrap();
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let gw_dir = dir.path().join("gw");
    std::fs::create_dir_all(&gw_dir).unwrap();
    std::fs::write(gw_dir.join("ca.pem"), CA_PEM).unwrap();
    std::fs::write(gw_dir.join("broker.pem"), SERVER_CERT_PEM).unwrap();
    write_secret(gw_dir.join("broker.key"), SERVER_KEY_PEM).unwrap();
    std::fs::write(gw_dir.join("fleet.toml"), fleet_toml(&[])).unwrap();
    write_secret(gw_dir.join("api.token"), API_TOKEN).unwrap();
    let config = gw_dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "gateway_id = \"gw-mqtts\"\ndata_dir = \"data\"\nfleet = \"fleet.toml\"\n\n\
             [broker]\nembedded = true\nlisten = \"127.0.0.1:{}\"\n\
             tls_cert = \"broker.pem\"\ntls_key = \"broker.key\"\n\n\
             [api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\n",
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
    assert!(
        gw.broker_url.starts_with("mqtts://127.0.0.1:"),
        "{}",
        gw.broker_url
    );

    // An enrolled agent trusting the CA gets a session and publishes on its topic; the
    // gateway's own link receives it (and refuses it: it is not sealed).
    let key = tend_testkit::trust::enrol(
        Path::new(env!("CARGO_BIN_EXE_tend-gateway")),
        &config,
        "a-probe",
        &dir.path().join("a-probe.cred"),
    );
    let ca = gw_dir.join("ca.pem");
    let mut opts = options("a-probe", &gw.broker_url, Some(&ca));
    opts.set_credentials("a-probe", key.broker_password("a-probe"));
    let (client, mut el) = AsyncClient::new(opts, 8);
    tokio::time::timeout(BOUND, async {
        loop {
            match el.poll().await.expect("TLS session") {
                Event::Incoming(Packet::ConnAck(_)) => break,
                _ => continue,
            }
        }
    })
    .await
    .expect("CONNACK over TLS");
    client
        .publish(
            "tend/v1/a-probe/up",
            QoS::AtLeastOnce,
            false,
            b"not a batch".to_vec(),
        )
        .await
        .unwrap();
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    tokio::time::timeout(BOUND, async {
        loop {
            let m = gw.metrics().await;
            if m.lines().any(|l| {
                l.starts_with("tend_gateway_rejected_messages_total{reason=\"unsigned\"} ")
                    && !l.ends_with(" 0")
            }) {
                assert!(
                    m.contains("tend_gateway_broker_refused_connections_total 0"),
                    "{m}"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the gateway's link saw the message published over TLS");

    // Over TLS without credentials, or with another agent's name: no session, counted.
    for (id, user) in [("anon", None), ("a-other", Some("a-other"))] {
        let mut opts = options(id, &gw.broker_url, Some(&ca));
        if let Some(u) = user {
            opts.set_credentials(u, key.broker_password("a-probe"));
        }
        let (_c, mut el) = AsyncClient::new(opts, 8);
        let first = tokio::time::timeout(BOUND, async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => return Ok(a),
                    Ok(_) => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("an answer");
        assert!(first.is_err(), "{id} got a session: {first:?}");
    }
    tokio::time::timeout(BOUND, async {
        while !gw
            .metrics()
            .await
            .contains("tend_gateway_broker_refused_connections_total 2")
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("both refusals counted");

    // Plain MQTT on the TLS port gets no session.
    let (_plain, mut el) = AsyncClient::new(options("plain", &gw.broker_url, None), 8);
    let first = tokio::time::timeout(BOUND, el.poll())
        .await
        .expect("an answer");
    assert!(first.is_err(), "plain client got {first:?}");
    gw.kill().await;
}
