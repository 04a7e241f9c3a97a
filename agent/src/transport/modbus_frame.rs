//! The Modbus frames the agent sends and the replies it accepts, for Modbus TCP (MBAP
//! header) and Modbus RTU (unit, PDU, CRC-16). Pure: no I/O, so every malformed reply is
//! tested here; [`super::modbus`] does the reading and writing.
//!
//! Only read requests exist (function 0x03 holding, 0x04 input registers). A link waits
//! for one reply at a time, so a reply never exceeds [`MAX_ADU`] bytes and the link's
//! buffer is that small (tokio-modbus' framing kept 8 KiB per connection, most of the
//! agent's heap with 50 endpoints).

use tend_profiles::modbus::{crc16_modbus, ReadRequest};

/// The largest Modbus ADU: 260 bytes over TCP (7-byte header, 253-byte PDU), 256 over RTU.
pub const MAX_ADU: usize = 260;

/// What came back for a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Registers(Vec<u16>),
    /// An exception reply and its code.
    Exception(u8),
}

/// The result of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The reply is not complete yet.
    Incomplete,
    /// A whole reply.
    Reply(Reply),
}

/// A reply that cannot be the answer to the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("MBAP protocol id {0} (Modbus is 0)")]
    ProtocolId(u16),
    /// MBAP length out of 2..=254, or an RTU frame over 256 bytes.
    #[error("frame length {0} out of range")]
    Length(u16),
    #[error("answer to transaction {got}, expected {expected}")]
    Transaction { got: u16, expected: u16 },
    #[error("answer from unit {got}, expected {expected}")]
    Unit { got: u8, expected: u8 },
    #[error("answer of function 0x{got:02X} to a request of 0x{expected:02X}")]
    Function { got: u8, expected: u8 },
    #[error("{got} data bytes for {count} registers")]
    ByteCount { got: usize, count: u16 },
    #[error("CRC 0x{got:04X}, computed 0x{computed:04X}")]
    Crc { got: u16, computed: u16 },
}

fn pdu(req: ReadRequest) -> [u8; 5] {
    let [sh, sl] = req.start.to_be_bytes();
    let [ch, cl] = req.count.to_be_bytes();
    [req.table.function_code(), sh, sl, ch, cl]
}

/// A Modbus TCP read request: MBAP header (transaction, protocol 0, length 6, unit) + PDU.
pub fn tcp_request(transaction: u16, unit: u8, req: ReadRequest) -> [u8; 12] {
    let [th, tl] = transaction.to_be_bytes();
    let p = pdu(req);
    [th, tl, 0, 0, 0, 6, unit, p[0], p[1], p[2], p[3], p[4]]
}

/// A Modbus RTU read request: unit + PDU + CRC (low byte first).
pub fn rtu_request(unit: u8, req: ReadRequest) -> [u8; 8] {
    let p = pdu(req);
    let mut f = [unit, p[0], p[1], p[2], p[3], p[4], 0, 0];
    let [lo, hi] = crc16_modbus(&f[..6]).to_le_bytes();
    f[6] = lo;
    f[7] = hi;
    f
}

/// Reads the reply PDU (function code onwards) of a read of `req`.
fn read_pdu(pdu: &[u8], req: ReadRequest) -> Result<Reply, FrameError> {
    let fc = req.table.function_code();
    match pdu {
        [f, code] if *f == fc | 0x80 => Ok(Reply::Exception(*code)),
        [f, n, data @ ..] if *f == fc => {
            if *n as usize != data.len() || data.len() != 2 * req.count as usize {
                return Err(FrameError::ByteCount {
                    got: data.len(),
                    count: req.count,
                });
            }
            Ok(Reply::Registers(
                data.chunks_exact(2)
                    .map(|w| u16::from_be_bytes([w[0], w[1]]))
                    .collect(),
            ))
        }
        [f, ..] if *f & 0x7F != fc => Err(FrameError::Function {
            got: *f,
            expected: fc,
        }),
        _ => Err(FrameError::ByteCount {
            got: pdu.len().saturating_sub(2),
            count: req.count,
        }),
    }
}

/// Looks at the bytes of a Modbus TCP reply received so far. A TCP stream carries
/// nothing but replies, so anything that is not the awaited one is an error and the link
/// is dropped (a late reply to an earlier request would otherwise be taken for this one).
pub fn parse_tcp(
    buf: &[u8],
    transaction: u16,
    unit: u8,
    req: ReadRequest,
) -> Result<Parsed, FrameError> {
    if buf.len() < 7 {
        return Ok(Parsed::Incomplete);
    }
    let tid = u16::from_be_bytes([buf[0], buf[1]]);
    let protocol = u16::from_be_bytes([buf[2], buf[3]]);
    let len = u16::from_be_bytes([buf[4], buf[5]]);
    if protocol != 0 {
        return Err(FrameError::ProtocolId(protocol));
    }
    if !(2..=254).contains(&len) {
        return Err(FrameError::Length(len));
    }
    let total = 6 + len as usize;
    if buf.len() < total {
        return Ok(Parsed::Incomplete);
    }
    if tid != transaction {
        return Err(FrameError::Transaction {
            got: tid,
            expected: transaction,
        });
    }
    if buf[6] != unit {
        return Err(FrameError::Unit {
            got: buf[6],
            expected: unit,
        });
    }
    read_pdu(&buf[7..total], req).map(Parsed::Reply)
}

