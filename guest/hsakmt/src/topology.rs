//! The topology the thunk reports: a CPU node (0) and one GPU node (1),
//! gfx90a-like with `xnack+`, built from the device's capset. Everything
//! here is a pure function of the capset and a few facts about this
//! machine, so it is unit-tested without a device.
//!
//! The constraints are ROCr 5.2.3's (docs/rocm.md): the CPU node must
//! report a cache; the GPU node needs EngineId 9.0.10, non-zero
//! NumFComputeCores / NumSIMDPerCU / MaxWavesPerSIMD, DoorbellType 2, the
//! SVM capability bit, and four memory banks (frame buffer, LDS and
//! scratch with non-zero bases, SVM).

use guest_proto::capset::Capset;

use crate::types::*;

/// Node ids.
pub const CPU_NODE: u32 = 0;
/// The GPU's node id.
pub const GPU_NODE: u32 = 1;
/// Nodes in the system.
pub const NUM_NODES: u32 = 2;

/// `FComputeIdLo` of the GPU node (the real thunk numbers GPU SIMD ids
/// from 0x8000_0000 on).
pub const GPU_FCOMPUTE_ID_LO: u32 = 0x8000_0000;
/// SIMDs per compute unit (gfx9: 4).
pub const SIMD_PER_CU: u32 = 4;
/// PCI ids of an MI210 (gfx90a), so that name tables find a gfx90a part.
pub const VENDOR_AMD: u16 = 0x1002;
/// MI210's device id.
pub const DEVICE_GFX90A: u16 = 0x740f;
/// Where the LDS and scratch apertures are reported (non-canonical, as
/// on real GPUs: ROCr only takes their high 32 bits for the queue).
pub const LDS_APERTURE: u64 = 1 << 48;
/// The private (scratch) aperture base.
pub const SCRATCH_APERTURE: u64 = 2 << 48;
/// Size of each of those apertures.
pub const APERTURE_SIZE: u64 = 1 << 32;
/// The GPU's name strings.
pub const MARKETING_NAME: &str = "vhost-gpu-nc simulated GPU";

/// Facts about the machine the CPU node describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Host {
    /// Online CPUs.
    pub cpus: u32,
    /// Bytes of RAM.
    pub ram: u64,
    /// L1 data cache size, KiB (`HsaCacheProperties::CacheSize` is in KiB).
    pub l1d_kib: u32,
}

impl Host {
    /// This machine's, from `sysconf`.
    pub fn this() -> Host {
        // SAFETY: sysconf has no memory-safety preconditions.
        let (cpus, pages, page, l1d) = unsafe {
            (
                libc::sysconf(libc::_SC_NPROCESSORS_ONLN),
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
                libc::sysconf(libc::_SC_LEVEL1_DCACHE_SIZE),
            )
        };
        Host {
            cpus: u32::try_from(cpus).unwrap_or(1).clamp(1, 256),
            ram: u64::try_from(pages).unwrap_or(0) * u64::try_from(page).unwrap_or(4096),
            l1d_kib: u32::try_from(l1d / 1024)
                .ok()
                .filter(|v| *v > 0)
                .unwrap_or(32),
        }
    }
}

/// The whole topology snapshot.
#[derive(Clone)]
pub struct Topology {
    /// Per node.
    pub nodes: [HsaNodeProperties; NUM_NODES as usize],
    /// Memory banks per node.
    pub banks: [Vec<HsaMemoryProperties>; NUM_NODES as usize],
    /// Caches per node.
    pub caches: [Vec<HsaCacheProperties>; NUM_NODES as usize],
    /// IO links per node.
    pub links: [Vec<HsaIoLinkProperties>; NUM_NODES as usize],
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("nodes", &self.nodes.len())
            .field("banks", &self.banks)
            .finish_non_exhaustive()
    }
}

fn utf16_name(s: &str) -> [u16; HSA_PUBLIC_NAME_SIZE] {
    let mut out = [0u16; HSA_PUBLIC_NAME_SIZE];
    for (o, c) in out
        .iter_mut()
        .zip(s.encode_utf16().take(HSA_PUBLIC_NAME_SIZE - 1))
    {
        *o = c;
    }
    out
}

fn ascii_name(s: &str) -> [u8; HSA_PUBLIC_NAME_SIZE] {
    let mut out = [0u8; HSA_PUBLIC_NAME_SIZE];
    for (o, c) in out.iter_mut().zip(s.bytes().take(HSA_PUBLIC_NAME_SIZE - 1)) {
        *o = c;
    }
    out
}

