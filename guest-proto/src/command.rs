//! Commands: their ids, the decoded [`Request`], and one struct per command.
//!
//! [`Request::decode`] is the single entry point that turns the bytes of one
//! framed request into a typed value, doing every check the protocol can do
//! without device state: lengths, reserved fields, value domains, alignment,
//! ranges that wrap, counts against protocol limits and, through
//! [`DecodeLimits`], against the limits the device reported in its capset.
//! What remains for the device is what only it knows: whether a resource,
//! queue or fault exists, the aperture, quotas, guest RAM.
//!
//! The same types encode the guest's requests ([`Request::encode`], or
//! [`crate::writer::RequestWriter`] for whole streams), so both sides agree
//! on the layout by construction. Every table offset of `docs/protocol.md`
//! section 5 appears literally in this module or the command's own module.

use alloc::vec::Vec;

use crate::attr::RangeAttr;
use crate::bind::VmBind;
use crate::capset::{Capset, VERSION_MAJOR, VERSION_MINOR};
use crate::error::{DecodeError, EncodeError};
use crate::fault::{FaultReply, FaultRingLayout, MAX_FAULT_RING_CAPACITY};
use crate::header::{NO_REPLY, REQUEST_HEADER_SIZE, RequestHeader};
use crate::kernel::{Kernel, args_len_of};
use crate::opcode::Command;
use crate::signal::SIGNAL_SLOT_SIZE;
use crate::svm::{SVM_ATTACH_LEN, SVM_DETACH_LEN, SvmAttach};
use crate::types::{QueueId, ResourceId, SignalIndex};
use crate::uq::{UserQueueCreate, UserQueueDestroy};
use crate::wire::{put_u16, put_u32, put_u64, reserved_at, u16_at, u32_at, u64_at};

/// Request length of `SESSION_INIT`.
pub const SESSION_INIT_LEN: usize = 104;
/// Request length of the commands without payload.
pub const EMPTY_REQUEST_LEN: usize = REQUEST_HEADER_SIZE;
/// Request length of `QUEUE_CREATE` and `QUEUE_DESTROY`.
pub const QUEUE_REQUEST_LEN: usize = 24;
/// Length of the fixed part of `DISPATCH`; the kernel arguments follow.
pub const DISPATCH_FIXED_LEN: usize = 40;
/// Size of a memory region descriptor (5.1).
pub const REGION_SIZE: usize = 24;
/// A region's offset must be a multiple of this.
pub const REGION_ALIGN: u64 = 64;
/// Smallest reply buffer.
pub const MIN_REPLY_BUFFER: u64 = 64;
/// Largest reply buffer.
pub const MAX_REPLY_BUFFER: u64 = 1 << 20;
/// `signal` value of a dispatch without a completion signal.
pub const NO_SIGNAL: u32 = 0xFFFF_FFFF;
/// `flags` bit of a dispatch whose end posts an event (native profile).
pub const DISPATCH_FLAG_NOTIFY: u32 = 1;
/// Highest queue priority.
pub const MAX_QUEUE_PRIORITY: u8 = 15;

/// Limits the decoder enforces on top of the protocol's own: the device's
/// values from its capset. [`DecodeLimits::PROTOCOL`] checks only what the
/// wire format itself bounds.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct DecodeLimits {
    /// Most ops in one `VM_BIND`.
    pub max_bind_ops: u32,
    /// Largest fault ring capacity.
    pub max_fault_ring_records: u32,
    /// Most slots in a signal area.
    pub max_signal_slots: u32,
}

impl DecodeLimits {
    /// Only the bounds of the wire format.
    pub const PROTOCOL: DecodeLimits = DecodeLimits {
        max_bind_ops: u32::MAX,
        max_fault_ring_records: MAX_FAULT_RING_CAPACITY,
        // Slot indices then stay below NO_SIGNAL (0xFFFF_FFFF).
        max_signal_slots: u32::MAX,
    };

    /// The limits a device reports.
    pub fn from_capset(capset: &Capset) -> DecodeLimits {
        DecodeLimits {
            max_bind_ops: capset.max_bind_ops,
            max_fault_ring_records: capset.max_fault_ring_records.min(MAX_FAULT_RING_CAPACITY),
            max_signal_slots: capset.max_signal_slots,
        }
    }
}

