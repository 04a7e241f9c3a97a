//! Device knowledge without I/O: the firmware profile format, its loader, and the engine
//! that turns what a device sends into readings, fault signals and availability state.
//!
//! Nothing here opens a socket, reads a clock or touches the disk (except
//! [`load::load_file`] and [`load::ProfileSet::load_dir`], which read profile files when
//! asked). That keeps every decoding rule testable exhaustively and fast.
#![forbid(unsafe_code)]

pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod golden;
pub mod load;
pub mod locate;
pub mod manual;
pub mod modbus;
pub mod model;
pub mod phi;
pub mod schema;
pub mod serial_frame;
pub mod units;

pub use engine::{Evaluation, Identity, Profile, Reading, RuleState, Signal, Snapshot};
pub use load::{load_file, parse_profile, ProfileError, ProfileSet, SelectError};
pub use model::{DeviceState, FaultClass, SignalKind, Value};
