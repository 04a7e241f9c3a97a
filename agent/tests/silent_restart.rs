//! `tend-agent run` as a process with a device that stops answering across a restart: an
//! AV-500 over Modbus TCP raises a major error (the ventilator goes `down`), the agent is
//! killed with SIGKILL, the ventilator falls silent, and the restarted agent must hold the
//! open episode for as long as the ventilator stays silent, far past the damping time, and
//! its `down` state once the silence counts (the time the agent was not running is
//! `unknown`); once it answers without the error, the same episode clears after the
//! damping time.

mod common;

use common::{fake_gateway, spawn_agent, wait_for, Store};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tend_devsim::{Av500Config, Av500Sim};
use tend_wire::{EpisodeChange, Record, RecordBody};

const DAMPING: Duration = Duration::from_millis(500);

fn is_episode(r: &Record, change: EpisodeChange) -> bool {
    r.device == "vent"
        && matches!(&r.body, RecordBody::Episode(e) if e.code == "ERR.1021" && e.change == change)
}

/// The state transitions of the ventilator, in seq order.
fn states_in(s: &BTreeMap<u64, Record>) -> Vec<String> {
    s.values()
        .filter_map(|r| match &r.body {
            RecordBody::State { from, to } if r.device == "vent" => Some(format!("{from}->{to}")),
            _ => None,
        })
        .collect()
}

fn states(store: &Store) -> Vec<String> {
    states_in(&store.lock().unwrap())
}

/// How many reads of the device failed, per the agent's log.
fn failed_reads(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("read failed")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_keeps_its_episode_open_across_a_restart() {
    let vent = Av500Sim::spawn_tcp(
        Av500Config::v5(),
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
    )
    .await
    .unwrap();
    let broker = tend_devsim::broker::spawn_embedded().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = tend_testkit::trust::credentials(dir.path(), "agent-silent");
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
            r#"agent_id = "agent-silent"
site_id = "s-1"
data_dir = "data"
flap_damping = "{damping}ms"
[uplink]
broker = "{url}"
credentials = "agent-silent.cred"
keep_alive = "5s"
[[device]]
id = "vent"
profile = "aeris/av-500"
transport = "modbus-tcp"
address = "{addr}"
poll_interval = "100ms"
reply_timeout = "200ms"
"#,
            damping = DAMPING.as_millis(),
            url = broker.url(),
            addr = vent.addr().unwrap()
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");

    let mut agent = spawn_agent(&config, &log);
    wait_for(&store, "the ventilator up", Duration::from_secs(30), |s| {
        states_in(s) == ["unknown->up"]
    })
    .await;

    // AR-MB-500 §3.4: error 1021 is major and makes the ventilator unavailable.
    vent.update(|s| s.error_code = 1021);
    wait_for(
        &store,
        "the error's episode and the ventilator down",
        Duration::from_secs(20),
        |s| s.values().any(|r| is_episode(r, EpisodeChange::Opened)),
    )
    .await;
    assert_eq!(states(&store), ["unknown->up", "up->down"]);

    // The agent dies with the episode open (its memory is committed with the records the
    // gateway already has), and the ventilator stops answering before it is back.
    let killed = jiff::Timestamp::now();
    agent.start_kill().unwrap();
    let _ = agent.wait().await;
    vent.set_silent(true);
    let before = store.lock().unwrap().keys().max().copied().unwrap_or(0);
    let failed_before = failed_reads(&log);
    let restarted = tokio::time::Instant::now();
    let restarted_at = jiff::Timestamp::now();
    agent = spawn_agent(&config, &log);

    // Silent for many damping times, with many failed reads judged by the restarted agent
    // (the third one already counts the device as silent).
    let deadline = restarted + Duration::from_secs(30);
    while failed_reads(&log) < failed_before + 15 || restarted.elapsed() < DAMPING * 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted agent did not report failed reads"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    {
        let s = store.lock().unwrap();
        let after: Vec<&Record> = s.range(before + 1..).map(|(_, r)| r).collect();
        assert!(
            after
                .iter()
                .all(|r| !matches!(r.body, RecordBody::Episode(_))),
            "an episode changed while the ventilator was silent: {after:?}"
        );
    }
    // The time the agent was not running is unknown, and the silence after it is down
    // again once it counts.
    wait_for(
        &store,
        "the ventilator unknown while the agent was not running, then down again",
        Duration::from_secs(20),
        |s| states_in(s).len() >= 4,
    )
    .await;
    assert_eq!(
        states(&store),
        ["unknown->up", "up->down", "down->unknown", "unknown->down"],
        "the ventilator is down again while silent"
    );
    {
        let s = store.lock().unwrap();
        let at = |t: &str| {
            s.values()
                .find(|r| {
                    r.device == "vent"
                        && matches!(&r.body, RecordBody::State { from, to } if format!("{from}->{to}") == t)
                })
                .map(|r| r.at)
                .unwrap()
        };
        let gap = at("down->unknown");
        assert!(
            gap <= killed && killed.duration_since(gap).as_secs_f64() < 1.5,
            "down->unknown at {gap}, the kill at {killed}"
        );
        let down = at("unknown->down");
        assert!(
            down >= restarted_at,
            "unknown->down at {down}, before the restart at {restarted_at}"
        );
    }

    // Answering again without the error: up, and the same episode clears once the error
    // stayed away for the damping time.
    let answering = jiff::Timestamp::now();
    vent.update(|s| {
        s.error_code = 0;
        s.silent = false;
    });
    wait_for(
        &store,
        "the error's episode cleared",
        Duration::from_secs(20),
        |s| s.values().any(|r| is_episode(r, EpisodeChange::Cleared)),
    )
    .await;
    agent.start_kill().unwrap();
    let _ = agent.wait().await;
    assert_eq!(
        states(&store),
        [
            "unknown->up",
            "up->down",
            "down->unknown",
            "unknown->down",
            "down->up"
        ]
    );
    let s = store.lock().unwrap();
    let episode = |change| {
        s.values()
            .find(|r| is_episode(r, change))
            .map(|r| match &r.body {
                RecordBody::Episode(e) => (r.seq, r.at, e.episode.clone()),
                _ => unreachable!(),
            })
            .unwrap()
    };
    let (_, _, opened) = episode(EpisodeChange::Opened);
    let (cleared_seq, cleared_at, cleared) = episode(EpisodeChange::Cleared);
    assert_eq!(
        opened, cleared,
        "the episode opened before the restart clears"
    );
    let heard = s
        .values()
        .find(|r| {
            r.device == "vent" && r.at >= answering && matches!(r.body, RecordBody::Readings { .. })
        })
        .expect("readings after the ventilator answered again");
    assert!(heard.seq < cleared_seq);
    assert!(
        cleared_at.duration_since(heard.at).as_secs_f64() >= DAMPING.as_secs_f64(),
        "cleared {cleared_at} less than the damping time after the first read at {}",
        heard.at
    );
    gw.abort();
}
