//! Reply payloads: encoded by the device, decoded by the guest.
//!
//! Every command has a fixed reply length and its payload is present
//! whatever the status, zero-filled where it means nothing
//! (`docs/protocol.md` 4.2). [`ReplyPayload`] therefore has one variant per
//! command, and the command and length of a reply follow from it, so the
//! device cannot write a reply whose length disagrees with its `cmd`.
//!
//! The device must write `seqno` last, with release ordering, because the
//! guest polls it. [`EncodedReply`] hands the bytes out in that order: the
//! part after `seqno` first, then the `seqno` value to store.

use crate::error::DecodeError;
use crate::header::{REPLY_HEADER_SIZE, ReplyHeader};
use crate::opcode::{Command, reply_len};
use crate::status::Status;
use crate::svm::SvmAttachReply;
use crate::types::{GpuVa, QueueId};
use crate::uq::QueueCountersReply;
use crate::wire::{put_u32, put_u64, reserved_at, u32_at, u64_at};

/// Longest reply (`DEVICE_QUERY`).
pub const MAX_REPLY_LEN: usize = 80;

/// `SESSION_INIT` reply payload.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct SessionInitReply {
    /// Records in the fault ring.
    pub fault_ring_capacity: u32,
    /// Slots in the signal area.
    pub signal_slots: u32,
    /// Where the device mapped the signal area (informational).
    pub signals_va: GpuVa,
}

/// `DEVICE_QUERY` reply payload: counters of the session.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct DeviceQueryReply {
    /// Fault records delivered, prefault records included.
    pub faults_raised: u64,
    /// Faults that ended resolved.
    pub faults_resolved: u64,
    /// Faults that ended rejected.
    pub faults_rejected: u64,
    /// Faults that ended timed out.
    pub faults_timed_out: u64,
    /// Faults ended by queue or session teardown.
    pub faults_cancelled: u64,
    /// Dispatches that ended.
    pub dispatches_done: u64,
    /// Bytes bound in the session's VM.
    pub bound_bytes: u64,
    /// Queues that exist.
    pub queues: u32,
    /// Requests not executed because their reply had no place.
    pub lost_replies: u32,
}

/// `VM_BIND` reply payload.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct VmBindReply {
    /// Ops applied; on error, the index of the op that failed.
    pub ops_done: u32,
    /// Bytes bound in the session's VM afterwards.
    pub bound_bytes: u64,
}

/// `QUEUE_CREATE` reply payload.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct QueueCreateReply {
    /// The new queue (0 when the status is an error).
    pub queue: QueueId,
}

/// `FAULT_REPLY` reply payload.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct FaultReplyAck {
    /// Entries that ended a pending fault.
    pub accepted: u32,
    /// Entries whose fault was not pending.
    pub unknown: u32,
}

/// The payload of a reply, which also fixes its `cmd` and length.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ReplyPayload {
    /// `SESSION_INIT`, 16 bytes.
    SessionInit(SessionInitReply),
    /// `SESSION_DESTROY`, header only.
    SessionDestroy,
    /// `DEVICE_QUERY`, 64 bytes.
    DeviceQuery(DeviceQueryReply),
    /// `QUEUE_COUNTERS`, 32 bytes (1.1).
    QueueCounters(QueueCountersReply),
    /// `VM_BIND`, 16 bytes.
    VmBind(VmBindReply),
    /// `RANGE_ATTR`, header only.
    RangeAttr,
    /// `QUEUE_CREATE`, 8 bytes.
    QueueCreate(QueueCreateReply),
    /// `QUEUE_DESTROY`, header only.
    QueueDestroy,
    /// `DISPATCH`, header only.
    Dispatch,
    /// `USER_QUEUE_CREATE`, 8 bytes (1.1): the queue id.
    UserQueueCreate(QueueCreateReply),
    /// `USER_QUEUE_DESTROY`, header only (1.1).
    UserQueueDestroy,
    /// `DOORBELL_KICK`, header only (1.1).
    DoorbellKick,
    /// `FAULT_REPLY`, 8 bytes.
    FaultReply(FaultReplyAck),
    /// `EVENT_ARM` that asked for a reply (an error), header only.
    EventArm,
    /// `SVM_ATTACH` (1.1), 8 bytes.
    SvmAttach(SvmAttachReply),
    /// `SVM_DETACH` (1.1), header only.
    SvmDetach,
    /// An undefined `cmd` (never a defined one), header only.
    Unknown(u32),
}

