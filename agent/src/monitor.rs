//! One device's watch: what each read (or failed read) of a device means as records. It
//! keeps the profile chosen for the device's firmware, the time-based rule memory, the
//! availability state and the open fault episodes. Pure logic: reads and the time come in,
//! record bodies go out, and the caller makes them durable.

use crate::episodes::{EpisodeTracker, StateTracker};
use crate::transport::DeviceRead;
use jiff::Timestamp;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tend_profiles::{DeviceState, Identity, Profile, ProfileSet, Reading, RuleState, Signal};
use tend_wire::{EpisodeEvent, RecordBody, WireReading};

/// How many episode changes a monitor remembers for the `episodes` diagnostic.
const RECENT_EPISODES: usize = 50;

/// The watch over one device.
#[derive(Debug)]
pub struct DeviceMonitor {
    device: String,
    model: String,
    profile: Option<Arc<Profile>>,
    identity: Option<Identity>,
    rules: RuleState,
    state: StateTracker,
    episodes: EpisodeTracker,
    /// Signals of the last successful read: kept active while the device is silent, so
    /// silence neither clears nor reopens a fault. After a restart, the signals of the
    /// restored episodes that were active (see [`EpisodeTracker::active_signals`]).
    last_signals: Vec<Signal>,
    last_readings: Vec<Reading>,
    last_seen: Option<Timestamp>,
    silent_since: Option<Timestamp>,
    failures: u32,
    /// Consecutive failed reads after which the device counts as `unknown`.
    unknown_after: u32,
    recent: VecDeque<EpisodeEvent>,
}

/// What must survive a restart: the availability state and the open episodes, so a
/// restarted agent neither reopens an open fault under a new episode id (a second ticket)
/// nor repeats a state transition, and holds the episodes whose signal was active while
/// the device stays silent (a broken device switched off is not repaired).
#[derive(Debug, Serialize, serde::Deserialize)]
struct Memory {
    device: String,
    state: StateTracker,
    episodes: EpisodeTracker,
}

/// What the `readings` diagnostic answers.
#[derive(Debug, Clone, Serialize)]
pub struct LiveView {
    pub device: String,
    pub model: String,
    pub firmware: Option<String>,
    pub serial: Option<String>,
    pub state: Option<DeviceState>,
    pub last_seen: Option<Timestamp>,
    pub readings: Vec<Reading>,
    pub open_faults: Vec<String>,
}

