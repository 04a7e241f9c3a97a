//! Ingest: what a group of agents' batches changes in the store, decided by pure code, and
//! which sequence numbers are then stored, so the gateway acks exactly those.
//!
//! A record is known by (agent, outbox incarnation, seq), and its content by a SHA-256
//! digest of its decoded fields ([`crate::digest`]). A record already stored (the agent replays after a
//! reconnect, or resends when an ack was lost) is acknowledged again but applied once. An
//! agent whose outbox was lost starts a new incarnation at seq 1, and nothing it sends is
//! taken for a duplicate. The same key with other content is a *conflict*: not applied,
//! counted on the agent (and kept, by digest, so a resend of it is not counted again),
//! and acknowledged all the same — see [`Planner::batch`] for why. Records are applied by
//! the agent's time, not arrival: the live picture keeps the newest, the ledger and the
//! life record slot old ones in where they belong.
//!
//! A store applies a group in one transaction in three steps: it loads what the group
//! touches ([`Needs::of`] says what, [`Stored`] holds it), [`plan`] turns the batches
//! against that into [`Changes`] and one [`Applied`] per batch, and the store writes the
//! changes and commits. [`plan`] reads no disk and no clock, so every store shares it and
//! it is tested on its own.

use crate::clock::AgentClock;
use crate::fleet::Fleet;
use crate::store::{
    to_json, AgentRecord, Conflict, DeadlineRecord, DeviceLive, Forwarding, LifeEvent,
    LiveIdentity, LiveReading, StoreError, TicketEventRecord, TicketRecord,
};
use crate::ticket::{
    decide, Action, DeviceFacts, DeviceIdentity, EventRequest, TicketContext, TicketRequest,
};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use std::collections::{BTreeMap, BTreeSet};
use tend_profiles::{DeviceState, ProfileSet};
use tend_wire::{ranges_of, EpisodeChange, EpisodeEvent, Record, RecordBody, SeqRange, UpBatch};

/// What ingest needs besides the store.
#[derive(Debug, Clone)]
pub struct IngestContext {
    /// Named in tickets' `source.gateway`.
    pub gateway: String,
    pub fleet: Fleet,
    pub profiles: ProfileSet,
    pub tz: TimeZone,
    /// An agent whose clock is off by more than this is skewed: its records' times are
    /// taken in gateway time ([`crate::clock`]).
    pub clock_tolerance: jiff::SignedDuration,
}

/// Which record: (agent, outbox incarnation, seq).
pub type RecordKey<'a> = (&'a str, &'a str, u64);
/// Devices not in the fleet file kept in the store (shown on the hotline as such, for
/// someone to add or fix): a bound, so an agent naming thousands of made-up devices
/// cannot fill the store.
pub const MAX_STRAYS: u64 = 32;
/// Reading names kept per device: a profile has a few dozen; more is a fault or abuse.
pub const MAX_READINGS: usize = 256;
/// Open fault episodes kept per device.
pub const MAX_OPEN_EPISODES: usize = 64;

/// Which outbox: (agent, incarnation).
pub type OutboxKey<'a> = (&'a str, &'a str);

pub use crate::digest::Digest;

/// The digest of a record's content ([`crate::digest::digest`]).
pub fn digest(r: &Record) -> Result<Digest, StoreError> {
    crate::digest::digest(r).map_err(|source| StoreError::Encode {
        what: "record digest",
        source,
    })
}

/// The digest stores kept before [`digest`]'s form ([`crate::digest::legacy`]): what a
/// record stored by an older build is compared with when the new digest differs.
fn legacy_digest(r: &Record) -> Result<Digest, StoreError> {
    crate::digest::legacy(r).map_err(|source| StoreError::Encode {
        what: "record digest",
        source,
    })
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Every seq of the batch acknowledged (new, seen before, and conflicting): the ack,
    /// for the batch's incarnation.
    pub stored: Vec<SeqRange>,
    /// Records applied for the first time.
    pub new_records: u64,
    /// Records seen before (or a conflicting version seen before).
    pub duplicates: u64,
    /// Seqs whose (agent, incarnation, seq) was stored with other content: not applied.
    pub conflicts: Vec<u64>,
    /// Records about a device the fleet file does not list (kept without tickets while
    /// fewer than [`MAX_STRAYS`] such devices are kept).
    pub unknown_device: u64,
    /// Of those, records of a device not kept (the stray list was full): dropped.
    pub strays_dropped: u64,
    pub tickets_opened: Vec<String>,
    pub events_queued: u64,
    pub episodes_opened: u64,
    /// Readings the agent's outbox reported dropped (it was full).
    pub dropped_readings: u64,
    /// The agent's clock as this batch showed it.
    pub clock: Option<crate::clock::AgentClock>,
}

impl Applied {
    /// Whether the forwarder has new work.
    pub fn has_jobs(&self) -> bool {
        !self.tickets_opened.is_empty() || self.events_queued > 0
    }
}

/// What a store must load, inside its transaction, before it can [`plan`] a group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs<'a> {
    /// Every record of the group: which are stored already, with which digest, and which
    /// conflicting versions of them were seen?
    pub records: BTreeSet<RecordKey<'a>>,
    /// Every agent of the group: its record.
    pub agents: BTreeSet<&'a str>,
    /// Every outbox of the group: its watermark.
    pub outboxes: BTreeSet<OutboxKey<'a>>,
    /// Every device the group's records are about (not the agent's own entry, ""): their
    /// live pictures.
    pub devices: BTreeSet<&'a str>,
    /// The devices with an episode change in the group: all their tickets.
    pub tickets_of: BTreeSet<&'a str>,
}

impl<'a> Needs<'a> {
    pub fn of(batches: &'a [UpBatch]) -> Self {
        let mut needs = Needs::default();
        for batch in batches {
            needs.agents.insert(batch.agent.as_str());
            needs
                .outboxes
                .insert((batch.agent.as_str(), batch.incarnation.as_str()));
            for r in &batch.records {
                needs
                    .records
                    .insert((batch.agent.as_str(), batch.incarnation.as_str(), r.seq));
                if r.device.is_empty() {
                    continue;
                }
                needs.devices.insert(r.device.as_str());
                if matches!(r.body, RecordBody::Episode(_)) {
                    needs.tickets_of.insert(r.device.as_str());
                }
            }
        }
        needs
    }
}

