//! Helpers shared by the agent's tests: running the built binary, PHI checks, and a
//! gateway stand-in on MQTT.
#![allow(dead_code)]

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tend_wire::{AgentKey, Record};

/// Output of one `tend-agent probe` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// Runs the built binary with `probe` and `args`. The simulators live in the test's own
/// runtime, so the child is awaited asynchronously while they keep serving.
pub async fn probe(args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tend-agent"));
    cmd.arg("probe").args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(40), cmd.output())
        .await
        .expect("probe did not finish in 40 s")
        .expect("probe could not be started");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts that none of `needles` (patient ids, names, vitals) appears in `hay`.
pub fn assert_no_phi(hay: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            !hay.contains(n),
            "personal data {n:?} leaked into probe output:\n{hay}"
        );
    }
}

/// Signal codes of a JSON report.
pub fn signal_codes(v: &serde_json::Value) -> Vec<String> {
    v["signals"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["code"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of a reading in a JSON report.
pub fn reading(v: &serde_json::Value, name: &str) -> serde_json::Value {
    v["readings"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == name))
        .map(|r| r["value"].clone())
        .unwrap_or(serde_json::Value::Null)
}

pub type Store = Arc<Mutex<BTreeMap<u64, Record>>>;

/// Stores every record by seq (first copy wins; a later copy must be identical) and acks
/// the ranges of each batch once stored. Batches are opened with `key` (the agent's, from
/// its credentials file) and acks sealed with it, as a gateway does; a batch that does
/// not open is dropped unacknowledged.
pub fn fake_gateway(
    port: u16,
    store: Store,
    raw: Arc<Mutex<Vec<u8>>>,
    key: AgentKey,
) -> tokio::task::JoinHandle<()> {
    let mut opts = MqttOptions::new("fake-gateway", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let c = client.clone();
                    tokio::spawn(
                        async move { c.subscribe("tend/v1/+/up", QoS::AtLeastOnce).await },
                    );
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    raw.lock().unwrap().extend_from_slice(&p.payload);
                    let Some(tend_wire::topic::Parsed::Up(agent)) =
                        tend_wire::topic::parse(&p.topic)
                    else {
                        continue;
                    };
                    let Some(batch) = tend_testkit::trust::open_batch(&key, agent, &p.payload)
                    else {
                        continue;
                    };
                    let seqs: Vec<u64> = batch.records.iter().map(|r| r.seq).collect();
                    {
                        let mut s = store.lock().unwrap();
                        for r in batch.records {
                            match s.get(&r.seq) {
                                Some(old) => {
                                    assert_eq!(old, &r, "seq {} sent with two contents", r.seq)
                                }
                                None => {
                                    s.insert(r.seq, r);
                                }
                            }
                        }
                    }
                    let ack = tend_testkit::trust::sealed_ack(
                        &key,
                        agent,
                        &batch.incarnation,
                        tend_wire::ranges_of(seqs),
                    );
                    let c = client.clone();
                    let topic = tend_wire::topic::ack(agent);
                    tokio::spawn(
                        async move { c.publish(topic, QoS::AtLeastOnce, false, ack).await },
                    );
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
}

pub fn spawn_agent(config: &std::path::Path, log: &std::path::Path) -> tokio::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tend-agent"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

pub async fn wait_for(
    store: &Store,
    what: &str,
    within: Duration,
    ok: impl Fn(&BTreeMap<u64, Record>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if ok(&store.lock().unwrap()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
