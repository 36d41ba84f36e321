//! The virtio-gpu control and cursor command decoder and executor over an
//! in-memory guest: sequences of commands with ids drawn from small sets
//! (so creates, attaches, scanouts and submits meet each other), memory
//! entries inside and outside guest RAM, and raw bytes. Every command must
//! get a well-formed virtio-gpu response, nothing panics, and the device
//! still answers and tears down cleanly afterwards.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vhost_gpu_nc::compute::ComputeConfig;
use vhost_gpu_nc::compute::testing::TestGuest;
use vhost_gpu_nc::virtio_gpu::device::{GpuDevice, GpuLimits};
use vhost_gpu_nc::virtio_gpu::protocol::*;
use vhost_gpu_nc_fuzz::sim_device;

const RAM: u64 = 16 << 20;

#[derive(Arbitrary, Debug)]
struct Rect {
    x: u8,
    y: u8,
    w: u16,
    h: u16,
}

#[derive(Arbitrary, Debug)]
struct Entry {
    /// Page in guest RAM (some beyond it).
    page: u16,
    /// Offset in the page, 0 most of the time.
    lead: u8,
    pages: u8,
}

#[derive(Arbitrary, Debug)]
enum Cmd {
    Raw {
        ty: u16,
        body: Vec<u8>,
    },
    DisplayInfo,
    Edid {
        scanout: u8,
    },
    CapsetInfo {
        index: u8,
    },
    Capset {
        id: u8,
        version: u8,
    },
    Create2d {
        id: u8,
        format: u8,
        w: u16,
        h: u16,
    },
    Create3d {
        id: u8,
        target: u8,
        width: u32,
    },
    CreateBlob {
        id: u8,
        mem: u8,
        size: u32,
        entries: Vec<Entry>,
    },
    Attach {
        id: u8,
        entries: Vec<Entry>,
    },
    Detach {
        id: u8,
    },
    Unref {
        id: u8,
    },
    SetScanout {
        scanout: u8,
        id: u8,
        rect: Rect,
    },
    SetScanoutBlob {
        id: u8,
        rect: Rect,
        format: u8,
        stride: u32,
        offset: u32,
    },
    Flush {
        id: u8,
        rect: Rect,
    },
    Transfer2d {
        id: u8,
        rect: Rect,
        offset: u32,
    },
    Transfer3d {
        id: u8,
        from_host: bool,
    },
    CtxCreate {
        ctx: u8,
        init: u8,
    },
    CtxDestroy {
        ctx: u8,
    },
    CtxAttach {
        ctx: u8,
        id: u8,
    },
    CtxDetach {
        ctx: u8,
        id: u8,
    },
    Submit {
        ctx: u8,
        payload: Vec<u8>,
        fence: bool,
        ring: Option<u8>,
    },
    Cursor {
        update: bool,
        id: u8,
        x: u16,
        y: u16,
    },
}

fn hdr(out: &mut Vec<u8>, ty: u32, flags: u32, ctx: u32, ring: u8) {
    for v in [ty, flags] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&7u64.to_le_bytes());
    out.extend_from_slice(&ctx.to_le_bytes());
    out.extend_from_slice(&[ring, 0, 0, 0]);
}

