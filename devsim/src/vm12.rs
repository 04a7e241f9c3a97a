//! Vistara VM-12 bedside patient monitor (document VS-IOT-12 issue 3): an MQTT 3.1.1
//! client that publishes its status.
//!
//! Client id `vm12-<serial>`, keep-alive 30 s, clean session, last will `offline`
//! (retained, QoS 1) on `vistara/<serial>/lwt` and `online` there after connecting;
//! `vistara/<serial>/status` (QoS 0) every 10 s and at once on any change, as
//! `vistara.status/2` on firmware 7.x (with the `patient` and `vitals` PHI objects) or the
//! flat `vistara.status/1` on 6.x (with `pt_name`, `pt_id`, `hr`); on 7.x an `event` on
//! every technical alarm or module fault raised or cleared, and the `selftest` / `errlog`
//! commands on `cmd` answered on `cmd/reply`. 6.x has no commands and no events.

use crate::shared::{Shared, Stopper};
use crate::Version;
use rumqttc::{AsyncClient, Event, LastWill, Packet, QoS};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io;
use std::str::FromStr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Largest payload the monitor sends or accepts.
pub const MAX_PAYLOAD: usize = 16 * 1024;

/// `state` (7.x) / `st` (6.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorState {
    Booting,
    Monitoring,
    Standby,
    Demo,
    Service,
    Fault,
}

impl MonitorState {
    /// The 7.x name.
    pub fn v2_name(self) -> &'static str {
        match self {
            MonitorState::Booting => "booting",
            MonitorState::Monitoring => "monitoring",
            MonitorState::Standby => "standby",
            MonitorState::Demo => "demo",
            MonitorState::Service => "service",
            MonitorState::Fault => "fault",
        }
    }
    /// The 6.x name.
    pub fn v1_name(self) -> &'static str {
        match self {
            MonitorState::Booting => "BOOT",
            MonitorState::Monitoring => "MON",
            MonitorState::Standby => "STBY",
            MonitorState::Demo => "DEMO",
            MonitorState::Service => "SVC",
            MonitorState::Fault => "FAIL",
        }
    }
}

impl FromStr for MonitorState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            MonitorState::Booting,
            MonitorState::Monitoring,
            MonitorState::Standby,
            MonitorState::Demo,
            MonitorState::Service,
            MonitorState::Fault,
        ]
        .into_iter()
        .find(|m| m.v2_name().eq_ignore_ascii_case(s) || m.v1_name().eq_ignore_ascii_case(s))
        .ok_or_else(|| {
            format!(
                "unknown VM-12 state {s:?} (booting, monitoring, standby, demo, service, fault)"
            )
        })
    }
}

/// A plug-in parameter module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Module {
    pub slot: u8,
    #[serde(rename = "type")]
    pub kind: String,
    /// `ok`, `fault` or `absent`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// An active technical alarm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TechAlarm {
    pub code: String,
    /// `low`, `medium` or `high`.
    pub prio: String,
    pub text: String,
}

/// Patient data: personal health information, present so tests can prove it is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Patient {
    pub mrn: String,
    pub name: String,
    pub bed: String,
    pub dob: String,
}

/// Vital signs: personal health information.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vitals {
    pub hr: u16,
    pub spo2: u16,
    pub nibp: String,
}

/// What the monitor reports; mutate it through [`Vm12Handle`].
#[derive(Debug, Clone, PartialEq)]
pub struct Vm12State {
    pub state: MonitorState,
    pub on_battery: bool,
    pub battery_pct: u8,
    /// 7.x only.
    pub battery_health_pct: u8,
    /// 7.x only.
    pub board_temp_c: f64,
    /// 7.x only.
    pub modules: Vec<Module>,
    pub tech_alarms: Vec<TechAlarm>,
    pub power_on_hours: u32,
    pub nibp_cycles: u32,
    pub patient: Patient,
    pub vitals: Vitals,
    /// Self-test items (`pass` / `fail`); a module in fault fails its item too.
    pub selftest: BTreeMap<String, String>,
    /// The error log, oldest first.
    pub errlog: Vec<String>,
    /// Disconnected (switched off, network lost): the broker sends the last will.
    pub silent: bool,
    /// Command results also carry the `patient` and `vitals` objects. VS-IOT-12 §5 shows
    /// none in a result, but §1 lets later firmware add keys anywhere: tests turn this on
    /// to prove a receiver strips PHI from command answers. Off by default, as the
    /// manual's examples are.
    pub phi_in_replies: bool,
}

