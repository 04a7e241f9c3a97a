//! Modbus register knowledge without a socket: decoding register words into values (word
//! orders, NaN, ASCII), planning the fewest reads a device's request limit allows, and
//! naming exception codes.

use crate::model::Value;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// Function 0x03.
    Holding,
    /// Function 0x04.
    Input,
}

impl Table {
    pub fn function_code(self) -> u8 {
        match self {
            Table::Holding => 0x03,
            Table::Input => 0x04,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegType {
    U16,
    I16,
    U32,
    I32,
    F32,
    /// Two ASCII characters per register, high byte first, trailing spaces trimmed.
    Ascii,
}

/// Order of the two 16-bit words of a 32-bit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// "ABCD": the first register holds bits 31–16.
    #[default]
    HighFirst,
    /// "CDAB": the first register holds bits 15–0.
    LowFirst,
}

impl RegType {
    /// Registers one value occupies; `ascii_len` is the register count for ASCII.
    pub fn width(self, ascii_len: u16) -> u16 {
        match self {
            RegType::U16 | RegType::I16 => 1,
            RegType::U32 | RegType::I32 | RegType::F32 => 2,
            RegType::Ascii => ascii_len,
        }
    }
}

fn join32(words: &[u16], order: WordOrder) -> u32 {
    let (hi, lo) = match order {
        WordOrder::HighFirst => (words[0], words[1]),
        WordOrder::LowFirst => (words[1], words[0]),
    };
    ((hi as u32) << 16) | lo as u32
}

/// Decodes `words` (exactly the value's width) into a value. NaN stays NaN: a failed
/// sensor is evidence, not a number.
pub fn decode(ty: RegType, order: WordOrder, words: &[u16]) -> Option<Value> {
    let need = match ty {
        RegType::Ascii => words.len().max(1),
        other => other.width(0) as usize,
    };
    if words.len() != need {
        return None;
    }
    Some(match ty {
        RegType::U16 => Value::Num(words[0] as f64),
        RegType::I16 => Value::Num(words[0] as i16 as f64),
        RegType::U32 => Value::Num(join32(words, order) as f64),
        RegType::I32 => Value::Num(join32(words, order) as i32 as f64),
        RegType::F32 => Value::Num(f32_to_f64_shortest(f32::from_bits(join32(words, order)))),
        RegType::Ascii => {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            let text: String = bytes
                .iter()
                .map(|&b| {
                    if (0x20..=0x7E).contains(&b) {
                        b as char
                    } else {
                        ' '
                    }
                })
                .collect();
            Value::Text(text.trim_end().to_string())
        }
    })
}

/// Widens an f32 to the f64 with the same shortest decimal form, so 1.2 psi reads as 1.2
/// and not 1.2000000476837158.
fn f32_to_f64_shortest(x: f32) -> f64 {
    if !x.is_finite() {
        return x as f64;
    }
    x.to_string().parse().unwrap_or(x as f64)
}

/// One read request: table, first address, register count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadRequest {
    pub table: Table,
    pub start: u16,
    pub count: u16,
}

impl ReadRequest {
    pub fn end(&self) -> u32 {
        self.start as u32 + self.count as u32
    }
}

/// A range of addresses the device serves (reading across an unmapped address is an
/// exception on most devices, so reads may only bridge gaps inside these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappedRange {
    pub table: Table,
    pub from: u16,
    /// Inclusive.
    pub to: u16,
}

/// Plans the fewest reads covering every `(table, address, width)` span with at most
/// `max_registers` per request, bridging gaps only inside a mapped range.
pub fn plan_reads(
    spans: &[(Table, u16, u16)],
    max_registers: u16,
    mapped: &[MappedRange],
) -> Vec<ReadRequest> {
    let mut sorted: Vec<(Table, u32, u32)> = spans
        .iter()
        .filter(|s| s.2 > 0)
        .map(|&(t, a, w)| (t, a as u32, a as u32 + w as u32))
        .collect();
    sorted.sort();
    let bridgeable = |t: Table, from: u32, to: u32| {
        from >= to
            || mapped
                .iter()
                .any(|m| m.table == t && m.from as u32 <= from && to <= m.to as u32 + 1)
    };
    let mut out: Vec<ReadRequest> = Vec::new();
    for (t, a, e) in sorted {
        if let Some(last) = out.last_mut() {
            if last.table == t && a < last.end() && e <= last.end() {
                continue; // already covered
            }
            let start = last.start as u32;
            if last.table == t && e - start <= max_registers as u32 && bridgeable(t, last.end(), a)
            {
                last.count = (e.max(last.end()) - start) as u16;
                continue;
            }
        }
        out.push(ReadRequest {
            table: t,
            start: a as u16,
            count: (e - a) as u16,
        });
    }
    out
}

