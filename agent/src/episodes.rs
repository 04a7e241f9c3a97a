//! Fault episodes and availability transitions: the agent's memory of what is wrong with
//! a device, turned into the records the gateway makes tickets from. Pure logic: the
//! caller passes each evaluation and the time.
//!
//! An episode opens when a signal appears, may change class, and clears only after the
//! signal has stayed away for the damping time, so a flapping fault is one episode (and
//! one ticket), with its flaps counted.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use tend_profiles::{DeviceState, Signal};
use tend_wire::{EpisodeChange, EpisodeEvent, Opening};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Open {
    id: String,
    opened_at: Timestamp,
    last: SignalCopy,
    /// When the signal was last missing, while it is missing.
    absent_since: Option<Timestamp>,
    flaps: u32,
    /// The episode as it opened (absent in memory stored by an older agent).
    #[serde(default)]
    opening: Option<Box<Opening>>,
}

/// The parts of a signal an episode keeps (serialisable, so the tracker can be persisted
/// and an agent restart does not reopen what is already open).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SignalCopy {
    code: String,
    kind: tend_profiles::SignalKind,
    class: Option<tend_profiles::FaultClass>,
    description: String,
    action: Option<String>,
    evidence: BTreeMap<String, serde_json::Value>,
    due: Option<String>,
}

impl From<&SignalCopy> for Signal {
    fn from(c: &SignalCopy) -> Self {
        Signal {
            code: c.code.clone(),
            kind: c.kind,
            class: c.class,
            description: c.description.clone(),
            action: c.action.clone(),
            evidence: c.evidence.clone(),
            due: c.due.clone(),
        }
    }
}

impl From<&Signal> for SignalCopy {
    fn from(s: &Signal) -> Self {
        SignalCopy {
            code: s.code.clone(),
            kind: s.kind,
            class: s.class,
            description: s.description.clone(),
            action: s.action.clone(),
            evidence: s.evidence.clone(),
            due: s.due.clone(),
        }
    }
}

/// Open episodes of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeTracker {
    agent: String,
    device: String,
    damping: Duration,
    open: BTreeMap<String, Open>,
}

impl EpisodeTracker {
    pub fn new(agent: &str, device: &str, damping: Duration) -> Self {
        EpisodeTracker {
            agent: agent.into(),
            device: device.into(),
            damping,
            open: BTreeMap::new(),
        }
    }

    pub fn damping(&self) -> Duration {
        self.damping
    }

    /// The damping time from the config, which wins over a restored one.
    pub fn set_damping(&mut self, damping: Duration) {
        self.damping = damping;
    }

    /// Codes of the open episodes.
    pub fn open_codes(&self) -> impl Iterator<Item = &str> {
        self.open.keys().map(String::as_str)
    }

    /// The signals of the open episodes that were active at the last evaluation (not
    /// waiting out their damping), in code order: what a restored monitor holds while its
    /// device stays silent, as the monitor that stored the memory would have. It needs no
    /// field beyond what older agents already stored, and an episode counts as active
    /// unless it was already waiting, so the default is to hold.
    pub fn active_signals(&self) -> Vec<Signal> {
        self.open
            .values()
            .filter(|o| o.absent_since.is_none())
            .map(|o| Signal::from(&o.last))
            .collect()
    }

    /// Feeds the signals active at `now` (all of them, every poll) and whether the device
    /// is available; returns the episode changes, in code order.
    pub fn update(
        &mut self,
        now: Timestamp,
        active: &[Signal],
        available: bool,
    ) -> Vec<EpisodeEvent> {
        self.update_with(now, active, available, None, None)
    }