impl Vm12State {
    /// The manual's example monitor for the firmware family, without faults.
    pub fn example(firmware: Version) -> Self {
        let v7 = firmware.major >= 7;
        let selftest = ["ecg", "spo2", "nibp", "temp", "speaker", "battery"]
            .into_iter()
            .map(|k| (k.to_string(), "pass".to_string()))
            .collect();
        Self {
            state: MonitorState::Monitoring,
            on_battery: false,
            battery_pct: if v7 { 96 } else { 77 },
            battery_health_pct: 88,
            board_temp_c: 41.5,
            modules: vec![
                Module {
                    slot: 1,
                    kind: "ECG".into(),
                    status: "ok".into(),
                    code: None,
                },
                Module {
                    slot: 2,
                    kind: "SpO2".into(),
                    status: "ok".into(),
                    code: None,
                },
            ],
            tech_alarms: Vec::new(),
            power_on_hours: if v7 { 18234 } else { 30551 },
            nibp_cycles: 50211,
            patient: if v7 {
                Patient {
                    mrn: "MRN0012931".into(),
                    name: "ZHANG San".into(),
                    bed: "ICU-07".into(),
                    dob: "1961-04-02".into(),
                }
            } else {
                Patient {
                    mrn: "MRN0033017".into(),
                    name: "LI Si".into(),
                    bed: "ICU-03".into(),
                    dob: "1958-09-17".into(),
                }
            },
            vitals: Vitals {
                hr: if v7 { 72 } else { 88 },
                spo2: 98,
                nibp: "118/76".into(),
            },
            selftest,
            errlog: vec![
                "2026-11-20T03:14:07Z T-112 RTC battery voltage 2.41 V".into(),
                "2026-11-27T22:40:51Z T-150 touch panel recalibrated".into(),
                "2026-11-28T09:02:11Z T-301 NIBP pump stalled at 182 mmHg".into(),
            ],
            silent: false,
            phi_in_replies: false,
        }
    }
}

/// The meaning of a code from the manual's table (§4), for event texts.
pub fn code_text(code: &str) -> &'static str {
    match code {
        "T-104" => "fan speed low",
        "T-112" => "real-time clock battery low",
        "T-150" => "touch panel calibration lost",
        "T-207" => "main board temperature high",
        "T-233" => "recorder module not responding",
        "T-301" => "NIBP pump failure",
        "T-318" => "power supply board fault",
        "M-214" => "SpO2 module hardware fault",
        "M-220" => "ECG module hardware fault",
        "M-305" => "module bus failure",
        c if c.starts_with("M-") => "module fault",
        _ => "technical alarm",
    }
}

/// Identity and connection of one simulated monitor.
#[derive(Debug, Clone)]
pub struct Vm12Config {
    pub firmware: Version,
    pub serial: String,
    pub broker_host: String,
    pub broker_port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The manual: 10 s.
    pub status_interval: Duration,
    /// The manual: 30 s.
    pub keep_alive: Duration,
    pub state: Option<Vm12State>,
}

impl Vm12Config {
    pub fn new(
        firmware: Version,
        serial: impl Into<String>,
        host: impl Into<String>,
        port: u16,
    ) -> Self {
        Self {
            firmware,
            serial: serial.into(),
            broker_host: host.into(),
            broker_port: port,
            username: None,
            password: None,
            status_interval: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
            state: None,
        }
    }
    /// The manual's 7.x monitor `VM12-00A4471`, firmware 7.4.2.
    pub fn v7(host: impl Into<String>, port: u16) -> Self {
        Self::new(Version::new(7, 4, 2), "VM12-00A4471", host, port)
    }
    /// The manual's 6.x monitor `VM12-0081192`, firmware 6.9.0.
    pub fn v6(host: impl Into<String>, port: u16) -> Self {
        Self::new(Version::new(6, 9, 0), "VM12-0081192", host, port)
    }
    fn is_v7(&self) -> bool {
        self.firmware.major >= 7
    }
    pub fn client_id(&self) -> String {
        format!("vm12-{}", self.serial)
    }
    pub fn topic(&self, leaf: &str) -> String {
        format!("vistara/{}/{leaf}", self.serial)
    }
}