/// `mapped` with the register ranges in `holes` (a device's PHI) cut out, so a read
/// planned inside what remains never bridges a gap across them.
pub fn carve(mapped: &[MappedRange], holes: &[(Table, u16, u16)]) -> Vec<MappedRange> {
    let mut out: Vec<MappedRange> = mapped.to_vec();
    for &(table, from, to) in holes {
        out = out
            .into_iter()
            .flat_map(|m| {
                if m.table != table || to < m.from || m.to < from {
                    return vec![m];
                }
                let mut parts = Vec::new();
                if m.from < from {
                    parts.push(MappedRange { to: from - 1, ..m });
                }
                if to < m.to {
                    parts.push(MappedRange { from: to + 1, ..m });
                }
                parts
            })
            .collect();
    }
    out
}

/// One read of a poll plan and how often it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledRead {
    pub read: ReadRequest,
    /// `None`: at every poll. Otherwise at most this often (`read_every` of its points).
    pub every: Option<Duration>,
}

/// The reads of one unit across polls: which are due, and the registers answered so far.
/// A read with `every` is made at the first poll and then once that long has passed; in
/// between, its last answer stands in the image. The owner forgets every answer when a
/// poll fails and when the unit is identified again (a swapped device), so nothing of
/// another device or from before a silence is decoded as new.
/// Pure: the caller says what time it is.
#[derive(Debug, Clone)]
pub struct Scan {
    plan: Vec<ScheduledRead>,
    /// When each read of `plan` was last answered in this run of good polls.
    answered: Vec<Option<Instant>>,
    image: RegisterImage,
}

impl Scan {
    pub fn new(plan: Vec<ScheduledRead>) -> Self {
        let answered = vec![None; plan.len()];
        Self {
            plan,
            answered,
            image: RegisterImage::new(),
        }
    }

    /// The reads due at `now`, by their index in the plan.
    pub fn due(&self, now: Instant) -> Vec<(usize, ReadRequest)> {
        self.plan
            .iter()
            .zip(&self.answered)
            .enumerate()
            .filter(|(_, (s, last))| match (s.every, last) {
                (None, _) | (_, None) => true,
                (Some(every), Some(at)) => now.saturating_duration_since(*at) >= every,
            })
            .map(|(i, (s, _))| (i, s.read))
            .collect()
    }

    /// Read `i` of the plan was answered with `words` at `now`.
    pub fn answer(&mut self, i: usize, words: &[u16], now: Instant) {
        if let (Some(s), Some(at)) = (self.plan.get(i), self.answered.get_mut(i)) {
            self.image.insert(s.read.table, s.read.start, words);
            *at = Some(now);
        }
    }

    /// A poll failed: every read is due again and no earlier answer is kept.
    pub fn forget(&mut self) {
        self.answered.iter_mut().for_each(|a| *a = None);
        self.image = RegisterImage::new();
    }

    /// Every register answered since the last failure.
    pub fn image(&self) -> &RegisterImage {
        &self.image
    }
}

/// Registers read in one poll, by table and address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterImage {
    pub words: BTreeMap<(Table, u16), u16>,
}

impl RegisterImage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores the answer to one read.
    pub fn insert(&mut self, table: Table, start: u16, words: &[u16]) {
        for (i, w) in words.iter().enumerate() {
            if let Some(addr) = start.checked_add(i as u16) {
                self.words.insert((table, addr), *w);
            }
        }
    }

    /// `count` consecutive registers, if all were read.
    pub fn get(&self, table: Table, start: u16, count: u16) -> Option<Vec<u16>> {
        (0..count)
            .map(|i| {
                start
                    .checked_add(i)
                    .and_then(|a| self.words.get(&(table, a)).copied())
            })
            .collect()
    }
}

