//! What the vendors' manuals declare, compiled in: the fields each model sends that are
//! personal health information, and the requests that only read.
//!
//! A profile states its own `device.phi` and its requests, but a profile that leaves a
//! field out must not escape the check: for a model listed here the loader checks a
//! profile against the manual's list as well (see `load`), and the agent strips the
//! manual's PHI fields from every diagnostic answer. Profiles for models not listed here
//! are checked against their own `device.phi` only.
//!
//! Written from the manuals themselves (document and section in each entry); nothing is
//! read from files at run time.

/// Personal health information one manual section names, for some firmware families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhiFields {
    /// Firmware major versions the section covers; empty for every firmware.
    pub firmware: &'static [u32],
    /// Field names as the device sends them: serial keys, JSON object keys (a key names
    /// the whole value under it, e.g. `patient` covers `patient.mrn`).
    pub fields: &'static [&'static str],
    /// The manual and section that name them.
    pub source: &'static str,
}

/// One request a manual declares read-only, with the arguments it documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// MQTT: the `cmd` value. Serial: the request name sent after `Q|` (`STATUS`).
    pub name: &'static str,
    /// Arguments the manual documents for it (VM-12 `errlog`: `lines`); no others.
    pub args: &'static [&'static str],
}

const fn req(name: &'static str) -> Request {
    Request { name, args: &[] }
}

/// Requests a manual declares read-only, for some firmware families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOnlyRequests {
    /// Firmware major versions the list covers; empty for every firmware.
    pub firmware: &'static [u32],
    pub requests: &'static [Request],
    pub source: &'static str,
}

/// What one model's manual says about PHI and read-only requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manual {
    /// The profile's `device.id`.
    pub model: &'static str,
    pub document: &'static str,
    pub phi: &'static [PhiFields],
    /// Serial requests (sent as `Q|<name>`) or MQTT commands; empty for a Modbus device,
    /// whose reads are the register tables themselves.
    pub read_only: &'static [ReadOnlyRequests],
}

/// The four manuals tend was written from.
pub const MANUALS: &[Manual] = &[
    Manual {
        model: "lumen/lip-300",
        document: "LM-SDI-300 rev F",
        phi: &[PhiFields {
            firmware: &[],
            // §5 STATUS: "PID: patient identifier entered by the nurse ... Personal
            // health information: it must never leave the bedside."
            fields: &["PID"],
            source: "LM-SDI-300 rev F §5",
        }],
        read_only: &[ReadOnlyRequests {
            firmware: &[],
            // §3 Requests; the interface "is read-only" (preamble), SELFTEST "does not
            // start a test".
            requests: &[req("INFO"), req("STATUS"), req("COUNTERS"), req("SELFTEST")],
            source: "LM-SDI-300 rev F §3",
        }],
    },
    Manual {
        model: "vistara/vm-12",
        document: "VS-IOT-12 issue 3",
        phi: &[
            PhiFields {
                firmware: &[7],
                // §2 status/2: "patient, vitals: personal health information. It must
                // never leave the bedside".
                fields: &["patient", "vitals"],
                source: "VS-IOT-12 issue 3 §2",
            },
            PhiFields {
                firmware: &[6],
                // §3 status/1: "`pt_name`, `pt_id` and `hr` are personal health
                // information, as above."
                fields: &["pt_name", "pt_id", "hr"],
                source: "VS-IOT-12 issue 3 §3",
            },
        ],
        read_only: &[ReadOnlyRequests {
            // §5 "Commands (firmware 7.x)": selftest and errlog, "Both are read-only and
            // safe during monitoring". Firmware 6.x has no commands.
            firmware: &[7],
            requests: &[
                req("selftest"),
                Request {
                    name: "errlog",
                    args: &["lines"],
                },
            ],
            source: "VS-IOT-12 issue 3 §5",
        }],
    },
    Manual {
        // AR-MB-500 rev 7 names no personal health information: the register map
        // (§2, §3) is device data only; §1: function codes 0x03 and 0x04, every write
        // refused.
        model: "aeris/av-500",
        document: "AR-MB-500 rev 7",
        phi: &[],
        read_only: &[],
    },
    Manual {
        // CS-HM2-MB v3.2 names no personal health information (§2: cryogen data);
        // §1: function code 0x03 only, registers read-only.
        model: "cryosense/hm-2",
        document: "CS-HM2-MB v3.2",
        phi: &[],
        read_only: &[],
    },
];

