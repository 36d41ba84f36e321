//! The metrics of a guest's contexts: values after known events, as the
//! exposition shows them (docs/metrics.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_proto::bind::{BindOp, PageList as WirePages};
use guest_proto::command::Profile;
use guest_proto::fault::FaultOutcome;
use guest_proto::{DispatchStatus, GuestPhysAddr, Perms, Status};

use super::{Client, ComputeConfig, Guest, compat};
use crate::context_backend::ContextBackend;
use crate::metrics::{GuestMetrics, Metrics};

/// The value of the sample `name{labels}` in `text`, if there is one.
pub(crate) fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(key.as_str())?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A scrape as the endpoint makes it: asks for fresh snapshots, which the
/// backend publishes on its tick (driven here, where the backend lives).
fn scrape(g: &mut Guest, metrics: &Arc<Metrics>) -> String {
    let m = metrics.clone();
    let scraper = std::thread::spawn(move || m.render());
    while !scraper.is_finished() {
        g.nc().tick();
        std::thread::sleep(Duration::from_micros(100));
    }
    scraper.join().unwrap()
}

fn with_metrics(config: ComputeConfig) -> (Guest, Arc<Metrics>, Arc<GuestMetrics>) {
    let g = Guest::with(config);
    let metrics = Metrics::new();
    let guest = metrics.new_guest();
    g.nc().set_metrics(guest.clone());
    metrics.guest_connected(&guest);
    (g, metrics, guest)
}

