//! The fleet file (DESIGN §4): which customer owns which site, where each device stands,
//! when it was accepted and how long its warranty runs. Tickets take the customer's name
//! and contact, the site's address and service area, and the device's serial and location
//! from here; the agent only knows the device id.
//!
//! Every error names file, line and key, like the agent's config and the profiles, so the
//! person editing the file finds the mistake without reading code.

use crate::sla::Terms;
use jiff::civil::Date;
use jiff::SignedDuration;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use tend_profiles::load::toml_error;
use tend_profiles::locate::{line_of_path, KeyPath};
use tend_profiles::units::Dur;
use tend_profiles::ProfileError;

/// A fleet file that cannot be used, and where it says so (file, line, key, message).
pub type FleetError = ProfileError;

/// How far an engineer travels to a site; it sets the on-site deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceArea {
    /// On site within 3 h.
    SameCity,
    /// On site within 24 h.
    OtherCity,
    /// On site within 48 h.
    Remote,
}

impl ServiceArea {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceArea::SameCity => "same_city",
            ServiceArea::OtherCity => "other_city",
            ServiceArea::Remote => "remote",
        }
    }
}

impl fmt::Display for ServiceArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Customer {
    pub id: String,
    pub name: String,
    pub contact_name: String,
    pub contact_phone: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub id: String,
    /// The owning customer's id.
    pub customer: String,
    pub name: String,
    pub address: String,
    pub service_area: ServiceArea,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// The id the agent's config uses for this device.
    pub id: String,
    /// The site's id.
    pub site: String,
    /// The serial on the contract; it wins over the one the device reports, because the
    /// contract is what the service organisation files the ticket under.
    pub serial: String,
    /// Where in the site the device stands ("ICU bed 7").
    pub location: String,
    /// Acceptance date: the free warranty runs 2 years from it.
    #[serde(deserialize_with = "date")]
    pub accepted: Date,
    /// Last day of a paid warranty extension, if any.
    #[serde(default, deserialize_with = "opt_date")]
    pub extended_warranty_until: Option<Date>,
    /// Optional overrides of what the agent's Identity record and the profile say; useful
    /// for a device whose agent has not reported yet.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub vendor: Option<String>,
    /// The contract this device is serviced under (a `[[contract]]` id); else its
    /// customer's contract in force, else the seed's terms.
    #[serde(default)]
    pub contract: Option<String>,
    /// The last preventive maintenance done before tend kept the record (an installation
    /// taking over a fleet): the next one counts from it, not from acceptance.
    #[serde(default, deserialize_with = "opt_date")]
    pub last_maintenance: Option<Date>,
}

/// A service contract as the fleet file writes it: every term optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContractDoc {
    id: String,
    #[serde(default)]
    customer: Option<String>,
    #[serde(default, deserialize_with = "opt_date")]
    start: Option<Date>,
    #[serde(default, deserialize_with = "opt_date")]
    end: Option<Date>,
    #[serde(default)]
    availability_target: Option<f64>,
    #[serde(default)]
    warranty_months: Option<i64>,
    #[serde(default)]
    respond: Option<String>,
    #[serde(default)]
    onsite: Option<OnsiteDoc>,
    #[serde(default)]
    simple_fix: Option<String>,
    #[serde(default)]
    complex_plan: Option<String>,
    #[serde(default)]
    major_fix: Option<String>,
    #[serde(default)]
    pm_interval_days: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnsiteDoc {
    #[serde(default)]
    same_city: Option<String>,
    #[serde(default)]
    other_city: Option<String>,
    #[serde(default)]
    remote: Option<String>,
}

/// A service contract: whose it is, when it is in force (both ends inclusive, either may
/// be open) and its terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Contract {
    pub id: String,
    /// The customer it covers (all of that customer's devices that name no contract).
    pub customer: Option<String>,
    pub start: Option<Date>,
    pub end: Option<Date>,
    pub terms: Terms,
}

impl Contract {
    /// Whether the contract is in force on `day`.
    pub fn covers(&self, day: Date) -> bool {
        self.start.is_none_or(|s| s <= day) && self.end.is_none_or(|e| day <= e)
    }
}

