//! The guest kernel's fault resolver: the `DRM_IOCTL_VIRTGPU_SVM` uAPI of
//! the patched virtio-gpu driver (guest/kernel/virtio-gpu/patches,
//! docs/guest-kernel.md).
//!
//! With it the driver mirrors registered ranges of the process into the
//! context's GPU VM without pinning: it takes the session's faults over
//! (`ENABLE`, protocol 1.1 `SVM_ATTACH`), resolves them with
//! `hmm_range_fault()`, and unbinds whatever the process's mm invalidates
//! (munmap, `MADV_DONTNEED`, migration, reclaim, fork's copy-on-write,
//! exit) before the invalidation completes. The runtime uses it whenever
//! the driver offers it ([`available`]) and `ENABLE` succeeds; otherwise it
//! keeps the user-space resolver of [`crate::session`] (stock kernels).

use std::io;
use std::sync::Arc;

use guest_proto::{PAGE_SIZE, Perms};

use crate::drm::{COMMAND_BASE, Drm, iowr};

/// `VIRTGPU_PARAM_SVM`: the uAPI's version (1), absent on stock drivers.
pub const PARAM_SVM: u64 = 9;
/// `DRM_VIRTGPU_SVM`.
pub const DRM_VIRTGPU_SVM: u64 = 0x0c;

/// `VIRTGPU_SVM_OP_*`.
pub mod op {
    /// Mirror a range.
    pub const REGISTER: u32 = 1;
    /// Stop mirroring a range (unbound before the call returns).
    pub const UNREGISTER: u32 = 2;
    /// The kernel takes over the context's faults.
    pub const ENABLE: u32 = 3;
    /// The kernel gives them back.
    pub const DISABLE: u32 = 4;
    /// Bind part of a range now.
    pub const PREFETCH: u32 = 5;
}

/// `VIRTGPU_SVM_ACCESS_*`.
pub mod access {
    /// The GPU may read.
    pub const READ: u32 = 0x1;
    /// The GPU may write.
    pub const WRITE: u32 = 0x2;
    /// The GPU may execute.
    pub const EXEC: u32 = 0x4;
}

/// `struct drm_virtgpu_svm`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvmArgs {
    /// `VIRTGPU_SVM_OP_*`.
    pub op: u32,
    /// Must be zero.
    pub flags: u32,
    /// CPU address, page aligned.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `REGISTER`: GPU address of `addr`.
    pub gpu_addr: u64,
    /// `REGISTER`: `VIRTGPU_SVM_ACCESS_*`.
    pub access: u32,
    /// `REGISTER`: log2 of the fault granule (12..30), 0 for the device's.
    pub granule_shift: u32,
    /// `ENABLE`: fault ring records, 0 for the driver's default (1024).
    pub ring_size: u32,
    /// Zero.
    pub pad: u32,
}

const _: () = assert!(size_of::<SvmArgs>() == 48);

/// `DRM_IOCTL_VIRTGPU_SVM`.
pub const IOCTL_SVM: u64 = iowr(COMMAND_BASE + DRM_VIRTGPU_SVM, size_of::<SvmArgs>());

/// Whether the render node's driver has the SVM uAPI.
pub fn available(drm: &Drm) -> bool {
    drm.param(PARAM_SVM).is_some_and(|v| v >= 1)
}

/// The `access` bits for GPU permissions.
pub fn access_of(perms: Perms) -> u32 {
    let mut a = 0;
    if perms.contains(Perms::READ) {
        a |= access::READ;
    }
    if perms.contains(Perms::WRITE) {
        a |= access::WRITE;
    }
    if perms.contains(Perms::EXEC) {
        a |= access::EXEC;
    }
    a
}

/// The SVM ioctls of one render-node file.
#[derive(Debug, Clone)]
pub struct KernelSvm {
    drm: Arc<Drm>,
}

impl KernelSvm {
    /// The SVM uAPI of `drm` (nothing is sent yet).
    pub fn new(drm: Arc<Drm>) -> KernelSvm {
        KernelSvm { drm }
    }

    fn call(&self, mut args: SvmArgs) -> io::Result<()> {
        self.drm.ioctl(IOCTL_SVM, &mut args)
    }

    /// `ENABLE`: the kernel takes the session's faults over. `ENOTTY`
    /// (stock driver) and `EOPNOTSUPP` (a device without `KERNEL_SVM`)
    /// mean "use the user-space resolver".
    pub fn enable(&self, ring_records: u32) -> io::Result<()> {
        self.call(SvmArgs {
            op: op::ENABLE,
            ring_size: ring_records,
            ..SvmArgs::default()
        })
    }

    /// `DISABLE`.
    pub fn disable(&self) -> io::Result<()> {
        self.call(SvmArgs {
            op: op::DISABLE,
            ..SvmArgs::default()
        })
    }

