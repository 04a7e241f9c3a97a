//! Sealed messages: every message between an agent and the gateways of its fleet carries
//! an HMAC-SHA256 tag made with the agent's own key (from `tend-gateway agent add`), so a
//! message is believed because of who could have made it, not because of which broker it
//! came through or which topic it was published on.
//!
//! The tag covers a purpose label, the agent id and the body's exact bytes. The label
//! keeps an agent's batch from passing as the gateway's ack (both sides hold the key),
//! the agent id keeps one agent's message from being replayed as another's (keys are per
//! agent anyway), and the body names what binds it further: a batch its agent, outbox
//! incarnation and seqs; an ack the incarnation and ranges; a diagnostic request its id
//! and expiry by the gateway's clock; an answer the request's id, device and request.
//!
//! On the wire a sealed message is the body, a line break, and one trailer line:
//! `tend-hmac-sha256 <64 hex digits>`. The body stays readable JSON in a broker's tools,
//! and is checked without being parsed or copied.

use ring::hmac;
use std::fmt;

/// Bytes of an agent key.
pub const KEY_LEN: usize = 32;
const TRAILER: &[u8] = b"\ntend-hmac-sha256 ";
const TAG_HEX: usize = 64;

/// What a sealed message is for; part of what the tag covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A batch of records, agent → gateway.
    Up,
    /// An acknowledgement, gateway → agent.
    Ack,
    /// A diagnostic request, gateway → agent.
    DiagReq,
    /// A diagnostic answer, agent → gateway.
    DiagResp,
    /// The agent's `online` / `offline`, agent → gateway.
    Status,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Up => b"tend/v1 up\0",
            Purpose::Ack => b"tend/v1 ack\0",
            Purpose::DiagReq => b"tend/v1 diag/req\0",
            Purpose::DiagResp => b"tend/v1 diag/resp\0",
            Purpose::Status => b"tend/v1 status\0",
        }
    }
}

/// Why a message was not believed. `as_str` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// No trailer: a message from something that does not hold a key.
    #[error("the message carries no signature")]
    Unsigned,
    /// A trailer that is not 64 hex digits.
    #[error("the message's signature is malformed")]
    Malformed,
    /// The tag does not match: forged, altered, or made with another agent's key.
    #[error("the message's signature does not match")]
    BadSignature,
}

impl SealError {
    pub fn as_str(self) -> &'static str {
        match self {
            SealError::Unsigned => "unsigned",
            SealError::Malformed => "malformed_signature",
            SealError::BadSignature => "bad_signature",
        }
    }
}

/// An agent's secret key. Its `Debug` does not show it.
#[derive(Clone)]
pub struct AgentKey {
    raw: [u8; KEY_LEN],
    key: hmac::Key,
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentKey(..)")
    }
}

impl PartialEq for AgentKey {
    fn eq(&self, other: &Self) -> bool {
        bool::from(subtle::ConstantTimeEq::ct_eq(&self.raw[..], &other.raw[..]))
    }
}

/// The system's random source failed (no entropy): nothing is enrolled without it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the system's random number source failed")]
pub struct RandomError;

impl AgentKey {
    pub fn from_bytes(raw: [u8; KEY_LEN]) -> Self {
        AgentKey {
            raw,
            key: hmac::Key::new(hmac::HMAC_SHA256, &raw),
        }
    }

    /// A new key from the system's random source.
    pub fn generate() -> Result<Self, RandomError> {
        Ok(Self::from_bytes(random_bytes()?))
    }

    /// The key as 64 lower-case hex digits, for the credentials and trust files.
    pub fn to_hex(&self) -> String {
        hex(&self.raw)
    }

    /// Parses [`AgentKey::to_hex`]'s form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = unhex(s.trim())?;
        let raw: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self::from_bytes(raw))
    }

    /// The password `agent` logs in to an embedded broker with: derived from the key, so
    /// the credentials file holds one secret and the gateway can check it without storing
    /// a second one.
    pub fn broker_password(&self, agent: &str) -> String {
        let mut cx = hmac::Context::with_key(&self.key);
        cx.update(b"tend/v1 broker-login\0");
        cx.update(agent.as_bytes());
        hex(cx.sign().as_ref())
    }

    fn tag(&self, purpose: Purpose, agent: &str, body: &[u8]) -> hmac::Tag {
        let mut cx = hmac::Context::with_key(&self.key);
        cx.update(purpose.label());
        cx.update(agent.as_bytes());
        cx.update(b"\0");
        cx.update(body);
        cx.sign()
    }
}

