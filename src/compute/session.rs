//! A native-context session: one guest context's GPU VM, queues and shared
//! memory, and the execution of its requests (docs/protocol.md 5).
//!
//! A session starts with `SESSION_INIT`, which names three regions of guest
//! resources: the reply buffer, the fault ring and the signal area. From
//! then on every request's reply goes into the reply buffer (payload first,
//! `seqno` last with release ordering), forwarded faults go into the fault
//! ring, and the device writes completion signals into the signal area
//! through the session's own GPU VM, where the signal area is mapped in the
//! reserved range.

use std::sync::Arc;
use std::time::Duration;

use gpu_backend::context::{
    BoundBytesQuota, ComputeContext, ContextConfig, ContextError, DispatchRequest, GuestAnswer,
};
use gpu_backend::gpuvm::{AttrUpdate, VaLayout};
use gpu_backend::{Completion, Device, GuestRam, UserQueueDesc};
use guest_proto::command::{Dispatch, Profile, SessionInit};
use guest_proto::fault::FaultOutcome;
use guest_proto::header::ReplySlot;
use guest_proto::reply::{
    DeviceQueryReply, FaultReplyAck, QueueCreateReply, Reply, ReplyPayload, SessionInitReply,
    VmBindReply,
};
use guest_proto::signal::SIGNAL_SLOT_SIZE;
use guest_proto::uq::{QueueCountersReply, UserQueueCreate};
use guest_proto::{GpuVa, PAGE_SIZE, Perms, Request, ResourceId, Status};

use super::region::{GuestRegion, RegionError};
use super::resources::Resources;
use super::ring::FaultRingWriter;
use super::svm::KernelAttachment;
use crate::context_backend::FenceRef;
use crate::metrics::CtxSample;

/// Limits and settings every session of a guest shares.
#[derive(Clone, Debug)]
pub struct SessionLimits {
    /// VA layout.
    pub layout: VaLayout,
    /// Fault answer deadline.
    pub fault_timeout: Duration,
    /// Pending faults per session.
    pub max_pending_faults: u32,
    /// Dispatches per queue.
    pub max_queue_depth: u32,
    /// Queues per session (user queues included).
    pub max_queues: u32,
    /// User queues per session (1.1); 0 when the device has none.
    pub max_user_queues: u32,
    /// Bit `1 << kind` for every user queue kind offered (the capset's
    /// `user_queue_kinds`); 0 when user queues are not offered.
    pub user_queue_kinds: u32,
}

/// What a session needs from its surroundings to start.
#[allow(missing_debug_implementations)]
pub struct SessionEnv<'a> {
    /// The GPU.
    pub device: &'a dyn Device,
    /// Guest RAM.
    pub memory: &'a GuestRam,
    /// Limits.
    pub limits: &'a SessionLimits,
    /// The guest's bound-bytes allowance.
    pub quota: &'a Arc<BoundBytesQuota>,
    /// Resources attached to the context.
    pub resources: &'a Resources,
    /// Whether the context was created for our capset (CONTEXT_INIT).
    pub native_capable: bool,
    /// Wakes the thread that drives the sessions when the device has events.
    pub waker: gpu_backend::context::Waker,
}

/// One live session.
#[derive(Debug)]
pub struct ComputeSession {
    ctx: ComputeContext,
    profile: Profile,
    reply: GuestRegion,
    ring: FaultRingWriter,
    signals: GuestRegion,
    /// 1.1: the guest kernel took the faults over (`SVM_ATTACH`).
    pub(super) kernel: Option<KernelAttachment>,
    /// 1.1: the request being executed is a user request of a mediated
    /// native context: `MAP_PAGES` and `FAULT_REPLY` are refused.
    pub(super) restricted: bool,
    signal_slots: u32,
    signals_va: GpuVa,
    region_resources: [ResourceId; 3],
    lost_replies: u32,
    ring_capacity: u32,
    held_event: Option<FenceRef>,
    /// A `NOTIFY` dispatch ended, or an interrupt was raised, while no
    /// `EVENT_ARM` was held.
    pending_notify: bool,
    /// Interrupts raised so far (the ring's `interrupts`, unwrapped).
    interrupts: u64,
    user_queue_kinds: u32,
}

