//! Native compute contexts: the protocol of docs/protocol.md on top of
//! `gpu-backend`.
//!
//! Every virtio-gpu context can become a *session* (`SESSION_INIT`); each
//! session gets its own GPU VM on the device, its own queues and its own
//! fault ring. This module turns `SUBMIT_3D` payloads into requests
//! (framing and decoding by `guest-proto`), runs them in order, writes the
//! replies into the guest's reply buffer, forwards faults, and holds the
//! native profile's event fence until an event is pending.
//!
//! - [`region`]: session memory inside guest resources.
//! - [`ring`]: the fault ring's producer side.
//! - [`resources`]: what a context may bind (isolation).
//! - [`session`]: one session and the execution of its requests.
//! - [`svm`]: protocol 1.1, the guest kernel owning a session's faults.

pub mod region;
pub mod resources;
pub mod ring;
pub mod session;
pub mod svm;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_backend::context::BoundBytesQuota;
use gpu_backend::gpuvm::VaLayout;
use gpu_backend::{Device, GuestRam};
use guest_proto::Command;
use guest_proto::capset::{CAPSET_MAX_VERSION, CAPSET_SIZE, Capset, VGNC_CAPSET_ID};
use guest_proto::command::{DecodeLimits, SessionInit};
use guest_proto::header::ReplySlot;
use guest_proto::reply::{Reply, ReplyPayload};
use guest_proto::stream::{Framed, RequestStream};
use guest_proto::{Request, ResourceId, Status};

use crate::context_backend::{
    CapsetInfo, ContextBackend, ContextBackendError, ContextBackendFactory, ContextInit, CtxId,
    FenceCompleter, FenceDisposition, FenceRef, ResourceView,
};
use crate::metrics::{GuestMetrics, Waker};
use region::GuestRegion;
use resources::Resources;
use session::{ComputeSession, SessionEnv, SessionLimits};

/// Settings of the compute layer (from the command line).
#[derive(Clone, Debug)]
pub struct ComputeConfig {
    /// Contexts per guest.
    pub max_contexts: u32,
    /// Bytes bound per guest, over all its contexts.
    pub max_bound_bytes: u64,
    /// Faults pending per session.
    pub max_pending_faults: u32,
    /// Dispatches per queue.
    pub max_queue_depth: u32,
    /// Queues per session (user queues included).
    pub max_queues: u32,
    /// User queues per session (protocol 1.1); 0 turns them off.
    pub max_user_queues: u32,
    /// How long a guest has to answer a fault.
    pub fault_timeout: Duration,
    /// Largest `SUBMIT_3D` payload.
    pub max_request_bytes: u32,
    /// Offer protocol 1.1's `KERNEL_SVM` (`SVM_ATTACH`/`SVM_DETACH`).
    pub kernel_svm: bool,
}

impl Default for ComputeConfig {
    fn default() -> ComputeConfig {
        let c = Capset::default();
        ComputeConfig {
            max_contexts: c.max_contexts,
            max_bound_bytes: c.max_bound_bytes,
            max_pending_faults: c.max_pending_faults,
            max_queue_depth: c.max_queue_depth,
            max_queues: c.max_queues,
            max_user_queues: c.max_user_queues,
            fault_timeout: Duration::from_millis(u64::from(c.fault_timeout_ms)),
            max_request_bytes: c.max_request_bytes,
            kernel_svm: true,
        }
    }
}

/// The factory the daemon calls for every connection.
pub fn factory(device: Arc<dyn Device>, config: ComputeConfig) -> ContextBackendFactory {
    factory_with_metrics(device, config, None)
}

/// [`factory`] for one connection whose contexts publish their counters
/// to `metrics` (`--metrics`).
pub fn factory_with_metrics(
    device: Arc<dyn Device>,
    config: ComputeConfig,
    metrics: Option<Arc<GuestMetrics>>,
) -> ContextBackendFactory {
    Arc::new(move |completer| {
        let mut backend = ComputeBackend::new(device.clone(), config.clone(), completer);
        if let Some(m) = &metrics {
            backend.set_metrics(m.clone());
        }
        Box::new(backend)
    })
}

/// A virtio-gpu context and, once it has one, its session.
#[derive(Debug)]
struct Context {
    init: ContextInit,
    resources: Resources,
    session: Option<ComputeSession>,
    svm: svm::ContextSvm,
}