    /// `REGISTER` `[cpu, cpu + len)` at `gpu` with `perms`; `granule_shift`
    /// 0 leaves the device's granule.
    pub fn register(
        &self,
        cpu: u64,
        len: u64,
        gpu: u64,
        perms: Perms,
        granule_shift: u8,
    ) -> io::Result<()> {
        self.call(SvmArgs {
            op: op::REGISTER,
            addr: cpu,
            size: len,
            gpu_addr: gpu,
            access: access_of(perms),
            granule_shift: u32::from(granule_shift),
            ..SvmArgs::default()
        })
    }

    /// `UNREGISTER` the range registered exactly at `[cpu, cpu + len)`.
    pub fn unregister(&self, cpu: u64, len: u64) -> io::Result<()> {
        self.call(SvmArgs {
            op: op::UNREGISTER,
            addr: cpu,
            size: len,
            ..SvmArgs::default()
        })
    }

    /// `PREFETCH`: bind `[cpu, cpu + len)` (inside one range) now.
    pub fn prefetch(&self, cpu: u64, len: u64) -> io::Result<()> {
        self.call(SvmArgs {
            op: op::PREFETCH,
            addr: cpu,
            size: len,
            ..SvmArgs::default()
        })
    }

    /// The driver's counters for this file (`/proc/self/fdinfo`).
    pub fn stats(&self) -> io::Result<SvmStats> {
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", self.drm.fd()))?;
        Ok(SvmStats::parse(&text))
    }
}

/// The driver's `virtio-gpu-svm-*` fdinfo counters (0 when absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvmStats {
    /// SVM is enabled on the file.
    pub enabled: u64,
    /// Registered ranges.
    pub ranges: u64,
    /// Invalidations the notifiers saw.
    pub invalidations: u64,
    /// Unbinds sent for invalidations.
    pub unbinds: u64,
    /// Time from an invalidation to the device's answer to its unbind,
    /// summed, in ns.
    pub unbind_ns: u64,
    /// Binds sent.
    pub binds: u64,
    /// Pages bound.
    pub bound_pages: u64,
    /// Binds retried after a racing invalidation.
    pub retries: u64,
    /// Fault records handled.
    pub faults: u64,
    /// Faults answered resolved.
    pub faults_resolved: u64,
    /// Faults answered rejected.
    pub faults_rejected: u64,
    /// Time from reading a record to the device's answer to the
    /// `FAULT_REPLY`, summed, in ns.
    pub fault_ns: u64,
}

impl SvmStats {
    /// Reads the counters from an fdinfo text.
    pub fn parse(text: &str) -> SvmStats {
        let mut s = SvmStats::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("virtio-gpu-svm-") else {
                continue;
            };
            let Some((key, value)) = rest.split_once(':') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<u64>() else {
                continue;
            };
            let field = match key {
                "enabled" => &mut s.enabled,
                "ranges" => &mut s.ranges,
                "invalidations" => &mut s.invalidations,
                "unbinds" => &mut s.unbinds,
                "unbind-ns" => &mut s.unbind_ns,
                "binds" => &mut s.binds,
                "bound-pages" => &mut s.bound_pages,
                "retries" => &mut s.retries,
                "faults" => &mut s.faults,
                "faults-resolved" => &mut s.faults_resolved,
                "faults-rejected" => &mut s.faults_rejected,
                "fault-ns" => &mut s.fault_ns,
                _ => continue,
            };
            *field = v;
        }
        s
    }
}

/// Most bytes one file may register (the driver's limit: 16 TiB).
pub const MAX_REGISTERED_BYTES: u64 = 1 << 44;
/// The top of x86-64 user space.
const USER_TOP: u64 = 1 << 47;
/// Room left below the mmap area and above the heap for later mappings.
const MMAP_GROWTH: u64 = 1 << 40;
const HEAP_GROWTH: u64 = 64 << 30;