fn region_status(e: RegionError) -> Status {
    match e {
        RegionError::OutOfRange { .. }
        | RegionError::NotGuestRam(_)
        | RegionError::Outside { .. }
        | RegionError::Memory(_) => Status::OutOfRange,
        RegionError::Unaligned(_) => Status::Misaligned,
    }
}

/// Writes `reply` at `offset` of `buffer`: the payload and header after
/// `seqno` first, then `seqno` with release ordering (4.2).
pub fn write_reply(buffer: &GuestRegion, offset: u32, reply: &Reply) -> Result<(), RegionError> {
    let encoded = reply.encode();
    let off = u64::from(offset);
    buffer.write(off + 4, encoded.after_seqno())?;
    buffer.store_u32_release(off, encoded.seqno())
}

impl ComputeSession {
    /// Starts a session as `init` asks. On error, the status for the reply.
    pub fn start(init: &SessionInit, env: &SessionEnv<'_>) -> Result<ComputeSession, Status> {
        if matches!(init.profile, Profile::Native { .. }) && !env.native_capable {
            return Err(Status::Version);
        }
        let region = |r: &guest_proto::command::Region| -> Result<GuestRegion, Status> {
            let backing = env
                .resources
                .backing(r.resource)
                .ok_or(Status::UnknownResource)?;
            GuestRegion::new(env.memory.clone(), &backing, r.offset, r.size).map_err(region_status)
        };
        let reply = region(&init.reply)?;
        let ring_region = region(&init.fault_ring)?;
        let signals = region(&init.signals)?;
        let layout = init.fault_ring_layout().ok_or(Status::InvalidArgument)?;
        let signal_slots = init.signal_slots().ok_or(Status::InvalidArgument)?;

        let limits = env.limits;
        let config = ContextConfig {
            layout: limits.layout.clone(),
            fault_timeout: limits.fault_timeout,
            max_pending_faults: limits.max_pending_faults,
            max_queue_depth: limits.max_queue_depth,
            max_queues: limits.max_queues,
            max_user_queues: limits.max_user_queues,
            bound_quota: env.quota.clone(),
            waker: Some(env.waker.clone()),
        };
        let mut ctx =
            ComputeContext::new(env.device, env.memory.clone(), config).map_err(|e| e.status())?;

        // The signal area goes into the reserved range, page-granular.
        let sig = init.signals;
        let first = sig.offset - sig.offset % PAGE_SIZE;
        let end = sig
            .end()
            .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
            .ok_or(Status::OutOfRange)?;
        let base = limits.layout.reserved.start;
        ctx.map_reserved(
            base,
            end - first,
            sig.resource,
            first,
            Perms::RW,
            env.resources,
        )
        .map_err(|e| e.status())?;
        let signals_va = GpuVa(base.raw() + sig.offset % PAGE_SIZE);

        let ring = FaultRingWriter::init(ring_region, layout).ok_or(Status::OutOfRange)?;
        Ok(ComputeSession {
            ctx,
            profile: init.profile,
            reply,
            ring,
            signals,
            kernel: None,
            restricted: false,
            signal_slots,
            signals_va,
            region_resources: [init.reply.resource, init.fault_ring.resource, sig.resource],
            lost_replies: 0,
            ring_capacity: layout.capacity(),
            held_event: None,
            pending_notify: false,
            interrupts: 0,
            user_queue_kinds: limits.user_queue_kinds,
        })
    }

    /// The reply to a successful start.
    pub fn init_reply(&self, seqno: u32) -> Reply {
        Reply {
            seqno,
            status: Status::Ok,
            payload: ReplyPayload::SessionInit(SessionInitReply {
                fault_ring_capacity: self.ring_capacity(),
                signal_slots: self.signal_slots,
                signals_va: self.signals_va,
            }),
        }
    }

    fn ring_capacity(&self) -> u32 {
        self.ring_capacity
    }