/// The length of a whole RTU reply that starts `buf`, once its function code (and byte
/// count) are there to tell.
fn rtu_len(buf: &[u8]) -> Option<usize> {
    let fc = *buf.get(1)?;
    if fc & 0x80 != 0 {
        Some(5)
    } else {
        buf.get(2).map(|n| 3 + *n as usize + 2)
    }
}

/// An RTU frame is at most 256 bytes (Modbus over serial line §2.5.1).
const MAX_RTU: usize = 256;

/// Looks at the bytes of a Modbus RTU reply received so far, `Err` for a reply that
/// cannot be the answer. The serial line has no other framing than silence, so the
/// caller drops the first byte and looks again after a bad CRC (noise before a reply),
/// as [`rtu_resync`] does.
pub fn parse_rtu(buf: &[u8], unit: u8, req: ReadRequest) -> Result<Parsed, FrameError> {
    let Some(total) = rtu_len(buf) else {
        return Ok(Parsed::Incomplete);
    };
    if total > MAX_RTU {
        return Err(FrameError::Length(total as u16));
    }
    if buf.len() < total {
        return Ok(Parsed::Incomplete);
    }
    let frame = &buf[..total];
    let got = u16::from_le_bytes([frame[total - 2], frame[total - 1]]);
    let computed = crc16_modbus(&frame[..total - 2]);
    if got != computed {
        return Err(FrameError::Crc { got, computed });
    }
    if frame[0] != unit {
        return Err(FrameError::Unit {
            got: frame[0],
            expected: unit,
        });
    }
    read_pdu(&frame[1..total - 2], req).map(Parsed::Reply)
}

