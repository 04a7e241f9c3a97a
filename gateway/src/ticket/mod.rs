//! Tickets in the service backend (`service-backend-api.md`): the exact bodies of
//! `POST /api/v1/tickets` and `POST /api/v1/tickets/{id}/events`, their Idempotency-Keys,
//! and the decision what a fault-episode change becomes (a new ticket, an event on an
//! existing one, or nothing).
//!
//! Keys are derived from the episode id alone (plus, for events, what the event is), never
//! from a counter or the gateway: with a shared subscription any gateway may see any
//! record, and after a restart the same episode must give the same key so a retry never
//! opens a second ticket. A body is built once, from the record that first needs it, and
//! kept with its key in the forwarder's outbox: a key sent twice with two bodies is a 409.

use crate::fleet::{Customer, DeviceEntry, ServiceArea, Site};
use crate::sla::{
    clinical_impact, deadlines, effective_class, escalated_deadlines, rfc3339, warranty,
    ClinicalImpact, Deadlines, SlaJson, Warranty,
};
use crate::sla_watch::{risk_from, DeadlineKind};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Serialize;
use std::collections::BTreeMap;
use tend_profiles::{FaultClass, ProfileSet, SignalKind};
use tend_wire::{EpisodeChange, EpisodeEvent, RecordBody};

/// The backend's body schema.
pub const SCHEMA: &str = "service-ticket/1";
/// Longest Idempotency-Key the backend accepts.
pub const MAX_KEY: usize = 128;

/// Lower-case hex of the SHA-256 of `data` (`ring`, as rustls uses): the fixed-length
/// tail of an over-long or unusual key, and how the hotline token is compared.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What an agent's Identity record said about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The profile id the agent's config names (`aeris/av-500`).
    pub model: String,
    /// The firmware the device reported (`5.2.0`).
    pub firmware: String,
    pub serial: Option<String>,
    /// The profile chosen (`aeris/av-500 5.x`).
    pub profile: String,
}

impl DeviceIdentity {
    pub fn from_record(body: &RecordBody) -> Option<Self> {
        match body {
            RecordBody::Identity {
                model,
                firmware,
                serial,
                profile,
            } => Some(DeviceIdentity {
                model: model.clone(),
                firmware: firmware.clone(),
                serial: serial.clone(),
                profile: profile.clone(),
            }),
            _ => None,
        }
    }
}

/// What a ticket says the device is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceFacts {
    /// In the backend's words: `ventilator`, `infusion_pump`, ...
    pub kind: Option<String>,
    pub vendor: Option<String>,
    /// The vendor's model name (`AV-500`).
    pub model: Option<String>,
    pub firmware: Option<String>,
}

impl DeviceFacts {
    /// The fleet file's `kind`/`vendor`/`model` win (a person wrote them for this very
    /// device); else the profile the agent identified the device with; else the agent's
    /// model id. The firmware is only ever what the device reported.
    pub fn resolve(
        entry: &DeviceEntry<'_>,
        identity: Option<&DeviceIdentity>,
        profiles: &ProfileSet,
    ) -> DeviceFacts {
        let profile = identity
            .and_then(|i| profiles.family(&i.model).ok())
            .and_then(|f| f.first().cloned());
        let from_profile = |f: fn(&tend_profiles::schema::DeviceDef) -> &String| {
            profile.as_ref().map(|p| f(&p.doc.device).clone())
        };
        let d = entry.device;
        DeviceFacts {
            kind: d.kind.clone().or_else(|| from_profile(|x| &x.kind)),
            vendor: d.vendor.clone().or_else(|| from_profile(|x| &x.vendor)),
            model: d
                .model
                .clone()
                .or_else(|| from_profile(|x| &x.model))
                .or_else(|| identity.map(|i| i.model.clone())),
            firmware: identity.map(|i| i.firmware.clone()),
        }
    }
}

/// Everything besides the episode that a ticket body needs.
#[derive(Debug, Clone, Copy)]
pub struct TicketContext<'a> {
    pub gateway: &'a str,
    pub agent: &'a str,
    pub entry: DeviceEntry<'a>,
    pub facts: &'a DeviceFacts,
    pub tz: &'a TimeZone,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CustomerJson {
    pub id: String,
    pub name: String,
    pub contact_name: String,
    pub contact_phone: String,
}

