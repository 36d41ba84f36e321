//! The Linux virtio-gpu DRM UAPI (`include/uapi/drm/virtgpu_drm.h`).
//!
//! Only what the runtime needs: parameters, capsets, context init,
//! resources (3D buffers and guest blobs), mapping, submission and waiting.
//! Struct layouts are checked against the kernel's sizes at compile time.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `DRM_COMMAND_BASE`.
const COMMAND_BASE: u64 = 0x40;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | ((b'd' as u64) << 8) | nr
}

const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | ((b'd' as u64) << 8) | nr
}

/// `VIRTGPU_PARAM_*`.
pub mod param {
    /// 3D features (VIRGL).
    pub const FEATURES_3D: u64 = 1;
    /// Blob resources.
    pub const RESOURCE_BLOB: u64 = 3;
    /// `DRM_VIRTGPU_CONTEXT_INIT`.
    pub const CONTEXT_INIT: u64 = 6;
    /// Bitmask of capset ids.
    pub const SUPPORTED_CAPSET_IDS: u64 = 7;
}

#[repr(C)]
#[derive(Default)]
struct GetParam {
    param: u64,
    value: u64,
}

#[repr(C)]
#[derive(Default)]
struct GetCaps {
    cap_set_id: u32,
    cap_set_ver: u32,
    addr: u64,
    size: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct ResourceCreate {
    target: u32,
    format: u32,
    bind: u32,
    width: u32,
    height: u32,
    depth: u32,
    array_size: u32,
    last_level: u32,
    nr_samples: u32,
    flags: u32,
    bo_handle: u32,
    res_handle: u32,
    size: u32,
    stride: u32,
}

#[repr(C)]
#[derive(Default)]
struct ResourceCreateBlob {
    blob_mem: u32,
    blob_flags: u32,
    bo_handle: u32,
    res_handle: u32,
    size: u64,
    pad: u32,
    cmd_size: u32,
    cmd: u64,
    blob_id: u64,
}

#[repr(C)]
#[derive(Default)]
struct Map {
    offset: u64,
    handle: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct ExecBuffer {
    flags: u32,
    size: u32,
    command: u64,
    bo_handles: u64,
    num_bo_handles: u32,
    fence_fd: i32,
    ring_idx: u32,
    syncobj_stride: u32,
    num_in_syncobjs: u32,
    num_out_syncobjs: u32,
    in_syncobjs: u64,
    out_syncobjs: u64,
}

#[repr(C)]
#[derive(Default)]
struct ContextSetParam {
    param: u64,
    value: u64,
}

#[repr(C)]
#[derive(Default)]
struct ContextInit {
    num_params: u32,
    pad: u32,
    ctx_set_params: u64,
}

#[repr(C)]
#[derive(Default)]
struct GemClose {
    handle: u32,
    pad: u32,
}

const _: () = {
    assert!(size_of::<GetParam>() == 16);
    assert!(size_of::<GetCaps>() == 24);
    assert!(size_of::<ResourceCreate>() == 56);
    assert!(size_of::<ResourceCreateBlob>() == 48);
    assert!(size_of::<Map>() == 16);
    assert!(size_of::<ExecBuffer>() == 64);
    assert!(size_of::<ContextInit>() == 16);
};

const IOCTL_MAP: u64 = iowr(COMMAND_BASE + 0x01, size_of::<Map>());
const IOCTL_EXECBUFFER: u64 = iowr(COMMAND_BASE + 0x02, size_of::<ExecBuffer>());
const IOCTL_GETPARAM: u64 = iowr(COMMAND_BASE + 0x03, size_of::<GetParam>());
const IOCTL_RESOURCE_CREATE: u64 = iowr(COMMAND_BASE + 0x04, size_of::<ResourceCreate>());
const IOCTL_GET_CAPS: u64 = iowr(COMMAND_BASE + 0x09, size_of::<GetCaps>());
const IOCTL_RESOURCE_CREATE_BLOB: u64 = iowr(COMMAND_BASE + 0x0a, size_of::<ResourceCreateBlob>());
const IOCTL_CONTEXT_INIT: u64 = iowr(COMMAND_BASE + 0x0b, size_of::<ContextInit>());
const IOCTL_GEM_CLOSE: u64 = iow(0x09, size_of::<GemClose>());

/// `VIRTGPU_EXECBUF_FENCE_FD_OUT`.
const EXECBUF_FENCE_FD_OUT: u32 = 0x02;
/// `VIRTGPU_EXECBUF_RING_IDX`.
const EXECBUF_RING_IDX: u32 = 0x04;
/// `VIRTGPU_CONTEXT_PARAM_*`.
const CTX_PARAM_CAPSET_ID: u64 = 1;
const CTX_PARAM_NUM_RINGS: u64 = 2;
const CTX_PARAM_POLL_RINGS_MASK: u64 = 3;
/// `VIRTGPU_BLOB_MEM_GUEST`, `VIRTGPU_BLOB_FLAG_USE_MAPPABLE`.
const BLOB_MEM_GUEST: u32 = 1;
const BLOB_FLAG_USE_MAPPABLE: u32 = 1;

/// Waits up to `timeout_ms` (-1: forever) for `fd` to become readable.
pub fn poll_readable(fd: i32, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A shared buffer object: its GEM handle and virtio-gpu resource id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bo {
    /// GEM handle in this file.
    pub handle: u32,
    /// virtio-gpu resource id.
    pub res_id: u32,
}

/// An open virtio-gpu render node.
#[derive(Debug)]
pub struct Drm {
    file: File,
}

fn ioctl<T>(file: &File, request: u64, arg: &mut T) -> io::Result<()> {
    loop {
        // SAFETY: `arg` is a live, properly sized `#[repr(C)]` struct that
        // matches `request`'s encoded size; the kernel reads/writes only it
        // (and user pointers inside it that the caller keeps alive).
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, arg as *mut T) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

impl Drm {
    /// Opens a render node.
    pub fn open(path: &Path) -> io::Result<Drm> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Drm { file })
    }

    /// The raw fd (for `mmap` and `poll`).
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// `VIRTGPU_PARAM_*`, `None` if the kernel does not know it.
    pub fn param(&self, p: u64) -> Option<u64> {
        let mut value: i64 = 0;
        let mut gp = GetParam {
            param: p,
            value: &mut value as *mut i64 as u64,
        };
        ioctl(&self.file, IOCTL_GETPARAM, &mut gp).ok()?;
        Some(value as u64)
    }

    /// Reads capset `id` (version `version`) into a buffer of `size` bytes.
    pub fn capset(&self, id: u32, version: u32, size: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; size];
        let mut gc = GetCaps {
            cap_set_id: id,
            cap_set_ver: version,
            addr: buf.as_mut_ptr() as u64,
            size: size as u32,
            pad: 0,
        };
        ioctl(&self.file, IOCTL_GET_CAPS, &mut gc)?;
        Ok(buf)
    }

