//! End to end, every part real: simulated devices (LIP-300 on a pty, AV-500 over Modbus
//! TCP, VM-12 over MQTT to a bedside broker) → `tend-agent run`, enrolled → the gateway's
//! embedded broker (enrolled agents only) →
//! `tend-gateway run` → an HTTP server standing in for the service backend, which fails
//! the first requests with 503, 503 and 429.
//!
//! Proves: exactly one ticket per fault episode, with the SLA fields of the API; the
//! clearing and the recurrence become events on that ticket; retries go through 5xx and
//! 429 without a second ticket; the hotline runs a diagnostic on a device through its
//! agent; nothing of the patient reaches the backend.

mod common;

use common::*;
use jiff::{SignedDuration, Timestamp};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;
use tend_devsim::av500::{device_state, Av500Config, Av500Sim};
use tend_devsim::lip300::{Lip300Config, Lip300Sim};
use tend_devsim::vm12::{Vm12Config, Vm12Sim};
use tend_testkit::backend_standin::{self, Scripted};

const PID: &str = "P-0048213";

fn ts(v: &Value) -> Timestamp {
    v.as_str()
        .unwrap_or_else(|| panic!("not a time: {v}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_to_backend_one_ticket_per_episode_with_events_retries_and_diagnostics() {
    let backend = backend_standin::spawn(BACKEND_TOKEN).await.unwrap();
    backend.script([
        Scripted::Status(503),
        Scripted::Status(503),
        Scripted::TooMany { retry_after_s: 1 },
    ]);

    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet_toml(&[
        FleetDevice {
            id: "icu7-vent",
            serial: "AV5C-21-004417",
            site: "s-main",
            location: "ICU bed 7",
            accepted: "2025-06-01",
        },
        FleetDevice {
            id: "ward3-pump",
            serial: "LP3B-2403-0457",
            site: "s-main",
            location: "Ward 3 bed 12",
            accepted: "2023-01-10",
        },
        FleetDevice {
            id: "icu7-monitor",
            serial: "VM12-00A4471",
            site: "s-county",
            location: "ICU bed 7",
            accepted: "2025-06-01",
        },
    ]);
    let broker_port = free_port();
    let backend_url = backend.url();
    let mut gw = GatewayProc::spawn(
        gateway_bin(),
        &dir.path().join("gw"),
        &GatewaySpec {
            id: "gw-e2e",
            broker: BrokerChoice::Embedded(broker_port),
            backend: Some(&backend_url),
            fleet: &fleet,
        },
    )
    .await;

    let lip = Lip300Sim::spawn_pty(Lip300Config::v3()).await.unwrap();
    lip.set_pid(PID);
    let av = Av500Sim::spawn_tcp(
        Av500Config::v5(),
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
    )
    .await
    .unwrap();
    // The monitor publishes to a broker at the bedside (the simulator's own): the
    // gateway's admits only enrolled agents.
    let device_broker = tend_devsim::broker::spawn_embedded().unwrap();
    let mut vm_cfg = Vm12Config::v7("127.0.0.1", device_broker.port());
    vm_cfg.status_interval = Duration::from_millis(500);
    let _vm = Vm12Sim::spawn(vm_cfg).await.unwrap();

    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent_cfg = agent_dir.join("agent.toml");
    enrol_agent(&gw.config, "agent-e2e", &agent_dir);
    std::fs::write(
        &agent_cfg,
        format!(
            r#"agent_id = "agent-e2e"
site_id = "s-main"
data_dir = "data"
flap_damping = "1s"
[uplink]
broker = "{broker}"
credentials = "agent-e2e.cred"
keep_alive = "5s"
[[device]]
id = "ward3-pump"
profile = "lumen/lip-300"
transport = "serial"
port = "{lip}"
poll_interval = "300ms"
[[device]]
id = "icu7-vent"
profile = "aeris/av-500"
transport = "modbus-tcp"
address = "{av}"
poll_interval = "200ms"
[[device]]
id = "icu7-monitor"
profile = "vistara/vm-12"
transport = "mqtt"
broker = "{device_broker}"
serial = "VM12-00A4471"
"#,
            broker = gw.broker_url,
            device_broker = device_broker.url(),
            lip = lip.path().display(),
            av = av.addr().unwrap(),
        ),
    )
    .unwrap();
    let agent_log = agent_dir.join("agent.log");
    let mut agent = spawn_agent(agent_bin(), &agent_cfg, &agent_log);

    // The hotline sees every device come up.
    until(
        "all three devices up at the gateway",
        Duration::from_secs(60),
        || async {
            let (st, v) = gw.get("/api/v1/devices").await;
            assert_eq!(st, 200, "{v}");
            let up: BTreeSet<String> = v
                .as_array()?
                .iter()
                .filter(|d| d["state"] == "up")
                .filter_map(|d| d["id"].as_str().map(str::to_string))
                .collect();
            (up.len() == 3).then_some(())
        },
    )
    .await;

    // The exhalation valve fails: a major fault, the ventilator in its safe state.
    av.update(|s| {
        s.alarm_word1 = 16;
        s.device_state = device_state::FAILURE;
    });
    let ticket = until(
        "the ALM1.4 ticket at the backend",
        Duration::from_secs(60),
        || async {
            backend
                .tickets()
                .into_iter()
                .find(|t| t.body.pointer("/fault/code") == Some(&json!("ALM1.4")))
        },
    )
    .await;
    let b = &ticket.body;
    // As the backend received it (shown with --nocapture).
    eprintln!(
        "ticket {} (Idempotency-Key {}):\n{}",
        ticket.id,
        ticket.key,
        serde_json::to_string_pretty(b).unwrap()
    );
    assert_eq!(b["schema"], "service-ticket/1");
    assert_eq!(b["kind"], "fault");
    assert_eq!(b["customer"]["id"], "c-017");
    assert_eq!(b["site"]["service_area"], "same_city");
    assert_eq!(b["device"]["id"], "icu7-vent");
    assert_eq!(b["device"]["serial"], "AV5C-21-004417");
    assert_eq!(b["device"]["model"], "AV-500");
    assert_eq!(b["device"]["firmware"], "5.2.1");
    assert_eq!(b["device"]["location"], "ICU bed 7");
    assert_eq!(b["fault"]["class"], "major");
    assert_eq!(b["fault"]["device_available"], false);
    assert_eq!(b["fault"]["evidence"]["alarm_word_1"], 16);
    assert_eq!(
        b["fault"]["suggested_action"],
        "Replace the exhalation valve assembly; bring spare."
    );
    assert_eq!(b["clinical_impact"], "high");
    assert_eq!(
        b["warranty"],
        json!({"status": "in_warranty", "until": "2027-06-01", "billable": false})
    );
    let first_seen = ts(&b["fault"]["first_seen"]);
    assert!(b["fault"]["first_seen"]
        .as_str()
        .unwrap()
        .ends_with("+08:00"));
    let h = |n: i64| Some(first_seen + SignedDuration::from_hours(n));
    assert_eq!(Some(ts(&b["sla"]["respond_by"])), h(1));
    assert_eq!(Some(ts(&b["sla"]["onsite_by"])), h(3));
    assert_eq!(b["sla"]["plan_by"], Value::Null);
    assert_eq!(Some(ts(&b["sla"]["resolve_by"])), h(72));
    assert_eq!(b["source"]["gateway"], "gw-e2e");
    assert_eq!(b["source"]["agent"], "agent-e2e");
    assert!(ticket.key.starts_with("tend-t"), "{}", ticket.key);

    // It clears (after the 1 s damping): an event on the same ticket.
    av.update(|s| {
        s.alarm_word1 = 0;
        s.device_state = device_state::VENTILATING;
    });
    let id = ticket.id.clone();
    until(
        "fault_cleared on the ticket",
        Duration::from_secs(30),
        || async {
            let t = backend.ticket(&id)?;
            t.events
                .iter()
                .any(|e| e.kind == "fault_cleared")
                .then_some(())
        },
    )
    .await;

    // It comes back while the ticket is open: a recurrence on the same ticket, no new one.
    av.update(|s| {
        s.alarm_word1 = 16;
        s.device_state = device_state::FAILURE;
    });
    until(
        "fault_recurred on the ticket",
        Duration::from_secs(30),
        || async {
            let t = backend.ticket(&id)?;
            t.events
                .iter()
                .any(|e| e.kind == "fault_recurred")
                .then_some(())
        },
    )
    .await;
    let alm: Vec<_> = backend
        .tickets()
        .into_iter()
        .filter(|t| t.body.pointer("/fault/code") == Some(&json!("ALM1.4")))
        .collect();
    assert_eq!(alm.len(), 1, "one ticket for the valve fault: {alm:#?}");
    let kinds: Vec<&str> = alm[0].events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        &kinds[..2],
        ["fault_cleared", "fault_recurred"],
        "{kinds:?}"
    );

    // Retries: the scripted 503, 503 and 429 were answered, and every ticket still exists
    // once. The stand-in opens a ticket only on a key's first success, so a second ticket
    // for one key is impossible there; what must hold is that no fault has two tickets.
    let reqs = backend.requests();
    let statuses: Vec<u16> = reqs.iter().filter_map(|r| r.status).collect();
    assert_eq!(&statuses[..3], [503, 503, 429], "{statuses:?}");
    let after_429 = reqs.iter().find(|r| r.status == Some(429)).unwrap().at;
    let next = reqs
        .iter()
        .filter(|r| r.at > after_429)
        .map(|r| r.at)
        .min()
        .unwrap();
    assert!(
        next - after_429 >= Duration::from_millis(990),
        "Retry-After not honoured"
    );
    assert!(reqs.iter().all(|r| r.authorized));
    let tickets = backend.tickets();
    let mut per_fault = BTreeSet::new();
    for t in &tickets {
        let k = (
            t.body["device"]["id"].to_string(),
            t.body["fault"]["code"].to_string(),
        );
        assert!(per_fault.insert(k.clone()), "two tickets for {k:?}");
    }

    // The gateway shows the ticket as sent, with the backend's id and its deadlines.
    let (st, list) = gw.get("/api/v1/tickets?device=icu7-vent").await;
    assert_eq!(st, 200);
    let mine = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["ticket_id"] == json!(id))
        .unwrap_or_else(|| panic!("{list:#}"));
    assert_eq!(mine["forwarding"]["state"], "sent", "{mine:#}");
    assert_eq!(mine["kind"], "fault");
    assert_eq!(mine["class"], "major");

    // A diagnostic through the agent to the pump, and one the profile does not list.
    let (st, v) = gw
        .post(
            "/api/v1/devices/ward3-pump/diagnostics",
            json!({"request": "selftest"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["device"], "ward3-pump");
    assert_eq!(v["request"], "selftest");
    assert!(!v["answer"].is_null(), "{v}");
    let (st, v) = gw
        .post(
            "/api/v1/devices/ward3-pump/diagnostics",
            json!({"request": "start_infusion"}),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    let (st, _) = gw
        .post(
            "/api/v1/devices/icu7-vent/diagnostics",
            json!({"request": "transport"}),
        )
        .await;
    assert_eq!(st, 200);
    let audit = std::fs::read_to_string(gw.dir.join("data/audit.log")).unwrap();
    assert_eq!(audit.lines().count(), 3, "{audit}");
    assert!(!audit.contains(API_TOKEN));

    // Nothing of the patient left the bedside.
    for r in backend.requests() {
        let text = String::from_utf8_lossy(&r.raw_body);
        assert!(
            !text.contains(PID),
            "patient id sent to the backend: {text}"
        );
    }
    let log = gw.log_text();
    assert!(!log.contains(PID) && !log.contains(BACKEND_TOKEN) && !log.contains(API_TOKEN));

    let _ = agent.start_kill();
    gw.kill().await;
}
