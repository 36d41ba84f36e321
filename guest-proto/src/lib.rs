//! The wire protocol of the vhost-gpu-nc native compute context.
//!
//! A guest talks to the device through virtio-gpu: it opens a context, shares
//! guest memory with the device as resources, and sends request streams in
//! `SUBMIT_3D` commands. This crate defines every byte of that conversation
//! (see `docs/protocol.md`, which is normative) and the domain types that the
//! host side shares with it: GPU virtual addresses, guest-physical addresses,
//! resource and queue ids, permissions, fault access kinds and the kernel set.
//!
//! The types and the codec build with `no_std` + `alloc`, so a guest kernel
//! driver could use them. With the `guest` feature the crate also carries a
//! Linux guest runtime over the virtio-gpu DRM UAPI.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod kernel;
pub mod signal;
pub mod types;

pub use kernel::Kernel;
pub use signal::DispatchStatus;
pub use types::{
    AccessFlags, FaultId, FaultPolicy, GpuVa, GuestPhysAddr, PAGE_SHIFT, PAGE_SIZE, Perms, QueueId,
    ResourceId, SignalIndex,
};
