//! The daemon as a virtio-gpu device, over its real vhost-user socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use vhost::VhostBackend;

use harness::{
    Daemon, Desc, F_BLOB, F_CONTEXT_INIT, F_EDID, F_VIRGL, REQ_GPA, RESP_GPA, Vmm, entries, hdr,
    req,
};
use vhost::vhost_user::gpu_message::GpuBackendReq;
use vhost_gpu_nc::virtio_gpu::protocol::{
    VIRTIO_GPU_CMD_CTX_DESTROY, VIRTIO_GPU_CMD_GET_CAPSET, VIRTIO_GPU_CMD_GET_CAPSET_INFO,
    VIRTIO_GPU_CMD_GET_DISPLAY_INFO, VIRTIO_GPU_CMD_GET_EDID, VIRTIO_GPU_CMD_MOVE_CURSOR,
    VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
    VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB, VIRTIO_GPU_CMD_RESOURCE_FLUSH,
    VIRTIO_GPU_CMD_RESOURCE_UNREF, VIRTIO_GPU_CMD_SET_SCANOUT, VIRTIO_GPU_CMD_SET_SCANOUT_BLOB,
    VIRTIO_GPU_CMD_SUBMIT_3D, VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D,
    VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID, VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
    VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID, VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID,
    VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY, VIRTIO_GPU_RESP_ERR_UNSPEC, VIRTIO_GPU_RESP_OK_CAPSET,
    VIRTIO_GPU_RESP_OK_CAPSET_INFO, VIRTIO_GPU_RESP_OK_DISPLAY_INFO, VIRTIO_GPU_RESP_OK_EDID,
    VIRTIO_GPU_RESP_OK_NODATA,
};

/// vhost-user-gpu messages the frontend's end sees.
const SCANOUT: u32 = GpuBackendReq::SCANOUT as u32;
const UPDATE: u32 = GpuBackendReq::UPDATE as u32;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

#[test]
fn features_and_config_space() {
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL | F_EDID | F_CONTEXT_INIT | F_BLOB);
    for f in [F_VIRGL, F_EDID, F_CONTEXT_INIT, F_BLOB] {
        assert_ne!(vmm.features & f, 0, "feature {f:#x} offered");
    }
    let c = vmm.config();
    assert_eq!(u32_at(&c, 8), 1, "num_scanouts");
    assert_eq!(u32_at(&c, 12), 1, "num_capsets");
}

#[test]
fn display_info_edid_and_capsets() {
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL | F_EDID);
    let r = vmm.ctrl(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[]), 24 + 16 * 24);
    assert_eq!(u32_at(&r, 0), VIRTIO_GPU_RESP_OK_DISPLAY_INFO);
    assert_eq!(
        (u32_at(&r, 32), u32_at(&r, 36), u32_at(&r, 40)),
        (1024, 768, 1)
    );
    assert_eq!(u32_at(&r, 24 + 24 + 16), 0, "scanout 1 disabled");

    let r = vmm.ctrl(&req(VIRTIO_GPU_CMD_GET_EDID, 0, &[0, 0]), 24 + 8 + 1024);
    assert_eq!(u32_at(&r, 0), VIRTIO_GPU_RESP_OK_EDID);
    let size = u32_at(&r, 24) as usize;
    let edid = &r[32..32 + size];
    assert_eq!(&edid[..8], &[0, 255, 255, 255, 255, 255, 255, 0]);
    assert_eq!(
        edid[..128].iter().fold(0u8, |a, b| a.wrapping_add(*b)),
        0,
        "checksum"
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_EDID, 0, &[1, 0])),
        VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID
    );

    let r = vmm.ctrl(&req(VIRTIO_GPU_CMD_GET_CAPSET_INFO, 0, &[0, 0]), 40);
    assert_eq!(u32_at(&r, 0), VIRTIO_GPU_RESP_OK_CAPSET_INFO);
    assert_eq!(
        (u32_at(&r, 24), u32_at(&r, 28), u32_at(&r, 32)),
        (24, 1, 128)
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_CAPSET_INFO, 0, &[1, 0])),
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER
    );
    let r = vmm.ctrl(&req(VIRTIO_GPU_CMD_GET_CAPSET, 0, &[24, 1]), 24 + 128);
    assert_eq!(u32_at(&r, 0), VIRTIO_GPU_RESP_OK_CAPSET);
    let capset = guest_proto::capset::Capset::decode(&r[24..]).unwrap();
    assert_eq!(capset.va_bits, 48);
    assert_eq!(capset.compute_units, 2);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_CAPSET, 0, &[6, 1])),
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER
    );
}