/// TOML lets a date be written bare (`2025-03-01`) or quoted (`"2025-03-01"`, as DESIGN §4
/// shows); both mean the same day.
fn date<'de, D: Deserializer<'de>>(d: D) -> Result<Date, D::Error> {
    let v = toml::Value::deserialize(d)?;
    let text = match &v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Datetime(dt) if dt.time.is_none() && dt.offset.is_none() => dt.to_string(),
        other => {
            return Err(serde::de::Error::custom(format!(
                "expected a date like \"2025-03-01\", found {other}"
            )))
        }
    };
    text.parse::<Date>().map_err(|e| {
        serde::de::Error::custom(format!(
            "expected a date like \"2025-03-01\", found {text:?}: {e}"
        ))
    })
}

fn opt_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Date>, D::Error> {
    date(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetDoc {
    #[serde(rename = "customer", default)]
    customers: Vec<Customer>,
    #[serde(rename = "site", default)]
    sites: Vec<Site>,
    #[serde(rename = "device", default)]
    devices: Vec<Device>,
    #[serde(rename = "contract", default)]
    contracts: Vec<ContractDoc>,
}

/// A checked fleet: every site names a known customer, every device a known site, and no
/// id (nor device serial) is used twice.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    customers: BTreeMap<String, Customer>,
    sites: BTreeMap<String, Site>,
    devices: BTreeMap<String, Device>,
    contracts: BTreeMap<String, Contract>,
}

/// A device with the site and customer it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct DeviceEntry<'a> {
    pub device: &'a Device,
    pub site: &'a Site,
    pub customer: &'a Customer,
    contracts: &'a BTreeMap<String, Contract>,
}

impl<'a> DeviceEntry<'a> {
    /// The contract in force for this device on `day`: the one it names, when in force
    /// then; else its customer's contract in force then; else none (the seed's terms).
    pub fn contract_on(&self, day: Date) -> Option<&'a Contract> {
        if let Some(c) = self
            .device
            .contract
            .as_deref()
            .and_then(|id| self.contracts.get(id))
        {
            if c.covers(day) {
                return Some(c);
            }
        }
        customer_contract_on(self.contracts, &self.customer.id, day)
    }

    /// The terms that apply to this device on `day`.
    pub fn terms_on(&self, day: Date) -> Terms {
        self.contract_on(day).map_or(Terms::SEED, |c| c.terms)
    }

    /// The terms that apply at the instant `at`, whose day is taken in `tz`.
    pub fn terms_at(&self, at: jiff::Timestamp, tz: &jiff::tz::TimeZone) -> Terms {
        self.terms_on(at.to_zoned(tz.clone()).date())
    }
}

impl Fleet {
    /// Reads and checks a fleet file.
    pub fn load(path: &Path) -> Result<Fleet, FleetError> {
        let (file, src) = tend_profiles::load::read_text(path)?;
        Fleet::parse(&file, &src)
    }

