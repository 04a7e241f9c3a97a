//! Scenarios applied to running simulators, and the `tend-devsim` binary end to end.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use tend_devsim::av500::{Av500Config, Av500Sim};
use tend_devsim::lip300::{Lip300Config, Lip300Sim};
use tend_devsim::scenario::{self, Scenario, Target};
use tokio_modbus::prelude::*;
use tokio_serial::Parity;

fn err_field(reply: &[u8]) -> String {
    let t = String::from_utf8_lossy(reply).into_owned();
    let i = t.find("|ERR=").expect("ERR") + 5;
    t[i..].split('|').next().unwrap().to_string()
}

#[tokio::test]
async fn a_scenario_raises_and_clears_faults_while_serving() {
    let lip = Lip300Sim::spawn_pty(Lip300Config::v3()).await.unwrap();
    let path = lip.path().to_path_buf();
    let av = Av500Sim::spawn_tcp(Av500Config::v5(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = av.addr().unwrap();
    let sc = Scenario::parse(
        r#"
[[step]]
at = "300ms"
device = "pump"
action = "fault"
code = 310
for = "900ms"

[[step]]
at = "300ms"
device = "vent*"
action = "flap"
word = 1
bit = 1
every = "400ms"
for = "1200ms"
"#,
        "inline.toml",
    )
    .unwrap();
    let targets = vec![
        ("pump".to_string(), Target::Lip300(lip)),
        ("vent-1".to_string(), Target::Av500(av)),
    ];
    sc.check(
        &targets
            .iter()
            .map(|(n, t)| (n.clone(), t.kind()))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let applied = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = applied.clone();
    let runner = tokio::spawn(async move {
        scenario::run(&sc, &targets, |step, dev, r| {
            log.lock()
                .unwrap()
                .push((step.at, dev.to_string(), r.is_ok()));
        })
        .await;
        targets // keep the simulators alive until the end
    });

    let mut port = common::open_serial(&path, 9600, Parity::None);
    let mut ctx = tcp::connect_slave(addr, Slave(1)).await.unwrap();
    let mut errs = Vec::new();
    let mut words = Vec::new();
    let t0 = tokio::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(1700) {
        let r = common::lip_exchange(&mut port, b"\x02Q|STATUS*4839\x03").await;
        errs.push(err_field(&r));
        words.push(ctx.read_input_registers(1, 1).await.unwrap().unwrap()[0]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let targets = runner.await.unwrap();
    // the pump's ERR went 0 → 310 → 0
    let first310 = errs.iter().position(|e| e == "310").expect("fault raised");
    assert!(errs[..first310].iter().all(|e| e == "0"));
    assert_eq!(errs.last().unwrap(), "0", "fault cleared: {errs:?}");
    // the ventilator's turbine-failure bit toggled several times
    let toggles = words.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(toggles >= 3, "{words:?}");
    assert_eq!(*words.last().unwrap(), 0);
    assert!(applied.lock().unwrap().iter().all(|(_, _, ok)| *ok));
    drop(targets);
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tend-devsim"))
}

#[test]
fn help_and_bad_arguments() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("run"));
    let out = bin().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--scenario") && help.contains("--firmware-set") && help.contains("--broker")
    );
    let out = bin()
        .args(["run", "--firmware-set", "ancient"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ancient"));
    let out = bin()
        .args(["run", "--broker", "http://x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_scenario_file_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(
        &f,
        "[[step]]\nat = \"10s\"\ndevice = \"lip300-a\"\naction = \"fault\"\nbit = 99\n",
    )
    .unwrap();
    let out = bin().args(["run", "--scenario"]).arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:5: key `bit`", f.display())),
        "{err}"
    );

    std::fs::write(
        &f,
        "[[step]]\nat = \"10s\"\ndevice = \"toaster\"\naction = \"silent\"\n",
    )
    .unwrap();
    let out = bin().args(["check"]).arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":4: key `device`"));
    let out = bin().args(["check", "demo"]).output().unwrap();
    assert!(out.status.success());
}

#[test]
fn run_prints_one_line_per_device_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("s.toml");
    std::fs::write(
        &f,
        "[[step]]\nat = \"200ms\"\ndevice = \"lip300-b\"\naction = \"fault\"\ncode = 322\n",
    )
    .unwrap();
    let mut child = bin()
        .args([
            "run",
            "--firmware-set",
            "both",
            "--status-interval",
            "1s",
            "--scenario",
        ])
        .arg(&f)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut devices = Vec::new();
    let mut broker = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("ready ") {
            assert_eq!(line, "ready devices=10");
            break;
        }
        if line.starts_with("broker ") {
            broker = Some(line);
        } else {
            assert!(line.starts_with("device "), "{line}");
            devices.push(line);
        }
    }
    let broker = broker.expect("embedded broker line");
    assert!(
        broker.starts_with("broker embedded address=127.0.0.1:"),
        "{broker}"
    );
    assert_eq!(devices.len(), 10);
    let kv = |line: &str, key: &str| -> String {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} in {line}"))
            .to_string()
    };
    let find = |name: &str| {
        devices
            .iter()
            .find(|l| l.starts_with(&format!("device {name} ")))
            .unwrap()
            .clone()
    };
    let lip_b = find("lip300-b");
    assert!(
        lip_b.contains("model=lumen/lip-300 fw=2.4.1 transport=serial port=/dev/pts/"),
        "{lip_b}"
    );
    assert!(lip_b.contains(" baud=9600"));
    let rtu = find("av500-rtu-a");
    assert!(
        rtu.contains("model=aeris/av-500 fw=5.2.1 transport=modbus-rtu port=/dev/pts/")
            && rtu.contains("baud=19200 parity=even unit=1"),
        "{rtu}"
    );
    let tcp_b = find("av500-tcp-b");
    assert!(tcp_b.contains("transport=modbus-tcp address=127.0.0.1:") && tcp_b.contains("unit=1"));
    let hm = find("hm2-a");
    assert!(
        hm.contains("model=cryosense/hm-2 fw=3.5 transport=modbus-tcp"),
        "{hm}"
    );
    let vm = find("vm12-a");
    assert!(
        vm.contains("model=vistara/vm-12 fw=7.4.2 transport=mqtt broker=mqtt://127.0.0.1:")
            && vm.contains("serial=VM12-00A4471"),
        "{vm}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // this test process is not the simulator's: it opens the pty like the agent would
        let mut port = common::open_serial(
            std::path::Path::new(&kv(&lip_b, "port")),
            9600,
            Parity::None,
        );
        let mut seen = String::new();
        for _ in 0..20 {
            let r = common::lip_exchange(&mut port, b"\x02Q|STATUS*39\x03").await;
            seen = err_field(&r);
            if seen == "322" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen, "322", "the scenario's fault shows on the pump");
        let port =
            common::open_serial(std::path::Path::new(&kv(&rtu, "port")), 19200, Parity::Even);
        let mut ctx = rtu::attach_slave(port, Slave(1));
        assert_eq!(
            ctx.read_holding_registers(0, 3).await.unwrap().unwrap(),
            vec![5, 2, 1]
        );
        let mut ctx = tcp::connect_slave(kv(&tcp_b, "address").parse().unwrap(), Slave(1))
            .await
            .unwrap();
        assert_eq!(
            ctx.read_holding_registers(0, 1).await.unwrap().unwrap(),
            vec![4]
        );
        let mut ctx = tcp::connect_slave(kv(&hm, "address").parse().unwrap(), Slave(1))
            .await
            .unwrap();
        assert_eq!(
            ctx.read_holding_registers(12, 1).await.unwrap().unwrap(),
            vec![305]
        );
    });
    // the scenario step was reported
    let step = lines.next().unwrap().unwrap();
    assert!(
        step.starts_with("step t=0.2 device=lip300-b action=fault code=322 ok"),
        "{step}"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}
