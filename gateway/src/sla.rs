//! The service promises as numbers: SLA deadlines, warranty status and clinical impact of
//! a ticket, per `service-backend-api.md` and the after-sales commitments (answer within
//! 1 h; on site 3 h / 24 h / 48 h by service area; simple faults fixed within 24 h,
//! complex faults a repair plan within 48 h, major faults fixed within 72 h; 2 years free
//! warranty).
//!
//! Deadlines are counted in elapsed time from the moment the fault was detected (a
//! daylight-saving change never shortens a promise) and written in the configured time
//! zone, RFC 3339 with offset, as the backend wants.

use crate::fleet::{Device, ServiceArea};
use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use serde::Serialize;
use std::fmt;
use tend_profiles::{FaultClass, SignalKind};

const HOUR: i64 = 3600;
const fn hours(h: i64) -> SignedDuration {
    SignedDuration::from_secs(h * HOUR)
}

/// The terms of a service contract: how fast the service organisation answers, travels and
/// fixes, how long the free warranty runs, the availability it promises and how often it
/// maintains each device. A fleet file's `[[contract]]` sets them per customer or device;
/// every key it leaves out keeps the seed's value ([`Terms::SEED`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Terms {
    /// Every ticket: answered within this (seed: 1 h).
    pub respond: SignedDuration,
    /// On site by service area (seed: 3 h / 24 h / 48 h).
    pub onsite_same_city: SignedDuration,
    pub onsite_other_city: SignedDuration,
    pub onsite_remote: SignedDuration,
    /// Simple faults: remote guidance first, fixed within this (seed: 24 h).
    pub simple_fix: SignedDuration,
    /// Complex faults: a repair plan agreed and started within this (seed: 48 h).
    pub complex_plan: SignedDuration,
    /// Major faults: fixed within this (seed: 72 h).
    pub major_fix: SignedDuration,
    /// The free warranty from acceptance, in months (seed: 24).
    pub warranty_months: i32,
    /// The availability promised per period (seed: 99.5 %).
    pub availability_target: f64,
    /// Preventive maintenance every this many days (seed: every 6 months, 182 days).
    pub pm_interval_days: u32,
}

impl Terms {
    /// The after-sales commitments of the seed: what applies without a contract.
    pub const SEED: Terms = Terms {
        respond: hours(1),
        onsite_same_city: hours(3),
        onsite_other_city: hours(24),
        onsite_remote: hours(48),
        simple_fix: hours(24),
        complex_plan: hours(48),
        major_fix: hours(72),
        warranty_months: 24,
        availability_target: 0.995,
        pm_interval_days: 182,
    };

    /// How long an engineer may take to be on site.
    pub fn onsite_within(&self, area: ServiceArea) -> SignedDuration {
        match area {
            ServiceArea::SameCity => self.onsite_same_city,
            ServiceArea::OtherCity => self.onsite_other_city,
            ServiceArea::Remote => self.onsite_remote,
        }
    }
}

impl Default for Terms {
    fn default() -> Self {
        Terms::SEED
    }
}

/// Maintenance or a consumable that is already due: done within 24 h.
pub const OVERDUE_RESOLVE_WITHIN: SignedDuration = hours(24);

/// The class a ticket is filed and timed under.
///
/// A fault or `monitoring_lost` signal without a class is treated as `complex`: an engineer
/// looks at it on site and a plan follows, which is what the HM-2 manual asks for a lost
/// monitor and what profiles use for codes their manual does not classify. Maintenance and
/// consumables without a class are routine work: `simple`.
pub fn effective_class(kind: SignalKind, class: Option<FaultClass>) -> FaultClass {
    class.unwrap_or(match kind {
        SignalKind::Fault | SignalKind::MonitoringLost => FaultClass::Complex,
        SignalKind::MaintenanceDue | SignalKind::Consumable => FaultClass::Simple,
    })
}

/// A ticket's deadlines; `None` for those that do not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub respond_by: Timestamp,
    pub onsite_by: Option<Timestamp>,
    pub plan_by: Option<Timestamp>,
    pub resolve_by: Option<Timestamp>,
}

