//! The running agent's link tasks against the simulators of all four manuals: every
//! device identified and read on schedule, a fault raised in a simulator becomes an
//! episode, profile-listed device requests answer through the link that owns the device,
//! and no patient data reaches a record.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tend_agent::config;
use tend_agent::monitor::DeviceMonitor;
use tend_agent::run::{spawn_links, DeviceRequest, Shared};
use tend_devsim::av500::{Av500Config, Av500Sim};
use tend_devsim::hm2::{Hm2Config, Hm2Sim};
use tend_devsim::lip300::{Lip300Config, Lip300Sim};
use tend_devsim::vm12::{Vm12Config, Vm12Sim};
use tend_wire::{EpisodeChange, RecordBody};
use tokio::sync::{mpsc, oneshot};

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_devices_read_faults_become_episodes_and_requests_answer() {
    let lip = Lip300Sim::spawn_pty(Lip300Config::v3()).await.unwrap();
    let av_tcp = Av500Sim::spawn_tcp(Av500Config::v5(), local())
        .await
        .unwrap();
    let av_rtu = Av500Sim::spawn_rtu_pty(Av500Config::v4()).await.unwrap();
    let hm2 = Hm2Sim::spawn_tcp(Hm2Config::v3(), local()).await.unwrap();
    let broker = tend_devsim::broker::spawn_embedded().unwrap();
    let mut vm_cfg = Vm12Config::v7("127.0.0.1", broker.port());
    vm_cfg.status_interval = Duration::from_millis(500);
    let vm = Vm12Sim::spawn(vm_cfg).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    tend_testkit::trust::credentials(dir.path(), "agent-test");
    let src = format!(
        r#"
agent_id = "agent-test"
site_id = "s-1"
data_dir = "data"
flap_damping = "1s"
[uplink]
broker = "{url}"
credentials = "agent-test.cred"
[[device]]
id = "pump"
profile = "lumen/lip-300"
transport = "serial"
port = "{lip}"
poll_interval = "200ms"
[[device]]
id = "vent-tcp"
profile = "aeris/av-500"
transport = "modbus-tcp"
address = "{av_tcp}"
poll_interval = "200ms"
[[device]]
id = "vent-rtu"
profile = "aeris/av-500"
transport = "modbus-rtu"
port = "{av_rtu}"
poll_interval = "200ms"
[[device]]
id = "mri"
profile = "cryosense/hm-2"
transport = "modbus-tcp"
address = "{hm2}"
poll_interval = "200ms"
[[device]]
id = "monitor"
profile = "vistara/vm-12"
transport = "mqtt"
broker = "{url}"
serial = "VM12-00A4471"
"#,
        url = broker.url(),
        lip = lip.path().display(),
        av_tcp = av_tcp.addr().unwrap(),
        av_rtu = av_rtu.path().unwrap().display(),
        hm2 = hm2.addr(),
    );
    let loaded = config::parse("agent.toml", &src, dir.path()).unwrap();
    let shared = Arc::new(Shared::default());
    let (tx, mut rx) = mpsc::channel(64);
    let tasks = spawn_links(&loaded, shared.clone(), tx);
    let mut monitors: BTreeMap<String, DeviceMonitor> = loaded
        .config
        .devices
        .iter()
        .map(|d| {
            (
                d.id.clone(),
                DeviceMonitor::new("agent-test", &d.id, &d.profile, Duration::from_secs(1)),
            )
        })
        .collect();
    let mut records: Vec<(String, RecordBody)> = Vec::new();

    async fn run_until(
        rx: &mut mpsc::Receiver<tend_agent::run::Observation>,
        monitors: &mut BTreeMap<String, DeviceMonitor>,
        set: &tend_profiles::ProfileSet,
        records: &mut Vec<(String, RecordBody)>,
        within: Duration,
        done: impl Fn(&[(String, RecordBody)]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !done(records) {
            let Ok(Some(obs)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
                return false;
            };
            let m = monitors.get_mut(&obs.device).unwrap();
            let bodies = match obs.result {
                Ok(read) => m.observe(obs.at, read),
                Err(_) => m.observe_failure(obs.at, set),
            };
            records.extend(bodies.into_iter().map(|b| (obs.device.clone(), b)));
        }
        true
    }

    let identified = |recs: &[(String, RecordBody)], dev: &str, fw: &str| {
        recs.iter().any(|(d, b)| {
            d == dev && matches!(b, RecordBody::Identity { firmware, .. } if firmware == fw)
        })
    };
    let all_identified = |r: &[(String, RecordBody)]| {
        identified(r, "pump", "3.1.0")
            && identified(r, "vent-tcp", "5.2.1")
            && identified(r, "vent-rtu", "4.8.3")
            && identified(r, "mri", "3.5")
            && identified(r, "monitor", "7.4.2")
    };
    assert!(
        run_until(
            &mut rx,
            &mut monitors,
            &loaded.profiles,
            &mut records,
            Duration::from_secs(20),
            all_identified
        )
        .await,
        "not every device identified: {:?}",
        records
            .iter()
            .map(|(d, b)| format!("{d}: {b:?}"))
            .collect::<Vec<_>>()
    );

    // A fault in the pump (manual §8: TALM bits 1 and 16, error 240) becomes episodes.
    lip.set_talm(0x0001_0002);
    lip.set_err(240);
    vm.raise_alarm("T-301", "high", "NIBP pump failure");
    let opened = |r: &[(String, RecordBody)], dev: &str, code: &str| {
        r.iter().any(|(d, b)| d == dev && matches!(b, RecordBody::Episode(e) if e.code == code && e.change == EpisodeChange::Opened))
    };
    assert!(
        run_until(
            &mut rx,
            &mut monitors,
            &loaded.profiles,
            &mut records,
            Duration::from_secs(15),
            |r| {
                opened(r, "pump", "TALM.1")
                    && opened(r, "pump", "TALM.16")
                    && opened(r, "pump", "ERR.240")
                    && opened(r, "monitor", "T-301")
            }
        )
        .await,
        "faults not seen"
    );
    // T-301 is major: the monitor is down.
    assert!(records.iter().any(|(d, b)| d == "monitor"
        && matches!(
            b,
            RecordBody::State {
                to: tend_profiles::DeviceState::Down,
                ..
            }
        )));

    // Clearing: after the 1 s damping the episodes clear.
    lip.set_talm(0);
    lip.set_err(0);
    assert!(
        run_until(&mut rx, &mut monitors, &loaded.profiles, &mut records, Duration::from_secs(15), |r| {
            r.iter().any(|(d, b)| d == "pump" && matches!(b, RecordBody::Episode(e) if e.code == "ERR.240" && e.change == EpisodeChange::Cleared))
        })
        .await,
        "fault never cleared"
    );

    // Device requests go through the task that owns the link.
    let ask = |device: &str, name: &str| {
        let (reply, answer) = oneshot::channel();
        let tx = shared.links.lock().unwrap().get(device).cloned().unwrap();
        let req = DeviceRequest {
            device: device.into(),
            name: name.into(),
            reply,
        };
        async move {
            tx.send(req).await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), answer)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let selftest = ask("pump", "selftest").await.unwrap();
    assert_eq!(selftest["RESULT"], "PASS", "{selftest}");
    let dump = ask("vent-tcp", "status-registers").await.unwrap();
    assert_eq!(
        dump["registers"].as_array().map(|a| a.len()),
        Some(20),
        "{dump}"
    );
    let errlog = ask("monitor", "errlog").await.unwrap();
    assert!(errlog["lines"].is_array(), "{errlog}");
    assert!(ask("pump", "no-such-request").await.is_err());

    // No patient data in any record.
    let text = serde_json::to_string(&records.iter().map(|(_, b)| b).collect::<Vec<_>>()).unwrap();
    for phi in [
        "P-0051877",
        "PID",
        "ZHANG",
        "MRN0012931",
        "1961-04-02",
        "vitals",
        "patient",
    ] {
        assert!(!text.contains(phi), "{phi} leaked into a record");
    }
    drain.abort();
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_agent_makes_records_durable() {
    let hm2 = Hm2Sim::spawn_tcp(Hm2Config::v2(), local()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    tend_testkit::trust::credentials(dir.path(), "a1");
    let src = format!(
        "agent_id = \"a1\"\nsite_id = \"s\"\ndata_dir = \"data\"\n[uplink]\nbroker = \"mqtt://127.0.0.1:1\"\ncredentials = \"a1.cred\"\n\
         [[device]]\nid = \"mri\"\nprofile = \"cryosense/hm-2\"\ntransport = \"modbus-tcp\"\naddress = \"{}\"\npoll_interval = \"100ms\"\n",
        hm2.addr()
    );
    let loaded = config::parse("agent.toml", &src, dir.path()).unwrap();
    let started = tend_agent::run::Started::start(&loaded).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while started.outbox.stats().records < 5 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.stop().await.unwrap();

    // Reopened: identity, the first state and the readings are all there, in order.
    let outbox = tend_agent::outbox::Outbox::open(tend_agent::outbox::OutboxConfig::new(
        dir.path().join("data/outbox.redb"),
    ))
    .await
    .unwrap();
    let recs = outbox.pending(None, 1000, 1 << 20).unwrap();
    assert!(recs.len() >= 5, "{recs:?}");
    assert!(recs.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(matches!(&recs[0].body, RecordBody::Identity { firmware, .. } if firmware == "2.7"));
    assert!(recs.iter().any(|r| matches!(
        r.body,
        RecordBody::State {
            to: tend_profiles::DeviceState::Up,
            ..
        }
    )));
    assert!(
        recs.iter()
            .filter(|r| matches!(r.body, RecordBody::Readings { .. }))
            .count()
            >= 3
    );
    assert!(recs.iter().all(|r| r.device == "mri"));
    outbox.close().await.unwrap();
}

/// MQTT diagnostic answers lose the PHI fields of the diagnostic, the profile and the
/// manual (VS-IOT-12 §2: `patient`, `vitals`), as serial answers do: the VM-12
/// simulator here adds both objects to every command result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_diagnostic_answers_carry_no_patient_data() {
    let broker = tend_devsim::broker::spawn_embedded().unwrap();
    let mut vm_cfg = Vm12Config::v7("127.0.0.1", broker.port());
    vm_cfg.status_interval = Duration::from_millis(300);
    let vm = Vm12Sim::spawn(vm_cfg).await.unwrap();
    vm.update(|s| s.phi_in_replies = true);
    let dir = tempfile::tempdir().unwrap();
    tend_testkit::trust::credentials(dir.path(), "agent-test");
    let src = format!(
        "agent_id = \"agent-test\"\nsite_id = \"s-1\"\ndata_dir = \"data\"\n[uplink]\nbroker = \"{url}\"\ncredentials = \"agent-test.cred\"\n\
         [[device]]\nid = \"monitor\"\nprofile = \"vistara/vm-12\"\ntransport = \"mqtt\"\nbroker = \"{url}\"\nserial = \"VM12-00A4471\"\n",
        url = broker.url(),
    );
    let loaded = config::parse("agent.toml", &src, dir.path()).unwrap();
    let shared = Arc::new(Shared::default());
    let (tx, mut rx) = mpsc::channel(64);
    let tasks = spawn_links(&loaded, shared.clone(), tx);
    // Commands go out once a status has identified the firmware.
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a status within 10 s")
        .unwrap();
    assert!(first.result.is_ok(), "{:?}", first.result.err());
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let tx = shared
        .links
        .lock()
        .unwrap()
        .get("monitor")
        .cloned()
        .unwrap();
    for name in ["selftest", "errlog"] {
        let (reply, answer) = oneshot::channel();
        let req = DeviceRequest {
            device: "monitor".into(),
            name: name.into(),
            reply,
        };
        tx.send(req).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let text = answer.to_string();
        assert!(
            answer.get("overall").is_some() || answer.get("lines").is_some(),
            "{text}"
        );
        for phi in [
            "patient",
            "vitals",
            "MRN0012931",
            "ZHANG",
            "1961-04-02",
            "118/76",
        ] {
            assert!(!text.contains(phi), "{phi} in the {name} answer: {text}");
        }
    }
    drain.abort();
    for t in tasks {
        t.abort();
    }
}
