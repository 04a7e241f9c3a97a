//! Fixtures of the cross-process suites that need this package's own binaries or look
//! into the stopped processes' files (the agent's outbox, the gateway's store). The rest
//! comes from `tend-testkit`, re-exported here so a suite needs one `use common::*`.
#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::time::Duration;
pub use tend_testkit::config::*;
pub use tend_testkit::metrics::*;
pub use tend_testkit::mosquitto::*;
pub use tend_testkit::ports::*;
pub use tend_testkit::procs::*;
pub use tend_testkit::rng::*;
pub use tend_testkit::rss::*;
pub use tend_testkit::sims::*;
pub use tend_testkit::trust::*;
pub use tend_testkit::wait::*;
pub use tend_testkit::wire_tap::*;

/// The `tend-gateway` command line as this package's binary `e2e-tend-gateway`: cargo
/// builds it, up to date, before the suites run.
pub fn gateway_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_e2e-tend-gateway"))
}

/// The `tend-agent` command line as this package's binary `e2e-tend-agent`.
pub fn agent_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_e2e-tend-agent"))
}

/// Enrols `agent` with the gateway whose config is `gw_config`, as an operator does
/// (`e2e-tend-gateway agent add`), its credentials written to `<agent_dir>/<agent>.cred`
/// where the agent's config ([`sims_agent_toml`]) names them. Returns the agent's key.
pub fn enrol_agent(gw_config: &Path, agent: &str, agent_dir: &Path) -> tend_wire::AgentKey {
    std::fs::create_dir_all(agent_dir).unwrap();
    let out = agent_dir.join(format!("{agent}.cred"));
    enrol(gateway_bin(), gw_config, agent, &out)
}

/// For an agent that starts before its gateway: writes the gateway's config of `spec` to
/// `<gw_dir>/gateway.toml` (as [`GatewayProc::spawn`] will) and enrols `agent` with it.
pub fn enrol_before_gateway(
    gw_dir: &Path,
    spec: &GatewaySpec<'_>,
    agent: &str,
    agent_dir: &Path,
) -> tend_wire::AgentKey {
    std::fs::create_dir_all(gw_dir).unwrap();
    let config = gw_dir.join("gateway.toml");
    std::fs::write(&config, gateway_toml(spec)).unwrap();
    enrol_agent(&config, agent, agent_dir)
}

/// Like [`GatewayProc::spawn`], with `extra` appended to the gateway's config (a
/// section [`gateway_toml`] does not write, such as a `[trust]` shared by gateways).
pub async fn spawn_gateway_with(dir: &Path, spec: &GatewaySpec<'_>, extra: &str) -> GatewayProc {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("fleet.toml"), spec.fleet).unwrap();
    write_secret(dir.join("api.token"), format!("{API_TOKEN}\n")).unwrap();
    write_secret(dir.join("backend.token"), format!("{BACKEND_TOKEN}\n")).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(&config, format!("{}\n{extra}", gateway_toml(spec))).unwrap();
    GatewayProc::start(gateway_bin(), dir, &config, &dir.join("gateway.log")).await
}