impl From<&Customer> for CustomerJson {
    fn from(c: &Customer) -> Self {
        CustomerJson {
            id: c.id.clone(),
            name: c.name.clone(),
            contact_name: c.contact_name.clone(),
            contact_phone: c.contact_phone.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteJson {
    pub id: String,
    pub name: String,
    pub address: String,
    pub service_area: ServiceArea,
}

impl From<&Site> for SiteJson {
    fn from(s: &Site) -> Self {
        SiteJson {
            id: s.id.clone(),
            name: s.name.clone(),
            address: s.address.clone(),
            service_area: s.service_area,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceJson {
    pub id: String,
    pub kind: Option<String>,
    pub vendor: Option<String>,
    pub model: Option<String>,
    pub serial: String,
    pub firmware: Option<String>,
    pub location: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultJson {
    pub code: String,
    pub description: String,
    pub class: FaultClass,
    pub device_available: bool,
    pub first_seen: String,
    pub evidence: BTreeMap<String, serde_json::Value>,
    pub suggested_action: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceJson {
    pub gateway: String,
    pub agent: String,
    pub detected_at: String,
}

/// The body of `POST /api/v1/tickets`, field for field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TicketBody {
    pub schema: &'static str,
    pub kind: SignalKind,
    pub customer: CustomerJson,
    pub site: SiteJson,
    pub device: DeviceJson,
    pub fault: FaultJson,
    pub clinical_impact: ClinicalImpact,
    pub warranty: Warranty,
    pub sla: SlaJson,
    pub source: SourceJson,
}

/// A ticket to open: its key and body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TicketRequest {
    pub idempotency_key: String,
    /// The episode the ticket is for.
    pub episode: String,
    pub body: TicketBody,
    /// The deadlines in `body.sla`, as instants (for the SLA watch).
    #[serde(skip)]
    pub deadlines: Deadlines,
}

impl TicketRequest {
    /// The body as sent. Plain structs of strings, numbers and string-keyed maps: a
    /// failure would be a bug, and is an error rather than empty bytes.
    pub fn body_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&self.body)
    }
}

/// Builds the ticket for an episode. Times are the episode's opening (`opened_at`, the
/// agent's detection time): the SLA runs from detection, and a body rebuilt from the same
/// event is the same body.
pub fn build_ticket(cx: &TicketContext<'_>, ev: &EpisodeEvent) -> TicketRequest {
    let d = cx.entry.device;
    // The episode as it opened, when the agent says (every change carries it): the body is
    // then the same whichever change of the episode builds it, on whichever gateway.
    let opening = Opened::of(ev);
    let class = effective_class(ev.kind, opening.class);
    let detected = ev.opened_at;
    let terms = cx.entry.terms_at(detected, cx.tz);
    let sla = deadlines(
        detected,
        ev.kind,
        opening.class,
        cx.entry.site.service_area,
        opening.due,
        cx.tz,
        &terms,
    );
    let body = TicketBody {
        schema: SCHEMA,
        kind: ev.kind,
        customer: cx.entry.customer.into(),
        site: cx.entry.site.into(),
        device: DeviceJson {
            id: d.id.clone(),
            kind: cx.facts.kind.clone(),
            vendor: cx.facts.vendor.clone(),
            model: cx.facts.model.clone(),
            serial: d.serial.clone(),
            firmware: cx.facts.firmware.clone(),
            location: d.location.clone(),
        },
        fault: FaultJson {
            code: ev.code.clone(),
            description: opening.description.to_string(),
            class,
            device_available: opening.device_available,
            first_seen: rfc3339(detected, cx.tz),
            evidence: opening.evidence.clone(),
            suggested_action: opening.action.map(str::to_string),
        },
        clinical_impact: clinical_impact(opening.device_available, class),
        warranty: warranty(d, detected, cx.tz, &terms),
        sla: sla.to_json(cx.tz),
        source: SourceJson {
            gateway: cx.gateway.to_string(),
            agent: cx.agent.to_string(),
            detected_at: rfc3339(detected, cx.tz),
        },
    };
    TicketRequest {
        idempotency_key: ticket_key(&ev.episode),
        episode: ev.episode.clone(),
        body,
        deadlines: sla,
    }
}

/// The opening facts of an episode: from `ev.opening` when the agent sent it, else from the
/// change itself (an older agent, or the opening change).
struct Opened<'a> {
    class: Option<FaultClass>,
    description: &'a str,
    action: Option<&'a str>,
    evidence: &'a BTreeMap<String, serde_json::Value>,
    device_available: bool,
    due: Option<&'a str>,
}

impl<'a> Opened<'a> {
    fn of(ev: &'a EpisodeEvent) -> Self {
        match &ev.opening {
            Some(o) => Opened {
                class: o.class,
                description: &o.description,
                action: o.action.as_deref(),
                evidence: &o.evidence,
                device_available: o.device_available,
                due: o.due.as_deref(),
            },
            None => Opened {
                class: ev.class,
                description: &ev.description,
                action: ev.action.as_deref(),
                evidence: &ev.evidence,
                device_available: ev.device_available,
                due: ev.due.as_deref(),
            },
        }
    }
}

/// Printable ASCII without the space: safe in an HTTP header and unambiguous in logs.
fn is_key_char(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// `prefix` + `tail` when that is a valid key, else `hashed_prefix` + SHA-256 of `tail`.
fn key_of(prefix: &str, hashed_prefix: &str, tail: &str) -> String {
    let k = format!("{prefix}{tail}");
    if k.len() <= MAX_KEY && k.bytes().all(is_key_char) {
        k
    } else {
        // The hashed form has its own prefix, so it never equals a readable key.
        format!("{hashed_prefix}{}", sha256_hex(tail.as_bytes()))
    }
}

/// The Idempotency-Key of the ticket for `episode`: `tend-t:<episode>` while readable and
/// short enough, else `tend-t#<sha256 of episode>` (71 characters). Depends on the episode
/// id alone.
pub fn ticket_key(episode: &str) -> String {
    key_of("tend-t:", "tend-t#", episode)
}

/// What an event on a ticket says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    FaultCleared,
    FaultRecurred,
    Escalated,
    SlaAtRisk,
    SlaMissed,
    Note,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::FaultCleared => "fault_cleared",
            EventType::FaultRecurred => "fault_recurred",
            EventType::Escalated => "escalated",
            EventType::SlaAtRisk => "sla_at_risk",
            EventType::SlaMissed => "sla_missed",
            EventType::Note => "note",
        }
    }
}

/// The body of `POST /api/v1/tickets/{ticket_id}/events`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventBody {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub at: String,
    pub detail: serde_json::Value,
}

