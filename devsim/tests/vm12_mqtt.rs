//! VM-12 against the embedded broker: status schemas, last will, events, commands.

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use std::time::Duration;
use tend_devsim::broker;
use tend_devsim::vm12::{Vm12Config, Vm12Sim};
use tokio::sync::mpsc;

struct Sub {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
}

async fn subscriber(port: u16, id: &str, filter: &str) -> Sub {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(opts, 32);
    let (tx, rx) = mpsc::unbounded_channel();
    let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec(), p.retain));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = sub_tx.send(());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sub_rx.recv())
        .await
        .expect("suback");
    Sub { client, rx }
}

impl Sub {
    /// The next message on `topic` within `within`.
    async fn next_on(&mut self, topic: &str, within: Duration) -> Option<(Vec<u8>, bool)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((t, p, r))) if t == topic => return Some((p, r)),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }
    async fn json_on(&mut self, topic: &str, within: Duration) -> Value {
        let (p, _) = self
            .next_on(topic, within)
            .await
            .unwrap_or_else(|| panic!("a message on {topic}"));
        serde_json::from_slice(&p).unwrap()
    }
}

#[tokio::test]
async fn vm12_fw7_status_events_commands_and_will() {
    let b = broker::spawn_embedded().unwrap();
    let serial = "VM12-T7A0001";
    let mut sub = subscriber(b.port(), "test-sub-7", &format!("vistara/{serial}/#")).await;
    let mut cfg = Vm12Config::new("7.4.2".parse().unwrap(), serial, "127.0.0.1", b.port());
    cfg.status_interval = Duration::from_secs(60); // changes must be published at once
    let sim = Vm12Sim::spawn(cfg).await.unwrap();

    let (p, _) = sub
        .next_on(&sim.topic("lwt"), Duration::from_secs(5))
        .await
        .expect("online");
    assert_eq!(p, b"online");
    let st = sub
        .json_on(&sim.topic("status"), Duration::from_secs(5))
        .await;
    assert_eq!(st["schema"], "vistara.status/2");
    assert_eq!(st["serial"], serial);
    assert_eq!(st["fw"], "7.4.2");
    assert_eq!(st["state"], "monitoring");
    assert_eq!(st["patient"]["mrn"], "MRN0012931");
    assert_eq!(st["vitals"]["hr"], 72);
    assert!(st["ts"].as_str().unwrap().ends_with('Z'));

    // raise: an event and a status at once
    sim.raise_alarm("T-301", "high", "NIBP pump failure");
    let ev = sub
        .json_on(&sim.topic("event"), Duration::from_secs(3))
        .await;
    assert_eq!(
        (ev["code"].as_str(), ev["action"].as_str()),
        (Some("T-301"), Some("raised"))
    );
    let st = sub
        .json_on(&sim.topic("status"), Duration::from_secs(3))
        .await;
    assert_eq!(st["tech_alarms"][0]["code"], "T-301");
    sim.clear_alarm("T-301");
    let ev = sub
        .json_on(&sim.topic("event"), Duration::from_secs(3))
        .await;
    assert_eq!(ev["action"], "cleared");
    sim.set_module_fault(2, "M-214");
    let ev = sub
        .json_on(&sim.topic("event"), Duration::from_secs(3))
        .await;
    assert_eq!(ev["code"], "M-214");

    // commands
    sub.client
        .publish(
            sim.topic("cmd"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"r1","cmd":"selftest"}"#,
        )
        .await
        .unwrap();
    let r = sub
        .json_on(&sim.topic("cmd/reply"), Duration::from_secs(5))
        .await;
    assert_eq!(r["id"], "r1");
    assert_eq!(r["ok"], true);
    assert_eq!(r["result"]["items"]["spo2"], "fail");
    sub.client
        .publish(
            sim.topic("cmd"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"r2","cmd":"errlog","lines":1}"#,
        )
        .await
        .unwrap();
    let r = sub
        .json_on(&sim.topic("cmd/reply"), Duration::from_secs(5))
        .await;
    assert_eq!(r["result"]["lines"].as_array().unwrap().len(), 1);
    assert!(r["result"].get("patient").is_none(), "{r}");
    // A later firmware may add keys to a result (§1): the opt-in sends patient data.
    sim.update(|s| s.phi_in_replies = true);
    sub.client
        .publish(
            sim.topic("cmd"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"r2p","cmd":"errlog","lines":1}"#,
        )
        .await
        .unwrap();
    let r = sub
        .json_on(&sim.topic("cmd/reply"), Duration::from_secs(5))
        .await;
    assert_eq!(r["id"], "r2p");
    assert_eq!(r["result"]["patient"]["name"], "ZHANG San");
    assert_eq!(r["result"]["vitals"]["nibp"], "118/76");
    sim.update(|s| s.phi_in_replies = false);
    sub.client
        .publish(
            sim.topic("cmd"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"r3","cmd":"factory_reset"}"#,
        )
        .await
        .unwrap();
    let r = sub
        .json_on(&sim.topic("cmd/reply"), Duration::from_secs(5))
        .await;
    assert_eq!(
        r,
        serde_json::json!({"id":"r3","ok":false,"error":"unsupported"})
    );

    // silent: the connection drops and the broker publishes the will
    sim.set_silent(true);
    let (p, _) = sub
        .next_on(&sim.topic("lwt"), Duration::from_secs(5))
        .await
        .expect("offline");
    assert_eq!(p, b"offline");
    // a late subscriber sees the retained will
    let mut late = subscriber(b.port(), "test-sub-7-late", &sim.topic("lwt")).await;
    let (p, retained) = late
        .next_on(&sim.topic("lwt"), Duration::from_secs(5))
        .await
        .expect("retained");
    assert_eq!((p.as_slice(), retained), (&b"offline"[..], true));
    // back again
    sim.set_silent(false);
    let (p, _) = sub
        .next_on(&sim.topic("lwt"), Duration::from_secs(5))
        .await
        .expect("online again");
    assert_eq!(p, b"online");
}