    /// [`EpisodeTracker::update`], naming the device's profile family and firmware for
    /// the opening of new episodes.
    pub fn update_with(
        &mut self,
        now: Timestamp,
        active: &[Signal],
        available: bool,
        model: Option<&str>,
        firmware: Option<&str>,
    ) -> Vec<EpisodeEvent> {
        let mut out = Vec::new();
        for s in active {
            match self.open.get_mut(&s.code) {
                None => {
                    let id = format!(
                        "{}/{}/{}/{}",
                        self.agent,
                        self.device,
                        s.code,
                        now.as_millisecond()
                    );
                    let o = Open {
                        id,
                        opened_at: now,
                        last: s.into(),
                        absent_since: None,
                        flaps: 0,
                        opening: Some(Box::new(Opening {
                            class: s.class,
                            description: s.description.clone(),
                            action: s.action.clone(),
                            evidence: s.evidence.clone(),
                            device_available: available,
                            due: s.due.clone(),
                            model: model.map(str::to_string),
                            firmware: firmware.map(str::to_string),
                        })),
                    };
                    out.push(event(&o, EpisodeChange::Opened, available));
                    self.open.insert(s.code.clone(), o);
                }
                Some(o) => {
                    if o.absent_since.take().is_some() {
                        o.flaps += 1;
                    }
                    let class_changed = o.last.class != s.class;
                    o.last = s.into();
                    if class_changed {
                        out.push(event(o, EpisodeChange::ClassChanged, available));
                    }
                }
            }
        }
        let damping = self.damping;
        let mut cleared = Vec::new();
        for (code, o) in self.open.iter_mut() {
            if active.iter().any(|s| &s.code == code) {
                continue;
            }
            let since = *o.absent_since.get_or_insert(now);
            if now.duration_since(since).as_secs_f64() >= damping.as_secs_f64() {
                cleared.push(code.clone());
            }
        }
        for code in cleared {
            if let Some(mut o) = self.open.remove(&code) {
                o.last
                    .evidence
                    .insert("flaps".into(), serde_json::json!(o.flaps));
                out.push(event(&o, EpisodeChange::Cleared, available));
            }
        }
        out
    }
}

fn event(o: &Open, change: EpisodeChange, available: bool) -> EpisodeEvent {
    EpisodeEvent {
        episode: o.id.clone(),
        change,
        code: o.last.code.clone(),
        kind: o.last.kind,
        class: o.last.class,
        description: o.last.description.clone(),
        action: o.last.action.clone(),
        evidence: o.last.evidence.clone(),
        device_available: available,
        opened_at: o.opened_at,
        due: o.last.due.clone(),
        opening: o.opening.clone(),
    }
}

/// The device's availability state, emitting a transition when it changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateTracker {
    current: Option<DeviceState>,
    /// The device was `down` when the agent stopped: the time the agent was not running
    /// is `unknown`, but silence after the restart continues the `down` (a device already
    /// `down` stays `down` while silent, and the stop does not repair it). Cleared by the
    /// next state the device is given. Absent in memory stored by an older agent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    down_before_stop: bool,
}

impl StateTracker {
    pub fn current(&self) -> Option<DeviceState> {
        self.current
    }

    /// `Some((from, to))` when the state changed. The first state seen is a transition
    /// from `unknown`.
    pub fn update(&mut self, to: DeviceState) -> Option<(DeviceState, DeviceState)> {
        let from = self.current.unwrap_or(DeviceState::Unknown);
        self.current = Some(to);
        self.down_before_stop = false;
        (from != to).then_some((from, to))
    }

    /// The agent starts again with this (restored) tracker: while it was not running the
    /// device's state was `unknown`, so a restored state other than `unknown` makes the
    /// transition to `unknown` (`Some((from, Unknown))`; `None` when it already was).
    pub fn restarted(&mut self) -> Option<(DeviceState, DeviceState)> {
        let from = self.current?;
        if from == DeviceState::Unknown {
            return None;
        }
        self.down_before_stop |= from == DeviceState::Down;
        self.current = Some(DeviceState::Unknown);
        Some((from, DeviceState::Unknown))
    }

    /// The state a device that stopped answering is in: `down` when it was `down` when
    /// last heard (also before a restart of the agent), else `unknown`. Silence never
    /// makes a device `down`, but it does not repair one either.
    pub fn silent(&self) -> DeviceState {
        if self.down_before_stop || self.current == Some(DeviceState::Down) {
            DeviceState::Down
        } else {
            DeviceState::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_profiles::{FaultClass, SignalKind};

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_795_000_000 + s).unwrap()
    }

    fn sig(code: &str, class: FaultClass) -> Signal {
        Signal {
            code: code.into(),
            kind: SignalKind::Fault,
            class: Some(class),
            description: "d".into(),
            action: None,
            evidence: BTreeMap::new(),
            due: None,
        }
    }

    fn changes(ev: &[EpisodeEvent]) -> Vec<(&str, EpisodeChange)> {
        ev.iter().map(|e| (e.code.as_str(), e.change)).collect()
    }