    /// Parses and checks fleet text; `file` names it in errors.
    pub fn parse(file: &str, src: &str) -> Result<Fleet, FleetError> {
        let doc: FleetDoc = toml::from_str(src).map_err(|e| toml_error(file, src, &e))?;
        let err = |path: &KeyPath, message: String| ProfileError {
            file: file.to_string(),
            line: line_of_path(src, path),
            key: path.to_string(),
            message,
        };
        let root = KeyPath::root();
        let mut fleet = Fleet::default();

        for (i, c) in doc.customers.into_iter().enumerate() {
            let p = root.key("customer").index(i);
            check_id(&c.id).map_err(|m| err(&p.key("id"), m.to_string()))?;
            if fleet.customers.contains_key(&c.id) {
                return Err(err(
                    &p.key("id"),
                    format!("customer {:?} is listed twice", c.id),
                ));
            }
            fleet.customers.insert(c.id.clone(), c);
        }

        for (i, s) in doc.sites.into_iter().enumerate() {
            let p = root.key("site").index(i);
            check_id(&s.id).map_err(|m| err(&p.key("id"), m.to_string()))?;
            if fleet.sites.contains_key(&s.id) {
                return Err(err(
                    &p.key("id"),
                    format!("site {:?} is listed twice", s.id),
                ));
            }
            if !fleet.customers.contains_key(&s.customer) {
                return Err(err(
                    &p.key("customer"),
                    format!("no [[customer]] has id {:?}", s.customer),
                ));
            }
            fleet.sites.insert(s.id.clone(), s);
        }

        for (i, c) in doc.contracts.into_iter().enumerate() {
            let p = root.key("contract").index(i);
            let contract = check_contract(c, &p, &fleet).map_err(|(path, m)| err(&path, m))?;
            fleet.contracts.insert(contract.id.clone(), contract);
        }

        let mut serials = BTreeSet::new();
        for (i, d) in doc.devices.into_iter().enumerate() {
            let p = root.key("device").index(i);
            check_id(&d.id).map_err(|m| err(&p.key("id"), m.to_string()))?;
            if fleet.devices.contains_key(&d.id) {
                return Err(err(
                    &p.key("id"),
                    format!("device {:?} is listed twice", d.id),
                ));
            }
            if !fleet.sites.contains_key(&d.site) {
                return Err(err(
                    &p.key("site"),
                    format!("no [[site]] has id {:?}", d.site),
                ));
            }
            if d.serial.trim().is_empty() {
                return Err(err(&p.key("serial"), "must not be empty".into()));
            }
            // One record per device for its whole life: two entries with one serial would
            // split that record.
            if !serials.insert(d.serial.clone()) {
                return Err(err(
                    &p.key("serial"),
                    format!("serial {:?} is already another device's", d.serial),
                ));
            }
            if let Some(ext) = d.extended_warranty_until {
                if ext < d.accepted {
                    return Err(err(
                        &p.key("extended_warranty_until"),
                        format!("{ext} is before the acceptance date {}", d.accepted),
                    ));
                }
            }
            if let Some(m) = d.last_maintenance {
                if m < d.accepted {
                    return Err(err(
                        &p.key("last_maintenance"),
                        format!("{m} is before the acceptance date {}", d.accepted),
                    ));
                }
            }
            if let Some(k) = &d.contract {
                let Some(c) = fleet.contracts.get(k) else {
                    return Err(err(
                        &p.key("contract"),
                        format!("no [[contract]] has id {k:?}"),
                    ));
                };
                let owner = fleet.sites.get(&d.site).map(|s| s.customer.as_str());
                if let (Some(cc), Some(owner)) = (c.customer.as_deref(), owner) {
                    if cc != owner {
                        return Err(err(
                            &p.key("contract"),
                            format!(
                                "contract {k:?} is customer {cc:?}'s, but site {:?} belongs to {owner:?}",
                                d.site
                            ),
                        ));
                    }
                }
            }
            fleet.devices.insert(d.id.clone(), d);
        }
        Ok(fleet)
    }

    /// The device with its site and customer.
    pub fn device(&self, id: &str) -> Option<DeviceEntry<'_>> {
        let device = self.devices.get(id)?;
        // Both lookups hold by construction (parse checks them).
        let site = self.sites.get(&device.site)?;
        let customer = self.customers.get(&site.customer)?;
        Some(DeviceEntry {
            device,
            site,
            customer,
            contracts: &self.contracts,
        })
    }

    pub fn site(&self, id: &str) -> Option<&Site> {
        self.sites.get(id)
    }

    pub fn customer(&self, id: &str) -> Option<&Customer> {
        self.customers.get(id)
    }

    /// Every customer, by id.
    pub fn customers(&self) -> impl Iterator<Item = &Customer> {
        self.customers.values()
    }

    pub fn contract(&self, id: &str) -> Option<&Contract> {
        self.contracts.get(id)
    }

    /// Every contract, by id.
    pub fn contracts(&self) -> impl Iterator<Item = &Contract> {
        self.contracts.values()
    }

    /// The contract of `customer` in force on `day`, if any.
    pub fn customer_contract_on(&self, customer: &str, day: Date) -> Option<&Contract> {
        customer_contract_on(&self.contracts, customer, day)
    }

    /// Every device, by id.
    pub fn devices(&self) -> impl Iterator<Item = DeviceEntry<'_>> {
        self.devices.keys().filter_map(|id| self.device(id))
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

/// The contract of `customer` in force on `day` (periods of one customer never overlap).
fn customer_contract_on<'a>(
    contracts: &'a BTreeMap<String, Contract>,
    customer: &str,
    day: Date,
) -> Option<&'a Contract> {
    contracts
        .values()
        .find(|c| c.customer.as_deref() == Some(customer) && c.covers(day))
}

/// What is wrong with a customer, site or device id (the caller names the key).
#[derive(Debug, thiserror::Error)]
enum BadId {
    #[error("must not be empty")]
    Empty,
    #[error("{0:?} has leading or trailing spaces")]
    Padded(String),
}

