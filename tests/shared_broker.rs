//! Two gateways on one external broker (a real Mosquitto) share one agent's traffic with
//! an MQTT shared subscription: each batch reaches one of them. Fault episodes open on
//! one gateway and clear on the other, yet the backend gets exactly one ticket per
//! episode, never a 409 (both gateways build the same body under the same key), and each
//! clearing as an event.

mod common;

use common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tend_devsim::av500::{device_state, Av500Config, Av500Sim};
use tend_testkit::backend_standin;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_the_traffic_and_open_each_ticket_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _mosquitto = start_mosquitto(dir.path(), port).await;
    let url = format!("mqtt://127.0.0.1:{port}");
    let backend = backend_standin::spawn(BACKEND_TOKEN).await.unwrap();
    let backend_url = backend.url();
    let fleet = fleet_toml(&[FleetDevice {
        id: "icu7-vent",
        serial: "AV5C-21-004417",
        site: "s-main",
        location: "ICU bed 7",
        accepted: "2025-06-01",
    }]);
    let mut gws = Vec::new();
    for id in ["gw-a", "gw-b"] {
        gws.push(
            // One trust directory for the fleet's gateways: both accept the agent
            // enrolled once.
            spawn_gateway_with(
                &dir.path().join(id),
                &GatewaySpec {
                    id,
                    broker: BrokerChoice::External {
                        url: url.clone(),
                        group: Some("tend-gws".into()),
                    },
                    backend: Some(&backend_url),
                    fleet: &fleet,
                },
                "[trust]\ndir = \"../trust\"\n",
            )
            .await,
        );
    }

    let av = Av500Sim::spawn_tcp(
        Av500Config::v5(),
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
    )
    .await
    .unwrap();
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let cfg = agent_dir.join("agent.toml");
    enrol_agent(&gws[0].config, "agent-shared", &agent_dir);
    // Small batches, so an episode's opening and its clearing travel in different ones.
    std::fs::write(
        &cfg,
        format!(
            r#"agent_id = "agent-shared"
site_id = "s-main"
data_dir = "data"
flap_damping = "500ms"
[uplink]
broker = "{url}"
credentials = "agent-shared.cred"
keep_alive = "5s"
[[device]]
id = "icu7-vent"
profile = "aeris/av-500"
transport = "modbus-tcp"
address = "{av}"
poll_interval = "100ms"
"#,
            av = av.addr().unwrap()
        ),
    )
    .unwrap();
    let mut agent = spawn_agent(agent_bin(), &cfg, &agent_dir.join("agent.log"));

    // Five faults of the ventilator, one after another, each raised and cleared.
    let bits = [3u16, 4, 5, 6, 7];
    for bit in bits {
        av.update(|s| {
            s.alarm_word1 = 1 << bit;
            s.device_state = device_state::FAILURE;
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        av.update(|s| {
            s.alarm_word1 = 0;
            s.device_state = device_state::VENTILATING;
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let codes: Vec<String> = bits.iter().map(|b| format!("ALM1.{b}")).collect();
    until(
        "a ticket with fault_cleared for every valve fault",
        Duration::from_secs(60),
        || async {
            let t = backend.tickets();
            codes
                .iter()
                .all(|c| {
                    t.iter().any(|t| {
                        t.body.pointer("/fault/code") == Some(&json!(c))
                            && t.events.iter().any(|e| e.kind == "fault_cleared")
                    })
                })
                .then_some(())
        },
    )
    .await;

    // Both gateways took part.
    for gw in &gws {
        let m = gw.metrics().await;
        assert!(
            metric(&m, "tend_gateway_records_total") > 0.0,
            "{} stored nothing:\n{m}",
            gw.dir.display()
        );
    }
    // One ticket per episode: per fault code exactly one ticket (each fault here is one
    // episode), every create answered 201 or 200 (the same body from both), never 409.
    let tickets = backend.tickets();
    let mut per_code: BTreeMap<String, usize> = BTreeMap::new();
    for t in &tickets {
        *per_code
            .entry(t.body["fault"]["code"].as_str().unwrap().to_string())
            .or_default() += 1;
        // Each valve fault was one episode: cleared once, whichever gateway saw it (the
        // SAFE_STATE ticket gathers a recurrence per fault, each cleared).
        if codes.iter().any(|c| t.body["fault"]["code"] == json!(c)) {
            let cleared = t
                .events
                .iter()
                .filter(|e| e.kind == "fault_cleared")
                .count();
            assert_eq!(cleared, 1, "{t:#?}");
        }
    }
    for c in &codes {
        assert_eq!(per_code.get(c), Some(&1), "{per_code:?}");
    }
    for r in backend.requests() {
        // The one 409 two gateways with separate stores can still cause: a recurrence of
        // SAFE_STATE, which each gateway attaches to the open SAFE_STATE ticket *it* knows
        // (they may know different ones), sent under the same episode key to two tickets.
        // A shared store (DESIGN "Scale-out", the PostgreSQL issue) decides the owning
        // ticket in one place; until then the forwarder keeps such an event `failed` and
        // shown. Every ticket create and every event of the valve faults must never 409.
        let recurrence =
            r.body.as_ref().and_then(|b| b.get("type")) == Some(&json!("fault_recurred"));
        if recurrence && r.status == Some(409) {
            eprintln!("known limit of separate stores: {r:?}");
            continue;
        }
        assert_ne!(
            r.status,
            Some(409),
            "a key reused with another body: {r:#?}"
        );
        if r.is_create() {
            let by = r.body.as_ref().and_then(|b| b.pointer("/source/gateway"));
            assert_eq!(by, Some(&json!("tend-gws")), "signed by the group");
        }
    }
    let _ = agent.start_kill();
    for mut gw in gws {
        gw.kill().await;
    }
}
