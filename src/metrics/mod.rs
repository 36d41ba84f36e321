//! Operator metrics in the Prometheus text format, on an opt-in endpoint
//! (`--metrics=unix:PATH` or `--metrics=tcp:127.0.0.1:PORT`).
//! docs/metrics.md lists every metric, its labels and where it comes from.
//!
//! Nothing here sits on a hot path. The values are the counters the layers
//! already keep (`ContextStats`, `FaultCounters`, the user queues'
//! counters, the bound-bytes quota) plus a few the metrics added where they
//! live (binds, dispatches by status, the fault round-trip histogram, the
//! control queue's commands), and they are *pulled*:
//!
//! - per guest context: a scrape asks the thread that drives the contexts
//!   (the vring worker) to publish a snapshot of every context and wakes
//!   it (its tick timer only runs while faults are pending); the worker
//!   looks for such a request whenever it ticks (two relaxed loads when
//!   there is none), copies each context's counters into its
//!   [`CtxSeries`], and answers. The scrape waits at most
//!   [`PUBLISH_WAIT`] for that and otherwise shows the last snapshot;
//! - per guest: the virtio-gpu command counters and the bound-bytes quota
//!   are atomics, read directly.
//!
//! Labels: `guest` is the number of the frontend connection (1, 2, ... in
//! the order they were served), `ctx` the virtio-gpu context id. A
//! context's series go when the context is destroyed and a guest's when
//! its connection ends, so the number of series is bounded by
//! `--max-contexts` (one connection is served at a time). Sessions that end
//! inside a context that lives on add their counts to the context's
//! series, so its counters never go back.

pub mod exposition;
pub mod server;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use gpu_backend::context::{BoundBytesQuota, ContextMetrics};
use parking_lot::{Condvar, Mutex};

use crate::virtio_gpu::stats::GpuCounters;

pub use server::{MetricsAddr, MetricsListener};

/// Longest a scrape waits for the vring worker to publish fresh context
/// counters (the worker looks every millisecond; it takes longer only
/// while it is busy with one long request).
pub const PUBLISH_WAIT: Duration = Duration::from_millis(200);

/// One context's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtxSample {
    /// What the context layer counts.
    pub ctx: ContextMetrics,
    /// Requests whose reply had no place (`DEVICE_QUERY`'s `lost_replies`).
    pub lost_replies: u64,
}

impl CtxSample {
    /// Adds the *counters* of `other` (not its gauges: bound bytes, queues,
    /// pending faults, queue depth belong to a live session only).
    fn accumulate(&mut self, other: &CtxSample) {
        let (a, b) = (&mut self.ctx, &other.ctx);
        let add = |x: &mut u64, y: u64| *x = x.saturating_add(y);
        add(&mut a.stats.faults.raised, b.stats.faults.raised);
        add(&mut a.stats.faults.resolved, b.stats.faults.resolved);
        add(&mut a.stats.faults.rejected, b.stats.faults.rejected);
        add(&mut a.stats.faults.timed_out, b.stats.faults.timed_out);
        add(&mut a.stats.faults.cancelled, b.stats.faults.cancelled);
        add(&mut a.stats.dispatches_done, b.stats.dispatches_done);
        a.fault_round_trips.merge(&b.fault_round_trips);
        a.doorbell_latency.merge(&b.doorbell_latency);
        add(&mut a.binds.binds, b.binds.binds);
        add(&mut a.binds.bind_bytes, b.binds.bind_bytes);
        add(&mut a.binds.unbinds, b.binds.unbinds);
        add(&mut a.binds.unbind_bytes, b.binds.unbind_bytes);
        add(&mut a.dispatches_started, b.dispatches_started);
        for (x, y) in a.dispatches_ended.iter_mut().zip(b.dispatches_ended) {
            add(x, y);
        }
        let (ua, ub) = (&mut a.user_queues, &b.user_queues);
        add(&mut ua.device.packets, ub.device.packets);
        add(&mut ua.device.copy_bytes, ub.device.copy_bytes);
        add(&mut ua.device.doorbell_polls, ub.device.doorbell_polls);
        add(&mut ua.interrupts, ub.interrupts);
        add(&mut self.lost_replies, other.lost_replies);
    }
}

/// The series of one context: the counts of its ended sessions and the
/// last snapshot of its live one.
#[derive(Clone, Debug, Default)]
pub struct CtxSeries {
    ended: CtxSample,
    current: Option<CtxSample>,
    sessions: u64,
}

impl CtxSeries {
    /// Counters over every session of the context; gauges of the live one
    /// (zero without a session).
    pub fn totals(&self) -> CtxSample {
        // `ended` only ever accumulated counters: its gauges are zero.
        let mut t = self.ended;
        if let Some(c) = &self.current {
            t.accumulate(c);
            t.ctx.stats.bound_bytes = c.ctx.stats.bound_bytes;
            t.ctx.stats.queues = c.ctx.stats.queues;
            t.ctx.faults_pending = c.ctx.faults_pending;
        }
        t
    }

