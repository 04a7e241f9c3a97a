//! The service promises kept in view, every part real: simulated ventilators → an enrolled
//! `tend-agent` → `tend-gateway` with a fleet file whose contract has deadlines of
//! seconds → the backend stand-in (v1.1: status history), where an "engineer" moves one
//! ticket along in time and leaves the other.
//!
//! Proves: each deadline is judged from the backend's history (`met` when reached in time,
//! `missed` when not); `sla_at_risk` / `sla_missed` reach the backend once per ticket and
//! deadline and never on the ticket kept; `/api/v1/sla` counts them; the metrics show
//! them; a maintenance ticket opens from the contract for a device that has none of its
//! own, and once resolved in the backend it becomes maintenance done and moves the next
//! due date.

mod common;

use common::*;
use jiff::Timestamp;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tend_testkit::backend_standin;

/// Deadlines of seconds, so they pass within the test; a maintenance interval that makes
/// the idle monitor's maintenance overdue at once.
const CONTRACT: &str = r#"
[[device]]
id = "spare-monitor"
site = "s-main"
serial = "VM12-7-000777"
location = "Store room"
accepted = "2026-01-05"

[[contract]]
id = "k-test"
customer = "c-017"
start = "2026-01-01"
respond = "5s"
onsite = { same_city = "8s", other_city = "8s", remote = "8s" }
simple_fix = "12s"
complex_plan = "12s"
major_fix = "12s"
pm_interval_days = 30
"#;