#[test]
fn two_d_resources_transfer_flush_and_scanout() {
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[1, 2, 64, 64])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[1, 2, 64, 64])),
        VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID,
        "reused id"
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[2, 2, 0, 64])),
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER
    );
    let gpa = vmm.alloc(64 * 64 * 4);
    vmm.ram.write(gpa, &vec![0x7f; 64 * 64 * 4]);
    let mut a = req(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, 0, &[1, 1]);
    a.extend(entries(&[(gpa, 64 * 64 * 4)]));
    assert_eq!(vmm.ctrl_type(&a), VIRTIO_GPU_RESP_OK_NODATA);
    // rect, offset, resource
    let mut t = req(VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D, 0, &[0, 0, 64, 64]);
    t.extend_from_slice(&0u64.to_le_bytes());
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(vmm.ctrl_type(&t), VIRTIO_GPU_RESP_OK_NODATA);
    let mut bad = req(VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D, 0, &[60, 0, 8, 64]);
    bad.extend_from_slice(&0u64.to_le_bytes());
    bad.extend_from_slice(&1u32.to_le_bytes());
    bad.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        vmm.ctrl_type(&bad),
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
        "rect outside the image"
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_SET_SCANOUT, 0, &[0, 0, 64, 64, 0, 1])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_SET_SCANOUT, 0, &[0, 0, 64, 64, 3, 1])),
        VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID
    );
    assert_eq!(
        vmm.ctrl_type(&req(
            VIRTIO_GPU_CMD_RESOURCE_FLUSH,
            0,
            &[0, 0, 64, 64, 1, 0]
        )),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_UNREF, 0, &[1, 0])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_UNREF, 0, &[1, 0])),
        VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID
    );
}

#[test]
fn contexts_with_and_without_context_init() {
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL | F_CONTEXT_INIT);
    assert_eq!(
        vmm.ctx_create(1, 0),
        VIRTIO_GPU_RESP_OK_NODATA,
        "compat context"
    );
    assert_eq!(
        vmm.ctx_create(1, 0),
        VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID,
        "reused id"
    );
    assert_eq!(
        vmm.ctx_create(2, 24),
        VIRTIO_GPU_RESP_OK_NODATA,
        "native context"
    );
    assert_eq!(
        vmm.ctx_create(3, 1),
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
        "a capset we do not serve"
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_CTX_DESTROY, 2, &[])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_CTX_DESTROY, 2, &[])),
        VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID
    );
    assert_eq!(vmm.ctx_attach(9, 1), VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID);
    assert_eq!(
        vmm.ctx_attach(1, 77),
        VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID
    );
}

#[test]
fn malformed_commands_get_errors_and_the_device_keeps_working() {
    let mut d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    // Too short for a header.
    assert_eq!(vmm.ctrl_type(&[1, 2, 3]), VIRTIO_GPU_RESP_ERR_UNSPEC);
    // Unknown command.
    assert_eq!(
        vmm.ctrl_type(&req(0x0999, 0, &[])),
        VIRTIO_GPU_RESP_ERR_UNSPEC
    );
    // Truncated body.
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[5])),
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER
    );
    // GuestBacking outside guest RAM, and a huge entry count.
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[5, 2, 16, 16])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    let mut a = req(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, 0, &[5, 1]);
    a.extend(entries(&[(1 << 40, 4096)]));
    assert_eq!(vmm.ctrl_type(&a), VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER);
    let mut a = req(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, 0, &[5, u32::MAX]);
    a.extend(entries(&[(0x40_0000, 4096)]));
    assert_eq!(vmm.ctrl_type(&a), VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER);
    // SUBMIT_3D whose size runs past the request (checked when it is
    // decoded, before its context is looked up).
    let mut s = hdr(VIRTIO_GPU_CMD_SUBMIT_3D, 0, 0, 0, 0);
    s.extend_from_slice(&4096u32.to_le_bytes());
    s.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(vmm.ctrl_type(&s), VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER);
    // A whole SUBMIT_3D on a context that does not exist.
    let mut s = hdr(VIRTIO_GPU_CMD_SUBMIT_3D, 0, 0, 0, 0);
    s.extend_from_slice(&0u32.to_le_bytes());
    s.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(vmm.ctrl_type(&s), VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID);
    // A response buffer too small for the response: truncated, not a crash.
    let r = vmm.ctrl(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[]), 8);
    assert_eq!(r.len(), 8);
    // A chain whose descriptor points outside guest RAM: returned empty.
    vmm.post(
        0,
        &[
            Desc {
                addr: 1 << 40,
                len: 64,
                write: false,
            },
            Desc {
                addr: RESP_GPA,
                len: 24,
                write: true,
            },
        ],
    );
    let (_, len) = vmm.wait_used(0, Duration::from_secs(10)).unwrap();
    assert_eq!(len, 0);
    // A chain that loops onto itself.
    vmm.ram
        .write(REQ_GPA, &req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[]));
    vmm.raw_desc(0, 200, REQ_GPA, 24, 1, 200);
    vmm.publish(0, 200);
    let (head, len) = vmm.wait_used(0, Duration::from_secs(10)).unwrap();
    assert_eq!((head, len), (200, 0));
    // Still serving.
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[])),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
    assert!(d.alive());
}