impl Default for DecodeLimits {
    fn default() -> DecodeLimits {
        DecodeLimits::PROTOCOL
    }
}

/// A region of a resource that holds session memory (5.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Region {
    /// The resource; the device checks it is attached and backed.
    pub resource: ResourceId,
    /// Byte offset in the resource; a multiple of 64.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

/// Field names of one region, for errors.
struct RegionNames {
    reserved: &'static str,
    offset: &'static str,
    range: &'static str,
}

const REPLY_NAMES: RegionNames = RegionNames {
    reserved: "reply.reserved",
    offset: "reply.offset",
    range: "reply.offset+size",
};
const FAULT_RING_NAMES: RegionNames = RegionNames {
    reserved: "fault_ring.reserved",
    offset: "fault_ring.offset",
    range: "fault_ring.offset+size",
};
const SIGNALS_NAMES: RegionNames = RegionNames {
    reserved: "signals.reserved",
    offset: "signals.offset",
    range: "signals.offset+size",
};

impl Region {
    /// First byte past the region, if it does not wrap.
    pub const fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.size)
    }

    /// Whether the two regions share a byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        let (Some(end), Some(other_end)) = (self.end(), other.end()) else {
            return false;
        };
        self.resource == other.resource && self.offset < other_end && other.offset < end
    }

    fn decode_at(bytes: &[u8], at: usize, names: &RegionNames) -> Result<Region, DecodeError> {
        reserved_at(bytes, at.saturating_add(4), 4, names.reserved)?;
        let region = Region {
            resource: ResourceId(u32_at(bytes, at)?),
            offset: u64_at(bytes, at.saturating_add(8))?,
            size: u64_at(bytes, at.saturating_add(16))?,
        };
        if !region.offset.is_multiple_of(REGION_ALIGN) {
            return Err(DecodeError::Misaligned {
                field: names.offset,
                value: region.offset,
            });
        }
        region
            .end()
            .ok_or(DecodeError::Overflow { field: names.range })?;
        Ok(region)
    }

    fn write_at(&self, buf: &mut [u8], at: usize) {
        put_u32(buf, at, self.resource.0);
        put_u64(buf, at.saturating_add(8), self.offset);
        put_u64(buf, at.saturating_add(16), self.size);
    }
}

/// The transport profile of a session (section 3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Profile {
    /// Stock QEMU: memory-based completion and faults, no held fences.
    Compat,
    /// `CONTEXT_INIT` + `RESOURCE_BLOB`: events on a dedicated ring.
    Native {
        /// Index of the event ring, at least 1.
        event_ring: u32,
    },
}

/// Wire values of `SESSION_INIT`'s `profile`.
pub mod profile {
    /// [`super::Profile::Compat`]
    pub const COMPAT: u32 = 1;
    /// [`super::Profile::Native`]
    pub const NATIVE: u32 = 2;
}

/// `SESSION_INIT` (5.2).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SessionInit {
    /// The guest's minor version; the major version is always 1.
    pub version_minor: u16,
    /// Transport profile.
    pub profile: Profile,
    /// Reply buffer: size a multiple of 8, 64 B ..= 1 MiB.
    pub reply: Region,
    /// Fault ring: `128 + 32 * capacity` bytes.
    pub fault_ring: Region,
    /// Signal area: `32 * slots` bytes.
    pub signals: Region,
}

impl SessionInit {
    /// A version 1.0 request.
    pub const fn new(profile: Profile, reply: Region, fault_ring: Region, signals: Region) -> Self {
        SessionInit {
            version_minor: VERSION_MINOR,
            profile,
            reply,
            fault_ring,
            signals,
        }
    }

    /// The fault ring's geometry. Always `Some` for a decoded request.
    pub fn fault_ring_layout(&self) -> Option<FaultRingLayout> {
        FaultRingLayout::from_size(self.fault_ring.size, MAX_FAULT_RING_CAPACITY).ok()
    }

    /// Number of signal slots. Always `Some` for a decoded request.
    pub fn signal_slots(&self) -> Option<u32> {
        signal_slots(self.signals.size, u32::MAX).ok()
    }