/// A cache of `size_kib` KiB.
fn cache(level: u32, size_kib: u32, processor: u32, ty: u32, siblings: u32) -> HsaCacheProperties {
    let mut c = HsaCacheProperties {
        ProcessorIdLow: processor,
        CacheLevel: level,
        CacheSize: size_kib,
        CacheLineSize: 64,
        CacheLinesPerTag: 1,
        CacheAssociativity: 8,
        CacheLatency: 1,
        CacheType: ty,
        ..HsaCacheProperties::default()
    };
    for s in c.SiblingMap.iter_mut().take(siblings as usize) {
        *s = 1;
    }
    c
}

fn link(from: u32, to: u32) -> HsaIoLinkProperties {
    HsaIoLinkProperties {
        IoLinkType: HSA_IOLINKTYPE_PCIEXPRESS,
        VersionMajor: 3,
        VersionMinor: 0,
        NodeFrom: from,
        NodeTo: to,
        Weight: 20,
        MinimumLatency: 0,
        MaximumLatency: 0,
        MinimumBandwidth: 0,
        MaximumBandwidth: 16_000,
        RecTransferSize: 0,
        Flags: 0,
    }
}

/// Bytes the GPU node reports as its frame buffer: the device's per-guest
/// bound-bytes quota (the "VRAM" is guest memory, docs/rocm.md).
pub fn frame_buffer_bytes(capset: &Capset) -> u64 {
    capset.max_bound_bytes
}