fn put(out: &mut Vec<u8>, words: &[u32]) {
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

fn rect(out: &mut Vec<u8>, r: &Rect) {
    put(
        out,
        &[
            u32::from(r.x),
            u32::from(r.y),
            u32::from(r.w),
            u32::from(r.h),
        ],
    );
}

fn entries(out: &mut Vec<u8>, list: &[Entry]) {
    for e in list {
        let addr = u64::from(e.page) * 4096 + u64::from(e.lead % 4 * 16);
        out.extend_from_slice(&addr.to_le_bytes());
        put(out, &[u32::from(e.pages.max(1)) * 4096, 0]);
    }
}

fn count(list: &[Entry]) -> u32 {
    u32::try_from(list.len()).unwrap_or(u32::MAX)
}

fn encode(cmd: &Cmd) -> (Vec<u8>, bool) {
    let mut r = Vec::new();
    let id = |i: &u8| u32::from(*i % 8);
    let ctx = |c: &u8| u32::from(*c % 4);
    match cmd {
        Cmd::Raw { ty, body } => {
            put(&mut r, &[u32::from(*ty) | 0x100]);
            r.extend_from_slice(body);
        }
        Cmd::DisplayInfo => hdr(&mut r, VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, 0, 0),
        Cmd::Edid { scanout } => {
            hdr(&mut r, VIRTIO_GPU_CMD_GET_EDID, 0, 0, 0);
            put(&mut r, &[u32::from(*scanout % 3), 0]);
        }
        Cmd::CapsetInfo { index } => {
            hdr(&mut r, VIRTIO_GPU_CMD_GET_CAPSET_INFO, 0, 0, 0);
            put(&mut r, &[u32::from(*index % 3), 0]);
        }
        Cmd::Capset { id, version } => {
            hdr(&mut r, VIRTIO_GPU_CMD_GET_CAPSET, 0, 0, 0);
            put(&mut r, &[u32::from(*id % 32), u32::from(*version % 3)]);
        }
        Cmd::Create2d {
            id: i,
            format,
            w,
            h,
        } => {
            hdr(&mut r, VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, 0, 0);
            put(
                &mut r,
                &[
                    id(i),
                    u32::from(*format % 140),
                    u32::from(*w),
                    u32::from(*h),
                ],
            );
        }
        Cmd::Create3d {
            id: i,
            target,
            width,
        } => {
            hdr(&mut r, VIRTIO_GPU_CMD_RESOURCE_CREATE_3D, 0, 0, 0);
            put(
                &mut r,
                &[
                    id(i),
                    u32::from(*target % 3),
                    64,
                    1,
                    *width % (1 << 22),
                    1,
                    1,
                    1,
                    0,
                    0,
                    0,
                    0,
                ],
            );
        }
        Cmd::CreateBlob {
            id: i,
            mem,
            size,
            entries: list,
        } => {
            hdr(&mut r, VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB, 0, 0, 0);
            put(&mut r, &[id(i), u32::from(*mem % 4), 1, count(list)]);
            r.extend_from_slice(&0u64.to_le_bytes());
            r.extend_from_slice(&u64::from(*size).to_le_bytes());
            entries(&mut r, list);
        }
        Cmd::Attach {
            id: i,
            entries: list,
        } => {
            hdr(&mut r, VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, 0, 0, 0);
            put(&mut r, &[id(i), count(list)]);
            entries(&mut r, list);
        }
        Cmd::Detach { id: i } => {
            hdr(&mut r, VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING, 0, 0, 0);
            put(&mut r, &[id(i), 0]);
        }
        Cmd::Unref { id: i } => {
            hdr(&mut r, VIRTIO_GPU_CMD_RESOURCE_UNREF, 0, 0, 0);
            put(&mut r, &[id(i), 0]);
        }
        Cmd::SetScanout {
            scanout,
            id: i,
            rect: rc,
        } => {
            hdr(&mut r, VIRTIO_GPU_CMD_SET_SCANOUT, 0, 0, 0);
            rect(&mut r, rc);
            put(&mut r, &[u32::from(*scanout % 2), id(i)]);
        }
        Cmd::SetScanoutBlob {
            id: i,
            rect: rc,
            format,
            stride,
            offset,
        } => {
            hdr(&mut r, VIRTIO_GPU_CMD_SET_SCANOUT_BLOB, 0, 0, 0);
            rect(&mut r, rc);
            put(
                &mut r,
                &[
                    0,
                    id(i),
                    u32::from(rc.w),
                    u32::from(rc.h),
                    u32::from(*format % 140),
                    0,
                ],
            );
            put(&mut r, &[*stride, 0, 0, 0, *offset, 0, 0, 0]);
        }
        Cmd::Flush { id: i, rect: rc } => {
            hdr(&mut r, VIRTIO_GPU_CMD_RESOURCE_FLUSH, 0, 0, 0);
            rect(&mut r, rc);
            put(&mut r, &[id(i), 0]);
        }
        Cmd::Transfer2d {
            id: i,
            rect: rc,
            offset,
        } => {
            hdr(&mut r, VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D, 0, 0, 0);
            rect(&mut r, rc);
            r.extend_from_slice(&u64::from(*offset).to_le_bytes());
            put(&mut r, &[id(i), 0]);
        }
        Cmd::Transfer3d { id: i, from_host } => {
            let ty = if *from_host {
                VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D
            } else {
                VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D
            };
            hdr(&mut r, ty, 0, 1, 0);
            r.extend_from_slice(&[0u8; 32]);
            put(&mut r, &[id(i), 0, 0, 0]);
        }
        Cmd::CtxCreate { ctx: c, init } => {
            hdr(&mut r, VIRTIO_GPU_CMD_CTX_CREATE, 0, ctx(c), 0);
            put(&mut r, &[4, u32::from(*init % 4) * 8]);
            r.extend_from_slice(&[b'f'; 64]);
        }
        Cmd::CtxDestroy { ctx: c } => hdr(&mut r, VIRTIO_GPU_CMD_CTX_DESTROY, 0, ctx(c), 0),
        Cmd::CtxAttach { ctx: c, id: i } => {
            hdr(&mut r, VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE, 0, ctx(c), 0);
            put(&mut r, &[id(i), 0]);
        }
        Cmd::CtxDetach { ctx: c, id: i } => {
            hdr(&mut r, VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE, 0, ctx(c), 0);
            put(&mut r, &[id(i), 0]);
        }
        Cmd::Submit {
            ctx: c,
            payload,
            fence,
            ring,
        } => {
            let mut flags = if *fence { VIRTIO_GPU_FLAG_FENCE } else { 0 };
            if ring.is_some() {
                flags |= VIRTIO_GPU_FLAG_INFO_RING_IDX;
            }
            hdr(
                &mut r,
                VIRTIO_GPU_CMD_SUBMIT_3D,
                flags,
                ctx(c),
                ring.map_or(0, |x| x % 3),
            );
            put(
                &mut r,
                &[u32::try_from(payload.len()).unwrap_or(u32::MAX), 0],
            );
            r.extend_from_slice(payload);
        }
        Cmd::Cursor {
            update,
            id: i,
            x,
            y,
        } => {
            let ty = if *update {
                VIRTIO_GPU_CMD_UPDATE_CURSOR
            } else {
                VIRTIO_GPU_CMD_MOVE_CURSOR
            };
            hdr(&mut r, ty, 0, 0, 0);
            put(
                &mut r,
                &[0, u32::from(*x), u32::from(*y), 0, id(i), 1, 1, 0],
            );
            return (r, true);
        }
    }
    (r, false)
}

fn response_type(bytes: &[u8]) -> u32 {
    bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fuzz_target!(|cmds: Vec<Cmd>| {
    let g = TestGuest::new(sim_device(), ComputeConfig::default(), RAM);
    let Ok(backend) = std::rc::Rc::try_unwrap(g.backend) else {
        return;
    };
    let limits = GpuLimits {
        max_resources: 16,
        max_image_bytes: 4 << 20,
        ..GpuLimits::default()
    };
    let mut dev = GpuDevice::new(Box::new(backend.into_inner()), limits);
    dev.set_memory(g.mem.clone());
    dev.set_features(
        1 << VIRTIO_GPU_F_VIRGL
            | 1 << VIRTIO_GPU_F_EDID
            | 1 << VIRTIO_GPU_F_RESOURCE_BLOB
            | 1 << VIRTIO_GPU_F_CONTEXT_INIT,
    );
    for cmd in cmds.iter().take(64) {
        let (bytes, cursor) = encode(cmd);
        let ty = if cursor {
            response_type(&dev.process_cursor(&bytes))
        } else {
            response_type(&dev.process(&bytes).bytes)
        };
        assert!(
            (VIRTIO_GPU_RESP_OK_NODATA..=VIRTIO_GPU_RESP_OK_EDID).contains(&ty)
                || (VIRTIO_GPU_RESP_ERR_UNSPEC..=VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER)
                    .contains(&ty),
            "{cmd:?} got response type {ty:#x}"
        );
        dev.tick();
    }
    let mut info = Vec::new();
    hdr(&mut info, VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, 0, 0);
    assert_eq!(
        response_type(&dev.process(&info).bytes),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
    dev.teardown();
});