    /// The profile.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Whether resource `id` holds one of the session's regions.
    pub fn uses_resource(&self, id: ResourceId) -> bool {
        self.region_resources.contains(&id)
    }

    /// The reply buffer's size.
    pub fn reply_size(&self) -> u64 {
        self.reply.size()
    }

    /// Whether a byte of the reply buffer, fault ring or signal area lies
    /// in guest-physical `[start, end)`.
    pub fn overlaps_regions(&self, start: u64, end: u64) -> bool {
        self.reply.overlaps_gpa(start, end)
            || self.ring.region().overlaps_gpa(start, end)
            || self.signals.overlaps_gpa(start, end)
    }

    /// 1.1 `SVM_ATTACH`: from now on faults go to the kernel's ring,
    /// starting with every pending one, oldest first.
    pub(super) fn attach_kernel(&mut self, attachment: KernelAttachment) {
        self.ctx.repost_faults();
        self.kernel = Some(attachment);
    }

    /// 1.1 `SVM_DETACH`: pending faults end rejected and later ones go to
    /// the session's own ring again; returns the attachment to end.
    pub(super) fn detach_kernel(&mut self) -> Option<KernelAttachment> {
        let attachment = self.kernel.take()?;
        self.ctx.reject_faults();
        Some(attachment)
    }

    /// A request was not executed because its reply had no place.
    pub fn count_lost_reply(&mut self) {
        self.lost_replies = self.lost_replies.saturating_add(1);
    }

    /// Writes `reply` into its slot of the reply buffer: everything after
    /// the `seqno` first, then the `seqno` with release ordering. A reply
    /// that cannot be written (guest RAM changed under the session) counts
    /// as lost, like a reply without a place (4.2).
    pub fn post_reply(&mut self, slot: ReplySlot, reply: &Reply) {
        let ReplySlot::At { offset, .. } = slot else {
            return;
        };
        if let Err(e) = write_reply(&self.reply, offset, reply) {
            log::debug!("reply {} not written: {e}", reply.seqno);
            self.count_lost_reply();
        }
    }

    /// Runs one decoded request (not `SESSION_INIT`/`SESSION_DESTROY`/
    /// `EVENT_ARM`, which need the caller) and returns its reply.
    pub fn execute(&mut self, seqno: u32, request: &Request<'_>, res: &Resources) -> Reply {
        let cmd = request.command().as_u32();
        let result = match request {
            Request::SessionInit(_) => Err(Status::SessionActive),
            Request::DeviceQuery => Ok(ReplyPayload::DeviceQuery(self.query())),
            Request::VmBind(bind) => return self.vm_bind(seqno, bind, res),
            Request::RangeAttr(attr) => {
                let a = attr.attrs;
                let update = AttrUpdate {
                    access: a.access,
                    fault_policy: a.fault_policy,
                    granule_shift: a.granule_shift,
                };
                let prefault = a.prefault == Some(true);
                self.ctx
                    .set_attrs(attr.va, attr.size, update, prefault)
                    .map(|()| ReplyPayload::RangeAttr)
                    .map_err(|e| e.status())
            }
            Request::QueueCreate(q) => self
                .ctx
                .create_queue(q.priority)
                .map(|queue| ReplyPayload::QueueCreate(QueueCreateReply { queue }))
                .map_err(|e| e.status()),
            Request::QueueDestroy(q) => self
                .ctx
                .destroy_queue(q.queue)
                .map(|()| ReplyPayload::QueueDestroy)
                .map_err(|e| e.status()),
            Request::Dispatch(d) => self.dispatch(d).map(|()| ReplyPayload::Dispatch),
            Request::FaultReply(_) if self.restricted => Err(Status::Permission),
            Request::FaultReply(f) => {
                let mut ack = FaultReplyAck::default();
                for entry in f.entries() {
                    let answer = match entry.outcome {
                        FaultOutcome::Resolved => GuestAnswer::Resolved,
                        FaultOutcome::Rejected => GuestAnswer::Rejected,
                    };
                    if self.ctx.answer_fault(entry.fault_id, answer) {
                        ack.accepted += 1;
                    } else {
                        ack.unknown += 1;
                    }
                }
                let status = if ack.unknown == 0 {
                    Status::Ok
                } else {
                    Status::UnknownFault
                };
                return Reply {
                    seqno,
                    status,
                    payload: ReplyPayload::FaultReply(ack),
                };
            }
            Request::SessionDestroy
            | Request::EventArm
            | Request::SvmAttach(_)
            | Request::SvmDetach => Err(Status::InvalidArgument),
            Request::UserQueueCreate(q) => self
                .user_queue_create(q)
                .map(|queue| ReplyPayload::UserQueueCreate(QueueCreateReply { queue })),
            Request::UserQueueDestroy(q) => self
                .ctx
                .destroy_queue(q.queue)
                .map(|()| ReplyPayload::UserQueueDestroy)
                .map_err(|e| e.status()),
            Request::DoorbellKick if self.user_queue_kinds != 0 => {
                self.ctx.kick();
                Ok(ReplyPayload::DoorbellKick)
            }
            Request::QueueCounters if self.user_queue_kinds != 0 => {
                let s = self.ctx.user_queue_stats();
                Ok(ReplyPayload::QueueCounters(QueueCountersReply {
                    user_queue_packets: s.device.packets,
                    copy_bytes: s.device.copy_bytes,
                    interrupts: s.interrupts,
                    doorbell_polls: s.device.doorbell_polls,
                }))
            }
            Request::DoorbellKick | Request::QueueCounters => Err(Status::Unsupported),
        };
        match result {
            Ok(payload) => Reply {
                seqno,
                status: Status::Ok,
                payload,
            },
            Err(status) => Reply::error(seqno, cmd, status),
        }
    }

