//! `tend-agent run` as a process, killed with SIGKILL while its device is `up` and started
//! again a few seconds later on the same data directory: the time it was not running must
//! reach the gateway as `unknown`, not `up`. The restarted agent says `up -> unknown`
//! stamped when it stopped (the newest observation time its outbox kept: at most a poll
//! interval and a linger before the kill), then `unknown -> up` from its first read after
//! the restart, so a ledger keyed by the agent's time sees the gap.

mod common;

use common::{fake_gateway, spawn_agent, wait_for, Store};
use jiff::Timestamp;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tend_devsim::{Av500Config, Av500Sim};
use tend_wire::{Record, RecordBody};

const POLL: Duration = Duration::from_millis(500);
/// Beyond the poll interval: the readings' linger (100 ms) and the commit, on a busy
/// machine.
const MARGIN: Duration = Duration::from_secs(1);

/// The ventilator's state transitions, in seq order: (seq, at, "from->to").
fn transitions(s: &BTreeMap<u64, Record>) -> Vec<(u64, Timestamp, String)> {
    s.values()
        .filter_map(|r| match &r.body {
            RecordBody::State { from, to } if r.device == "vent" => {
                Some((r.seq, r.at, format!("{from}->{to}")))
            }
            _ => None,
        })
        .collect()
}

fn names(t: &[(u64, Timestamp, String)]) -> Vec<&str> {
    t.iter().map(|(_, _, n)| n.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_a_killed_agent_was_not_running_is_unknown_not_up() {
    let vent = Av500Sim::spawn_tcp(
        Av500Config::v5(),
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
    )
    .await
    .unwrap();
    let broker = tend_devsim::broker::spawn_embedded().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = tend_testkit::trust::credentials(dir.path(), "agent-gap");
    let store: Store = Arc::default();
    let gw = fake_gateway(
        broker.port(),
        store.clone(),
        Arc::new(Mutex::new(Vec::new())),
        key,
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"agent_id = "agent-gap"
site_id = "s-1"
data_dir = "data"
[uplink]
broker = "{url}"
credentials = "agent-gap.cred"
keep_alive = "5s"
[[device]]
id = "vent"
profile = "aeris/av-500"
transport = "modbus-tcp"
address = "{addr}"
poll_interval = "{poll}ms"
reply_timeout = "300ms"
"#,
            url = broker.url(),
            addr = vent.addr().unwrap(),
            poll = POLL.as_millis()
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut agent = spawn_agent(&config, &log);
    wait_for(&store, "the ventilator up", Duration::from_secs(30), |s| {
        names(&transitions(s)) == ["unknown->up"]
    })
    .await;
    // A few reads while up, then the agent dies at once.
    tokio::time::sleep(POLL * 4).await;
    let killed = Timestamp::now();
    agent.start_kill().unwrap();
    let _ = agent.wait().await;
    assert_eq!(
        names(&transitions(&store.lock().unwrap())),
        ["unknown->up"],
        "a state change before the restart"
    );

    // Not running for a few seconds, the ventilator answering all along.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let restarted = Timestamp::now();
    agent = spawn_agent(&config, &log);
    wait_for(
        &store,
        "up->unknown and unknown->up from the restarted agent",
        Duration::from_secs(30),
        |s| transitions(s).len() >= 3,
    )
    .await;
    // Everything made durable before the kill is delivered too (the agent resends it).
    let mut s = store.lock().unwrap().clone();
    let all = transitions(&s);
    assert_eq!(
        names(&all),
        ["unknown->up", "up->unknown", "unknown->up"],
        "agent log:\n{}",
        log_text()
    );
    let (gap_seq, gap_at, _) = all[1].clone();
    let (back_seq, back_at, _) = all[2].clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while (1..gap_seq).any(|q| !s.contains_key(&q)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "records made before the kill were not delivered: {:?}",
            (1..gap_seq)
                .filter(|q| !s.contains_key(q))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = store.lock().unwrap().clone();
    }
    agent.start_kill().unwrap();
    let _ = agent.wait().await;
    gw.abort();

    // The gap starts when the agent stopped: not after the kill, not more than a poll
    // interval (and a margin) before it.
    assert!(
        gap_at <= killed,
        "up->unknown stamped {gap_at}, after the kill at {killed}"
    );
    let lead = killed.duration_since(gap_at);
    assert!(
        lead.as_secs_f64() <= (POLL + MARGIN).as_secs_f64(),
        "up->unknown stamped {gap_at}, {lead:?} before the kill at {killed}"
    );
    // It is the newest time the agent had recorded: no record made before the kill lies
    // inside the gap.
    let newest_before = s.range(..gap_seq).map(|(_, r)| r.at).max().unwrap();
    assert!(
        gap_at >= newest_before,
        "up->unknown stamped {gap_at}, before a record of {newest_before} made before the kill"
    );
    // Up again from the first read after the restart.
    assert!(back_seq > gap_seq);
    assert!(
        back_at >= restarted,
        "unknown->up stamped {back_at}, before the restart at {restarted}"
    );
    assert!(
        s.range(gap_seq + 1..=back_seq)
            .all(|(_, r)| r.at >= restarted && r.at <= back_at),
        "records between the gap and the restart's unknown->up: {:?}",
        s.range(gap_seq..=back_seq).collect::<Vec<_>>()
    );
}
