//! The Rust types against Debian's `libhsakmt-dev` / `libhsa-runtime-dev`
//! headers: a C program compiled with gcc prints `sizeof`, `offsetof` and
//! bitfield values, and every one must equal the Rust side. The headers
//! come from the cache tests/qemu/rocm-setup.sh fills (or `VGNC_ROCM_ROOT`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::process::Command;

use hsakmt::types::*;

fn rocm_root() -> PathBuf {
    if let Some(r) = std::env::var_os("VGNC_ROCM_ROOT") {
        return PathBuf::from(r);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME");
    cache.join("vhost-gpu-nc/rocm/5.2.3/root")
}

/// (C expression, Rust value) pairs.
struct Checks {
    c: Vec<String>,
    rust: Vec<(String, u64)>,
}

impl Checks {
    fn add(&mut self, name: &str, c_expr: &str, rust: usize) {
        self.c.push(format!(
            "printf(\"{name} %llu\\n\", (unsigned long long)({c_expr}));"
        ));
        self.rust.push((name.to_string(), rust as u64));
    }
}

macro_rules! layout {
    ($checks:expr, $c:literal => $t:ty { $($f:ident),* $(,)? }) => {{
        $checks.add(concat!($c, ".size"), concat!("sizeof(", $c, ")"), size_of::<$t>());
        $(
            $checks.add(
                concat!($c, ".", stringify!($f)),
                concat!("offsetof(", $c, ", ", stringify!($f), ")"),
                offset_of!($t, $f),
            );
        )*
    }};
}

#[test]
fn rust_layouts_match_the_debian_headers() {
    let root = rocm_root();
    let include = root.join("usr/include");
    assert!(
        include.join("hsakmttypes.h").exists(),
        "no headers at {} - run tests/qemu/rocm-setup.sh (or set VGNC_ROCM_ROOT)",
        include.display()
    );
    let mut k = Checks {
        c: Vec::new(),
        rust: Vec::new(),
    };
    layout!(k, "HsaVersionInfo" => HsaVersionInfo { KernelInterfaceMajorVersion, KernelInterfaceMinorVersion });
    layout!(k, "HsaSystemProperties" => HsaSystemProperties { NumNodes, PlatformOem, PlatformId, PlatformRev });
    layout!(k, "HsaNodeProperties" => HsaNodeProperties {
        NumCPUCores, NumFComputeCores, NumMemoryBanks, NumCaches, NumIOLinks, CComputeIdLo,
        FComputeIdLo, Capability, MaxWavesPerSIMD, LDSSizeInKB, GDSSizeInKB, WaveFrontSize,
        NumShaderBanks, NumArrays, NumCUPerArray, NumSIMDPerCU, MaxSlotsScratchCU, EngineId,
        VendorId, DeviceId, LocationId, LocalMemSize, MaxEngineClockMhzFCompute,
        MaxEngineClockMhzCCompute, DrmRenderMinor, MarketingName, AMDName, uCodeEngineVersions,
        DebugProperties, HiveID, NumSdmaEngines, NumSdmaXgmiEngines, NumSdmaQueuesPerEngine,
        NumCpQueues, NumGws, Reserved2, Domain, UniqueID, VGPRSizePerCU, SGPRSizePerCU, Reserved,
    });
    layout!(k, "HsaMemoryProperties" => HsaMemoryProperties {
        HeapType, SizeInBytes, Flags, Width, MemoryClockMax, VirtualBaseAddress,
    });
    layout!(k, "HsaCacheProperties" => HsaCacheProperties {
        ProcessorIdLow, CacheLevel, CacheSize, CacheLineSize, CacheLinesPerTag,
        CacheAssociativity, CacheLatency, CacheType, SiblingMap,
    });
    layout!(k, "HsaIoLinkProperties" => HsaIoLinkProperties {
        IoLinkType, VersionMajor, VersionMinor, NodeFrom, NodeTo, Weight, MinimumLatency,
        MaximumLatency, MinimumBandwidth, MaximumBandwidth, RecTransferSize, Flags,
    });
    layout!(k, "HsaMemFlags" => HsaMemFlags { Value });
    layout!(k, "HsaMemMapFlags" => HsaMemMapFlags { Value });
    layout!(k, "HsaGraphicsResourceInfo" => HsaGraphicsResourceInfo {
        MemoryAddress, SizeInBytes, Metadata, MetadataSizeInBytes, Reserved,
    });
    layout!(k, "HsaQueueResource" => HsaQueueResource {
        QueueId, QueueDoorBell, QueueWptrValue, QueueRptrValue, ErrorReason,
    });
    layout!(k, "HsaSyncVar" => HsaSyncVar { SyncVarSize });
    k.add(
        "HsaSyncVar.UserData",
        "offsetof(HsaSyncVar, SyncVar.UserData)",
        offset_of!(HsaSyncVar, UserData),
    );
    layout!(k, "HsaMemoryAccessFault" => HsaMemoryAccessFault { NodeId, VirtualAddress, Failure, Flags });
    layout!(k, "HsaEventData" => HsaEventData { EventType, EventData, HWData1, HWData2, HWData3 });
    k.add(
        "HsaEventData.union.size",
        "sizeof(((HsaEventData *)0)->EventData)",
        size_of::<HsaEventDataUnion>(),
    );
    layout!(k, "HsaEventDescriptor" => HsaEventDescriptor { EventType, NodeId, SyncVar });
    layout!(k, "HsaEvent" => HsaEvent { EventId, EventData });
    layout!(k, "HsaClockCounters" => HsaClockCounters {
        GPUClockCounter, CPUClockCounter, SystemClockCounter, SystemClockFrequencyHz,
    });
    layout!(k, "HsaGpuTileConfig" => HsaGpuTileConfig {
        TileConfig, MacroTileConfig, NumTileConfigs, NumMacroTileConfigs, GbAddrConfig,
        NumBanks, NumRanks, Reserved,
    });
    layout!(k, "HsaPointerInfo" => HsaPointerInfo {
        Type, Node, MemFlags, CPUAddress, GPUAddress, SizeInBytes, NRegisteredNodes,
        NMappedNodes, RegisteredNodes, MappedNodes, UserData,
    });
    k.add(
        "HsaSharedMemoryHandle.size",
        "sizeof(HsaSharedMemoryHandle)",
        size_of::<HsaSharedMemoryHandle>(),
    );
    k.add(
        "HSA_SVM_ATTRIBUTE.size",
        "sizeof(HSA_SVM_ATTRIBUTE)",
        size_of::<HSA_SVM_ATTRIBUTE>(),
    );
    k.add(
        "HSA_SVM_ATTRIBUTE.type",
        "offsetof(HSA_SVM_ATTRIBUTE, type)",
        offset_of!(HSA_SVM_ATTRIBUTE, type_),
    );
    k.add(
        "HSA_SVM_ATTRIBUTE.value",
        "offsetof(HSA_SVM_ATTRIBUTE, value)",
        offset_of!(HSA_SVM_ATTRIBUTE, value),
    );

    // Bitfields: set one field in C, compare the word with ours.
    let bit = |k: &mut Checks, name: &str, ty: &str, field: &str, val: &str, rust: u32| {
        k.add(
            name,
            &format!("({{ {ty} x; memset(&x, 0, sizeof x); x.{field} = {val}; unsigned v; memcpy(&v, &x, 4); v; }})"),
            rust as usize,
        );
    };
    bit(
        &mut k,
        "cap.DoorbellType",
        "HSA_CAPABILITY",
        "ui32.DoorbellType",
        "2",
        2 << capability::DOORBELL_TYPE_SHIFT,
    );
    bit(
        &mut k,
        "cap.SVMAPISupported",
        "HSA_CAPABILITY",
        "ui32.SVMAPISupported",
        "1",
        capability::SVM_API_SUPPORTED,
    );
    bit(
        &mut k,
        "cap.CoherentHostAccess",
        "HSA_CAPABILITY",
        "ui32.CoherentHostAccess",
        "1",
        capability::COHERENT_HOST_ACCESS,
    );
    bit(
        &mut k,
        "cap.QueueSizePowerOfTwo",
        "HSA_CAPABILITY",
        "ui32.QueueSizePowerOfTwo",
        "1",
        capability::QUEUE_SIZE_POW2,
    );
    bit(
        &mut k,
        "cap.QueueSize32bit",
        "HSA_CAPABILITY",
        "ui32.QueueSize32bit",
        "1",
        capability::QUEUE_SIZE_32BIT,
    );
    bit(
        &mut k,
        "engine.Major",
        "HSA_ENGINE_ID",
        "ui32.Major",
        "9",
        engine_id(0, 9, 0, 0),
    );
    bit(
        &mut k,
        "engine.Minor",
        "HSA_ENGINE_ID",
        "ui32.Minor",
        "3",
        engine_id(0, 0, 3, 0),
    );
    bit(
        &mut k,
        "engine.Stepping",
        "HSA_ENGINE_ID",
        "ui32.Stepping",
        "10",
        engine_id(0, 0, 0, 10),
    );
    bit(
        &mut k,
        "engine.uCode",
        "HSA_ENGINE_ID",
        "ui32.uCode",
        "5",
        engine_id(5, 0, 0, 0),
    );
    for (field, rust) in [
        ("NonPaged", mem_flags::NON_PAGED),
        ("ReadOnly", mem_flags::READ_ONLY),
        ("HostAccess", mem_flags::HOST_ACCESS),
        ("NoSubstitute", mem_flags::NO_SUBSTITUTE),
        ("GDSMemory", mem_flags::GDS_MEMORY),
        ("Scratch", mem_flags::SCRATCH),
        ("AtomicAccessFull", mem_flags::ATOMIC_ACCESS_FULL),
        ("AtomicAccessPartial", mem_flags::ATOMIC_ACCESS_PARTIAL),
        ("ExecuteAccess", mem_flags::EXECUTE_ACCESS),
        ("CoarseGrain", mem_flags::COARSE_GRAIN),
        ("AQLQueueMemory", mem_flags::AQL_QUEUE_MEMORY),
        ("FixedAddress", mem_flags::FIXED_ADDRESS),
        ("NoNUMABind", mem_flags::NO_NUMA_BIND),
        ("Uncached", mem_flags::UNCACHED),
    ] {
        bit(
            &mut k,
            &format!("memflags.{field}"),
            "HsaMemFlags",
            &format!("ui32.{field}"),
            "1",
            rust,
        );
    }
    bit(
        &mut k,
        "mapflags.ReadOnly",
        "HsaMemMapFlags",
        "ui32.ReadOnly",
        "1",
        map_flags::READ_ONLY,
    );
    for (field, rust) in [
        ("NotPresent", failure::NOT_PRESENT),
        ("ReadOnly", failure::READ_ONLY),
        ("NoExecute", failure::NO_EXECUTE),
        ("GpuAccess", failure::GPU_ACCESS),
        ("ECC", failure::ECC),
        ("Imprecise", failure::IMPRECISE),
    ] {
        bit(
            &mut k,
            &format!("failure.{field}"),
            "HsaAccessAttributeFailure",
            field,
            "1",
            rust,
        );
    }
    bit(
        &mut k,
        "failure.ErrorType",
        "HsaAccessAttributeFailure",
        "ErrorType",
        "3",
        3 << failure::ERROR_TYPE_SHIFT,
    );
    for (field, rust) in [
        ("Data", cache_type::DATA),
        ("Instruction", cache_type::INSTRUCTION),
        ("CPU", cache_type::CPU),
        ("HSACU", cache_type::HSACU),
    ] {
        bit(
            &mut k,
            &format!("cache.{field}"),
            "HsaCacheType",
            &format!("ui32.{field}"),
            "1",
            rust,
        );
    }
    // ROCr's queue and signal structures, as a command processor sees them.
    k.add(
        "amd_queue_t.size",
        "sizeof(amd_queue_t)",
        amd_queue::SIZE as usize,
    );
    k.add(
        "amd_queue_t.read_dispatch_id",
        "offsetof(amd_queue_t, read_dispatch_id)",
        amd_queue::READ_DISPATCH_ID as usize,
    );
    k.add(
        "amd_queue_t.write_dispatch_id",
        "offsetof(amd_queue_t, write_dispatch_id)",
        amd_queue::WRITE_DISPATCH_ID as usize,
    );
    k.add(
        "amd_queue_t.queue_inactive_signal",
        "offsetof(amd_queue_t, queue_inactive_signal)",
        amd_queue::QUEUE_INACTIVE_SIGNAL as usize,
    );
    k.add(
        "amd_signal_t.value",
        "offsetof(amd_signal_t, value)",
        amd_signal::VALUE as usize,
    );
    k.add(
        "amd_signal_t.event_mailbox_ptr",
        "offsetof(amd_signal_t, event_mailbox_ptr)",
        amd_signal::EVENT_MAILBOX_PTR as usize,
    );
    k.add(
        "amd_signal_t.event_id",
        "offsetof(amd_signal_t, event_id)",
        amd_signal::EVENT_ID as usize,
    );
    // The rest of the signal ABI guest-proto gives the device (14.10).
    k.add(
        "amd_signal_t.kind",
        "offsetof(amd_signal_t, kind)",
        amd_signal::KIND as usize,
    );
    k.add(
        "amd_signal_t.start_ts",
        "offsetof(amd_signal_t, start_ts)",
        amd_signal::START_TS as usize,
    );
    k.add(
        "amd_signal_t.end_ts",
        "offsetof(amd_signal_t, end_ts)",
        amd_signal::END_TS as usize,
    );
    k.add(
        "amd_signal_t.size",
        "sizeof(amd_signal_t)",
        amd_signal::SIZE as usize,
    );
    k.add(
        "amd_signal_t.align",
        "_Alignof(amd_signal_t)",
        amd_signal::ALIGN as usize,
    );
    k.add(
        "AMD_SIGNAL_KIND_USER",
        "AMD_SIGNAL_KIND_USER",
        amd_signal::KIND_USER as usize,
    );
    // Enum values the thunk uses.
    for (name, rust) in [
        ("HSA_EVENTTYPE_MEMORY", HSA_EVENTTYPE_MEMORY),
        ("HSA_EVENTTYPE_MAXID", HSA_EVENTTYPE_MAXID),
        ("HSA_QUEUE_SDMA", HSA_QUEUE_SDMA),
        ("HSA_QUEUE_COMPUTE_AQL", HSA_QUEUE_COMPUTE_AQL),
        ("HSA_HEAPTYPE_DEVICE_SVM", HSA_HEAPTYPE_DEVICE_SVM),
        ("HSA_HEAPTYPE_GPU_SCRATCH", HSA_HEAPTYPE_GPU_SCRATCH),
        ("HSA_POINTER_REGISTERED_USER", HSA_POINTER_REGISTERED_USER),
        ("HSA_SVM_ATTR_GRANULARITY", HSA_SVM_ATTR_GRANULARITY),
        (
            "HSA_EVENTID_MEMORY_FATAL_PROCESS",
            HSA_EVENTID_MEMORY_FATAL_PROCESS,
        ),
        ("HSAKMT_STATUS_WAIT_TIMEOUT", HSAKMT_STATUS_WAIT_TIMEOUT),
        (
            "HSAKMT_STATUS_KERNEL_IO_CHANNEL_NOT_OPENED",
            HSAKMT_STATUS_KERNEL_IO_CHANNEL_NOT_OPENED,
        ),
        ("HSAKMT_STATUS_NOT_SUPPORTED", HSAKMT_STATUS_NOT_SUPPORTED),
    ] {
        k.add(name, name, rust as usize);
    }

    let dir = tempdir();
    let src = dir.join("layout.c");
    let bin = dir.join("layout");
    let body = k.c.join("\n    ");
    std::fs::write(
        &src,
        format!(
            "#include <stddef.h>\n#include <stdio.h>\n#include <string.h>\n#include <hsakmt.h>\n\
             #include <hsa/amd_hsa_queue.h>\n#include <hsa/amd_hsa_signal.h>\n\
             int main(void) {{\n    {body}\n    return 0;\n}}\n"
        ),
    )
    .unwrap();
    let out = Command::new("gcc")
        .arg("-std=gnu11")
        .arg("-I")
        .arg(&include)
        .arg("-I")
        .arg(include.join("hsa"))
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&bin).output().expect("run layout program");
    assert!(run.status.success());
    let c: HashMap<String, u64> = String::from_utf8_lossy(&run.stdout)
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(n, v)| (n.to_string(), v.parse().unwrap()))
        })
        .collect();
    let mut wrong = Vec::new();
    for (name, rust) in &k.rust {
        match c.get(name) {
            Some(v) if v == rust => {}
            other => wrong.push(format!("{name}: C {other:?}, Rust {rust}")),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(wrong.is_empty(), "layouts differ:\n{}", wrong.join("\n"));
    assert!(k.rust.len() > 150, "checked {} items", k.rust.len());
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("hsakmt-layout-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