#[test]
fn the_resource_quota_is_enforced() {
    let d = Daemon::start(&["--max-resources", "3"]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    for id in 1..=3 {
        assert_eq!(
            vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[id, 2, 8, 8])),
            VIRTIO_GPU_RESP_OK_NODATA
        );
    }
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[4, 2, 8, 8])),
        VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_UNREF, 0, &[2, 0])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[4, 2, 8, 8])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
}

#[test]
fn reconnect_gets_fresh_state_and_sigterm_exits_cleanly() {
    let mut d = Daemon::start(&[]);
    {
        let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
        assert_eq!(
            vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[1, 2, 8, 8])),
            VIRTIO_GPU_RESP_OK_NODATA
        );
        assert_eq!(vmm.ctx_create(1, 0), VIRTIO_GPU_RESP_OK_NODATA);
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[1, 2, 8, 8])),
        VIRTIO_GPU_RESP_OK_NODATA,
        "id 1 is free again"
    );
    assert_eq!(
        vmm.ctx_create(1, 0),
        VIRTIO_GPU_RESP_OK_NODATA,
        "context 1 is free again"
    );
    drop(vmm);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    let status = d.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!d.socket.exists(), "socket removed");
    let _ = REQ_GPA;
}

#[test]
fn host_copies_of_images_are_bounded_per_guest() {
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    // 64 MiB each; 256 MiB in total.
    for id in 1..=4 {
        assert_eq!(
            vmm.ctrl_type(&req(
                VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
                0,
                &[id, 2, 4096, 4096]
            )),
            VIRTIO_GPU_RESP_OK_NODATA
        );
    }
    assert_eq!(
        vmm.ctrl_type(&req(
            VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
            0,
            &[5, 2, 4096, 4096]
        )),
        VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY
    );
    assert_eq!(
        vmm.ctrl_type(&req(
            VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
            0,
            &[5, 2, 4097, 4096]
        )),
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
        "over 64 MiB"
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_UNREF, 0, &[1, 0])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(
        vmm.ctrl_type(&req(
            VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
            0,
            &[5, 2, 4096, 4096]
        )),
        VIRTIO_GPU_RESP_OK_NODATA
    );
}

#[test]
fn the_scanout_reaches_the_frontend_over_the_gpu_socket() {
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL | F_EDID);
    let peer = vmm.set_gpu_socket();
    // The mode comes from the frontend now.
    let r = vmm.ctrl(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[]), 24 + 16 * 24);
    assert_eq!((u32_at(&r, 32), u32_at(&r, 36)), (800, 600));
    // The frontend has no EDID: the daemon builds one for its mode.
    let r = vmm.ctrl(&req(VIRTIO_GPU_CMD_GET_EDID, 0, &[0, 0]), 24 + 8 + 1024);
    assert_eq!(u32_at(&r, 0), VIRTIO_GPU_RESP_OK_EDID);
    assert_eq!(
        u32::from(r[32 + 56]) | (u32::from(r[32 + 58] >> 4) << 8),
        800
    );
    // A 4x2 image, pixel i = i, shown and flushed.
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[1, 2, 4, 2])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    let gpa = vmm.alloc(4096);
    let pixels: Vec<u8> = (0..8u32).flat_map(|i| i.to_le_bytes()).collect();
    vmm.ram.write(gpa, &pixels);
    let mut a = req(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, 0, &[1, 1]);
    a.extend(entries(&[(gpa, 4096)]));
    assert_eq!(vmm.ctrl_type(&a), VIRTIO_GPU_RESP_OK_NODATA);
    let mut t = req(VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D, 0, &[0, 0, 4, 2]);
    t.extend_from_slice(&0u64.to_le_bytes());
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(vmm.ctrl_type(&t), VIRTIO_GPU_RESP_OK_NODATA);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_SET_SCANOUT, 0, &[0, 0, 4, 2, 0, 1])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_FLUSH, 0, &[1, 0, 2, 2, 1, 0])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let msgs = loop {
        let m = peer.msgs.lock().unwrap().clone();
        if m.iter().any(|m| m.request == UPDATE) || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let scanout = msgs
        .iter()
        .find(|m| m.request == SCANOUT)
        .expect("SCANOUT sent");
    assert_eq!(&scanout.body[..12], &[0, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0, 0]);
    let update = msgs
        .iter()
        .find(|m| m.request == UPDATE)
        .expect("UPDATE sent");
    // scanout 0, x 1, y 0, 2x2, then the pixels of that rectangle.
    let head: Vec<u32> = (0..5).map(|i| u32_at(&update.body, i * 4)).collect();
    assert_eq!(head, vec![0, 1, 0, 2, 2]);
    let px: Vec<u32> = (0..4).map(|i| u32_at(&update.body, 20 + i * 4)).collect();
    assert_eq!(px, vec![1, 2, 5, 6]);
}