    /// The reply region of a `SESSION_INIT` request whose decoding failed,
    /// if that region alone is valid: section 5.2 writes the error reply
    /// there when the resource holds it. Only a version 1 request of the
    /// version 1 length has a known reply region.
    pub fn reply_region_of(bytes: &[u8]) -> Option<Region> {
        let header = RequestHeader::decode(bytes).ok()?;
        if header.cmd != Command::SessionInit.as_u32()
            || bytes.len() != SESSION_INIT_LEN
            || u16_at(bytes, 16).ok()? != VERSION_MAJOR
        {
            return None;
        }
        let reply = Region::decode_at(bytes, 32, &REPLY_NAMES).ok()?;
        check_reply_size(reply.size).ok()?;
        Some(reply)
    }

    fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<SessionInit, DecodeError> {
        // The version decides the layout, so it is checked before the length.
        if let Ok(major) = u16_at(bytes, 16) {
            if major != VERSION_MAJOR {
                return Err(DecodeError::UnsupportedVersion { major });
            }
        }
        exact_len(bytes, SESSION_INIT_LEN)?;
        reserved_at(bytes, 24, 4, "flags")?;
        let raw_profile = u32_at(bytes, 20)?;
        let event_ring = u32_at(bytes, 28)?;
        let profile = match (raw_profile, event_ring) {
            (profile::COMPAT, 0) => Profile::Compat,
            (profile::NATIVE, ring) if ring >= 1 => Profile::Native { event_ring: ring },
            (profile::COMPAT | profile::NATIVE, ring) => {
                return Err(DecodeError::InvalidValue {
                    field: "event_ring",
                    value: u64::from(ring),
                });
            }
            (other, _) => {
                return Err(DecodeError::InvalidValue {
                    field: "profile",
                    value: u64::from(other),
                });
            }
        };
        let init = SessionInit {
            version_minor: u16_at(bytes, 18)?,
            profile,
            reply: Region::decode_at(bytes, 32, &REPLY_NAMES)?,
            fault_ring: Region::decode_at(bytes, 56, &FAULT_RING_NAMES)?,
            signals: Region::decode_at(bytes, 80, &SIGNALS_NAMES)?,
        };
        check_reply_size(init.reply.size)?;
        FaultRingLayout::from_size(init.fault_ring.size, limits.max_fault_ring_records)?;
        signal_slots(init.signals.size, limits.max_signal_slots)?;
        let pairs = [
            (&init.reply, &init.fault_ring, "reply", "fault_ring"),
            (&init.reply, &init.signals, "reply", "signals"),
            (&init.fault_ring, &init.signals, "fault_ring", "signals"),
        ];
        for (a, b, first, second) in pairs {
            if a.overlaps(b) {
                return Err(DecodeError::Overlap { first, second });
            }
        }
        Ok(init)
    }

    fn write(&self, buf: &mut [u8]) {
        let (raw_profile, event_ring) = match self.profile {
            Profile::Compat => (profile::COMPAT, 0),
            Profile::Native { event_ring } => (profile::NATIVE, event_ring),
        };
        put_u16(buf, 16, VERSION_MAJOR);
        put_u16(buf, 18, self.version_minor);
        put_u32(buf, 20, raw_profile);
        put_u32(buf, 28, event_ring);
        self.reply.write_at(buf, 32);
        self.fault_ring.write_at(buf, 56);
        self.signals.write_at(buf, 80);
    }
}

fn check_reply_size(size: u64) -> Result<(), DecodeError> {
    if !size.is_multiple_of(8) {
        return Err(DecodeError::Misaligned {
            field: "reply.size",
            value: size,
        });
    }
    if !(MIN_REPLY_BUFFER..=MAX_REPLY_BUFFER).contains(&size) {
        return Err(DecodeError::InvalidValue {
            field: "reply.size",
            value: size,
        });
    }
    Ok(())
}

