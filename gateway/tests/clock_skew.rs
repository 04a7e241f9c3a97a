//! An agent whose clock is two years ahead, against a real gateway process: the gateway
//! flags it (hotline, metric), and takes its records in gateway time, so the fault's
//! ticket is in warranty and not billable, its deadlines start now, and the device's live
//! picture and ledger are not in the future. When the agent's clock is right again, the
//! flag goes.

use jiff::{SignedDuration, Timestamp};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tend_profiles::{DeviceState, FaultClass, SignalKind};
use tend_testkit::config::{fleet_toml, BrokerChoice, FleetDevice, GatewaySpec};
use tend_testkit::ports::free_port;
use tend_testkit::procs::GatewayProc;
use tend_testkit::wait::until;
use tend_wire::{EpisodeChange, EpisodeEvent, Purpose, Record, RecordBody, UpBatch, VERSION};

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_tend-gateway");
const AGENT: &str = "a-skew";
const BOUND: Duration = Duration::from_secs(30);

fn batch(sent_at: Timestamp, seq0: u64, at: Timestamp) -> UpBatch {
    let ep = EpisodeEvent {
        episode: format!("{AGENT}/icu7-vent/ALM1.4/{}", at.as_millisecond()),
        change: EpisodeChange::Opened,
        code: "ALM1.4".into(),
        kind: SignalKind::Fault,
        class: Some(FaultClass::Major),
        description: "exhalation valve fault".into(),
        action: None,
        evidence: BTreeMap::new(),
        device_available: false,
        opened_at: at,
        due: None,
        opening: None,
    };
    let rec = |seq, body| Record {
        seq,
        at,
        device: "icu7-vent".into(),
        body,
    };
    UpBatch {
        v: VERSION,
        agent: AGENT.into(),
        incarnation: "skew1".into(),
        site: "s-main".into(),
        sent_at,
        oldest: None,
        records: vec![
            rec(
                seq0,
                RecordBody::State {
                    from: DeviceState::Up,
                    to: DeviceState::Down,
                },
            ),
            rec(seq0 + 1, RecordBody::Episode(ep)),
        ],
    }
}

fn year(t: &serde_json::Value) -> i16 {
    t.as_str()
        .and_then(|s| s.parse::<Timestamp>().ok())
        .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).year())
        .unwrap_or_else(|| panic!("not a time: {t}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_two_years_ahead_is_flagged_and_its_records_taken_in_gateway_time() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet_toml(&[FleetDevice {
        id: "icu7-vent",
        serial: "AV5-2406-0117",
        site: "s-main",
        location: "ICU bed 7",
        // In its two-year warranty now, out of it by the agent's clock.
        accepted: "2025-06-01",
    }]);
    let gw = GatewayProc::spawn(
        Path::new(GATEWAY_BIN),
        &dir.path().join("gw"),
        &GatewaySpec {
            id: "gw-skew",
            broker: BrokerChoice::Embedded(free_port()),
            backend: None,
            fleet: &fleet,
        },
    )
    .await;
    let key = tend_testkit::trust::enrol(
        Path::new(GATEWAY_BIN),
        &gw.config,
        AGENT,
        &dir.path().join("a.cred"),
    );
    let (host, port) = gw
        .broker_url
        .trim_start_matches("mqtt://")
        .rsplit_once(':')
        .unwrap();
    let mut opts = MqttOptions::new(AGENT, host, port.parse::<u16>().unwrap());
    opts.set_credentials(AGENT, key.broker_password(AGENT));
    let (client, mut el) = AsyncClient::new(opts, 16);
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) | Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });

    let ahead = Timestamp::now() + SignedDuration::from_hours(2 * 365 * 24);
    let b = batch(ahead, 1, ahead - SignedDuration::from_mins(1));
    let payload = tend_wire::encode_sealed(&key, Purpose::Up, AGENT, &b).unwrap();
    client
        .publish(
            tend_wire::topic::up(AGENT),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .unwrap();

    // Flagged on the hotline and in /metrics.
    let agent = until("the agent listed as skewed", BOUND, || async {
        let (_, v) = gw.get("/api/v1/agents").await;
        v.as_array()?
            .iter()
            .find(|a| a["id"] == AGENT && a["clock_skewed"] == true)
            .cloned()
    })
    .await;
    let offset = agent["clock_offset_s"].as_i64().unwrap();
    assert!(
        (offset - 2 * 365 * 24 * 3600).abs() < 60,
        "offset {offset} s: {agent}"
    );
    assert!(gw
        .metrics()
        .await
        .contains("tend_gateway_agents_clock_skewed 1"));

    // The ticket: detected now by the gateway's clock, so in warranty, not billable, and
    // its deadlines this year.
    let ticket = until("the fault's ticket", BOUND, || async {
        let (_, v) = gw.get("/api/v1/tickets").await;
        v.as_array()?
            .iter()
            .find(|t| t["device"] == "icu7-vent")
            .cloned()
    })
    .await;
    let this_year = Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC).year();
    assert_eq!(year(&ticket["detected_at"]), this_year, "{ticket}");
    assert_eq!(ticket["warranty"]["status"], "in_warranty", "{ticket}");
    assert_eq!(ticket["warranty"]["billable"], false, "{ticket}");
    let sla = ticket["sla"].to_string();
    assert!(
        !sla.contains(&(this_year + 2).to_string()),
        "deadlines follow the agent's clock: {sla}"
    );

    // The live picture: down since now, not since two years ahead.
    let (_, device) = gw.get("/api/v1/devices/icu7-vent").await;
    let state_since = device
        .pointer("/state_since")
        .or_else(|| device.pointer("/live/state_since"))
        .unwrap_or_else(|| panic!("no state_since: {device}"));
    assert_eq!(year(state_since), this_year, "{device}");

    // The clock is put right: the flag goes.
    let now = Timestamp::now();
    let b = batch(now, 3, now);
    let payload = tend_wire::encode_sealed(&key, Purpose::Up, AGENT, &b).unwrap();
    client
        .publish(
            tend_wire::topic::up(AGENT),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .unwrap();
    until("the skew flag cleared", BOUND, || async {
        gw.metrics()
            .await
            .contains("tend_gateway_agents_clock_skewed 0")
            .then_some(())
    })
    .await;
    let (_, v) = gw.get("/api/v1/agents").await;
    let a = v
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == AGENT)
        .unwrap();
    assert_eq!(a["clock_skewed"], false, "{a}");
}
