//! Ingest: applies an agent's batch to the store in one transaction and says which
//! sequence numbers are now stored, so the gateway acks exactly those.
//!
//! A record already stored (the agent replays after a reconnect, or resends when an ack
//! was lost) is acknowledged again but applied once. Records are applied by the agent's
//! time, not arrival: the live picture keeps the newest, the ledger and the life record
//! slot old ones in where they belong.

use crate::fleet::Fleet;
use crate::store::{
    next, ns, state_code, DeviceLive, Forwarding, Job, LifeEvent, LiveIdentity, LiveReading, Store,
    StoreError, TicketEventRecord, TicketRecord, DEVICES, DEVICE_TICKETS, HISTORY, META, OUTBOX,
    SEEN, TICKETS, TRANSITIONS,
};
use crate::ticket::{decide, Action, DeviceFacts, DeviceIdentity, TicketContext};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use redb::ReadableTable;
use std::collections::BTreeMap;
use tend_profiles::ProfileSet;
use tend_wire::{ranges_of, EpisodeChange, Record, RecordBody, SeqRange, UpBatch};

/// What ingest needs besides the store.
#[derive(Debug, Clone)]
pub struct IngestContext {
    /// Named in tickets' `source.gateway`.
    pub gateway: String,
    pub fleet: Fleet,
    pub profiles: ProfileSet,
    pub tz: TimeZone,
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Every seq of the batch now stored (new and seen before): the ack.
    pub stored: Vec<SeqRange>,
    /// Records applied for the first time.
    pub new_records: u64,
    /// Records seen before.
    pub duplicates: u64,
    /// Records about a device the fleet file does not list (stored, no tickets).
    pub unknown_device: u64,
    pub tickets_opened: Vec<String>,
    pub events_queued: u64,
    pub episodes_opened: u64,
    /// Readings the agent's outbox reported dropped (it was full).
    pub dropped_readings: u64,
}

impl Applied {
    /// Whether the forwarder has new work.
    pub fn has_jobs(&self) -> bool {
        !self.tickets_opened.is_empty() || self.events_queued > 0
    }
}

impl Store {
    /// Applies `batch` in one durable transaction. `now` is the gateway's clock, used only
    /// to stamp when a ticket was decided.
    pub fn apply(
        &self,
        batch: &UpBatch,
        cx: &IngestContext,
        now: Timestamp,
    ) -> Result<Applied, StoreError> {
        let mut all = self.apply_many(std::slice::from_ref(batch), cx, now)?;
        Ok(all.pop().unwrap_or_default())
    }