impl ReplyPayload {
    /// The all-zero payload of `cmd`, for an error reply.
    pub fn zeroed(cmd: u32) -> ReplyPayload {
        match Command::from_u32(cmd) {
            Some(Command::SessionInit) => ReplyPayload::SessionInit(SessionInitReply::default()),
            Some(Command::SessionDestroy) => ReplyPayload::SessionDestroy,
            Some(Command::DeviceQuery) => ReplyPayload::DeviceQuery(DeviceQueryReply::default()),
            Some(Command::QueueCounters) => {
                ReplyPayload::QueueCounters(QueueCountersReply::default())
            }
            Some(Command::VmBind) => ReplyPayload::VmBind(VmBindReply::default()),
            Some(Command::RangeAttr) => ReplyPayload::RangeAttr,
            Some(Command::QueueCreate) => {
                ReplyPayload::QueueCreate(QueueCreateReply { queue: QueueId(0) })
            }
            Some(Command::QueueDestroy) => ReplyPayload::QueueDestroy,
            Some(Command::Dispatch) => ReplyPayload::Dispatch,
            Some(Command::UserQueueCreate) => {
                ReplyPayload::UserQueueCreate(QueueCreateReply { queue: QueueId(0) })
            }
            Some(Command::UserQueueDestroy) => ReplyPayload::UserQueueDestroy,
            Some(Command::DoorbellKick) => ReplyPayload::DoorbellKick,
            Some(Command::FaultReply) => ReplyPayload::FaultReply(FaultReplyAck::default()),
            Some(Command::EventArm) => ReplyPayload::EventArm,
            Some(Command::SvmAttach) => ReplyPayload::SvmAttach(SvmAttachReply::default()),
            Some(Command::SvmDetach) => ReplyPayload::SvmDetach,
            None => ReplyPayload::Unknown(cmd),
        }
    }

    /// The `cmd` of the reply.
    pub const fn cmd(&self) -> u32 {
        let command = match self {
            ReplyPayload::SessionInit(_) => Command::SessionInit,
            ReplyPayload::SessionDestroy => Command::SessionDestroy,
            ReplyPayload::DeviceQuery(_) => Command::DeviceQuery,
            ReplyPayload::QueueCounters(_) => Command::QueueCounters,
            ReplyPayload::VmBind(_) => Command::VmBind,
            ReplyPayload::RangeAttr => Command::RangeAttr,
            ReplyPayload::QueueCreate(_) => Command::QueueCreate,
            ReplyPayload::QueueDestroy => Command::QueueDestroy,
            ReplyPayload::Dispatch => Command::Dispatch,
            ReplyPayload::UserQueueCreate(_) => Command::UserQueueCreate,
            ReplyPayload::UserQueueDestroy => Command::UserQueueDestroy,
            ReplyPayload::DoorbellKick => Command::DoorbellKick,
            ReplyPayload::FaultReply(_) => Command::FaultReply,
            ReplyPayload::EventArm => Command::EventArm,
            ReplyPayload::SvmAttach(_) => Command::SvmAttach,
            ReplyPayload::SvmDetach => Command::SvmDetach,
            ReplyPayload::Unknown(cmd) => return *cmd,
        };
        command.as_u32()
    }

    /// Length of the reply, header included.
    pub const fn reply_len(&self) -> u32 {
        reply_len(self.cmd())
    }