impl DeviceMonitor {
    pub fn new(agent: &str, device: &str, model: &str, damping: Duration) -> Self {
        DeviceMonitor {
            device: device.into(),
            model: model.into(),
            profile: None,
            identity: None,
            rules: RuleState::default(),
            state: StateTracker::default(),
            episodes: EpisodeTracker::new(agent, device, damping),
            last_signals: Vec::new(),
            last_readings: Vec::new(),
            last_seen: None,
            silent_since: None,
            failures: 0,
            unknown_after: 3,
            recent: VecDeque::new(),
        }
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn profile(&self) -> Option<&Arc<Profile>> {
        self.profile.as_ref()
    }

    /// A successful read at `now`.
    pub fn observe(&mut self, now: Timestamp, read: DeviceRead) -> Vec<RecordBody> {
        let mut out = Vec::new();
        let changed = match (&self.identity, &self.profile) {
            (Some(id), Some(p)) => id != &read.identity || p.source != read.profile.source,
            _ => true,
        };
        if changed {
            // A new firmware may mean a new profile: time-based rule memory of the old one
            // does not carry over.
            if self
                .profile
                .as_ref()
                .is_some_and(|p| p.source != read.profile.source)
            {
                self.rules = RuleState::default();
            }
            out.push(RecordBody::Identity {
                model: self.model.clone(),
                firmware: read.identity.firmware.clone(),
                serial: read.identity.serial.clone(),
                profile: format!("{} {}", read.profile.id(), read.profile.doc.device.firmware),
            });
            self.identity = Some(read.identity.clone());
            self.profile = Some(read.profile.clone());
        }
        self.failures = 0;
        self.silent_since = None;
        self.last_seen = Some(now);
        let ev = read.profile.evaluate(&read.snapshot, now, &mut self.rules);
        if !ev.readings.is_empty() {
            out.push(RecordBody::Readings {
                readings: ev
                    .readings
                    .iter()
                    .map(|r| WireReading {
                        name: r.name.clone(),
                        value: r.value.clone(),
                        unit: r.unit.clone(),
                    })
                    .collect(),
            });
        }
        self.last_readings = ev.readings;
        self.last_signals = ev.signals;
        self.transition(now, ev.state, &mut out);
        out
    }

    /// A read at `now` that got no answer (or no usable one).
    pub fn observe_failure(&mut self, now: Timestamp, set: &ProfileSet) -> Vec<RecordBody> {
        let mut out = Vec::new();
        self.failures = self.failures.saturating_add(1);
        let since = *self.silent_since.get_or_insert(now);
        if self.failures < self.unknown_after {
            return out;
        }
        // Silence never makes a device `down`: a pump in a drawer is switched off, and an
        // always-on monitor that stops answering is unmonitored, not broken. But a device
        // already `down` stays `down` until it is heard again: switched off, it is still
        // broken (also when it was `down` when the agent stopped, and the time the agent
        // was not running became `unknown`).
        let state = self.state.silent();
        let mut signals = self.last_signals.clone();
        let profile = self.profile.clone().or_else(|| {
            set.family(&self.model)
                .ok()
                .and_then(|f| f.first().cloned())
        });
        if let Some(s) = profile.and_then(|p| p.silence_signal(since, now)) {
            // A restored `monitoring_lost` is held already, with the silence it first saw.
            if !signals.iter().any(|held| held.code == s.code) {
                signals.push(s);
            }
        }
        self.transition_with(now, state, &signals, &mut out);
        out
    }

    fn transition(&mut self, now: Timestamp, state: DeviceState, out: &mut Vec<RecordBody>) {
        let signals = std::mem::take(&mut self.last_signals);
        self.transition_with(now, state, &signals, out);
        self.last_signals = signals;
    }

    fn transition_with(
        &mut self,
        now: Timestamp,
        state: DeviceState,
        signals: &[Signal],
        out: &mut Vec<RecordBody>,
    ) {
        if let Some((from, to)) = self.state.update(state) {
            out.push(RecordBody::State { from, to });
        }
        let available = state != DeviceState::Down;
        let firmware = self.identity.as_ref().map(|i| i.firmware.clone());
        let model = self.model.clone();
        for e in
            self.episodes
                .update_with(now, signals, available, Some(&model), firmware.as_deref())
        {
            if self.recent.len() == RECENT_EPISODES {
                self.recent.pop_front();
            }
            self.recent.push_back(e.clone());
            out.push(RecordBody::Episode(e));
        }
    }

    /// The memory to store with the records a read produced.
    pub fn memory(&self) -> Vec<u8> {
        serde_json::to_vec(&Memory {
            device: self.device.clone(),
            state: self.state.clone(),
            episodes: self.episodes.clone(),
        })
        .unwrap_or_default()
    }

    /// Restores what [`DeviceMonitor::memory`] stored, as an agent that starts again;
    /// `None` (and nothing changed) when it is unreadable or belongs to another device.
    /// The restored episodes whose signal was active stand for the last read's signals
    /// until the device is heard again, so they are held while it stays silent and clear
    /// only after it answers without them for the damping time.
    ///
    /// The restored state is the one the device had when the agent stopped, and while the
    /// agent was not running the device's state was `unknown`: a restored `up`, `down` or
    /// `maintenance` becomes `unknown` now, and the records returned (that transition, or
    /// nothing when the state already was `unknown`) are to be stamped at the last moment
    /// the agent is known to have been watching before it stopped, and stored with the
    /// new memory. So the first read after the restart is a transition from `unknown`, as
    /// for a fresh start, and a device that was `down` and is still silent becomes `down`
    /// again once its silence counts (see [`StateTracker::silent`]).
    pub fn restore(&mut self, bytes: &[u8]) -> Option<Vec<RecordBody>> {
        match serde_json::from_slice::<Memory>(bytes) {
            Ok(m) if m.device == self.device => {
                let damping = self.episodes.damping();
                self.state = m.state;
                self.episodes = m.episodes;
                self.episodes.set_damping(damping);
                self.last_signals = self.episodes.active_signals();
                let gap = self.state.restarted();
                Some(
                    gap.map(|(from, to)| RecordBody::State { from, to })
                        .into_iter()
                        .collect(),
                )
            }
            _ => None,
        }
    }

    /// The device's availability state, when it has one.
    pub fn state(&self) -> Option<DeviceState> {
        self.state.current()
    }

    pub fn live(&self) -> LiveView {
        LiveView {
            device: self.device.clone(),
            model: self.model.clone(),
            firmware: self.identity.as_ref().map(|i| i.firmware.clone()),
            serial: self.identity.as_ref().and_then(|i| i.serial.clone()),
            state: self.state.current(),
            last_seen: self.last_seen,
            readings: self.last_readings.clone(),
            open_faults: self.episodes.open_codes().map(str::to_string).collect(),
        }
    }

    /// The most recent episode changes, oldest first.
    pub fn recent_episodes(&self) -> Vec<EpisodeEvent> {
        self.recent.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_profiles::modbus::{RegisterImage, Table};
    use tend_wire::EpisodeChange;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_795_000_000 + s).unwrap()
    }