/// The compute contexts of one connected guest.
pub struct ComputeBackend {
    device: Arc<dyn Device>,
    config: ComputeConfig,
    capset: Capset,
    limits: SessionLimits,
    memory: Option<GuestRam>,
    quota: Arc<BoundBytesQuota>,
    completer: Arc<dyn FenceCompleter>,
    /// Calls the completer's `wake` from device threads.
    waker: gpu_backend::context::Waker,
    contexts: BTreeMap<CtxId, Context>,
    /// Where the contexts' counters go (`--metrics`).
    metrics: Option<Arc<GuestMetrics>>,
}

impl std::fmt::Debug for ComputeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeBackend")
            .field("config", &self.config)
            .field("contexts", &self.contexts)
            .finish_non_exhaustive()
    }
}

/// What one `SUBMIT_3D` did, as far as its virtio response is concerned.
#[derive(Debug, Default)]
struct SubmitOutcome {
    /// The stream failed (lost framing, or requests without a session).
    failed: bool,
    /// The submit's fence is held for an `EVENT_ARM`.
    hold: bool,
}

impl ComputeBackend {
    /// Compute contexts for one connection.
    pub fn new(
        device: Arc<dyn Device>,
        config: ComputeConfig,
        completer: Arc<dyn FenceCompleter>,
    ) -> ComputeBackend {
        let capset = build_capset(device.as_ref(), &config);
        let limits = SessionLimits {
            layout: VaLayout::protocol_default(),
            fault_timeout: config.fault_timeout,
            max_pending_faults: config.max_pending_faults,
            max_queue_depth: config.max_queue_depth,
            max_queues: config.max_queues,
            max_user_queues: capset.max_user_queues,
            user_queue_kinds: capset.user_queue_kinds,
        };
        let wake = completer.clone();
        ComputeBackend {
            waker: Arc::new(move || wake.wake()),
            quota: Arc::new(BoundBytesQuota::new(config.max_bound_bytes)),
            device,
            config,
            capset,
            limits,
            memory: None,
            completer,
            contexts: BTreeMap::new(),
            metrics: None,
        }
    }

    /// Publishes the contexts' counters to `metrics` (docs/metrics.md);
    /// set before the first context is created.
    pub fn set_metrics(&mut self, metrics: Arc<GuestMetrics>) {
        metrics.set_quota(self.quota.clone(), self.config.max_contexts);
        let completer = self.completer.clone();
        metrics.set_waker(Waker(Arc::new(move || completer.wake())));
        self.metrics = Some(metrics);
    }

    /// Answers a scrape that waits for fresh counters (a relaxed load or
    /// two when none does; never blocks on the scrape). Called on every
    /// tick; a scrape wakes the worker for one.
    fn publish_metrics(&self) {
        let Some(m) = &self.metrics else {
            return;
        };
        let Some(token) = m.publish_wanted() else {
            return;
        };
        let samples = self
            .contexts
            .iter()
            .filter_map(|(id, c)| Some((id.0, c.session.as_ref()?.sample())));
        // Busy (a scrape is reading): the request stays for the next tick.
        let _ = m.publish(token, samples);
    }

    fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits::from_capset(&self.capset)
    }

    fn complete(&self, fence: Option<FenceRef>) {
        if let Some(fence) = fence {
            self.completer.complete(fence);
        }
    }

    fn handle(
        &mut self,
        ctx: CtxId,
        framed: &Framed<'_>,
        fence: Option<FenceRef>,
        outcome: &mut SubmitOutcome,
    ) {
        let Some(c) = self.contexts.get_mut(&ctx) else {
            return;
        };
        let header = framed.header;
        let origin = svm::Origin::of(c.init.capset_id == Some(VGNC_CAPSET_ID), fence);
        let Some(session) = c.session.as_mut() else {
            if header.cmd == Command::SessionInit.as_u32() {
                let started = self.start_session(ctx, framed);
                outcome.failed |= !started;
            } else {
                outcome.failed = true;
            }
            return;
        };
        if svm::is_svm_command(header.cmd) {
            let Some(memory) = self.memory.as_ref() else {
                return;
            };
            let env = svm::SvmEnv {
                memory,
                enabled: self.config.kernel_svm,
                max_ring_records: self.capset.max_fault_ring_records,
            };
            let due = svm::handle(&env, &mut c.svm, session, framed, origin);
            for fence in due {
                self.completer.complete(fence);
            }
            return;
        }
        let Some(target) = svm::reply_target(&header, session, origin) else {
            session.count_lost_reply();
            return;
        };
        let reply = match framed.decode() {
            Err(e) => Reply::error(header.seqno, header.cmd, e.status()),
            Ok(Request::SessionDestroy) => {
                let reply = Reply {
                    seqno: header.seqno,
                    status: Status::Ok,
                    payload: ReplyPayload::SessionDestroy,
                };
                svm::post(session, target, &reply);
                let held = c
                    .session
                    .take()
                    .map(|s| retire(self.metrics.as_deref(), ctx, s));
                for fence in held.into_iter().flatten() {
                    self.completer.complete(fence);
                }
                return;
            }
            Ok(Request::EventArm) => {
                self.event_arm(ctx, header.seqno, target, fence, origin, outcome);
                return;
            }
            Ok(request) => {
                session.restricted = origin.restricted(&c.svm);
                let reply = session.execute(header.seqno, &request, &c.resources);
                session.restricted = false;
                reply
            }
        };
        svm::post(session, target, &reply);
    }

    fn event_arm(
        &mut self,
        ctx: CtxId,
        seqno: u32,
        target: svm::Target,
        fence: Option<FenceRef>,
        origin: svm::Origin,
        outcome: &mut SubmitOutcome,
    ) {
        let Some(session) = self.contexts.get_mut(&ctx).and_then(|c| c.session.as_mut()) else {
            return;
        };
        let cmd = Command::EventArm.as_u32();
        if !target.is_none() {
            svm::post(
                session,
                target,
                &Reply::error(seqno, cmd, Status::InvalidArgument),
            );
            return;
        }
        if let Some((previous, hold)) = svm::kernel_event_arm(session, origin, fence) {
            outcome.hold = hold;
            self.complete(previous);
            return;
        }
        let guest_proto::command::Profile::Native { event_ring } = session.profile() else {
            return;
        };
        let Some(fence) = fence.filter(|f| f.ring_idx.map(u32::from) == Some(event_ring)) else {
            log::debug!("{ctx:?}: EVENT_ARM without a fence on ring {event_ring}");
            return;
        };
        let (previous, hold) = session.arm_event(fence);
        outcome.hold = hold;
        self.complete(previous);
    }

    /// Handles `SESSION_INIT` on a context without a session; false if it
    /// failed.
    fn start_session(&mut self, ctx: CtxId, framed: &Framed<'_>) -> bool {
        let header = framed.header;
        let Some(memory) = self.memory.clone() else {
            return false;
        };
        let Some(c) = self.contexts.get_mut(&ctx) else {
            return false;
        };
        let result = match framed.decode() {
            Ok(Request::SessionInit(init)) => {
                let env = SessionEnv {
                    device: self.device.as_ref(),
                    memory: &memory,
                    limits: &self.limits,
                    quota: &self.quota,
                    resources: &c.resources,
                    native_capable: c.init.capset_id == Some(VGNC_CAPSET_ID),
                    waker: self.waker.clone(),
                };
                check_init_reply(&init, header.reply_slot(init.reply.size))
                    .and_then(|()| ComputeSession::start(&init, &env))
            }
            Ok(_) => Err(Status::Malformed),
            Err(e) => Err(e.status()),
        };
        match result {
            Ok(mut session) => {
                if let Ok(slot) = header.reply_slot(session.reply_size()) {
                    let reply = session.init_reply(header.seqno);
                    session.post_reply(slot, &reply);
                }
                if let Some(m) = &self.metrics {
                    m.session_started(ctx.0, session.sample());
                }
                c.session = Some(session);
                true
            }
            Err(status) => {
                log::debug!("{ctx:?}: SESSION_INIT failed: {}", status.name());
                write_init_error(&memory, &c.resources, framed, status);
                false
            }
        }
    }

    fn pump_all(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        for c in self.contexts.values_mut() {
            if let Some(session) = c.session.as_mut() {
                due.extend(session.pump(now));
            }
        }
        for fence in due {
            self.completer.complete(fence);
        }
    }

    /// Ends the session of `ctx`, if any (resource going away).
    fn end_session(&mut self, ctx: CtxId) {
        let held = self
            .contexts
            .get_mut(&ctx)
            .and_then(|c| c.session.take())
            .map(|s| retire(self.metrics.as_deref(), ctx, s));
        for fence in held.into_iter().flatten() {
            self.completer.complete(fence);
        }
    }
}