    fn vm_bind(
        &mut self,
        seqno: u32,
        bind: &guest_proto::bind::VmBind<'_>,
        res: &Resources,
    ) -> Reply {
        let mut status = Status::Ok;
        let mut ops_done = 0u32;
        for op in bind.ops() {
            let result = match op {
                Ok(guest_proto::bind::BindOp::MapPages { .. }) if self.restricted => {
                    Err(Status::Permission)
                }
                Ok(op) => self.ctx.bind(&op, res).map_err(|e: ContextError| {
                    log::debug!("VM_BIND op {ops_done}: {e}");
                    e.status()
                }),
                Err(e) => Err(e.status()),
            };
            if let Err(s) = result {
                status = s;
                break;
            }
            ops_done += 1;
        }
        Reply {
            seqno,
            status,
            payload: ReplyPayload::VmBind(VmBindReply {
                ops_done,
                bound_bytes: self.ctx.stats().bound_bytes,
            }),
        }
    }

    fn user_queue_create(&mut self, q: &UserQueueCreate) -> Result<guest_proto::QueueId, Status> {
        if self.user_queue_kinds & q.kind.bit() == 0 {
            return Err(Status::Unsupported);
        }
        // The device never reads wptr, but a guest naming one outside the
        // aperture has a bug worth reporting.
        if let Some(w) = q.wptr {
            if !self.ctx.in_aperture(w, 8) {
                return Err(Status::OutOfRange);
            }
        }
        self.ctx
            .create_user_queue(UserQueueDesc {
                kind: q.kind,
                priority: q.priority,
                ring: q.ring,
                ring_size: q.ring_size,
                rptr: q.rptr,
                doorbell: q.doorbell,
                status: q.status,
            })
            .map_err(|e| {
                log::debug!("USER_QUEUE_CREATE: {e}");
                e.status()
            })
    }

    /// Makes the device look at the session's doorbells now (every request
    /// of the session is a kick, 14.4).
    pub fn kick(&self) {
        self.ctx.kick();
    }