fn check_id(id: &str) -> Result<(), BadId> {
    if id.trim().is_empty() {
        Err(BadId::Empty)
    } else if id.trim() != id {
        Err(BadId::Padded(id.to_string()))
    } else {
        Ok(())
    }
}

/// A contract's term that cannot be used: the key path and why.
type ContractFault = (KeyPath, String);

/// Checks one `[[contract]]`: a unique id, a known customer, an ordered period that
/// overlaps no other contract of the same customer (which one applied would be a guess),
/// positive durations, a target in (0, 1], a sane warranty and maintenance interval.
fn check_contract(c: ContractDoc, p: &KeyPath, fleet: &Fleet) -> Result<Contract, ContractFault> {
    let at = |k: &str| p.key(k);
    check_id(&c.id).map_err(|m| (at("id"), m.to_string()))?;
    if fleet.contracts.contains_key(&c.id) {
        return Err((at("id"), format!("contract {:?} is listed twice", c.id)));
    }
    if let Some(cu) = &c.customer {
        if !fleet.customers.contains_key(cu) {
            return Err((at("customer"), format!("no [[customer]] has id {cu:?}")));
        }
    }
    if let (Some(s), Some(e)) = (c.start, c.end) {
        if e < s {
            return Err((at("end"), format!("{e} is before the start {s}")));
        }
    }
    let mut terms = Terms::SEED;
    let dur = |key: KeyPath, text: &Option<String>, slot: &mut SignedDuration| {
        if let Some(t) = text {
            *slot = positive_duration(t).map_err(|m| (key, m))?;
        }
        Ok::<(), ContractFault>(())
    };
    dur(at("respond"), &c.respond, &mut terms.respond)?;
    if let Some(o) = &c.onsite {
        let op = at("onsite");
        dur(
            op.key("same_city"),
            &o.same_city,
            &mut terms.onsite_same_city,
        )?;
        dur(
            op.key("other_city"),
            &o.other_city,
            &mut terms.onsite_other_city,
        )?;
        dur(op.key("remote"), &o.remote, &mut terms.onsite_remote)?;
    }
    dur(at("simple_fix"), &c.simple_fix, &mut terms.simple_fix)?;
    dur(at("complex_plan"), &c.complex_plan, &mut terms.complex_plan)?;
    dur(at("major_fix"), &c.major_fix, &mut terms.major_fix)?;
    if let Some(t) = c.availability_target {
        if !(t > 0.0 && t <= 1.0) {
            return Err((
                at("availability_target"),
                format!("{t} is not a fraction in (0, 1] (99.5 % is 0.995)"),
            ));
        }
        terms.availability_target = t;
    }
    if let Some(m) = c.warranty_months {
        terms.warranty_months = i32::try_from(m)
            .ok()
            .filter(|m| (0..=1200).contains(m))
            .ok_or_else(|| {
                (
                    at("warranty_months"),
                    format!("{m} is not 0 to 1200 months"),
                )
            })?;
    }
    if let Some(d) = c.pm_interval_days {
        terms.pm_interval_days = u32::try_from(d)
            .ok()
            .filter(|d| (1..=3660).contains(d))
            .ok_or_else(|| (at("pm_interval_days"), format!("{d} is not 1 to 3660 days")))?;
    }
    let contract = Contract {
        id: c.id,
        customer: c.customer,
        start: c.start,
        end: c.end,
        terms,
    };
    if let Some(other) = fleet.contracts.values().find(|o| {
        o.customer.is_some()
            && o.customer == contract.customer
            && o.start.is_none_or(|s| contract.end.is_none_or(|e| s <= e))
            && contract.start.is_none_or(|s| o.end.is_none_or(|e| s <= e))
    }) {
        return Err((
            at("start"),
            format!(
                "its period overlaps contract {:?} of the same customer: which one applies would be a guess",
                other.id
            ),
        ));
    }
    Ok(contract)
}

/// A contract duration: `"1h"`, `"90m"`, `"3d"`; zero and negative ones are refused.
fn positive_duration(text: &str) -> Result<SignedDuration, String> {
    if text.trim_start().starts_with('-') {
        return Err(format!(
            "{text:?} is negative: a deadline is a time to come"
        ));
    }
    let d = Dur::parse(text).map_err(|e| e.to_string())?;
    if d.0.is_zero() {
        return Err(format!("{text:?} is zero: no one can keep that promise"));
    }
    SignedDuration::try_from(d.0).map_err(|_| format!("{text:?} is out of range"))
}