/// Fills `pages` unbound pages at `va` and resolves every fault by binding
/// a fresh page; returns the number of faults answered.
fn fill_resolving(g: &mut Guest, c: &mut Client, va: u64, pages: u64, slot: u32) -> usize {
    let q = g.create_queue(c);
    assert_eq!(g.fill(c, q, va, pages * 1024, slot, 1), Status::Ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = 0;
    while g.signal(c, slot).value != 1 {
        for f in g.take_faults(c) {
            let page = [GuestPhysAddr(g.alloc(4096))];
            let op = BindOp::MapPages {
                va: f.va,
                perms: Perms::RW,
                pages: WirePages::new(&page),
            };
            assert_eq!(g.bind(c, op).status, Status::Ok);
            assert_eq!(
                g.answer(c, f.fault_id, FaultOutcome::Resolved).status,
                Status::Ok
            );
            answered += 1;
        }
        assert!(Instant::now() < deadline, "fill never completed");
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(g.signal(c, slot).status, DispatchStatus::Ok);
    answered
}

#[test]
fn a_session_with_two_resolved_faults_shows_two() {
    let config = ComputeConfig {
        max_bound_bytes: 1 << 30,
        ..ComputeConfig::default()
    };
    let (mut g, metrics, _guest) = with_metrics(config);
    let mut c = g.open(3, compat(), Profile::Compat);
    assert_eq!(fill_resolving(&mut g, &mut c, 0x2000_0000, 2, 1), 2);
    let unmap = BindOp::Unmap {
        va: guest_proto::GpuVa(0x2000_0000),
        size: 4096,
    };
    assert_eq!(g.bind(&mut c, unmap).status, Status::Ok);

    let text = scrape(&mut g, &metrics);
    let l = r#"guest="1",ctx="3""#;
    let v = |name: &str| sample(&text, name, l).unwrap_or_else(|| panic!("{name}:\n{text}"));
    assert_eq!(v("vhost_gpu_nc_faults_raised_total"), 2.0);
    assert_eq!(v("vhost_gpu_nc_faults_resolved_total"), 2.0);
    assert_eq!(v("vhost_gpu_nc_faults_rejected_total"), 0.0);
    assert_eq!(v("vhost_gpu_nc_faults_timed_out_total"), 0.0);
    assert_eq!(v("vhost_gpu_nc_faults_pending"), 0.0);
    assert_eq!(v("vhost_gpu_nc_fault_round_trip_seconds_count"), 2.0);
    let sum = v("vhost_gpu_nc_fault_round_trip_seconds_sum");
    assert!(sum > 0.0 && sum < 20.0, "{sum}");
    let inf = sample(
        &text,
        "vhost_gpu_nc_fault_round_trip_seconds_bucket",
        r#"guest="1",ctx="3",le="+Inf""#,
    );
    assert_eq!(inf, Some(2.0));
    let first = sample(
        &text,
        "vhost_gpu_nc_fault_round_trip_seconds_bucket",
        r#"guest="1",ctx="3",le="0.000001""#,
    );
    assert!(first.is_some(), "the 1 us bucket:\n{text}");
    assert_eq!(v("vhost_gpu_nc_binds_total"), 2.0);
    assert_eq!(v("vhost_gpu_nc_bind_bytes_total"), 8192.0);
    assert_eq!(v("vhost_gpu_nc_unbinds_total"), 1.0);
    assert_eq!(v("vhost_gpu_nc_unbind_bytes_total"), 4096.0);
    assert_eq!(v("vhost_gpu_nc_bound_bytes"), 4096.0);
    assert_eq!(v("vhost_gpu_nc_dispatches_started_total"), 1.0);
    assert_eq!(v("vhost_gpu_nc_queue_depth"), 0.0);
    assert_eq!(v("vhost_gpu_nc_queues"), 1.0);
    assert_eq!(v("vhost_gpu_nc_session_active"), 1.0);
    assert_eq!(v("vhost_gpu_nc_sessions_total"), 1.0);
    let ended = |status: &str| {
        sample(
            &text,
            "vhost_gpu_nc_dispatches_ended_total",
            &format!(r#"guest="1",ctx="3",status="{status}""#),
        )
    };
    assert_eq!(ended("ok"), Some(1.0));
    assert_eq!(ended("fault_rejected"), Some(0.0));
    let gl = r#"guest="1""#;
    assert_eq!(
        sample(&text, "vhost_gpu_nc_guest_bound_bytes", gl),
        Some(4096.0)
    );
    assert_eq!(
        sample(&text, "vhost_gpu_nc_guest_bound_bytes_limit", gl),
        Some((1u64 << 30) as f64)
    );
    assert_eq!(sample(&text, "vhost_gpu_nc_contexts", gl), Some(1.0));
    assert_eq!(sample(&text, "vhost_gpu_nc_guests", ""), Some(1.0));
}

#[test]
fn a_rejected_fault_a_new_session_and_a_destroyed_context() {
    let (mut g, metrics, guest) = with_metrics(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let q = g.create_queue(&mut c);
    assert_eq!(g.fill(&mut c, q, 0x3000_0000, 16, 2, 5), Status::Ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    let faults = loop {
        let f = g.take_faults(&mut c);
        if !f.is_empty() {
            break f;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_micros(200));
    };
    g.answer(&mut c, faults[0].fault_id, FaultOutcome::Rejected);
    assert_eq!(
        g.wait_signal(&mut c, 2, 5).status,
        DispatchStatus::FaultRejected
    );
    // A second session in the same context: the counts go on.
    c.proto.destroy().unwrap();
    let text = scrape(&mut g, &metrics);
    let l = r#"guest="1",ctx="1""#;
    assert_eq!(
        sample(&text, "vhost_gpu_nc_session_active", l),
        Some(0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "vhost_gpu_nc_queues", l), Some(0.0));
    c.proto.start(c.session_res, Profile::Compat).unwrap();
    assert_eq!(fill_resolving(&mut g, &mut c, 0x4000_0000, 1, 3), 1);
    let text = scrape(&mut g, &metrics);
    let v = |name: &str| sample(&text, name, l).unwrap_or_else(|| panic!("{name}:\n{text}"));
    assert_eq!(v("vhost_gpu_nc_sessions_total"), 2.0);
    assert_eq!(v("vhost_gpu_nc_faults_raised_total"), 2.0);
    assert_eq!(v("vhost_gpu_nc_faults_rejected_total"), 1.0);
    assert_eq!(v("vhost_gpu_nc_faults_resolved_total"), 1.0);
    assert_eq!(v("vhost_gpu_nc_fault_round_trip_seconds_count"), 2.0);
    assert_eq!(v("vhost_gpu_nc_dispatches_started_total"), 2.0);
    assert_eq!(v("vhost_gpu_nc_bound_bytes"), 4096.0, "this session's");
    let rejected = sample(
        &text,
        "vhost_gpu_nc_dispatches_ended_total",
        r#"guest="1",ctx="1",status="fault_rejected""#,
    );
    assert_eq!(rejected, Some(1.0));

    // A destroyed context's series go; a disconnected guest's too.
    g.nc().destroy_context(c.ctx);
    let text = scrape(&mut g, &metrics);
    assert_eq!(sample(&text, "vhost_gpu_nc_faults_raised_total", l), None);
    assert_eq!(
        sample(&text, "vhost_gpu_nc_contexts", r#"guest="1""#),
        Some(0.0)
    );
    metrics.guest_gone(&guest);
    let text = metrics.render();
    assert_eq!(sample(&text, "vhost_gpu_nc_contexts", r#"guest="1""#), None);
    assert_eq!(sample(&text, "vhost_gpu_nc_guests", ""), Some(0.0));
}

#[test]
fn a_scrape_without_a_publishing_backend_shows_the_last_snapshot_in_bounded_time() {
    let (mut g, metrics, _guest) = with_metrics(ComputeConfig::default());
    let _c = g.open(5, compat(), Profile::Compat);
    // Nobody ticks the backend: the scrape waits at most PUBLISH_WAIT.
    let t = Instant::now();
    let text = metrics.render();
    assert!(t.elapsed() < crate::metrics::PUBLISH_WAIT + Duration::from_secs(1));
    // The snapshot taken when the session started.
    assert_eq!(
        sample(&text, "vhost_gpu_nc_session_active", r#"guest="1",ctx="5""#),
        Some(1.0)
    );
}

#[test]
fn user_queue_packets_copy_bytes_interrupts_and_doorbells_are_shown() {
    use guest_proto::reply::{QueueCreateReply, ReplyPayload};
    use guest_proto::sdma::SdmaPacket;
    use guest_proto::uq::{UserQueueCreate, UserQueueKind};
    use guest_proto::{GpuVa, Request, ResourceId};
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

    const RING: u64 = 0x5000_0000;
    const CTL: u64 = 0x5100_0000;
    const DST: u64 = 0x6000_0000;
    let (mut g, metrics, _guest) = with_metrics(ComputeConfig::default());
    let mut c = g.open(2, compat(), Profile::Compat);
    let bound = |g: &mut Guest, c: &mut Client, res: u32, va: u64, bytes: u64| {
        let gpa = g.resource(c.ctx, res, bytes);
        let op = BindOp::MapResource {
            va: GpuVa(va),
            size: bytes,
            perms: Perms::RW,
            resource: ResourceId(res),
            offset: 0,
        };
        assert_eq!(g.bind(c, op).status, Status::Ok);
        gpa
    };
    let ring = bound(&mut g, &mut c, 50, RING, 4096);
    let ctl = bound(&mut g, &mut c, 51, CTL, 4096);
    bound(&mut g, &mut c, 52, DST, 4096);
    let create = UserQueueCreate {
        kind: UserQueueKind::Sdma,
        priority: 0,
        ring: GpuVa(RING),
        ring_size: 4096,
        rptr: GpuVa(CTL),
        wptr: None,
        doorbell: GpuVa(CTL + 8),
        status: Some(GpuVa(CTL + 64)),
    };
    let r = g.call(&mut c, &Request::UserQueueCreate(create));
    assert!(
        matches!(
            r.payload,
            ReplyPayload::UserQueueCreate(QueueCreateReply { .. })
        ),
        "{r:?}"
    );
    let packets = [
        SdmaPacket::ConstFill {
            dst: GpuVa(DST),
            data: 0xAB,
            element_shift: 2,
            elements: 256,
        },
        SdmaPacket::Trap { int_ctx: 1 },
    ];
    let mut wptr = 0u64;
    for p in &packets {
        let bytes = p.encode_bytes();
        g.mem
            .memory()
            .write_slice(&bytes, GuestAddress(ring + wptr))
            .unwrap();
        wptr += bytes.len() as u64;
    }
    g.mem
        .memory()
        .store(
            wptr,
            GuestAddress(ctl + 8),
            std::sync::atomic::Ordering::Release,
        )
        .unwrap();
    assert_eq!(g.call(&mut c, &Request::DoorbellKick).status, Status::Ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.mem.memory().read_obj::<u64>(GuestAddress(ctl)).unwrap() != wptr {
        assert!(Instant::now() < deadline, "the queue never drained");
        g.nc().tick();
        std::thread::sleep(Duration::from_micros(100));
    }
    let text = scrape(&mut g, &metrics);
    let l = r#"guest="1",ctx="2""#;
    let v = |name: &str| sample(&text, name, l).unwrap_or_else(|| panic!("{name}:\n{text}"));
    assert_eq!(v("vhost_gpu_nc_user_queue_packets_total"), 2.0);
    assert_eq!(v("vhost_gpu_nc_copy_bytes_total"), 1024.0);
    assert_eq!(v("vhost_gpu_nc_interrupts_total"), 1.0);
    assert!(v("vhost_gpu_nc_doorbell_polls_total") >= 1.0);
    assert_eq!(v("vhost_gpu_nc_queues"), 1.0);
    // Either the queue's first look came before the doorbell (one
    // sample, from the kick) or it found the work at once (none).
    assert!(v("vhost_gpu_nc_doorbell_latency_seconds_count") <= 1.0);
    assert!(
        sample(
            &text,
            "vhost_gpu_nc_doorbell_latency_seconds_bucket",
            r#"guest="1",ctx="2",le="+Inf""#
        )
        .is_some()
    );
}