/// What the store holds of what [`Needs`] asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stored<'a> {
    /// The records asked for that are stored already, with their content's digest.
    pub seen: BTreeMap<RecordKey<'a>, Digest>,
    /// The watermarks of the outboxes asked for: every seq at or below was handled and
    /// forgotten (an outbox without one has forgotten nothing).
    pub watermarks: BTreeMap<OutboxKey<'a>, u64>,
    /// How many devices not in the fleet file are kept.
    pub strays: u64,
    /// Conflicting versions already counted of the records asked for.
    pub conflicts: BTreeSet<(RecordKey<'a>, Digest)>,
    /// The records of the agents asked for (an agent never heard of is absent).
    pub agents: BTreeMap<String, AgentRecord>,
    /// The live pictures of the devices asked for (a device never heard of is absent).
    pub devices: BTreeMap<String, DeviceLive>,
    /// The tickets of the devices asked for: device → ticket key → ticket.
    pub tickets: BTreeMap<String, BTreeMap<String, TicketRecord>>,
}

/// A state transition for the device's availability ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub device: String,
    /// Agent time.
    pub at: Timestamp,
    /// The record's seq: orders two transitions stamped with the same instant.
    pub seq: u64,
    pub to: DeviceState,
}

/// A line for a device's life record (device "" is the agent's own entry).
#[derive(Debug, Clone, PartialEq)]
pub struct LifeEntry {
    pub device: String,
    pub at: Timestamp,
    pub event: LifeEvent,
}

/// A job for the forwarder's outbox; the store numbers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub ticket_key: String,
    /// The event's Idempotency-Key, or `None` to create the ticket.
    pub event: Option<String>,
}

/// What a group of batches changes in the store. Lists are in the order things happened:
/// a store numbers life entries and jobs in that order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes<'a> {
    /// Every record stored for the first time, with its digest.
    pub seen: Vec<(RecordKey<'a>, Digest)>,
    /// Every conflicting version counted for the first time.
    pub conflicts: Vec<(RecordKey<'a>, Digest)>,
    /// Outboxes whose watermark rose, with the new one: the store forgets the seqs at or
    /// below it (and their conflicts).
    pub watermarks: BTreeMap<OutboxKey<'a>, u64>,
    /// Devices not in the fleet file kept for the first time.
    pub new_strays: u64,
    /// Every agent whose record changed, as it now is.
    pub agents: BTreeMap<String, AgentRecord>,
    /// Every device a new record was about, as it now is.
    pub devices: BTreeMap<String, DeviceLive>,
    pub transitions: Vec<Transition>,
    pub life: Vec<LifeEntry>,
    /// Every ticket created or changed, as it now is, by key.
    pub tickets: BTreeMap<String, TicketRecord>,
    /// (device, ticket key) of every ticket created: the device's list of tickets.
    pub new_tickets: Vec<(String, String)>,
    pub jobs: Vec<NewJob>,
}

/// A group of batches against what is stored: what to write, and one [`Applied`] per
/// batch, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan<'a> {
    pub applied: Vec<Applied>,
    pub changes: Changes<'a>,
}

/// Decides what `batches`, applied in order, change against `stored`. `now` (the gateway's
/// clock) only stamps when a ticket was decided, and when an agent's new incarnation or
/// a conflict was first seen. Later batches see what earlier ones did,
/// so a record that comes twice in the group is applied once, and a ticket opened by one
/// batch is the one the next batch's recurrence attaches to.
///
/// Fails only when a ticket body cannot be encoded as JSON (nothing is to be written then).
pub fn plan<'a>(
    batches: &'a [UpBatch],
    stored: Stored<'a>,
    cx: &IngestContext,
    now: Timestamp,
) -> Result<Plan<'a>, StoreError> {
    let mut p = Planner {
        cx,
        now,
        seen: stored.seen,
        watermarks: stored.watermarks,
        strays: stored.strays,
        conflicts: stored.conflicts,
        agents: stored.agents,
        devices: stored.devices,
        tickets: stored.tickets,
        touched_devices: BTreeSet::new(),
        touched_tickets: BTreeSet::new(),
        changes: Changes::default(),
    };
    let mut applied = Vec::with_capacity(batches.len());
    for batch in batches {
        applied.push(p.batch(batch)?);
    }
    Ok(Plan {
        applied,
        changes: p.finish(),
    })
}