/// MOVE_CURSOR on the cursor queue; whether it came back.
fn cursor_answers(vmm: &mut Vmm) -> bool {
    let gpa = REQ_GPA + 0x8000;
    vmm.ram.write(
        gpa,
        &req(VIRTIO_GPU_CMD_MOVE_CURSOR, 0, &[0, 10, 20, 0, 0, 0, 0, 0]),
    );
    vmm.post(
        1,
        &[
            Desc {
                addr: gpa,
                len: 56,
                write: false,
            },
            Desc {
                addr: gpa + 0x100,
                len: 24,
                write: true,
            },
        ],
    );
    vmm.wait_used(1, Duration::from_secs(5)).is_some()
}

/// Waits for the daemon to signal queue `q`'s error eventfd.
fn wait_vring_error(vmm: &Vmm, q: usize) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if vmm.vring_error(q) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// After a ring error on the control queue: the queue is refused and the
/// error reported once, the cursor queue and new connections still work,
/// and the control queue works again once the frontend resets it.
fn control_queue_survives(d: &mut Daemon, mut vmm: Vmm) {
    assert!(wait_vring_error(&vmm, 0), "ring error reported");
    assert!(cursor_answers(&mut vmm), "the cursor queue still answers");
    // Further work on the broken queue is refused, not processed.
    vmm.ram
        .write(REQ_GPA, &req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[]));
    vmm.post(
        0,
        &[
            Desc {
                addr: REQ_GPA,
                len: 24,
                write: false,
            },
            Desc {
                addr: RESP_GPA,
                len: 24,
                write: true,
            },
        ],
    );
    assert!(vmm.wait_used(0, Duration::from_millis(200)).is_none());
    assert!(!vmm.vring_error(0), "reported once");
    // The frontend resets the queue (as QEMU does on a guest reset).
    vmm.reset_queue(0);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[])),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
    drop(vmm);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[])),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
    assert!(d.alive());
    let broken = d.log().lines().filter(|l| l.contains("ring error")).count();
    assert_eq!(broken, 1, "one log line per broken queue:\n{}", d.log());
}

#[test]
fn a_head_index_beyond_the_queue_breaks_only_that_queue() {
    let mut d = Daemon::start_logged(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[])),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
    vmm.publish(0, harness::QUEUE_SIZE + 44);
    control_queue_survives(&mut d, vmm);
}

#[test]
fn an_avail_index_too_far_ahead_breaks_only_that_queue() {
    let mut d = Daemon::start_logged(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    vmm.advance_avail(0, harness::QUEUE_SIZE + 1);
    control_queue_survives(&mut d, vmm);
}

#[test]
fn a_vring_base_beyond_the_queue_breaks_only_that_queue() {
    let mut d = Daemon::start_logged(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    vmm.frontend.set_vring_base(0, 5000).unwrap();
    vmm.advance_avail(0, 0);
    control_queue_survives(&mut d, vmm);
}

/// Waits until the daemon's fd list has not changed for 100 ms (it is
/// back in accept() with the next connection's device ready).
fn quiescent_fds(d: &Daemon) -> Vec<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last = d.fds();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = d.fds();
        if now == last || std::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// One vhost-user connection that is served (GET_FEATURES answered), then
/// dropped.
fn connect_and_hang_up(socket: &std::path::Path) {
    let s = harness::connect_socket(socket);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let f = vhost::vhost_user::Frontend::from_stream(s, 2);
    f.get_features().expect("the daemon serves the connection");
}

#[test]
fn a_thousand_reconnects_leave_the_fd_count_flat() {
    let mut d = Daemon::start(&[]);
    {
        let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
        assert_eq!(
            vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[])),
            VIRTIO_GPU_RESP_OK_DISPLAY_INFO
        );
    }
    let before = quiescent_fds(&d);
    let start = std::time::Instant::now();
    for _ in 0..1000 {
        connect_and_hang_up(&d.socket);
    }
    let took = start.elapsed();
    let mut after = quiescent_fds(&d);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while after.len() != before.len() && std::time::Instant::now() < deadline {
        after = quiescent_fds(&d);
    }
    eprintln!(
        "1000 reconnects in {took:?}: {} fds before, {} after",
        before.len(),
        after.len()
    );
    assert_eq!(
        after.len(),
        before.len(),
        "{} fds leaked",
        after.len().saturating_sub(before.len())
    );
    assert!(d.alive());
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[])),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
}