    /// Applies several batches, in order, in one durable transaction (group commit: one
    /// fsync for all of them): all are stored or none is. A record that comes twice, in
    /// the same group or after, is applied once.
    pub fn apply_many(
        &self,
        batches: &[UpBatch],
        cx: &IngestContext,
        now: Timestamp,
    ) -> Result<Vec<Applied>, StoreError> {
        let mut out = Vec::with_capacity(batches.len());
        let txn = self.db().begin_write().map_err(self.error("begin write"))?;
        {
            let mut seen = txn.open_table(SEEN).map_err(self.error("open seen"))?;
            let mut devices = txn
                .open_table(DEVICES)
                .map_err(self.error("open devices"))?;
            let mut transitions = txn
                .open_table(TRANSITIONS)
                .map_err(self.error("open transitions"))?;
            let mut history = txn
                .open_table(HISTORY)
                .map_err(self.error("open history"))?;
            let mut tickets = txn
                .open_table(TICKETS)
                .map_err(self.error("open tickets"))?;
            let mut device_tickets = txn
                .open_table(DEVICE_TICKETS)
                .map_err(self.error("open device tickets"))?;
            let mut outbox = txn.open_table(OUTBOX).map_err(self.error("open outbox"))?;
            let mut meta = txn.open_table(META).map_err(self.error("open meta"))?;

            let life = |history: &mut redb::Table<'_, (&'static str, i128, u64), &'static [u8]>,
                        meta: &mut redb::Table<'_, &'static str, u64>,
                        device: &str,
                        at: Timestamp,
                        e: &LifeEvent|
             -> Result<(), StoreError> {
                let n = next(meta, "next_history").map_err(self.error("write meta"))?;
                let bytes = serde_json::to_vec(e).unwrap_or_default();
                history
                    .insert((device, ns(at), n), bytes.as_slice())
                    .map_err(self.error("write history"))?;
                Ok(())
            };
            for batch in batches {
                let mut applied = Applied::default();
                let mut live: BTreeMap<String, DeviceLive> = BTreeMap::new();
                let agent = batch.agent.as_str();

                for r in &batch.records {
                    if seen
                        .get((agent, r.seq))
                        .map_err(self.error("read seen"))?
                        .is_some()
                    {
                        applied.duplicates += 1;
                        continue;
                    }
                    seen.insert((agent, r.seq), ())
                        .map_err(self.error("write seen"))?;
                    applied.new_records += 1;

                    // The outbox's drop reports belong to the agent, not a device (device
                    // ""): counted, never a phantom device.
                    // (Kept in the life record under "", the agent's own entry.)
                    if r.device.is_empty() {
                        if let RecordBody::Dropped { count, .. } = &r.body {
                            applied.dropped_readings += count;
                            let e = LifeEvent::ReadingsDropped {
                                at: r.at,
                                count: *count,
                            };
                            life(&mut history, &mut meta, "", r.at, &e)?;
                        }
                        continue;
                    }
                    if !live.contains_key(&r.device) {
                        let d = devices
                            .get(r.device.as_str())
                            .map_err(self.error("read device"))?
                            .and_then(|v| serde_json::from_slice::<DeviceLive>(v.value()).ok())
                            .unwrap_or_else(|| DeviceLive::new(&r.device, agent, &batch.site));
                        live.insert(r.device.clone(), d);
                    }
                    let Some(d) = live.get_mut(&r.device) else {
                        continue;
                    };
                    d.agent = agent.to_string();
                    d.site_reported = batch.site.clone();
                    if d.last_seen.is_none_or(|s| r.at > s) {
                        d.last_seen = Some(r.at);
                    }
                    match &r.body {
                        RecordBody::Identity {
                            model,
                            firmware,
                            serial,
                            profile,
                        } => {
                            let newer = d.identity.as_ref().is_none_or(|i| r.at >= i.at);
                            if newer {
                                d.identity = Some(LiveIdentity {
                                    model: model.clone(),
                                    firmware: firmware.clone(),
                                    serial: serial.clone(),
                                    profile: profile.clone(),
                                    at: r.at,
                                });
                            }
                            let e = LifeEvent::Identified {
                                at: r.at,
                                firmware: firmware.clone(),
                                serial: serial.clone(),
                                profile: profile.clone(),
                            };
                            life(&mut history, &mut meta, &r.device, r.at, &e)?;
                        }
                        RecordBody::Readings { readings } => {
                            for w in readings {
                                let newer = d.readings.get(&w.name).is_none_or(|x| r.at >= x.time);
                                if newer {
                                    d.readings.insert(
                                        w.name.clone(),
                                        LiveReading {
                                            name: w.name.clone(),
                                            value: serde_json::to_value(&w.value)
                                                .unwrap_or(serde_json::Value::Null),
                                            unit: w.unit.clone(),
                                            time: r.at,
                                        },
                                    );
                                }
                            }
                        }
                        RecordBody::State { from, to } => {
                            transitions
                                .insert((r.device.as_str(), ns(r.at), r.seq), state_code(*to))
                                .map_err(self.error("write transition"))?;
                            if d.state_since.is_none_or(|s| r.at >= s) {
                                d.state = *to;
                                d.state_since = Some(r.at);
                            }
                            let e = LifeEvent::State {
                                at: r.at,
                                from: *from,
                                to: *to,
                            };
                            life(&mut history, &mut meta, &r.device, r.at, &e)?;
                        }
                        RecordBody::Dropped { count, .. } => {
                            d.dropped_readings += count;
                            let e = LifeEvent::ReadingsDropped {
                                at: r.at,
                                count: *count,
                            };
                            life(&mut history, &mut meta, &r.device, r.at, &e)?;
                        }
                        RecordBody::Episode(ev) => {
                            match ev.change {
                                EpisodeChange::Opened => applied.episodes_opened += 1,
                                EpisodeChange::ClassChanged | EpisodeChange::Cleared => {}
                            }
                            apply_episode_to_live(d, r);
                            let e = LifeEvent::Episode {
                                at: r.at,
                                event: ev.clone(),
                            };
                            life(&mut history, &mut meta, &r.device, r.at, &e)?;

                            let Some(entry) = cx.fleet.device(&r.device) else {
                                applied.unknown_device += 1;
                                continue;
                            };
                            // What the agent said the device was when the episode opened wins
                            // over what this gateway has heard since: the ticket body must be
                            // the same on every gateway.
                            let opened_as = ev.opening.as_ref().and_then(|o| {
                                Some(DeviceIdentity {
                                    model: o.model.clone()?,
                                    firmware: o.firmware.clone()?,
                                    serial: None,
                                    profile: String::new(),
                                })
                            });
                            let identity = opened_as.or_else(|| {
                                d.identity.as_ref().map(|i| DeviceIdentity {
                                    model: i.model.clone(),
                                    firmware: i.firmware.clone(),
                                    serial: i.serial.clone(),
                                    profile: i.profile.clone(),
                                })
                            });
                            let facts =
                                DeviceFacts::resolve(&entry, identity.as_ref(), &cx.profiles);
                            let tcx = TicketContext {
                                gateway: &cx.gateway,
                                agent,
                                entry,
                                facts: &facts,
                                tz: &cx.tz,
                            };
                            // The device's tickets, from this very transaction.
                            let mut known: BTreeMap<String, TicketRecord> = BTreeMap::new();
                            let keys: Vec<String> = device_tickets
                                .range((r.device.as_str(), "")..)
                                .map_err(self.error("read device tickets"))?
                                .map_while(|row| {
                                    let (k, _) = row.ok()?;
                                    let (dev, key) = k.value();
                                    (dev == r.device).then(|| key.to_string())
                                })
                                .collect();
                            for k in keys {
                                if let Some(v) =
                                    tickets.get(k.as_str()).map_err(self.error("read ticket"))?
                                {
                                    if let Ok(t) = serde_json::from_slice::<TicketRecord>(v.value())
                                    {
                                        known.insert(k.clone(), t);
                                    }
                                }
                            }
                            let known_list: Vec<_> =
                                known.values().map(TicketRecord::known).collect();
                            let mut touched: Vec<String> = Vec::new();
                            for action in decide(&tcx, ev, r.at, &known_list) {
                                match action {
                                    Action::Create(req) => {
                                        let body = serde_json::to_value(&req.body)
                                            .unwrap_or(serde_json::Value::Null);
                                        let t = TicketRecord {
                                            key: req.idempotency_key.clone(),
                                            device: r.device.clone(),
                                            agent: agent.to_string(),
                                            kind: req.body.kind,
                                            code: req.body.fault.code.clone(),
                                            class: req.body.fault.class,
                                            episodes: vec![req.episode.clone()],
                                            open: true,
                                            detected_at: ev.opened_at,
                                            created_at: now,
                                            body,
                                            ticket_id: None,
                                            backend_status: None,
                                            forward: Forwarding::pending(),
                                            events: Vec::new(),
                                        };
                                        let job_id = next(&mut meta, "next_job")
                                            .map_err(self.error("write meta"))?;
                                        queue(&mut outbox, self, job_id, &t.key, None)?;
                                        device_tickets
                                            .insert((r.device.as_str(), t.key.as_str()), ())
                                            .map_err(self.error("write device tickets"))?;
                                        let e = LifeEvent::TicketOpened {
                                            at: r.at,
                                            ticket_key: t.key.clone(),
                                            kind: t.kind,
                                            code: t.code.clone(),
                                            class: t.class,
                                        };
                                        life(&mut history, &mut meta, &r.device, r.at, &e)?;
                                        applied.tickets_opened.push(t.key.clone());
                                        touched.push(t.key.clone());
                                        known.insert(t.key.clone(), t);
                                    }
                                    Action::Event(req) => {
                                        let Some(t) = known.get_mut(&req.ticket_key) else {
                                            continue;
                                        };
                                        if t.events
                                            .iter()
                                            .any(|e| e.idempotency_key == req.idempotency_key)
                                        {
                                            continue;
                                        }
                                        let kind = req.body.kind.as_str().to_string();
                                        t.events.push(TicketEventRecord {
                                            idempotency_key: req.idempotency_key.clone(),
                                            kind: kind.clone(),
                                            body: serde_json::to_value(&req.body)
                                                .unwrap_or(serde_json::Value::Null),
                                            forward: Forwarding::pending(),
                                        });
                                        let job_id = next(&mut meta, "next_job")
                                            .map_err(self.error("write meta"))?;
                                        queue(
                                            &mut outbox,
                                            self,
                                            job_id,
                                            &req.ticket_key,
                                            Some(req.idempotency_key.clone()),
                                        )?;
                                        let e = LifeEvent::TicketEvent {
                                            at: r.at,
                                            ticket_key: req.ticket_key.clone(),
                                            event: kind,
                                        };
                                        life(&mut history, &mut meta, &r.device, r.at, &e)?;
                                        applied.events_queued += 1;
                                        touched.push(req.ticket_key.clone());
                                    }
                                    Action::Attach {
                                        ticket_key,
                                        episode,
                                    } => {
                                        if let Some(t) = known.get_mut(&ticket_key) {
                                            if !t.episodes.contains(&episode) {
                                                t.episodes.push(episode);
                                            }
                                            touched.push(ticket_key);
                                        }
                                    }
                                    Action::SetClass { ticket_key, class } => {
                                        if let Some(t) = known.get_mut(&ticket_key) {
                                            t.class = class;
                                            touched.push(ticket_key);
                                        }
                                    }
                                }
                            }
                            touched.sort();
                            touched.dedup();
                            for k in touched {
                                if let Some(t) = known.get(&k) {
                                    let bytes = serde_json::to_vec(t).unwrap_or_default();
                                    tickets
                                        .insert(k.as_str(), bytes.as_slice())
                                        .map_err(self.error("write ticket"))?;
                                }
                            }
                        }
                    }
                }
                for (id, d) in &live {
                    let bytes = serde_json::to_vec(d).unwrap_or_default();
                    devices
                        .insert(id.as_str(), bytes.as_slice())
                        .map_err(self.error("write device"))?;
                }
                applied.stored = ranges_of(batch.records.iter().map(|r| r.seq));
                out.push(applied);
            }
        }
        txn.commit().map_err(self.error("commit"))?;
        Ok(out)
    }
}