/// An event to add to the ticket whose Idempotency-Key is `ticket_key` (the forwarder
/// knows the backend's ticket id for it once the ticket is created).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRequest {
    pub ticket_key: String,
    pub idempotency_key: String,
    pub body: EventBody,
}

impl EventRequest {
    /// The body as sent (an error rather than empty bytes, as for a ticket).
    pub fn body_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&self.body)
    }
}

/// The key of an event: the event type, the episode it comes from and, for changes that
/// can happen more than once in an episode, the new class and the agent's time of the
/// change (a replayed record has the same time, so the same key).
pub fn event_key(
    kind: EventType,
    episode: &str,
    class: Option<FaultClass>,
    at: Option<Timestamp>,
) -> String {
    let head = format!("tend-e:{}:", kind.as_str());
    let hashed = format!("tend-e#{}:", kind.as_str());
    let mut tail = String::new();
    if let Some(c) = class {
        tail.push_str(c.as_str());
        tail.push(':');
    }
    if let Some(at) = at {
        tail.push_str(&at.as_nanosecond().to_string());
        tail.push(':');
    }
    // The episode goes last: the parts before it contain no ':' of their own, so the key
    // reads back unambiguously.
    tail.push_str(episode);
    key_of(&head, &hashed, &tail)
}

/// `fault_cleared` for `ev` (a `Cleared` change at the agent's time `at`).
pub fn cleared_event(
    ticket_key: &str,
    ev: &EpisodeEvent,
    at: Timestamp,
    tz: &TimeZone,
) -> EventRequest {
    EventRequest {
        ticket_key: ticket_key.to_string(),
        idempotency_key: event_key(EventType::FaultCleared, &ev.episode, None, None),
        body: EventBody {
            kind: EventType::FaultCleared,
            at: rfc3339(at, tz),
            detail: serde_json::json!({"code": ev.code, "evidence": ev.evidence}),
        },
    }
}

