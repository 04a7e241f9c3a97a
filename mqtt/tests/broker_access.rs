//! The embedded broker with restricted access, over real sockets with a real rumqttc
//! client: who gets a session, who is refused and how, and TLS.

use rumqttc::{
    Client, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS, TlsConfiguration,
    Transport,
};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tend_mqtt::broker::{self, BrokerAccess, BrokerError, BrokerLimits, Login, ServerTls};
use tend_testkit::certs;

/// A bound on every wait for the broker's answer: a hang fails the test instead of
/// blocking it forever. Nothing is asserted about how long an answer takes.
const ANSWER_BOUND: Duration = Duration::from_secs(20);

fn limits() -> BrokerLimits {
    BrokerLimits {
        max_payload: 64 * 1024,
        max_inflight: 100,
        max_outgoing_packets: 100,
        max_segment_size: 1024 * 1024,
    }
}

fn any_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// Lets user `u` in with password `pw-u`, and user `x` only with client id `x`.
fn login() -> Login {
    Arc::new(|client_id: &str, user: &str, password: &str| {
        if user == "x" {
            return client_id == "x" && password == "pw-x";
        }
        password == format!("pw-{user}")
    })
}

fn options(id: &str, addr: SocketAddr, credentials: Option<(&str, &str)>) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    if let Some((u, p)) = credentials {
        o.set_credentials(u, p);
    }
    o
}

fn with_tls(mut o: MqttOptions, ca: &Path) -> MqttOptions {
    let config = tend_mqtt::client_config(&tend_mqtt::ClientTls {
        ca_file: Some(ca.to_path_buf()),
        ..Default::default()
    })
    .expect("client TLS config");
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )));
    o
}

/// The first answer to a connection attempt: the CONNACK's code, or the error.
fn connect_outcome(o: MqttOptions) -> Result<ConnectReturnCode, Box<ConnectionError>> {
    let (_client, mut conn) = Client::new(o, 10);
    match conn
        .recv_timeout(ANSWER_BOUND)
        .expect("an answer from the broker")
    {
        Ok(Event::Incoming(Packet::ConnAck(ack))) => Ok(ack.code),
        Ok(other) => panic!("first event is not a CONNACK: {other:?}"),
        Err(ConnectionError::ConnectionRefused(code)) => Ok(code),
        Err(e) => Err(Box::new(e)),
    }
}

/// Connects, subscribes to a topic, publishes on it and receives the message back.
fn round_trip(o: MqttOptions) {
    let (client, mut conn) = Client::new(o, 10);
    let topic = "tend/v1/test/up";
    client.subscribe(topic, QoS::AtLeastOnce).unwrap();
    let mut published = false;
    loop {
        let event = conn
            .recv_timeout(ANSWER_BOUND)
            .expect("an event from the broker")
            .expect("the session holds");
        match event {
            Event::Incoming(Packet::SubAck(_)) if !published => {
                client
                    .publish(topic, QoS::AtLeastOnce, false, b"hello".to_vec())
                    .unwrap();
                published = true;
            }
            Event::Incoming(Packet::Publish(p)) => {
                assert_eq!(p.topic, topic);
                assert_eq!(&p.payload[..], b"hello");
                return;
            }
            _ => {}
        }
    }
}

fn start(access: &BrokerAccess) -> broker::StartedBroker {
    broker::start(any_port(), &limits(), access).expect("broker starts")
}

fn login_only() -> BrokerAccess {
    BrokerAccess {
        login: Some(login()),
        ..Default::default()
    }
}

#[test]
fn anonymous_and_wrong_credentials_are_refused_and_counted() {
    let access = login_only();
    let b = start(&access);
    assert_eq!(
        connect_outcome(options("anon", b.addr, None)).unwrap(),
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        connect_outcome(options("u", b.addr, Some(("u", "wrong")))).unwrap(),
        ConnectReturnCode::BadUserNamePassword
    );
    // A password without a user name is no login either.
    assert_eq!(
        connect_outcome(options("u", b.addr, Some(("", "pw-")))).unwrap(),
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(access.refused.load(Ordering::Relaxed), 3);
}

#[test]
fn right_credentials_publish_and_subscribe() {
    let access = login_only();
    let b = start(&access);
    assert_eq!(
        connect_outcome(options("u", b.addr, Some(("u", "pw-u")))).unwrap(),
        ConnectReturnCode::Success
    );
    round_trip(options("u2", b.addr, Some(("u", "pw-u"))));
    assert_eq!(access.refused.load(Ordering::Relaxed), 0);
}

#[test]
fn the_login_sees_the_client_id() {
    let access = login_only();
    let b = start(&access);
    assert_eq!(
        connect_outcome(options("not-x", b.addr, Some(("x", "pw-x")))).unwrap(),
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        connect_outcome(options("x", b.addr, Some(("x", "pw-x")))).unwrap(),
        ConnectReturnCode::Success
    );
    assert_eq!(access.refused.load(Ordering::Relaxed), 1);
}

#[test]
fn the_loopback_side_asks_the_same_login() {
    let access = login_only();
    let b = start(&access);
    assert_ne!(b.local, b.addr);
    // rumqttd drops a refused CONNECT without a CONNACK: no session either way.
    let anonymous = connect_outcome(options("anon", b.local, None));
    assert!(
        !matches!(anonymous, Ok(ConnectReturnCode::Success)),
        "anonymous session on the loopback side"
    );
    let wrong = connect_outcome(options("u", b.local, Some(("u", "wrong"))));
    assert!(
        !matches!(wrong, Ok(ConnectReturnCode::Success)),
        "wrong password accepted on the loopback side"
    );
    round_trip(options("u", b.local, Some(("u", "pw-u"))));
}

#[test]
fn open_access_is_rumqttd_alone() {
    let b = start(&BrokerAccess::default());
    assert_eq!(b.addr, b.local);
    round_trip(options("anyone", b.addr, None));
}

/// The test CA, server certificate and key (mode 0600) in `dir`.
fn tls_files(dir: &Path) -> (PathBuf, ServerTls) {
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca, certs::CA_PEM).unwrap();
    std::fs::write(&cert, certs::SERVER_CERT_PEM).unwrap();
    tend_testkit::config::write_secret(&key, certs::SERVER_KEY_PEM).unwrap();
    (
        ca,
        ServerTls {
            cert_file: cert,
            key_file: key,
        },
    )
}

