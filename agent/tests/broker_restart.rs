//! The agent through a real Mosquitto that is stopped for a while and started again on the
//! same port: records made while the broker is down wait in the outbox and all arrive
//! afterwards, none lost. `.ci/run` installs mosquitto.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tend_devsim::hm2::{Hm2Config, Hm2Sim};

mod common;
use common::{fake_gateway, spawn_agent, wait_for, Store};
use tend_testkit::mosquitto::start_mosquitto;
use tend_testkit::ports::free_port;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_and_restarted_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = start_mosquitto(dir.path(), port).await;
    let hm2 = Hm2Sim::spawn_tcp(
        Hm2Config::v2(),
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
    )
    .await
    .unwrap();
    let store: Store = Arc::default();
    let (_, key) = tend_testkit::trust::credentials(dir.path(), "agent-mq");
    let gw = fake_gateway(port, store.clone(), Arc::new(Mutex::new(Vec::new())), key);

    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"agent-mq\"\nsite_id = \"s\"\ndata_dir = \"data\"\n[uplink]\nbroker = \"mqtt://127.0.0.1:{port}\"\ncredentials = \"agent-mq.cred\"\nkeep_alive = \"2s\"\n\
             [[device]]\nid = \"mri\"\nprofile = \"cryosense/hm-2\"\ntransport = \"modbus-tcp\"\naddress = \"{}\"\npoll_interval = \"100ms\"\n",
            hm2.addr()
        ),
    )
    .unwrap();
    let mut agent = spawn_agent(&config, &dir.path().join("agent.log"));
    wait_for(&store, "first records", Duration::from_secs(30), |s| {
        s.len() > 10
    })
    .await;

    // Broker down for 3 s: the agent keeps polling (about 30 readings) into its outbox.
    broker.start_kill().unwrap();
    let _ = broker.wait().await;
    let before = store.lock().unwrap().keys().max().copied().unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut broker = start_mosquitto(dir.path(), port).await;
    wait_for(
        &store,
        "the backlog after the restart",
        Duration::from_secs(60),
        |s| s.keys().max().copied().unwrap_or(0) > before + 30,
    )
    .await;

    let pid = agent.id().unwrap();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let status = tokio::time::timeout(Duration::from_secs(15), agent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let seqs: Vec<u64> = store.lock().unwrap().keys().copied().collect();
    assert_eq!(seqs[0], 1);
    assert_eq!(
        seqs.len() as u64,
        *seqs.last().unwrap(),
        "holes in the received seqs"
    );
    gw.abort();
    let _ = broker.start_kill();
}