    #[test]
    fn open_class_change_clear() {
        let mut tr = EpisodeTracker::new("a1", "vent", Duration::from_secs(30));
        let ev = tr.update(t(0), &[sig("ALM1.4", FaultClass::Complex)], true);
        assert_eq!(changes(&ev), [("ALM1.4", EpisodeChange::Opened)]);
        let id = ev[0].episode.clone();
        assert!(tr
            .update(t(1), &[sig("ALM1.4", FaultClass::Complex)], true)
            .is_empty());
        let ev = tr.update(t(2), &[sig("ALM1.4", FaultClass::Major)], false);
        assert_eq!(changes(&ev), [("ALM1.4", EpisodeChange::ClassChanged)]);
        assert_eq!(ev[0].episode, id);
        assert!(!ev[0].device_available);
        // Gone, but not for 30 s yet.
        assert!(tr.update(t(10), &[], true).is_empty());
        assert!(tr.update(t(39), &[], true).is_empty());
        let ev = tr.update(t(40), &[], true);
        assert_eq!(changes(&ev), [("ALM1.4", EpisodeChange::Cleared)]);
        assert_eq!(ev[0].episode, id);
        assert_eq!(ev[0].evidence["flaps"], serde_json::json!(0));
        // Back after the clear: a new episode.
        let ev = tr.update(t(100), &[sig("ALM1.4", FaultClass::Major)], false);
        assert_eq!(changes(&ev), [("ALM1.4", EpisodeChange::Opened)]);
        assert_ne!(ev[0].episode, id);
    }