/// Ends `session` of `ctx`, its final counts going to `metrics`; returns
/// its held fences.
fn retire(metrics: Option<&GuestMetrics>, ctx: CtxId, session: ComputeSession) -> Vec<FenceRef> {
    let (held, last) = session.finish();
    if let Some(m) = metrics {
        m.session_ended(ctx.0, last);
    }
    held
}

/// A `SESSION_INIT` whose own reply has no place is not executed (4.2).
fn check_init_reply(
    _init: &SessionInit,
    slot: Result<ReplySlot, guest_proto::header::ReplyLost>,
) -> Result<(), Status> {
    slot.map(|_| ()).map_err(|_| Status::InvalidArgument)
}

/// Writes a failed `SESSION_INIT`'s error reply into its own reply region,
/// if that region is usable (5.2).
fn write_init_error(memory: &GuestRam, res: &Resources, framed: &Framed<'_>, status: Status) {
    let header = framed.header;
    let Some(region) = SessionInit::reply_region_of(framed.bytes) else {
        return;
    };
    let Some(backing) = res.backing(region.resource) else {
        return;
    };
    let Ok(reply_buf) = GuestRegion::new(memory.clone(), &backing, region.offset, region.size)
    else {
        return;
    };
    if let Ok(ReplySlot::At { offset, .. }) = header.reply_slot(region.size) {
        let reply = Reply::error(header.seqno, header.cmd, status);
        if let Err(e) = session::write_reply(&reply_buf, offset, &reply) {
            log::debug!("SESSION_INIT error reply not written: {e}");
        }
    }
}

fn build_capset(device: &dyn Device, config: &ComputeConfig) -> Capset {
    let info = device.info();
    let mut capset = Capset {
        va_bits: info.va_bits,
        compute_units: info.compute_units,
        page_sizes: info.page_sizes,
        kernels: info.kernels,
        max_queues: config.max_queues.min(info.max_queues_per_vm),
        max_queue_depth: config.max_queue_depth,
        max_contexts: config.max_contexts,
        max_pending_faults: config.max_pending_faults,
        max_bound_bytes: config.max_bound_bytes,
        max_request_bytes: config.max_request_bytes,
        fault_timeout_ms: u32::try_from(config.fault_timeout.as_millis()).unwrap_or(u32::MAX),
        ..Capset::default()
    };
    if !config.kernel_svm {
        capset.features = guest_proto::capset::Features::from_bits_retain(
            capset.features.bits() & !guest_proto::capset::Features::KERNEL_SVM.bits(),
        );
    }
    // User-mode queues (protocol 1.1): offered when the device runs some
    // kind and the configuration allows any.
    capset.user_queue_kinds = info.user_queue_kinds & guest_proto::uq::USER_QUEUE_KINDS_ALL;
    capset.max_user_queues = config.max_user_queues.min(capset.max_queues);
    if capset.user_queue_kinds == 0 || capset.max_user_queues == 0 {
        capset.features = guest_proto::capset::Features::from_bits_retain(
            capset.features.bits() & !guest_proto::capset::Features::USER_QUEUES.bits(),
        );
        capset.user_queue_kinds = 0;
        capset.max_user_queues = 0;
    }
    if !info.recoverable_faults {
        capset.features = guest_proto::capset::Features::from_bits_retain(
            capset.features.bits() & !guest_proto::capset::Features::RECOVERABLE_FAULTS.bits(),
        );
    }
    capset
}

impl ContextBackend for ComputeBackend {
    fn capsets(&self) -> Vec<CapsetInfo> {
        vec![CapsetInfo {
            id: VGNC_CAPSET_ID,
            max_version: CAPSET_MAX_VERSION,
            max_size: CAPSET_SIZE as u32,
        }]
    }

    fn capset(&self, id: u32, version: u32) -> Option<Vec<u8>> {
        (id == VGNC_CAPSET_ID && version <= CAPSET_MAX_VERSION)
            .then(|| self.capset.encode().to_vec())
    }

    fn set_memory(&mut self, memory: GuestRam) {
        self.memory = Some(memory);
    }