/// Deadlines of a ticket detected at `detected`.
///
/// - every kind: `respond_by` = +1 h;
/// - `fault` and `monitoring_lost`, by [`effective_class`]: `simple` → `resolve_by` +24 h;
///   `complex` → `onsite_by` by area and `plan_by` +48 h; `major` → `onsite_by` by area
///   and `resolve_by` +72 h. So a lost monitor (complex) gets an engineer on site by area
///   and a plan within 48 h;
/// - `maintenance_due` and `consumable`: `resolve_by` = the end of the due date in `tz`
///   (23:59:59 local: the work is due *on* that day, so the whole day is allowed), or
///   +24 h when the due date is today or past in `tz`, or when `due` is missing or not a
///   date (`YYYY-MM-DD`; a full RFC 3339 time is taken as the instant itself). No on-site
///   or plan deadline: that work is scheduled, not dispatched.
pub fn deadlines(
    detected: Timestamp,
    kind: SignalKind,
    class: Option<FaultClass>,
    area: ServiceArea,
    due: Option<&str>,
    tz: &TimeZone,
    terms: &Terms,
) -> Deadlines {
    let plus = |d: SignedDuration| detected.saturating_add(d).unwrap_or(Timestamp::MAX);
    let mut dl = Deadlines {
        respond_by: plus(terms.respond),
        onsite_by: None,
        plan_by: None,
        resolve_by: None,
    };
    match kind {
        SignalKind::Fault | SignalKind::MonitoringLost => {
            let by_class = class_deadlines(detected, effective_class(kind, class), area, terms);
            dl.onsite_by = by_class.onsite_by;
            dl.plan_by = by_class.plan_by;
            dl.resolve_by = by_class.resolve_by;
        }
        SignalKind::MaintenanceDue | SignalKind::Consumable => {
            dl.resolve_by = Some(due_deadline(detected, due, tz));
        }
    }
    dl
}

/// The deadlines a fault of `class` gets from `from`: `simple` → `resolve_by`; `complex`
/// → `onsite_by` by area and `plan_by`; `major` → `onsite_by` by area and `resolve_by`.
/// `respond_by` is `from` + the response time. Used at detection, and from the moment a
/// class rose for the deadlines the new class brings.
pub fn class_deadlines(
    from: Timestamp,
    class: FaultClass,
    area: ServiceArea,
    terms: &Terms,
) -> Deadlines {
    let plus = |d: SignedDuration| from.saturating_add(d).unwrap_or(Timestamp::MAX);
    let mut dl = Deadlines {
        respond_by: plus(terms.respond),
        onsite_by: None,
        plan_by: None,
        resolve_by: None,
    };
    match class {
        FaultClass::Simple => dl.resolve_by = Some(plus(terms.simple_fix)),
        FaultClass::Complex => {
            dl.onsite_by = Some(plus(terms.onsite_within(area)));
            dl.plan_by = Some(plus(terms.complex_plan));
        }
        FaultClass::Major => {
            dl.onsite_by = Some(plus(terms.onsite_within(area)));
            dl.resolve_by = Some(plus(terms.major_fix));
        }
    }
    dl
}

/// The deadlines after a fault's class rose at `rose_at`: the new class's deadlines,
/// counted from the moment it rose, except that a promise already made is never
/// loosened: where the ticket already has a deadline of a kind the new class also has,
/// the earlier of the two stands (so a class that falls and rises again cannot push a
/// deadline out). The response time stays as it was. A deadline the new class does not
/// have no longer applies.
pub fn escalated_deadlines(
    old: &Deadlines,
    rose_at: Timestamp,
    class: FaultClass,
    area: ServiceArea,
    terms: &Terms,
) -> Deadlines {
    let new = class_deadlines(rose_at, class, area, terms);
    let keep = |o: Option<Timestamp>, n: Option<Timestamp>| match (o, n) {
        (Some(o), Some(n)) => Some(o.min(n)),
        (_, n) => n,
    };
    Deadlines {
        respond_by: old.respond_by,
        onsite_by: keep(old.onsite_by, new.onsite_by),
        plan_by: keep(old.plan_by, new.plan_by),
        resolve_by: keep(old.resolve_by, new.resolve_by),
    }
}

