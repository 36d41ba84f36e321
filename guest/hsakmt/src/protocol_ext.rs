//! The protocol 1.1 requests the thunk needs for user queues
//! (`USER_QUEUE_CREATE`, `USER_QUEUE_DESTROY`, `DOORBELL_KICK`). They go
//! through the `guest-proto` codec once it has them (branch `rocm-host`);
//! until then a device never advertises `USER_QUEUES` to this thunk
//! (`queues::device_has_user_queues`) and these are not reached.

use guest_proto::QueueId;
use guest_runtime::session::Session;

use crate::queues::Kind;
use crate::types::*;

/// A user queue's addresses, all GPU VAs in this process's VM (identity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserQueueSpec {
    /// SDMA or AQL.
    pub kind: Kind,
    /// 0 ..= 15.
    pub priority: u32,
    /// Ring base.
    pub ring: u64,
    /// Ring bytes.
    pub ring_size: u64,
    /// Read pointer (device writes).
    pub rptr: u64,
    /// Write pointer.
    pub wptr: u64,
    /// Doorbell.
    pub doorbell: u64,
    /// Status block.
    pub status: u64,
}

/// `USER_QUEUE_CREATE`.
pub fn user_queue_create(
    _session: &mut Session,
    _spec: &UserQueueSpec,
) -> Result<QueueId, HsakmtStatus> {
    Err(HSAKMT_STATUS_NOT_SUPPORTED)
}

/// `USER_QUEUE_DESTROY`.
pub fn user_queue_destroy(_session: &mut Session, _queue: QueueId) -> Result<(), HsakmtStatus> {
    Err(HSAKMT_STATUS_NOT_SUPPORTED)
}

/// `DOORBELL_KICK` (a hint; failures do not matter).
pub fn doorbell_kick(_session: &mut Session) {}
