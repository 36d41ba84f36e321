//! Protocol 1.1: the guest kernel owns a session's faults
//! (docs/protocol.md section 15).
//!
//! A guest kernel driver that mirrors a process's address space with HMM
//! and MMU notifiers (guest/kernel/) takes a session's faults over with
//! `SVM_ATTACH`: it names a fault ring and a reply region by guest-physical
//! address, memory user space cannot reach. From then on the session's
//! fault records go to the kernel's ring, its requests with `KERNEL_REPLY`
//! offsets reply into the kernel's region, and the context is *mediated*:
//! in the native profile only the kernel's ring (63) may bind guest pages
//! (`MAP_PAGES`) or answer faults, so the guest kernel's notifiers cannot
//! be bypassed. `SVM_DETACH` (or the end of the session) gives the faults
//! back.
//!
//! Which submissions are the kernel's: in a native context (created with
//! `CONTEXT_INIT` for our capset) those fenced on ring 63, which the guest
//! driver never lets user space use; in a compat context every submission
//! (the device cannot tell, the guest driver filters user submissions).

use guest_proto::fault::FaultRingLayout;
use guest_proto::header::{NO_REPLY, ReplySlot, RequestHeader};
use guest_proto::reply::{Reply, ReplyPayload};
use guest_proto::stream::Framed;
use guest_proto::svm::{
    FAULT_RING_STATE_OFFSET, GpaRegion, KERNEL_EVENT_RING, KERNEL_RING, RingState, SvmAttach,
    SvmAttachReply, kernel_reply_offset, kernel_reply_slot,
};
use guest_proto::{Command, PAGE_SIZE, Request, Status};
use vm_memory::GuestAddress;

use super::region::{GuestRegion, RegionError};
use super::ring::FaultRingWriter;
use super::session::{ComputeSession, write_reply};
use crate::context_backend::{FenceRef, GuestBacking};
use gpu_backend::GuestRam;

/// Per-context state of protocol 1.1 that outlives sessions.
#[derive(Debug, Default)]
pub struct ContextSvm {
    /// A guest kernel attached to a session of this context once: from
    /// then on (for the context's life) user requests may not bind guest
    /// pages or answer faults (native profile).
    pub mediated: bool,
}

/// Where a request came from, as far as the device can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The context was created with `CONTEXT_INIT` for our capset: its
    /// submissions carry ring indices the device can trust.
    pub native: bool,
    /// A kernel request (2.1): on ring 63 of a native context, any
    /// request of a compat one.
    pub kernel: bool,
}

impl Origin {
    /// The origin of a submission with `fence` on a context that is
    /// `native` or not.
    pub fn of(native: bool, fence: Option<FenceRef>) -> Origin {
        let on_kernel_ring = fence.is_some_and(|f| f.ring_idx == Some(KERNEL_RING));
        Origin {
            native,
            kernel: !native || on_kernel_ring,
        }
    }

    /// A user request of a mediated native context: no `MAP_PAGES`, no
    /// `FAULT_REPLY`.
    pub fn restricted(&self, svm: &ContextSvm) -> bool {
        svm.mediated && self.native && !self.kernel
    }
}

/// The guest kernel's side of an attached session.
#[derive(Debug)]
pub struct KernelAttachment {
    ring: FaultRingWriter,
    /// The first 128 bytes of the ring, for `state`.
    header: GuestRegion,
    reply: GuestRegion,
    held_event: Option<FenceRef>,
}

impl KernelAttachment {
    /// The kernel's fault ring.
    pub fn ring_mut(&mut self) -> &mut FaultRingWriter {
        &mut self.ring
    }

    /// Whether the kernel's ring holds records the kernel has not read.
    pub fn has_unread(&self) -> bool {
        self.ring.has_unread()
    }

    fn set_state(&self, state: RingState) {
        if let Err(e) = self
            .header
            .store_u32_release(FAULT_RING_STATE_OFFSET, state as u32)
        {
            log::debug!("kernel fault ring: state not written: {e}");
        }
    }

    /// The kernel's `EVENT_ARM` (ring 62): returns the previously held
    /// fence (to complete now) and whether `fence` is held.
    pub fn arm(&mut self, fence: FenceRef) -> (Option<FenceRef>, bool) {
        let previous = self.held_event.take();
        if self.ring.has_unread() {
            log::trace!("kernel EVENT_ARM {}: records pending", fence.fence_id);
            (previous, false)
        } else {
            log::trace!("kernel EVENT_ARM {}: held", fence.fence_id);
            self.held_event = Some(fence);
            (previous, true)
        }
    }