/// The group's working view of the store (what is stored plus what the batches so far
/// changed) and the changes collected.
struct Planner<'a, 'c> {
    cx: &'c IngestContext,
    now: Timestamp,
    seen: BTreeMap<RecordKey<'a>, Digest>,
    watermarks: BTreeMap<OutboxKey<'a>, u64>,
    strays: u64,
    conflicts: BTreeSet<(RecordKey<'a>, Digest)>,
    agents: BTreeMap<String, AgentRecord>,
    devices: BTreeMap<String, DeviceLive>,
    /// device → ticket key → ticket.
    tickets: BTreeMap<String, BTreeMap<String, TicketRecord>>,
    touched_devices: BTreeSet<String>,
    /// (device, ticket key).
    touched_tickets: BTreeSet<(String, String)>,
    changes: Changes<'a>,
}

impl<'a> Planner<'a, '_> {
    /// A conflicting record is acknowledged like the others. The gateway cannot tell
    /// which of the two versions is the genuine one (a forgery that took the seq first,
    /// or an agent that reused it, say from an outbox file restored from a backup), and
    /// withholding the ack would not tell it either: the agent would resend the record
    /// for ever and its outbox would never shrink. So the first version stays applied,
    /// the other is counted on the agent and shown on the hotline with its incarnation
    /// and seq, for a person to look at, and its digest is kept so that a resend of it is
    /// not counted again. Once batches are signed a forgery is never stored, and a
    /// conflict then means an agent reused its own seqs.
    fn batch(&mut self, batch: &'a UpBatch) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();
        let agent = batch.agent.as_str();
        let incarnation = batch.incarnation.as_str();
        self.heard(agent, incarnation);
        let clock = AgentClock::judge(batch.sent_at, self.now, self.cx.clock_tolerance);
        self.clock(agent, clock);
        applied.clock = Some(clock);
        let below = self
            .watermarks
            .get(&(agent, incarnation))
            .copied()
            .unwrap_or(0);
        for r in &batch.records {
            if r.seq <= below {
                // Handled long ago and forgotten: the agent has deleted it, so this is a
                // replay (or a late copy), never news.
                applied.duplicates += 1;
                continue;
            }
            let key = (agent, incarnation, r.seq);
            let d = digest(r)?;
            match self.seen.get(&key) {
                Some(known) if *known == d => applied.duplicates += 1,
                Some(known) => {
                    // Stored by a build that digested the JSON: the other form is only
                    // worked out for a key seen before with another digest, which is rare.
                    let old = legacy_digest(r)?;
                    if *known == old || self.conflicts.contains(&(key, old)) {
                        applied.duplicates += 1;
                    } else if self.conflicts.insert((key, d)) {
                        self.changes.conflicts.push((key, d));
                        self.conflict(agent, incarnation, r.seq);
                        applied.conflicts.push(r.seq);
                    } else {
                        applied.duplicates += 1;
                    }
                }
                None => {
                    self.seen.insert(key, d);
                    self.changes.seen.push((key, d));
                    applied.new_records += 1;
                    // The digest is of the record as sent; what it changes is in
                    // gateway time.
                    self.record(batch, &clock.record(r), &mut applied)?;
                }
            }
        }
        applied.stored = ranges_of(batch.records.iter().map(|r| r.seq));
        // Below the agent's oldest record nothing will come again but replays: forget it.
        if let Some(w) = batch
            .oldest
            .and_then(|o| o.checked_sub(1))
            .filter(|w| *w > below)
        {
            self.watermarks.insert((agent, incarnation), w);
            self.changes.watermarks.insert((agent, incarnation), w);
        }
        Ok(applied)
    }

    /// Notes the incarnation of an agent's batch (written only when it changed).
    fn heard(&mut self, agent: &str, incarnation: &str) {
        let now = self.now;
        let a = self
            .agents
            .entry(agent.to_string())
            .or_insert_with(|| AgentRecord::new(agent));
        if a.incarnation.as_deref() != Some(incarnation) {
            a.incarnation = Some(incarnation.to_string());
            a.incarnation_since = Some(now);
            self.changes.agents.insert(agent.to_string(), a.clone());
        }
    }

    /// Notes how far off an agent's clock is: written when it becomes or stops being
    /// skewed, or moves by more than a few seconds (not on every batch).
    fn clock(&mut self, agent: &str, clock: AgentClock) {
        const NOTEWORTHY_S: i64 = 5;
        let offset = clock.offset.as_secs();
        let a = self
            .agents
            .entry(agent.to_string())
            .or_insert_with(|| AgentRecord::new(agent));
        let moved = a
            .clock_offset_s
            .is_none_or(|o| (o - offset).abs() > NOTEWORTHY_S);
        if moved || a.clock_skewed != clock.skewed {
            a.clock_offset_s = Some(offset);
            a.clock_skewed = clock.skewed;
            self.changes.agents.insert(agent.to_string(), a.clone());
        }
    }

    /// Counts a conflicting record on its agent.
    fn conflict(&mut self, agent: &str, incarnation: &str, seq: u64) {
        let now = self.now;
        let a = self
            .agents
            .entry(agent.to_string())
            .or_insert_with(|| AgentRecord::new(agent));
        a.conflicting_records += 1;
        a.last_conflict = Some(Conflict {
            incarnation: incarnation.to_string(),
            seq,
            at: now,
        });
        self.changes.agents.insert(agent.to_string(), a.clone());
    }

    /// A record seen for the first time.
    fn record(
        &mut self,
        batch: &UpBatch,
        r: &Record,
        applied: &mut Applied,
    ) -> Result<(), StoreError> {
        // The outbox's drop reports belong to the agent, not a device (device ""): counted
        // and kept in the agent's own life record, never a phantom device.
        if r.device.is_empty() {
            if let RecordBody::Dropped { count, .. } = &r.body {
                applied.dropped_readings += count;
                self.life(
                    "",
                    r.at,
                    LifeEvent::ReadingsDropped {
                        at: r.at,
                        count: *count,
                    },
                );
            }
            return Ok(());
        }
        if self.cx.fleet.device(&r.device).is_none() {
            applied.unknown_device += 1;
            if !self.devices.contains_key(&r.device) {
                if self.strays >= MAX_STRAYS {
                    applied.strays_dropped += 1;
                    return Ok(());
                }
                self.strays += 1;
                self.changes.new_strays += 1;
            }
        }
        let d = self
            .devices
            .entry(r.device.clone())
            .or_insert_with(|| DeviceLive::new(&r.device, &batch.agent, &batch.site));
        self.touched_devices.insert(r.device.clone());
        let line = update_live(d, &batch.agent, &batch.site, r)?;
        let identity = d.identity.clone();
        if let RecordBody::State { to, .. } = &r.body {
            self.changes.transitions.push(Transition {
                device: r.device.clone(),
                at: r.at,
                seq: r.seq,
                to: *to,
            });
        }
        if let Some(line) = line {
            self.life(&r.device, r.at, line);
        }
        if let RecordBody::Episode(ev) = &r.body {
            if matches!(ev.change, EpisodeChange::Opened) {
                applied.episodes_opened += 1;
            }
            self.episode(&batch.agent, r, ev, identity.as_ref(), applied)?;
        }
        Ok(())
    }

    fn life(&mut self, device: &str, at: Timestamp, event: LifeEvent) {
        self.changes.life.push(LifeEntry {
            device: device.to_string(),
            at,
            event,
        });
    }