/// The agent's last run: SIGKILL, then a restart that polls each device once (`1h`
/// poll), so its outbox can empty and stay empty; waits until its first polls are
/// recorded (one record per device at least), the outbox is empty (asked through the
/// gateway's `outbox` diagnostic on `device`) and has stayed so for a second, and every
/// ticket is forwarded. The agent's data directory is `data` beside `cfg`.
pub async fn drain_agent(
    agent: &mut tokio::process::Child,
    cfg: &Path,
    log: &Path,
    config_text: String,
    gw: &GatewayProc,
    device: &str,
    within: Duration,
) {
    use tend_agent::outbox::{Outbox, OutboxConfig};
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    let path = cfg.parent().unwrap().join("data/outbox.redb");
    let outbox = Outbox::open(OutboxConfig::new(path)).await.unwrap();
    let before = outbox.stats().next_seq;
    outbox.close().await.unwrap();
    let devices = config_text.matches("[[device]]").count() as u64;
    std::fs::write(cfg, config_text).unwrap();
    *agent = spawn_agent(agent_bin(), cfg, log);
    let empty = tokio::time::timeout(within, async {
        let mut last = None;
        loop {
            if let Some(a) = agent_outbox(gw, device).await {
                let next = a["next_seq"].as_u64().unwrap_or(0);
                if a["records"] == 0 && next >= before + devices {
                    if last == Some(next) {
                        return;
                    }
                    last = Some(next);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            last = None;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    if empty.is_err() {
        panic!(
            "the agent's outbox did not empty within {within:?}; agent log:\n{}\ngateway log:\n{}",
            tail(log, 40),
            tail(&gw.log, 40)
        );
    }
    until("every ticket and event forwarded", within, || async {
        let (_, t) = gw.try_get("/api/v1/tickets").await?;
        forwarding_settled(&t).then_some(())
    })
    .await;
}

/// Stops the agent as its supervisor does (SIGTERM) and waits for a clean exit: its
/// outbox closes, which commits the acknowledged deletions still riding along for the next
/// commit (after a SIGKILL those records stay and are sent again, stored once).
pub async fn stop_agent(agent: &mut tokio::process::Child) {
    let pid = agent.id().expect("the agent is running");
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let status = tokio::time::timeout(Duration::from_secs(15), agent.wait())
        .await
        .expect("the agent did not stop within 15 s of SIGTERM")
        .expect("wait for the agent");
    assert!(status.success(), "agent exit status {status:?}");
}

/// After the agent and the gateway have stopped: the agent's outbox is empty (everything
/// acked) and the gateway's store holds exactly seqs 1..=max of `agent`, max being the
/// last seq the outbox gave out. Returns max.
pub async fn assert_delivered_exactly_once(agent_data: &Path, gw_data: &Path, agent: &str) -> u64 {
    assert_delivered(agent_data, gw_data, agent, true).await
}

/// The same, when other agents' records share the store (`only_agent` false): then the
/// seqs past max (the next hundreds, the largest) must be absent.
pub async fn assert_delivered(
    agent_data: &Path,
    gw_data: &Path,
    agent: &str,
    only_agent: bool,
) -> u64 {
    let max = acknowledged_all(agent_data).await;
    let store = tend_gateway::store::RedbStore::open(gw_data).unwrap();
    assert_store_holds(&store, agent, max, only_agent);
    max
}

/// The stopped agent's outbox (in `agent_data`) is empty, everything acknowledged: the
/// last seq it gave out.
pub async fn acknowledged_all(agent_data: &Path) -> u64 {
    use tend_agent::outbox::{Outbox, OutboxConfig};
    let outbox = Outbox::open(OutboxConfig::new(agent_data.join("outbox.redb")))
        .await
        .unwrap();
    let stats = outbox.stats();
    outbox.close().await.unwrap();
    assert_eq!(stats.records, 0, "unacknowledged records left: {stats:?}");
    let max = stats.next_seq - 1;
    assert!(max > 0);
    max
}

/// `store` holds exactly seqs 1..=max of `agent` (and, when `only_agent`, nothing else).
pub fn assert_store_holds(
    store: &dyn tend_gateway::store::GatewayStore,
    agent: &str,
    max: u64,
    only_agent: bool,
) {
    let missing: Vec<u64> = (1..=max)
        .filter(|s| !store.has_record(agent, *s).unwrap())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {max} records lost, first {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    // Exact whatever the watermark: the count of distinct records of this agent stored.
    assert_eq!(
        store.records_stored_of(agent).unwrap(),
        max,
        "records of {agent} stored, against the seqs its outbox gave out"
    );
    if only_agent {
        assert_eq!(
            store.records_stored().unwrap(),
            max,
            "records beyond the agent's seqs"
        );
    } else {
        // Not seq 0: it lies below the gateway's dedup watermark of the agent's outbox
        // (batches carry its oldest seq; the store forgets what is below and answers it
        // as delivered), so the store cannot tell it apart.
        for s in [u64::MAX - 1, u64::MAX]
            .into_iter()
            .chain(max + 1..=max + 500)
        {
            assert!(
                !store.has_record(agent, s).unwrap(),
                "seq {s} of {agent} stored"
            );
        }
    }
}

/// Figures of the ticket check.
#[derive(Debug, Default)]
pub struct TicketFigures {
    pub episodes: usize,
    pub tickets: usize,
    pub backend_tickets: usize,
    pub events: usize,
}

/// One ticket per episode, from the stopped gateway's store and the backend stand-in:
/// every episode of the life records of `devices` opened once and in exactly one ticket;
/// backend and gateway know the same ticket keys, each once; no two open backend tickets
/// for one (device, kind, code); every event queued arrived once; no 409. Tickets whose
/// keys are in `refused` are expected `failed` and absent from the backend.
pub fn assert_one_ticket_per_episode(
    gw_data: &Path,
    backend: &tend_testkit::backend_standin::Backend,
    devices: &[&str],
    refused: &[String],
) -> TicketFigures {
    let store = tend_gateway::store::RedbStore::open(gw_data).unwrap();
    assert_one_ticket_per_episode_in(&store, backend, devices, refused)
}

/// [`assert_one_ticket_per_episode`] on any store (a shared PostgreSQL one).
pub fn assert_one_ticket_per_episode_in(
    store: &dyn tend_gateway::store::GatewayStore,
    backend: &tend_testkit::backend_standin::Backend,
    devices: &[&str],
    refused: &[String],
) -> TicketFigures {
    use std::collections::{BTreeMap, BTreeSet};
    use tend_gateway::store::{ForwardState, LifeEvent};
    let tickets = store.tickets().unwrap();
    let mut episodes: BTreeMap<String, String> = BTreeMap::new();
    let mut opened: BTreeMap<String, u32> = BTreeMap::new();
    for id in devices {
        for e in store.history(id, usize::MAX).unwrap() {
            if let LifeEvent::Episode { event, .. } = e {
                if event.change == tend_wire::EpisodeChange::Opened {
                    *opened.entry(event.episode.clone()).or_default() += 1;
                }
                episodes.insert(event.episode.clone(), id.to_string());
            }
        }
    }
    for (ep, n) in &opened {
        assert_eq!(*n, 1, "episode {ep} opened {n} times in the life record");
    }
    for (ep, dev) in &episodes {
        let owners: Vec<&str> = tickets
            .iter()
            .filter(|t| t.episodes.contains(ep))
            .map(|t| t.key.as_str())
            .collect();
        assert_eq!(
            owners.len(),
            1,
            "episode {ep} of {dev} in tickets {owners:?}"
        );
    }
    let bt = backend.tickets();
    let backend_keys: BTreeSet<&str> = bt.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(
        backend_keys.len(),
        bt.len(),
        "two backend tickets under one key"
    );
    let gw_keys: BTreeSet<&str> = tickets
        .iter()
        .filter(|t| !refused.contains(&t.key))
        .map(|t| t.key.as_str())
        .collect();
    assert_eq!(
        backend_keys, gw_keys,
        "backend and gateway disagree on the tickets"
    );
    let mut per_fault: BTreeMap<(String, String, String), Vec<&str>> = BTreeMap::new();
    for t in &bt {
        assert!(t.key.starts_with("tend-t"), "{}", t.key);
        if t.status == "open" {
            per_fault
                .entry((
                    t.body["device"]["id"].to_string(),
                    t.body["kind"].to_string(),
                    t.body["fault"]["code"].to_string(),
                ))
                .or_default()
                .push(&t.key);
        }
    }
    for (k, keys) in &per_fault {
        assert_eq!(keys.len(), 1, "open tickets {keys:?} for {k:?}");
    }
    for t in &tickets {
        if refused.contains(&t.key) {
            assert_eq!(t.forward.state, ForwardState::Failed, "{t:#?}");
            continue;
        }
        assert_eq!(t.forward.state, ForwardState::Sent, "{t:#?}");
        let b = bt.iter().find(|b| b.key == t.key).unwrap();
        let want: BTreeSet<&str> = t
            .events
            .iter()
            .map(|e| e.idempotency_key.as_str())
            .collect();
        let got: BTreeSet<&str> = b.events.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(got.len(), b.events.len(), "an event twice on {}", t.key);
        assert_eq!(want, got, "events of {}", t.key);
    }
    for r in backend.requests() {
        assert_ne!(
            r.status,
            Some(409),
            "a key reused with another body: {r:#?}"
        );
    }
    TicketFigures {
        episodes: episodes.len(),
        tickets: tickets.len(),
        backend_tickets: bt.len(),
        events: tickets.iter().map(|t| t.events.len()).sum(),
    }
}