// ---------------------------------------------------------------- JSON documents (pure)

fn one_decimal(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[derive(Serialize)]
struct StatusV2<'a> {
    schema: &'static str,
    serial: &'a str,
    fw: String,
    ts: String,
    state: &'static str,
    power: PowerV2,
    temps: TempsV2,
    modules: &'a [Module],
    tech_alarms: &'a [TechAlarm],
    counters: CountersV2,
    patient: &'a Patient,
    vitals: &'a Vitals,
}

#[derive(Serialize)]
struct PowerV2 {
    source: &'static str,
    battery_pct: u8,
    battery_health_pct: u8,
}

#[derive(Serialize)]
struct TempsV2 {
    board_c: f64,
}

#[derive(Serialize)]
struct CountersV2 {
    power_on_hours: u32,
    nibp_cycles: u32,
}

#[derive(Serialize)]
struct StatusV1<'a> {
    schema: &'static str,
    sn: &'a str,
    fw: String,
    t: i64,
    st: &'static str,
    pwr: &'static str,
    batt: u8,
    talarms: Vec<&'a str>,
    poh: u32,
    pt_name: &'a str,
    pt_id: &'a str,
    hr: u16,
}

fn iso_seconds(ts: jiff::Timestamp) -> String {
    jiff::Timestamp::from_second(ts.as_second())
        .unwrap_or(ts)
        .to_string()
}

/// The status document for the firmware family at time `ts`.
pub fn status_json(cfg: &Vm12Config, s: &Vm12State, ts: jiff::Timestamp) -> String {
    let out = if cfg.is_v7() {
        serde_json::to_string(&StatusV2 {
            schema: "vistara.status/2",
            serial: &cfg.serial,
            fw: cfg.firmware.to_string(),
            ts: iso_seconds(ts),
            state: s.state.v2_name(),
            power: PowerV2 {
                source: if s.on_battery { "battery" } else { "mains" },
                battery_pct: s.battery_pct,
                battery_health_pct: s.battery_health_pct,
            },
            temps: TempsV2 {
                board_c: one_decimal(s.board_temp_c),
            },
            modules: &s.modules,
            tech_alarms: &s.tech_alarms,
            counters: CountersV2 {
                power_on_hours: s.power_on_hours,
                nibp_cycles: s.nibp_cycles,
            },
            patient: &s.patient,
            vitals: &s.vitals,
        })
    } else {
        serde_json::to_string(&StatusV1 {
            schema: "vistara.status/1",
            sn: &cfg.serial,
            fw: cfg.firmware.to_string(),
            t: ts.as_second(),
            st: s.state.v1_name(),
            pwr: if s.on_battery { "BAT" } else { "AC" },
            batt: s.battery_pct,
            talarms: s.tech_alarms.iter().map(|a| a.code.as_str()).collect(),
            poh: s.power_on_hours,
            pt_name: &s.patient.name,
            pt_id: &s.patient.mrn,
            hr: s.vitals.hr,
        })
    };
    out.unwrap_or_else(|_| "{}".to_string())
}

/// Every active technical code (alarms and module faults) with its text.
pub fn technical_codes(s: &Vm12State) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = s
        .tech_alarms
        .iter()
        .map(|a| (a.code.clone(), a.text.clone()))
        .collect();
    for module in &s.modules {
        if let (true, Some(code)) = (module.status == "fault", &module.code) {
            m.insert(code.clone(), code_text(code).to_string());
        }
    }
    m
}

