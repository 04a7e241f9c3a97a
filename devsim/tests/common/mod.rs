//! Helpers shared by the integration tests: open a simulator's pty as a serial port the
//! way the agent will, and read with a deadline.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{DataBits, Parity, SerialPortBuilderExt, SerialStream, StopBits};

pub fn open_serial(path: &Path, baud: u32, parity: Parity) -> SerialStream {
    tokio_serial::new(path.to_string_lossy(), baud)
        .data_bits(DataBits::Eight)
        .parity(parity)
        .stop_bits(StopBits::One)
        .timeout(Duration::from_millis(500))
        .open_native_async()
        .expect("open the simulator's pty as a serial port")
}

/// Writes `req` and reads until the first ETX after an STX (a LIP-300 reply), returning
/// every byte read (noise included).
pub async fn lip_exchange(port: &mut SerialStream, req: &[u8]) -> Vec<u8> {
    port.write_all(req).await.unwrap();
    lip_read(port, Duration::from_secs(2))
        .await
        .expect("a reply")
}

pub async fn lip_read(port: &mut SerialStream, within: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n = match tokio::time::timeout_at(deadline, port.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("read: {e}"),
            Err(_) => return None,
        };
        out.extend_from_slice(&buf[..n]);
        if let Some(stx) = out.iter().rposition(|&b| b == 0x02) {
            if out[stx..].contains(&0x03) {
                return Some(out);
            }
        }
    }
}

/// The last complete frame (STX..=ETX) in `bytes`.
pub fn last_frame(bytes: &[u8]) -> &[u8] {
    let stx = bytes.iter().rposition(|&b| b == 0x02).expect("an STX");
    let etx = stx
        + bytes[stx..]
            .iter()
            .position(|&b| b == 0x03)
            .expect("an ETX");
    &bytes[stx..=etx]
}

/// Reads whatever arrives within `within` (for "no reply" checks).
pub async fn read_for(port: &mut SerialStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, port.read(&mut buf)).await {
        out.extend_from_slice(&buf[..n]);
    }
    out
}
