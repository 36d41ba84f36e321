//! The collector: every metric family of docs/metrics.md, built at scrape
//! time from the registry's shared state with the `prometheus` crate's
//! data model (its registry sorts them, its text encoder writes them).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use gpu_backend::context::{DISPATCH_STATUSES, LATENCY_BOUNDS_NS, LatencyHistogram};
use guest_proto::DispatchStatus;
use prometheus::core::Desc;
use prometheus::proto::{self, MetricFamily, MetricType};

use super::{CtxSeries, RequestResult, Shared};

/// What the metric is.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric: name, type, variable labels, help.
const FAMILIES: &[(&str, Kind, &[&str], &str)] = &[
    // The process.
    (
        "vhost_gpu_nc_build_info",
        Kind::Gauge,
        &["version"],
        "Always 1; the daemon's version.",
    ),
    (
        "process_start_time_seconds",
        Kind::Gauge,
        &[],
        "Start time of the process since the Unix epoch, in seconds.",
    ),
    (
        "process_cpu_seconds_total",
        Kind::Counter,
        &[],
        "CPU time of the process (user and system), in seconds.",
    ),
    (
        "vhost_gpu_nc_connections_total",
        Kind::Counter,
        &[],
        "Frontend (VMM) connections served since start.",
    ),
    (
        "vhost_gpu_nc_guests",
        Kind::Gauge,
        &[],
        "Frontend connections being served now.",
    ),
    (
        "vhost_gpu_nc_metrics_requests_total",
        Kind::Counter,
        &["result"],
        "Requests of the metrics endpoint, by how they ended.",
    ),
    // Per guest.
    (
        "vhost_gpu_nc_virtio_gpu_commands_total",
        Kind::Counter,
        &["guest", "cmd"],
        "virtio-gpu control queue commands, by type.",
    ),
    (
        "vhost_gpu_nc_virtio_gpu_errors_total",
        Kind::Counter,
        &["guest", "code"],
        "virtio-gpu control queue commands answered with an error, by response code.",
    ),
    (
        "vhost_gpu_nc_guest_bound_bytes",
        Kind::Gauge,
        &["guest"],
        "Bytes bound into GPU VMs over all contexts of the guest (charged to its quota).",
    ),
    (
        "vhost_gpu_nc_guest_bound_bytes_limit",
        Kind::Gauge,
        &["guest"],
        "The guest's bound-bytes quota (--max-bound-bytes).",
    ),
    (
        "vhost_gpu_nc_contexts",
        Kind::Gauge,
        &["guest"],
        "Compute contexts of the guest.",
    ),
    (
        "vhost_gpu_nc_contexts_limit",
        Kind::Gauge,
        &["guest"],
        "The guest's context limit (--max-contexts).",
    ),
    // Per context.
    (
        "vhost_gpu_nc_sessions_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Sessions started in the context (SESSION_INIT).",
    ),
    (
        "vhost_gpu_nc_session_active",
        Kind::Gauge,
        &["guest", "ctx"],
        "1 while the context has a session.",
    ),
    (
        "vhost_gpu_nc_faults_raised_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Faults forwarded to the guest (prefetch records included), as DEVICE_QUERY counts them.",
    ),
    (
        "vhost_gpu_nc_faults_resolved_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Forwarded faults the guest answered RESOLVED.",
    ),
    (
        "vhost_gpu_nc_faults_rejected_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Forwarded faults the guest answered REJECTED (or that SVM_DETACH rejected).",
    ),
    (
        "vhost_gpu_nc_faults_timed_out_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Forwarded faults not answered within fault_timeout_ms.",
    ),
    (
        "vhost_gpu_nc_faults_cancelled_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Forwarded faults pending when their session ended.",
    ),
    (
        "vhost_gpu_nc_faults_pending",
        Kind::Gauge,
        &["guest", "ctx"],
        "Forwarded faults waiting for the guest's answer.",
    ),
    (
        "vhost_gpu_nc_fault_round_trip_seconds",
        Kind::Histogram,
        &["guest", "ctx"],
        "Time from raising a fault to the guest's answer (RESOLVED or REJECTED).",
    ),
    (
        "vhost_gpu_nc_binds_total",
        Kind::Counter,
        &["guest", "ctx"],
        "VM_BIND map ops (MAP_RESOURCE, MAP_PAGES) that succeeded.",
    ),
    (
        "vhost_gpu_nc_bind_bytes_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Bytes named by the VM_BIND map ops that succeeded.",
    ),
    (
        "vhost_gpu_nc_unbinds_total",
        Kind::Counter,
        &["guest", "ctx"],
        "VM_BIND UNMAP ops that succeeded.",
    ),
    (
        "vhost_gpu_nc_unbind_bytes_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Bytes named by the VM_BIND UNMAP ops that succeeded.",
    ),
    (
        "vhost_gpu_nc_bound_bytes",
        Kind::Gauge,
        &["guest", "ctx"],
        "Bytes bound in the context's GPU VM.",
    ),
    (
        "vhost_gpu_nc_queues",
        Kind::Gauge,
        &["guest", "ctx"],
        "Queues of the context (user queues included).",
    ),
    (
        "vhost_gpu_nc_dispatches_started_total",
        Kind::Counter,
        &["guest", "ctx"],
        "DISPATCHes the device accepted.",
    ),
    (
        "vhost_gpu_nc_dispatches_ended_total",
        Kind::Counter,
        &["guest", "ctx", "status"],
        "DISPATCHes that ended, by completion status.",
    ),
    (
        "vhost_gpu_nc_queue_depth",
        Kind::Gauge,
        &["guest", "ctx"],
        "DISPATCHes accepted and not ended, over the context's compute queues.",
    ),
    (
        "vhost_gpu_nc_user_queue_packets_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Packets completed on user queues.",
    ),
    (
        "vhost_gpu_nc_copy_bytes_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Bytes written by user-queue COPY_LINEAR and CONST_FILL packets.",
    ),
    (
        "vhost_gpu_nc_interrupts_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Interrupts raised (user queues and NOTIFY dispatches).",
    ),
    (
        "vhost_gpu_nc_doorbell_polls_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Doorbell loads the device made for the context's user queues.",
    ),
    (
        "vhost_gpu_nc_doorbell_latency_seconds",
        Kind::Histogram,
        &["guest", "ctx"],
        "User queues: time from the device's last look that found no new work (or a later kick) to the first packet of the new work completing.",
    ),
    (
        "vhost_gpu_nc_lost_replies_total",
        Kind::Counter,
        &["guest", "ctx"],
        "Requests not executed because their reply had no place.",
    ),
];

