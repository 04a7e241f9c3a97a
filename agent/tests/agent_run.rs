//! `tend-agent run` as a process, end to end: simulators of the LIP-300 (with a patient id),
//! the HM-2 and the VM-12 (with patient name and vitals), the embedded broker, and a small
//! gateway stand-in that stores records by seq and acknowledges exactly what it stored.
//! The agent is killed with SIGKILL and restarted; every record must arrive, none twice
//! under two seqs, and no patient data may appear on the wire, in the log or on disk.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

mod common;
use common::{fake_gateway, spawn_agent, wait_for, walk, Store};
use std::collections::BTreeMap;
use std::time::Duration;
use tend_devsim::hm2::{Hm2Config, Hm2Sim};
use tend_devsim::lip300::{Lip300Config, Lip300Sim};
use tend_devsim::vm12::{Vm12Config, Vm12Sim};
use tend_profiles::DeviceState::{self, Unknown, Up};
use tend_wire::{EpisodeChange, Record, RecordBody};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_restart_no_loss_no_duplicate_no_phi() {
    let lip = Lip300Sim::spawn_pty(Lip300Config::v2()).await.unwrap();
    lip.set_pid("P-0048213");
    let hm2 = Hm2Sim::spawn_tcp(
        Hm2Config::v3(),
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
    )
    .await
    .unwrap();
    let broker = tend_devsim::broker::spawn_embedded().unwrap();
    let mut vm_cfg = Vm12Config::v6("127.0.0.1", broker.port());
    vm_cfg.status_interval = Duration::from_millis(300);
    let _vm = Vm12Sim::spawn(vm_cfg).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (_, key) = tend_testkit::trust::credentials(dir.path(), "agent-e2e");
    let store: Store = Arc::default();
    let raw = Arc::new(Mutex::new(Vec::new()));
    let gw = fake_gateway(broker.port(), store.clone(), raw.clone(), key);

    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"agent_id = "agent-e2e"
site_id = "s-1"
data_dir = "data"
flap_damping = "1s"
[uplink]
broker = "{url}"
credentials = "agent-e2e.cred"
keep_alive = "5s"
[[device]]
id = "pump"
profile = "lumen/lip-300"
transport = "serial"
port = "{lip}"
poll_interval = "200ms"
[[device]]
id = "mri"
profile = "cryosense/hm-2"
transport = "modbus-tcp"
address = "{hm2}"
poll_interval = "100ms"
[[device]]
id = "monitor"
profile = "vistara/vm-12"
transport = "mqtt"
broker = "{url}"
serial = "VM12-0081192"
"#,
            url = broker.url(),
            lip = lip.path().display(),
            hm2 = hm2.addr()
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");

    let mut agent = spawn_agent(&config, &log);
    let identified = |s: &BTreeMap<u64, Record>, dev: &str| {
        s.values()
            .any(|r| r.device == dev && matches!(r.body, RecordBody::Identity { .. }))
    };
    wait_for(
        &store,
        "all three devices identified",
        Duration::from_secs(30),
        |s| identified(s, "pump") && identified(s, "mri") && identified(s, "monitor"),
    )
    .await;

    // Three kills at different moments; the agent must pick up where its outbox stands.
    for pause in [300u64, 50, 700] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        agent.start_kill().unwrap();
        let _ = agent.wait().await;
        let before = store.lock().unwrap().keys().max().copied().unwrap_or(0);
        agent = spawn_agent(&config, &log);
        wait_for(
            &store,
            "records after the restart",
            Duration::from_secs(30),
            |s| s.keys().max().copied().unwrap_or(0) > before + 10,
        )
        .await;
    }

    // A fault after the restarts reaches the gateway as an episode.
    lip.set_talm(0x0001);
    wait_for(&store, "the pump's motor stall episode", Duration::from_secs(20), |s| {
        s.values().any(|r| {
            r.device == "pump" && matches!(&r.body, RecordBody::Episode(e) if e.code == "TALM.0" && e.change == EpisodeChange::Opened)
        })
    })
    .await;

    // Killed once more with the fault open: the restarted agent remembers the episode
    // (stored with the records in one commit), so it is not opened a second time, and the
    // HM-2's state is never announced twice: each restart makes the time the agent was not
    // running `unknown` and its first read after it `up` again, one chain of transitions.
    agent.start_kill().unwrap();
    let _ = agent.wait().await;
    let before = store.lock().unwrap().keys().max().copied().unwrap_or(0);
    agent = spawn_agent(&config, &log);
    wait_for(
        &store,
        "records after the last restart",
        Duration::from_secs(30),
        |s| s.keys().max().copied().unwrap_or(0) > before + 20,
    )
    .await;
    {
        let s = store.lock().unwrap();
        let opened = s
            .values()
            .filter(|r| r.device == "pump" && matches!(&r.body, RecordBody::Episode(e) if e.code == "TALM.0" && e.change == EpisodeChange::Opened))
            .count();
        assert_eq!(opened, 1, "the motor stall was opened {opened} times");
        let mri_states: Vec<(DeviceState, DeviceState)> = s
            .values()
            .filter_map(|r| match r.body {
                RecordBody::State { from, to } if r.device == "mri" => Some((from, to)),
                _ => None,
            })
            .collect();
        assert_eq!(mri_states.first(), Some(&(Unknown, Up)), "{mri_states:?}");
        assert!(
            mri_states.windows(2).all(|w| w[0].1 == w[1].0),
            "not one chain: {mri_states:?}"
        );
        assert!(
            mri_states
                .iter()
                .all(|t| *t == (Unknown, Up) || *t == (Up, Unknown)),
            "{mri_states:?}"
        );
        // Four kills, each while the HM-2 was up unless its first read after the previous
        // restart had not come yet.
        let gaps = mri_states.iter().filter(|t| **t == (Up, Unknown)).count();
        assert!((1..=4).contains(&gaps), "{mri_states:?}");
    }

    // Let the outbox drain, then stop the agent cleanly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = agent.id().unwrap() as i32;
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let status = tokio::time::timeout(Duration::from_secs(15), agent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "agent exit status {status:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // No loss: seqs are 1..=max without a hole (each was acked, so each was received).
    let seqs: Vec<u64> = store.lock().unwrap().keys().copied().collect();
    let max = *seqs.last().unwrap();
    assert_eq!(
        seqs.len() as u64,
        max,
        "holes in the received seqs: {} of {max}",
        seqs.len()
    );
    assert_eq!(seqs[0], 1);

    // No patient data anywhere.
    let mut everything = raw.lock().unwrap().clone();
    everything.extend(std::fs::read(&log).unwrap());
    for f in walk(&dir.path().join("data")) {
        everything.extend(std::fs::read(f).unwrap());
    }
    let text = String::from_utf8_lossy(&everything);
    for phi in [
        "P-0048213",
        "LI Si",
        "MRN0033017",
        "pt_name",
        "pt_id",
        "\"hr\"",
    ] {
        assert!(
            !text.contains(phi),
            "{phi} found on the wire, in the log or on disk"
        );
    }
    assert!(text.contains("agent running"), "the log was captured");
    gw.abort();
}
