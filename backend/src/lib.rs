//! Host-side GPU memory management for vhost-gpu-nc.
//!
//! Every guest context gets its own GPU virtual address space. This crate
//! holds the pieces that make that work and do not depend on virtio:
//!
//! - [`device`]: the [`Device`](device::Device) trait, the contract a GPU
//!   driver fulfils (page-table updates, compute queues, recoverable faults).
//! - [`sim`]: the simulated GPU, the daemon's default device: multi-level page
//!   tables, per-compute-unit TLBs, compute queues running the protocol's
//!   kernel set, and retry faults with replay and cancel.
pub mod device;

pub use device::{
    Completion, Device, DeviceError, DeviceInfo, DeviceVm, Dispatch, FaultRecord, FaultReply,
    GuestMemory, VmConfig, VmEvents,
};