/// The events between two sets of active codes: `(code, "raised"|"cleared", text)`.
pub fn diff_events(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Vec<(String, &'static str, String)> {
    let mut out = Vec::new();
    for (code, text) in old {
        if !new.contains_key(code) {
            out.push((code.clone(), "cleared", text.clone()));
        }
    }
    for (code, text) in new {
        if !old.contains_key(code) {
            out.push((code.clone(), "raised", text.clone()));
        }
    }
    out
}

/// An `event` document (§6).
pub fn event_json(ts: jiff::Timestamp, code: &str, action: &str, text: &str) -> String {
    serde_json::json!({"ts": iso_seconds(ts), "code": code, "action": action, "text": text})
        .to_string()
}

/// The `cmd/reply` document for a `cmd` payload (§5), or `None` when the payload is not
/// a JSON object (there is no id to answer to) or too large.
pub fn command_reply(s: &Vm12State, payload: &[u8]) -> Option<String> {
    use serde_json::{json, Value};
    if payload.len() > MAX_PAYLOAD {
        return None;
    }
    let req: Value = serde_json::from_slice(payload).ok()?;
    let obj = req.as_object()?;
    let id = obj.get("id").cloned().unwrap_or(Value::Null);
    let reply = match obj.get("cmd").and_then(Value::as_str) {
        Some("selftest") => {
            let mut items = s.selftest.clone();
            for m in s.modules.iter().filter(|m| m.status == "fault") {
                items.insert(m.kind.to_ascii_lowercase(), "fail".to_string());
            }
            let overall = if items.values().all(|v| v == "pass") {
                "pass"
            } else {
                "fail"
            };
            json!({"id": id, "ok": true, "result": {"overall": overall, "items": items}})
        }
        Some("errlog") => {
            let want = obj
                .get("lines")
                .and_then(Value::as_u64)
                .unwrap_or(20)
                .min(100) as usize;
            let skip = s.errlog.len().saturating_sub(want);
            let lines: Vec<&String> = s.errlog.iter().skip(skip).collect();
            json!({"id": id, "ok": true, "result": {"lines": lines}})
        }
        _ => json!({"id": id, "ok": false, "error": "unsupported"}),
    };
    let mut reply = reply;
    if s.phi_in_replies {
        if let Some(result) = reply.get_mut("result").and_then(Value::as_object_mut) {
            result.insert("patient".into(), json!(s.patient));
            result.insert("vitals".into(), json!(s.vitals));
        }
    }
    let text = reply.to_string();
    (text.len() <= MAX_PAYLOAD).then_some(text)
}

// ---------------------------------------------------------------- the MQTT client

/// Starts VM-12 simulators.
pub struct Vm12Sim;

impl Vm12Sim {
    /// Connects a monitor to the broker in `cfg` and keeps it publishing (reconnecting
    /// after a broker loss) until the handle is dropped.
    pub async fn spawn(cfg: Vm12Config) -> io::Result<Vm12Handle> {
        if cfg.serial.is_empty() || cfg.serial.contains(['/', '+', '#']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("VM-12 serial {:?} cannot be part of a topic", cfg.serial),
            ));
        }
        let state = Shared::new(
            cfg.state
                .clone()
                .unwrap_or_else(|| Vm12State::example(cfg.firmware)),
        );
        let stopper = Stopper::new();
        tokio::spawn(run(cfg.clone(), state.clone(), stopper.token()));
        Ok(Vm12Handle {
            cfg,
            state,
            stopper,
        })
    }

    /// Convenience: a monitor of `firmware` with `serial` on `host:port`.
    pub async fn spawn_on(
        host: &str,
        port: u16,
        serial: &str,
        firmware: Version,
    ) -> io::Result<Vm12Handle> {
        Self::spawn(Vm12Config::new(firmware, serial, host, port)).await
    }
}

/// A monitor retries its broker every second.
const RECONNECT: tend_mqtt::Backoff = tend_mqtt::Backoff::fixed(Duration::from_secs(1));

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum End {
    Stop,
    Silenced,
}