    fn hm2_read(set: &ProfileSet, compressor: u16, alarms: u16) -> DeviceRead {
        let p = set.select("cryosense/hm-2", "2.5").unwrap();
        let mut img = RegisterImage::new();
        img.insert(
            Table::Holding,
            0,
            &[
                0x428F, 0, 0x3F99, 0x999A, 0x4086, 0x6666, compressor, alarms, 75, 0, 100, 100, 205,
            ],
        );
        DeviceRead {
            identity: p.identify_registers(&img).unwrap(),
            snapshot: p.decode_registers(&img),
            profile: p,
        }
    }

    fn kinds(bodies: &[RecordBody]) -> Vec<String> {
        bodies
            .iter()
            .map(|b| match b {
                RecordBody::Identity { firmware, .. } => format!("identity {firmware}"),
                RecordBody::Readings { .. } => "readings".into(),
                RecordBody::State { from, to } => format!("state {from}->{to}"),
                RecordBody::Episode(e) => format!("{:?} {}", e.change, e.code),
                RecordBody::Dropped { .. } => "dropped".into(),
            })
            .collect()
    }

    #[test]
    fn fault_opens_marks_down_and_clears() {
        let set = ProfileSet::builtin().unwrap();
        let mut m = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        let out = m.observe(t(0), hm2_read(&set, 1, 0));
        assert_eq!(
            kinds(&out),
            ["identity 2.5", "readings", "state unknown->up"]
        );
        let out = m.observe(t(1), hm2_read(&set, 2, 0x0008));
        assert_eq!(
            kinds(&out),
            [
                "readings",
                "state up->down",
                "Opened ALM.3",
                "Opened COMPRESSOR_STATE_FAULT"
            ]
        );
        let RecordBody::Episode(e) = &out[2] else {
            unreachable!()
        };
        assert!(!e.device_available);
        let out = m.observe(t(2), hm2_read(&set, 1, 0));
        assert_eq!(kinds(&out), ["readings", "state down->up"]);
        assert_eq!(m.live().open_faults, ["ALM.3", "COMPRESSOR_STATE_FAULT"]);
        let out = m.observe(t(12), hm2_read(&set, 1, 0));
        assert_eq!(
            kinds(&out),
            [
                "readings",
                "Cleared ALM.3",
                "Cleared COMPRESSOR_STATE_FAULT"
            ]
        );
        assert_eq!(m.recent_episodes().len(), 4);
    }