#[test]
fn out_of_fds_the_accept_loop_backs_off_and_serves_again_when_they_free_up() {
    let d = Daemon::start_logged(&[]);
    // Waiting in accept() with the next connection's device made: the
    // lowest free fd number is what the daemon needs when idle.
    let idle = quiescent_fds(&d);
    let lowest_free = (0..).find(|n| !idle.contains(n)).unwrap();
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[])),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
    // Fewer fds than a fresh device needs: after this connection the
    // daemon cannot set up the next one.
    let old = d.set_fd_limit(lowest_free as u64 - 3);
    drop(vmm);
    let lines_before = d.log().lines().count();
    let cpu_before = d.cpu_time();
    // A frontend connects meanwhile (it waits in the listen backlog).
    let pending = harness::connect_socket(&d.socket);
    let window = Duration::from_millis(1500);
    std::thread::sleep(window);
    let cpu = d.cpu_time() - cpu_before;
    let log = d.log();
    let lines = log.lines().count() - lines_before;
    eprintln!("out of fds for {window:?}: {cpu:?} CPU, {lines} log lines");
    assert!(lines >= 1, "the failure is logged");
    assert!(lines <= 10, "{lines} log lines in {window:?}:\n{log}");
    assert!(cpu < window / 10, "{cpu:?} CPU in {window:?}");
    // The fds free up: the waiting frontend is served.
    d.set_fd_limit(old.rlim_cur);
    let vmm = Vmm::try_connect_stream(pending, harness::Setup::new(F_VIRGL));
    let mut vmm = vmm.unwrap_or_else(|e| panic!("{e}: {}", d.log()));
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[])),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
}

#[test]
fn a_memory_region_larger_than_its_file_is_refused() {
    let mut d = Daemon::start(&[]);
    let mut setup = harness::Setup::new(F_VIRGL);
    // The region claims RAM_SIZE bytes; the memfd has half of that.
    setup.file_size = harness::RAM_SIZE / 2;
    match Vmm::try_connect(&d.socket, setup) {
        Err(e) => eprintln!("refused: {e}"),
        Ok(mut vmm) => {
            // A request in the second half of the region, past the end of
            // the file.
            let past_eof = harness::RAM_SIZE as u64 * 3 / 4;
            vmm.post(
                0,
                &[
                    Desc {
                        addr: past_eof,
                        len: 24,
                        write: false,
                    },
                    Desc {
                        addr: RESP_GPA,
                        len: 24,
                        write: true,
                    },
                ],
            );
            let _ = vmm.wait_used(0, Duration::from_secs(2));
            std::thread::sleep(Duration::from_millis(200));
            let status = d.child.try_wait().unwrap();
            panic!("the table was taken; daemon exit status: {status:?}");
        }
    }
    assert!(d.alive());
    // The daemon serves the next frontend.
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[])),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
}

#[test]
fn backing_entries_count_against_a_per_guest_host_memory_budget() {
    // The default budget is 64 MiB of entries (16 bytes each): sixteen
    // backings of 2^18 entries.
    const N: usize = 1 << 18;
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    let page = vmm.alloc(4096);
    let big = vmm.alloc(16 * N as u64 + 4096);
    // Every entry names the same page: duplicates are allowed, and counted.
    let same_page = |n: usize| entries(&[(page, 4096)]).repeat(n);
    let attach = |vmm: &mut Vmm, id: u32, list: &[u8]| {
        assert_eq!(
            vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[id, 2, 8, 8])),
            VIRTIO_GPU_RESP_OK_NODATA
        );
        let mut a = req(
            VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING,
            0,
            &[id, (list.len() / 16) as u32],
        );
        a.extend_from_slice(list);
        let r = vmm.ctrl_at(big, &a, 24);
        u32::from_le_bytes(r[..4].try_into().unwrap())
    };
    let start = std::time::Instant::now();
    for id in 1..=15 {
        assert_eq!(
            attach(&mut vmm, id, &same_page(N)),
            VIRTIO_GPU_RESP_OK_NODATA,
            "{id}"
        );
    }
    // 60 MiB in use. 2^18 adjacent entries (all of guest RAM in 256-byte
    // pieces) are merged into one: this costs 16 bytes, not 4 MiB...
    let adjacent: Vec<(u64, u32)> = (0..N as u64).map(|i| (i * 256, 256)).collect();
    assert_eq!(
        attach(&mut vmm, 100, &entries(&adjacent)),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    // ... so 4 MiB less 16 bytes still fit ...
    assert_eq!(
        attach(&mut vmm, 16, &same_page(N - 1)),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    // ... and then the budget is full.
    assert_eq!(
        attach(&mut vmm, 17, &same_page(1)),
        VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY,
        "over the budget"
    );
    // Freeing a backing gives its bytes back.
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_UNREF, 0, &[3, 0])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    let mut a = req(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, 0, &[17, 1]);
    a.extend_from_slice(&same_page(1));
    assert_eq!(vmm.ctrl_type(&a), VIRTIO_GPU_RESP_OK_NODATA);
    eprintln!("17 attaches of 2^18 entries in {:?}", start.elapsed());
}