    /// An episode change of a device: the tickets it opens, the events it adds.
    fn episode(
        &mut self,
        agent: &str,
        r: &Record,
        ev: &EpisodeEvent,
        identity: Option<&LiveIdentity>,
        applied: &mut Applied,
    ) -> Result<(), StoreError> {
        let cx = self.cx;
        let Some(entry) = cx.fleet.device(&r.device) else {
            // Counted in `record`: kept, but no ticket for a device nobody services.
            return Ok(());
        };
        // What the agent said the device was when the episode opened wins over what this
        // gateway has heard since: the ticket body must be the same on every gateway.
        let opened_as = ev.opening.as_ref().and_then(|o| {
            Some(DeviceIdentity {
                model: o.model.clone()?,
                firmware: o.firmware.clone()?,
                serial: None,
                profile: String::new(),
            })
        });
        let identity = opened_as.or_else(|| {
            identity.map(|i| DeviceIdentity {
                model: i.model.clone(),
                firmware: i.firmware.clone(),
                serial: i.serial.clone(),
                profile: i.profile.clone(),
            })
        });
        let facts = DeviceFacts::resolve(&entry, identity.as_ref(), &cx.profiles);
        let tcx = TicketContext {
            gateway: &cx.gateway,
            agent,
            entry,
            facts: &facts,
            tz: &cx.tz,
        };
        let known: Vec<_> = self
            .tickets
            .get(&r.device)
            .map(|k| k.values().map(TicketRecord::known).collect())
            .unwrap_or_default();
        for action in decide(&tcx, ev, r.at, &known) {
            match action {
                Action::Create(req) => self.create(agent, r, ev, req, applied)?,
                Action::Event(req) => self.event(r, req, applied)?,
                Action::Attach {
                    ticket_key,
                    episode,
                } => self.change_ticket(&r.device, ticket_key, |t| {
                    if !t.episodes.contains(&episode) {
                        t.episodes.push(episode);
                    }
                }),
                Action::SetClass {
                    ticket_key,
                    class,
                    deadlines,
                } => self.change_ticket(&r.device, ticket_key, |t| {
                    t.class = class;
                    if let Some(d) = deadlines {
                        let old = t.current_deadlines();
                        t.deadlines = Some(DeadlineRecord::after_rise(old.as_ref(), &d, r.at));
                    }
                }),
            }
        }
        Ok(())
    }

    fn create(
        &mut self,
        agent: &str,
        r: &Record,
        ev: &EpisodeEvent,
        req: Box<TicketRequest>,
        applied: &mut Applied,
    ) -> Result<(), StoreError> {
        let t = TicketRecord::new(&req, &r.device, agent, ev.opened_at, self.now)?;
        self.changes.jobs.push(NewJob {
            ticket_key: t.key.clone(),
            event: None,
        });
        self.changes
            .new_tickets
            .push((r.device.clone(), t.key.clone()));
        self.life(
            &r.device,
            r.at,
            LifeEvent::TicketOpened {
                at: r.at,
                ticket_key: t.key.clone(),
                kind: t.kind,
                code: t.code.clone(),
                class: t.class,
            },
        );
        applied.tickets_opened.push(t.key.clone());
        self.touched_tickets
            .insert((r.device.clone(), t.key.clone()));
        self.tickets
            .entry(r.device.clone())
            .or_default()
            .insert(t.key.clone(), t);
        Ok(())
    }

    /// An event on one of the device's tickets; one already recorded is not added again.
    fn event(
        &mut self,
        r: &Record,
        req: EventRequest,
        applied: &mut Applied,
    ) -> Result<(), StoreError> {
        let Some(t) = self
            .tickets
            .get_mut(&r.device)
            .and_then(|k| k.get_mut(&req.ticket_key))
        else {
            return Ok(());
        };
        if t.events
            .iter()
            .any(|e| e.idempotency_key == req.idempotency_key)
        {
            return Ok(());
        }
        let kind = req.body.kind.as_str().to_string();
        t.events.push(TicketEventRecord {
            idempotency_key: req.idempotency_key.clone(),
            kind: kind.clone(),
            body: to_json("ticket event body", &req.body)?,
            forward: Forwarding::pending(),
        });
        self.changes.jobs.push(NewJob {
            ticket_key: req.ticket_key.clone(),
            event: Some(req.idempotency_key),
        });
        self.life(
            &r.device,
            r.at,
            LifeEvent::TicketEvent {
                at: r.at,
                ticket_key: req.ticket_key.clone(),
                event: kind,
            },
        );
        applied.events_queued += 1;
        self.touched_tickets
            .insert((r.device.clone(), req.ticket_key));
        Ok(())
    }

    /// Changes one of the device's tickets, if it has it.
    fn change_ticket(&mut self, device: &str, key: String, f: impl FnOnce(&mut TicketRecord)) {
        if let Some(t) = self.tickets.get_mut(device).and_then(|k| k.get_mut(&key)) {
            f(t);
            self.touched_tickets.insert((device.to_string(), key));
        }
    }

    fn finish(mut self) -> Changes<'a> {
        for id in &self.touched_devices {
            if let Some(d) = self.devices.remove(id) {
                self.changes.devices.insert(id.clone(), d);
            }
        }
        for (device, key) in &self.touched_tickets {
            if let Some(t) = self.tickets.get_mut(device).and_then(|k| k.remove(key)) {
                self.changes.tickets.insert(key.clone(), t);
            }
        }
        self.changes
    }
}

