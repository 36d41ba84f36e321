//! The protocol 1.1 requests the thunk needs for user queues
//! (`USER_QUEUE_CREATE`, `USER_QUEUE_DESTROY`, `DOORBELL_KICK`,
//! `QUEUE_COUNTERS`, docs/protocol.md section 14), encoded by
//! `guest-proto` and sent through the guest runtime's client.

use guest_proto::uq::{QueueCountersReply, UserQueueCreate, UserQueueKind};
use guest_proto::{GpuVa, QueueId};
use guest_runtime::session::Session;

use crate::thunk::OrStatus;
use crate::types::*;

/// A user queue's addresses, all GPU VAs in this process's VM (identity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserQueueSpec {
    /// SDMA or AQL.
    pub kind: UserQueueKind,
    /// 0 ..= 15.
    pub priority: u8,
    /// Ring base.
    pub ring: u64,
    /// Ring bytes.
    pub ring_size: u64,
    /// Read pointer (device writes).
    pub rptr: u64,
    /// Write pointer (0: none).
    pub wptr: u64,
    /// Doorbell.
    pub doorbell: u64,
    /// Status block.
    pub status: u64,
}

impl UserQueueSpec {
    /// The request.
    pub fn request(&self) -> UserQueueCreate {
        UserQueueCreate {
            kind: self.kind,
            priority: self.priority,
            ring: GpuVa(self.ring),
            ring_size: self.ring_size,
            rptr: GpuVa(self.rptr),
            wptr: (self.wptr != 0).then_some(GpuVa(self.wptr)),
            doorbell: GpuVa(self.doorbell),
            status: (self.status != 0).then_some(GpuVa(self.status)),
        }
    }
}

/// `USER_QUEUE_CREATE`.
pub fn user_queue_create(
    session: &mut Session,
    spec: &UserQueueSpec,
) -> Result<QueueId, HsakmtStatus> {
    session
        .client()
        .create_user_queue(&spec.request())
        .or_status("USER_QUEUE_CREATE")
        .map_err(|s| {
            // KFD answers a full queue table with ENOSPC, which the real
            // thunk reports as OUT_OF_RESOURCES.
            if s == HSAKMT_STATUS_NO_MEMORY {
                HSAKMT_STATUS_OUT_OF_RESOURCES
            } else {
                s
            }
        })
}

/// `USER_QUEUE_DESTROY`.
pub fn user_queue_destroy(session: &mut Session, queue: QueueId) -> Result<(), HsakmtStatus> {
    session
        .client()
        .destroy_user_queue(queue)
        .or_status("USER_QUEUE_DESTROY")
}

/// `DOORBELL_KICK` (a hint, sent without a reply; failures do not matter:
/// the device also watches the doorbells on its own).
pub fn doorbell_kick(session: &mut Session) {
    if let Err(e) = session.client().kick_doorbells() {
        crate::debug(|| format!("DOORBELL_KICK: {e}"));
    }
}

/// `QUEUE_COUNTERS`.
pub fn queue_counters(session: &mut Session) -> Result<QueueCountersReply, HsakmtStatus> {
    session
        .client()
        .queue_counters()
        .or_status("QUEUE_COUNTERS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_becomes_the_request_with_absent_pointers_as_none() {
        let spec = UserQueueSpec {
            kind: UserQueueKind::Aql,
            priority: 15,
            ring: 0x10_0000,
            ring_size: 0x1_0000,
            rptr: 0x20_0080,
            wptr: 0,
            doorbell: 0x30_0008,
            status: 0x40_0080,
        };
        let r = spec.request();
        assert_eq!(r.kind, UserQueueKind::Aql);
        assert_eq!(r.priority, 15);
        assert_eq!(r.ring, GpuVa(0x10_0000));
        assert_eq!(r.rptr, GpuVa(0x20_0080));
        assert_eq!(r.wptr, None);
        assert_eq!(r.doorbell, GpuVa(0x30_0008));
        assert_eq!(r.status, Some(GpuVa(0x40_0080)));
        // It encodes and decodes as the device will see it.
        let req = guest_proto::Request::UserQueueCreate(r);
        let mut bytes = Vec::new();
        req.encode(1, 0, &mut bytes).unwrap();
        assert_eq!(bytes.len(), guest_proto::uq::USER_QUEUE_CREATE_LEN);
        assert_eq!(guest_proto::Request::decode(&bytes).unwrap(), req);
    }
}
