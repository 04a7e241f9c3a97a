//! A full disk under the agent's outbox, for real: the data directory on a small tmpfs,
//! nearly filled by a ballast file while no gateway listens. The agent must not look
//! alive while it records nothing: it stops with a non-zero exit (so its supervisor
//! restarts it) and leaves `degraded: ...` as its status for the gateway. Once space is
//! back, the restarted agent delivers every record it had made durable.
//!
//! Mounting needs root, as CI has; elsewhere the test says so and does nothing.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{fake_gateway, spawn_agent, wait_for, Store};
use tend_devsim::hm2::{Hm2Config, Hm2Sim};
use tend_wire::{Purpose, STATUS_DEGRADED};

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn free_bytes(path: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_agent_as_degraded_and_a_restart_delivers_everything() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs this as root)");
        return;
    }
    let hm2 = Hm2Sim::spawn_tcp(
        Hm2Config::v3(),
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
    )
    .await
    .unwrap();
    let broker = tend_devsim::broker::spawn_embedded().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs at {}", data.display());
    let _umount = Tmpfs(data.clone());
    let (_, key) = tend_testkit::trust::credentials(dir.path(), "agent-full");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"agent-full\"\nsite_id = \"s-1\"\ndata_dir = \"data\"\n\
             [uplink]\nbroker = \"{}\"\ncredentials = \"agent-full.cred\"\nkeep_alive = \"5s\"\n\
             [[device]]\nid = \"mri\"\nprofile = \"cryosense/hm-2\"\ntransport = \"modbus-tcp\"\n\
             address = \"{}\"\npoll_interval = \"100ms\"\n",
            broker.url(),
            hm2.addr()
        ),
    )
    .unwrap();
    // The agent's status, as the gateway would see it.
    let statuses: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let statuses = statuses.clone();
        let key = key.clone();
        let mut opts = rumqttc::MqttOptions::new("status-watch", "127.0.0.1", broker.port());
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 16);
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = client
                            .subscribe("tend/v1/agent-full/status", rumqttc::QoS::AtLeastOnce)
                            .await;
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if let Ok(body) =
                            tend_wire::seal::open(&key, Purpose::Status, "agent-full", &p.payload)
                        {
                            statuses
                                .lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(body).into_owned());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }

    let log = dir.path().join("agent.log");
    let mut agent = spawn_agent(&config, &log);
    // Let the outbox exist, then leave it little room.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let free = free_bytes(&data);
    std::fs::write(
        data.join("ballast"),
        vec![0u8; free.saturating_sub(96 << 10) as usize],
    )
    .unwrap();

    // The disk fills: the agent stops on its own, non-zero, within a bound.
    let status = tokio::time::timeout(Duration::from_secs(120), agent.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the agent kept running on a full disk; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
        .unwrap();
    assert!(!status.success(), "exit {status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cannot be written"), "{text}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let last = statuses.lock().unwrap().last().cloned();
        if last
            .as_deref()
            .is_some_and(|s| s.starts_with(STATUS_DEGRADED))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent's last status is {last:?}, not degraded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Space is back; the supervisor restarts the agent; a gateway listens: every record
    // made durable before is delivered, in one unbroken run of seqs.
    std::fs::remove_file(data.join("ballast")).unwrap();
    let store: Store = Arc::default();
    let _gw = fake_gateway(broker.port(), store.clone(), Arc::default(), key);
    let mut agent = spawn_agent(&config, &log);
    wait_for(
        &store,
        "the backlog and new records",
        Duration::from_secs(60),
        |s| s.len() > 30,
    )
    .await;
    {
        let s = store.lock().unwrap();
        let max = *s.keys().max().unwrap();
        let missing: Vec<u64> = (1..=max).filter(|q| !s.contains_key(q)).collect();
        assert!(missing.is_empty(), "records lost: {missing:?}");
    }
    let last = statuses.lock().unwrap().last().cloned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while statuses.lock().unwrap().last().map(String::as_str) != Some("online") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not online again: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.start_kill().unwrap();
    let _ = agent.wait().await;
}