#[tokio::test]
async fn vm12_fw6_flat_status_no_commands() {
    let b = broker::spawn_embedded().unwrap();
    let serial = "VM12-T6B0002";
    let mut sub = subscriber(b.port(), "test-sub-6", &format!("vistara/{serial}/#")).await;
    let mut cfg = Vm12Config::new("6.9.0".parse().unwrap(), serial, "127.0.0.1", b.port());
    cfg.status_interval = Duration::from_millis(300);
    let sim = Vm12Sim::spawn(cfg).await.unwrap();
    let st = sub
        .json_on(&sim.topic("status"), Duration::from_secs(5))
        .await;
    assert_eq!(st["schema"], "vistara.status/1");
    assert_eq!(st["sn"], serial);
    assert_eq!(st["st"], "MON");
    assert_eq!(st["pt_name"], "LI Si");
    assert_eq!(st["pt_id"], "MRN0033017");
    assert_eq!(st["hr"], 88);
    assert!(st["t"].as_i64().unwrap() > 1_700_000_000);
    // periodic
    let t0 = tokio::time::Instant::now();
    sub.json_on(&sim.topic("status"), Duration::from_secs(2))
        .await;
    sub.json_on(&sim.topic("status"), Duration::from_secs(2))
        .await;
    assert!(t0.elapsed() < Duration::from_secs(2));
    sim.raise_alarm("T-112", "low", "real-time clock battery low");
    let mut found = false;
    for _ in 0..5 {
        let st = sub
            .json_on(&sim.topic("status"), Duration::from_secs(2))
            .await;
        if st["talarms"] == serde_json::json!(["T-112"]) {
            found = true;
            break;
        }
    }
    assert!(found);
    assert!(
        sub.next_on(&sim.topic("event"), Duration::from_millis(500))
            .await
            .is_none(),
        "6.x sends no events"
    );
    sub.client
        .publish(
            sim.topic("cmd"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"x","cmd":"selftest"}"#,
        )
        .await
        .unwrap();
    assert!(
        sub.next_on(&sim.topic("cmd/reply"), Duration::from_millis(800))
            .await
            .is_none(),
        "6.x has no commands"
    );
}