/// Parses an RTU reply from `buf`, skipping bytes before it that do not start a frame
/// with a good CRC (line noise). Returns how many bytes were skipped with the outcome;
/// a frame with a good CRC that is not the answer is an error. After `skip` bytes at most
/// [`MAX_RTU`] remain to wait for, so a buffer of [`MAX_ADU`] never overflows.
pub fn rtu_resync(buf: &[u8], unit: u8, req: ReadRequest) -> (usize, Result<Parsed, FrameError>) {
    let mut skip = 0;
    loop {
        match parse_rtu(&buf[skip..], unit, req) {
            Err(FrameError::Crc { .. } | FrameError::Length(_)) if skip + 1 < buf.len() => {
                skip += 1
            }
            Err(FrameError::Crc { .. } | FrameError::Length(_)) => {
                return (buf.len(), Ok(Parsed::Incomplete))
            }
            other => return (skip, other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_profiles::modbus::Table;

    const HOLD: ReadRequest = ReadRequest {
        table: Table::Holding,
        start: 0x0100,
        count: 2,
    };
    const INPUT: ReadRequest = ReadRequest {
        table: Table::Input,
        start: 0,
        count: 1,
    };

    /// An RTU frame as the simulators build it (an independent CRC implementation).
    fn rtu(bytes: &[u8]) -> Vec<u8> {
        tend_devsim::modbus::rtu_frame(bytes[0], &bytes[1..])
    }

    #[test]
    fn requests_are_the_spec_bytes() {
        assert_eq!(
            tcp_request(0x1234, 7, HOLD),
            [0x12, 0x34, 0, 0, 0, 6, 7, 0x03, 0x01, 0x00, 0x00, 0x02]
        );
        // Modbus over serial line spec, the classic example: 01 03 00 00 00 0A C5 CD.
        let r = ReadRequest {
            table: Table::Holding,
            start: 0,
            count: 10,
        };
        assert_eq!(
            rtu_request(1, r),
            [0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD]
        );
        assert_eq!(rtu_request(9, INPUT)[1], 0x04);
    }

    #[test]
    fn tcp_reply_in_pieces() {
        let whole = [0, 5, 0, 0, 0, 7, 3, 0x03, 4, 0x00, 0x2A, 0xFF, 0xFE];
        for cut in 0..whole.len() {
            assert_eq!(
                parse_tcp(&whole[..cut], 5, 3, HOLD),
                Ok(Parsed::Incomplete),
                "{cut}"
            );
        }
        assert_eq!(
            parse_tcp(&whole, 5, 3, HOLD),
            Ok(Parsed::Reply(Reply::Registers(vec![42, 0xFFFE])))
        );
    }

    #[test]
    fn tcp_replies_that_are_not_the_answer() {
        let ok = [0, 5, 0, 0, 0, 7, 3, 0x03, 4, 0, 1, 0, 2];
        let mut other_tid = ok;
        other_tid[1] = 4;
        assert_eq!(
            parse_tcp(&other_tid, 5, 3, HOLD),
            Err(FrameError::Transaction {
                got: 4,
                expected: 5
            })
        );
        let mut other_unit = ok;
        other_unit[6] = 9;
        assert!(matches!(
            parse_tcp(&other_unit, 5, 3, HOLD),
            Err(FrameError::Unit { got: 9, .. })
        ));
        let mut proto = ok;
        proto[3] = 1;
        assert_eq!(
            parse_tcp(&proto, 5, 3, HOLD),
            Err(FrameError::ProtocolId(1))
        );
        for len in [0u16, 1, 255, 0xFFFF] {
            let mut l = ok;
            l[4..6].copy_from_slice(&len.to_be_bytes());
            assert_eq!(parse_tcp(&l, 5, 3, HOLD), Err(FrameError::Length(len)));
        }
        // Input registers answered for a holding read.
        let mut fc = ok;
        fc[7] = 0x04;
        assert!(matches!(
            parse_tcp(&fc, 5, 3, HOLD),
            Err(FrameError::Function { got: 4, .. })
        ));
        // One register where two were asked, with consistent lengths.
        let short = [0, 5, 0, 0, 0, 5, 3, 0x03, 2, 0, 1];
        assert!(matches!(
            parse_tcp(&short, 5, 3, HOLD),
            Err(FrameError::ByteCount { got: 2, count: 2 })
        ));
        // A byte count that disagrees with the MBAP length.
        let lying = [0, 5, 0, 0, 0, 7, 3, 0x03, 6, 0, 1, 0, 2];
        assert!(parse_tcp(&lying, 5, 3, HOLD).is_err());
        // A bare function code.
        let bare = [0, 5, 0, 0, 0, 2, 3, 0x03];
        assert!(parse_tcp(&bare, 5, 3, HOLD).is_err());
    }

    #[test]
    fn exceptions_over_both() {
        let tcp = [0, 1, 0, 0, 0, 3, 3, 0x83, 0x02];
        assert_eq!(
            parse_tcp(&tcp, 1, 3, HOLD),
            Ok(Parsed::Reply(Reply::Exception(2)))
        );
        let frame = rtu(&[3, 0x84, 0x06]);
        assert_eq!(
            parse_rtu(&frame, 3, INPUT),
            Ok(Parsed::Reply(Reply::Exception(6)))
        );
        // An exception to another function.
        let other = rtu(&[3, 0x83, 0x06]);
        assert!(matches!(
            parse_rtu(&other, 3, INPUT),
            Err(FrameError::Function { got: 0x83, .. })
        ));
    }

    #[test]
    fn rtu_reply_in_pieces_and_checked() {
        let whole = rtu(&[3, 0x03, 4, 0x00, 0x2A, 0x01, 0x00]);
        for cut in 0..whole.len() {
            assert_eq!(parse_rtu(&whole[..cut], 3, HOLD), Ok(Parsed::Incomplete));
        }
        assert_eq!(
            parse_rtu(&whole, 3, HOLD),
            Ok(Parsed::Reply(Reply::Registers(vec![42, 256])))
        );
        let mut bad = whole.clone();
        bad[4] ^= 1;
        assert!(matches!(
            parse_rtu(&bad, 3, HOLD),
            Err(FrameError::Crc { .. })
        ));
        let other_unit = rtu(&[4, 0x03, 4, 0, 0, 0, 0]);
        assert!(matches!(
            parse_rtu(&other_unit, 3, HOLD),
            Err(FrameError::Unit { got: 4, .. })
        ));
    }

    #[test]
    fn rtu_noise_before_a_reply_is_skipped() {
        let reply = rtu(&[3, 0x03, 4, 0, 7, 0, 8]);
        // Plain noise, and noise that claims a frame longer than RTU allows.
        for noise in [[0x00, 0xFF, 0x03], [3, 0x03, 0xFC]] {
            let line = [&noise[..], &reply].concat();
            let (skipped, parsed) = rtu_resync(&line, 3, HOLD);
            assert_eq!(skipped, 3, "{noise:?}");
            assert_eq!(parsed, Ok(Parsed::Reply(Reply::Registers(vec![7, 8]))));
        }
        // Noise alone waits for more bytes, whatever it holds.
        for noise in [
            &[0xFFu8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF][..],
            &[3, 3, 0],
        ] {
            let (_, parsed) = rtu_resync(noise, 3, HOLD);
            assert_eq!(parsed, Ok(Parsed::Incomplete));
        }
    }

    #[test]
    fn no_input_panics() {
        // Every one- and two-byte prefix, then a sweep of lengths with one varying byte.
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let _ = parse_tcp(&[0, 1, 0, 0, 0, 3, a, b], 1, a, HOLD);
                let _ = rtu_resync(&[a, b, a], a, HOLD);
                let _ = parse_rtu(&[3, 0x03, a, b, b], 3, HOLD);
            }
        }
    }
}
