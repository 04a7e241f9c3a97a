//! The body of the cargo-fuzz target `wire_decode` in `fuzz/`. It lives here so that
//! `tests/fuzz_corpus.rs` replays every committed corpus input under plain `cargo test`
//! with the same checks the fuzzer ran. Pure: no I/O.

use crate::{encode, ranges_of, topic, Ack, DiagRequest, DiagResponse, UpBatch, WireError};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt::Debug;

/// Whatever decodes re-encodes to bytes that decode to an equal value, which re-encode to
/// the same bytes.
fn round_trip<T, D>(bytes: &[u8], decode: D)
where
    T: Serialize + PartialEq + Debug,
    D: Fn(&[u8]) -> Result<T, WireError>,
{
    let Ok(v) = decode(bytes) else { return };
    let again = encode(&v).unwrap_or_else(|e| panic!("{v:?} does not encode: {e}"));
    assert!(!again.is_empty(), "{v:?} encodes to nothing");
    let back = decode(&again).unwrap_or_else(|e| panic!("{v:?} re-encoded fails: {e}"));
    assert_eq!(back, v, "round trip changed the message");
    assert_eq!(encode(&back).ok(), Some(again), "encoding is not stable");
}

/// Target `wire_decode`: the bytes as each message the gateway and agent accept, as a
/// topic name, and as big-endian `u64` sequence numbers for [`ranges_of`].
pub fn wire_decode(data: &[u8]) {
    round_trip(data, UpBatch::decode);
    round_trip(data, Ack::decode);
    round_trip(data, DiagRequest::decode);
    round_trip(data, DiagResponse::decode);

    if let Ok(b) = UpBatch::decode(data) {
        assert!(topic::valid_agent_id(&b.agent));
        assert!(crate::valid_incarnation(&b.incarnation));
        assert_eq!(b.v, crate::VERSION);
    }
    if let Ok(a) = Ack::decode(data) {
        assert!(a.ranges.iter().all(|r| r.first <= r.last));
        assert!(crate::valid_incarnation(&a.incarnation));
    }

    // Seals: any bytes are opened or refused, never a panic, and what opens is a prefix.
    let key = crate::AgentKey::from_bytes([7; crate::seal::KEY_LEN]);
    if let Ok(body) = crate::seal::open(&key, crate::Purpose::Up, "a1", data) {
        assert!(data.starts_with(body));
    }
    let sealed = crate::seal::seal(&key, crate::Purpose::Up, "a1", data);
    assert_eq!(
        crate::seal::open(&key, crate::Purpose::Up, "a1", &sealed),
        Ok(data)
    );

    // Topics: what parses names a valid agent and rebuilds to the same topic.
    let text = String::from_utf8_lossy(data);
    if let Some(p) = topic::parse(&text) {
        let rebuilt = match p {
            topic::Parsed::Up(a) => topic::up(a),
            topic::Parsed::Ack(a) => topic::ack(a),
            topic::Parsed::Status(a) => topic::status(a),
            topic::Parsed::DiagReq(a) => topic::diag_req(a),
            topic::Parsed::DiagResp(a) => topic::diag_resp(a),
        };
        assert_eq!(rebuilt, text);
    }

    // Ranges: sorted, disjoint, not adjacent, and covering exactly the numbers given.
    let seqs: Vec<u64> = data
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let ranges = ranges_of(seqs.iter().copied());
    let want: BTreeSet<u64> = seqs.into_iter().collect();
    let mut covered = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        assert!(r.first <= r.last);
        if let Some(next) = ranges.get(i + 1) {
            assert!(r.last < next.first && r.last + 1 < next.first, "{ranges:?}");
        }
        covered += r.last - r.first + 1;
        assert!(covered <= want.len() as u64, "{ranges:?}");
        assert!((r.first..=r.last).all(|s| want.contains(&s)), "{ranges:?}");
    }
    assert_eq!(covered, want.len() as u64, "{ranges:?}");
}