    #[test]
    fn silence_is_unknown_then_monitoring_lost_for_always_on() {
        let set = ProfileSet::builtin().unwrap();
        let mut m = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        m.observe(t(0), hm2_read(&set, 1, 0));
        // Two failures: nothing yet. The third: unknown.
        assert!(m.observe_failure(t(1), &set).is_empty());
        assert!(m.observe_failure(t(2), &set).is_empty());
        let out = m.observe_failure(t(3), &set);
        assert_eq!(kinds(&out), ["state up->unknown"]);
        let mut all = Vec::new();
        for s in 4..=400 {
            all.extend(m.observe_failure(t(s), &set));
        }
        // More than 5 minutes after the first silent poll at t=1.
        assert_eq!(kinds(&all), ["Opened MONITORING_LOST"]);
        let RecordBody::Episode(e) = &all[0] else {
            unreachable!()
        };
        assert_eq!(e.opened_at, t(302));
        assert_eq!(e.kind, tend_profiles::SignalKind::MonitoringLost);
        assert!(e.device_available);
        // Back: up or down per the data, monitoring_lost clears after damping.
        let out = m.observe(t(401), hm2_read(&set, 1, 0));
        assert_eq!(kinds(&out), ["readings", "state unknown->up"]);
        let out = m.observe(t(420), hm2_read(&set, 1, 0));
        assert!(out.iter().any(|b| matches!(b, RecordBody::Episode(e) if e.change == EpisodeChange::Cleared && e.code == "MONITORING_LOST")));
    }

    #[test]
    fn restored_memory_keeps_episodes_open() {
        let set = ProfileSet::builtin().unwrap();
        let mut m = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        let out = m.observe(t(0), hm2_read(&set, 2, 0x0008));
        assert!(kinds(&out).contains(&"Opened ALM.3".to_string()));
        let saved = m.memory();
        // A restarted agent with the saved memory: the same faults are no news.
        let mut back = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        let gap = back.restore(&saved).unwrap();
        assert_eq!(kinds(&gap), ["state down->unknown"]);
        let out = back.observe(t(5), hm2_read(&set, 2, 0x0008));
        assert_eq!(
            kinds(&out),
            ["identity 2.5", "readings", "state unknown->down"]
        );
        // Memory of another device, or garbage, is refused.
        let mut other = DeviceMonitor::new("a1", "pump", "lumen/lip-300", Duration::from_secs(10));
        assert!(other.restore(&saved).is_none());
        assert!(other.restore(b"{").is_none());
        assert_eq!(other.state(), None);
    }

    #[test]
    fn a_restored_up_device_is_unknown_until_heard_again() {
        let set = ProfileSet::builtin().unwrap();
        let mut m = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        m.observe(t(0), hm2_read(&set, 1, 0));
        let saved = m.memory();
        // The agent stopped at about t=0 and starts again: the time it was not running is
        // unknown, whatever the device did meanwhile.
        let mut back = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        let gap = back.restore(&saved).unwrap();
        assert_eq!(
            gap,
            [RecordBody::State {
                from: DeviceState::Up,
                to: DeviceState::Unknown
            }]
        );
        assert_eq!(back.state(), Some(DeviceState::Unknown));
        // The first read after the restart: a transition from unknown, as for a fresh
        // start; then nothing new.
        let out = back.observe(t(8), hm2_read(&set, 1, 0));
        assert_eq!(
            kinds(&out),
            ["identity 2.5", "readings", "state unknown->up"]
        );
        assert_eq!(
            kinds(&back.observe(t(9), hm2_read(&set, 1, 0))),
            ["readings"]
        );
        // The new memory (stored with the gap's record) restores without another gap
        // only while it is unknown.
        let mut again = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        let mut unknown =
            DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        unknown.restore(&saved).unwrap();
        assert_eq!(again.restore(&unknown.memory()), Some(Vec::new()));
        // Silent after the restart instead: it stays unknown, with nothing more to say
        // (an always-on device's monitoring_lost comes after its own 5 minutes).
        let mut silent = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        silent.restore(&saved).unwrap();
        let mut all = Vec::new();
        for s in 1..=100 {
            all.extend(silent.observe_failure(t(s), &set));
        }
        assert_eq!(kinds(&all), Vec::<String>::new());
        assert_eq!(silent.state(), Some(DeviceState::Unknown));
    }