/// What record `r` from `agent` at `site` changes in its device's live picture; returns
/// the line it adds to the device's life record, if any.
fn update_live(
    d: &mut DeviceLive,
    agent: &str,
    site: &str,
    r: &Record,
) -> Result<Option<LifeEvent>, StoreError> {
    d.agent = agent.to_string();
    d.site_reported = site.to_string();
    if d.last_seen.is_none_or(|s| r.at > s) {
        d.last_seen = Some(r.at);
    }
    let line = match &r.body {
        RecordBody::Identity {
            model,
            firmware,
            serial,
            profile,
        } => {
            if d.identity.as_ref().is_none_or(|i| r.at >= i.at) {
                d.identity = Some(LiveIdentity {
                    model: model.clone(),
                    firmware: firmware.clone(),
                    serial: serial.clone(),
                    profile: profile.clone(),
                    at: r.at,
                });
            }
            Some(LifeEvent::Identified {
                at: r.at,
                firmware: firmware.clone(),
                serial: serial.clone(),
                profile: profile.clone(),
            })
        }
        RecordBody::Readings { readings } => {
            for w in readings {
                if !d.readings.contains_key(&w.name) && d.readings.len() >= MAX_READINGS {
                    continue;
                }
                if d.readings.get(&w.name).is_none_or(|x| r.at >= x.time) {
                    let reading = LiveReading {
                        name: w.name.clone(),
                        value: to_json("reading", &w.value)?,
                        unit: w.unit.clone(),
                        time: r.at,
                    };
                    d.readings.insert(w.name.clone(), reading);
                }
            }
            None
        }
        RecordBody::State { from, to } => {
            if d.state_since.is_none_or(|s| r.at >= s) {
                d.state = *to;
                d.state_since = Some(r.at);
            }
            Some(LifeEvent::State {
                at: r.at,
                from: *from,
                to: *to,
            })
        }
        RecordBody::Dropped { count, .. } => {
            d.dropped_readings += count;
            Some(LifeEvent::ReadingsDropped {
                at: r.at,
                count: *count,
            })
        }
        RecordBody::Episode(ev) => {
            update_open_episodes(d, ev);
            Some(LifeEvent::Episode {
                at: r.at,
                event: ev.clone(),
            })
        }
    };
    Ok(line)
}

