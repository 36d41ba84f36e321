//! Helpers shared by the integration tests: bytes written at the offsets of
//! the `docs/protocol.md` tables, independently of the crate's encoders.
#![allow(dead_code)]

pub fn w8(b: &mut [u8], off: usize, v: u8) {
    b[off] = v;
}

pub fn w16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

pub fn w32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn w64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// A zeroed request of `len` bytes with its header filled in.
pub fn request(cmd: u32, len: usize, seqno: u32, reply_off: u32) -> Vec<u8> {
    let mut b = vec![0u8; len];
    w32(&mut b, 0, cmd);
    w32(&mut b, 4, len as u32);
    w32(&mut b, 8, seqno);
    w32(&mut b, 12, reply_off);
    b
}

/// A region descriptor (5.1) at `off`.
pub fn region(b: &mut [u8], off: usize, resource: u32, offset: u64, size: u64) {
    w32(b, off, resource);
    w64(b, off + 8, offset);
    w64(b, off + 16, size);
}

/// A valid compat `SESSION_INIT`: reply 4 KiB at 0, a 16-record fault ring
/// at 4096, 4 signal slots at 8192, all in resource 5.
pub fn session_init_bytes() -> Vec<u8> {
    let mut b = request(0x0001, 104, 1, 0);
    w16(&mut b, 16, 1);
    w32(&mut b, 20, 1);
    region(&mut b, 32, 5, 0, 4096);
    region(&mut b, 56, 5, 4096, 128 + 32 * 16);
    region(&mut b, 80, 5, 8192, 128);
    b
}

/// One bind op (40 bytes) at `off`.
#[allow(clippy::too_many_arguments)]
pub fn bind_op(
    b: &mut [u8],
    off: usize,
    kind: u32,
    perms: u32,
    va: u64,
    size: u64,
    resource: u32,
    offset: u64,
) {
    w32(b, off, kind);
    w32(b, off + 4, perms);
    w64(b, off + 8, va);
    w64(b, off + 16, size);
    w32(b, off + 24, resource);
    w64(b, off + 32, offset);
}

/// A `VM_BIND` with `ops` ops and `pages` page entries, all zero.
pub fn vm_bind_bytes(ops: usize, pages: usize) -> Vec<u8> {
    let mut b = request(0x0010, 24 + 40 * ops + 8 * pages, 1, 0);
    w32(&mut b, 16, ops as u32);
    w32(&mut b, 20, pages as u32);
    b
}

/// A valid `VM_BIND`: one `MAP_PAGES` op of two pages at 0x10000.
pub fn map_pages_bytes() -> Vec<u8> {
    let mut b = vm_bind_bytes(1, 2);
    bind_op(&mut b, 24, 2, 3, 0x10000, 0x2000, 0, 0);
    w64(&mut b, 64, 0xA000);
    w64(&mut b, 72, 0xB000);
    b
}

/// A valid `FILL` dispatch.
pub fn dispatch_fill_bytes() -> Vec<u8> {
    let mut b = request(0x0022, 64, 1, 0);
    w32(&mut b, 16, 0);
    w32(&mut b, 20, 1);
    w32(&mut b, 24, 0);
    w64(&mut b, 32, 1);
    w64(&mut b, 40, 0x10000);
    w64(&mut b, 48, 16);
    w32(&mut b, 56, 0xFEED);
    b
}