/// The manual of a model (`device.id`), if tend knows it.
pub fn manual(model: &str) -> Option<&'static Manual> {
    MANUALS.iter().find(|m| m.model == model)
}

fn covers(families: &[u32], major: Option<u32>) -> bool {
    match major {
        Some(m) => families.is_empty() || families.contains(&m),
        // A firmware family the manual does not describe: every list applies.
        None => true,
    }
}

impl Manual {
    /// The PHI fields the manual names for one firmware family (every family's when
    /// `major` is `None` or the manual does not describe it), each with its source.
    pub fn phi_for(&self, major: Option<u32>) -> Vec<(&'static str, &'static str)> {
        let described = major.filter(|m| {
            self.phi
                .iter()
                .any(|p| p.firmware.is_empty() || p.firmware.contains(m))
        });
        self.phi
            .iter()
            .filter(|p| covers(p.firmware, described))
            .flat_map(|p| p.fields.iter().map(|f| (*f, p.source)))
            .collect()
    }

    /// Every PHI field the manual names for any firmware of the model. A field is
    /// never read and always stripped whatever the firmware: a name that is a patient's
    /// on one firmware is not trusted on the next.
    pub fn phi_any_firmware(&self) -> Vec<&'static str> {
        self.phi_for(None).into_iter().map(|(f, _)| f).collect()
    }

    /// The requests the manual declares read-only for one firmware family (none when it
    /// declares none for it), and where it says so.
    pub fn read_only_for(&self, major: u32) -> (Vec<Request>, Option<&'static str>) {
        let lists: Vec<_> = self
            .read_only
            .iter()
            .filter(|r| covers(r.firmware, Some(major)))
            .collect();
        (
            lists
                .iter()
                .flat_map(|r| r.requests.iter().copied())
                .collect(),
            lists.first().map(|r| r.source),
        )
    }
}

/// The PHI fields of a model for every firmware: the manual's, or none for a model tend
/// does not know (its profile's `device.phi` then stands alone).
pub fn phi_fields(model: &str) -> Vec<&'static str> {
    manual(model)
        .map(Manual::phi_any_firmware)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm12_phi_follows_the_firmware_family() {
        let m = manual("vistara/vm-12").unwrap();
        let f7: Vec<_> = m.phi_for(Some(7)).into_iter().map(|f| f.0).collect();
        assert_eq!(f7, ["patient", "vitals"]);
        let f6: Vec<_> = m.phi_for(Some(6)).into_iter().map(|f| f.0).collect();
        assert_eq!(f6, ["pt_name", "pt_id", "hr"]);
        // An undescribed firmware gets every list.
        assert_eq!(m.phi_for(Some(9)).len(), 5);
        assert_eq!(phi_fields("vistara/vm-12").len(), 5);
        assert_eq!(phi_fields("lumen/lip-300"), ["PID"]);
        assert!(phi_fields("someone/else").is_empty());
    }

    #[test]
    fn vm12_commands_exist_on_7x_only() {
        let m = manual("vistara/vm-12").unwrap();
        let names = |m: &Manual, major| -> Vec<&str> {
            m.read_only_for(major).0.iter().map(|r| r.name).collect()
        };
        assert_eq!(names(m, 7), ["selftest", "errlog"]);
        assert!(names(m, 6).is_empty());
        assert_eq!(
            names(manual("lumen/lip-300").unwrap(), 2),
            ["INFO", "STATUS", "COUNTERS", "SELFTEST"]
        );
    }
}