fn due_deadline(detected: Timestamp, due: Option<&str>, tz: &TimeZone) -> Timestamp {
    let overdue = detected
        .saturating_add(OVERDUE_RESOLVE_WITHIN)
        .unwrap_or(Timestamp::MAX);
    let Some(due) = due.map(str::trim) else {
        return overdue;
    };
    let today = detected.to_zoned(tz.clone()).date();
    if let Ok(date) = due.parse::<Date>() {
        if date <= today {
            return overdue;
        }
        return end_of_day(date, tz).unwrap_or(overdue);
    }
    match due.parse::<Timestamp>() {
        Ok(at) if at > detected => at,
        _ => overdue,
    }
}

/// 23:59:59 local on `date`.
fn end_of_day(date: Date, tz: &TimeZone) -> Option<Timestamp> {
    let next = date.checked_add(1.day()).ok()?;
    let midnight = next.to_zoned(tz.clone()).ok()?.timestamp();
    midnight.checked_sub(SignedDuration::from_secs(1)).ok()
}

/// RFC 3339 with the offset of `tz` at that instant, whole seconds
/// (`2026-11-28T11:15:02+08:00`).
pub fn rfc3339(at: Timestamp, tz: &TimeZone) -> String {
    at.to_zoned(tz.clone())
        .strftime("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

/// The `sla` object of a ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlaJson {
    pub respond_by: String,
    pub onsite_by: Option<String>,
    pub plan_by: Option<String>,
    pub resolve_by: Option<String>,
}

impl Deadlines {
    pub fn to_json(&self, tz: &TimeZone) -> SlaJson {
        let f = |t: Option<Timestamp>| t.map(|t| rfc3339(t, tz));
        SlaJson {
            respond_by: rfc3339(self.respond_by, tz),
            onsite_by: f(self.onsite_by),
            plan_by: f(self.plan_by),
            resolve_by: f(self.resolve_by),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WarrantyStatus {
    /// The free warranty (2 years from acceptance).
    InWarranty,
    /// A paid extension is in force.
    Extended,
    /// Repairs are billable: the customer accepts a quote before work starts.
    Expired,
}

impl WarrantyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WarrantyStatus::InWarranty => "in_warranty",
            WarrantyStatus::Extended => "extended",
            WarrantyStatus::Expired => "expired",
        }
    }
}

impl fmt::Display for WarrantyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `warranty` object of a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Warranty {
    pub status: WarrantyStatus,
    /// The last day of the cover that applies (for `expired`, of the latest cover).
    pub until: Date,
    pub billable: bool,
}

/// The warranty on the day (in `tz`) of `at`.
///
/// The free warranty's `until` is the acceptance date plus 2 years (accepted 2025-03-01 →
/// until 2027-03-01, as the backend's example), and like `extended_warranty_until` it is
/// read as the last day covered, inclusive: a repair on the boundary day is never billed
/// by mistake, the reading a customer holding the paper would make. The free warranty
/// wins over an extension that overlaps it.
pub fn warranty(device: &Device, at: Timestamp, tz: &TimeZone, terms: &Terms) -> Warranty {
    let day = at.to_zoned(tz.clone()).date();
    // Feb 29 + 2 years lands on Feb 28 (jiff clamps), never past the end of February.
    let free_until = device
        .accepted
        .checked_add(terms.warranty_months.months())
        .unwrap_or(Date::MAX);
    if day <= free_until {
        return Warranty {
            status: WarrantyStatus::InWarranty,
            until: free_until,
            billable: false,
        };
    }
    match device.extended_warranty_until {
        Some(ext) if day <= ext => Warranty {
            status: WarrantyStatus::Extended,
            until: ext,
            billable: false,
        },
        ext => Warranty {
            status: WarrantyStatus::Expired,
            until: ext.map_or(free_until, |e| e.max(free_until)),
            billable: true,
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClinicalImpact {
    Low,
    Medium,
    High,
}

impl ClinicalImpact {
    pub fn as_str(self) -> &'static str {
        match self {
            ClinicalImpact::Low => "low",
            ClinicalImpact::Medium => "medium",
            ClinicalImpact::High => "high",
        }
    }
}

/// `high` when the device is unavailable, `medium` for other complex or major faults,
/// `low` otherwise (the backend's rule, applied to every kind with its effective class).
pub fn clinical_impact(device_available: bool, class: FaultClass) -> ClinicalImpact {
    if !device_available {
        ClinicalImpact::High
    } else if class >= FaultClass::Complex {
        ClinicalImpact::Medium
    } else {
        ClinicalImpact::Low
    }
}