    #[test]
    fn a_restored_down_device_still_silent_is_down_again_once_the_silence_counts() {
        let set = ProfileSet::builtin().unwrap();
        let mut m = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        m.observe(t(0), hm2_read(&set, 2, 0x0008));
        assert_eq!(m.state(), Some(DeviceState::Down));
        let mut back = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        let gap = back.restore(&m.memory()).unwrap();
        assert_eq!(kinds(&gap), ["state down->unknown"]);
        // The first two failed reads after the restart: still unknown, as any device's.
        assert!(back.observe_failure(t(10), &set).is_empty());
        assert!(back.observe_failure(t(11), &set).is_empty());
        // Another stop and start here: nothing more to say, and the down still holds.
        let mut again = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        assert_eq!(again.restore(&back.memory()), Some(Vec::new()));
        for mon in [&mut back, &mut again] {
            let mut all = Vec::new();
            for s in 12..=100 {
                all.extend(mon.observe_failure(t(s), &set));
            }
            assert_eq!(kinds(&all), ["state unknown->down"]);
            assert_eq!(mon.state(), Some(DeviceState::Down));
            assert_eq!(mon.live().open_faults, ["ALM.3", "COMPRESSOR_STATE_FAULT"]);
        }
    }

    #[test]
    fn a_restored_unknown_device_makes_no_record() {
        let set = ProfileSet::builtin().unwrap();
        // Never heard: no state at all.
        let m = DeviceMonitor::new("a1", "pump", "lumen/lip-300", Duration::from_secs(10));
        let mut back = DeviceMonitor::new("a1", "pump", "lumen/lip-300", Duration::from_secs(10));
        assert_eq!(back.restore(&m.memory()), Some(Vec::new()));
        assert_eq!(back.state(), None);
        // Heard, then silent: unknown.
        let mut m = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        m.observe(t(0), hm2_read(&set, 1, 0));
        for s in 1..=3 {
            m.observe_failure(t(s), &set);
        }
        assert_eq!(m.state(), Some(DeviceState::Unknown));
        let mut back = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        assert_eq!(back.restore(&m.memory()), Some(Vec::new()));
        assert_eq!(back.state(), Some(DeviceState::Unknown));
        let out = back.observe(t(10), hm2_read(&set, 1, 0));
        assert_eq!(
            kinds(&out),
            ["identity 2.5", "readings", "state unknown->up"]
        );
    }

    #[test]
    fn a_down_device_stays_down_with_its_faults_while_silent() {
        let set = ProfileSet::builtin().unwrap();
        let mut m = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        m.observe(t(0), hm2_read(&set, 2, 0x0008));
        let mut all = Vec::new();
        for s in 1..=400 {
            all.extend(m.observe_failure(t(s), &set));
        }
        // No state change and no fault cleared; after 5 minutes monitoring_lost, on a
        // device that is still unavailable.
        assert_eq!(kinds(&all), ["Opened MONITORING_LOST"]);
        let RecordBody::Episode(e) = &all[0] else {
            unreachable!()
        };
        assert!(!e.device_available);
        assert_eq!(m.live().state, Some(DeviceState::Down));
        assert_eq!(
            m.live().open_faults,
            ["ALM.3", "COMPRESSOR_STATE_FAULT", "MONITORING_LOST"]
        );
        // Heard again: up or down per the data.
        let out = m.observe(t(401), hm2_read(&set, 1, 0));
        assert_eq!(kinds(&out), ["readings", "state down->up"]);
    }

