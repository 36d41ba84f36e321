//! `VM_BIND`: a batch of map and unmap operations on the session's GPU VM.
//!
//! A bind request is the one place a guest hands the device an unbounded
//! amount of structure (up to `max_request_bytes` of ops and page entries),
//! so it is never copied: [`VmBind`] borrows the request bytes and decodes
//! one op at a time, the way the device applies them. The protocol says the
//! first failing op stops the batch and the ops before it stay applied
//! (`docs/protocol.md` 5.5), which is exactly an iterator of
//! `Result<BindOp, _>` that the device consumes until the first error; the
//! number of `Ok`s it saw is the reply's `ops_done`.
//!
//! What is checked where:
//! - When the request is decoded: `op_count` in `1..=max_bind_ops`, the
//!   length equation, and that every page entry is page-aligned (the page
//!   array is one structure of the request, so a bad entry rejects it as a
//!   whole with `ops_done = 0`).
//! - When an op is decoded: reserved field, kind, permission bits, VA and
//!   size alignment, a non-zero size, `va + size` not wrapping, the fields a
//!   kind does not use being zero, and a `MAP_PAGES` op's page range lying
//!   inside the page array.
//! - By the device, not here: the aperture, the resource, guest RAM.

use core::fmt;
use core::iter::FusedIterator;

use crate::error::DecodeError;
use crate::types::{GpuVa, GuestPhysAddr, PAGE_SHIFT, PAGE_SIZE, Perms, ResourceId};
use crate::wire::{put_u32, put_u64, reserved_at, u32_at, u64_at};

/// Length of the fixed part of a `VM_BIND` request (header, `op_count`,
/// `page_count`).
pub const VM_BIND_FIXED_LEN: usize = 24;
/// Size of one bind op on the wire.
pub const BIND_OP_SIZE: usize = 40;
/// Size of one entry of the page array.
pub const PAGE_ENTRY_SIZE: usize = 8;

/// Wire values of a bind op's `kind`.
pub mod kind {
    /// [`super::BindOp::MapResource`]
    pub const MAP_RESOURCE: u32 = 1;
    /// [`super::BindOp::MapPages`]
    pub const MAP_PAGES: u32 = 2;
    /// [`super::BindOp::Unmap`]
    pub const UNMAP: u32 = 3;
}

/// One operation of a `VM_BIND` batch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BindOp<'a> {
    /// Maps `size` bytes of a resource, from byte `offset` on, at `va`.
    MapResource {
        /// Page-aligned start of the range.
        va: GpuVa,
        /// Page-aligned length, > 0.
        size: u64,
        /// Non-empty permissions.
        perms: Perms,
        /// The resource; the device checks it is attached to the context.
        resource: ResourceId,
        /// Page-aligned byte offset in the resource.
        offset: u64,
    },
    /// Maps a list of guest-physical pages at `va`, one after the other;
    /// the range is `pages.len()` pages long.
    MapPages {
        /// Page-aligned start of the range.
        va: GpuVa,
        /// Non-empty permissions.
        perms: Perms,
        /// The pages, in VA order.
        pages: PageList<'a>,
    },
    /// Removes whatever is mapped in `va .. va + size`.
    Unmap {
        /// Page-aligned start of the range.
        va: GpuVa,
        /// Page-aligned length, > 0.
        size: u64,
    },
}

impl BindOp<'_> {
    /// Start of the VA range the op changes.
    pub const fn va(&self) -> GpuVa {
        match *self {
            BindOp::MapResource { va, .. }
            | BindOp::MapPages { va, .. }
            | BindOp::Unmap { va, .. } => va,
        }
    }

    /// Length in bytes of the VA range the op changes.
    pub fn size(&self) -> u64 {
        match self {
            BindOp::MapResource { size, .. } | BindOp::Unmap { size, .. } => *size,
            BindOp::MapPages { pages, .. } => pages.size(),
        }
    }
}

/// The guest-physical pages of a [`BindOp::MapPages`]: either a view of the
/// request's page array (decoded), or the guest's own slice (to encode).
/// Two lists are equal when they hold the same addresses.
#[derive(Clone, Copy)]
pub struct PageList<'a> {
    repr: PagesRepr<'a>,
}