/// Slots in a signal area of `size` bytes: a multiple of 32, at least one
/// slot, at most `max_slots`.
fn signal_slots(size: u64, max_slots: u32) -> Result<u32, DecodeError> {
    if !size.is_multiple_of(SIGNAL_SLOT_SIZE) {
        return Err(DecodeError::Misaligned {
            field: "signals.size",
            value: size,
        });
    }
    let slots = size / SIGNAL_SLOT_SIZE;
    if slots == 0 {
        return Err(DecodeError::Zero {
            field: "signals.size",
        });
    }
    match u32::try_from(slots) {
        Ok(n) if n <= max_slots => Ok(n),
        _ => Err(DecodeError::CountTooLarge {
            field: "signal slots",
            count: slots,
            max: u64::from(max_slots),
        }),
    }
}

/// `QUEUE_CREATE` (5.7).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct QueueCreate {
    /// 0 (lowest) ..= 15.
    pub priority: u8,
}

impl QueueCreate {
    fn decode(bytes: &[u8]) -> Result<QueueCreate, DecodeError> {
        exact_len(bytes, QUEUE_REQUEST_LEN)?;
        reserved_at(bytes, 20, 4, "flags")?;
        let raw = u32_at(bytes, 16)?;
        let priority = u8::try_from(raw)
            .ok()
            .filter(|p| *p <= MAX_QUEUE_PRIORITY)
            .ok_or(DecodeError::InvalidValue {
                field: "priority",
                value: u64::from(raw),
            })?;
        Ok(QueueCreate { priority })
    }

    fn write(&self, buf: &mut [u8]) {
        put_u32(buf, 16, u32::from(self.priority));
    }
}

/// `QUEUE_DESTROY` (5.7).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct QueueDestroy {
    /// The queue.
    pub queue: QueueId,
}

impl QueueDestroy {
    fn decode(bytes: &[u8]) -> Result<QueueDestroy, DecodeError> {
        exact_len(bytes, QUEUE_REQUEST_LEN)?;
        reserved_at(bytes, 20, 4, "reserved")?;
        Ok(QueueDestroy {
            queue: QueueId(u32_at(bytes, 16)?),
        })
    }

    fn write(&self, buf: &mut [u8]) {
        put_u32(buf, 16, self.queue.0);
    }
}

/// `DISPATCH` (5.8).
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Dispatch {
    /// The queue.
    pub queue: QueueId,
    /// The kernel and its validated arguments.
    pub kernel: Kernel,
    /// The completion signal slot, if any.
    pub signal: Option<SignalIndex>,
    /// Native profile: post an event when the dispatch ends.
    pub notify: bool,
    /// Stored in the signal's `value` when the dispatch ends.
    pub completion_value: u64,
}

impl Dispatch {
    fn decode(bytes: &[u8]) -> Result<Dispatch, DecodeError> {
        if bytes.len() < DISPATCH_FIXED_LEN {
            return Err(DecodeError::TooShort {
                needed: DISPATCH_FIXED_LEN,
                actual: bytes.len(),
            });
        }
        let kernel_id = u32_at(bytes, 20)?;
        let args_len = args_len_of(kernel_id).ok_or(DecodeError::InvalidValue {
            field: "kernel",
            value: u64::from(kernel_id),
        })?;
        exact_len(bytes, DISPATCH_FIXED_LEN.saturating_add(args_len))?;
        let flags = u32_at(bytes, 28)?;
        if flags & !DISPATCH_FLAG_NOTIFY != 0 {
            return Err(DecodeError::ReservedNotZero { field: "flags" });
        }
        let signal = u32_at(bytes, 24)?;
        let args = bytes.get(DISPATCH_FIXED_LEN..).unwrap_or_default();
        Ok(Dispatch {
            queue: QueueId(u32_at(bytes, 16)?),
            kernel: Kernel::decode_args(kernel_id, args)?,
            signal: (signal != NO_SIGNAL).then_some(SignalIndex(signal)),
            notify: flags & DISPATCH_FLAG_NOTIFY != 0,
            completion_value: u64_at(bytes, 32)?,
        })
    }

    fn write(&self, buf: &mut [u8]) {
        put_u32(buf, 16, self.queue.0);
        put_u32(buf, 20, self.kernel.id());
        put_u32(buf, 24, self.signal.map_or(NO_SIGNAL, |s| s.0));
        put_u32(buf, 28, if self.notify { DISPATCH_FLAG_NOTIFY } else { 0 });
        put_u64(buf, 32, self.completion_value);
        if let Some(args) = buf.get_mut(DISPATCH_FIXED_LEN..) {
            self.kernel.write_args(args);
        }
    }
}