fn sla_events(t: &backend_standin::StoredTicket) -> Vec<(String, String)> {
    t.events
        .iter()
        .filter(|e| e.kind.starts_with("sla_"))
        .map(|e| {
            (
                e.kind.clone(),
                e.body["detail"]["deadline"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_are_watched_events_sent_once_and_maintenance_comes_from_the_contract() {
    let backend = backend_standin::spawn(BACKEND_TOKEN).await.unwrap();
    let sims = spawn_sims(2).await;
    let dir = tempfile::tempdir().unwrap();
    let fleet = format!("{}{CONTRACT}", sims_fleet(&sims));
    let backend_url = backend.url();
    let spec = GatewaySpec {
        id: "gw-sla",
        broker: BrokerChoice::Embedded(free_port()),
        backend: Some(&backend_url),
        fleet: &fleet,
    };
    let gw_dir = dir.path().join("gw");
    std::fs::create_dir_all(&gw_dir).unwrap();
    std::fs::write(gw_dir.join("fleet.toml"), &fleet).unwrap();
    write_secret(gw_dir.join("api.token"), format!("{API_TOKEN}\n")).unwrap();
    write_secret(gw_dir.join("backend.token"), format!("{BACKEND_TOKEN}\n")).unwrap();
    let config = gw_dir.join("gateway.toml");
    // Tickets read back every second, not every hour.
    let text = gateway_toml(&spec).replace("status_poll = \"1h\"", "status_poll = \"1s\"");
    std::fs::write(&config, text).unwrap();
    let gw = GatewayProc::start(gateway_bin(), &gw_dir, &config, &gw_dir.join("gateway.log")).await;

    // The idle monitor, accepted 2026-01-05 with maintenance every 30 days and none done:
    // overdue, so its maintenance ticket opens at once.
    let pm = until(
        "the maintenance ticket at the backend",
        Duration::from_secs(30),
        || async {
            backend.tickets().into_iter().find(|t| {
                t.body["kind"] == "maintenance_due" && t.body["device"]["id"] == "spare-monitor"
            })
        },
    )
    .await;
    assert_eq!(pm.body["device"]["id"], "spare-monitor");
    assert_eq!(pm.body["fault"]["code"], "PM");
    assert_eq!(pm.body["fault"]["evidence"]["contract"], "k-test");
    assert_eq!(pm.body["fault"]["evidence"]["interval_days"], 30);

    let agent_dir = dir.path().join("agent");
    enrol_agent(&gw.config, "agent-sla", &agent_dir);
    let agent_cfg = agent_dir.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        sims_agent_toml("agent-sla", &gw.broker_url, &sims, "200ms"),
    )
    .unwrap();
    let mut agent = spawn_agent(agent_bin(), &agent_cfg, &agent_dir.join("agent.log"));
    until_all_up_no_fault(&gw, 2, Duration::from_secs(60)).await;

    // The agent killed for 4 s and restarted: those seconds are unknown, not up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Timestamp::now();
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    agent = spawn_agent(agent_bin(), &agent_cfg, &agent_dir.join("agent.log"));
    let back = Timestamp::now();
    let window = format!(
        "/api/v1/devices/vent-0/availability?from={}&to={}",
        (killed - jiff::SignedDuration::from_secs(1))
            .to_string()
            .replace('+', "%2B"),
        back.to_string().replace('+', "%2B")
    );
    let r = until(
        "the dead agent's gap unknown",
        Duration::from_secs(30),
        || async {
            let (_, r) = gw.get(&window).await;
            (r["unknown_s"].as_f64()? >= 3.5).then_some(r)
        },
    )
    .await;
    assert!(r["up_s"].as_f64().unwrap() <= 1.5, "{r:#}");
    assert_eq!(r["down_s"], 0.0, "{r:#}");
    until_all_up_no_fault(&gw, 2, Duration::from_secs(60)).await;

    // Both ventilators' exhalation valves fail: a major fault each.
    for (_, sim) in &sims {
        let Sim::Av(av) = sim else {
            panic!("two ventilators")
        };
        av.update(|s| {
            s.alarm_word1 = 16;
            s.device_state = tend_devsim::av500::device_state::FAILURE;
        });
    }
    // The valve (ALM1.4) is what is watched here; the safe state each one reports is a
    // ticket of its own, left alone like vent-1's.
    let tickets = until(
        "both valve tickets at the backend",
        Duration::from_secs(60),
        || async {
            let t: Vec<_> = backend
                .tickets()
                .into_iter()
                .filter(|t| t.body["fault"]["code"] == "ALM1.4")
                .collect();
            (t.len() == 2).then_some(t)
        },
    )
    .await;
    let by_device: BTreeMap<String, backend_standin::StoredTicket> = tickets
        .into_iter()
        .map(|t| (t.body["device"]["id"].as_str().unwrap().to_string(), t))
        .collect();
    let kept = &by_device["vent-0"];
    let left = &by_device["vent-1"];
    assert_eq!(kept.body["sla"]["plan_by"], Value::Null);

    // An engineer answers vent-0 at once, is on site and fixes it in time.
    for s in ["acknowledged", "on_site", "resolved"] {
        assert!(backend.set_status(&kept.id, s));
    }
    // vent-1 is left: every deadline passes (respond 5 s, on site 8 s, fixed 12 s).
    let missed = until(
        "every deadline of vent-1 missed at the backend",
        Duration::from_secs(60),
        || async {
            let t = backend.ticket(&left.id)?;
            let ev = sla_events(&t);
            ["respond", "onsite", "resolve"]
                .iter()
                .all(|d| ev.contains(&("sla_missed".into(), d.to_string())))
                .then_some(t)
        },
    )
    .await;
    // Another few polls: nothing is sent twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = backend.ticket(&left.id).unwrap();
    let ev = sla_events(&t);
    let mut seen = ev.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), ev.len(), "an SLA event twice: {ev:?}");
    assert!(ev.len() >= 3, "{ev:?}");
    assert!(
        ev.iter().all(|(_, d)| d != "plan"),
        "a major fault has no plan deadline: {ev:?}"
    );
    for e in t.events.iter().filter(|e| e.kind == "sla_missed") {
        let due: Timestamp = e.body["detail"]["due"].as_str().unwrap().parse().unwrap();
        let at: Timestamp = e.body["at"].as_str().unwrap().parse().unwrap();
        assert_eq!(at, due, "a missed event is stamped at the deadline: {e:?}");
    }
    assert!(missed.events.iter().any(|e| e.kind == "sla_missed"));
    // The ticket kept in time got no SLA event.
    let k = backend.ticket(&kept.id).unwrap();
    assert!(sla_events(&k).is_empty(), "{:?}", sla_events(&k));

    // The hotline shows each deadline's status and the backend's history.
    let (_, list) = gw.get("/api/v1/tickets").await;
    let find = |dev: &str| -> Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| t["device"] == dev && t["code"] == "ALM1.4")
            .cloned()
            .unwrap()
    };
    let (a, b) = (find("vent-0"), find("vent-1"));
    assert_eq!(
        a["sla_status"],
        json!({"respond": "met", "onsite": "met", "plan": "n/a", "resolve": "met"}),
        "{a:#}"
    );
    assert_eq!(
        b["sla_status"],
        json!({"respond": "missed", "onsite": "missed", "plan": "n/a", "resolve": "missed"}),
        "{b:#}"
    );
    let hist: Vec<&str> = a["status_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(hist, ["open", "acknowledged", "on_site", "resolved"]);
    assert_eq!(a["open"], false);

    // The figures: per deadline kind, vent-0's valve met, every other ticket left alone
    // (vent-1's valve, both safe states, the maintenance tickets) missed once its deadline
    // passed. Counted over the tickets the API shows, the same store the figures read.
    let (st, sla) = gw.get("/api/v1/sla?customer=c-017").await;
    assert_eq!(st, 200, "{sla}");
    let (_, list) = gw.get("/api/v1/tickets").await;
    for kind in ["respond", "onsite", "resolve"] {
        let count = |s: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .filter(|t| t["sla_status"][kind] == s)
                .count()
        };
        assert!(count("met") >= 1, "{kind}: {list:#}");
        assert!(count("missed") >= 1, "{kind}: {list:#}");
        assert_eq!(
            sla["deadlines"][kind]["met"],
            count("met"),
            "{kind}: {sla:#}"
        );
        assert_eq!(
            sla["deadlines"][kind]["missed"],
            count("missed"),
            "{kind}: {sla:#}"
        );
        let rate = count("met") as f64 / (count("met") + count("missed")) as f64;
        assert_eq!(sla["deadlines"][kind]["rate"], rate, "{kind}: {sla:#}");
    }
    let (st, _) = gw.get("/api/v1/sla?customer=nobody").await;
    assert_eq!(st, 404);
    // The customer's availability over its contract's period so far.
    let (st, c) = gw
        .get("/api/v1/customers/c-017/availability?period=contract")
        .await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["from"], "2025-12-31T16:00:00Z");
    assert_eq!(c["devices"], 3);
    assert!(c["coverage"].as_f64().unwrap() < 0.01, "{c}");
    let m = gw.metrics().await;
    for line in [
        r#"tend_gateway_sla_deadlines{deadline="respond",status="met"} 1"#,
        r#"tend_gateway_sla_deadlines{deadline="plan",status="pending"} 0"#,
        r#"tend_gateway_sla_events_total{deadline="resolve",status="missed"}"#,
        r#"tend_gateway_sla_events_total{deadline="respond",status="missed"}"#,
    ] {
        assert!(m.contains(line), "{line} missing:\n{m}");
    }

    // The maintenance ticket resolved in the backend, which now answers as a v1 backend
    // (status only, no history): the gateway stamps what it reads with the time it read
    // it. Maintenance done, next due 30 days on.
    backend.set_v1(true);
    let resolved_at = Timestamp::now();
    assert!(backend.set_status(&pm.id, "acknowledged"));
    assert!(backend.set_status(&pm.id, "resolved"));
    let maint = until(
        "the maintenance noted as done",
        Duration::from_secs(30),
        || async {
            let (_, m) = gw.get("/api/v1/devices/spare-monitor/maintenance").await;
            (m["counted_from"] == "last_maintenance").then_some(m)
        },
    )
    .await;
    let today = Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::get("Asia/Shanghai").unwrap())
        .date();
    assert_eq!(maint["last_done"], today.to_string());
    let next: jiff::civil::Date = maint["next_due"].as_str().unwrap().parse().unwrap();
    assert_eq!(next, today.checked_add(jiff::ToSpan::days(30)).unwrap());
    assert_eq!(maint["done"][0]["source"], format!("ticket {}", pm.key));
    let (_, pms) = gw.get("/api/v1/tickets?device=spare-monitor").await;
    let hist = pms[0]["status_history"].as_array().unwrap().clone();
    let last = hist.last().unwrap();
    assert_eq!(last["status"], "resolved", "{hist:?}");
    let read_at: Timestamp = last["at"].as_str().unwrap().parse().unwrap();
    assert!(
        read_at >= resolved_at && read_at <= Timestamp::now(),
        "{hist:?}"
    );
    // Not due again for 30 days: no second maintenance ticket for it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pms = backend
        .tickets()
        .into_iter()
        .filter(|t| {
            t.body["kind"] == "maintenance_due" && t.body["device"]["id"] == "spare-monitor"
        })
        .count();
    assert_eq!(pms, 1);
    // The ventilators, accepted 2025-06-01 under the same contract, got theirs too.
    for v in ["vent-0", "vent-1"] {
        assert!(backend
            .tickets()
            .iter()
            .any(|t| t.body["kind"] == "maintenance_due" && t.body["device"]["id"] == v));
    }

    let _ = agent.start_kill();
    let _ = agent.wait().await;
    for r in backend.requests() {
        assert_ne!(
            r.status,
            Some(409),
            "a key reused with another body: {r:#?}"
        );
    }
}