#[derive(Clone, Copy)]
enum PagesRepr<'a> {
    /// `bytes` holds page-aligned little-endian entries, starting with the
    /// page array's entry `first`.
    Wire {
        first: u32,
        bytes: &'a [u8],
    },
    Addrs(&'a [GuestPhysAddr]),
}

impl<'a> PageList<'a> {
    /// A list to encode.
    pub const fn new(pages: &'a [GuestPhysAddr]) -> PageList<'a> {
        PageList {
            repr: PagesRepr::Addrs(pages),
        }
    }

    /// Number of pages.
    pub const fn len(&self) -> usize {
        match self.repr {
            PagesRepr::Wire { bytes, .. } => bytes.len() / PAGE_ENTRY_SIZE,
            PagesRepr::Addrs(a) => a.len(),
        }
    }

    /// Whether the list is empty (never for a decoded op).
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Length in bytes of the VA range the pages cover.
    pub fn size(&self) -> u64 {
        (self.len() as u64).saturating_mul(PAGE_SIZE)
    }

    /// For a decoded list, the index of its first entry in the request's
    /// page array (the op's `offset` field).
    pub const fn first_index(&self) -> Option<u32> {
        match self.repr {
            PagesRepr::Wire { first, .. } => Some(first),
            PagesRepr::Addrs(_) => None,
        }
    }

    /// The pages, in VA order.
    pub fn iter(&self) -> Pages<'a> {
        Pages {
            repr: match self.repr {
                PagesRepr::Wire { bytes, .. } => PagesIterRepr::Wire(bytes),
                PagesRepr::Addrs(a) => PagesIterRepr::Addrs(a.iter()),
            },
        }
    }
}

impl PartialEq for PageList<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for PageList<'_> {}

impl fmt::Debug for PageList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> IntoIterator for PageList<'a> {
    type Item = GuestPhysAddr;
    type IntoIter = Pages<'a>;

    fn into_iter(self) -> Pages<'a> {
        self.iter()
    }
}

/// Iterator over the pages of a [`PageList`].
#[derive(Clone, Debug)]
pub struct Pages<'a> {
    repr: PagesIterRepr<'a>,
}

#[derive(Clone, Debug)]
enum PagesIterRepr<'a> {
    Wire(&'a [u8]),
    Addrs(core::slice::Iter<'a, GuestPhysAddr>),
}

impl Iterator for Pages<'_> {
    type Item = GuestPhysAddr;

    fn next(&mut self) -> Option<GuestPhysAddr> {
        match &mut self.repr {
            PagesIterRepr::Wire(bytes) => {
                let (entry, rest) = bytes.split_first_chunk::<PAGE_ENTRY_SIZE>()?;
                *bytes = rest;
                Some(GuestPhysAddr(u64::from_le_bytes(*entry)))
            }
            PagesIterRepr::Addrs(it) => it.next().copied(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match &self.repr {
            PagesIterRepr::Wire(bytes) => bytes.len() / PAGE_ENTRY_SIZE,
            PagesIterRepr::Addrs(it) => it.len(),
        };
        (n, Some(n))
    }
}

impl ExactSizeIterator for Pages<'_> {}
impl FusedIterator for Pages<'_> {}

/// A `VM_BIND` request: decoded (a view of the request bytes) or built by
/// the guest from a slice of ops (to encode).
#[derive(Clone, Copy)]
pub struct VmBind<'a> {
    repr: BindRepr<'a>,
}

#[derive(Clone, Copy)]
enum BindRepr<'a> {
    /// `ops` is `op_count * 40` bytes, `pages` `page_count * 8` bytes of
    /// page-aligned entries.
    Wire {
        ops: &'a [u8],
        pages: &'a [u8],
    },
    Ops(&'a [BindOp<'a>]),
}

