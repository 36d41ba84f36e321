//! A native-context session from the guest side: discovery, the session's
//! shared memory, requests and replies, queues, signals and the fault
//! resolver (docs/protocol.md sections 3, 5, 7, 8, 9).

use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::drm::{Bo, Drm, Mapping, param};
use crate::memory;
use crate::{GuestError, Result};
use guest_proto::attr::{RangeAttr, RangeAttrs};
use guest_proto::bind::{BindOp, PageList, VmBind};
use guest_proto::capset::{CAPSET_MAX_VERSION, CAPSET_SIZE, Capset, VGNC_CAPSET_ID};
use guest_proto::command::{Dispatch, Profile, QueueCreate, QueueDestroy, Region, SessionInit};
use guest_proto::fault::{
    FAULT_RING_HEAD_OFFSET, FAULT_RING_TAIL_OFFSET, FaultCause, FaultOutcome, FaultRecord,
    FaultReply, FaultReplyEntry, FaultRingLayout,
};
use guest_proto::reply::{Reply, ReplyPayload};
use guest_proto::signal::SignalSlot;
use guest_proto::writer::RequestWriter;
use guest_proto::{
    DispatchStatus, FaultId, GpuVa, GuestPhysAddr, Kernel, PAGE_SIZE, Perms, QueueId, Request,
    ResourceId, SignalIndex, Status,
};

/// What the device offers, as this guest sees it.
#[derive(Debug)]
pub struct Device {
    drm: Drm,
    /// Render node path.
    pub path: PathBuf,
    /// The decoded capset.
    pub capset: Capset,
    /// `VIRTGPU_PARAM_3D_FEATURES`.
    pub virgl: bool,
    /// `VIRTGPU_PARAM_CONTEXT_INIT`.
    pub context_init: bool,
    /// `VIRTGPU_PARAM_RESOURCE_BLOB`.
    pub blob: bool,
}

/// The transport profile (section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileKind {
    /// Stock QEMU: memory polling.
    Compat,
    /// CONTEXT_INIT + blobs: event ring.
    Native,
}

impl Device {
    /// Opens the first render node whose device serves our capset.
    pub fn open() -> Result<Device> {
        let mut last = GuestError::NoDevice;
        for minor in 128..136 {
            let path = PathBuf::from(format!("/dev/dri/renderD{minor}"));
            if !path.exists() {
                continue;
            }
            match Self::probe(path) {
                Ok(d) => return Ok(d),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn probe(path: PathBuf) -> Result<Device> {
        let drm = Drm::open(&path).map_err(|e| GuestError::io("open render node", e))?;
        let on = |p| drm.param(p).is_some_and(|v| v != 0);
        let (virgl, context_init, blob) = (
            on(param::FEATURES_3D),
            on(param::CONTEXT_INIT),
            on(param::RESOURCE_BLOB),
        );
        let raw = drm
            .capset(VGNC_CAPSET_ID, CAPSET_MAX_VERSION, CAPSET_SIZE)
            .map_err(|e| GuestError::io("GET_CAPS 24", e))?;
        let capset = Capset::decode(&raw).map_err(GuestError::Decode)?;
        Ok(Device {
            drm,
            path,
            capset,
            virgl,
            context_init,
            blob,
        })
    }

    /// The profile the features allow.
    pub fn profile(&self) -> ProfileKind {
        if self.context_init && self.blob {
            ProfileKind::Native
        } else {
            ProfileKind::Compat
        }
    }
}

/// A device buffer shared with the device, mapped into this process.
#[derive(Debug)]
pub struct SharedBuffer {
    /// GEM handle and resource id.
    pub bo: Bo,
    /// The mapping.
    pub map: Mapping,
}

impl SharedBuffer {
    /// The resource id.
    pub fn resource(&self) -> ResourceId {
        ResourceId(self.bo.res_id)
    }
}

// Session memory layout inside one shared buffer.
const REPLY_OFF: u64 = 0;
const REPLY_SIZE: u64 = 4096;
const RING_OFF: u64 = 4096;
const RING_CAPACITY: u32 = 256;
const SIGNALS_OFF: u64 = 16384;
const SIGNAL_SLOTS: u64 = 128;
const SESSION_BYTES: u64 = SIGNALS_OFF + SIGNAL_SLOTS * 32;
/// How long a reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Granules resolved per `SUBMIT_3D`.
const RESOLVE_BATCH: usize = 16;

/// What the resolver does with faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolvePolicy {
    /// Bind memory the process owns, reject the rest.
    Resolve,
    /// Reject everything.
    RejectAll,
    /// Never answer (a guest that hangs).
    Ignore,
}

/// A range of process memory the GPU may reach at a GPU VA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnedRange {
    /// GPU VA of the first byte.
    pub gpu: u64,
    /// CPU address of the first byte.
    pub cpu: u64,
    /// Length in bytes (page multiple).
    pub len: u64,
}

/// A session of one render-node file.
#[derive(Debug)]
pub struct Session {
    device: Device,
    profile: ProfileKind,
    shared: SharedBuffer,
    seq: u32,
    head: u32,
    ranges: Vec<OwnedRange>,
    policy: ResolvePolicy,
    faults_seen: u64,
    signals_va: GpuVa,
}

/// Back-off for polling guest memory the device writes: spin briefly,
/// then yield, then sleep up to 2 ms.
#[derive(Debug, Default)]
pub struct Backoff {
    round: u32,
}

impl Backoff {
    /// The pause before the next poll.
    pub fn next_pause(&mut self) -> Duration {
        self.round = self.round.saturating_add(1);
        match self.round {
            0..=64 => Duration::ZERO,
            65..=128 => Duration::from_micros(10),
            n => Duration::from_micros(u64::from(n.min(400) - 128) * 10)
                .min(Duration::from_millis(2)),
        }
    }