async fn run(cfg: Vm12Config, state: Shared<Vm12State>, token: CancellationToken) {
    let mut rx = state.subscribe();
    loop {
        while rx.borrow_and_update().silent {
            tokio::select! {
                _ = token.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
        match session(&cfg, &state, &mut rx, &token).await {
            End::Stop => return,
            End::Silenced => continue,
        }
    }
}

async fn session(
    cfg: &Vm12Config,
    state: &Shared<Vm12State>,
    rx: &mut tokio::sync::watch::Receiver<Vm12State>,
    token: &CancellationToken,
) -> End {
    let lwt = cfg.topic("lwt");
    let status_topic = cfg.topic("status");
    let event_topic = cfg.topic("event");
    let cmd_topic = cfg.topic("cmd");
    let reply_topic = cfg.topic("cmd/reply");
    let url = tend_mqtt::BrokerUrl::new(cfg.broker_host.clone(), cfg.broker_port, false);
    let credentials = cfg.username.as_ref().map(|user| tend_mqtt::Credentials {
        username: user.clone(),
        password: cfg.password.clone().unwrap_or_default(),
    });
    let settings = tend_mqtt::ClientSettings {
        client_id: cfg.client_id(),
        keep_alive: cfg.keep_alive,
        max_incoming: MAX_PAYLOAD + 1024,
        max_outgoing: MAX_PAYLOAD + 1024,
    };
    let no_tls = tend_mqtt::ClientTls::default();
    let mut opts = match tend_mqtt::options::options_with(&url, credentials, &no_tls, &settings) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, serial = %cfg.serial, "vm12 mqtt options");
            return End::Stop;
        }
    };
    opts.set_last_will(LastWill::new(&lwt, "offline", QoS::AtLeastOnce, true));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    // The event loop is polled in a task of its own: a poll cancelled half-way through
    // the connect handshake would drop the connection (and fire the will).
    let (ev_tx, mut events) = tokio::sync::mpsc::channel(64);
    let poller = tokio::spawn(async move {
        loop {
            let ev = eventloop.poll().await;
            let failed = ev.is_err();
            if ev_tx.send(ev).await.is_err() {
                return;
            }
            if failed {
                tokio::time::sleep(RECONNECT.delay(0, 0)).await;
            }
        }
    });
    let _poller = AbortOnDrop(poller);
    let mut connected = false;
    let mut tick = tokio::time::interval(cfg.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_codes = technical_codes(&state.get());
    let publish_status = |client: &AsyncClient| {
        let doc = state.with(|s| status_json(cfg, s, jiff::Timestamp::now()));
        if let Err(e) = client.try_publish(&status_topic, QoS::AtMostOnce, false, doc) {
            tracing::debug!(error = %e, "vm12 status publish");
        }
    };
    loop {
        tokio::select! {
            _ = token.cancelled() => return End::Stop,
            ev = events.recv() => match ev {
                Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    connected = true;
                    let _ = client.try_publish(&lwt, QoS::AtLeastOnce, true, "online");
                    if cfg.is_v7() {
                        let _ = client.try_subscribe(&cmd_topic, QoS::AtLeastOnce);
                    }
                    last_codes = technical_codes(&state.get());
                    publish_status(&client);
                    tick.reset();
                }
                Some(Ok(Event::Incoming(Packet::Publish(p)))) if cfg.is_v7() && p.topic == cmd_topic => {
                    if let Some(reply) = state.with(|s| command_reply(s, &p.payload)) {
                        let _ = client.try_publish(&reply_topic, QoS::AtLeastOnce, false, reply);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    connected = false;
                    tracing::debug!(error = %e, serial = %cfg.serial, "vm12 mqtt connection");
                }
                None => return End::Stop,
            },
            _ = tick.tick() => if connected { publish_status(&client) },
            r = rx.changed() => {
                if r.is_err() {
                    return End::Stop;
                }
                let now_state = rx.borrow_and_update().clone();
                if now_state.silent {
                    // Drop the connection without DISCONNECT: the broker sends the will.
                    return End::Silenced;
                }
                let codes = technical_codes(&now_state);
                if connected {
                    if cfg.is_v7() {
                        let now = jiff::Timestamp::now();
                        for (code, action, text) in diff_events(&last_codes, &codes) {
                            let doc = event_json(now, &code, action, &text);
                            let _ = client.try_publish(&event_topic, QoS::AtLeastOnce, false, doc);
                        }
                    }
                    publish_status(&client);
                }
                last_codes = codes;
            }
        }
    }
}

/// A running VM-12 simulator. Dropping it stops the simulator (without a DISCONNECT, so
/// the broker publishes the last will).
#[derive(Debug)]
pub struct Vm12Handle {
    cfg: Vm12Config,
    state: Shared<Vm12State>,
    stopper: Stopper,
}

