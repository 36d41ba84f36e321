//! The C types of Debian's `libhsakmt-dev` 5.2.3 (`hsakmttypes.h`), by
//! hand, only those the 42 functions use. The header packs everything with
//! `#pragma pack(4)`, so every struct here is `repr(C, packed(4))` (a no-op
//! for structs without 8-byte members). `tests/layout.rs` compiles a C
//! program against the real header with gcc and compares every size and
//! offset, and every bitfield position used here.
#![allow(
    non_snake_case,
    non_camel_case_types,
    missing_docs,
    missing_debug_implementations
)]

/// `HSAKMT_STATUS`.
pub type HsakmtStatus = u32;
pub const HSAKMT_STATUS_SUCCESS: HsakmtStatus = 0;
pub const HSAKMT_STATUS_ERROR: HsakmtStatus = 1;
pub const HSAKMT_STATUS_INVALID_PARAMETER: HsakmtStatus = 3;
pub const HSAKMT_STATUS_INVALID_HANDLE: HsakmtStatus = 4;
pub const HSAKMT_STATUS_INVALID_NODE_UNIT: HsakmtStatus = 5;
pub const HSAKMT_STATUS_NO_MEMORY: HsakmtStatus = 6;
pub const HSAKMT_STATUS_BUFFER_TOO_SMALL: HsakmtStatus = 7;
pub const HSAKMT_STATUS_NOT_IMPLEMENTED: HsakmtStatus = 10;
pub const HSAKMT_STATUS_NOT_SUPPORTED: HsakmtStatus = 11;
pub const HSAKMT_STATUS_UNAVAILABLE: HsakmtStatus = 12;
pub const HSAKMT_STATUS_OUT_OF_RESOURCES: HsakmtStatus = 13;
pub const HSAKMT_STATUS_KERNEL_IO_CHANNEL_NOT_OPENED: HsakmtStatus = 20;
pub const HSAKMT_STATUS_KERNEL_COMMUNICATION_ERROR: HsakmtStatus = 21;
pub const HSAKMT_STATUS_KERNEL_ALREADY_OPENED: HsakmtStatus = 22;
pub const HSAKMT_STATUS_WAIT_FAILURE: HsakmtStatus = 30;
pub const HSAKMT_STATUS_WAIT_TIMEOUT: HsakmtStatus = 31;
pub const HSAKMT_STATUS_MEMORY_ALREADY_REGISTERED: HsakmtStatus = 35;
pub const HSAKMT_STATUS_MEMORY_NOT_REGISTERED: HsakmtStatus = 36;
pub const HSAKMT_STATUS_MEMORY_ALIGNMENT: HsakmtStatus = 37;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HsaVersionInfo {
    pub KernelInterfaceMajorVersion: u32,
    pub KernelInterfaceMinorVersion: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HsaSystemProperties {
    pub NumNodes: u32,
    pub PlatformOem: u32,
    pub PlatformId: u32,
    pub PlatformRev: u32,
}

/// `HSA_CAPABILITY` bit positions (a `u32` bitfield union).
pub mod capability {
    pub const QUEUE_SIZE_POW2: u32 = 1 << 3;
    pub const QUEUE_SIZE_32BIT: u32 = 1 << 4;
    pub const DOORBELL_TYPE_SHIFT: u32 = 12;
    pub const SVM_API_SUPPORTED: u32 = 1 << 27;
    pub const COHERENT_HOST_ACCESS: u32 = 1 << 28;
}

pub const HSA_PUBLIC_NAME_SIZE: usize = 64;

#[repr(C, packed(4))]
#[derive(Clone, Copy)]
pub struct HsaNodeProperties {
    pub NumCPUCores: u32,
    pub NumFComputeCores: u32,
    pub NumMemoryBanks: u32,
    pub NumCaches: u32,
    pub NumIOLinks: u32,
    pub CComputeIdLo: u32,
    pub FComputeIdLo: u32,
    pub Capability: u32,
    pub MaxWavesPerSIMD: u32,
    pub LDSSizeInKB: u32,
    pub GDSSizeInKB: u32,
    pub WaveFrontSize: u32,
    pub NumShaderBanks: u32,
    pub NumArrays: u32,
    pub NumCUPerArray: u32,
    pub NumSIMDPerCU: u32,
    pub MaxSlotsScratchCU: u32,
    /// `HSA_ENGINE_ID`: uCode 0..9, Major 10..15, Minor 16..23, Stepping 24..31.
    pub EngineId: u32,
    pub VendorId: u16,
    pub DeviceId: u16,
    pub LocationId: u32,
    pub LocalMemSize: u64,
    pub MaxEngineClockMhzFCompute: u32,
    pub MaxEngineClockMhzCCompute: u32,
    pub DrmRenderMinor: i32,
    pub MarketingName: [u16; HSA_PUBLIC_NAME_SIZE],
    pub AMDName: [u8; HSA_PUBLIC_NAME_SIZE],
    pub uCodeEngineVersions: u32,
    pub DebugProperties: u64,
    pub HiveID: u64,
    pub NumSdmaEngines: u32,
    pub NumSdmaXgmiEngines: u32,
    pub NumSdmaQueuesPerEngine: u8,
    pub NumCpQueues: u8,
    pub NumGws: u8,
    pub Reserved2: u8,
    pub Domain: u32,
    pub UniqueID: u64,
    pub VGPRSizePerCU: u32,
    pub SGPRSizePerCU: u32,
    pub Reserved: [u8; 12],
}

impl Default for HsaNodeProperties {
    fn default() -> Self {
        // SAFETY: plain integers and arrays of integers: all-zero is a
        // valid value (what the C thunk's memset gives).
        unsafe { std::mem::zeroed() }
    }
}

/// `HSA_ENGINE_ID` from its fields.
pub const fn engine_id(ucode: u32, major: u32, minor: u32, stepping: u32) -> u32 {
    (ucode & 0x3ff) | ((major & 0x3f) << 10) | ((minor & 0xff) << 16) | ((stepping & 0xff) << 24)
}

pub type HSA_HEAPTYPE = u32;
pub const HSA_HEAPTYPE_SYSTEM: HSA_HEAPTYPE = 0;
pub const HSA_HEAPTYPE_FRAME_BUFFER_PUBLIC: HSA_HEAPTYPE = 1;
pub const HSA_HEAPTYPE_FRAME_BUFFER_PRIVATE: HSA_HEAPTYPE = 2;
pub const HSA_HEAPTYPE_GPU_LDS: HSA_HEAPTYPE = 4;
pub const HSA_HEAPTYPE_GPU_SCRATCH: HSA_HEAPTYPE = 5;
pub const HSA_HEAPTYPE_DEVICE_SVM: HSA_HEAPTYPE = 6;

#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default)]
pub struct HsaMemoryProperties {
    pub HeapType: HSA_HEAPTYPE,
    pub SizeInBytes: u64,
    pub Flags: u32,
    pub Width: u32,
    pub MemoryClockMax: u32,
    pub VirtualBaseAddress: u64,
}

pub const HSA_CPU_SIBLINGS: usize = 256;

/// `HsaCacheType` bits.
pub mod cache_type {
    pub const DATA: u32 = 1 << 0;
    pub const INSTRUCTION: u32 = 1 << 1;
    pub const CPU: u32 = 1 << 2;
    pub const HSACU: u32 = 1 << 3;
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct HsaCacheProperties {
    pub ProcessorIdLow: u32,
    pub CacheLevel: u32,
    pub CacheSize: u32,
    pub CacheLineSize: u32,
    pub CacheLinesPerTag: u32,
    pub CacheAssociativity: u32,
    pub CacheLatency: u32,
    pub CacheType: u32,
    pub SiblingMap: [u32; HSA_CPU_SIBLINGS],
}

impl Default for HsaCacheProperties {
    fn default() -> Self {
        // SAFETY: integers only; all-zero is valid.
        unsafe { std::mem::zeroed() }
    }
}

pub const HSA_IOLINKTYPE_PCIEXPRESS: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HsaIoLinkProperties {
    pub IoLinkType: u32,
    pub VersionMajor: u32,
    pub VersionMinor: u32,
    pub NodeFrom: u32,
    pub NodeTo: u32,
    pub Weight: u32,
    pub MinimumLatency: u32,
    pub MaximumLatency: u32,
    pub MinimumBandwidth: u32,
    pub MaximumBandwidth: u32,
    pub RecTransferSize: u32,
    pub Flags: u32,
}

/// `HsaMemFlags` bits (a `u32` bitfield union, passed by value).
pub mod mem_flags {
    pub const NON_PAGED: u32 = 1 << 0;
    pub const CACHE_POLICY_SHIFT: u32 = 1;
    pub const READ_ONLY: u32 = 1 << 3;
    pub const PAGE_SIZE_SHIFT: u32 = 4;
    pub const HOST_ACCESS: u32 = 1 << 6;
    pub const NO_SUBSTITUTE: u32 = 1 << 7;
    pub const GDS_MEMORY: u32 = 1 << 8;
    pub const SCRATCH: u32 = 1 << 9;
    pub const ATOMIC_ACCESS_FULL: u32 = 1 << 10;
    pub const ATOMIC_ACCESS_PARTIAL: u32 = 1 << 11;
    pub const EXECUTE_ACCESS: u32 = 1 << 12;
    pub const COARSE_GRAIN: u32 = 1 << 13;
    pub const AQL_QUEUE_MEMORY: u32 = 1 << 14;
    pub const FIXED_ADDRESS: u32 = 1 << 15;
    pub const NO_NUMA_BIND: u32 = 1 << 16;
    pub const UNCACHED: u32 = 1 << 17;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HsaMemFlags {
    pub Value: u32,
}

/// `HsaMemMapFlags` bits.
pub mod map_flags {
    pub const READ_ONLY: u32 = 1 << 3;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HsaMemMapFlags {
    pub Value: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HsaGraphicsResourceInfo {
    pub MemoryAddress: *mut core::ffi::c_void,
    pub SizeInBytes: u64,
    pub Metadata: *const core::ffi::c_void,
    pub MetadataSizeInBytes: u32,
    pub Reserved: u32,
}

pub type HSA_QUEUE_TYPE = u32;
pub const HSA_QUEUE_COMPUTE: HSA_QUEUE_TYPE = 1;
pub const HSA_QUEUE_SDMA: HSA_QUEUE_TYPE = 2;
pub const HSA_QUEUE_SDMA_XGMI: HSA_QUEUE_TYPE = 5;
pub const HSA_QUEUE_COMPUTE_AQL: HSA_QUEUE_TYPE = 21;

pub type HSA_QUEUE_PRIORITY = i32;
pub const HSA_QUEUE_PRIORITY_MINIMUM: HSA_QUEUE_PRIORITY = -3;
pub const HSA_QUEUE_PRIORITY_MAXIMUM: HSA_QUEUE_PRIORITY = 3;

#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default)]
pub struct HsaQueueResource {
    pub QueueId: u64,
    pub QueueDoorBell: u64,
    pub QueueWptrValue: u64,
    pub QueueRptrValue: u64,
    pub ErrorReason: u64,
}

pub type HSA_EVENTTYPE = u32;
pub const HSA_EVENTTYPE_SIGNAL: HSA_EVENTTYPE = 0;
pub const HSA_EVENTTYPE_NODECHANGE: HSA_EVENTTYPE = 1;
pub const HSA_EVENTTYPE_DEVICESTATECHANGE: HSA_EVENTTYPE = 2;
pub const HSA_EVENTTYPE_HW_EXCEPTION: HSA_EVENTTYPE = 3;
pub const HSA_EVENTTYPE_SYSTEM_EVENT: HSA_EVENTTYPE = 4;
pub const HSA_EVENTTYPE_DEBUG_EVENT: HSA_EVENTTYPE = 5;
pub const HSA_EVENTTYPE_PROFILE_EVENT: HSA_EVENTTYPE = 6;
pub const HSA_EVENTTYPE_QUEUE_EVENT: HSA_EVENTTYPE = 7;
pub const HSA_EVENTTYPE_MEMORY: HSA_EVENTTYPE = 8;
pub const HSA_EVENTTYPE_MAXID: HSA_EVENTTYPE = 9;

pub const HSA_EVENTID_MEMORY_RECOVERABLE: u32 = 0;
pub const HSA_EVENTID_MEMORY_FATAL_PROCESS: u32 = 1;

#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default)]
pub struct HsaSyncVar {
    pub UserData: u64,
    pub SyncVarSize: u64,
}

/// `HsaAccessAttributeFailure` bits.
pub mod failure {
    pub const NOT_PRESENT: u32 = 1 << 0;
    pub const READ_ONLY: u32 = 1 << 1;
    pub const NO_EXECUTE: u32 = 1 << 2;
    pub const GPU_ACCESS: u32 = 1 << 3;
    pub const ECC: u32 = 1 << 4;
    pub const IMPRECISE: u32 = 1 << 5;
    pub const ERROR_TYPE_SHIFT: u32 = 6;
}

#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default)]
pub struct HsaMemoryAccessFault {
    pub NodeId: u32,
    pub VirtualAddress: u64,
    pub Failure: u32,
    pub Flags: u32,
}

/// The `EventData` union of `HsaEventData`: its largest member is
/// `HsaMemoryAccessFault` (20 bytes); `HsaSyncVar` is 16.
#[repr(C, packed(4))]
#[derive(Clone, Copy)]
pub union HsaEventDataUnion {
    pub SyncVar: HsaSyncVar,
    pub MemoryAccessFault: HsaMemoryAccessFault,
    pub Raw: [u32; 5],
}

#[repr(C, packed(4))]
#[derive(Clone, Copy)]
pub struct HsaEventData {
    pub EventType: HSA_EVENTTYPE,
    pub EventData: HsaEventDataUnion,
    pub HWData1: u64,
    pub HWData2: u64,
    pub HWData3: u32,
}

#[repr(C, packed(4))]
#[derive(Clone, Copy)]
pub struct HsaEventDescriptor {
    pub EventType: HSA_EVENTTYPE,
    pub NodeId: u32,
    pub SyncVar: HsaSyncVar,
}

#[repr(C, packed(4))]
#[derive(Clone, Copy)]
pub struct HsaEvent {
    pub EventId: u32,
    pub EventData: HsaEventData,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HsaClockCounters {
    pub GPUClockCounter: u64,
    pub CPUClockCounter: u64,
    pub SystemClockCounter: u64,
    pub SystemClockFrequencyHz: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HsaGpuTileConfig {
    pub TileConfig: *mut u32,
    pub MacroTileConfig: *mut u32,
    pub NumTileConfigs: u32,
    pub NumMacroTileConfigs: u32,
    pub GbAddrConfig: u32,
    pub NumBanks: u32,
    pub NumRanks: u32,
    pub Reserved: [u32; 7],
}

pub type HSA_POINTER_TYPE = u32;
pub const HSA_POINTER_UNKNOWN: HSA_POINTER_TYPE = 0;
pub const HSA_POINTER_ALLOCATED: HSA_POINTER_TYPE = 1;
pub const HSA_POINTER_REGISTERED_USER: HSA_POINTER_TYPE = 2;

#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug)]
pub struct HsaPointerInfo {
    pub Type: HSA_POINTER_TYPE,
    pub Node: u32,
    pub MemFlags: HsaMemFlags,
    pub CPUAddress: *mut core::ffi::c_void,
    pub GPUAddress: u64,
    pub SizeInBytes: u64,
    pub NRegisteredNodes: u32,
    pub NMappedNodes: u32,
    pub RegisteredNodes: *const u32,
    pub MappedNodes: *const u32,
    pub UserData: *mut core::ffi::c_void,
}

/// `HsaSharedMemoryHandle`: `HSAuint32[8]`.
pub type HsaSharedMemoryHandle = [u32; 8];

pub type HSA_SVM_ATTR_TYPE = u32;
pub const HSA_SVM_ATTR_PREFERRED_LOC: u32 = 0;
pub const HSA_SVM_ATTR_PREFETCH_LOC: u32 = 1;
pub const HSA_SVM_ATTR_ACCESS: u32 = 2;
pub const HSA_SVM_ATTR_ACCESS_IN_PLACE: u32 = 3;
pub const HSA_SVM_ATTR_NO_ACCESS: u32 = 4;
pub const HSA_SVM_ATTR_SET_FLAGS: u32 = 5;
pub const HSA_SVM_ATTR_CLR_FLAGS: u32 = 6;
pub const HSA_SVM_ATTR_GRANULARITY: u32 = 7;

pub const HSA_SVM_FLAG_HOST_ACCESS: u32 = 0x1;
pub const HSA_SVM_FLAG_COHERENT: u32 = 0x2;
pub const HSA_SVM_FLAG_HIVE_LOCAL: u32 = 0x4;
pub const HSA_SVM_FLAG_GPU_RO: u32 = 0x8;
pub const HSA_SVM_FLAG_GPU_EXEC: u32 = 0x10;
pub const HSA_SVM_FLAG_GPU_READ_MOSTLY: u32 = 0x20;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HSA_SVM_ATTRIBUTE {
    pub type_: u32,
    pub value: u32,
}

/// ROCr's `amd_queue_t` (`hsa/amd_hsa_queue.h`): what a command processor
/// knows about it. The CP finds the structure from the read pointer the
/// runtime gives it (`&read_dispatch_id`).
pub mod amd_queue {
    /// `offsetof(amd_queue_t, read_dispatch_id)`.
    pub const READ_DISPATCH_ID: u64 = 128;
    /// `offsetof(amd_queue_t, write_dispatch_id)`.
    pub const WRITE_DISPATCH_ID: u64 = 56;
    /// `offsetof(amd_queue_t, queue_inactive_signal)`.
    pub const QUEUE_INACTIVE_SIGNAL: u64 = 192;
    /// `sizeof(amd_queue_t)`.
    pub const SIZE: u64 = 256;
}

/// ROCr's `amd_signal_t` (`hsa/amd_hsa_signal.h`): the protocol's signal
/// ABI (docs/protocol.md 14.10), owned by `guest-proto`; `tests/layout.rs`
/// checks it against Debian's header.
pub use guest_proto::aql::amd_signal;