/// The label value of a dispatch status (protocol section 7).
fn status_name(i: usize) -> &'static str {
    match u32::try_from(i).ok().and_then(DispatchStatus::from_u32) {
        Some(DispatchStatus::Ok) => "ok",
        Some(DispatchStatus::FaultRejected) => "fault_rejected",
        Some(DispatchStatus::FaultTimedOut) => "fault_timed_out",
        Some(DispatchStatus::FaultFatal) => "fault_fatal",
        Some(DispatchStatus::Cancelled) => "cancelled",
        Some(DispatchStatus::DeviceError) => "device_error",
        Some(DispatchStatus::WatchdogTimeout) => "watchdog_timeout",
        None => "unknown",
    }
}

/// CPU time of the process (`CLOCK_PROCESS_CPUTIME_ID`: one system call
/// the sandbox allows, no `/proc`).
fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// One family being filled.
struct Family<'a> {
    desc: &'a Desc,
    kind: Kind,
    mf: MetricFamily,
}

impl<'a> Family<'a> {
    fn new(desc: &'a Desc, kind: Kind) -> Family<'a> {
        let mut mf = MetricFamily::default();
        mf.set_name(desc.fq_name.clone());
        mf.set_help(desc.help.clone());
        mf.set_field_type(match kind {
            Kind::Counter => MetricType::COUNTER,
            Kind::Gauge => MetricType::GAUGE,
            Kind::Histogram => MetricType::HISTOGRAM,
        });
        Family { desc, kind, mf }
    }

    fn metric(&self, values: &[&str]) -> proto::Metric {
        let labels = self
            .desc
            .variable_labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut l = proto::LabelPair::default();
                l.set_name(name.clone());
                l.set_value((*value).to_owned());
                l
            })
            .collect();
        let mut m = proto::Metric::default();
        m.set_label(labels);
        m
    }

    /// A counter or gauge sample.
    fn push(&mut self, values: &[&str], v: f64) {
        let mut m = self.metric(values);
        match self.kind {
            Kind::Counter => {
                let mut c = proto::Counter::default();
                c.set_value(v);
                m.set_counter(c);
            }
            Kind::Gauge | Kind::Histogram => {
                let mut g = proto::Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
        }
        self.mf.mut_metric().push(m);
    }

    /// A histogram sample, in seconds.
    fn push_histogram(&mut self, values: &[&str], h: &LatencyHistogram) {
        let mut m = self.metric(values);
        let buckets = LATENCY_BOUNDS_NS
            .iter()
            .zip(h.cumulative())
            .map(|(&bound, count)| {
                let mut b = proto::Bucket::default();
                b.set_upper_bound(bound as f64 / 1e9);
                b.set_cumulative_count(count);
                b
            })
            .collect();
        let mut hist = proto::Histogram::default();
        hist.set_bucket(buckets);
        hist.set_sample_count(h.count);
        hist.set_sample_sum(h.sum_ns as f64 / 1e9);
        m.set_histogram(hist);
        self.mf.mut_metric().push(m);
    }
}