/// Name of a Modbus exception code, for logs and diagnostics.
pub fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target failed to respond",
        _ => "unknown exception",
    }
}

/// CRC-16/MODBUS (polynomial 0xA001 reflected, initial 0xFFFF), sent low byte first.
pub fn crc16_modbus(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in bytes {
        crc ^= b as u16;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(table: Table, from: u16, to: u16) -> MappedRange {
        MappedRange { table, from, to }
    }

    #[test]
    fn carving_phi_out_of_mapped_ranges() {
        let mapped = [range(Table::Input, 0, 19), range(Table::Holding, 0, 12)];
        // Inside, at either edge, over a whole range, in the other table, outside.
        type Holes<'a> = &'a [(Table, u16, u16)];
        let cases: &[(Holes, &[MappedRange])] = &[
            (&[], &mapped),
            (
                &[(Table::Input, 13, 14)],
                &[
                    range(Table::Input, 0, 12),
                    range(Table::Input, 15, 19),
                    range(Table::Holding, 0, 12),
                ],
            ),
            (
                &[(Table::Input, 0, 0), (Table::Input, 19, 25)],
                &[range(Table::Input, 1, 18), range(Table::Holding, 0, 12)],
            ),
            (&[(Table::Holding, 0, 65535)], &[range(Table::Input, 0, 19)]),
            (&[(Table::Input, 20, 30)], &mapped),
        ];
        for (holes, want) in cases {
            assert_eq!(carve(&mapped, holes), *want, "{holes:?}");
        }
        // A plan over the carved ranges does not bridge the hole; without it, it does.
        let spans = [(Table::Input, 12, 1), (Table::Input, 14, 1)];
        let carved = carve(&mapped, &[(Table::Input, 13, 13)]);
        assert_eq!(plan_reads(&spans, 32, &carved).len(), 2);
        assert_eq!(plan_reads(&spans, 32, &mapped).len(), 1);
    }

    #[test]
    fn a_scan_reads_slow_registers_once_per_interval_and_forgets_on_failure() {
        let fast = ReadRequest {
            table: Table::Input,
            start: 0,
            count: 2,
        };
        let slow = ReadRequest {
            table: Table::Holding,
            start: 11,
            count: 2,
        };
        let mut scan = Scan::new(vec![
            ScheduledRead {
                read: fast,
                every: None,
            },
            ScheduledRead {
                read: slow,
                every: Some(Duration::from_secs(60)),
            },
        ]);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(scan.due(at(0)), vec![(0, fast), (1, slow)]);
        scan.answer(0, &[1, 2], at(0));
        scan.answer(1, &[30, 180], at(0));
        // Between reads the slow answer stands; at 60 s it is due again.
        for s in [1, 2, 59] {
            assert_eq!(scan.due(at(s)), vec![(0, fast)], "at {s} s");
            scan.answer(0, &[s as u16, 2], at(s));
        }
        assert_eq!(scan.image().get(Table::Input, 0, 2), Some(vec![59, 2]));
        assert_eq!(scan.image().get(Table::Holding, 11, 2), Some(vec![30, 180]));
        assert_eq!(scan.due(at(60)), vec![(0, fast), (1, slow)]);
        scan.answer(1, &[31, 180], at(60));
        assert_eq!(scan.image().get(Table::Holding, 11, 2), Some(vec![31, 180]));
        assert_eq!(scan.due(at(61)), vec![(0, fast)]);
        // A failed poll: nothing of before is decoded, everything is read again.
        scan.forget();
        assert_eq!(scan.image().get(Table::Holding, 11, 2), None);
        assert_eq!(scan.image().get(Table::Input, 0, 2), None);
        assert_eq!(scan.due(at(62)), vec![(0, fast), (1, slow)]);
        // An index outside the plan changes nothing.
        scan.answer(7, &[1], at(62));
        assert_eq!(scan.image(), &RegisterImage::new());
    }

    #[test]
    fn av500_u32_word_orders() {
        // AR-MB-500 §3.5: 1,966,130 minutes is 0x001E 0x0032 on 4.x, 0x0032 0x001E on 5.x.
        let v4 = decode(RegType::U32, WordOrder::HighFirst, &[0x001E, 0x0032]).unwrap();
        let v5 = decode(RegType::U32, WordOrder::LowFirst, &[0x0032, 0x001E]).unwrap();
        assert_eq!(v4, Value::Num(1_966_130.0));
        assert_eq!(v5, Value::Num(1_966_130.0));
    }

    #[test]
    fn hm2_float_orders() {
        // CS-HM2-MB §2.1.
        let cases: &[(f64, [u16; 2])] = &[
            (71.5, [0x428F, 0x0000]),
            (1.2, [0x3F99, 0x999A]),
            (4.2, [0x4086, 0x6666]),
        ];
        for (want, abcd) in cases {
            let cdab = [abcd[1], abcd[0]];
            for (order, w) in [(WordOrder::HighFirst, abcd), (WordOrder::LowFirst, &cdab)] {
                let got = decode(RegType::F32, order, w).unwrap().as_f64().unwrap();
                assert_eq!(got, *want, "{order:?}");
            }
        }
        let nan = decode(RegType::F32, WordOrder::HighFirst, &[0x7FC0, 0]).unwrap();
        assert!(matches!(nan, Value::Num(n) if n.is_nan()));
        let nan = decode(RegType::F32, WordOrder::LowFirst, &[0, 0x7FC0]).unwrap();
        assert!(matches!(nan, Value::Num(n) if n.is_nan()));
    }

    #[test]
    fn signed_and_ascii() {
        assert_eq!(
            decode(RegType::I16, WordOrder::HighFirst, &[0xFFF6]),
            Some(Value::Num(-10.0))
        );
        let sn: Vec<u16> = b"AV5C-21-004417  "
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(
            decode(RegType::Ascii, WordOrder::HighFirst, &sn),
            Some(Value::Text("AV5C-21-004417".into()))
        );
        assert_eq!(decode(RegType::U32, WordOrder::HighFirst, &[1]), None);
    }

    #[test]
    fn plan_coalesces_within_limit_and_map() {
        let mapped = [
            MappedRange {
                table: Table::Input,
                from: 0,
                to: 19,
            },
            MappedRange {
                table: Table::Holding,
                from: 0,
                to: 12,
            },
        ];
        let spans = [
            (Table::Input, 0, 1),
            (Table::Input, 4, 2),
            (Table::Input, 15, 1),
            (Table::Holding, 0, 3),
            (Table::Holding, 11, 2),
        ];
        let plan = plan_reads(&spans, 32, &mapped);
        assert_eq!(
            plan,
            vec![
                ReadRequest {
                    table: Table::Holding,
                    start: 0,
                    count: 13
                },
                ReadRequest {
                    table: Table::Input,
                    start: 0,
                    count: 16
                },
            ]
        );
        // A limit of 8 splits the input block.
        let plan = plan_reads(&spans, 8, &mapped);
        assert!(plan.iter().all(|r| r.count <= 8));
        assert_eq!(plan.len(), 4);
        // Without a map only touching spans merge.
        let plan = plan_reads(&spans, 32, &[]);
        assert_eq!(plan.len(), 5);
    }

    #[test]
    fn plan_never_exceeds_limit_exhaustive() {
        for limit in 1..=10u16 {
            let spans: Vec<_> = (0..30).map(|a| (Table::Input, a, 1 + (a % 2))).collect();
            let mapped = [MappedRange {
                table: Table::Input,
                from: 0,
                to: 40,
            }];
            let plan = plan_reads(&spans, limit.max(2), &mapped);
            for (t, a, w) in &spans {
                assert!(plan
                    .iter()
                    .any(|r| r.table == *t && r.start <= *a && (*a + *w) as u32 <= r.end()));
            }
            assert!(plan.iter().all(|r| r.count <= limit.max(2)));
        }
    }

    #[test]
    fn modbus_crc() {
        // Read 2 holding registers from unit 1 at 0: 01 03 00 00 00 02 -> C4 0B.
        assert_eq!(crc16_modbus(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x02]), 0x0BC4);
    }
}
