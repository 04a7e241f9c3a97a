//! The fleet file (DESIGN §4): which customer owns which site, where each device stands,
//! when it was accepted and how long its warranty runs. Tickets take the customer's name
//! and contact, the site's address and service area, and the device's serial and location
//! from here; the agent only knows the device id.
//!
//! Every error names file, line and key, like the agent's config and the profiles, so the
//! person editing the file finds the mistake without reading code.

use jiff::civil::Date;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use tend_profiles::load::toml_error;
use tend_profiles::locate::{line_of_path, KeyPath};
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
}

/// A checked fleet: every site names a known customer, every device a known site, and no
/// id (nor device serial) is used twice.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    customers: BTreeMap<String, Customer>,
    sites: BTreeMap<String, Site>,
    devices: BTreeMap<String, Device>,
}

/// A device with the site and customer it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct DeviceEntry<'a> {
    pub device: &'a Device,
    pub site: &'a Site,
    pub customer: &'a Customer,
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
        })
    }

    pub fn site(&self, id: &str) -> Option<&Site> {
        self.sites.get(id)
    }

    pub fn customer(&self, id: &str) -> Option<&Customer> {
        self.customers.get(id)
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