impl<'a> VmBind<'a> {
    /// A request to encode. [`BindOp::MapPages`] lists are laid out one
    /// after the other in the page array, in op order.
    pub const fn new(ops: &'a [BindOp<'a>]) -> VmBind<'a> {
        VmBind {
            repr: BindRepr::Ops(ops),
        }
    }

    /// Decodes the request `bytes` (header included, `len` already framed):
    /// counts, length and the page array. Ops are decoded by
    /// [`VmBind::ops`].
    pub(crate) fn decode(bytes: &'a [u8], max_ops: u32) -> Result<VmBind<'a>, DecodeError> {
        if bytes.len() < VM_BIND_FIXED_LEN {
            return Err(DecodeError::TooShort {
                needed: VM_BIND_FIXED_LEN,
                actual: bytes.len(),
            });
        }
        let op_count = u32_at(bytes, 16)?;
        let page_count = u32_at(bytes, 20)?;
        if op_count == 0 {
            return Err(DecodeError::Zero { field: "op_count" });
        }
        if op_count > max_ops {
            return Err(DecodeError::CountTooLarge {
                field: "op_count",
                count: u64::from(op_count),
                max: u64::from(max_ops),
            });
        }
        // Both counts are u32, so this cannot overflow a u64.
        let ops_len = u64::from(op_count) * BIND_OP_SIZE as u64;
        let pages_len = u64::from(page_count) * PAGE_ENTRY_SIZE as u64;
        let expected_len = VM_BIND_FIXED_LEN as u64 + ops_len + pages_len;
        if expected_len != bytes.len() as u64 {
            return Err(DecodeError::CountMismatch {
                field: "op_count/page_count",
                count: op_count,
                expected_len,
                len: bytes.len(),
            });
        }
        let body = bytes.get(VM_BIND_FIXED_LEN..).unwrap_or_default();
        // `expected_len` equals the slice length, so `ops_len` fits.
        let (ops, pages) =
            body.split_at_checked(ops_len as usize)
                .ok_or(DecodeError::TooShort {
                    needed: expected_len as usize,
                    actual: bytes.len(),
                })?;
        check_page_entries(pages)?;
        Ok(VmBind {
            repr: BindRepr::Wire { ops, pages },
        })
    }

    /// Number of ops (`op_count`).
    pub fn op_count(&self) -> usize {
        match self.repr {
            BindRepr::Wire { ops, .. } => ops.len() / BIND_OP_SIZE,
            BindRepr::Ops(ops) => ops.len(),
        }
    }

    /// Number of entries in the page array (`page_count`).
    pub fn page_count(&self) -> usize {
        match self.repr {
            BindRepr::Wire { pages, .. } => pages.len() / PAGE_ENTRY_SIZE,
            BindRepr::Ops(ops) => ops
                .iter()
                .map(|op| match op {
                    BindOp::MapPages { pages, .. } => pages.len(),
                    _ => 0,
                })
                .fold(0usize, usize::saturating_add),
        }
    }

    /// The ops in order. A decoded op that is invalid yields its error and
    /// ends the iteration: the device stops the batch there.
    pub fn ops(&self) -> BindOps<'a> {
        BindOps {
            repr: match self.repr {
                BindRepr::Wire { ops, pages } => OpsIterRepr::Wire { ops, pages },
                BindRepr::Ops(ops) => OpsIterRepr::Ops(ops.iter()),
            },
        }
    }

    /// Length of the encoded request, header included, if it fits a `u64`.
    pub(crate) fn encoded_len(&self) -> Option<u64> {
        let ops = u64::try_from(self.op_count()).ok()?;
        let pages = u64::try_from(self.page_count()).ok()?;
        ops.checked_mul(BIND_OP_SIZE as u64)?
            .checked_add(pages.checked_mul(PAGE_ENTRY_SIZE as u64)?)?
            .checked_add(VM_BIND_FIXED_LEN as u64)
    }

    /// Writes the request body into `buf` (the whole request, sized by
    /// [`VmBind::encoded_len`]).
    pub(crate) fn write(&self, buf: &mut [u8]) {
        let op_count = u32::try_from(self.op_count()).unwrap_or(u32::MAX);
        let page_count = u32::try_from(self.page_count()).unwrap_or(u32::MAX);
        put_u32(buf, 16, op_count);
        put_u32(buf, 20, page_count);
        let ops_start = VM_BIND_FIXED_LEN;
        let pages_start = ops_start.saturating_add(self.op_count().saturating_mul(BIND_OP_SIZE));
        match self.repr {
            BindRepr::Wire { ops, pages } => {
                copy_at(buf, ops_start, ops);
                copy_at(buf, pages_start, pages);
            }
            BindRepr::Ops(ops) => {
                let mut next_page: usize = 0;
                for (i, op) in ops.iter().enumerate() {
                    let at = ops_start.saturating_add(i.saturating_mul(BIND_OP_SIZE));
                    write_op(buf, at, op, next_page);
                    if let BindOp::MapPages { pages, .. } = op {
                        for (j, page) in pages.iter().enumerate() {
                            let entry = pages_start.saturating_add(
                                next_page.saturating_add(j).saturating_mul(PAGE_ENTRY_SIZE),
                            );
                            put_u64(buf, entry, page.raw());
                        }
                        next_page = next_page.saturating_add(pages.len());
                    }
                }
            }
        }
    }
}