impl Vm12Handle {
    pub fn config(&self) -> &Vm12Config {
        &self.cfg
    }
    pub fn serial(&self) -> &str {
        &self.cfg.serial
    }
    /// `vistara/<serial>/<leaf>`.
    pub fn topic(&self, leaf: &str) -> String {
        self.cfg.topic(leaf)
    }
    pub fn shared(&self) -> &Shared<Vm12State> {
        &self.state
    }
    pub fn state(&self) -> Vm12State {
        self.state.get()
    }
    pub fn update<R>(&self, f: impl FnOnce(&mut Vm12State) -> R) -> R {
        self.state.update(f)
    }
    /// Raises a technical alarm (replacing one with the same code).
    pub fn raise_alarm(&self, code: &str, prio: &str, text: &str) {
        self.update(|s| raise_alarm(s, code, prio, text));
    }
    pub fn clear_alarm(&self, code: &str) {
        self.update(|s| s.tech_alarms.retain(|a| a.code != code));
    }
    /// Puts the module in `slot` into fault with `code` (adding the slot if needed).
    pub fn set_module_fault(&self, slot: u8, code: &str) {
        self.update(|s| set_module(s, slot, Some(code)));
    }
    pub fn clear_module_fault(&self, slot: u8) {
        self.update(|s| set_module(s, slot, None));
    }
    pub fn set_silent(&self, silent: bool) {
        self.update(|s| s.silent = silent);
    }
    /// State `booting` for `d`, then back to what it was.
    pub fn boot(&self, d: Duration) {
        let before = self.update(|s| std::mem::replace(&mut s.state, MonitorState::Booting));
        let before = if before == MonitorState::Booting {
            MonitorState::Monitoring
        } else {
            before
        };
        let shared = self.state.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(d).await;
                shared.update(|s| {
                    if s.state == MonitorState::Booting {
                        s.state = before;
                    }
                });
            });
        }
    }
    pub fn shutdown(&self) {
        self.stopper.stop();
    }
}

/// Adds or replaces a technical alarm.
pub fn raise_alarm(s: &mut Vm12State, code: &str, prio: &str, text: &str) {
    s.tech_alarms.retain(|a| a.code != code);
    s.tech_alarms.push(TechAlarm {
        code: code.to_string(),
        prio: prio.to_string(),
        text: text.to_string(),
    });
}