/// Keeps the open episodes of the live picture: the newest change of each (a replayed old
/// change never reopens what a newer one cleared; a cleared episode is remembered only in
/// the life record).
fn update_open_episodes(d: &mut DeviceLive, ev: &EpisodeEvent) {
    match ev.change {
        EpisodeChange::Opened | EpisodeChange::ClassChanged => {
            // Past the cap a new episode still makes its ticket and life line; only the
            // live picture's list stops growing.
            if d.open_episodes.contains_key(&ev.episode)
                || d.open_episodes.len() < MAX_OPEN_EPISODES
            {
                d.open_episodes.insert(ev.episode.clone(), ev.clone());
            }
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
    use crate::store::{GatewayStore, RedbStore};
    use jiff::SignedDuration;
    use tend_profiles::{FaultClass, SignalKind};
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

    fn cx() -> IngestContext {
        IngestContext {
            gateway: "gw-1".into(),
            fleet: Fleet::parse("fleet.toml", FLEET).unwrap(),
            profiles: tend_profiles::ProfileSet::builtin().unwrap(),
            tz: TimeZone::get("Asia/Shanghai").unwrap(),
            clock_tolerance: crate::clock::DEFAULT_TOLERANCE,
        }
    }

    fn at(min: i64) -> Timestamp {
        "2026-11-02T00:00:00Z".parse::<Timestamp>().unwrap() + SignedDuration::from_mins(min)
    }

    fn record(seq: u64, min: i64, device: &str, body: RecordBody) -> Record {
        Record {
            seq,
            at: at(min),
            device: device.into(),
            body,
        }
    }

    fn readings(seq: u64) -> Record {
        record(
            seq,
            0,
            "vent",
            RecordBody::Readings {
                readings: Vec::new(),
            },
        )
    }

    fn state(seq: u64, min: i64, from: DeviceState, to: DeviceState) -> Record {
        record(seq, min, "vent", RecordBody::State { from, to })
    }

    fn episode(seq: u64, min: i64, device: &str, change: EpisodeChange) -> Record {
        let ev = EpisodeEvent {
            episode: format!("a1/{device}/ALM1.4/1"),
            change,
            code: "ALM1.4".into(),
            kind: SignalKind::Fault,
            class: Some(FaultClass::Major),
            description: "exhalation valve fault".into(),
            action: None,
            evidence: BTreeMap::new(),
            device_available: false,
            opened_at: at(60),
            due: None,
            opening: None,
        };
        record(seq, min, device, RecordBody::Episode(ev))
    }

    fn batch(agent: &str, records: Vec<Record>) -> UpBatch {
        batch_in(agent, "i1", records)
    }

    fn batch_in(agent: &str, incarnation: &str, records: Vec<Record>) -> UpBatch {
        UpBatch {
            v: tend_wire::VERSION,
            agent: agent.into(),
            incarnation: incarnation.into(),
            site: "s-1".into(),
            sent_at: at(0),
            oldest: None,
            records,
        }
    }

    /// The keys of what a plan stores for the first time.
    fn seen_keys<'a>(changes: &Changes<'a>) -> Vec<RecordKey<'a>> {
        changes.seen.iter().map(|(k, _)| *k).collect()
    }

    /// The batches as sent at `now` (by a clock that is right) and arriving then.
    fn sent<const N: usize>(mut group: [UpBatch; N], now: Timestamp) -> [UpBatch; N] {
        for b in &mut group {
            b.sent_at = now;
        }
        group
    }

    fn seqs(agent: &str, seqs: std::ops::RangeInclusive<u64>) -> UpBatch {
        batch(agent, seqs.map(readings).collect())
    }

    fn life_kinds(changes: &Changes<'_>) -> Vec<String> {
        changes
            .life
            .iter()
            .map(|l| {
                serde_json::to_value(&l.event).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn needs_name_every_record_device_and_device_with_an_episode() {
        let group = [
            batch(
                "a1",
                vec![readings(1), episode(2, 60, "vent", EpisodeChange::Opened)],
            ),
            batch(
                "a2",
                vec![record(
                    7,
                    0,
                    "",
                    RecordBody::Dropped {
                        count: 3,
                        first_seq: 1,
                        last_seq: 3,
                    },
                )],
            ),
        ];
        let needs = Needs::of(&group);
        assert_eq!(
            needs.records,
            [("a1", "i1", 1), ("a1", "i1", 2), ("a2", "i1", 7)]
                .into_iter()
                .collect()
        );
        assert_eq!(needs.agents, ["a1", "a2"].into_iter().collect());
        assert_eq!(needs.devices, ["vent"].into_iter().collect());
        assert_eq!(needs.tickets_of, ["vent"].into_iter().collect());
    }

    #[test]
    fn a_record_seen_before_or_twice_in_the_group_is_acked_and_applied_once() {
        let group = [seqs("a1", 1..=3), seqs("a2", 1..=2), seqs("a1", 2..=4)];
        let stored = Stored {
            seen: [(("a1", "i1", 1), digest(&readings(1)).unwrap())]
                .into_iter()
                .collect(),
            ..Stored::default()
        };
        let p = plan(&group, stored, &cx(), at(0)).unwrap();
        let counts: Vec<_> = p
            .applied
            .iter()
            .map(|a| (a.new_records, a.duplicates))
            .collect();
        assert_eq!(counts, [(2, 1), (2, 0), (1, 2)]);
        assert_eq!(p.applied[0].stored, vec![SeqRange { first: 1, last: 3 }]);
        assert_eq!(p.applied[2].stored, vec![SeqRange { first: 2, last: 4 }]);
        assert_eq!(
            seen_keys(&p.changes),
            [
                ("a1", "i1", 2),
                ("a1", "i1", 3),
                ("a2", "i1", 1),
                ("a2", "i1", 2),
                ("a1", "i1", 4)
            ]
        );
        assert!(p.changes.conflicts.is_empty());
        // One device, written once with what the whole group made of it.
        assert_eq!(p.changes.devices.len(), 1);
        assert_eq!(p.changes.devices["vent"].agent, "a1");
    }

    /// A store written by a build that digested the records' JSON: a resend of what it
    /// stored is a duplicate, other content under a stored key a conflict, and a resend
    /// of a conflict it kept is not counted again.
    #[test]
    fn digests_a_previous_build_stored_still_tell_resends_from_conflicts() {
        let other = state(2, 5, DeviceState::Up, DeviceState::Down);
        let stored = Stored {
            seen: [
                (("a1", "i1", 1), legacy_digest(&readings(1)).unwrap()),
                (("a1", "i1", 2), legacy_digest(&readings(2)).unwrap()),
                (("a1", "i1", 3), legacy_digest(&readings(3)).unwrap()),
            ]
            .into_iter()
            .collect(),
            ..Stored::default()
        };
        let mut conflicting = other.clone();
        conflicting.seq = 3;
        let group = [batch_in(
            "a1",
            "i1",
            vec![readings(1), other.clone(), conflicting.clone()],
        )];
        let stored_conflict = Stored {
            conflicts: [(("a1", "i1", 3), legacy_digest(&conflicting).unwrap())]
                .into_iter()
                .collect(),
            ..stored
        };
        let p = plan(&group, stored_conflict, &cx(), at(0)).unwrap();
        let a = &p.applied[0];
        // seq 1: the same record; seq 2: other content (a new conflict); seq 3: the
        // conflict the old build kept, sent again.
        assert_eq!((a.new_records, a.duplicates), (0, 2));
        assert_eq!(a.conflicts, vec![2]);
        assert_eq!(p.changes.conflicts.len(), 1);
        assert_ne!(
            digest(&readings(1)).unwrap(),
            legacy_digest(&readings(1)).unwrap()
        );
    }

    /// A lost outbox: the agent starts again at seq 1 in a new incarnation, and nothing
    /// of it is taken for a duplicate of what the old one sent.
    #[test]
    fn a_new_incarnation_starts_again_at_seq_1_and_loses_nothing() {
        let old = [batch_in("a1", "old", (1..=3).map(readings).collect())];
        let first = plan(&old, Stored::default(), &cx(), at(0)).unwrap();
        let stored = Stored {
            seen: first.changes.seen.iter().copied().collect(),
            agents: first.changes.agents.clone(),
            ..Stored::default()
        };
        assert_eq!(stored.agents["a1"].incarnation.as_deref(), Some("old"));
        let new = [batch_in(
            "a1",
            "new",
            vec![
                state(1, 5, DeviceState::Unknown, DeviceState::Up),
                readings(2),
            ],
        )];
        let p = plan(&new, stored, &cx(), at(10)).unwrap();
        let a = &p.applied[0];
        assert_eq!((a.new_records, a.duplicates, a.conflicts.len()), (2, 0, 0));
        assert_eq!(a.stored, vec![SeqRange { first: 1, last: 2 }]);
        assert_eq!(seen_keys(&p.changes), [("a1", "new", 1), ("a1", "new", 2)]);
        assert_eq!(p.changes.devices["vent"].state, DeviceState::Up);
        let agent = &p.changes.agents["a1"];
        assert_eq!(agent.incarnation.as_deref(), Some("new"));
        assert_eq!(agent.incarnation_since, Some(at(10)));
        assert_eq!(agent.conflicting_records, 0);
    }

    /// Squatting, or a reused seq: the same (agent, incarnation, seq) with other content
    /// is counted on the agent and acked, never applied; a resend of either version is a
    /// duplicate.
    #[test]
    fn the_same_seq_with_other_content_is_a_conflict_acked_but_not_applied() {
        let squat = [batch("a1", vec![readings(1), readings(2)])];
        let first = plan(&squat, Stored::default(), &cx(), at(0)).unwrap();
        let stored = Stored {
            seen: first.changes.seen.iter().copied().collect(),
            agents: first.changes.agents.clone(),
            ..Stored::default()
        };
        let real = sent(
            [
                batch(
                    "a1",
                    vec![
                        state(1, 5, DeviceState::Up, DeviceState::Down),
                        readings(2),
                        readings(3),
                    ],
                ),
                // The real one resent (its ack was lost).
                batch("a1", vec![state(1, 5, DeviceState::Up, DeviceState::Down)]),
            ],
            at(10),
        );
        let p = plan(&real, stored, &cx(), at(10)).unwrap();
        let a = &p.applied[0];
        assert_eq!(a.conflicts, [1]);
        assert_eq!((a.new_records, a.duplicates), (1, 1));
        assert_eq!(a.stored, vec![SeqRange { first: 1, last: 3 }], "all acked");
        let again = &p.applied[1];
        assert_eq!((again.new_records, again.duplicates), (0, 1));
        assert!(again.conflicts.is_empty(), "counted once");
        assert_eq!(again.stored, vec![SeqRange { first: 1, last: 1 }]);
        // Not applied: no transition, the device is not down.
        assert!(p.changes.transitions.is_empty());
        assert_ne!(p.changes.devices["vent"].state, DeviceState::Down);
        assert_eq!(seen_keys(&p.changes), [("a1", "i1", 3)]);
        let d = digest(&state(1, 5, DeviceState::Up, DeviceState::Down)).unwrap();
        assert_eq!(p.changes.conflicts, [(("a1", "i1", 1), d)]);
        let agent = &p.changes.agents["a1"];
        assert_eq!(agent.conflicting_records, 1);
        let c = agent.last_conflict.as_ref().unwrap();
        assert_eq!((c.incarnation.as_str(), c.seq, c.at), ("i1", 1, at(10)));

        // Later, against what is stored: the conflicting version again is no new conflict.
        let stored = Stored {
            seen: first.changes.seen.iter().copied().collect(),
            conflicts: p.changes.conflicts.iter().copied().collect(),
            agents: p.changes.agents.clone(),
            ..Stored::default()
        };
        let resent = sent([real[1].clone()], at(20));
        let p = plan(&resent, stored, &cx(), at(20)).unwrap();
        assert_eq!(
            (p.applied[0].duplicates, p.applied[0].conflicts.len()),
            (1, 0)
        );
        assert!(
            p.changes.agents.is_empty(),
            "nothing about the agent changed"
        );
    }

    /// What lies below the agent's oldest record is forgotten but for a watermark: the
    /// batch raises it, and a replay of what lies below is a duplicate, acked and never
    /// applied again.
    #[test]
    fn below_the_watermark_everything_is_a_duplicate() {
        let mut b = [batch(
            "a1",
            vec![state(5, 1, DeviceState::Up, DeviceState::Down)],
        )];
        b[0].oldest = Some(5);
        let p = plan(&b, Stored::default(), &cx(), at(1)).unwrap();
        assert_eq!(p.changes.watermarks.get(&("a1", "i1")), Some(&4));
        // An older oldest never lowers it.
        let mut b = [batch("a1", vec![readings(6)])];
        b[0].oldest = Some(2);
        let stored = Stored {
            watermarks: [(("a1", "i1"), 4)].into_iter().collect(),
            ..Stored::default()
        };
        let p = plan(&b, stored, &cx(), at(1)).unwrap();
        assert!(p.changes.watermarks.is_empty());

        // A replay of seqs at or below it: acked, not applied.
        let replay = [batch(
            "a1",
            vec![
                state(3, 1, DeviceState::Up, DeviceState::Down),
                state(4, 1, DeviceState::Down, DeviceState::Up),
            ],
        )];
        let stored = Stored {
            watermarks: [(("a1", "i1"), 4)].into_iter().collect(),
            ..Stored::default()
        };
        let p = plan(&replay, stored, &cx(), at(1)).unwrap();
        let a = &p.applied[0];
        assert_eq!((a.new_records, a.duplicates), (0, 2));
        assert_eq!(a.stored, vec![SeqRange { first: 3, last: 4 }]);
        assert!(p.changes.transitions.is_empty() && p.changes.seen.is_empty());
        // Another incarnation has a watermark of its own.
        let other = [batch_in("a1", "i2", vec![readings(3)])];
        let stored = Stored {
            watermarks: [(("a1", "i1"), 4)].into_iter().collect(),
            ..Stored::default()
        };
        let p = plan(&other, stored, &cx(), at(1)).unwrap();
        assert_eq!(p.applied[0].new_records, 1);
    }

    #[test]
    fn the_live_picture_keeps_the_newest_state_and_the_ledger_gets_every_transition() {
        let mut known = DeviceLive::new("vent", "a1", "s-1");
        known.state = DeviceState::Down;
        known.state_since = Some(at(60));
        known.last_seen = Some(at(60));
        let stored = Stored {
            devices: [("vent".to_string(), known)].into_iter().collect(),
            ..Stored::default()
        };
        // A late transition (replayed from the agent's outbox) and a newer one.
        let group = sent(
            [
                batch(
                    "a1",
                    vec![state(4, 30, DeviceState::Unknown, DeviceState::Up)],
                ),
                batch("a1", vec![state(5, 90, DeviceState::Down, DeviceState::Up)]),
            ],
            at(100),
        );
        let p = plan(&group, stored, &cx(), at(100)).unwrap();
        let d = &p.changes.devices["vent"];
        assert_eq!((d.state, d.state_since), (DeviceState::Up, Some(at(90))));
        assert_eq!(d.last_seen, Some(at(90)));
        let t: Vec<_> = p
            .changes
            .transitions
            .iter()
            .map(|t| (t.at, t.seq, t.to))
            .collect();
        assert_eq!(
            t,
            [(at(30), 4, DeviceState::Up), (at(90), 5, DeviceState::Up)]
        );
        assert_eq!(life_kinds(&p.changes), ["state", "state"]);
        assert!(p.changes.tickets.is_empty() && p.changes.jobs.is_empty());
    }

    #[test]
    fn an_agents_drop_report_is_counted_in_its_own_record_never_a_device() {
        let dropped = RecordBody::Dropped {
            count: 40,
            first_seq: 1,
            last_seq: 40,
        };
        let group = [batch("a1", vec![record(1, 5, "", dropped)])];
        let p = plan(&group, Stored::default(), &cx(), at(6)).unwrap();
        assert_eq!(p.applied[0].dropped_readings, 40);
        assert!(p.changes.devices.is_empty());
        assert_eq!(p.changes.life.len(), 1);
        assert_eq!(p.changes.life[0].device, "");
    }

    #[test]
    fn an_episode_opens_one_ticket_and_its_clearing_in_the_next_batch_becomes_its_event() {
        let now = at(200);
        let group = sent(
            [
                batch("a1", vec![episode(1, 60, "vent", EpisodeChange::Opened)]),
                batch(
                    "a1",
                    vec![
                        episode(1, 60, "vent", EpisodeChange::Opened), // resent: a duplicate
                        episode(2, 90, "vent", EpisodeChange::Cleared),
                    ],
                ),
            ],
            now,
        );
        let p = plan(&group, Stored::default(), &cx(), now).unwrap();
        assert_eq!(p.applied[0].tickets_opened.len(), 1);
        assert_eq!(p.applied[0].episodes_opened, 1);
        assert_eq!(
            (p.applied[1].events_queued, p.applied[1].duplicates),
            (1, 1)
        );
        let key = &p.applied[0].tickets_opened[0];
        assert_eq!(p.changes.new_tickets, [("vent".to_string(), key.clone())]);
        // The ticket is written once, as the group left it.
        let t = &p.changes.tickets[key];
        assert_eq!((t.created_at, t.detected_at), (now, at(60)));
        assert_eq!(t.events.len(), 1);
        assert_eq!(t.events[0].kind, "fault_cleared");
        assert_eq!(t.body["fault"]["code"], "ALM1.4");
        let jobs: Vec<_> = p.changes.jobs.iter().map(|j| j.event.is_some()).collect();
        assert_eq!(jobs, [false, true], "the create, then the event");
        assert_eq!(
            life_kinds(&p.changes),
            ["episode", "ticket_opened", "episode", "ticket_event"]
        );
        assert!(p.changes.devices["vent"].open_episodes.is_empty());
    }

    #[test]
    fn a_ticket_already_stored_is_not_opened_again() {
        let first = [batch(
            "a1",
            vec![episode(1, 60, "vent", EpisodeChange::Opened)],
        )];
        let p = plan(&first, Stored::default(), &cx(), at(61)).unwrap();
        let tickets = p.changes.tickets.clone();
        // A later group, against what the first one stored: the same episode from
        // another agent's outbox (a re-homed device) changes no ticket.
        let again = [batch(
            "a2",
            vec![episode(1, 60, "vent", EpisodeChange::Opened)],
        )];
        let stored = Stored {
            tickets: [("vent".to_string(), tickets)].into_iter().collect(),
            ..Stored::default()
        };
        let p = plan(&again, stored, &cx(), at(62)).unwrap();
        assert_eq!(p.applied[0].new_records, 1);
        assert!(!p.applied[0].has_jobs());
        assert!(p.changes.jobs.is_empty() && p.changes.new_tickets.is_empty());
    }

    #[test]
    fn a_device_outside_the_fleet_is_kept_without_tickets() {
        let group = [batch(
            "a1",
            vec![episode(1, 60, "stray", EpisodeChange::Opened)],
        )];
        let p = plan(&group, Stored::default(), &cx(), at(61)).unwrap();
        assert_eq!(p.applied[0].unknown_device, 1);
        assert_eq!(p.changes.new_strays, 1);
        assert!(p.changes.tickets.is_empty() && p.changes.jobs.is_empty());
        assert_eq!(p.changes.devices["stray"].open_episodes.len(), 1);
    }

    /// An agent naming thousands of made-up devices (a fault, or a stolen key) fills no
    /// store: 32 devices outside the fleet are kept, the rest counted and dropped; a
    /// device's readings and open episodes are capped too.
    #[test]
    fn strays_readings_and_open_episodes_are_capped() {
        let many: Vec<Record> = (1..=100u64)
            .map(|i| {
                record(
                    i,
                    1,
                    &format!("phantom-{i}"),
                    RecordBody::Readings {
                        readings: Vec::new(),
                    },
                )
            })
            .collect();
        let group = [batch("a1", many)];
        let p = plan(&group, Stored::default(), &cx(), at(1)).unwrap();
        let a = &p.applied[0];
        assert_eq!((a.unknown_device, a.strays_dropped), (100, 68));
        assert_eq!(p.changes.devices.len(), 32);
        assert_eq!(p.changes.new_strays, 32);
        // Known strays still update; new ones stay out once 32 are kept.
        let stored = Stored {
            strays: 32,
            devices: p.changes.devices.clone(),
            ..Stored::default()
        };
        let again = [batch_in(
            "a1",
            "i2",
            vec![
                record(1, 2, "phantom-1", RecordBody::Readings { readings: vec![] }),
                record(
                    2,
                    2,
                    "phantom-99",
                    RecordBody::Readings { readings: vec![] },
                ),
            ],
        )];
        let p = plan(&again, stored, &cx(), at(2)).unwrap();
        assert_eq!(p.applied[0].strays_dropped, 1);
        assert!(p.changes.devices.contains_key("phantom-1"));
        assert!(!p.changes.devices.contains_key("phantom-99"));

        // 1,000 reading names for one device: 256 kept.
        let names = RecordBody::Readings {
            readings: (0..1000)
                .map(|i| tend_wire::WireReading {
                    name: format!("r{i}"),
                    value: tend_profiles::Value::Num(1.0),
                    unit: None,
                })
                .collect(),
        };
        let group = [batch("a1", vec![record(1, 1, "vent", names)])];
        let p = plan(&group, Stored::default(), &cx(), at(1)).unwrap();
        assert_eq!(p.changes.devices["vent"].readings.len(), MAX_READINGS);
    }

    #[test]
    fn a_group_of_batches_is_applied_in_order_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let cx = cx();
        let now = Timestamp::now();
        // Two agents, and a resend overlapping the first batch, in one group.
        let group = [seqs("a1", 1..=3), seqs("a2", 1..=2), seqs("a1", 2..=4)];
        let out = store.apply_many(&group, &cx, now).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!((out[0].new_records, out[0].duplicates), (3, 0));
        assert_eq!((out[1].new_records, out[1].duplicates), (2, 0));
        assert_eq!((out[2].new_records, out[2].duplicates), (1, 2));
        assert_eq!(out[2].stored, vec![SeqRange { first: 2, last: 4 }]);
        assert_eq!(store.records_stored().unwrap(), 6);
        assert!(store.has_record("a2", 2).unwrap() && store.has_record_in("a2", "i1", 2).unwrap());
        assert!(
            !store.has_record_in("a2", "i2", 2).unwrap() && !store.has_record("a2", 3).unwrap()
        );
        // Later, alone: everything seen, acked again, applied once.
        let again = store.apply(&group[0], &cx, now).unwrap();
        assert_eq!((again.new_records, again.duplicates), (0, 3));
        assert_eq!(again.stored, vec![SeqRange { first: 1, last: 3 }]);
        assert!(store.apply_many(&[], &cx, now).unwrap().is_empty());
    }
}