    fn create_context(
        &mut self,
        ctx: CtxId,
        init: ContextInit,
        debug_name: &str,
    ) -> Result<(), ContextBackendError> {
        if let Some(id) = init.capset_id {
            if id != VGNC_CAPSET_ID {
                return Err(ContextBackendError::InvalidParameter);
            }
        }
        if self.contexts.contains_key(&ctx) {
            return Err(ContextBackendError::InvalidContext);
        }
        if self.contexts.len() >= usize::try_from(self.config.max_contexts).unwrap_or(usize::MAX) {
            return Err(ContextBackendError::OutOfMemory);
        }
        log::debug!("{ctx:?} created ({init:?}, {debug_name:?})");
        if let Some(m) = &self.metrics {
            m.context_created(ctx.0);
        }
        self.contexts.insert(
            ctx,
            Context {
                init,
                resources: Resources::default(),
                session: None,
                svm: svm::ContextSvm::default(),
            },
        );
        Ok(())
    }

    fn destroy_context(&mut self, ctx: CtxId) {
        self.end_session(ctx);
        if self.contexts.remove(&ctx).is_some() {
            if let Some(m) = &self.metrics {
                m.context_destroyed(ctx.0);
            }
        }
    }

    fn attach_resource(
        &mut self,
        ctx: CtxId,
        resource: &ResourceView,
    ) -> Result<(), ContextBackendError> {
        if !self.contexts.contains_key(&ctx) {
            return Err(ContextBackendError::InvalidContext);
        }
        let replaced_backing = self
            .contexts
            .get(&ctx)
            .and_then(|c| c.resources.backing(resource.id))
            .is_some_and(|old| Some(&old) != resource.backing.as_ref());
        if replaced_backing {
            self.detach_resource(ctx, resource.id);
        }
        if let Some(c) = self.contexts.get_mut(&ctx) {
            c.resources.attach(resource.clone());
        }
        Ok(())
    }

    fn detach_resource(&mut self, ctx: CtxId, resource: ResourceId) {
        let uses = self
            .contexts
            .get(&ctx)
            .and_then(|c| c.session.as_ref())
            .is_some_and(|s| s.uses_resource(resource));
        if uses {
            self.end_session(ctx);
        } else if let Some(s) = self.contexts.get_mut(&ctx).and_then(|c| c.session.as_mut()) {
            s.unmap_resource(resource);
        }
        if let Some(c) = self.contexts.get_mut(&ctx) {
            c.resources.detach(resource);
        }
    }

    fn submit(
        &mut self,
        ctx: CtxId,
        commands: &[u8],
        fence: Option<FenceRef>,
    ) -> Result<FenceDisposition, ContextBackendError> {
        if !self.contexts.contains_key(&ctx) {
            return Err(ContextBackendError::InvalidContext);
        }
        if commands.len() > self.config.max_request_bytes as usize {
            return Err(ContextBackendError::InvalidParameter);
        }
        let mut outcome = SubmitOutcome::default();
        let stream = RequestStream::new(commands).with_limits(self.decode_limits());
        for item in stream {
            match item {
                Ok(framed) => self.handle(ctx, &framed, fence, &mut outcome),
                Err(lost) => {
                    self.reply_framing_lost(ctx, &lost);
                    outcome.failed = true;
                    break;
                }
            }
        }
        // Every request of a session makes its doorbells be looked at (14.4).
        if let Some(s) = self.contexts.get(&ctx).and_then(|c| c.session.as_ref()) {
            s.kick();
        }
        self.pump_all();
        if outcome.hold {
            Ok(FenceDisposition::Hold)
        } else if outcome.failed {
            Err(ContextBackendError::InvalidParameter)
        } else {
            Ok(FenceDisposition::SignalNow)
        }
    }

    fn tick(&mut self) {
        self.pump_all();
        self.publish_metrics();
    }

    /// Time-based work exists while a session has faults pending: their
    /// deadlines, and records waiting for room in a full ring (the guest
    /// frees it by moving `head`, which nothing announces). Everything
    /// else reaches the worker through the completer's `wake`.
    fn wants_tick(&self) -> bool {
        self.contexts
            .values()
            .filter_map(|c| c.session.as_ref())
            .any(ComputeSession::has_timed_work)
    }
}

impl ComputeBackend {
    fn reply_framing_lost(&mut self, ctx: CtxId, lost: &guest_proto::stream::FramingLost) {
        let Some(session) = self.contexts.get_mut(&ctx).and_then(|c| c.session.as_mut()) else {
            return;
        };
        let Some(header) = lost.header else {
            return;
        };
        if let Ok(slot) = header.reply_slot(session.reply_size()) {
            session.post_reply(slot, &Reply::error(header.seqno, header.cmd, lost.status()));
        }
    }
}

#[cfg(test)]
mod tests;
