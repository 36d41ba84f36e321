//! Host-side GPU memory management for vhost-gpu-nc.
//!
//! Every guest context gets its own GPU virtual address space. This crate
//! holds the pieces that make that work and do not depend on virtio:
//!
//! - [`device`]: the [`Device`] trait, the contract a GPU
//!   driver fulfils (page-table updates, compute queues, recoverable faults).
//! - [`gpuvm`]: the per-context range manager (drm_gpuvm split/merge
//!   semantics, prepare/commit) and range attributes.
//! - [`context`]: the device-independent driver layer of one guest context:
//!   bind, fault policy and forwarding, quotas.
//! - [`sim`]: the simulated GPU, the daemon's default device: multi-level page
//!   tables, per-compute-unit TLBs, compute queues running the protocol's
//!   kernel set, and retry faults with replay and cancel.
//! - [`histogram`]: a fixed-bucket latency histogram (fault round trips,
//!   doorbell latency) for the daemon's metrics.
//! - [`poll`]: spin-then-park with an adaptive budget, for the threads that
//!   wait for work (compute units here, the daemon's vring worker).
// Everything that needs `unsafe` (memory maps, syscalls) lives in the daemon
// or in vm-memory: the GPU side is safe Rust only.
#![forbid(unsafe_code)]

pub mod context;
pub mod device;
pub mod gpuvm;
pub mod histogram;
pub mod poll;
pub mod sim;

pub use device::{
    Completion, Device, DeviceError, DeviceFault, DeviceInfo, DeviceVm, FaultAction, GuestRam,
    Interrupt, KernelLaunch, UserQueueCounters, UserQueueDesc, VmConfig, VmEvents,
};