    /// Episode ids of the episode records among `bodies`, by code.
    fn episode_ids(bodies: &[RecordBody]) -> Vec<(String, String)> {
        bodies
            .iter()
            .filter_map(|b| match b {
                RecordBody::Episode(e) => Some((e.code.clone(), e.episode.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn restored_episodes_are_held_while_the_device_stays_silent() {
        let set = ProfileSet::builtin().unwrap();
        let damping = Duration::from_secs(10);
        let mut m = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", damping);
        let opened = episode_ids(&m.observe(t(0), hm2_read(&set, 2, 0x0008)));
        assert_eq!(opened.len(), 2);
        let mut back = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", damping);
        let gap = back.restore(&m.memory()).unwrap();
        assert_eq!(kinds(&gap), ["state down->unknown"]);
        // Never heard after the restart: 25 damping times of failed reads (short of the
        // 5 minutes after which the HM-2's silence is monitoring_lost). Down again once
        // the silence counts, with no episode change.
        let mut all = Vec::new();
        for s in 1..=250 {
            all.extend(back.observe_failure(t(s), &set));
        }
        assert_eq!(kinds(&all), ["state unknown->down"]);
        assert_eq!(back.live().state, Some(DeviceState::Down));
        assert_eq!(back.live().open_faults, ["ALM.3", "COMPRESSOR_STATE_FAULT"]);
        // Heard again without the faults: they clear once they stayed away for the
        // damping time, as the episodes opened before the restart.
        let out = back.observe(t(251), hm2_read(&set, 1, 0));
        assert_eq!(kinds(&out), ["identity 2.5", "readings", "state down->up"]);
        let out = back.observe(t(260), hm2_read(&set, 1, 0));
        assert_eq!(kinds(&out), ["readings"]);
        let out = back.observe(t(261), hm2_read(&set, 1, 0));
        assert_eq!(
            kinds(&out),
            [
                "readings",
                "Cleared ALM.3",
                "Cleared COMPRESSOR_STATE_FAULT"
            ]
        );
        assert_eq!(episode_ids(&out), opened);
    }

    #[test]
    fn a_restored_monitoring_lost_is_held_not_reopened() {
        let set = ProfileSet::builtin().unwrap();
        let damping = Duration::from_secs(10);
        let mut m = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", damping);
        m.observe(t(0), hm2_read(&set, 1, 0));
        let mut all = Vec::new();
        for s in 1..=400 {
            all.extend(m.observe_failure(t(s), &set));
        }
        assert_eq!(kinds(&all), ["state up->unknown", "Opened MONITORING_LOST"]);
        let lost = episode_ids(&all);
        // Restarted while the monitor is still silent: for longer than its own 5 minutes
        // of silence, the same monitoring_lost stays open and nothing else happens.
        let mut back = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", damping);
        assert_eq!(back.restore(&m.memory()), Some(Vec::new()));
        let mut all = Vec::new();
        for s in 401..=1000 {
            all.extend(back.observe_failure(t(s), &set));
        }
        assert_eq!(kinds(&all), Vec::<String>::new());
        assert_eq!(back.live().state, Some(DeviceState::Unknown));
        assert_eq!(back.live().open_faults, ["MONITORING_LOST"]);
        back.observe(t(1001), hm2_read(&set, 1, 0));
        let out = back.observe(t(1011), hm2_read(&set, 1, 0));
        assert_eq!(kinds(&out), ["readings", "Cleared MONITORING_LOST"]);
        assert_eq!(episode_ids(&out), lost);
    }

    #[test]
    fn memory_stored_before_episode_openings_still_holds() {
        let set = ProfileSet::builtin().unwrap();
        let mut m = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        m.observe(t(0), hm2_read(&set, 2, 0x0008));
        // The memory an older agent wrote: no opening in its episodes.
        let mut old: serde_json::Value = serde_json::from_slice(&m.memory()).unwrap();
        for o in old["episodes"]["open"]
            .as_object_mut()
            .unwrap()
            .values_mut()
        {
            o.as_object_mut().unwrap().remove("opening").unwrap();
        }
        let mut back = DeviceMonitor::new("a1", "mri", "cryosense/hm-2", Duration::from_secs(10));
        let gap = back.restore(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(kinds(&gap), ["state down->unknown"]);
        let mut all = Vec::new();
        for s in 1..=100 {
            all.extend(back.observe_failure(t(s), &set));
        }
        assert_eq!(kinds(&all), ["state unknown->down"]);
        assert_eq!(back.live().open_faults, ["ALM.3", "COMPRESSOR_STATE_FAULT"]);
    }

    #[test]
    fn a_silent_pump_is_unknown_never_monitoring_lost() {
        let set = ProfileSet::builtin().unwrap();
        let mut m = DeviceMonitor::new("a1", "pump", "lumen/lip-300", Duration::from_secs(10));
        let mut all = Vec::new();
        for s in 0..2000 {
            all.extend(m.observe_failure(t(s), &set));
        }
        assert_eq!(
            kinds(&all),
            Vec::<String>::new(),
            "never seen: already unknown"
        );
        assert_eq!(m.live().state, Some(DeviceState::Unknown));
    }
}