    /// Waits before the next poll.
    pub fn wait(&mut self) {
        match self.next_pause() {
            Duration::ZERO => std::hint::spin_loop(),
            d if d < Duration::from_micros(20) => std::thread::yield_now(),
            d => sleep(d),
        }
    }
}

impl Session {
    /// Opens a session on `device` with its profile.
    pub fn open(device: Device) -> Result<Session> {
        let profile = device.profile();
        if profile == ProfileKind::Native {
            device
                .drm
                .context_init(VGNC_CAPSET_ID, 2, 1 << 1)
                .map_err(|e| GuestError::io("CONTEXT_INIT", e))?;
        }
        let shared = alloc(&device.drm, profile, SESSION_BYTES)?;
        let res = shared.resource();
        let ring_size = FaultRingLayout::new(RING_CAPACITY)
            .ok_or(GuestError::Invalid("ring capacity"))?
            .size();
        let wire_profile = match profile {
            ProfileKind::Compat => Profile::Compat,
            ProfileKind::Native => Profile::Native { event_ring: 1 },
        };
        let init = SessionInit::new(
            wire_profile,
            Region {
                resource: res,
                offset: REPLY_OFF,
                size: REPLY_SIZE,
            },
            Region {
                resource: res,
                offset: RING_OFF,
                size: ring_size,
            },
            Region {
                resource: res,
                offset: SIGNALS_OFF,
                size: SIGNAL_SLOTS * 32,
            },
        );
        let mut s = Session {
            device,
            profile,
            shared,
            seq: 1,
            head: 0,
            ranges: Vec::new(),
            policy: ResolvePolicy::Resolve,
            faults_seen: 0,
            signals_va: GpuVa(0),
        };
        let reply = s.call(&Request::SessionInit(init))?;
        if let ReplyPayload::SessionInit(r) = reply.payload {
            s.signals_va = r.signals_va;
        }
        Ok(s)
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The profile in use.
    pub fn profile(&self) -> ProfileKind {
        self.profile
    }

    /// Where the device mapped the signal area.
    pub fn signals_va(&self) -> GpuVa {
        self.signals_va
    }

    /// Fault records read so far.
    pub fn faults_seen(&self) -> u64 {
        self.faults_seen
    }

    /// Sets what the resolver does.
    pub fn set_policy(&mut self, policy: ResolvePolicy) {
        self.policy = policy;
    }

    /// Lets the resolver bind `range` on faults.
    pub fn own(&mut self, range: OwnedRange) {
        self.ranges.push(range);
    }

    /// A new shared buffer of `size` bytes, mapped.
    pub fn alloc(&self, size: u64) -> Result<SharedBuffer> {
        alloc(&self.device.drm, self.profile, size)
    }

    /// Sends requests in one submission and waits for all their replies.
    pub fn call_many(&mut self, requests: &[Request<'_>]) -> Result<Vec<Reply>> {
        let mut w = RequestWriter::new(0..REPLY_SIZE as u32)
            .with_first_seqno(self.seq)
            .with_limits(guest_proto::command::DecodeLimits::from_capset(
                &self.device.capset,
            ));
        let mut tickets = Vec::with_capacity(requests.len());
        for r in requests {
            tickets.push(w.push(r).map_err(GuestError::Encode)?);
        }
        self.seq = w.next_seqno();
        let ring = (self.profile == ProfileKind::Native).then_some(0);
        self.device
            .drm
            .execbuffer(w.as_bytes(), ring)
            .map_err(|e| GuestError::io("EXECBUFFER", e))?;
        let mut replies = Vec::with_capacity(tickets.len());
        for t in tickets {
            let Some(off) = t.reply_off else {
                continue;
            };
            replies.push(self.wait_reply(off as usize, t.seqno, t.reply_len as usize)?);
        }
        Ok(replies)
    }

    /// Sends one request and returns its reply if its status is `OK`.
    pub fn call(&mut self, request: &Request<'_>) -> Result<Reply> {
        let reply = self
            .call_many(std::slice::from_ref(request))?
            .into_iter()
            .next()
            .ok_or(GuestError::Invalid("no reply"))?;
        check(reply)
    }

    fn wait_reply(&self, off: usize, seqno: u32, len: usize) -> Result<Reply> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut backoff = Backoff::default();
        while self.shared.map.load_u32(off) != Some(seqno) {
            if Instant::now() > deadline {
                return Err(GuestError::Timeout("reply"));
            }
            backoff.wait();
        }
        let bytes = self
            .shared
            .map
            .as_slice()
            .get(off..off + len)
            .ok_or(GuestError::Invalid("reply offset"))?;
        Reply::decode(bytes).map_err(GuestError::Decode)
    }

    /// Applies bind ops; returns the session's bound bytes.
    pub fn bind(&mut self, ops: &[BindOp<'_>]) -> Result<u64> {
        let reply = self.call(&Request::VmBind(VmBind::new(ops)))?;
        match reply.payload {
            ReplyPayload::VmBind(b) => Ok(b.bound_bytes),
            _ => Err(GuestError::Invalid("VM_BIND reply")),
        }
    }

    /// Maps a shared buffer at `va`.
    pub fn map_buffer(&mut self, buf: &SharedBuffer, va: u64, perms: Perms) -> Result<u64> {
        self.bind(&[BindOp::MapResource {
            va: GpuVa(va),
            size: buf.map.len() as u64,
            perms,
            resource: buf.resource(),
            offset: 0,
        }])
    }

    /// Pins process memory and maps its pages at `gpu` (a userptr bind).
    pub fn map_host(&mut self, cpu: u64, gpu: u64, len: u64, perms: Perms) -> Result<u64> {
        memory::pin(cpu, len).map_err(|e| GuestError::io("pin", e))?;
        let pages = memory::frames(cpu, len).map_err(|e| GuestError::io("pagemap", e))?;
        let mut bound = 0;
        for (i, chunk) in pages.chunks(512).enumerate() {
            let va = GpuVa(gpu + i as u64 * 512 * PAGE_SIZE);
            bound = self.bind(&[BindOp::MapPages {
                va,
                perms,
                pages: PageList::new(chunk),
            }])?;
        }
        Ok(bound)
    }

    /// Sets range attributes.
    pub fn set_attrs(&mut self, va: u64, size: u64, attrs: RangeAttrs) -> Result<()> {
        self.call(&Request::RangeAttr(RangeAttr {
            va: GpuVa(va),
            size,
            attrs,
        }))
        .map(|_| ())
    }

    /// Creates a queue.
    pub fn create_queue(&mut self) -> Result<QueueId> {
        match self
            .call(&Request::QueueCreate(QueueCreate { priority: 0 }))?
            .payload
        {
            ReplyPayload::QueueCreate(q) => Ok(q.queue),
            _ => Err(GuestError::Invalid("QUEUE_CREATE reply")),
        }
    }

    /// Destroys a queue.
    pub fn destroy_queue(&mut self, queue: QueueId) -> Result<()> {
        self.call(&Request::QueueDestroy(QueueDestroy { queue }))
            .map(|_| ())
    }

    /// Queues `kernel` on `queue`, signalling `slot` with `value`.
    pub fn dispatch(
        &mut self,
        queue: QueueId,
        kernel: Kernel,
        slot: u32,
        value: u64,
    ) -> Result<()> {
        let d = Dispatch {
            queue,
            kernel,
            signal: Some(SignalIndex(slot)),
            notify: self.profile == ProfileKind::Native,
            completion_value: value,
        };
        // Clear the slot so a stale value from an earlier use cannot match.
        self.clear_slot(slot)?;
        self.call(&Request::Dispatch(d)).map(|_| ())
    }

    fn clear_slot(&mut self, slot: u32) -> Result<()> {
        let off = (SIGNALS_OFF + u64::from(slot) * 32) as usize;
        let bytes = self.shared.map.as_mut_slice();
        bytes
            .get_mut(off..off + 32)
            .ok_or(GuestError::Invalid("signal slot"))?
            .fill(0);
        Ok(())
    }

    /// The signal slot as the device last wrote it.
    pub fn signal(&self, slot: u32) -> Result<SignalSlot> {
        let off = (SIGNALS_OFF + u64::from(slot) * 32) as usize;
        let _ = self.shared.map.load_u64(off);
        let bytes = self
            .shared
            .map
            .as_slice()
            .get(off..off + 32)
            .ok_or(GuestError::Invalid("signal slot"))?;
        SignalSlot::decode(bytes).map_err(GuestError::Decode)
    }

    /// Waits until `slot` holds `value`, resolving faults meanwhile.
    pub fn wait_signal(&mut self, slot: u32, value: u64, timeout: Duration) -> Result<SignalSlot> {
        let off = (SIGNALS_OFF + u64::from(slot) * 32) as usize;
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::default();
        loop {
            if self.shared.map.load_u64(off) == Some(value) {
                return self.signal(slot);
            }
            if self.pump_faults()? > 0 {
                backoff = Backoff::default();
                continue;
            }
            if Instant::now() > deadline {
                return Err(GuestError::Timeout("signal"));
            }
            backoff.wait();
        }
    }

    /// Runs a kernel and waits for it: `Ok(status)`.
    pub fn run(&mut self, queue: QueueId, kernel: Kernel, timeout: Duration) -> Result<SignalSlot> {
        let value = u64::from(self.seq) << 8 | 1;
        self.dispatch(queue, kernel, 0, value)?;
        self.wait_signal(0, value, timeout)
    }

    /// New fault records (consumed from the ring).
    pub fn take_faults(&mut self) -> Result<Vec<FaultRecord>> {
        let ring = RING_OFF as usize;
        let Some(tail) = self
            .shared
            .map
            .load_u32(ring + FAULT_RING_TAIL_OFFSET as usize)
        else {
            return Ok(Vec::new());
        };
        let layout = FaultRingLayout::new(RING_CAPACITY).ok_or(GuestError::Invalid("ring"))?;
        let mut out = Vec::new();
        // A tail more than a ring ahead is garbage: read at most a ring.
        for _ in 0..RING_CAPACITY {
            if self.head == tail {
                break;
            }
            let at = ring + layout.record_offset(self.head) as usize;
            let bytes = self
                .shared
                .map
                .as_slice()
                .get(at..at + 32)
                .ok_or(GuestError::Invalid("fault record"))?;
            out.push(FaultRecord::decode(bytes).map_err(GuestError::Decode)?);
            self.head = self.head.wrapping_add(1);
        }
        self.shared
            .map
            .store_u32(ring + FAULT_RING_HEAD_OFFSET as usize, self.head);
        self.faults_seen += out.len() as u64;
        Ok(out)
    }

    /// Reads the fault ring and answers what it finds; returns how many
    /// records it handled.
    pub fn pump_faults(&mut self) -> Result<usize> {
        let faults = self.take_faults()?;
        if faults.is_empty() || self.policy == ResolvePolicy::Ignore {
            return Ok(faults.len());
        }
        for batch in faults.chunks(RESOLVE_BATCH) {
            self.resolve_batch(batch)?;
        }
        Ok(faults.len())
    }

    fn resolve_batch(&mut self, faults: &[FaultRecord]) -> Result<()> {
        let mut pages: Vec<(u64, Vec<GuestPhysAddr>)> = Vec::new();
        let mut answers = Vec::new();
        for f in faults {
            let resolved = match self.policy {
                ResolvePolicy::Resolve => self.resolve(f)?,
                _ => None,
            };
            let outcome = match resolved {
                Some(p) => {
                    pages.push(p);
                    FaultOutcome::Resolved
                }
                None => FaultOutcome::Rejected,
            };
            answers.push(FaultReplyEntry {
                fault_id: f.fault_id,
                outcome,
            });
        }
        let ops: Vec<BindOp<'_>> = pages
            .iter()
            .map(|(va, p)| BindOp::MapPages {
                va: GpuVa(*va),
                perms: Perms::RW,
                pages: PageList::new(p),
            })
            .collect();
        let mut requests = Vec::new();
        for op in ops.chunks(1) {
            requests.push(Request::VmBind(VmBind::new(op)));
        }
        requests.push(Request::FaultReply(FaultReply::new(&answers)));
        let replies = self.call_many(&requests)?;
        for r in replies {
            if r.status != Status::Ok && r.status != Status::UnknownFault {
                log::warn!(
                    "resolver: {:#x} answered {}",
                    r.payload.cmd(),
                    r.status.name()
                );
            }
        }
        Ok(())
    }

    /// The pages to bind for a fault: the part of its granule that lies in
    /// memory this process owns, pinned. `None`: not ours.
    fn resolve(&self, f: &FaultRecord) -> Result<Option<(u64, Vec<GuestPhysAddr>)>> {
        let va = f.va.raw();
        let Some(range) = self
            .ranges
            .iter()
            .find(|r| va >= r.gpu && va - r.gpu < r.len)
        else {
            return Ok(None);
        };
        let granule = 1u64 << f.granule_shift.clamp(12, 30);
        let start = (va & !(granule - 1)).max(range.gpu);
        let end = ((va | (granule - 1)) + 1).min(range.gpu + range.len);
        let cpu = range.cpu + (start - range.gpu);
        memory::pin(cpu, end - start).map_err(|e| GuestError::io("pin", e))?;
        let frames = memory::frames(cpu, end - start).map_err(|e| GuestError::io("pagemap", e))?;
        Ok(Some((start, frames)))
    }

    /// `DEVICE_QUERY` counters.
    pub fn query(&mut self) -> Result<guest_proto::reply::DeviceQueryReply> {
        match self.call(&Request::DeviceQuery)?.payload {
            ReplyPayload::DeviceQuery(q) => Ok(q),
            _ => Err(GuestError::Invalid("DEVICE_QUERY reply")),
        }
    }

    /// Ends the session.
    pub fn destroy(mut self) -> Result<()> {
        self.call(&Request::SessionDestroy).map(|_| ())
    }
}

fn alloc(drm: &Drm, profile: ProfileKind, size: u64) -> Result<SharedBuffer> {
    let size = size.next_multiple_of(PAGE_SIZE);
    let bo = match profile {
        ProfileKind::Compat => {
            let s = u32::try_from(size).map_err(|_| GuestError::Invalid("buffer size"))?;
            drm.create_buffer(s)
        }
        ProfileKind::Native => drm.create_blob(size),
    }
    .map_err(|e| GuestError::io("create buffer", e))?;
    let map = Mapping::new(drm, bo, size as usize).map_err(|e| GuestError::io("mmap buffer", e))?;
    Ok(SharedBuffer { bo, map })
}

fn check(reply: Reply) -> Result<Reply> {
    if reply.status == Status::Ok {
        Ok(reply)
    } else {
        Err(GuestError::Status {
            cmd: reply.payload.cmd(),
            status: reply.status,
        })
    }
}

/// Whether a fault record is a prefetch.
pub fn is_prefetch(f: &FaultRecord) -> bool {
    matches!(f.cause, FaultCause::Prefetch)
}

/// The status of a finished dispatch, as an error if it failed.
pub fn dispatch_ok(slot: &SignalSlot) -> Result<()> {
    if slot.status == DispatchStatus::Ok {
        Ok(())
    } else {
        Err(GuestError::Dispatch(slot.status, slot.error_va))
    }
}

/// Fault ids of records.
pub fn ids(faults: &[FaultRecord]) -> Vec<FaultId> {
    faults.iter().map(|f| f.fault_id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_spins_then_sleeps_at_most_2ms() {
        let mut b = Backoff::default();
        let pauses: Vec<Duration> = (0..1000).map(|_| b.next_pause()).collect();
        assert_eq!(pauses[0], Duration::ZERO);
        assert_eq!(pauses[100], Duration::from_micros(10));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*pauses.last().unwrap(), Duration::from_millis(2));
    }
}