    /// Dispatches accepted and not ended, in the live session.
    pub fn queue_depth(&self) -> u64 {
        self.current.map_or(0, |c| c.ctx.queue_depth())
    }

    /// Whether a session is live.
    pub fn has_session(&self) -> bool {
        self.current.is_some()
    }

    /// Sessions started in the context.
    pub fn sessions(&self) -> u64 {
        self.sessions
    }
}

/// Asks the vring worker for fresh snapshots and waits for them.
#[derive(Debug, Default)]
struct Publish {
    requested: AtomicU64,
    served: AtomicU64,
    lock: Mutex<()>,
    done: Condvar,
}

/// The metrics of one frontend connection (a guest).
#[derive(Debug)]
pub struct GuestMetrics {
    /// The connection number; 0 until the frontend connected.
    guest: AtomicU64,
    connected: AtomicBool,
    quota: Mutex<Option<Arc<BoundBytesQuota>>>,
    max_contexts: AtomicU64,
    gpu: Mutex<Option<Arc<GpuCounters>>>,
    contexts: Mutex<BTreeMap<u32, CtxSeries>>,
    publish: Publish,
    /// Wakes the thread that publishes (the vring worker).
    waker: Mutex<Option<Waker>>,
}

/// Wakes the thread that drives the contexts, so that it looks for a
/// publication request.
#[derive(Clone)]
pub struct Waker(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waker")
    }
}

impl GuestMetrics {
    fn new() -> GuestMetrics {
        GuestMetrics {
            guest: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            quota: Mutex::new(None),
            max_contexts: AtomicU64::new(0),
            gpu: Mutex::new(None),
            contexts: Mutex::new(BTreeMap::new()),
            publish: Publish::default(),
            waker: Mutex::new(None),
        }
    }

    /// The connection number (0 before the frontend connected).
    pub fn guest(&self) -> u64 {
        self.guest.load(Ordering::Relaxed)
    }

    /// The guest's bound-bytes quota (its usage and limit are read at
    /// every scrape) and its context limit.
    pub fn set_quota(&self, quota: Arc<BoundBytesQuota>, max_contexts: u32) {
        *self.quota.lock() = Some(quota);
        self.max_contexts
            .store(u64::from(max_contexts), Ordering::Relaxed);
    }

    /// The control queue's counters of the guest's device.
    pub fn set_gpu(&self, counters: Arc<GpuCounters>) {
        *self.gpu.lock() = Some(counters);
    }

    /// A context was created: its series start (at zero).
    pub fn context_created(&self, ctx: u32) {
        self.contexts.lock().insert(ctx, CtxSeries::default());
    }

    /// A context was destroyed: its series go.
    pub fn context_destroyed(&self, ctx: u32) {
        self.contexts.lock().remove(&ctx);
    }

    /// A session started in `ctx`.
    pub fn session_started(&self, ctx: u32, sample: CtxSample) {
        if let Some(s) = self.contexts.lock().get_mut(&ctx) {
            s.sessions += 1;
            s.current = Some(sample);
        }
    }

    /// The session of `ctx` ended with these final counts.
    pub fn session_ended(&self, ctx: u32, last: CtxSample) {
        if let Some(s) = self.contexts.lock().get_mut(&ctx) {
            s.ended.accumulate(&last);
            s.current = None;
        }
    }

    /// Whether a scrape waits for snapshots: `Some(token)` to hand to
    /// [`GuestMetrics::publish`]. Two relaxed loads; the vring worker
    /// calls it on every tick.
    pub fn publish_wanted(&self) -> Option<u64> {
        let requested = self.publish.requested.load(Ordering::Relaxed);
        (requested != self.publish.served.load(Ordering::Relaxed)).then_some(requested)
    }

    /// Stores fresh snapshots of the live sessions and answers the scrape
    /// that asked (`token` from [`GuestMetrics::publish_wanted`]). Never
    /// blocks: if a scrape is reading the series right now, nothing is
    /// done (and `samples` is not evaluated) and false returned; the
    /// request stays pending for the next tick.
    pub fn publish(&self, token: u64, samples: impl IntoIterator<Item = (u32, CtxSample)>) -> bool {
        let Some(mut contexts) = self.contexts.try_lock() else {
            return false;
        };
        for (ctx, sample) in samples {
            if let Some(s) = contexts.get_mut(&ctx) {
                s.current = Some(sample);
            }
        }
        drop(contexts);
        self.publish.served.store(token, Ordering::Release);
        // Without the lock: the scraper re-checks every millisecond, so a
        // wake-up that races its check costs it at most that.
        self.publish.done.notify_all();
        true
    }

    /// How a scrape wakes the thread that publishes (set with the
    /// contexts' owner, once per connection).
    pub fn set_waker(&self, waker: Waker) {
        *self.waker.lock() = Some(waker);
    }