fn queue(
    outbox: &mut redb::Table<'_, u64, &'static [u8]>,
    store: &Store,
    id: u64,
    ticket_key: &str,
    event: Option<String>,
) -> Result<(), StoreError> {
    let job = Job {
        id,
        ticket_key: ticket_key.to_string(),
        event,
    };
    let bytes = serde_json::to_vec(&job).unwrap_or_default();
    outbox
        .insert(id, bytes.as_slice())
        .map_err(store.error("write job"))?;
    Ok(())
}

/// Keeps the open episodes of the live picture: the newest change of each (a replayed old
/// change never reopens what a newer one cleared; a cleared episode is remembered only in
/// the life record).
fn apply_episode_to_live(d: &mut DeviceLive, r: &Record) {
    let RecordBody::Episode(ev) = &r.body else {
        return;
    };
    match ev.change {
        EpisodeChange::Opened | EpisodeChange::ClassChanged => {
            d.open_episodes.insert(ev.episode.clone(), ev.clone());
        }
        EpisodeChange::Cleared => {
            d.open_episodes.remove(&ev.episode);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Fleet;
    use tend_wire::Record;

    const FLEET: &str = r#"
[[customer]]
id = "c-1"
name = "Hospital"
contact_name = "Wang Lei"
contact_phone = "+86 23 6000 1234"

[[site]]
id = "s-1"
customer = "c-1"
name = "Main"
address = "12 Jianxin Rd"
service_area = "same_city"

[[device]]
id = "vent"
site = "s-1"
serial = "AV5C-21-004417"
location = "ICU bed 7"
accepted = "2025-03-01"
"#;

    fn batch(agent: &str, seqs: std::ops::RangeInclusive<u64>) -> UpBatch {
        let at: Timestamp = "2026-11-02T00:00:00Z".parse().unwrap();
        UpBatch {
            v: tend_wire::VERSION,
            agent: agent.into(),
            site: "s-1".into(),
            records: seqs
                .map(|seq| Record {
                    seq,
                    at,
                    device: "vent".into(),
                    body: RecordBody::Readings {
                        readings: Vec::new(),
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn a_group_of_batches_is_applied_in_order_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cx = IngestContext {
            gateway: "gw-1".into(),
            fleet: Fleet::parse("fleet.toml", FLEET).unwrap(),
            profiles: tend_profiles::ProfileSet::builtin().unwrap(),
            tz: TimeZone::get("Asia/Shanghai").unwrap(),
        };
        let now = Timestamp::now();
        // Two agents, and a resend overlapping the first batch, in one group.
        let group = [batch("a1", 1..=3), batch("a2", 1..=2), batch("a1", 2..=4)];
        let out = store.apply_many(&group, &cx, now).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!((out[0].new_records, out[0].duplicates), (3, 0));
        assert_eq!((out[1].new_records, out[1].duplicates), (2, 0));
        assert_eq!((out[2].new_records, out[2].duplicates), (1, 2));
        assert_eq!(out[2].stored, vec![SeqRange { first: 2, last: 4 }]);
        assert_eq!(store.records_stored().unwrap(), 6);
        // Later, alone: everything seen, acked again, applied once.
        let again = store.apply(&group[0], &cx, now).unwrap();
        assert_eq!((again.new_records, again.duplicates), (0, 3));
        assert_eq!(again.stored, vec![SeqRange { first: 1, last: 3 }]);
        assert!(store.apply_many(&[], &cx, now).unwrap().is_empty());
    }
}