    /// The held `EVENT_ARM`, if the kernel's ring now has records for it.
    pub fn due_event(&mut self) -> Option<FenceRef> {
        if self.held_event.is_some() && self.ring.has_unread() {
            let due = self.held_event.take();
            log::trace!("kernel EVENT_ARM {:?}: completed", due.map(|f| f.fence_id));
            due
        } else {
            None
        }
    }

    /// Ends the attachment: `state` becomes `DETACHED` and the device
    /// never writes the kernel's regions again (they are dropped here).
    /// Returns the held `EVENT_ARM`, to complete.
    pub fn end(mut self) -> Option<FenceRef> {
        self.set_state(RingState::Detached);
        self.held_event.take()
    }
}

/// A region of `size` bytes of physically contiguous guest RAM at `gpa`.
fn contiguous(memory: &GuestRam, r: &GpaRegion) -> Result<GuestRegion, Status> {
    let pages = r
        .size
        .checked_next_multiple_of(PAGE_SIZE)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(Status::InvalidArgument)?;
    let backing = GuestBacking {
        entries: vec![(GuestAddress(r.gpa.raw()), pages)],
    };
    GuestRegion::new(memory.clone(), &backing, 0, r.size).map_err(|e| match e {
        RegionError::Unaligned(_) => Status::Misaligned,
        RegionError::OutOfRange { .. }
        | RegionError::NotGuestRam(_)
        | RegionError::Outside { .. }
        | RegionError::Memory(_) => Status::OutOfRange,
    })
}

/// Where the reply of a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The session's reply buffer (1.0).
    User(ReplySlot),
    /// The kernel reply region of the attachment.
    Kernel(ReplySlot),
}

impl Target {
    /// Whether the request asked for no reply.
    pub fn is_none(&self) -> bool {
        matches!(self, Target::User(ReplySlot::None))
    }
}

/// Where the reply of a request other than `SVM_ATTACH`/`SVM_DETACH` goes
/// (2.1): a `KERNEL_REPLY` offset of a kernel request of an attached
/// session into the kernel region, any other offset by the 1.0 rules. A
/// request whose reply has no place is not executed: `None`.
pub fn reply_target(
    header: &RequestHeader,
    session: &ComputeSession,
    origin: Origin,
) -> Option<Target> {
    if kernel_reply_offset(header.reply_off).is_some() {
        let region = session.kernel.as_ref().filter(|_| origin.kernel)?;
        return match kernel_reply_slot(header, region.reply.size())? {
            Ok(slot) => Some(Target::Kernel(slot)),
            Err(lost) => {
                log::debug!("kernel reply: {lost}");
                None
            }
        };
    }
    match header.reply_slot(session.reply_size()) {
        Ok(slot) => Some(Target::User(slot)),
        Err(lost) => {
            log::debug!("{lost}");
            None
        }
    }
}

/// Writes `reply` where `target` says; a reply that cannot be written
/// counts as lost.
pub fn post(session: &mut ComputeSession, target: Target, reply: &Reply) {
    match target {
        Target::User(slot) => session.post_reply(slot, reply),
        Target::Kernel(ReplySlot::None) => {}
        Target::Kernel(ReplySlot::At { offset, .. }) => {
            let written = session
                .kernel
                .as_ref()
                .map(|k| write_reply(&k.reply, offset, reply));
            if !matches!(written, Some(Ok(()))) {
                log::debug!("kernel reply {} not written", reply.seqno);
                session.count_lost_reply();
            }
        }
    }
}

/// Whether `cmd` is handled here rather than by the session.
pub fn is_svm_command(cmd: u32) -> bool {
    cmd == Command::SvmAttach.as_u32() || cmd == Command::SvmDetach.as_u32()
}

/// What the device offers.
#[derive(Clone, Copy, Debug)]
pub struct SvmEnv<'a> {
    /// Guest RAM.
    pub memory: &'a GuestRam,
    /// Capset feature `KERNEL_SVM`.
    pub enabled: bool,
    /// The capset's `max_fault_ring_records`.
    pub max_ring_records: u32,
}