/// `fault_recurred`: episode `ev` of the same device and code opened while the ticket of
/// an earlier episode is still open. Stamped with the episode's opening and built from
/// it, whichever change of the episode the gateway sees first: its key depends on the
/// episode alone, so its body must too.
pub fn recurred_event(
    ticket_key: &str,
    ev: &EpisodeEvent,
    _seen_at: Timestamp,
    tz: &TimeZone,
) -> EventRequest {
    let o = Opened::of(ev);
    EventRequest {
        ticket_key: ticket_key.to_string(),
        idempotency_key: event_key(EventType::FaultRecurred, &ev.episode, None, None),
        body: EventBody {
            kind: EventType::FaultRecurred,
            at: rfc3339(ev.opened_at, tz),
            detail: serde_json::json!({
                "code": ev.code,
                "episode": ev.episode,
                "first_seen": rfc3339(ev.opened_at, tz),
                "description": o.description,
                "class": effective_class(ev.kind, o.class),
                "device_available": o.device_available,
                "evidence": o.evidence,
            }),
        },
    }
}

/// `escalated` (class rose from `previous` to the event's class) or, when it fell, a
/// `note` saying so: the backend's types have no "de-escalated".
pub fn class_event(
    ticket_key: &str,
    ev: &EpisodeEvent,
    previous: FaultClass,
    at: Timestamp,
    deadlines: Option<&Deadlines>,
    tz: &TimeZone,
) -> EventRequest {
    let class = effective_class(ev.kind, ev.class);
    let kind = if class > previous {
        EventType::Escalated
    } else {
        EventType::Note
    };
    let mut detail = serde_json::json!({
        "code": ev.code,
        "episode": ev.episode,
        "class": class,
        "previous_class": previous,
        "description": ev.description,
        "device_available": ev.device_available,
        "clinical_impact": clinical_impact(ev.device_available, class),
        "evidence": ev.evidence,
    });
    if let Some(d) = deadlines {
        // The deadlines that now apply, counted from the moment the class rose.
        let j = d.to_json(tz);
        detail["sla"] = serde_json::json!({
            "respond_by": j.respond_by,
            "onsite_by": j.onsite_by,
            "plan_by": j.plan_by,
            "resolve_by": j.resolve_by,
        });
    }
    if kind == EventType::Note {
        detail["text"] = format!(
            "{} lowered from {previous} to {class} by the device",
            ev.code
        )
        .into();
    }
    EventRequest {
        ticket_key: ticket_key.to_string(),
        idempotency_key: event_key(kind, &ev.episode, Some(class), Some(at)),
        body: EventBody {
            kind,
            at: rfc3339(at, tz),
            detail,
        },
    }
}