fn exact_len(bytes: &[u8], expected: usize) -> Result<(), DecodeError> {
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(DecodeError::WrongLength {
            expected,
            actual: bytes.len(),
        })
    }
}

/// One request, decoded (borrowing the request bytes) or built to encode.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Request<'a> {
    /// `SESSION_INIT`
    SessionInit(SessionInit),
    /// `SESSION_DESTROY`
    SessionDestroy,
    /// `DEVICE_QUERY`
    DeviceQuery,
    /// `QUEUE_COUNTERS` (1.1)
    QueueCounters,
    /// `VM_BIND`; its ops are decoded one by one by [`VmBind::ops`].
    VmBind(VmBind<'a>),
    /// `RANGE_ATTR`
    RangeAttr(RangeAttr),
    /// `QUEUE_CREATE`
    QueueCreate(QueueCreate),
    /// `QUEUE_DESTROY`
    QueueDestroy(QueueDestroy),
    /// `DISPATCH`
    Dispatch(Dispatch),
    /// `USER_QUEUE_CREATE` (1.1)
    UserQueueCreate(UserQueueCreate),
    /// `USER_QUEUE_DESTROY` (1.1)
    UserQueueDestroy(UserQueueDestroy),
    /// `DOORBELL_KICK` (1.1)
    DoorbellKick,
    /// `FAULT_REPLY`; every entry is already validated.
    FaultReply(FaultReply<'a>),
    /// `EVENT_ARM`
    EventArm,
    /// `SVM_ATTACH` (1.1, kernel only)
    SvmAttach(SvmAttach),
    /// `SVM_DETACH` (1.1, kernel only)
    SvmDetach,
}

impl<'a> Request<'a> {
    /// Decodes one request (`bytes` is exactly the request, header
    /// included) with the protocol's own limits.
    pub fn decode(bytes: &'a [u8]) -> Result<Request<'a>, DecodeError> {
        Request::decode_with(bytes, &DecodeLimits::PROTOCOL)
    }

    /// Decodes one request, also enforcing the device's `limits`.
    pub fn decode_with(bytes: &'a [u8], limits: &DecodeLimits) -> Result<Request<'a>, DecodeError> {
        let header = RequestHeader::decode(bytes)?;
        let len = header.check_framing(bytes.len())?;
        if len != bytes.len() {
            return Err(DecodeError::WrongLength {
                expected: len,
                actual: bytes.len(),
            });
        }
        Ok(match header.command()? {
            Command::SessionInit => Request::SessionInit(SessionInit::decode(bytes, limits)?),
            Command::SessionDestroy => {
                exact_len(bytes, EMPTY_REQUEST_LEN)?;
                Request::SessionDestroy
            }
            Command::DeviceQuery => {
                exact_len(bytes, EMPTY_REQUEST_LEN)?;
                Request::DeviceQuery
            }
            Command::QueueCounters => {
                exact_len(bytes, EMPTY_REQUEST_LEN)?;
                Request::QueueCounters
            }
            Command::UserQueueCreate => Request::UserQueueCreate(UserQueueCreate::decode(bytes)?),
            Command::UserQueueDestroy => {
                Request::UserQueueDestroy(UserQueueDestroy::decode(bytes)?)
            }
            Command::DoorbellKick => {
                exact_len(bytes, EMPTY_REQUEST_LEN)?;
                Request::DoorbellKick
            }
            Command::VmBind => Request::VmBind(VmBind::decode(bytes, limits.max_bind_ops)?),
            Command::RangeAttr => Request::RangeAttr(RangeAttr::decode(bytes)?),
            Command::QueueCreate => Request::QueueCreate(QueueCreate::decode(bytes)?),
            Command::QueueDestroy => Request::QueueDestroy(QueueDestroy::decode(bytes)?),
            Command::Dispatch => Request::Dispatch(Dispatch::decode(bytes)?),
            Command::FaultReply => Request::FaultReply(FaultReply::decode(bytes)?),
            Command::EventArm => {
                exact_len(bytes, EMPTY_REQUEST_LEN)?;
                if header.reply_off != NO_REPLY {
                    return Err(DecodeError::InvalidValue {
                        field: "reply_off",
                        value: u64::from(header.reply_off),
                    });
                }
                Request::EventArm
            }
            Command::SvmAttach => Request::SvmAttach(SvmAttach::decode(bytes, limits)?),
            Command::SvmDetach => {
                exact_len(bytes, SVM_DETACH_LEN)?;
                Request::SvmDetach
            }
        })
    }

    /// The command.
    pub const fn command(&self) -> Command {
        match self {
            Request::SessionInit(_) => Command::SessionInit,
            Request::SessionDestroy => Command::SessionDestroy,
            Request::DeviceQuery => Command::DeviceQuery,
            Request::QueueCounters => Command::QueueCounters,
            Request::VmBind(_) => Command::VmBind,
            Request::RangeAttr(_) => Command::RangeAttr,
            Request::QueueCreate(_) => Command::QueueCreate,
            Request::QueueDestroy(_) => Command::QueueDestroy,
            Request::Dispatch(_) => Command::Dispatch,
            Request::UserQueueCreate(_) => Command::UserQueueCreate,
            Request::UserQueueDestroy(_) => Command::UserQueueDestroy,
            Request::DoorbellKick => Command::DoorbellKick,
            Request::FaultReply(_) => Command::FaultReply,
            Request::EventArm => Command::EventArm,
            Request::SvmAttach(_) => Command::SvmAttach,
            Request::SvmDetach => Command::SvmDetach,
        }
    }

    /// Length of the encoded request, header included.
    pub fn encoded_len(&self) -> Result<u32, EncodeError> {
        let len: u64 = match self {
            Request::SessionInit(_) => SESSION_INIT_LEN as u64,
            Request::SessionDestroy
            | Request::DeviceQuery
            | Request::QueueCounters
            | Request::DoorbellKick
            | Request::EventArm
            | Request::SvmDetach => EMPTY_REQUEST_LEN as u64,
            Request::SvmAttach(_) => SVM_ATTACH_LEN as u64,
            Request::UserQueueCreate(_) => crate::uq::USER_QUEUE_CREATE_LEN as u64,
            Request::UserQueueDestroy(_) => crate::uq::USER_QUEUE_DESTROY_LEN as u64,
            Request::VmBind(bind) => bind.encoded_len().unwrap_or(u64::MAX),
            Request::RangeAttr(attr) => attr.encoded_len() as u64,
            Request::QueueCreate(_) | Request::QueueDestroy(_) => QUEUE_REQUEST_LEN as u64,
            Request::Dispatch(d) => (DISPATCH_FIXED_LEN + d.kernel.args_len()) as u64,
            Request::FaultReply(reply) => reply.encoded_len().unwrap_or(u64::MAX),
        };
        u32::try_from(len).map_err(|_| EncodeError::TooLarge {
            len,
            max: u64::from(u32::MAX),
        })
    }

    /// Appends the request with this `seqno` and `reply_off` to `out`.
    /// This only lays out bytes; [`crate::writer::RequestWriter`] also
    /// checks the result against the decoder.
    pub fn encode(&self, seqno: u32, reply_off: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let len = self.encoded_len()?;
        let start = out.len();
        out.resize(start.saturating_add(len as usize), 0);
        let Some(buf) = out.get_mut(start..) else {
            return Ok(());
        };
        RequestHeader {
            cmd: self.command().as_u32(),
            len,
            seqno,
            reply_off,
        }
        .write(buf);
        match self {
            Request::SessionInit(r) => r.write(buf),
            Request::SessionDestroy
            | Request::DeviceQuery
            | Request::QueueCounters
            | Request::DoorbellKick
            | Request::EventArm
            | Request::SvmDetach => {}
            Request::SvmAttach(r) => r.write(buf),
            Request::UserQueueCreate(r) => r.write(buf),
            Request::UserQueueDestroy(r) => r.write(buf),
            Request::VmBind(r) => r.write(buf),
            Request::RangeAttr(r) => r.write(buf),
            Request::QueueCreate(r) => r.write(buf),
            Request::QueueDestroy(r) => r.write(buf),
            Request::Dispatch(r) => r.write(buf),
            Request::FaultReply(r) => r.write(buf),
        }
        Ok(())
    }
}