    /// Asks for fresh snapshots and waits until `deadline` for them;
    /// false if they did not come (the last ones are shown then).
    fn refresh(&self, deadline: Instant) -> bool {
        let token = self
            .publish
            .requested
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        let waker = self.waker.lock().clone();
        if let Some(Waker(wake)) = waker {
            wake();
        }
        loop {
            // Tokens only grow (a u64 never wraps in practice): a later
            // scrape's publication answers this one too.
            if self.publish.served.load(Ordering::Acquire) >= token {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let mut l = self.publish.lock.lock();
            let _ = self
                .publish
                .done
                .wait_until(&mut l, deadline.min(now + Duration::from_millis(1)));
        }
    }

    /// The series of every context, by id.
    pub fn contexts(&self) -> BTreeMap<u32, CtxSeries> {
        self.contexts.lock().clone()
    }

    /// `(used, limit)` of the bound-bytes quota.
    pub fn bound_bytes(&self) -> Option<(u64, u64)> {
        self.quota.lock().as_ref().map(|q| (q.used(), q.limit()))
    }
}

/// How a metrics request ended (`vhost_gpu_nc_metrics_requests_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestResult {
    /// `GET /metrics` answered.
    Ok,
    /// A connection that sent nothing got the bare exposition.
    Bare,
    /// Not an HTTP/1 request line, or no end of headers.
    BadRequest,
    /// A path other than `/metrics` or `/`.
    NotFound,
    /// A method other than `GET` or `HEAD`.
    MethodNotAllowed,
    /// Headers larger than the request limit.
    TooLarge,
    /// The request did not arrive in time.
    Timeout,
}

impl RequestResult {
    /// Every result, in label order.
    pub const ALL: [RequestResult; 7] = [
        RequestResult::Ok,
        RequestResult::Bare,
        RequestResult::BadRequest,
        RequestResult::NotFound,
        RequestResult::MethodNotAllowed,
        RequestResult::TooLarge,
        RequestResult::Timeout,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            RequestResult::Ok => "ok",
            RequestResult::Bare => "bare",
            RequestResult::BadRequest => "bad_request",
            RequestResult::NotFound => "not_found",
            RequestResult::MethodNotAllowed => "method_not_allowed",
            RequestResult::TooLarge => "too_large",
            RequestResult::Timeout => "timeout",
        }
    }
}

/// Everything the collector reads.
#[derive(Debug)]
struct Shared {
    start_time: f64,
    connections: AtomicU64,
    guests: Mutex<Vec<Arc<GuestMetrics>>>,
    requests: [AtomicU64; RequestResult::ALL.len()],
}

/// The daemon's metrics: what the endpoint serves.
pub struct Metrics {
    shared: Arc<Shared>,
    registry: prometheus::Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// An empty registry (no guest yet).
    pub fn new() -> Arc<Metrics> {
        let start_time = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let shared = Arc::new(Shared {
            start_time,
            connections: AtomicU64::new(0),
            guests: Mutex::new(Vec::new()),
            requests: Default::default(),
        });
        let registry = prometheus::Registry::new();
        let collector = exposition::Collector::new(shared.clone());
        if let Err(e) = registry.register(Box::new(collector)) {
            // Only a bad metric name in exposition.rs gets here; its unit
            // test catches that before a release.
            log::error!("metrics: registering the collector: {e}");
        }
        Arc::new(Metrics { shared, registry })
    }

    /// The metrics of a new frontend connection, not yet connected.
    pub fn new_guest(&self) -> Arc<GuestMetrics> {
        let g = Arc::new(GuestMetrics::new());
        self.shared.guests.lock().push(g.clone());
        g
    }

    /// The frontend of `g` connected: it gets the next connection number
    /// and its series appear.
    pub fn guest_connected(&self, g: &GuestMetrics) {
        let n = self
            .shared
            .connections
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        g.guest.store(n, Ordering::Relaxed);
        g.connected.store(true, Ordering::Release);
    }

    /// The connection of `g` ended (or never started): its series go.
    pub fn guest_gone(&self, g: &Arc<GuestMetrics>) {
        self.shared.guests.lock().retain(|x| !Arc::ptr_eq(x, g));
    }

    /// Counts one request of the endpoint.
    pub fn count_request(&self, result: RequestResult) {
        if let Some(i) = RequestResult::ALL.iter().position(|r| *r == result) {
            if let Some(c) = self.shared.requests.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The exposition: fresh context snapshots (waiting up to
    /// [`PUBLISH_WAIT`] for them), gathered and encoded in the text format.
    pub fn render(&self) -> String {
        self.render_with(PUBLISH_WAIT)
    }

    /// [`Metrics::render`] waiting up to `wait` for the snapshots (zero:
    /// what was published last).
    pub fn render_with(&self, wait: Duration) -> String {
        let guests: Vec<Arc<GuestMetrics>> = self.shared.guests.lock().clone();
        let deadline = Instant::now() + wait;
        for g in guests
            .iter()
            .filter(|g| g.connected.load(Ordering::Acquire))
        {
            if !wait.is_zero() && !g.refresh(deadline) {
                log::debug!(
                    "metrics: guest {} published nothing within {} ms; showing its last snapshot",
                    g.guest(),
                    wait.as_millis()
                );
            }
        }
        let families = self.registry.gather();
        let mut out = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            log::error!("metrics: encoding: {e}");
        }
        out
    }
}