#[test]
fn tls_listener_takes_tls_clients_only() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = tls_files(dir.path());
    let access = BrokerAccess {
        login: Some(login()),
        tls: Some(tls),
        ..Default::default()
    };
    let b = start(&access);

    // A TCP connection that never starts its handshake holds nobody else up.
    let idle = std::net::TcpStream::connect(b.addr).unwrap();
    round_trip(with_tls(options("u", b.addr, Some(("u", "pw-u"))), &ca));
    assert_eq!(
        connect_outcome(with_tls(options("anon", b.addr, None), &ca)).unwrap(),
        ConnectReturnCode::NotAuthorized
    );
    drop(idle);

    // Plain MQTT on the TLS port: the handshake fails and no CONNACK comes.
    let plain = connect_outcome(options("u", b.addr, Some(("u", "pw-u"))));
    assert!(plain.is_err(), "plain client got {plain:?}");

    // A client that does not trust the broker's CA does not connect.
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, certs::OTHER_CA_PEM).unwrap();
    let untrusting = connect_outcome(with_tls(
        options("u", b.addr, Some(("u", "pw-u"))),
        &other_ca,
    ));
    assert!(
        matches!(
            untrusting.as_ref().map_err(|e| &**e),
            Err(ConnectionError::Tls(_))
        ),
        "{untrusting:?}"
    );
    assert_eq!(access.refused.load(Ordering::Relaxed), 1);
}

#[test]
fn tls_without_login_lets_anyone_with_tls_in() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = tls_files(dir.path());
    let b = start(&BrokerAccess {
        tls: Some(tls),
        ..Default::default()
    });
    round_trip(with_tls(options("anyone", b.addr, None), &ca));
}

fn tls_start_error(tls: ServerTls) -> String {
    let access = BrokerAccess {
        tls: Some(tls),
        ..Default::default()
    };
    match broker::start(any_port(), &limits(), &access) {
        Err(e @ BrokerError::Tls { .. }) => e.to_string(),
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[test]
fn a_key_open_to_others_is_refused_naming_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (_, tls) = tls_files(dir.path());
    std::fs::set_permissions(&tls.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = tls_start_error(tls.clone());
    let shown = tls.key_file.display().to_string();
    assert!(e.contains(&format!("chmod 600 {shown}")), "{e}");
    assert!(e.contains("mode 0644"), "{e}");
    assert!(!e.contains("PRIVATE KEY"), "{e}");
}

#[test]
fn unusable_tls_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_, tls) = tls_files(dir.path());

    let missing = dir.path().join("missing.pem");
    let e = tls_start_error(ServerTls {
        cert_file: missing.clone(),
        ..tls.clone()
    });
    assert!(e.contains("cannot read the server certificate"), "{e}");
    assert!(e.contains(&missing.display().to_string()), "{e}");

    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let e = tls_start_error(ServerTls {
        cert_file: not_pem.clone(),
        ..tls.clone()
    });
    assert!(e.contains("server certificate"), "{e}");
    assert!(e.contains(&not_pem.display().to_string()), "{e}");

    // A private file holding a certificate, not a key.
    let no_key = dir.path().join("no.key");
    tend_testkit::config::write_secret(&no_key, certs::SERVER_CERT_PEM).unwrap();
    let e = tls_start_error(ServerTls {
        key_file: no_key.clone(),
        ..tls.clone()
    });
    assert!(e.contains("no usable private key"), "{e}");
    assert!(e.contains(&no_key.display().to_string()), "{e}");

    let missing_key = dir.path().join("missing.key");
    let e = tls_start_error(ServerTls {
        key_file: missing_key.clone(),
        ..tls
    });
    assert!(e.contains("cannot read the server key"), "{e}");
    assert!(e.contains(&missing_key.display().to_string()), "{e}");
}

/// What the process logs through tracing from the first call on (the broker's front
/// logs on threads of its own, so only a global subscriber sees it).
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Capture(sink.clone()))
            .try_init()
            .expect("the only subscriber of this test binary");
        log
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn refusals_are_logged_once_a_minute_per_user_and_never_with_the_password() {
    let log = captured_log();
    let access = login_only();
    let b = start(&access);
    for i in 0..3 {
        let o = options(
            &format!("probe-{i}"),
            b.addr,
            Some(("log-probe", "NEVER-LOGGED")),
        );
        assert_eq!(
            connect_outcome(o).unwrap(),
            ConnectReturnCode::BadUserNamePassword
        );
    }
    let o = options("other", b.addr, Some(("log-other", "NEVER-LOGGED")));
    assert_eq!(
        connect_outcome(o).unwrap(),
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(access.refused.load(Ordering::Relaxed), 4);
    // The line is written before the CONNACK goes out, so it is there now.
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let lines_about = |user: &str| text.lines().filter(|l| l.contains(user)).count();
    assert_eq!(lines_about("\"log-probe\""), 1, "{text}");
    assert_eq!(lines_about("\"log-other\""), 1, "{text}");
    assert!(text.contains("client id \"probe-0\""), "{text}");
    assert!(!text.contains("NEVER-LOGGED"), "{text}");
}
