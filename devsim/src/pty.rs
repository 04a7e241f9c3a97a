//! Pseudo-terminals standing in for a serial cable. The simulator owns the master side; the
//! slave side is a `/dev/pts/N` path that another process opens as a serial port (with
//! tokio-serial at the manual's baud rate; a pty ignores the line settings). The simulator
//! keeps its own handle on the slave open, so a client may close and reopen the path as
//! often as it likes without the master seeing a hang-up.

use rustix::fd::OwnedFd;
use rustix::fs::{Mode, OFlags};
use std::io;
use std::path::PathBuf;
use tokio_serial::{SerialPort, SerialStream};

/// A pty pair: the master to serve on, and the path of the slave.
#[derive(Debug)]
pub struct Pty {
    pub master: SerialStream,
    /// Kept open for the simulator's lifetime so that a client's close is not a hang-up.
    pub keep_slave: SerialStream,
    /// A plain descriptor on the slave (no lock held) for clearing TIOCEXCL.
    slave_fd: OwnedFd,
    pub path: PathBuf,
}

/// Opens a fresh pty pair. Needs a tokio runtime.
pub fn open() -> io::Result<Pty> {
    let (master, slave) = SerialStream::pair().map_err(io::Error::other)?;
    let path = slave
        .name()
        .map(PathBuf::from)
        .ok_or_else(|| io::Error::other("pty slave has no name"))?;
    let slave_fd = rustix::fs::open(
        &path,
        OFlags::RDWR | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(Pty {
        master,
        keep_slave: slave,
        slave_fd,
        path,
    })
}

impl Pty {
    /// Clears the slave's exclusive-open flag (TIOCEXCL) that a serial client sets and
    /// leaves behind when it dies without closing, so the path can be opened again.
    /// (Only the ioctl: serialport's `set_exclusive(false)` would also take a shared
    /// flock, which keeps every client from taking its exclusive one.)
    pub fn release_exclusive(&mut self) {
        let _ = rustix::termios::ioctl_tiocnxcl(&self.slave_fd);
    }
}