    fn dispatch(&mut self, d: &Dispatch) -> Result<(), Status> {
        let completion = match d.signal {
            None => None,
            Some(index) if index.0 < self.signal_slots => Some(Completion {
                signal: GpuVa(self.signals_va.raw() + u64::from(index.0) * SIGNAL_SLOT_SIZE),
                value: d.completion_value,
            }),
            Some(_) => return Err(Status::BadSignal),
        };
        let notify = d.notify && matches!(self.profile, Profile::Native { .. });
        self.ctx
            .dispatch(DispatchRequest {
                queue: d.queue,
                kernel: d.kernel,
                completion,
                notify,
            })
            .map_err(|e| e.status())
    }

    fn query(&self) -> DeviceQueryReply {
        let s = self.ctx.stats();
        DeviceQueryReply {
            faults_raised: s.faults.raised,
            faults_resolved: s.faults.resolved,
            faults_rejected: s.faults.rejected,
            faults_timed_out: s.faults.timed_out,
            faults_cancelled: s.faults.cancelled,
            dispatches_done: s.dispatches_done,
            bound_bytes: s.bound_bytes,
            queues: s.queues,
            lost_replies: self.lost_replies,
        }
    }

    /// Whether the session has work that only the passing of time moves
    /// on (pending faults: deadlines, deferred records).
    pub fn has_timed_work(&self) -> bool {
        self.ctx.has_pending_faults()
    }

    /// Unmaps everything backed by `id`.
    pub fn unmap_resource(&mut self, id: ResourceId) {
        self.ctx.unmap_resource(id);
    }

    /// Moves device events into the fault ring (the kernel's while one is
    /// attached); returns the held event fences that are now due.
    pub fn pump(&mut self, now: std::time::Instant) -> Vec<FenceRef> {
        let mut due = Vec::new();
        match self.kernel.as_mut() {
            Some(kernel) => {
                self.ctx.pump(kernel.ring_mut(), now);
                due.extend(kernel.due_event());
            }
            None => {
                self.ctx.pump(&mut self.ring, now);
            }
        }
        let new_interrupts = self.ctx.take_interrupts();
        if new_interrupts > 0 {
            self.interrupts = self.interrupts.wrapping_add(new_interrupts);
            // The session's own ring's counter (never the kernel's ring),
            // the low 32 bits (14.7).
            self.ring.set_interrupts(self.interrupts as u32);
        }
        let notified = self.ctx.take_notify() || new_interrupts > 0;
        if self.held_event.is_some() && (notified || self.user_faults_unread()) {
            due.extend(self.held_event.take());
        } else if notified {
            self.pending_notify = true;
        }
        due
    }

    /// Whether the session's own ring has records for the guest (never
    /// while the kernel has the faults).
    fn user_faults_unread(&self) -> bool {
        self.kernel.is_none() && self.ring.has_unread()
    }

    /// `EVENT_ARM` with `fence`: returns the fences to complete now (a
    /// previously held one, and this one if an event is already pending);
    /// holds `fence` otherwise.
    pub fn arm_event(&mut self, fence: FenceRef) -> (Option<FenceRef>, bool) {
        let previous = self.held_event.take();
        let due = std::mem::take(&mut self.pending_notify) || self.user_faults_unread();
        if due {
            (previous, false)
        } else {
            self.held_event = Some(fence);
            (previous, true)
        }
    }

    /// Ends the session: cancels all work and faults, unmaps everything;
    /// an attached kernel's ring becomes `DETACHED`. Returns the held event
    /// fences, to be completed.
    pub fn destroy(self) -> Vec<FenceRef> {
        self.finish().0
    }

    /// [`ComputeSession::destroy`], also returning the session's final
    /// counts (faults cancelled by the teardown included), for the metrics.
    pub fn finish(mut self) -> (Vec<FenceRef>, CtxSample) {
        self.ctx.shutdown();
        let sample = self.sample();
        let mut held: Vec<FenceRef> = self.held_event.take().into_iter().collect();
        held.extend(self.kernel.take().and_then(KernelAttachment::end));
        (held, sample)
    }

    /// The session's counters now, for the metrics (docs/metrics.md).
    pub fn sample(&self) -> CtxSample {
        CtxSample {
            ctx: self.ctx.metrics(),
            lost_replies: u64::from(self.lost_replies),
        }
    }
}