    fn write(&self, buf: &mut [u8]) {
        match *self {
            ReplyPayload::SessionInit(r) => {
                put_u32(buf, 16, r.fault_ring_capacity);
                put_u32(buf, 20, r.signal_slots);
                put_u64(buf, 24, r.signals_va.raw());
            }
            ReplyPayload::DeviceQuery(r) => {
                put_u64(buf, 16, r.faults_raised);
                put_u64(buf, 24, r.faults_resolved);
                put_u64(buf, 32, r.faults_rejected);
                put_u64(buf, 40, r.faults_timed_out);
                put_u64(buf, 48, r.faults_cancelled);
                put_u64(buf, 56, r.dispatches_done);
                put_u64(buf, 64, r.bound_bytes);
                put_u32(buf, 72, r.queues);
                put_u32(buf, 76, r.lost_replies);
            }
            ReplyPayload::VmBind(r) => {
                put_u32(buf, 16, r.ops_done);
                put_u64(buf, 24, r.bound_bytes);
            }
            ReplyPayload::QueueCounters(r) => {
                put_u64(buf, 16, r.user_queue_packets);
                put_u64(buf, 24, r.copy_bytes);
                put_u64(buf, 32, r.interrupts);
                put_u64(buf, 40, r.doorbell_polls);
            }
            ReplyPayload::QueueCreate(r) | ReplyPayload::UserQueueCreate(r) => {
                put_u32(buf, 16, r.queue.0)
            }
            ReplyPayload::FaultReply(r) => {
                put_u32(buf, 16, r.accepted);
                put_u32(buf, 20, r.unknown);
            }
            ReplyPayload::SvmAttach(r) => put_u32(buf, 16, r.fault_ring_capacity),
            ReplyPayload::SessionDestroy
            | ReplyPayload::SvmDetach
            | ReplyPayload::RangeAttr
            | ReplyPayload::QueueDestroy
            | ReplyPayload::Dispatch
            | ReplyPayload::UserQueueDestroy
            | ReplyPayload::DoorbellKick
            | ReplyPayload::EventArm
            | ReplyPayload::Unknown(_) => {}
        }
    }

    /// Decodes the payload of a reply to `cmd`; `bytes` is the whole reply,
    /// of the right length.
    fn decode(cmd: u32, bytes: &[u8]) -> Result<ReplyPayload, DecodeError> {
        let Some(command) = Command::from_u32(cmd) else {
            return Ok(ReplyPayload::Unknown(cmd));
        };
        Ok(match command {
            Command::SessionInit => ReplyPayload::SessionInit(SessionInitReply {
                fault_ring_capacity: u32_at(bytes, 16)?,
                signal_slots: u32_at(bytes, 20)?,
                signals_va: GpuVa(u64_at(bytes, 24)?),
            }),
            Command::SessionDestroy => ReplyPayload::SessionDestroy,
            Command::DeviceQuery => ReplyPayload::DeviceQuery(DeviceQueryReply {
                faults_raised: u64_at(bytes, 16)?,
                faults_resolved: u64_at(bytes, 24)?,
                faults_rejected: u64_at(bytes, 32)?,
                faults_timed_out: u64_at(bytes, 40)?,
                faults_cancelled: u64_at(bytes, 48)?,
                dispatches_done: u64_at(bytes, 56)?,
                bound_bytes: u64_at(bytes, 64)?,
                queues: u32_at(bytes, 72)?,
                lost_replies: u32_at(bytes, 76)?,
            }),
            Command::QueueCounters => ReplyPayload::QueueCounters(QueueCountersReply {
                user_queue_packets: u64_at(bytes, 16)?,
                copy_bytes: u64_at(bytes, 24)?,
                interrupts: u64_at(bytes, 32)?,
                doorbell_polls: u64_at(bytes, 40)?,
            }),
            Command::UserQueueCreate => {
                reserved_at(bytes, 20, 4, "reserved")?;
                ReplyPayload::UserQueueCreate(QueueCreateReply {
                    queue: QueueId(u32_at(bytes, 16)?),
                })
            }
            Command::UserQueueDestroy => ReplyPayload::UserQueueDestroy,
            Command::DoorbellKick => ReplyPayload::DoorbellKick,
            Command::VmBind => {
                reserved_at(bytes, 20, 4, "reserved")?;
                ReplyPayload::VmBind(VmBindReply {
                    ops_done: u32_at(bytes, 16)?,
                    bound_bytes: u64_at(bytes, 24)?,
                })
            }
            Command::RangeAttr => ReplyPayload::RangeAttr,
            Command::QueueCreate => {
                reserved_at(bytes, 20, 4, "reserved")?;
                ReplyPayload::QueueCreate(QueueCreateReply {
                    queue: QueueId(u32_at(bytes, 16)?),
                })
            }
            Command::QueueDestroy => ReplyPayload::QueueDestroy,
            Command::Dispatch => ReplyPayload::Dispatch,
            Command::FaultReply => ReplyPayload::FaultReply(FaultReplyAck {
                accepted: u32_at(bytes, 16)?,
                unknown: u32_at(bytes, 20)?,
            }),
            Command::EventArm => ReplyPayload::EventArm,
            Command::SvmAttach => {
                reserved_at(bytes, 20, 4, "reserved")?;
                ReplyPayload::SvmAttach(SvmAttachReply {
                    fault_ring_capacity: u32_at(bytes, 16)?,
                })
            }
            Command::SvmDetach => ReplyPayload::SvmDetach,
        })
    }
}