/// Builds the topology for a device with `capset` on `host`;
/// `render_minor` is the render node's minor.
pub fn build(capset: &Capset, host: Host, render_minor: i32) -> Topology {
    let cus = capset.compute_units.max(1);
    let cpu = HsaNodeProperties {
        NumCPUCores: host.cpus,
        NumMemoryBanks: 1,
        NumCaches: 1,
        NumIOLinks: 1,
        CComputeIdLo: 0,
        MaxEngineClockMhzCCompute: 2000,
        DrmRenderMinor: -1,
        MarketingName: utf16_name("Virtual CPU"),
        AMDName: ascii_name("Virtual CPU"),
        ..HsaNodeProperties::default()
    };
    let caps = capability::QUEUE_SIZE_POW2
        | capability::QUEUE_SIZE_32BIT
        | (2 << capability::DOORBELL_TYPE_SHIFT)
        | capability::SVM_API_SUPPORTED
        | capability::COHERENT_HOST_ACCESS;
    let gpu = HsaNodeProperties {
        NumFComputeCores: cus * SIMD_PER_CU,
        NumMemoryBanks: 4,
        NumCaches: 2,
        NumIOLinks: 1,
        FComputeIdLo: GPU_FCOMPUTE_ID_LO,
        Capability: caps,
        MaxWavesPerSIMD: 8,
        LDSSizeInKB: 64,
        GDSSizeInKB: 0,
        WaveFrontSize: 64,
        NumShaderBanks: 1,
        NumArrays: 1,
        NumCUPerArray: cus,
        NumSIMDPerCU: SIMD_PER_CU,
        MaxSlotsScratchCU: 32,
        EngineId: engine_id(0, 9, 0, 10),
        VendorId: VENDOR_AMD,
        DeviceId: DEVICE_GFX90A,
        LocationId: 0,
        LocalMemSize: frame_buffer_bytes(capset),
        MaxEngineClockMhzFCompute: 1700,
        MaxEngineClockMhzCCompute: 2000,
        DrmRenderMinor: render_minor,
        MarketingName: utf16_name(MARKETING_NAME),
        AMDName: ascii_name("gfx90a"),
        NumSdmaEngines: 2,
        NumSdmaXgmiEngines: 0,
        NumSdmaQueuesPerEngine: 8,
        NumCpQueues: 24,
        NumGws: 0,
        UniqueID: 0x5647_4e43_0000_0001,
        VGPRSizePerCU: 512 * 1024,
        SGPRSizePerCU: 0x4000,
        ..HsaNodeProperties::default()
    };
    let aperture = capset.aperture_end.raw() - capset.aperture_start.raw();
    let bank = |ty, size, base| HsaMemoryProperties {
        HeapType: ty,
        SizeInBytes: size,
        Flags: 0,
        Width: 64,
        MemoryClockMax: 1600,
        VirtualBaseAddress: base,
    };
    Topology {
        nodes: [cpu, gpu],
        banks: [
            vec![bank(HSA_HEAPTYPE_SYSTEM, host.ram, 0)],
            vec![
                bank(
                    HSA_HEAPTYPE_FRAME_BUFFER_PUBLIC,
                    frame_buffer_bytes(capset),
                    0,
                ),
                bank(HSA_HEAPTYPE_GPU_LDS, APERTURE_SIZE, LDS_APERTURE),
                bank(HSA_HEAPTYPE_GPU_SCRATCH, APERTURE_SIZE, SCRATCH_APERTURE),
                bank(
                    HSA_HEAPTYPE_DEVICE_SVM,
                    aperture,
                    capset.aperture_start.raw(),
                ),
            ],
        ],
        caches: [
            vec![cache(
                1,
                host.l1d_kib,
                0,
                cache_type::DATA | cache_type::CPU,
                host.cpus,
            )],
            vec![
                cache(
                    1,
                    16,
                    GPU_FCOMPUTE_ID_LO,
                    cache_type::DATA | cache_type::HSACU,
                    1,
                ),
                cache(
                    2,
                    8 * 1024,
                    GPU_FCOMPUTE_ID_LO,
                    cache_type::DATA | cache_type::HSACU,
                    cus,
                ),
            ],
        ],
        links: [
            vec![link(CPU_NODE, GPU_NODE)],
            vec![link(GPU_NODE, CPU_NODE)],
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Topology {
        let capset = Capset {
            compute_units: 6,
            ..Capset::default()
        };
        build(
            &capset,
            Host {
                cpus: 2,
                ram: 1 << 30,
                l1d_kib: 48,
            },
            128,
        )
    }

    #[test]
    fn the_gpu_node_is_what_rocr_asserts_on() {
        let t = topo();
        let g = t.nodes[GPU_NODE as usize];
        assert_eq!({ g.NumFComputeCores }, 24, "6 CUs x 4 SIMDs");
        assert_eq!({ g.NumSIMDPerCU }, 4);
        assert!({ g.MaxWavesPerSIMD } > 0);
        assert_eq!({ g.EngineId } >> 10 & 0x3f, 9);
        assert_eq!({ g.EngineId } >> 16 & 0xff, 0);
        assert_eq!({ g.EngineId } >> 24 & 0xff, 10);
        assert_eq!({ g.Capability } >> 12 & 3, 2, "doorbell type 2");
        assert_ne!({ g.Capability } & capability::SVM_API_SUPPORTED, 0);
        assert_eq!({ g.NumMemoryBanks } as usize, t.banks[1].len());
        assert_eq!({ g.NumCaches } as usize, t.caches[1].len());
        assert_eq!({ g.NumIOLinks } as usize, t.links[1].len());
        let heaps: Vec<u32> = t.banks[1].iter().map(|b| b.HeapType).collect();
        assert_eq!(
            heaps,
            [
                HSA_HEAPTYPE_FRAME_BUFFER_PUBLIC,
                HSA_HEAPTYPE_GPU_LDS,
                HSA_HEAPTYPE_GPU_SCRATCH,
                HSA_HEAPTYPE_DEVICE_SVM
            ]
        );
        assert!(
            t.banks[1][1].VirtualBaseAddress >> 32 != 0,
            "LDS base high bits"
        );
        assert!(
            t.banks[1][2].VirtualBaseAddress >> 32 != 0,
            "scratch base high bits"
        );
        assert!(
            t.caches[1]
                .iter()
                .all(|c| c.ProcessorIdLow == GPU_FCOMPUTE_ID_LO)
        );
        let name: String =
            char::decode_utf16(g.MarketingName.iter().copied().take_while(|c| *c != 0))
                .map(|c| c.unwrap_or('?'))
                .collect();
        assert_eq!(name, MARKETING_NAME);
    }

    #[test]
    fn the_cpu_node_has_a_cache_and_memory() {
        let t = topo();
        let c = t.nodes[CPU_NODE as usize];
        assert_eq!({ c.NumCPUCores }, 2);
        assert_eq!({ c.NumFComputeCores }, 0);
        assert_eq!(t.caches[0].len(), 1, "ROCr aborts without a CPU cache");
        assert_eq!(t.caches[0][0].CacheSize, 48, "KiB");
        assert_eq!(t.caches[0][0].SiblingMap[..3], [1, 1, 0]);
        assert_eq!({ t.banks[0][0].SizeInBytes }, 1 << 30);
        assert_eq!(t.links[0][0].NodeTo, GPU_NODE);
    }
}