/// Sets a module's fault (`Some(code)`) or clears it (`None`).
pub fn set_module(s: &mut Vm12State, slot: u8, code: Option<&str>) {
    let idx = match s.modules.iter().position(|m| m.slot == slot) {
        Some(i) => i,
        None => {
            s.modules.push(Module {
                slot,
                kind: "NIBP".to_string(),
                status: "ok".to_string(),
                code: None,
            });
            s.modules.sort_by_key(|m| m.slot);
            match s.modules.iter().position(|m| m.slot == slot) {
                Some(i) => i,
                None => return,
            }
        }
    };
    let m = &mut s.modules[idx];
    match code {
        Some(c) => {
            m.status = "fault".into();
            m.code = Some(c.to_string());
        }
        None => {
            m.status = "ok".into();
            m.code = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn ts() -> jiff::Timestamp {
        "2026-11-28T10:15:00.734Z".parse().unwrap()
    }

    #[test]
    fn status_v2_matches_manual_example() {
        let cfg = Vm12Config::v7("localhost", 1883);
        let mut s = Vm12State::example(cfg.firmware);
        set_module(&mut s, 2, Some("M-214"));
        raise_alarm(&mut s, "T-301", "high", "NIBP pump failure");
        let got: Value = serde_json::from_str(&status_json(&cfg, &s, ts())).unwrap();
        let want: Value = serde_json::from_str(
            r#"{
  "schema": "vistara.status/2",
  "serial": "VM12-00A4471",
  "fw": "7.4.2",
  "ts": "2026-11-28T10:15:00Z",
  "state": "monitoring",
  "power": {"source": "mains", "battery_pct": 96, "battery_health_pct": 88},
  "temps": {"board_c": 41.5},
  "modules": [
    {"slot": 1, "type": "ECG", "status": "ok"},
    {"slot": 2, "type": "SpO2", "status": "fault", "code": "M-214"}
  ],
  "tech_alarms": [{"code": "T-301", "prio": "high", "text": "NIBP pump failure"}],
  "counters": {"power_on_hours": 18234, "nibp_cycles": 50211},
  "patient": {"mrn": "MRN0012931", "name": "ZHANG San", "bed": "ICU-07", "dob": "1961-04-02"},
  "vitals": {"hr": 72, "spo2": 98, "nibp": "118/76"}
}"#,
        )
        .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn status_v1_matches_manual_example() {
        let cfg = Vm12Config::v6("localhost", 1883);
        let mut s = Vm12State::example(cfg.firmware);
        raise_alarm(&mut s, "T-112", "low", "real-time clock battery low");
        let t = jiff::Timestamp::from_second(1_795_860_900).unwrap();
        let got: Value = serde_json::from_str(&status_json(&cfg, &s, t)).unwrap();
        let want: Value = serde_json::from_str(
            r#"{"schema": "vistara.status/1", "sn": "VM12-0081192", "fw": "6.9.0", "t": 1795860900,
 "st": "MON", "pwr": "AC", "batt": 77, "talarms": ["T-112"], "poh": 30551,
 "pt_name": "LI Si", "pt_id": "MRN0033017", "hr": 88}"#,
        )
        .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn state_names() {
        assert_eq!("FAIL".parse::<MonitorState>().unwrap(), MonitorState::Fault);
        assert_eq!("service".parse::<MonitorState>().unwrap().v1_name(), "SVC");
        assert!("broken".parse::<MonitorState>().is_err());
    }

    #[test]
    fn events_from_diff() {
        let cfg = Vm12Config::v7("h", 1);
        let a = Vm12State::example(cfg.firmware);
        let mut b = a.clone();
        raise_alarm(&mut b, "T-301", "high", "NIBP pump failure");
        set_module(&mut b, 2, Some("M-214"));
        let ev = diff_events(&technical_codes(&a), &technical_codes(&b));
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| e.1 == "raised"));
        let ev = diff_events(&technical_codes(&b), &technical_codes(&a));
        assert!(ev.iter().all(|e| e.1 == "cleared"));
        let doc: Value =
            serde_json::from_str(&event_json(ts(), "T-301", "raised", "NIBP pump failure"))
                .unwrap();
        assert_eq!(doc["ts"], "2026-11-28T10:15:00Z");
        assert_eq!(doc["action"], "raised");
    }

    #[test]
    fn commands() {
        let mut s = Vm12State::example(Version::new(7, 4, 2));
        let r: Value =
            serde_json::from_str(&command_reply(&s, br#"{"id":"a1","cmd":"selftest"}"#).unwrap())
                .unwrap();
        assert_eq!(r["id"], "a1");
        assert_eq!(r["ok"], true);
        assert_eq!(r["result"]["overall"], "pass");
        set_module(&mut s, 2, Some("M-214"));
        let r: Value =
            serde_json::from_str(&command_reply(&s, br#"{"id":"a2","cmd":"selftest"}"#).unwrap())
                .unwrap();
        assert_eq!(r["result"]["overall"], "fail");
        assert_eq!(r["result"]["items"]["spo2"], "fail");
        let r: Value = serde_json::from_str(
            &command_reply(&s, br#"{"id":7,"cmd":"errlog","lines":2}"#).unwrap(),
        )
        .unwrap();
        assert_eq!(r["id"], 7);
        assert_eq!(r["result"]["lines"].as_array().unwrap().len(), 2);
        assert!(r["result"]["lines"][1].as_str().unwrap().contains("T-301"));
        let r: Value =
            serde_json::from_str(&command_reply(&s, br#"{"id":"x","cmd":"reboot"}"#).unwrap())
                .unwrap();
        assert_eq!(
            r,
            serde_json::json!({"id":"x","ok":false,"error":"unsupported"})
        );
        assert!(command_reply(&s, b"not json").is_none());
        assert!(command_reply(&s, b"[1,2]").is_none());
        assert!(command_reply(&s, &vec![b' '; MAX_PAYLOAD + 1]).is_none());
        // The manual's results carry no patient data; the opt-in later firmware does.
        assert!(r.get("patient").is_none());
        s.phi_in_replies = true;
        let r: Value =
            serde_json::from_str(&command_reply(&s, br#"{"id":"p","cmd":"selftest"}"#).unwrap())
                .unwrap();
        assert_eq!(r["result"]["patient"]["mrn"], "MRN0012931");
        assert_eq!(r["result"]["vitals"]["hr"], 72);
        assert_eq!(r["result"]["overall"], "fail");
    }
}