impl PartialEq for VmBind<'_> {
    /// Same ops (and decoding errors) in the same order; page lists compare
    /// by their addresses, not by where they sit in the page array.
    fn eq(&self, other: &Self) -> bool {
        self.op_count() == other.op_count() && self.ops().eq(other.ops())
    }
}

impl fmt::Debug for VmBind<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmBind")
            .field("op_count", &self.op_count())
            .field("page_count", &self.page_count())
            .field("ops", &DebugOps(*self))
            .finish()
    }
}

struct DebugOps<'a>(VmBind<'a>);

impl fmt::Debug for DebugOps<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.ops()).finish()
    }
}

/// Iterator over the ops of a [`VmBind`]; see [`VmBind::ops`].
#[derive(Clone, Debug)]
pub struct BindOps<'a> {
    repr: OpsIterRepr<'a>,
}

#[derive(Clone, Debug)]
enum OpsIterRepr<'a> {
    Wire { ops: &'a [u8], pages: &'a [u8] },
    Ops(core::slice::Iter<'a, BindOp<'a>>),
    Done,
}

impl<'a> Iterator for BindOps<'a> {
    type Item = Result<BindOp<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.repr {
            OpsIterRepr::Wire { ops, pages } => {
                let (op, rest) = ops.split_first_chunk::<BIND_OP_SIZE>()?;
                let pages = *pages;
                *ops = rest;
                let result = decode_op(op, pages);
                if result.is_err() {
                    self.repr = OpsIterRepr::Done;
                }
                Some(result)
            }
            OpsIterRepr::Ops(it) => it.next().map(|op| Ok(*op)),
            OpsIterRepr::Done => None,
        }
    }
}

impl FusedIterator for BindOps<'_> {}

fn copy_at(buf: &mut [u8], off: usize, src: &[u8]) {
    if let Some(dst) = off
        .checked_add(src.len())
        .and_then(|end| buf.get_mut(off..end))
    {
        dst.copy_from_slice(src);
    }
}

/// Every entry of the page array must be page-aligned.
fn check_page_entries(pages: &[u8]) -> Result<(), DecodeError> {
    let list = PageList {
        repr: PagesRepr::Wire {
            first: 0,
            bytes: pages,
        },
    };
    match list.iter().find(|page| !page.is_page_aligned()) {
        Some(bad) => Err(DecodeError::Misaligned {
            field: "pages",
            value: bad.raw(),
        }),
        None => Ok(()),
    }
}

