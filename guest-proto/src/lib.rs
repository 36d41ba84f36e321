//! The wire protocol of the vhost-gpu-nc native compute context.
//!
//! A guest talks to the device through virtio-gpu: it opens a context, shares
//! guest memory with the device as resources, and sends request streams in
//! `SUBMIT_3D` commands. This crate defines every byte of that conversation
//! (see `docs/protocol.md`, which is normative) and the domain types that the
//! host side shares with it: GPU virtual addresses, guest-physical addresses,
//! resource and queue ids, permissions, fault access kinds and the kernel set.
//!
//! The types and the codec build with `no_std` + `alloc` and depend on
//! nothing else, so the daemon, the guest runtime (`guest/runtime`) and a
//! guest kernel driver's user-space counterpart all share one definition of
//! every byte. This crate holds the codec and nothing else.
//!
//! # The codec
//!
//! The device side reads hostile bytes. Its entry points never panic, never
//! index out of bounds, never overflow, and never allocate: they borrow the
//! input and decode lazily.
//! - [`stream::RequestStream`] splits a `SUBMIT_3D` payload into
//!   [`stream::Framed`] requests, telling a lost framing apart from an
//!   invalid request (section 3.3).
//! - [`command::Request::decode`] decodes one request with every check that
//!   needs no device state; a failure is a [`error::DecodeError`] whose
//!   [`status`](error::DecodeError::status) is the reply's status.
//! - [`reply::Reply::encode`], [`capset::Capset::encode`],
//!   [`fault::FaultRecord::encode`], [`signal::SignalSlot::encode`] produce
//!   what the device writes into guest memory.
//!
//! The guest side builds streams with [`writer::RequestWriter`] and reads
//! what the device wrote with [`capset::Capset::decode`],
//! [`reply::Reply::decode`], [`fault::FaultRecord::decode`] and
//! [`signal::SignalSlot::decode`].
//!
//! Protocol 1.1 adds user-mode queues ([`uq`]): rings of gfx9 SDMA packets
//! ([`sdma`]) and HSA AQL packets ([`aql`]) that the device reads through
//! the session's GPU VM; their decoders live here too, for the same
//! reason: they read hostile bytes.
#![cfg_attr(not(any(test, feature = "std")), no_std)]
// The decoder reads hostile bytes: no slice indexing that could panic.
#![warn(clippy::indexing_slicing)]

extern crate alloc;

pub mod aql;
pub mod attr;
pub mod bind;
pub mod capset;
pub mod command;
pub mod error;
pub mod fault;
pub mod header;
pub mod kernel;
pub mod opcode;
pub mod reply;
pub mod sdma;
pub mod signal;
pub mod status;
pub mod stream;
pub mod svm;
pub mod types;
pub mod uq;
mod wire;
pub mod writer;

pub use command::Request;
pub use error::{DecodeError, EncodeError};
pub use header::NO_REPLY;
pub use kernel::Kernel;
pub use opcode::Command;
pub use signal::DispatchStatus;
pub use status::Status;
pub use types::{
    AccessFlags, FaultId, FaultPolicy, GpuVa, GuestPhysAddr, PAGE_SHIFT, PAGE_SIZE, Perms, QueueId,
    ResourceId, SignalIndex,
};
