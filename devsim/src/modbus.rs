//! Modbus framing written out by hand (RTU with CRC-16/MODBUS, TCP with the MBAP header),
//! the read-registers request/reply PDUs and exceptions, and the two server front-ends
//! (RTU on a pty, TCP on a socket) that the AV-500 and HM-2 simulators share. The device
//! logic is a [`ModbusDevice`]: request PDU in, reply PDU out (or silence).

use crate::pty::Pty;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub const FC_READ_HOLDING: u8 = 0x03;
pub const FC_READ_INPUT: u8 = 0x04;

/// Modbus exception codes used by the manuals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exception {
    IllegalFunction = 0x01,
    IllegalDataAddress = 0x02,
    IllegalDataValue = 0x03,
    ServerDeviceBusy = 0x06,
}

/// The exception reply PDU: function code with the high bit set, then the code.
pub fn exception_pdu(fc: u8, e: Exception) -> Vec<u8> {
    vec![fc | 0x80, e as u8]
}

/// CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF); sent low byte first.
pub fn crc16_modbus(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
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

/// An RTU frame: unit id, PDU, CRC low byte, CRC high byte.
pub fn rtu_frame(unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(pdu.len() + 3);
    f.push(unit);
    f.extend_from_slice(pdu);
    let crc = crc16_modbus(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// Whether `frame` (unit id, PDU, CRC) ends with its correct CRC.
pub fn rtu_crc_ok(frame: &[u8]) -> bool {
    if frame.len() < 4 {
        return false;
    }
    let (body, crc) = frame.split_at(frame.len() - 2);
    crc16_modbus(body).to_le_bytes() == [crc[0], crc[1]]
}

/// A read-registers request (functions 0x03 and 0x04).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    pub fc: u8,
    pub start: u16,
    pub count: u16,
}

/// Parses a read request PDU of the given function, mapping a bad length or a count
/// outside `1..=max_count` to exception 0x03.
pub fn parse_read(pdu: &[u8], max_count: u16) -> Result<ReadRequest, Exception> {
    if pdu.len() != 5 {
        return Err(Exception::IllegalDataValue);
    }
    let start = u16::from_be_bytes([pdu[1], pdu[2]]);
    let count = u16::from_be_bytes([pdu[3], pdu[4]]);
    if count == 0 || count > max_count {
        return Err(Exception::IllegalDataValue);
    }
    Ok(ReadRequest {
        fc: pdu[0],
        start,
        count,
    })
}

/// The reply PDU for `req` over a register image, or exception 0x02 when the range is
/// not wholly inside the image.
pub fn read_reply(req: ReadRequest, image: &[u16]) -> Vec<u8> {
    let start = usize::from(req.start);
    let end = start + usize::from(req.count);
    if end > image.len() {
        return exception_pdu(req.fc, Exception::IllegalDataAddress);
    }
    let mut out = Vec::with_capacity(2 + 2 * usize::from(req.count));
    out.push(req.fc);
    out.push((2 * req.count) as u8);
    for r in &image[start..end] {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

/// The expected length of an RTU request frame (with CRC) from its first bytes, or `None`
/// when it cannot be known yet (too short, or a function code whose layout we do not
/// know, which is then framed by the line going silent).
fn rtu_request_len(buf: &[u8]) -> Option<usize> {
    let fc = *buf.get(1)?;
    match fc {
        0x01..=0x06 => Some(8),
        0x0F | 0x10 => buf.get(6).map(|&n| 9 + usize::from(n)),
        _ => None,
    }
}

/// Splits a byte stream into RTU request frames. Frames of known layout are taken as
/// soon as they are complete and their CRC checks; a frame with a bad CRC is resynced
/// byte by byte; anything left when the line goes quiet is taken as one frame if its
/// CRC checks, and dropped otherwise.
#[derive(Debug, Default)]
pub struct RtuReader {
    buf: Vec<u8>,
}

impl RtuReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the complete frames (unit id + PDU, without CRC).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        loop {
            if self.buf.len() < 4 {
                break;
            }
            match rtu_request_len(&self.buf) {
                Some(n) if n <= 256 => {
                    if self.buf.len() < n {
                        break;
                    }
                    if rtu_crc_ok(&self.buf[..n]) {
                        frames.push(self.buf[..n - 2].to_vec());
                        self.buf.drain(..n);
                    } else {
                        self.buf.remove(0);
                    }
                }
                Some(_) => {
                    self.buf.remove(0);
                }
                None => {
                    // Unknown layout at the head: garbage, or a function we do not know.
                    // Skip to a later complete frame of known layout if one is there;
                    // otherwise wait for the line to go quiet.
                    let later = (1..self.buf.len().saturating_sub(3)).find(|&i| {
                        matches!(rtu_request_len(&self.buf[i..]), Some(n) if i + n <= self.buf.len()
                            && rtu_crc_ok(&self.buf[i..i + n]))
                    });
                    match later {
                        Some(i) => {
                            self.buf.drain(..i);
                        }
                        None => break,
                    }
                }
            }
        }
        if self.buf.len() > 512 {
            let cut = self.buf.len() - 256;
            self.buf.drain(..cut);
        }
        frames
    }

    /// The line has been quiet (3.5 characters and more): ends the pending frame.
    pub fn silence(&mut self) -> Option<Vec<u8>> {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() >= 4 && rtu_crc_ok(&buf) {
            Some(buf[..buf.len() - 2].to_vec())
        } else {
            None
        }
    }

    pub fn pending(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// An MBAP-framed message: transaction id, protocol id, unit id, PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpAdu {
    pub transaction: u16,
    pub protocol: u16,
    pub unit: u8,
    pub pdu: Vec<u8>,
}

/// The TCP reply frame: MBAP header (length = unit id + PDU) and the PDU.
pub fn tcp_frame(transaction: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(pdu.len() + 7);
    f.extend_from_slice(&transaction.to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes());
    f.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    f.push(unit);
    f.extend_from_slice(pdu);
    f
}

/// What a simulated Modbus device answers.
pub trait ModbusDevice: Send + Sync + 'static {
    /// The reply PDU to `pdu` addressed to `unit`, or `None` to stay silent (wrong unit,
    /// device switched off).
    fn respond(&self, unit: u8, pdu: &[u8]) -> Option<Vec<u8>>;
}

/// Limits of a Modbus TCP front-end.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpLimits {
    /// More simultaneous connections than this are closed at once.
    pub max_connections: Option<usize>,
    /// A connection without a request for this long is closed.
    pub idle_timeout: Option<Duration>,
}

/// Serves `device` on `listener` until `token` is cancelled.
pub async fn serve_tcp(
    listener: TcpListener,
    device: Arc<dyn ModbusDevice>,
    limits: TcpLimits,
    token: CancellationToken,
) {
    let slots = limits.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    loop {
        let (stream, peer) = tokio::select! {
            _ = token.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "modbus tcp accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match &slots {
            None => None,
            Some(s) => match Arc::clone(s).try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    tracing::debug!(%peer, "modbus tcp: connection limit reached, closing");
                    drop(stream);
                    continue;
                }
            },
        };
        let device = Arc::clone(&device);
        let token = token.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = token.cancelled() => {}
                r = tcp_connection(stream, device, limits.idle_timeout) => {
                    if let Err(e) = r { tracing::debug!(%peer, error = %e, "modbus tcp connection"); }
                }
            }
        });
    }
}

