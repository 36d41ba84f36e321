//! Reply status codes (`docs/protocol.md` section 4.3).
//!
//! A leaf module: the decoders map every error to one of these
//! ([`crate::DecodeError::status`]) and the device reports its own
//! failures with them, so nothing here depends on the rest of the codec.

use core::fmt;

/// Status codes of replies (section 4.3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// `cmd` is not defined.
    UnknownCommand = 1,
    /// Wrong length, count not matching the length, non-zero reserved
    /// field, broken framing.
    Malformed = 2,
    /// A field outside its domain.
    InvalidArgument = 3,
    /// The context has no session.
    NoSession = 4,
    /// `SESSION_INIT` while a session exists.
    SessionActive = 5,
    /// Unsupported major version, or a profile the context cannot use.
    Version = 6,
    /// The resource does not exist, is not attached, or has no backing.
    UnknownResource = 7,
    /// An address or range outside what it may reach, or wrapping 2^64.
    OutOfRange = 8,
    /// An address, size or offset that must be aligned is not.
    Misaligned = 9,
    /// The queue does not exist in this session.
    UnknownQueue = 10,
    /// A fault id that is not pending.
    UnknownFault = 11,
    /// A per-guest or per-session quota would be exceeded.
    Quota = 12,
    /// The queue already holds `max_queue_depth` dispatches.
    QueueFull = 13,
    /// Signal index outside the signal area.
    BadSignal = 14,
    /// The device failed the request.
    Device = 15,
    /// A capability this device or profile does not offer.
    Unsupported = 16,
    /// 1.1: a request only the guest kernel may send did not come from it,
    /// or a mediated context's `MAP_PAGES`/`FAULT_REPLY` came from user
    /// space.
    Permission = 17,
}

impl Status {
    /// Parses the wire value.
    pub const fn from_u32(v: u32) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::UnknownCommand,
            2 => Status::Malformed,
            3 => Status::InvalidArgument,
            4 => Status::NoSession,
            5 => Status::SessionActive,
            6 => Status::Version,
            7 => Status::UnknownResource,
            8 => Status::OutOfRange,
            9 => Status::Misaligned,
            10 => Status::UnknownQueue,
            11 => Status::UnknownFault,
            12 => Status::Quota,
            13 => Status::QueueFull,
            14 => Status::BadSignal,
            15 => Status::Device,
            16 => Status::Unsupported,
            17 => Status::Permission,
            _ => return None,
        })
    }

    /// The wire value.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// The name `docs/protocol.md` uses.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::UnknownCommand => "ERR_UNKNOWN_COMMAND",
            Status::Malformed => "ERR_MALFORMED",
            Status::InvalidArgument => "ERR_INVALID_ARGUMENT",
            Status::NoSession => "ERR_NO_SESSION",
            Status::SessionActive => "ERR_SESSION_ACTIVE",
            Status::Version => "ERR_VERSION",
            Status::UnknownResource => "ERR_UNKNOWN_RESOURCE",
            Status::OutOfRange => "ERR_OUT_OF_RANGE",
            Status::Misaligned => "ERR_MISALIGNED",
            Status::UnknownQueue => "ERR_UNKNOWN_QUEUE",
            Status::UnknownFault => "ERR_UNKNOWN_FAULT",
            Status::Quota => "ERR_QUOTA",
            Status::QueueFull => "ERR_QUEUE_FULL",
            Status::BadSignal => "ERR_BAD_SIGNAL",
            Status::Device => "ERR_DEVICE",
            Status::Unsupported => "ERR_UNSUPPORTED",
            Status::Permission => "ERR_PERMISSION",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