/// `body` with its trailer: what goes on the wire.
pub fn seal(key: &AgentKey, purpose: Purpose, agent: &str, body: &[u8]) -> Vec<u8> {
    let tag = key.tag(purpose, agent, body);
    let mut out = Vec::with_capacity(body.len() + TRAILER.len() + TAG_HEX);
    out.extend_from_slice(body);
    out.extend_from_slice(TRAILER);
    out.extend_from_slice(hex(tag.as_ref()).as_bytes());
    out
}

/// Splits a sealed message into its body and tag without checking the tag; for telling
/// an unsigned message from a badly signed one before the key is looked up.
pub fn split(payload: &[u8]) -> Result<(&[u8], [u8; 32]), SealError> {
    if payload.len() < TRAILER.len() + TAG_HEX {
        return Err(SealError::Unsigned);
    }
    let (rest, tag_hex) = payload.split_at(payload.len() - TAG_HEX);
    let Some(body) = rest.strip_suffix(TRAILER) else {
        return Err(SealError::Unsigned);
    };
    let tag = std::str::from_utf8(tag_hex)
        .ok()
        .and_then(unhex)
        .and_then(|t| <[u8; 32]>::try_from(t).ok())
        .ok_or(SealError::Malformed)?;
    Ok((body, tag))
}

/// The body of a message sealed by `key` for `purpose` and `agent`, or why it is not to
/// be believed. The comparison is constant-time.
pub fn open<'a>(
    key: &AgentKey,
    purpose: Purpose,
    agent: &str,
    payload: &'a [u8],
) -> Result<&'a [u8], SealError> {
    let (body, tag) = split(payload)?;
    // hmac::verify takes the message in one piece; the tag of a context over label, agent
    // and body, compared in constant time, saves copying the body.
    let expected = key.tag(purpose, agent, body);
    if bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_ref(), &tag[..])) {
        Ok(body)
    } else {
        Err(SealError::BadSignature)
    }
}

/// `n` random bytes from the system's source, as hex: unguessable ids (client ids,
/// per-run passwords).
pub fn random_hex(n: usize) -> Result<String, RandomError> {
    let mut buf = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buf)
        .map_err(|_| RandomError)?;
    Ok(hex(&buf))
}

fn random_bytes() -> Result<[u8; KEY_LEN], RandomError> {
    let mut raw = [0u8; KEY_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| RandomError)?;
    Ok(raw)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> AgentKey {
        AgentKey::from_bytes([n; KEY_LEN])
    }

    #[test]
    fn a_sealed_message_opens_with_its_key_purpose_and_agent_only() {
        let body = br#"{"v":1,"agent":"a1"}"#;
        let sealed = seal(&key(1), Purpose::Up, "a1", body);
        assert_eq!(open(&key(1), Purpose::Up, "a1", &sealed), Ok(&body[..]));
        assert_eq!(
            open(&key(2), Purpose::Up, "a1", &sealed),
            Err(SealError::BadSignature),
            "another agent's key"
        );
        assert_eq!(
            open(&key(1), Purpose::Ack, "a1", &sealed),
            Err(SealError::BadSignature),
            "a batch is not an ack"
        );
        assert_eq!(
            open(&key(1), Purpose::Up, "a2", &sealed),
            Err(SealError::BadSignature),
            "bound to the agent"
        );
        // Any changed byte, body or tag, breaks it.
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(open(&key(1), Purpose::Up, "a1", &bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn unsigned_and_malformed_trailers_are_told_apart() {
        assert_eq!(
            open(&key(1), Purpose::Up, "a1", br#"{"v":1}"#),
            Err(SealError::Unsigned)
        );
        assert_eq!(
            open(&key(1), Purpose::Up, "a1", b""),
            Err(SealError::Unsigned)
        );
        let mut bad = seal(&key(1), Purpose::Up, "a1", b"{}");
        let n = bad.len();
        bad[n - 1] = b'z';
        assert_eq!(
            open(&key(1), Purpose::Up, "a1", &bad),
            Err(SealError::Malformed)
        );
    }

    #[test]
    fn keys_round_trip_through_hex_and_hide_in_debug() {
        let k = AgentKey::generate().unwrap();
        let h = k.to_hex();
        assert_eq!(h.len(), 64);
        assert_eq!(AgentKey::from_hex(&h), Some(k.clone()));
        assert_ne!(AgentKey::generate().unwrap(), k);
        assert_eq!(AgentKey::from_hex("abc"), None);
        assert_eq!(AgentKey::from_hex(&"g".repeat(64)), None);
        assert_eq!(AgentKey::from_hex(&"ab".repeat(31)), None);
        assert!(!format!("{k:?}").contains(&h[..8]));
        assert_ne!(k.broker_password("a1"), k.broker_password("a2"));
        assert_eq!(k.broker_password("a1").len(), 64);
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(random_hex(8).unwrap(), random_hex(8).unwrap());
        assert_eq!(random_hex(8).unwrap().len(), 16);
    }
}