/// The daemon's one collector.
pub(super) struct Collector {
    shared: Arc<Shared>,
    descs: Vec<(Desc, Kind)>,
}

impl Collector {
    pub(super) fn new(shared: Arc<Shared>) -> Collector {
        let descs = FAMILIES
            .iter()
            .filter_map(|&(name, kind, labels, help)| {
                let labels = labels.iter().map(|l| (*l).to_owned()).collect();
                match Desc::new(name.into(), help.into(), labels, Default::default()) {
                    Ok(d) => Some((d, kind)),
                    Err(e) => {
                        log::error!("metrics: {name}: {e}");
                        None
                    }
                }
            })
            .collect();
        Collector { shared, descs }
    }
}

impl prometheus::core::Collector for Collector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().map(|(d, _)| d).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out: Vec<Family<'_>> = self.descs.iter().map(|(d, k)| Family::new(d, *k)).collect();
        let names: Vec<&str> = self.descs.iter().map(|(d, _)| d.fq_name.as_str()).collect();
        let at = |name: &str| names.iter().position(|n| *n == name).unwrap_or(usize::MAX);
        let s = &self.shared;
        let mut put = |name: &str, values: &[&str], v: f64| {
            if let Some(f) = out.get_mut(at(name)) {
                f.push(values, v);
            }
        };
        put("vhost_gpu_nc_build_info", &[env!("CARGO_PKG_VERSION")], 1.0);
        put("process_start_time_seconds", &[], s.start_time);
        put("process_cpu_seconds_total", &[], process_cpu_seconds());
        put(
            "vhost_gpu_nc_connections_total",
            &[],
            s.connections.load(Ordering::Relaxed) as f64,
        );
        for (r, c) in RequestResult::ALL.iter().zip(s.requests.iter()) {
            put(
                "vhost_gpu_nc_metrics_requests_total",
                &[r.name()],
                c.load(Ordering::Relaxed) as f64,
            );
        }
        let guests: Vec<_> = s
            .guests
            .lock()
            .iter()
            .filter(|g| g.connected.load(Ordering::Acquire))
            .cloned()
            .collect();
        put("vhost_gpu_nc_guests", &[], guests.len() as f64);
        let mut histograms: Vec<(String, String, LatencyHistogram, LatencyHistogram)> = Vec::new();
        for g in &guests {
            let guest = g.guest().to_string();
            let gl = guest.as_str();
            if let Some(gpu) = g.gpu.lock().clone() {
                for (cmd, n) in gpu.commands() {
                    put(
                        "vhost_gpu_nc_virtio_gpu_commands_total",
                        &[gl, cmd],
                        n as f64,
                    );
                }
                for (code, n) in gpu.errors() {
                    put(
                        "vhost_gpu_nc_virtio_gpu_errors_total",
                        &[gl, code],
                        n as f64,
                    );
                }
            }
            if let Some((used, limit)) = g.bound_bytes() {
                put("vhost_gpu_nc_guest_bound_bytes", &[gl], used as f64);
                put("vhost_gpu_nc_guest_bound_bytes_limit", &[gl], limit as f64);
                put(
                    "vhost_gpu_nc_contexts_limit",
                    &[gl],
                    g.max_contexts.load(Ordering::Relaxed) as f64,
                );
            }
            let contexts = g.contexts();
            put("vhost_gpu_nc_contexts", &[gl], contexts.len() as f64);
            for (id, series) in &contexts {
                let ctx = id.to_string();
                let l = [gl, ctx.as_str()];
                put_context(&mut put, &l, series);
                let t = series.totals();
                histograms.push((
                    guest.clone(),
                    ctx.clone(),
                    t.ctx.fault_round_trips,
                    t.ctx.doorbell_latency,
                ));
            }
        }
        if let Some(f) = out.get_mut(at("vhost_gpu_nc_fault_round_trip_seconds")) {
            for (guest, ctx, h, _) in &histograms {
                f.push_histogram(&[guest, ctx], h);
            }
        }
        if let Some(f) = out.get_mut(at("vhost_gpu_nc_doorbell_latency_seconds")) {
            for (guest, ctx, _, h) in &histograms {
                f.push_histogram(&[guest, ctx], h);
            }
        }
        out.into_iter()
            .filter(|f| !f.mf.get_metric().is_empty())
            .map(|f| f.mf)
            .collect()
    }
}