/// Runs `SVM_ATTACH` or `SVM_DETACH` (the caller checked
/// [`is_svm_command`]); returns fences to complete.
pub fn handle(
    env: &SvmEnv<'_>,
    svm: &mut ContextSvm,
    session: &mut ComputeSession,
    framed: &Framed<'_>,
    origin: Origin,
) -> Vec<FenceRef> {
    let header = framed.header;
    if !origin.kernel {
        // A user request: 1.0 reply rules, never a write into memory it
        // names; a KERNEL_REPLY offset does not fit the reply buffer.
        match header.reply_slot(session.reply_size()) {
            Ok(slot) => session.post_reply(
                slot,
                &Reply::error(header.seqno, header.cmd, Status::Permission),
            ),
            Err(lost) => {
                log::debug!("user {:#x}: {lost}", header.cmd);
                session.count_lost_reply();
            }
        }
        return Vec::new();
    }
    if header.cmd == Command::SvmAttach.as_u32() {
        attach(env, svm, session, framed);
        Vec::new()
    } else {
        detach(session, framed)
    }
}

/// The reply of a kernel `SVM_ATTACH`/`SVM_DETACH` that names no
/// `KERNEL_REPLY` offset: `ERR_INVALID_ARGUMENT` at its 1.0 slot, if any;
/// not executed.
fn refuse_user_offset(session: &mut ComputeSession, header: &RequestHeader) {
    match header.reply_slot(session.reply_size()) {
        Ok(slot) => session.post_reply(
            slot,
            &Reply::error(header.seqno, header.cmd, Status::InvalidArgument),
        ),
        Err(_) => session.count_lost_reply(),
    }
}

fn attach(
    env: &SvmEnv<'_>,
    svm: &mut ContextSvm,
    session: &mut ComputeSession,
    framed: &Framed<'_>,
) {
    let header = framed.header;
    if header.reply_off != NO_REPLY && kernel_reply_offset(header.reply_off).is_none() {
        refuse_user_offset(session, &header);
        return;
    }
    let request = match framed.decode() {
        Ok(Request::SvmAttach(a)) => a,
        Ok(_) => return,
        Err(e) => {
            log::debug!("SVM_ATTACH refused: {e}");
            if let Some(reply) = SvmAttach::reply_region_of(framed.bytes) {
                write_proposed(env.memory, &reply, &header, e.status(), 0);
            }
            return;
        }
    };
    // The reply slot in the proposed region; no place: not executed.
    let slot = match kernel_reply_slot(&header, request.reply.size) {
        None => ReplySlot::None,
        Some(Ok(slot)) => slot,
        Some(Err(lost)) => {
            log::debug!("SVM_ATTACH: {lost}");
            session.count_lost_reply();
            return;
        }
    };
    let capacity = match start_attachment(env, session, &request) {
        Ok(attachment) => {
            let capacity = request
                .fault_ring_layout()
                .map_or(0, |l: FaultRingLayout| l.capacity());
            session.attach_kernel(attachment);
            svm.mediated = true;
            log::debug!(
                "SVM_ATTACH: kernel ring at {} ({capacity} records), replies at {}",
                request.fault_ring.gpa,
                request.reply.gpa
            );
            Ok(capacity)
        }
        Err(status) => {
            log::debug!("SVM_ATTACH failed: {}", status.name());
            Err(status)
        }
    };
    if let ReplySlot::At { .. } = slot {
        let (status, capacity) = match capacity {
            Ok(c) => (Status::Ok, c),
            Err(s) => (s, 0),
        };
        write_proposed(env.memory, &request.reply, &header, status, capacity);
    }
}

