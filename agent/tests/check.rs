//! `tend-agent run --config FILE --check`, the built binary against real things: a
//! LIP-300 on a pty, a Modbus TCP listener, an MQTT device's broker and an `mqtts://`
//! uplink behind a TLS proxy. A good config exits 0; a bad key exits 2 naming file, line
//! and key; an unreachable device, broker or TLS peer exits 2 naming it.

use std::path::Path;
use std::time::Duration;
use tend_devsim::{Lip300Config, Lip300Handle, Lip300Sim};
use tend_testkit::certs::{CA_PEM, OTHER_CA_PEM};
use tend_testkit::ports::free_port;
use tend_testkit::tls_proxy::tls_proxy;
use tokio::net::TcpListener;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `tend-agent run --config CONFIG --check`; the simulators stay served meanwhile.
async fn check(config: &Path) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tend-agent"));
    cmd.args(["run", "--check", "--config"])
        .arg(config)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("check did not finish in 60 s")
        .expect("check could not be started");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The line of `stdout` about `item`.
fn line_of<'a>(run: &'a Run, item: &str) -> &'a str {
    run.stdout
        .lines()
        .find(|l| l.contains(item))
        .unwrap_or_else(|| panic!("no line about {item:?}:\n{}", run.stdout))
}

/// A config with an `mqtts://` uplink (CA file `ca.pem`), a serial pump, a Modbus TCP
/// helium monitor and an MQTT patient monitor.
fn config(uplink: &str, pump_port: &str, helium: &str, monitor_broker: &str) -> String {
    format!(
        r#"agent_id = "agent-icu-a"
site_id = "s-017-main"
data_dir = "data"

[uplink]
broker = "{uplink}"
ca_file = "ca.pem"
credentials = "agent-icu-a.cred"

[[device]]
id = "ward3-pump"
profile = "lumen/lip-300"
transport = "serial"
port = "{pump_port}"

[[device]]
id = "lab-helium"
profile = "cryosense/hm-2"
transport = "modbus-tcp"
address = "{helium}"

[[device]]
id = "icu7-monitor"
profile = "vistara/vm-12"
transport = "mqtt"
broker = "{monitor_broker}"
serial = "VM12-00A4471"
"#
    )
}

/// Everything the good config names, running.
struct Site {
    pump: Lip300Handle,
    helium: TcpListener,
    broker: TcpListener,
    uplink: String,
    _proxy: tend_testkit::tls_proxy::ProxyTask,
}

impl Site {
    async fn start() -> Site {
        let pump = Lip300Sim::spawn_pty(Lip300Config::v3()).await.unwrap();
        let helium = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let broker = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tls_addr, proxy) = tls_proxy(broker.local_addr().unwrap(), false).await;
        Site {
            pump,
            helium,
            uplink: format!("mqtts://localhost:{}", tls_addr.port()),
            broker,
            _proxy: proxy,
        }
    }

    fn pump_port(&self) -> String {
        self.pump.path().display().to_string()
    }

    fn helium(&self) -> String {
        self.helium.local_addr().unwrap().to_string()
    }

    fn broker(&self) -> String {
        format!("mqtt://{}", self.broker.local_addr().unwrap())
    }

    fn config(&self) -> String {
        config(
            &self.uplink,
            &self.pump_port(),
            &self.helium(),
            &self.broker(),
        )
    }
}