/// The per-context samples (all but the histogram).
fn put_context(put: &mut impl FnMut(&str, &[&str], f64), l: &[&str; 2], series: &CtxSeries) {
    let t = series.totals();
    let c = &t.ctx;
    let f = &c.stats.faults;
    let counters: [(&str, u64); 18] = [
        ("vhost_gpu_nc_sessions_total", series.sessions()),
        ("vhost_gpu_nc_faults_raised_total", f.raised),
        ("vhost_gpu_nc_faults_resolved_total", f.resolved),
        ("vhost_gpu_nc_faults_rejected_total", f.rejected),
        ("vhost_gpu_nc_faults_timed_out_total", f.timed_out),
        ("vhost_gpu_nc_faults_cancelled_total", f.cancelled),
        ("vhost_gpu_nc_binds_total", c.binds.binds),
        ("vhost_gpu_nc_bind_bytes_total", c.binds.bind_bytes),
        ("vhost_gpu_nc_unbinds_total", c.binds.unbinds),
        ("vhost_gpu_nc_unbind_bytes_total", c.binds.unbind_bytes),
        (
            "vhost_gpu_nc_dispatches_started_total",
            c.dispatches_started,
        ),
        (
            "vhost_gpu_nc_user_queue_packets_total",
            c.user_queues.device.packets,
        ),
        (
            "vhost_gpu_nc_copy_bytes_total",
            c.user_queues.device.copy_bytes,
        ),
        ("vhost_gpu_nc_interrupts_total", c.user_queues.interrupts),
        (
            "vhost_gpu_nc_doorbell_polls_total",
            c.user_queues.device.doorbell_polls,
        ),
        ("vhost_gpu_nc_lost_replies_total", t.lost_replies),
        // Gauges.
        ("vhost_gpu_nc_faults_pending", c.faults_pending),
        ("vhost_gpu_nc_bound_bytes", c.stats.bound_bytes),
    ];
    for (name, v) in counters {
        put(name, l, v as f64);
    }
    put("vhost_gpu_nc_queues", l, f64::from(c.stats.queues));
    put("vhost_gpu_nc_queue_depth", l, series.queue_depth() as f64);
    put(
        "vhost_gpu_nc_session_active",
        l,
        if series.has_session() { 1.0 } else { 0.0 },
    );
    for (i, n) in c
        .dispatches_ended
        .iter()
        .enumerate()
        .take(DISPATCH_STATUSES)
    {
        put(
            "vhost_gpu_nc_dispatches_ended_total",
            &[l[0], l[1], status_name(i)],
            *n as f64,
        );
    }
}

/// The metric names, types and label names (for the documentation test).
pub fn families() -> impl Iterator<Item = (&'static str, &'static str, &'static [&'static str])> {
    FAMILIES.iter().map(|&(name, kind, labels, _)| {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        (name, kind, labels)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_name_is_valid_and_documented_with_its_type_and_labels() {
        let doc = include_str!("../../docs/metrics.md");
        let c = Collector::new(Arc::new(Shared {
            start_time: 0.0,
            connections: Default::default(),
            guests: Default::default(),
            requests: Default::default(),
        }));
        assert_eq!(c.descs.len(), FAMILIES.len(), "a name the crate refused");
        for (name, kind, labels) in families() {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{name}` |")))
                .unwrap_or_else(|| panic!("{name} is not in docs/metrics.md"));
            assert!(row.contains(&format!("| {kind} |")), "{name}: type: {row}");
            for label in labels {
                assert!(
                    row.contains(&format!("`{label}`")),
                    "{name}: {label}: {row}"
                );
            }
        }
    }
}
