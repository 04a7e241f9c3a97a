//! Every worked example of the four manuals, decoded by the shipped profiles exactly as
//! the manual says. The vectors live in the profiles (`[[golden]]`), so `tend-agent
//! profile check` runs them too; this test makes sure each one runs and that each
//! profile carries them.

use tend_profiles::load::{run_golden, BUILTIN};
use tend_profiles::{parse_profile, ProfileSet};

#[test]
fn every_builtin_profile_passes_its_golden_vectors() {
    let mut total = 0;
    for (name, src) in BUILTIN {
        let p = parse_profile(name, src).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            p.doc.golden.len() >= 3,
            "{name} has only {} golden vectors",
            p.doc.golden.len()
        );
        for g in &p.doc.golden {
            run_golden(&p, g).unwrap_or_else(|e| panic!("{name}: {}: {e}", g.name));
            total += 1;
        }
    }
    assert!(total >= 40, "only {total} golden vectors");
}

#[test]
fn a_broken_vector_is_caught() {
    // The same profile with one expectation changed must fail to load, naming the vector.
    let (name, src) = BUILTIN
        .iter()
        .find(|(n, _)| n.contains("av-500-5"))
        .unwrap();
    let bad = src.replacen(
        "signals = [\"ALM1.4\", \"SAFE_STATE\"]",
        "signals = [\"ALM1.4\"]",
        1,
    );
    assert_ne!(&bad, src);
    let err = parse_profile(name, &bad).unwrap_err();
    assert!(err.message.contains("exhalation valve"), "{err}");
    assert!(err.message.contains("SAFE_STATE"), "{err}");
    assert!(err.key.starts_with("golden["), "{err}");
}

#[test]
fn builtin_set_selects_by_firmware() {
    let set = ProfileSet::builtin().unwrap();
    let cases = [
        ("lumen/lip-300", "2.4.1", "2.x"),
        ("lumen/lip-300", "3.1.0", "3.x"),
        ("aeris/av-500", "4.7.3", "4.x"),
        ("aeris/av-500", "5.2.0", "5.x"),
        ("vistara/vm-12", "6.9.0", "6.x"),
        ("vistara/vm-12", "7.4.2", "7.x"),
        ("cryosense/hm-2", "2.5", "2.x"),
        ("cryosense/hm-2", "3.5", "3.x"),
    ];
    for (model, fw, family) in cases {
        let p = set.select(model, fw).unwrap();
        assert_eq!(p.doc.device.firmware, family, "{model} {fw}");
    }
    let err = set.select("aeris/av-500", "6.0.1").unwrap_err().to_string();
    assert!(err.contains("6.0.1") && err.contains("4.x, 5.x"), "{err}");
    let err = set
        .select("aeris/av-500", "garbage")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no profile covers"), "{err}");
    let err = set.select("acme/x", "1.0").unwrap_err().to_string();
    assert!(
        err.contains("acme/x") && err.contains("aeris/av-500"),
        "{err}"
    );
}
