//! An MQTT device (VM-12) on an `mqtts://` broker: the agent's link reads it over TLS,
//! trusting the device's `ca_file`, and sends its `username` / `password_file`. The
//! simulator publishes to the plain embedded broker; a TLS-terminating proxy in front of
//! that broker is what the agent connects to (rumqttd is built without TLS here).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tend_agent::config;
use tend_agent::run::{spawn_links, Shared};
use tend_devsim::vm12::{Vm12Config, Vm12Sim};
use tend_testkit::certs::CA_PEM;
use tend_testkit::config::write_secret;
use tend_testkit::tls_proxy::tls_proxy;
use tokio::sync::mpsc;

fn agent_config(dir: &Path, broker: &str) -> String {
    format!(
        r#"
agent_id = "agent-tls-device"
site_id = "s-1"
data_dir = "data"
[uplink]
broker = "mqtt://127.0.0.1:1"
credentials = "agent-tls-device.cred"
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
    let (tls_addr, _proxy) = tls_proxy(broker.addr(), false).await;

    let dir = tempfile::tempdir().unwrap();
    tend_testkit::trust::credentials(dir.path(), "agent-tls-device");
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
    tend_testkit::trust::credentials(dir.path(), "agent-tls-device");
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