/// A whole reply.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Reply {
    /// The request's `seqno`.
    pub seqno: u32,
    /// The outcome.
    pub status: Status,
    /// The payload, which fixes `cmd` and `len`.
    pub payload: ReplyPayload,
}

impl Reply {
    /// An error reply to a request with this `cmd`: zero payload.
    pub fn error(seqno: u32, cmd: u32, status: Status) -> Reply {
        Reply {
            seqno,
            status,
            payload: ReplyPayload::zeroed(cmd),
        }
    }

    /// The reply header.
    pub const fn header(&self) -> ReplyHeader {
        ReplyHeader {
            seqno: self.seqno,
            status: self.status,
            len: self.payload.reply_len(),
            cmd: self.payload.cmd(),
        }
    }

    /// The wire form.
    pub fn encode(&self) -> EncodedReply {
        let mut bytes = [0u8; MAX_REPLY_LEN];
        self.header().write(&mut bytes);
        self.payload.write(&mut bytes);
        EncodedReply {
            bytes,
            len: self.payload.reply_len() as usize,
        }
    }

    /// Reads a reply (guest side): a defined status, the length the `cmd`
    /// has, reserved fields zero. `bytes` may be longer than the reply.
    pub fn decode(bytes: &[u8]) -> Result<Reply, DecodeError> {
        let header = ReplyHeader::decode(bytes)?;
        let expected = reply_len(header.cmd) as usize;
        if header.len as usize != expected {
            return Err(DecodeError::WrongLength {
                expected,
                actual: header.len as usize,
            });
        }
        let reply = bytes.get(..expected).ok_or(DecodeError::TooShort {
            needed: expected,
            actual: bytes.len(),
        })?;
        Ok(Reply {
            seqno: header.seqno,
            status: header.status,
            payload: ReplyPayload::decode(header.cmd, reply)?,
        })
    }
}

/// An encoded reply, laid out for the device's write order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EncodedReply {
    bytes: [u8; MAX_REPLY_LEN],
    len: usize,
}

impl EncodedReply {
    /// The whole reply.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&self.bytes)
    }

    /// Everything after `seqno` (bytes `4 .. len`): write this first.
    pub fn after_seqno(&self) -> &[u8] {
        self.as_bytes().get(4..).unwrap_or_default()
    }

    /// The `seqno` to store at offset 0 last, with release ordering.
    pub fn seqno(&self) -> u32 {
        u32_at(&self.bytes, 0).unwrap_or_default()
    }

    /// Length of the reply.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Never true: a reply has at least its header.
    pub const fn is_empty(&self) -> bool {
        self.len < REPLY_HEADER_SIZE
    }
}