/// Decodes one 40-byte op (5.5); `pages` is the request's page array.
fn decode_op<'a>(op: &[u8; BIND_OP_SIZE], pages: &'a [u8]) -> Result<BindOp<'a>, DecodeError> {
    let kind = u32_at(op, 0)?;
    let raw_perms = u32_at(op, 4)?;
    let va = GpuVa(u64_at(op, 8)?);
    let size = u64_at(op, 16)?;
    let resource_id = u32_at(op, 24)?;
    reserved_at(op, 28, 4, "op.reserved")?;
    let offset = u64_at(op, 32)?;

    if !matches!(kind, kind::MAP_RESOURCE | kind::MAP_PAGES | kind::UNMAP) {
        return Err(invalid("op.kind", u64::from(kind)));
    }
    let perms = Perms::from_bits(raw_perms).ok_or(invalid("op.perms", u64::from(raw_perms)))?;
    if !va.is_page_aligned() {
        return Err(DecodeError::Misaligned {
            field: "op.va",
            value: va.raw(),
        });
    }
    if size % PAGE_SIZE != 0 {
        return Err(DecodeError::Misaligned {
            field: "op.size",
            value: size,
        });
    }
    if size == 0 {
        return Err(DecodeError::Zero { field: "op.size" });
    }
    va.checked_add(size).ok_or(DecodeError::Overflow {
        field: "op.va+size",
    })?;

    match kind {
        kind::MAP_RESOURCE => {
            require_perms(perms)?;
            if offset % PAGE_SIZE != 0 {
                return Err(DecodeError::Misaligned {
                    field: "op.offset",
                    value: offset,
                });
            }
            offset.checked_add(size).ok_or(DecodeError::Overflow {
                field: "op.offset+size",
            })?;
            Ok(BindOp::MapResource {
                va,
                size,
                perms,
                resource: ResourceId(resource_id),
                offset,
            })
        }
        kind::MAP_PAGES => {
            require_perms(perms)?;
            require_zero("op.resource_id", u64::from(resource_id))?;
            let list = page_range(pages, offset, size >> PAGE_SHIFT)?;
            Ok(BindOp::MapPages {
                va,
                perms,
                pages: list,
            })
        }
        _ => {
            require_zero("op.perms", u64::from(raw_perms))?;
            require_zero("op.resource_id", u64::from(resource_id))?;
            require_zero("op.offset", offset)?;
            Ok(BindOp::Unmap { va, size })
        }
    }
}

/// Entries `first .. first + count` of the page array.
fn page_range(pages: &[u8], first: u64, count: u64) -> Result<PageList<'_>, DecodeError> {
    let out_of_range = DecodeError::OutOfRange {
        field: "op.offset..+size/4096 (pages)",
    };
    let first_index = u32::try_from(first).map_err(|_| out_of_range)?;
    let start = first
        .checked_mul(PAGE_ENTRY_SIZE as u64)
        .ok_or(out_of_range)?;
    let end = count
        .checked_mul(PAGE_ENTRY_SIZE as u64)
        .and_then(|len| start.checked_add(len))
        .ok_or(out_of_range)?;
    let start = usize::try_from(start).map_err(|_| out_of_range)?;
    let end = usize::try_from(end).map_err(|_| out_of_range)?;
    let bytes = pages.get(start..end).ok_or(out_of_range)?;
    Ok(PageList {
        repr: PagesRepr::Wire {
            first: first_index,
            bytes,
        },
    })
}

fn invalid(field: &'static str, value: u64) -> DecodeError {
    DecodeError::InvalidValue { field, value }
}

fn require_perms(perms: Perms) -> Result<(), DecodeError> {
    if perms.is_empty() {
        Err(invalid("op.perms", 0))
    } else {
        Ok(())
    }
}

fn require_zero(field: &'static str, value: u64) -> Result<(), DecodeError> {
    if value == 0 {
        Ok(())
    } else {
        Err(invalid(field, value))
    }
}

/// Writes `op` at byte `at` of `buf`; a `MapPages` op's pages start at entry
/// `first_page` of the page array.
fn write_op(buf: &mut [u8], at: usize, op: &BindOp<'_>, first_page: usize) {
    let (kind, perms, va, size, resource, offset) = match *op {
        BindOp::MapResource {
            va,
            size,
            perms,
            resource,
            offset,
        } => (kind::MAP_RESOURCE, perms, va, size, resource.0, offset),
        BindOp::MapPages { va, perms, pages } => (
            kind::MAP_PAGES,
            perms,
            va,
            pages.size(),
            0,
            first_page as u64,
        ),
        BindOp::Unmap { va, size } => (kind::UNMAP, Perms::NONE, va, size, 0, 0),
    };
    put_u32(buf, at, kind);
    put_u32(buf, at.saturating_add(4), perms.bits());
    put_u64(buf, at.saturating_add(8), va.raw());
    put_u64(buf, at.saturating_add(16), size);
    put_u32(buf, at.saturating_add(24), resource);
    put_u64(buf, at.saturating_add(32), offset);
}