    /// `CONTEXT_INIT` for `capset` with `rings` rings, polling `poll_mask`.
    pub fn context_init(&self, capset: u32, rings: u32, poll_mask: u64) -> io::Result<()> {
        let mut params = [
            ContextSetParam {
                param: CTX_PARAM_CAPSET_ID,
                value: u64::from(capset),
            },
            ContextSetParam {
                param: CTX_PARAM_NUM_RINGS,
                value: u64::from(rings),
            },
            ContextSetParam {
                param: CTX_PARAM_POLL_RINGS_MASK,
                value: poll_mask,
            },
        ];
        let mut ci = ContextInit {
            num_params: params.len() as u32,
            pad: 0,
            ctx_set_params: params.as_mut_ptr() as u64,
        };
        ioctl(&self.file, IOCTL_CONTEXT_INIT, &mut ci)
    }

    /// A 3D buffer resource of `size` bytes (compat profile, section 3.1).
    pub fn create_buffer(&self, size: u32) -> io::Result<Bo> {
        let mut rc = ResourceCreate {
            target: 0,
            format: 64,
            bind: 1 << 0,
            width: size,
            height: 1,
            depth: 1,
            array_size: 1,
            size,
            ..ResourceCreate::default()
        };
        ioctl(&self.file, IOCTL_RESOURCE_CREATE, &mut rc)?;
        Ok(Bo {
            handle: rc.bo_handle,
            res_id: rc.res_handle,
        })
    }