/// Checks an attach against the device and the session and builds the
/// attachment: the ring's header initialised, `state` = `ATTACHED`.
fn start_attachment(
    env: &SvmEnv<'_>,
    session: &ComputeSession,
    request: &SvmAttach,
) -> Result<KernelAttachment, Status> {
    if !env.enabled {
        return Err(Status::Unsupported);
    }
    if session.kernel.is_some() {
        return Err(Status::SessionActive);
    }
    let layout = FaultRingLayout::from_size(request.fault_ring.size, env.max_ring_records)
        .map_err(|e| e.status())?;
    let reply = contiguous(env.memory, &request.reply)?;
    let ring_region = contiguous(env.memory, &request.fault_ring)?;
    let header = contiguous(
        env.memory,
        &GpaRegion {
            gpa: request.fault_ring.gpa,
            size: guest_proto::fault::FAULT_RING_HEADER_SIZE,
        },
    )?;
    for r in [&request.fault_ring, &request.reply] {
        let end = r.end().ok_or(Status::OutOfRange)?;
        if session.overlaps_regions(r.gpa.raw(), end) {
            return Err(Status::InvalidArgument);
        }
    }
    let ring = FaultRingWriter::init(ring_region, layout).ok_or(Status::OutOfRange)?;
    let attachment = KernelAttachment {
        ring,
        header,
        reply,
        held_event: None,
    };
    attachment.set_state(RingState::Attached);
    Ok(attachment)
}

/// Writes a reply into the region an `SVM_ATTACH` proposes (the kernel's;
/// only ever for a kernel request).
fn write_proposed(
    memory: &GuestRam,
    region: &GpaRegion,
    header: &RequestHeader,
    status: Status,
    capacity: u32,
) {
    let Some(Ok(ReplySlot::At { offset, .. })) = kernel_reply_slot(header, region.size) else {
        return;
    };
    let Ok(buffer) = contiguous(memory, region) else {
        return;
    };
    let reply = Reply {
        seqno: header.seqno,
        status,
        payload: ReplyPayload::SvmAttach(SvmAttachReply {
            fault_ring_capacity: capacity,
        }),
    };
    if let Err(e) = write_reply(&buffer, offset, &reply) {
        log::debug!("SVM_ATTACH reply not written: {e}");
    }
}

fn detach(session: &mut ComputeSession, framed: &Framed<'_>) -> Vec<FenceRef> {
    let header = framed.header;
    if header.reply_off != NO_REPLY && kernel_reply_offset(header.reply_off).is_none() {
        refuse_user_offset(session, &header);
        return Vec::new();
    }
    // The reply goes into the current kernel region.
    let slot = match session.kernel.as_ref() {
        Some(k) => match kernel_reply_slot(&header, k.reply.size()) {
            None => ReplySlot::None,
            Some(Ok(slot)) => slot,
            Some(Err(lost)) => {
                log::debug!("SVM_DETACH: {lost}");
                session.count_lost_reply();
                return Vec::new();
            }
        },
        // No attachment and so no region to answer in.
        None if header.reply_off == NO_REPLY => ReplySlot::None,
        None => {
            log::debug!("SVM_DETACH without an attachment");
            session.count_lost_reply();
            return Vec::new();
        }
    };
    let status = match framed.decode() {
        Ok(Request::SvmDetach) if session.kernel.is_some() => Status::Ok,
        Ok(_) => Status::InvalidArgument,
        Err(e) => e.status(),
    };
    let reply = Reply {
        seqno: header.seqno,
        status,
        payload: ReplyPayload::SvmDetach,
    };
    if status != Status::Ok {
        post(session, Target::Kernel(slot), &reply);
        return Vec::new();
    }
    // 1. pending faults end REJECTED, 2. the kernel's event completes,
    // 3. DETACHED, 4. the reply, then never again a write.
    let Some(mut attachment) = session.detach_kernel() else {
        return Vec::new();
    };
    let held = attachment.held_event.take();
    attachment.set_state(RingState::Detached);
    if let ReplySlot::At { offset, .. } = slot {
        if let Err(e) = write_reply(&attachment.reply, offset, &reply) {
            log::debug!("SVM_DETACH reply not written: {e}");
        }
    }
    drop(attachment);
    log::debug!("SVM_DETACH: faults back to the session's own ring");
    held.into_iter().collect()
}

/// The kernel's `EVENT_ARM` on ring 62 of an attached session of a native
/// context: `Some((previous fence to complete, held))`, or `None` if this
/// `EVENT_ARM` is not the kernel's.
pub fn kernel_event_arm(
    session: &mut ComputeSession,
    origin: Origin,
    fence: Option<FenceRef>,
) -> Option<(Option<FenceRef>, bool)> {
    let fence = fence.filter(|f| f.ring_idx == Some(KERNEL_EVENT_RING))?;
    if !origin.native {
        return None;
    }
    let kernel = session.kernel.as_mut()?;
    Some(kernel.arm(fence))
}

#[cfg(test)]
mod tests;