async fn tcp_connection(
    mut stream: TcpStream,
    device: Arc<dyn ModbusDevice>,
    idle: Option<Duration>,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    loop {
        let mut header = [0u8; 7];
        let read = stream.read_exact(&mut header);
        match idle {
            Some(d) => match tokio::time::timeout(d, read).await {
                Ok(r) => r?,
                Err(_) => return Ok(()), // idle: close
            },
            None => read.await?,
        };
        let transaction = u16::from_be_bytes([header[0], header[1]]);
        let protocol = u16::from_be_bytes([header[2], header[3]]);
        let len = usize::from(u16::from_be_bytes([header[4], header[5]]));
        let unit = header[6];
        if !(2..=254).contains(&len) {
            // Cannot resynchronise a TCP stream after a bogus length: close it.
            return Ok(());
        }
        let mut pdu = vec![0u8; len - 1];
        stream.read_exact(&mut pdu).await?;
        if protocol != 0 {
            continue;
        }
        if let Some(reply) = device.respond(unit, &pdu) {
            stream
                .write_all(&tcp_frame(transaction, unit, &reply))
                .await?;
        }
    }
}

/// Binds `addr` (port 0 for a free port).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `device` as an RTU slave on the master side of `pty` until `token` is cancelled.
/// The device itself decides which unit ids it answers.
pub async fn serve_rtu(mut pty: Pty, device: Arc<dyn ModbusDevice>, token: CancellationToken) {
    // 3.5 characters at 19200 baud is 1.8 ms; a pty delivers a client's write in one
    // piece, so a little more is safe and still far below the 50 ms reply time.
    const SILENCE: Duration = Duration::from_millis(8);
    let mut reader = RtuReader::new();
    let mut buf = [0u8; 512];
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let quiet = async {
            if reader.pending() {
                tokio::time::sleep(SILENCE).await
            } else {
                std::future::pending::<()>().await
            }
        };
        let frames = tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => { pty.release_exclusive(); continue; }
            _ = quiet => reader.silence().into_iter().collect::<Vec<_>>(),
            r = pty.master.read(&mut buf) => match r {
                Ok(0) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
                Ok(n) => reader.push(&buf[..n]),
                Err(e) => {
                    tracing::debug!(error = %e, "modbus rtu pty read");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        for frame in frames {
            let (unit, pdu) = (frame[0], &frame[1..]);
            if let Some(reply) = device.respond(unit, pdu) {
                if let Err(e) = pty.master.write_all(&rtu_frame(unit, &reply)).await {
                    tracing::debug!(error = %e, "modbus rtu pty write");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_modbus_check_value_and_known_frame() {
        // CRC-16/MODBUS check value of "123456789".
        assert_eq!(crc16_modbus(b"123456789"), 0x4B37);
        // Read 2 holding registers from 0x006B of unit 0x11 (a textbook example frame).
        let f = rtu_frame(0x11, &[0x03, 0x00, 0x6B, 0x00, 0x03]);
        assert_eq!(f, vec![0x11, 0x03, 0x00, 0x6B, 0x00, 0x03, 0x76, 0x87]);
        assert!(rtu_crc_ok(&f));
    }

    #[test]
    fn read_request_checks() {
        assert_eq!(
            parse_read(&[3, 0, 4, 0, 2], 32),
            Ok(ReadRequest {
                fc: 3,
                start: 4,
                count: 2
            })
        );
        assert_eq!(
            parse_read(&[3, 0, 0, 0, 33], 32),
            Err(Exception::IllegalDataValue)
        );
        assert_eq!(
            parse_read(&[3, 0, 0, 0, 0], 32),
            Err(Exception::IllegalDataValue)
        );
        assert_eq!(parse_read(&[3, 0, 0], 32), Err(Exception::IllegalDataValue));
        let image = [1u16, 2, 3];
        assert_eq!(
            read_reply(
                ReadRequest {
                    fc: 4,
                    start: 1,
                    count: 2
                },
                &image
            ),
            vec![4, 4, 0, 2, 0, 3]
        );
        assert_eq!(
            read_reply(
                ReadRequest {
                    fc: 4,
                    start: 2,
                    count: 2
                },
                &image
            ),
            vec![0x84, 0x02]
        );
        assert_eq!(
            read_reply(
                ReadRequest {
                    fc: 4,
                    start: 0xFFFF,
                    count: 2
                },
                &image
            ),
            vec![0x84, 0x02]
        );
    }

    #[test]
    fn rtu_reader_frames_and_resyncs() {
        let mut r = RtuReader::new();
        let req = rtu_frame(1, &[3, 0, 0, 0, 13]);
        let mut input = vec![0xAA, 0x55, 0x01];
        input.extend_from_slice(&req);
        let frames = r.push(&input);
        assert_eq!(frames, vec![req[..req.len() - 2].to_vec()]);
        // split across reads
        assert!(r.push(&req[..3]).is_empty());
        assert_eq!(r.push(&req[3..]).len(), 1);
        // a write-multiple request is framed by its byte count
        let w = rtu_frame(1, &[0x10, 0, 0, 0, 1, 2, 0, 7]);
        assert_eq!(r.push(&w), vec![w[..w.len() - 2].to_vec()]);
        // unknown function code: framed by silence
        let odd = rtu_frame(1, &[0x2B, 0x0E, 0x01, 0x00]);
        assert!(r.push(&odd).is_empty());
        assert_eq!(r.silence(), Some(odd[..odd.len() - 2].to_vec()));
        // garbage then silence: dropped
        assert!(r.push(&[0x01, 0x99, 0x22]).is_empty());
        assert_eq!(r.silence(), None);
        assert!(!r.pending());
    }

    #[test]
    fn rtu_reader_survives_garbage() {
        let mut r = RtuReader::new();
        let mut x: u32 = 7;
        for _ in 0..20000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let _ = r.push(&[(x >> 16) as u8]);
            if x % 97 == 0 {
                let _ = r.silence();
            }
        }
    }

    #[test]
    fn tcp_frame_layout() {
        assert_eq!(
            tcp_frame(0x1234, 1, &[3, 2, 0, 5]),
            vec![0x12, 0x34, 0, 0, 0, 5, 1, 3, 2, 0, 5]
        );
    }
}
