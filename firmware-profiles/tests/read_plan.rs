//! The reads a Modbus profile plans: points with `read_every` in reads of their own, and
//! no read bridging a gap across a register the profile marks as PHI.

use std::time::Duration;
use tend_profiles::load::BUILTIN;
use tend_profiles::modbus::{ReadRequest, ScheduledRead, Table};
use tend_profiles::parse_profile;

fn builtin(name: &str) -> &'static str {
    BUILTIN.iter().find(|(n, _)| n.contains(name)).unwrap().1
}

/// `src` without the `[[table]]` blocks for which `drop` is true.
fn without(src: &str, drop: impl Fn(&str) -> bool) -> String {
    let mut parts = src.split("\n[[");
    let mut out = parts.next().unwrap().to_string();
    for p in parts.filter(|p| !drop(p)) {
        out.push_str("\n[[");
        out.push_str(p);
    }
    out
}

#[test]
fn av500_reads_its_maintenance_counters_once_a_minute_in_a_read_of_their_own() {
    for name in ["av-500-4", "av-500-5"] {
        let p = parse_profile("av.toml", builtin(name)).unwrap();
        let plan = p.scan_plan();
        let slow: Vec<&ScheduledRead> = plan.iter().filter(|s| s.every.is_some()).collect();
        assert_eq!(
            slow,
            [&ScheduledRead {
                read: ReadRequest {
                    table: Table::Holding,
                    start: 11,
                    count: 2
                },
                every: Some(Duration::from_secs(60)),
            }],
            "{name}"
        );
        // Every other point at every poll, in one read of the input registers.
        let fast: Vec<ReadRequest> = plan
            .iter()
            .filter(|s| s.every.is_none())
            .map(|s| s.read)
            .collect();
        assert_eq!(fast.len(), 1, "{name}: {fast:?}");
        assert_eq!(fast[0].table, Table::Input, "{name}");
        assert_eq!(p.read_plan().len(), 2, "{name}");
    }
}

#[test]
fn a_slow_point_a_fast_read_covers_gets_no_read_of_its_own() {
    // operating_minutes (input 4-5) read once a minute sits inside the fast input read.
    let src = builtin("av-500-5").replacen(
        "unit = \"min\"\ntable = \"input\"\naddress = 4\n",
        "unit = \"min\"\ntable = \"input\"\naddress = 4\nread_every = \"1m\"\n",
        1,
    );
    assert_ne!(src, builtin("av-500-5"));
    let p = parse_profile("av.toml", &src).unwrap();
    let plan = p.scan_plan();
    assert_eq!(plan.len(), 2, "{plan:?}");
    assert!(plan
        .iter()
        .all(|s| s.read.table == Table::Input || s.read.start == 11));
}

#[test]
fn no_planned_read_bridges_a_phi_register() {
    // A ventilator whose input register 12 is PHI: no point reads it, no diagnostic dumps
    // it, and the reads of 0-11 and 13-15 must not be joined across it.
    let src = builtin("av-500-5").replacen("id = \"aeris/av-500\"", "id = \"acme/vent\"", 1);
    let src = without(&src, |block| {
        block.starts_with("golden]]")
            || block.contains("name = \"mains\"")
            || block.contains("name = \"status-registers\"")
    });
    let open = parse_profile("vent.toml", &src).unwrap();
    let input = |p: &tend_profiles::Profile| -> Vec<(u16, u16)> {
        p.read_plan()
            .iter()
            .filter(|r| r.table == Table::Input)
            .map(|r| (r.start, r.count))
            .collect()
    };
    // Without PHI the gap at 12 is bridged (the device maps it).
    assert_eq!(input(&open), [(0, 16)]);
    let phi = parse_profile(
        "vent.toml",
        &src.replacen("phi = []", "phi = [\"input:12\"]", 1),
    )
    .unwrap();
    assert_eq!(input(&phi), [(0, 12), (13, 3)]);
}

#[test]
fn a_slow_point_sharing_registers_with_a_fast_one_is_read_at_every_poll() {
    // A u32 at input 15-16 read once a minute shares input 15 with turbine_speed, read at
    // every poll: its two words must come from one read, so it is read at every poll.
    let src = builtin("av-500-5").replacen(
        "\n[[rule]]",
        "\n[[point]]\nname = \"wide\"\ntype = \"u32\"\ntable = \"input\"\naddress = 15\nread_every = \"1m\"\n\n[[rule]]",
        1,
    );
    let p = parse_profile("av.toml", &src).unwrap();
    let plan = p.scan_plan();
    let input: Vec<&ScheduledRead> = plan
        .iter()
        .filter(|s| s.read.table == Table::Input)
        .collect();
    assert_eq!(input.len(), 1, "{plan:?}");
    assert_eq!(input[0].every, None);
    assert!(input[0].read.end() >= 17, "{plan:?}");
}

#[test]
fn identification_reads_never_bridge_a_gap() {
    // Before the firmware is known, so is the profile and its PHI: the identity registers
    // are read as they are, joined only where they touch.
    let av = parse_profile("av.toml", builtin("av-500-5")).unwrap();
    let whole = ReadRequest {
        table: Table::Holding,
        start: 0,
        count: 11,
    };
    assert_eq!(av.identify_reads(), [whole]);
    let src = without(builtin("av-500-5"), |b| b.starts_with("golden]]")).replacen(
        "serial_address = 3\nserial_registers = 8",
        "serial_address = 5\nserial_registers = 8",
        1,
    );
    let gap = parse_profile("av.toml", &src).unwrap();
    let reads: Vec<(u16, u16)> = gap
        .identify_reads()
        .iter()
        .map(|r| (r.start, r.count))
        .collect();
    assert_eq!(reads, [(0, 3), (5, 8)]);
}
