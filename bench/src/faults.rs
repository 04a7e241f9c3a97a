//! Fault to ticket: faults raised in the simulators, timed from the poll that saw each
//! (the `at` of the episode's opening record, read off the broker) to the backend
//! stand-in receiving its ticket. The `latency` phase runs it against one gateway with
//! its embedded broker; the scale-out phase against one to three gateways behind
//! Mosquitto sharing a store.

use super::{clean, log, mqtt, tend, Args, Sims};
use crate::report::percentile;
use crate::tend::{device_id, Gateway, GatewayPlan};
use jiff::Timestamp;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tend_testkit::backend_standin::{Backend, Received};
use tend_wire::{seal, AgentKey, EpisodeChange, Purpose, RecordBody, UpBatch};

/// ALM1 bits the faults use, one round of devices after another (each opens a ticket).
const FAULT_BITS: [u16; 9] = [4, 1, 9, 3, 0, 5, 6, 7, 8];

/// The backend stand-in's token in the bench.
pub const BACKEND_TOKEN: &str = "bench-backend-token";

/// What one fault run measured.
pub struct FaultTimes {
    /// Poll that saw the fault → the backend received its ticket, ms.
    pub poll_ms: Vec<f64>,
    /// Fault raised in the simulator → ticket, ms (adds the wait for the next poll).
    pub raise_ms: Vec<f64>,
    /// Faults raised.
    pub raised: usize,
    /// Ticket creations the backend received for them, duplicates included.
    pub creates: usize,
}

/// Where the agent's batches can be read on their way to the gateway(s): a broker and
/// a login on it (none for Mosquitto, which takes anonymous listeners in the bench).
pub struct Tap<'a> {
    pub host: &'a str,
    pub port: u16,
    pub login: Option<String>,
    pub key: &'a AgentKey,
}

pub async fn latency(
    a: &Args,
    sims: &Sims,
    work: &Path,
    report: &mut crate::Report,
) -> anyhow::Result<()> {
    for run in 0..a.runs {
        let dir = work.join(format!("latency-{run}"));
        let backend = tend_testkit::backend_standin::spawn(BACKEND_TOKEN).await?;
        let plan = GatewayPlan {
            dir: dir.join("gateway"),
            devices: a.devices,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            backend: Some((backend.url(), BACKEND_TOKEN.to_string())),
            trust_dir: None,
            shared: None,
        };
        let key = tend::enrol_agent(&a.bin, &plan, &dir.join("agent"))?;
        let listener_password = tend::enrol_client(
            &a.bin,
            &plan.dir.join("gateway.toml"),
            "bench-up-listener",
            &dir.join("clients"),
        )?;
        let gw = Gateway::start(&a.bin, &plan).await?;
        let (host, port) = gw.broker_addr();
        let tap = Tap {
            host: &host,
            port,
            login: Some(listener_password),
            key: &key,
        };
        let t = fault_run(
            a,
            sims,
            &format!("latency run {}", run + 1),
            &tap,
            &gw.broker,
            &dir.join("agent"),
            &backend,
        )
        .await?;
        gw.stop().await;
        clean(&dir);
        backend.stop().await;
        report.latency.push((t.poll_ms, t.raise_ms, t.raised));
    }
    Ok(())
}