fn write(dir: &Path, config: &str, ca: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("ca.pem"), ca).unwrap();
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    tend_testkit::trust::credentials(dir, "agent-icu-a");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_config_passes() {
    let site = Site::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &site.config(), CA_PEM);
    let run = check(&path).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        line_of(&run, "config ").starts_with("ok "),
        "{}",
        run.stdout
    );
    assert!(
        line_of(&run, "data_dir ").starts_with("ok "),
        "{}",
        run.stdout
    );
    let uplink = line_of(&run, "uplink ");
    assert!(
        uplink.starts_with("ok ") && uplink.contains("TLS handshake passes"),
        "{uplink}"
    );
    for device in ["ward3-pump", "lab-helium", "icu7-monitor"] {
        assert!(line_of(&run, device).starts_with("ok "), "{}", run.stdout);
    }
    assert!(run.stdout.contains("all 6 checks passed"), "{}", run.stdout);
    // Nothing was started: no outbox was made.
    assert!(!dir.path().join("data").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_names_file_line_and_key() {
    let site = Site::start().await;
    let dir = tempfile::tempdir().unwrap();
    let good = site.config();
    let bad = good.replacen(
        "transport = \"modbus-tcp\"",
        "transport = \"modbus-tcp\"\nspeed = 3",
        1,
    );
    let line = bad.lines().position(|l| l == "speed = 3").unwrap() + 1;
    let path = write(dir.path(), &bad, CA_PEM);
    let run = check(&path).await;
    assert_eq!(run.code, 2, "{}\n{}", run.stdout, run.stderr);
    let want = format!("{}:{line}: key `device[1].speed`", path.display());
    assert!(
        run.stderr.contains(&want),
        "want {want:?} in {}",
        run.stderr
    );
    assert!(
        line_of(&run, "config ").starts_with("FAIL "),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_devices_and_broker_are_named() {
    let site = Site::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on these ports, and no such serial port exists.
    let (dead_helium, dead_broker, dead_uplink) = (free_port(), free_port(), free_port());
    let src = config(
        &format!("mqtts://localhost:{dead_uplink}"),
        "/dev/tend-check-no-such-port",
        &format!("127.0.0.1:{dead_helium}"),
        &format!("mqtt://127.0.0.1:{dead_broker}"),
    );
    let path = write(dir.path(), &src, CA_PEM);
    let run = check(&path).await;
    assert_eq!(run.code, 2, "{}\n{}", run.stdout, run.stderr);
    for (item, names) in [
        ("uplink ", format!("localhost:{dead_uplink}")),
        ("ward3-pump", "/dev/tend-check-no-such-port".to_string()),
        ("lab-helium", format!("127.0.0.1:{dead_helium}")),
        ("icu7-monitor", format!("127.0.0.1:{dead_broker}")),
    ] {
        let l = line_of(&run, item);
        assert!(l.starts_with("FAIL ") && l.contains(&names), "{l}");
    }
    assert!(
        line_of(&run, "config ").starts_with("ok "),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("4 of 6 checks failed"),
        "{}",
        run.stdout
    );

    // One device down among good ones: only it fails.
    let src = site.config().replace(
        &format!("address = \"{}\"", site.helium()),
        &format!("address = \"127.0.0.1:{dead_helium}\""),
    );
    let path = write(dir.path(), &src, CA_PEM);
    let run = check(&path).await;
    assert_eq!(run.code, 2, "{}\n{}", run.stdout, run.stderr);
    assert!(line_of(&run, "lab-helium").starts_with("FAIL "));
    assert!(line_of(&run, "ward3-pump").starts_with("ok "));
    assert!(
        run.stdout.contains("1 of 6 checks failed"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_with_the_wrong_ca_fails_its_handshake() {
    let site = Site::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &site.config(), OTHER_CA_PEM);
    let run = check(&path).await;
    assert_eq!(run.code, 2, "{}\n{}", run.stdout, run.stderr);
    let uplink = line_of(&run, "uplink ");
    assert!(
        uplink.starts_with("FAIL ") && uplink.contains("TLS handshake"),
        "{uplink}"
    );
    assert!(
        run.stdout.contains("1 of 6 checks failed"),
        "{}",
        run.stdout
    );
}

/// The example config the package installs as /etc/tend/agent.toml loads, and `--check`
/// names exactly its placeholder gateway and device as unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packaged_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/etc/agent.toml");
    let src = std::fs::read_to_string(example).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Its data_dir is the package's /var/lib/tend-agent; here a fresh one.
    let src = src.replace("\"/var/lib/tend-agent\"", "\"data\"");
    let path = write(dir.path(), &src, CA_PEM);
    // Its credentials, as `tend-gateway agent add agent-example` writes them.
    tend_testkit::trust::credentials(dir.path(), "agent-example");
    let run = check(&path).await;
    assert_eq!(run.code, 2, "{}\n{}", run.stdout, run.stderr);
    assert!(
        line_of(&run, "config ").starts_with("ok "),
        "{}",
        run.stdout
    );
    assert!(
        line_of(&run, "data_dir ").starts_with("ok "),
        "{}",
        run.stdout
    );
    assert!(
        line_of(&run, "uplink ").starts_with("FAIL "),
        "{}",
        run.stdout
    );
    assert!(
        line_of(&run, "icu7-vent").starts_with("FAIL "),
        "{}",
        run.stdout
    );
}