    #[test]
    fn flapping_is_one_episode() {
        let mut tr = EpisodeTracker::new("a1", "pump", Duration::from_secs(60));
        let s = [sig("TALM.5", FaultClass::Simple)];
        let mut all = Vec::new();
        for i in 0..100 {
            // On for 10 s, off for 10 s.
            let on = (i / 10) % 2 == 0;
            all.extend(tr.update(t(i), if on { &s[..] } else { &[] }, true));
        }
        assert_eq!(changes(&all), [("TALM.5", EpisodeChange::Opened)]);
        for i in 100..200 {
            all.extend(tr.update(t(i), &[], true));
        }
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].change, EpisodeChange::Cleared);
        assert_eq!(all[1].evidence["flaps"], serde_json::json!(4));
    }

    #[test]
    fn survives_a_restart_when_persisted() {
        let mut tr = EpisodeTracker::new("a1", "mri", Duration::from_secs(0));
        tr.update(t(0), &[sig("ALM.3", FaultClass::Major)], false);
        let saved = serde_json::to_vec(&tr).unwrap();
        let mut back: EpisodeTracker = serde_json::from_slice(&saved).unwrap();
        assert!(back
            .update(t(5), &[sig("ALM.3", FaultClass::Major)], false)
            .is_empty());
        assert_eq!(back.open_codes().collect::<Vec<_>>(), ["ALM.3"]);
    }

    #[test]
    fn held_signals_keep_restored_episodes_open() {
        let mut tr = EpisodeTracker::new("a1", "vent", Duration::from_secs(30));
        tr.update(
            t(0),
            &[
                sig("ALM1.4", FaultClass::Complex),
                sig("ERR.1021", FaultClass::Major),
            ],
            false,
        );
        // ALM1.4 went away just before the restart: its damping is running.
        tr.update(t(5), &[sig("ERR.1021", FaultClass::Major)], false);
        let saved = serde_json::to_vec(&tr).unwrap();
        let mut back: EpisodeTracker = serde_json::from_slice(&saved).unwrap();
        let held = back.active_signals();
        assert_eq!(held, [sig("ERR.1021", FaultClass::Major)]);
        // Held for far longer than the damping time: only the waiting one clears, on time.
        let mut all = Vec::new();
        for s in 6..=600 {
            all.extend(back.update(t(s), &held, false));
        }
        assert_eq!(changes(&all), [("ALM1.4", EpisodeChange::Cleared)]);
        assert_eq!(all[0].episode, "a1/vent/ALM1.4/1795000000000");
        assert_eq!(back.open_codes().collect::<Vec<_>>(), ["ERR.1021"]);
        // Heard without it: cleared after the damping time.
        assert!(back.update(t(601), &[], true).is_empty());
        assert!(back.update(t(630), &[], true).is_empty());
        let ev = back.update(t(631), &[], true);
        assert_eq!(changes(&ev), [("ERR.1021", EpisodeChange::Cleared)]);
    }

    #[test]
    fn every_change_repeats_the_opening() {
        let mut tr = EpisodeTracker::new("a1", "vent", Duration::from_secs(0));
        let open = tr.update_with(
            t(0),
            &[sig("ALM1.4", FaultClass::Complex)],
            false,
            Some("aeris/av-500"),
            Some("5.2.1"),
        );
        let raised = tr.update_with(
            t(5),
            &[sig("ALM1.4", FaultClass::Major)],
            false,
            Some("aeris/av-500"),
            Some("5.3.0"),
        );
        let cleared = tr.update_with(t(9), &[], true, Some("aeris/av-500"), Some("5.3.0"));
        let o = *open[0].opening.clone().unwrap();
        assert_eq!(o.class, Some(FaultClass::Complex));
        assert!(!o.device_available);
        assert_eq!(o.firmware.as_deref(), Some("5.2.1"));
        assert_eq!(raised[0].class, Some(FaultClass::Major));
        assert_eq!(raised[0].opening.as_deref(), Some(&o));
        assert_eq!(cleared[0].change, EpisodeChange::Cleared);
        assert_eq!(cleared[0].opening.as_deref(), Some(&o));
        // Memory written before the opening existed still loads.
        let mut v = serde_json::to_value(&tr).unwrap();
        v["open"] = serde_json::json!({"X": {"id": "i", "opened_at": "2026-01-01T00:00:00Z",
            "last": {"code": "X", "kind": "fault", "class": null, "description": "d",
                     "action": null, "evidence": {}, "due": null},
            "absent_since": null, "flaps": 0}});
        let back: EpisodeTracker = serde_json::from_value(v).unwrap();
        assert_eq!(back.open_codes().collect::<Vec<_>>(), ["X"]);
    }

    #[test]
    fn states() {
        let mut st = StateTracker::default();
        assert_eq!(
            st.update(DeviceState::Up),
            Some((DeviceState::Unknown, DeviceState::Up))
        );
        assert_eq!(st.update(DeviceState::Up), None);
        assert_eq!(
            st.update(DeviceState::Down),
            Some((DeviceState::Up, DeviceState::Down))
        );
        assert_eq!(st.current(), Some(DeviceState::Down));
    }

    /// A tracker as a restarted agent restores it from `saved`.
    fn restored(saved: &StateTracker) -> StateTracker {
        serde_json::from_slice(&serde_json::to_vec(saved).unwrap()).unwrap()
    }

    #[test]
    fn a_restart_makes_the_restored_state_unknown() {
        use DeviceState::*;
        let mut st = StateTracker::default();
        st.update(Up);
        let mut back = restored(&st);
        assert_eq!(back.restarted(), Some((Up, Unknown)));
        assert_eq!(back.current(), Some(Unknown));
        // Silent after the restart: unknown, as before it.
        assert_eq!(back.silent(), Unknown);
        // Heard: a transition from unknown, as for a fresh start.
        assert_eq!(back.update(Up), Some((Unknown, Up)));
        // Maintenance likewise.
        let mut st = StateTracker::default();
        st.update(Maintenance);
        assert_eq!(restored(&st).restarted(), Some((Maintenance, Unknown)));
    }

    #[test]
    fn a_restart_keeps_a_down_device_down_while_silent() {
        use DeviceState::*;
        let mut st = StateTracker::default();
        st.update(Down);
        let mut back = restored(&st);
        assert_eq!(back.restarted(), Some((Down, Unknown)));
        assert_eq!(back.current(), Some(Unknown));
        assert_eq!(back.silent(), Down);
        // Stopped again before the silence counted: still unknown, nothing new, and the
        // silence after the second restart still continues the down.
        let mut again = restored(&back);
        assert_eq!(again.restarted(), None);
        assert_eq!(again.silent(), Down);
        assert_eq!(again.update(Down), Some((Unknown, Down)));
        assert_eq!(again.silent(), Down);
        // Heard up: silence is unknown again.
        let mut heard = restored(&back);
        assert_eq!(heard.update(Up), Some((Unknown, Up)));
        assert_eq!(heard.silent(), Unknown);
    }

    #[test]
    fn a_restart_with_nothing_known_or_unknown_makes_nothing() {
        let mut fresh = StateTracker::default();
        assert_eq!(fresh.restarted(), None);
        assert_eq!(fresh.current(), None);
        let mut st = StateTracker::default();
        st.update(DeviceState::Unknown);
        let mut back = restored(&st);
        assert_eq!(back.restarted(), None);
        assert_eq!(back, st);
        assert_eq!(back.silent(), DeviceState::Unknown);
        // Memory without the flag (an older agent's, or one that never restarted) reads,
        // and the flag is written only when set, so such memory stays as it was.
        let old: StateTracker = serde_json::from_str(r#"{"current":"down"}"#).unwrap();
        assert_eq!(old.silent(), DeviceState::Down);
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"current":"down"}"#
        );
    }
}