/// SET_SCANOUT_BLOB: rect, scanout, resource, width, height, format,
/// padding, strides[4], offsets[4].
fn scanout_blob(id: u32, w: u32, h: u32, stride: u32, offset: u32) -> Vec<u8> {
    req(
        VIRTIO_GPU_CMD_SET_SCANOUT_BLOB,
        0,
        &[
            0, 0, w, h, 0, id, w, h, 2, 0, stride, 0, 0, 0, offset, 0, 0, 0,
        ],
    )
}

#[test]
fn set_scanout_blob_takes_blobs_only_and_their_geometry() {
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL | F_BLOB);
    let peer = vmm.set_gpu_socket();
    // A 2D resource is not a blob.
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[1, 2, 4, 2])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(
        vmm.ctrl_type(&scanout_blob(1, 4, 2, 16, 0)),
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
        "SET_SCANOUT_BLOB of a 2D resource"
    );
    // A 4 KiB guest blob; pixel i of the page = i.
    let gpa = vmm.alloc(4096);
    let px: Vec<u8> = (0..1024u32).flat_map(|i| i.to_le_bytes()).collect();
    vmm.ram.write(gpa, &px);
    let mut r = req(VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB, 0, &[2, 1, 1, 1]);
    r.extend_from_slice(&0u64.to_le_bytes());
    r.extend_from_slice(&4096u64.to_le_bytes());
    r.extend(entries(&[(gpa, 4096)]));
    assert_eq!(vmm.ctrl_type(&r), VIRTIO_GPU_RESP_OK_NODATA);
    // Strides shorter than a row, planes past the end, formats that are
    // not 4 bytes per pixel: refused.
    assert_eq!(
        vmm.ctrl_type(&scanout_blob(2, 4, 2, 12, 0)),
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(
        vmm.ctrl_type(&scanout_blob(2, 4, 2, 2048, 2048)),
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER
    );
    let mut odd = scanout_blob(2, 4, 2, 32, 0);
    odd[24 + 32..24 + 36].copy_from_slice(&0x77u32.to_le_bytes());
    assert_eq!(vmm.ctrl_type(&odd), VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER);
    // 4x2 pixels, rows 32 bytes apart, starting at byte 64.
    assert_eq!(
        vmm.ctrl_type(&scanout_blob(2, 4, 2, 32, 64)),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_FLUSH, 0, &[0, 0, 4, 2, 2, 0])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let update = loop {
        let m = peer.msgs.lock().unwrap().clone();
        if let Some(u) = m.iter().find(|m| m.request == UPDATE) {
            break u.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no UPDATE");
        std::thread::sleep(Duration::from_millis(5));
    };
    let got: Vec<u32> = (0..8).map(|i| u32_at(&update.body, 20 + i * 4)).collect();
    // Pixel (x, y) is at byte 64 + 32 y + 4 x: index 16 + 8 y + x.
    assert_eq!(got, vec![16, 17, 18, 19, 24, 25, 26, 27]);
}

#[test]
fn a_gpu_socket_peer_that_never_answers_costs_one_timeout() {
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL | F_EDID);
    let peer = vmm.set_gpu_socket_peer(harness::PeerMode::Silent);
    let start = std::time::Instant::now();
    let r = vmm.ctrl(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[]), 24 + 16 * 24);
    let first = start.elapsed();
    assert_eq!(u32_at(&r, 0), VIRTIO_GPU_RESP_OK_DISPLAY_INFO);
    assert_eq!((u32_at(&r, 32), u32_at(&r, 36)), (1024, 768), "defaults");
    assert!(first < Duration::from_secs(5), "{first:?}");
    // No more questions to a peer that has not caught up: no more waits.
    let start = std::time::Instant::now();
    let r = vmm.ctrl(&req(VIRTIO_GPU_CMD_GET_EDID, 0, &[0, 0]), 24 + 8 + 1024);
    assert_eq!(u32_at(&r, 0), VIRTIO_GPU_RESP_OK_EDID);
    assert_eq!(u32_at(&r, 24), 128, "an EDID built for the default mode");
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert!(cursor_answers(&mut vmm));
    eprintln!("silent peer: first query {first:?}");
    // The peer saw the one question.
    assert_eq!(
        peer.msgs
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.request == u32::from(GpuBackendReq::GET_DISPLAY_INFO))
            .count(),
        1
    );
}