/// The ranges that mirror "the whole process" (the XNACK-on policy) with
/// the driver's registration limits: the address space of the mmap area
/// (from 1 TiB below its lowest mapping to the top of user space: where
/// `mmap` places new mappings, the stack, the vDSO) and that of the
/// program and its heap (from its first mapping to 64 GiB past the last).
/// Registered address space need not be mapped: a fault in a hole is
/// rejected, and a mapping made there later is mirrored.
/// `maps` is `/proc/self/maps`; the result is page-aligned, sorted,
/// disjoint, at or above `floor` and below 2^47, and at most 16 TiB.
pub fn process_ranges(maps: &[crate::procmaps::MapEntry], floor: u64) -> Vec<(u64, u64)> {
    let user: Vec<&crate::procmaps::MapEntry> = maps
        .iter()
        .filter(|m| m.end <= USER_TOP && m.start >= floor)
        .collect();
    let Some(last) = user.iter().map(|m| m.end).max() else {
        return Vec::new();
    };
    let top = last.next_multiple_of(PAGE_SIZE).min(USER_TOP);
    // The mmap area: mappings in the top half of user space.
    let half = USER_TOP / 2;
    let mmap_low = user
        .iter()
        .filter(|m| m.start >= half)
        .map(|m| m.start)
        .min();
    let mut out = Vec::new();
    let mut low_end = top;
    if let Some(low) = mmap_low {
        let start = (low - low % PAGE_SIZE)
            .saturating_sub(MMAP_GROWTH)
            .max(half.min(low))
            .max(floor);
        out.push((start, top));
        low_end = start;
    }
    let program: Vec<&&crate::procmaps::MapEntry> =
        user.iter().filter(|m| m.end <= low_end).collect();
    if let (Some(first), Some(end)) = (
        program.iter().map(|m| m.start).min(),
        program.iter().map(|m| m.end).max(),
    ) {
        let start = (first - first % PAGE_SIZE).max(floor);
        let end = end
            .saturating_add(HEAP_GROWTH)
            .next_multiple_of(PAGE_SIZE)
            .min(low_end);
        if start < end {
            out.insert(0, (start, end));
        }
    }
    // Within the driver's limit: shrink the mmap area's headroom first.
    let total: u64 = out.iter().map(|(s, e)| e - s).sum();
    if total > MAX_REGISTERED_BYTES {
        let excess = total - MAX_REGISTERED_BYTES;
        if let Some(last) = out.last_mut() {
            last.0 = (last.0 + excess).min(last.1);
        }
        out.retain(|(s, e)| s < e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The patch series' uAPI additions: `#define`s and the fields of
    /// `struct drm_virtgpu_svm`, read from the `+` lines of the hunks for
    /// `include/uapi/drm/virtgpu_drm.h`.
    fn uapi_from_patches() -> (HashMap<String, u64>, Vec<(String, String)>) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernel/virtio-gpu/patches");
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .expect("the patch series")
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "patch"))
            .collect();
        names.sort();
        let (mut defines, mut fields) = (HashMap::new(), Vec::new());
        for path in names {
            let text = std::fs::read_to_string(&path).unwrap();
            let mut in_uapi = false;
            let mut in_struct = false;
            for line in text.lines() {
                if let Some(file) = line.strip_prefix("+++ b/") {
                    in_uapi = file == "include/uapi/drm/virtgpu_drm.h";
                    continue;
                }
                let Some(added) = line.strip_prefix('+').filter(|_| in_uapi) else {
                    continue;
                };
                let words: Vec<&str> = added.split_whitespace().collect();
                if words.len() >= 3 && words[0] == "#define" {
                    let v = words[2];
                    let parsed = match v.strip_prefix("0x") {
                        Some(hex) => u64::from_str_radix(hex, 16).ok(),
                        None => v.parse().ok(),
                    };
                    if let Some(n) = parsed {
                        defines.insert(words[1].to_string(), n);
                    }
                }
                if added.starts_with("struct drm_virtgpu_svm {") {
                    in_struct = true;
                } else if in_struct && added.starts_with("};") {
                    in_struct = false;
                } else if in_struct && words.len() >= 2 {
                    let name = words[1].trim_end_matches(';').to_string();
                    fields.push((words[0].to_string(), name));
                }
            }
        }
        (defines, fields)
    }

    #[test]
    fn the_bindings_match_the_patch_series_uapi_header() {
        let (d, fields) = uapi_from_patches();
        assert_eq!(d["DRM_VIRTGPU_SVM"], DRM_VIRTGPU_SVM);
        assert_eq!(d["VIRTGPU_PARAM_SVM"], PARAM_SVM);
        for (name, v) in [
            ("VIRTGPU_SVM_OP_REGISTER", op::REGISTER),
            ("VIRTGPU_SVM_OP_UNREGISTER", op::UNREGISTER),
            ("VIRTGPU_SVM_OP_ENABLE", op::ENABLE),
            ("VIRTGPU_SVM_OP_DISABLE", op::DISABLE),
            ("VIRTGPU_SVM_OP_PREFETCH", op::PREFETCH),
            ("VIRTGPU_SVM_ACCESS_READ", access::READ),
            ("VIRTGPU_SVM_ACCESS_WRITE", access::WRITE),
            ("VIRTGPU_SVM_ACCESS_EXEC", access::EXEC),
        ] {
            assert_eq!(d[name], u64::from(v), "{name}");
        }
        // The C layout of the header's struct (natural alignment), field
        // by field, against ours.
        let ours = [
            ("op", std::mem::offset_of!(SvmArgs, op), 4),
            ("flags", std::mem::offset_of!(SvmArgs, flags), 4),
            ("addr", std::mem::offset_of!(SvmArgs, addr), 8),
            ("size", std::mem::offset_of!(SvmArgs, size), 8),
            ("gpu_addr", std::mem::offset_of!(SvmArgs, gpu_addr), 8),
            ("access", std::mem::offset_of!(SvmArgs, access), 4),
            (
                "granule_shift",
                std::mem::offset_of!(SvmArgs, granule_shift),
                4,
            ),
            ("ring_size", std::mem::offset_of!(SvmArgs, ring_size), 4),
            ("pad", std::mem::offset_of!(SvmArgs, pad), 4),
        ];
        assert_eq!(fields.len(), ours.len(), "{fields:?}");
        let mut at = 0usize;
        for ((ty, name), (our_name, our_off, our_size)) in fields.iter().zip(ours) {
            let size = match ty.as_str() {
                "__u32" => 4,
                "__u64" => 8,
                other => panic!("unexpected type {other}"),
            };
            at = at.next_multiple_of(size);
            assert_eq!((name.as_str(), at, size), (our_name, our_off, our_size));
            at += size;
        }
        assert_eq!(at.next_multiple_of(8), size_of::<SvmArgs>());
        // DRM_IOWR('d', 0x40 + 0x0c, 48).
        assert_eq!(IOCTL_SVM, 0xC030_644C);
    }

    #[test]
    fn fdinfo_counters_parse() {
        let s = SvmStats::parse(
            "pos:\t0\nflags:\t02\ndrm-driver:\tvirtio_gpu\n\
             virtio-gpu-svm-enabled:\t1\nvirtio-gpu-svm-ranges:\t2\n\
             virtio-gpu-svm-unbinds:\t3\nvirtio-gpu-svm-unbind-ns:\t4000\n\
             virtio-gpu-svm-faults:\t32\nvirtio-gpu-svm-fault-ns:\t99\n\
             virtio-gpu-svm-bogus:\t7\nvirtio-gpu-svm-binds:\tx\n",
        );
        assert_eq!(
            s,
            SvmStats {
                enabled: 1,
                ranges: 2,
                unbinds: 3,
                unbind_ns: 4000,
                faults: 32,
                fault_ns: 99,
                ..SvmStats::default()
            }
        );
        assert_eq!(access_of(Perms::RW), access::READ | access::WRITE);
        assert_eq!(access_of(Perms::ALL), 7);
    }

    #[test]
    fn whole_process_ranges_cover_the_mappings_within_the_limits() {
        let maps = crate::procmaps::parse(
            "400000-500000 r-xp 0 08:01 1 /nc-guest\n\
             600000-700000 rw-p 0 00:00 0 [heap]\n\
             7f0000000000-7f0000100000 rw-p 0 00:00 0\n\
             7f1000000000-7f1000001000 rw-s 0 00:05 9 /dev/dri/renderD128\n\
             7ffd00000000-7ffd00021000 rw-p 0 00:00 0 [stack]\n\
             ffffffffff600000-ffffffffff601000 --xp 0 00:00 0 [vsyscall]\n",
        );
        let r = process_ranges(&maps, 0x10000);
        assert_eq!(
            r,
            vec![
                (0x40_0000, 0x70_0000 + HEAP_GROWTH),
                (0x7f00_0000_0000 - MMAP_GROWTH, 0x7ffd_0002_1000),
            ]
        );
        for m in maps.iter().filter(|m| m.end <= USER_TOP) {
            assert!(
                r.iter().any(|(s, e)| *s <= m.start && m.end <= *e),
                "{m:?} not covered"
            );
        }
        let total: u64 = r.iter().map(|(s, e)| e - s).sum();
        assert!(total <= MAX_REGISTERED_BYTES);
        assert!(
            r.iter()
                .all(|(s, e)| s % PAGE_SIZE == 0 && e % PAGE_SIZE == 0)
        );
        // A process spread over more than 16 TiB keeps to the limit.
        let wide = crate::procmaps::parse(
            "10000-20000 r--p 0 0:0 0\n400000000000-400000001000 rw-p 0 0:0 0\n\
             7fff00000000-7fff00001000 rw-p 0 0:0 0\n",
        );
        let r = process_ranges(&wide, 0x10000);
        let total: u64 = r.iter().map(|(s, e)| e - s).sum();
        assert!(total <= MAX_REGISTERED_BYTES, "{r:x?}");
        assert!(r.windows(2).all(|w| w[0].1 <= w[1].0), "disjoint {r:x?}");
        assert!(process_ranges(&[], 0x10000).is_empty());
    }
}
