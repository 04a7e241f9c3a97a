//! `tend-gateway run --config FILE --check`, the built binary against real sockets: a
//! good config exits 0; a bad key exits 2 naming file, line and key; a listen address in
//! use, an unreachable backend or external broker exits 2 naming it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use tend_testkit::config::{
    fleet_toml, gateway_toml, write_secret, BrokerChoice, FleetDevice, GatewaySpec,
};
use tend_testkit::ports::free_port;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_tend-gateway");

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check(config: &Path) -> Run {
    let out = Command::new(GATEWAY_BIN)
        .args(["run", "--check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn line_of<'a>(run: &'a Run, item: &str) -> &'a str {
    run.stdout
        .lines()
        .find(|l| l.contains(item))
        .unwrap_or_else(|| panic!("no line about {item:?}:\n{}", run.stdout))
}

/// Writes `config` with its fleet and token files into `dir`.
fn write(dir: &Path, config: &str) -> PathBuf {
    write_secret(dir.join("api.token"), "t0ken-for-the-test\n").unwrap();
    write_secret(dir.join("backend.token"), "b4ckend-for-the-test\n").unwrap();
    let fleet = fleet_toml(&[FleetDevice {
        id: "icu7-vent",
        serial: "AV5C-21-004417",
        site: "s-main",
        location: "ICU bed 7",
        accepted: "2025-06-01",
    }]);
    std::fs::write(dir.join("fleet.toml"), fleet).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn config(broker: BrokerChoice, backend: Option<&str>) -> String {
    gateway_toml(&GatewaySpec {
        id: "gw-check",
        broker,
        backend,
        fleet: "",
    })
}

#[test]
fn good_config_passes_and_starts_nothing() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", backend.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &config(BrokerChoice::Embedded(free_port()), Some(&url)),
    );
    let run = check(&path);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    for item in [
        "config ",
        "data_dir ",
        "embedded broker ",
        "api ",
        "backend ",
    ] {
        assert!(line_of(&run, item).starts_with("ok "), "{}", run.stdout);
    }
    assert!(run.stdout.contains("all 5 checks passed"), "{}", run.stdout);
    assert!(!dir.path().join("data").exists(), "--check made the store");
}

#[test]
fn bad_key_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let src = config(BrokerChoice::Embedded(free_port()), None)
        .replace("[api]\n", "[api]\nlisen = \"127.0.0.1:1\"\n");
    let line = src.lines().position(|l| l.starts_with("lisen")).unwrap() + 1;
    let path = write(dir.path(), &src);
    let run = check(&path);
    assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
    let want = format!("{}:{line}: key `api.lisen`", path.display());
    assert!(
        run.stderr.contains(&want),
        "want {want:?} in {}",
        run.stderr
    );
    assert!(!run.stderr.contains("t0ken"), "{}", run.stderr);
}

#[test]
fn a_taken_port_and_unreachable_peers_are_named() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let (dead_backend, dead_broker) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();

    let src = config(
        BrokerChoice::Embedded(taken_port),
        Some(&format!("http://127.0.0.1:{dead_backend}")),
    );
    let run = check(&write(dir.path(), &src));
    assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
    let broker = line_of(&run, "embedded broker ");
    assert!(
        broker.starts_with("FAIL ") && broker.contains("in use"),
        "{broker}"
    );
    let backend = line_of(&run, "backend ");
    assert!(
        backend.starts_with("FAIL ") && backend.contains(&format!("127.0.0.1:{dead_backend}")),
        "{backend}"
    );
    assert!(line_of(&run, "api ").starts_with("ok "), "{}", run.stdout);
    assert!(
        run.stdout.contains("2 of 5 checks failed"),
        "{}",
        run.stdout
    );

    let src = config(
        BrokerChoice::External {
            url: format!("mqtt://127.0.0.1:{dead_broker}"),
            group: None,
        },
        None,
    );
    let run = check(&write(dir.path(), &src));
    assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
    let broker = line_of(&run, "broker ");
    assert!(
        broker.starts_with("FAIL ") && broker.contains(&format!("127.0.0.1:{dead_broker}")),
        "{broker}"
    );
    drop(taken);
}

/// The example config and fleet file the package installs under /etc/tend pass `check`
/// (with the hotline token the package makes at installation).
#[test]
fn the_packaged_example_config_is_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/etc");
    let dir = tempfile::tempdir().unwrap();
    for file in ["gateway.toml", "fleet.toml"] {
        std::fs::copy(examples.join(file), dir.path().join(file)).unwrap();
    }
    write_secret(dir.path().join("hotline.token"), "t0ken-for-the-test\n").unwrap();
    let out = Command::new(GATEWAY_BIN)
        .args(["check", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