#[test]
fn a_gpu_socket_peer_that_hangs_up_is_dropped() {
    let mut d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    vmm.set_gpu_socket_peer(harness::PeerMode::Closes);
    let r = vmm.ctrl(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[]), 24 + 16 * 24);
    assert_eq!((u32_at(&r, 32), u32_at(&r, 36)), (1024, 768), "defaults");
    // Scanout messages to the closed socket: no SIGPIPE, no error to the
    // guest.
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[1, 2, 4, 2])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    let gpa = vmm.alloc(4096);
    let mut a = req(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, 0, &[1, 1]);
    a.extend(entries(&[(gpa, 4096)]));
    assert_eq!(vmm.ctrl_type(&a), VIRTIO_GPU_RESP_OK_NODATA);
    for _ in 0..3 {
        assert_eq!(
            vmm.ctrl_type(&req(VIRTIO_GPU_CMD_SET_SCANOUT, 0, &[0, 0, 4, 2, 0, 1])),
            VIRTIO_GPU_RESP_OK_NODATA
        );
        assert_eq!(
            vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_FLUSH, 0, &[0, 0, 4, 2, 1, 0])),
            VIRTIO_GPU_RESP_OK_NODATA
        );
    }
    assert!(cursor_answers(&mut vmm));
    assert!(d.alive());
}

/// TRANSFER_TO_HOST_2D of all of a `w` x `h` resource `id`.
fn transfer_2d(vmm: &mut Vmm, id: u32, w: u32, h: u32) -> u32 {
    let mut t = req(VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D, 0, &[0, 0, w, h]);
    t.extend_from_slice(&0u64.to_le_bytes());
    t.extend_from_slice(&id.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    vmm.ctrl_type(&t)
}

#[test]
fn memory_slots_are_added_removed_and_checked() {
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    let mut d = Daemon::start(&[]);
    let mut setup = harness::Setup::new(F_VIRGL);
    setup.protocol = VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    setup.memory = harness::MemSetup::Slots;
    let mut vmm = Vmm::connect_with(&d.socket, setup);
    // An image backed by the upper slot.
    let half = harness::RAM_SIZE as u64 / 2;
    let upper = half + 0x10_0000;
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[1, 2, 16, 16])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    let mut a = req(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, 0, &[1, 1]);
    a.extend(entries(&[(upper, 4096)]));
    assert_eq!(vmm.ctrl_type(&a), VIRTIO_GPU_RESP_OK_NODATA);
    assert_eq!(transfer_2d(&mut vmm, 1, 16, 16), VIRTIO_GPU_RESP_OK_NODATA);
    // The upper slot goes: its pages cannot be read any more, the rest of
    // the device works on.
    let region = vmm.ram.region(half, half);
    vmm.frontend.remove_mem_region(&region).unwrap();
    assert_eq!(
        transfer_2d(&mut vmm, 1, 16, 16),
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[])),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
    // Back again.
    vmm.frontend.add_mem_region(&region).unwrap();
    assert_eq!(transfer_2d(&mut vmm, 1, 16, 16), VIRTIO_GPU_RESP_OK_NODATA);
    // A slot larger than its file is refused (and ends the connection).
    let small = harness::memfd(0x10_0000);
    let oversized = vhost::VhostUserMemoryRegionInfo {
        guest_phys_addr: 4 * half,
        memory_size: 0x20_0000,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&small),
    };
    assert!(vmm.frontend.add_mem_region(&oversized).is_err());
    drop(vmm);
    assert!(d.alive());
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[])),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
}

#[test]
fn reset_device_forgets_the_guest_and_keeps_the_connection() {
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    let mut d = Daemon::start(&[]);
    let mut setup = harness::Setup::new(F_VIRGL);
    setup.protocol = VhostUserProtocolFeatures::RESET_DEVICE;
    let mut vmm = Vmm::connect_with(&d.socket, setup);
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[1, 2, 8, 8])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(vmm.ctx_create(1, 0), VIRTIO_GPU_RESP_OK_NODATA);
    assert_eq!(vmm.ctx_attach(1, 1), VIRTIO_GPU_RESP_OK_NODATA);
    vmm.frontend.reset_device().unwrap();
    vmm.restart_after_reset();
    assert_eq!(
        vmm.ctrl_type(&req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[1, 2, 8, 8])),
        VIRTIO_GPU_RESP_OK_NODATA,
        "resource 1 is free again"
    );
    assert_eq!(
        vmm.ctx_create(1, 0),
        VIRTIO_GPU_RESP_OK_NODATA,
        "context 1 is free again"
    );
    assert!(d.alive());
}