/// One fault run (`label` in the log) against gateways already running and connected to
/// `backend`: the simulators healthy again, the agent (its credentials already in
/// `agent_dir`) polls them and sends to `broker`; `a.episodes` faults are raised once
/// every device is identified, and the run waits (at most 60 s) for their tickets.
pub async fn fault_run(
    a: &Args,
    sims: &Sims,
    label: &str,
    tap: &Tap<'_>,
    broker: &str,
    agent_dir: &Path,
    backend: &Backend,
) -> anyhow::Result<FaultTimes> {
    sims.reset();
    log(format!(
        "{label}: {} faults, one every {:?}",
        a.episodes, a.fault_spacing
    ));
    // The agent's records as the gateway receives them: the `at` of each episode's
    // opening is the time of the poll that saw the fault (full precision).
    let mut up = mqtt::connect_as(
        tap.host,
        tap.port,
        "bench-up-listener",
        tap.login.clone(),
        &[tend_wire::topic::up(tend::AGENT_ID)],
    )
    .await?;
    let opened: Arc<Mutex<HashMap<(String, String), Timestamp>>> = Arc::default();
    let identified: Arc<Mutex<HashSet<String>>> = Arc::default();
    let listener = {
        let (opened, identified, key) = (opened.clone(), identified.clone(), tap.key.clone());
        tokio::spawn(async move {
            while let Some(m) = up.rx.recv().await {
                let Ok(body) = seal::open(&key, Purpose::Up, tend::AGENT_ID, &m.payload) else {
                    continue;
                };
                let Ok(b) = UpBatch::decode(body) else {
                    continue;
                };
                for r in b.records {
                    match &r.body {
                        RecordBody::Identity { .. } => {
                            identified.lock().unwrap().insert(r.device.clone());
                        }
                        RecordBody::Episode(e) if e.change == EpisodeChange::Opened => {
                            opened
                                .lock()
                                .unwrap()
                                .entry((r.device.clone(), e.code.clone()))
                                .or_insert(r.at);
                        }
                        _ => {}
                    }
                }
            }
        })
    };
    let cfg = tend::agent_config(agent_dir, broker, &tend::Target::tcp(&sims.addrs()), "1s")?;
    let mut agent = tend::start_agent(a.agent_folder(), &cfg, a.agent_wrap.as_deref())?;
    let t = Instant::now();
    while identified.lock().unwrap().len() < a.devices && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = identified.lock().unwrap().len();
    anyhow::ensure!(
        seen == a.devices,
        "only {seen} of {} devices identified within 60 s",
        a.devices
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut raised: Vec<(String, String, Timestamp)> = Vec::new();
    for k in 0..a.episodes {
        let d = k % a.devices;
        let bit = FAULT_BITS[(k / a.devices) % FAULT_BITS.len()];
        sims.handles[d].update(|s| s.alarm_word1 |= 1 << bit);
        raised.push((device_id(d), format!("ALM1.{bit}"), Timestamp::now()));
        tokio::time::sleep(a.fault_spacing).await;
    }
    let all_in = backend
        .wait_for(Duration::from_secs(60), |b| {
            let got = b.requests();
            raised
                .iter()
                .all(|(d, c, _)| got.iter().any(|r| r.is_create() && ticket_is(r, d, c)))
        })
        .await;
    let requests = backend.requests();
    let opened = opened.lock().unwrap().clone();
    let mut t = FaultTimes {
        poll_ms: Vec::new(),
        raise_ms: Vec::new(),
        raised: raised.len(),
        creates: 0,
    };
    for (d, c, at_raise) in &raised {
        let creates: Vec<&Received> = requests
            .iter()
            .filter(|r| r.is_create() && ticket_is(r, d, c))
            .collect();
        t.creates += creates.len();
        let Some(recv) = creates.first() else {
            continue;
        };
        if let Some(at_poll) = opened.get(&(d.clone(), c.clone())) {
            t.poll_ms.push(ms(recv.time.duration_since(*at_poll)));
        }
        t.raise_ms.push(ms(recv.time.duration_since(*at_raise)));
    }
    listener.abort();
    anyhow::ensure!(agent.alive(), "the agent died:\n{}", agent.tail());
    agent.stop(Duration::from_secs(10)).await;
    log(format!(
        "  {} of {} tickets received{}, {} creates; poll→ticket p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; fault raised→ticket p50 {:.1} ms",
        t.raise_ms.len(),
        t.raised,
        if all_in { "" } else { " (timed out waiting for the rest)" },
        t.creates,
        percentile(&t.poll_ms, 50.0),
        percentile(&t.poll_ms, 99.0),
        percentile(&t.poll_ms, 100.0),
        percentile(&t.raise_ms, 50.0),
    ));
    let mut worst = t.poll_ms.clone();
    worst.sort_by(|x, y| y.total_cmp(x));
    worst.truncate(5);
    log(format!("  slowest poll→ticket, ms: {worst:.1?}"));
    Ok(t)
}

fn ticket_is(r: &Received, device: &str, code: &str) -> bool {
    r.code() == Some(code)
        && r.body
            .as_ref()
            .and_then(|b| b.pointer("/device/id"))
            .and_then(|v| v.as_str())
            == Some(device)
}

fn ms(d: jiff::SignedDuration) -> f64 {
    d.as_secs_f64() * 1000.0
}