/// A ticket the gateway has (created or waiting to be), as the decision needs it.
/// The `sla_at_risk` or `sla_missed` event of deadline `deadline` (due at `due`, counted
/// from `from`) on the ticket `ticket_key` opened by `episode`.
///
/// Its key names the deadline and its due instant, so each deadline gets each event once,
/// and a deadline moved by an escalation is a new promise with events of its own. Its
/// body depends only on the deadline (the event's time is when the deadline was missed,
/// or when 75 % of its time was gone), so every gateway builds the same body for a key.
pub fn sla_event(
    ticket_key: &str,
    episode: &str,
    deadline: DeadlineKind,
    missed: bool,
    from: Timestamp,
    due: Timestamp,
    tz: &TimeZone,
) -> EventRequest {
    let (kind, at) = if missed {
        (EventType::SlaMissed, due)
    } else {
        (EventType::SlaAtRisk, risk_from(from, due))
    };
    let head = format!("tend-e:{}:{}:", kind.as_str(), deadline.as_str());
    let hashed = format!("tend-e#{}:{}:", kind.as_str(), deadline.as_str());
    let tail = format!("{}:{episode}", due.as_nanosecond());
    EventRequest {
        ticket_key: ticket_key.to_string(),
        idempotency_key: key_of(&head, &hashed, &tail),
        body: EventBody {
            kind,
            at: rfc3339(at, tz),
            detail: serde_json::json!({
                "deadline": deadline.as_str(),
                "due": rfc3339(due, tz),
            }),
        },
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownTicket {
    /// Its Idempotency-Key.
    pub key: String,
    pub device: String,
    pub code: String,
    pub kind: SignalKind,
    /// The class the ticket stands at now (after escalations).
    pub class: FaultClass,
    /// The episode that opened it and every episode attached to it as a recurrence.
    pub episodes: Vec<String>,
    /// Still open in the backend (not resolved or closed).
    pub open: bool,
    /// The deadlines that apply now, when known.
    pub deadlines: Option<Deadlines>,
}

impl KnownTicket {
    /// The ticket a [`TicketRequest`] for `device` opens.
    pub fn from_request(device: &str, req: &TicketRequest) -> KnownTicket {
        KnownTicket {
            key: req.idempotency_key.clone(),
            device: device.to_string(),
            code: req.body.fault.code.clone(),
            kind: req.body.kind,
            class: req.body.fault.class,
            episodes: vec![req.episode.clone()],
            open: true,
            deadlines: Some(req.deadlines),
        }
    }
}

/// One step of what an episode change asks for, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open a ticket (remember it as a [`KnownTicket`]). Boxed: a body is large beside the
    /// other steps.
    Create(Box<TicketRequest>),
    /// Add an event to a ticket.
    Event(EventRequest),
    /// The episode now belongs to this ticket (a recurrence).
    Attach { ticket_key: String, episode: String },
    /// The ticket's class is now `class`.
    SetClass {
        ticket_key: String,
        class: FaultClass,
        /// The deadlines after a rise, counted from its moment; `None` when the class
        /// fell (the promises already made stand).
        deadlines: Option<Deadlines>,
    },
}

/// What a change of an episode on `device` (recorded at the agent's time `at`) becomes,
/// given the tickets known for that device:
///
/// - an episode that already belongs to a ticket (open or not) stays with it: `Opened`
///   again is a replay and does nothing; `ClassChanged` escalates (or notes a lowering);
///   `Cleared` adds `fault_cleared`;
/// - an episode without a ticket, while an *open* ticket of the same device, code and kind
///   exists: `fault_recurred` on that ticket and the episode is attached to it (then
///   escalated if its class is higher, and `fault_cleared` if this change is a clearing);
/// - otherwise a new ticket (then `fault_cleared` at once when the first change the
///   gateway sees is the clearing, so the fault is on record even though it is gone).
pub fn decide(
    cx: &TicketContext<'_>,
    ev: &EpisodeEvent,
    at: Timestamp,
    known: &[KnownTicket],
) -> Vec<Action> {
    let device = cx.entry.device.id.as_str();
    let class = effective_class(ev.kind, ev.class);
    let mine = |t: &&KnownTicket| t.device == device;
    let mut actions = Vec::new();
    let owner = known
        .iter()
        .filter(mine)
        .find(|t| t.episodes.contains(&ev.episode));
    let recurring = || {
        known
            .iter()
            .filter(mine)
            .find(|t| t.open && t.code == ev.code && t.kind == ev.kind)
    };
    let (key, ticket_class, old_deadlines) = match owner {
        Some(t) => {
            if ev.change == EpisodeChange::Opened {
                return actions;
            }
            (t.key.clone(), Some(t.class), t.deadlines)
        }
        None => match recurring() {
            Some(t) => {
                actions.push(Action::Event(recurred_event(&t.key, ev, at, cx.tz)));
                actions.push(Action::Attach {
                    ticket_key: t.key.clone(),
                    episode: ev.episode.clone(),
                });
                (t.key.clone(), Some(t.class), t.deadlines)
            }
            None => {
                let req = build_ticket(cx, ev);
                let key = req.idempotency_key.clone();
                // Built from the opening: when this later change raised the class, the new
                // ticket is escalated at once.
                let opened_class = req.body.fault.class;
                let opened_deadlines = req.deadlines;
                actions.push(Action::Create(Box::new(req)));
                (
                    key,
                    (ev.change != EpisodeChange::Opened).then_some(opened_class),
                    Some(opened_deadlines),
                )
            }
        },
    };
    if let Some(previous) = ticket_class {
        let lowered = ev.change == EpisodeChange::ClassChanged && class < previous;
        if class > previous || lowered {
            // Only a fault's class sets deadlines; maintenance and consumables keep their
            // due date.
            let rose = class > previous
                && matches!(ev.kind, SignalKind::Fault | SignalKind::MonitoringLost);
            let deadlines = old_deadlines.filter(|_| rose).map(|old| {
                let terms = cx.entry.terms_at(at, cx.tz);
                escalated_deadlines(&old, at, class, cx.entry.site.service_area, &terms)
            });
            actions.push(Action::Event(class_event(
                &key,
                ev,
                previous,
                at,
                deadlines.as_ref(),
                cx.tz,
            )));
            actions.push(Action::SetClass {
                ticket_key: key.clone(),
                class,
                deadlines,
            });
        }
    }
    if ev.change == EpisodeChange::Cleared {
        actions.push(Action::Event(cleared_event(&key, ev, at, cx.tz)));
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::sha256_hex;

    #[test]
    fn sha256_standard_vectors() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            sha256_hex(&vec![b'a'; 1_000_000]),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }
}