/// A native-profile session on context `ctx` in a 16 KiB guest blob `res`:
/// reply buffer at 0, fault ring (64 records) at 4096, signals at 8192.
/// Returns the blob's GPA.
fn native_session(vmm: &mut Vmm, ctx: u32, res: u32) -> u64 {
    use guest_proto::command::{Profile, Region, SessionInit};
    use guest_proto::fault::FaultRingLayout;
    use guest_proto::reply::Reply;
    use guest_proto::writer::RequestWriter;
    use guest_proto::{Request, ResourceId, Status};
    assert_eq!(vmm.ctx_create(ctx, 24), VIRTIO_GPU_RESP_OK_NODATA);
    let gpa = vmm.alloc(16384);
    let mut r = req(VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB, ctx, &[res, 1, 1, 1]);
    r.extend_from_slice(&0u64.to_le_bytes());
    r.extend_from_slice(&16384u64.to_le_bytes());
    r.extend(entries(&[(gpa, 16384)]));
    assert_eq!(vmm.ctrl_type(&r), VIRTIO_GPU_RESP_OK_NODATA);
    assert_eq!(vmm.ctx_attach(ctx, res), VIRTIO_GPU_RESP_OK_NODATA);
    let rid = ResourceId(res);
    let region = |offset, size| Region {
        resource: rid,
        offset,
        size,
    };
    let init = SessionInit::new(
        Profile::Native { event_ring: 1 },
        region(0, 4096),
        region(4096, FaultRingLayout::new(64).unwrap().size()),
        region(8192, 64 * 32),
    );
    let mut w = RequestWriter::new(0..4096);
    let t = w.push(&Request::SessionInit(init)).unwrap();
    assert_eq!(vmm.submit(ctx, w.as_bytes()), VIRTIO_GPU_RESP_OK_NODATA);
    let reply = Reply::decode(&vmm.ram.read(gpa + u64::from(t.reply_off.unwrap()), 64)).unwrap();
    assert_eq!(reply.status, Status::Ok);
    gpa
}

#[test]
fn native_event_arm_with_a_reused_fence_returns_each_arm_once_in_order() {
    use guest_proto::command::{Dispatch, QueueCreate};
    use guest_proto::reply::{Reply, ReplyPayload};
    use guest_proto::writer::RequestWriter;
    use guest_proto::{GpuVa, Kernel, Request, SignalIndex};
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL | F_CONTEXT_INIT | F_BLOB);
    let session = native_session(&mut vmm, 1, 10);
    let mut w = RequestWriter::new(0..4096).with_first_seqno(2);
    let t = w
        .push(&Request::QueueCreate(QueueCreate { priority: 1 }))
        .unwrap();
    assert_eq!(vmm.submit(1, w.as_bytes()), VIRTIO_GPU_RESP_OK_NODATA);
    let reply = Reply::decode(&vmm.ram.read(session + u64::from(t.reply_off.unwrap()), 64));
    let ReplyPayload::QueueCreate(q) = reply.unwrap().payload else {
        panic!("QUEUE_CREATE");
    };
    let mut arm = RequestWriter::new(0..4096);
    arm.push_no_reply(&Request::EventArm).unwrap();
    let arm = arm.into_bytes();
    // Armed with fence 100 on the event ring: held while nothing is pending.
    let first = vmm.post_submit(1, &arm, Some((100, Some(1))));
    assert!(vmm.wait_used(0, Duration::from_millis(300)).is_none());
    // Armed again with the same fence: the first arm comes back, the second
    // is held.
    let second = vmm.post_submit(1, &arm, Some((100, Some(1))));
    assert_eq!(
        vmm.wait_used(0, Duration::from_secs(10)).map(|u| u.0),
        Some(first)
    );
    assert!(vmm.wait_used(0, Duration::from_millis(300)).is_none());
    // A dispatch that faults makes an event pending: the second arm comes
    // back, once.
    let dispatch = Dispatch {
        queue: q.queue,
        kernel: Kernel::Fill {
            dst: GpuVa(0x7000_0000),
            count: 16,
            value: 1,
        },
        signal: Some(SignalIndex(3)),
        notify: true,
        completion_value: 9,
    };
    let mut w = RequestWriter::new(0..4096).with_first_seqno(3);
    w.push(&Request::Dispatch(dispatch)).unwrap();
    let third = vmm.post_submit(1, w.as_bytes(), None);
    let mut seen = Vec::new();
    while let Some((head, _)) = vmm.wait_used(0, Duration::from_secs(5)) {
        seen.push(head);
        if seen.len() == 2 {
            break;
        }
    }
    seen.sort_unstable();
    let mut want = vec![second, third];
    want.sort_unstable();
    assert_eq!(seen, want);
    assert!(
        vmm.wait_used(0, Duration::from_millis(300)).is_none(),
        "once"
    );
}

#[test]
fn queues_up_to_the_split_ring_maximum_are_accepted() {
    // crosvm offers the guest 32768-entry queues unless told otherwise.
    let d = Daemon::start(&[]);
    let vmm = Vmm::connect(&d.socket, F_VIRGL);
    vmm.frontend.set_vring_num(0, 32768).unwrap();
    drop(vmm);
    // One connection at a time: the next one is served once this is gone.
    let vmm = Vmm::connect(&d.socket, F_VIRGL);
    assert!(vmm.frontend.set_vring_num(0, 32769).is_err());
}
