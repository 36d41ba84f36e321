//! Writes the seed corpora of the fuzz targets: one valid encoding of every
//! request (and of what the device writes back), so the fuzzers start from
//! the interesting parts of the input space.
//!
//! `cargo run --bin make_seeds` from `fuzz/`; the output is committed.

use std::fs;
use std::path::Path;

use guest_proto::attr::{RangeAttr, RangeAttrs};
use guest_proto::bind::{BindOp, PageList, VmBind};
use guest_proto::capset::Capset;
use guest_proto::command::{Dispatch, QueueCreate, QueueDestroy};
use guest_proto::fault::{FaultOutcome, FaultReply, FaultReplyEntry};
use guest_proto::reply::Reply;
use guest_proto::signal::SignalSlot;
use guest_proto::writer::RequestWriter;
use guest_proto::*;

/// The `submit_stream` input format: a byte `n`, then `8·n` bytes.
fn submit_seed(stream: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in stream.chunks(255 * 8) {
        out.push(u8::try_from(chunk.len() / 8).unwrap_or(u8::MAX));
        out.extend_from_slice(chunk);
    }
    out
}

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let pages = [GuestPhysAddr(0x10_0000), GuestPhysAddr(0x20_0000)];
    let entries = [FaultReplyEntry {
        fault_id: FaultId(7),
        outcome: FaultOutcome::Resolved,
    }];
    let ops = [
        BindOp::MapResource {
            va: GpuVa(0x1000_0000),
            size: 0x2000,
            perms: Perms::RW,
            resource: ResourceId(3),
            offset: 0x1000,
        },
        BindOp::MapPages {
            va: GpuVa(0x2000_0000),
            perms: Perms::READ,
            pages: PageList::new(&pages),
        },
        BindOp::Unmap {
            va: GpuVa(0x1000_0000),
            size: 0x1000,
        },
    ];
    let init = vhost_gpu_nc_fuzz::session_init(ResourceId(1));
    let kernels = [
        Kernel::Fill {
            dst: GpuVa(0x1000_0000),
            count: 1024,
            value: 5,
        },
        Kernel::Copy {
            dst: GpuVa(0x1000_0000),
            src: GpuVa(0x2000_0000),
            size: 4096,
        },
        Kernel::AtomicAdd {
            counters: GpuVa(0x1000_0000),
            num_counters: 8,
            items: 100,
            addend: 3,
        },
        Kernel::Saxpy {
            x: GpuVa(0x1000_0000),
            y: GpuVa(0x2000_0000),
            count: 64,
            a: 2.0,
        },
        Kernel::Gather {
            dst: GpuVa(0x1000_0000),
            src: GpuVa(0x2000_0000),
            indices: GpuVa(0x3000_0000),
            count: 16,
        },
        Kernel::PointerChase {
            head: GpuVa(0x1000_0000),
            max_steps: 100,
            result: GpuVa(0x2000_0000),
        },
    ];
    let mut all: Vec<(String, Request<'_>)> = vec![
        ("session_init".into(), Request::SessionInit(init)),
        ("session_destroy".into(), Request::SessionDestroy),
        ("device_query".into(), Request::DeviceQuery),
        ("vm_bind".into(), Request::VmBind(VmBind::new(&ops))),
        (
            "range_attr".into(),
            Request::RangeAttr(RangeAttr {
                va: GpuVa(0x1000_0000),
                size: 1 << 20,
                attrs: RangeAttrs {
                    access: Some(Perms::READ),
                    fault_policy: Some(FaultPolicy::Fatal),
                    granule_shift: Some(16),
                    prefault: Some(true),
                },
            }),
        ),
        (
            "queue_create".into(),
            Request::QueueCreate(QueueCreate { priority: 3 }),
        ),
        (
            "queue_destroy".into(),
            Request::QueueDestroy(QueueDestroy { queue: QueueId(1) }),
        ),
        (
            "fault_reply".into(),
            Request::FaultReply(FaultReply::new(&entries)),
        ),
        ("event_arm".into(), Request::EventArm),
        (
            "svm_attach".into(),
            Request::SvmAttach(guest_proto::svm::SvmAttach {
                fault_ring: guest_proto::svm::GpaRegion {
                    gpa: guest_proto::GuestPhysAddr(0x10_0000),
                    size: 128 + 32 * 64,
                },
                reply: guest_proto::svm::GpaRegion {
                    gpa: guest_proto::GuestPhysAddr(0x20_0000),
                    size: 4096,
                },
            }),
        ),
        ("svm_detach".into(), Request::SvmDetach),
    ];
    for (i, k) in kernels.iter().enumerate() {
        let d = Dispatch {
            queue: QueueId(1),
            kernel: *k,
            signal: Some(SignalIndex(2)),
            notify: i % 2 == 0,
            completion_value: 9,
        };
        all.push((format!("dispatch_{}", k.id()), Request::Dispatch(d)));
    }
    let decode = root.join("wire_decode");
    let roundtrip = root.join("wire_roundtrip");
    let submit = root.join("submit_stream");
    for dir in [&decode, &roundtrip, &submit] {
        fs::create_dir_all(dir)?;
    }
    let mut stream = RequestWriter::new(0..4096);
    for (name, r) in &all {
        let mut one = Vec::new();
        r.encode(1, 64, &mut one).map_err(std::io::Error::other)?;
        fs::write(decode.join(name), &one)?;
        fs::write(roundtrip.join(name), &one)?;
        if !matches!(
            r,
            Request::SessionInit(_) | Request::SessionDestroy | Request::EventArm
        ) {
            let _ = stream.push(r);
        }
    }
    fs::write(decode.join("stream"), stream.as_bytes())?;
    fs::write(submit.join("stream"), submit_seed(stream.as_bytes()))?;
    for (name, r) in &all {
        let mut w = RequestWriter::new(0..4096);
        if w.push(r).is_ok() {
            fs::write(submit.join(name), submit_seed(w.as_bytes()))?;
        }
    }
    let reply = Reply::error(5, Command::VmBind.as_u32(), Status::Quota).encode();
    fs::write(roundtrip.join("reply"), reply.as_bytes())?;
    fs::write(roundtrip.join("capset"), Capset::default().encode())?;
    let slot = SignalSlot {
        value: 3,
        status: DispatchStatus::FaultRejected,
        error_va: GpuVa(0x5000),
    };
    fs::write(roundtrip.join("signal"), slot.encode())?;
    println!("seeds written under {}", root.display());
    Ok(())
}