    /// A guest-memory blob of `size` bytes (native profile, section 3.2).
    pub fn create_blob(&self, size: u64) -> io::Result<Bo> {
        let mut rc = ResourceCreateBlob {
            blob_mem: BLOB_MEM_GUEST,
            blob_flags: BLOB_FLAG_USE_MAPPABLE,
            size,
            ..ResourceCreateBlob::default()
        };
        ioctl(&self.file, IOCTL_RESOURCE_CREATE_BLOB, &mut rc)?;
        Ok(Bo {
            handle: rc.bo_handle,
            res_id: rc.res_handle,
        })
    }

    /// The `mmap` offset of a buffer.
    pub fn map_offset(&self, bo: Bo) -> io::Result<u64> {
        let mut m = Map {
            handle: bo.handle,
            ..Map::default()
        };
        ioctl(&self.file, IOCTL_MAP, &mut m)?;
        Ok(m.offset)
    }

    /// Closes a GEM handle.
    pub fn close(&self, bo: Bo) {
        let mut c = GemClose {
            handle: bo.handle,
            pad: 0,
        };
        let _ = ioctl(&self.file, IOCTL_GEM_CLOSE, &mut c);
    }

    /// `EXECBUFFER` of `commands`, on `ring` (native) or the default
    /// timeline (compat).
    pub fn execbuffer(&self, commands: &[u8], ring: Option<u32>) -> io::Result<()> {
        self.submit(commands, ring, 0).map(|_| ())
    }

    /// `EXECBUFFER` like [`Drm::execbuffer`], returning the submission's
    /// out-fence as a sync_file (readable once the fence signals).
    pub fn execbuffer_fenced(
        &self,
        commands: &[u8],
        ring: Option<u32>,
    ) -> io::Result<std::os::fd::OwnedFd> {
        let fd = self.submit(commands, ring, EXECBUF_FENCE_FD_OUT)?;
        if fd < 0 {
            return Err(io::Error::other("EXECBUFFER returned no fence fd"));
        }
        // SAFETY: with FENCE_FD_OUT the kernel installed a new fd for the
        // sync_file and gave it to us; nothing else owns it.
        Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }

    fn submit(&self, commands: &[u8], ring: Option<u32>, flags: u32) -> io::Result<i32> {
        let ring_flag = if ring.is_some() { EXECBUF_RING_IDX } else { 0 };
        let mut eb = ExecBuffer {
            flags: ring_flag | flags,
            size: u32::try_from(commands.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
            command: commands.as_ptr() as u64,
            fence_fd: -1,
            ring_idx: ring.unwrap_or(0),
            ..ExecBuffer::default()
        };
        ioctl(&self.file, IOCTL_EXECBUFFER, &mut eb)?;
        Ok(eb.fence_fd)
    }

    /// Waits up to `timeout_ms` for the file to become readable (a fence
    /// of a polled ring signalled), then drains the pending DRM events.
    pub fn wait_event(&self, timeout_ms: i32) -> io::Result<bool> {
        if !poll_readable(self.fd(), timeout_ms)? {
            return Ok(false);
        }
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is writable for its length.
        let _ = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        // Values from the kernel headers (x86-64).
        assert_eq!(IOCTL_GETPARAM, 0xC010_6443);
        assert_eq!(IOCTL_EXECBUFFER, 0xC040_6442);
        assert_eq!(IOCTL_RESOURCE_CREATE, 0xC038_6444);
        assert_eq!(IOCTL_GET_CAPS, 0xC018_6449);
        assert_eq!(IOCTL_MAP, 0xC010_6441);
        assert_eq!(IOCTL_CONTEXT_INIT, 0xC010_644B);
        assert_eq!(IOCTL_RESOURCE_CREATE_BLOB, 0xC030_644A);
        assert_eq!(IOCTL_GEM_CLOSE, 0x4008_6409);
    }
}
