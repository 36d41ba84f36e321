//! Little-endian fields at fixed offsets.
//!
//! Every structure in `docs/protocol.md` is a table of `(offset, size,
//! field)`. The decoders and encoders in this crate read and write exactly
//! those offsets through the helpers here, so the code can be checked against
//! the tables line by line, and so no access can ever index out of bounds:
//! a read past the end is a [`DecodeError::TooShort`], a write past the end
//! of the caller's buffer writes nothing (encoders size their buffers from
//! the same tables, and the layout tests pin every offset).

use crate::error::DecodeError;

/// The `N` bytes at `off`, if `buf` holds them.
fn array_at<const N: usize>(buf: &[u8], off: usize) -> Result<[u8; N], DecodeError> {
    let too_short = DecodeError::TooShort {
        needed: off.saturating_add(N),
        actual: buf.len(),
    };
    let end = off.checked_add(N).ok_or(too_short)?;
    buf.get(off..end)
        .and_then(|field| <[u8; N]>::try_from(field).ok())
        .ok_or(too_short)
}

pub(crate) fn u8_at(buf: &[u8], off: usize) -> Result<u8, DecodeError> {
    array_at::<1>(buf, off).map(u8::from_le_bytes)
}

pub(crate) fn u16_at(buf: &[u8], off: usize) -> Result<u16, DecodeError> {
    array_at::<2>(buf, off).map(u16::from_le_bytes)
}

pub(crate) fn u32_at(buf: &[u8], off: usize) -> Result<u32, DecodeError> {
    array_at::<4>(buf, off).map(u32::from_le_bytes)
}

pub(crate) fn u64_at(buf: &[u8], off: usize) -> Result<u64, DecodeError> {
    array_at::<8>(buf, off).map(u64::from_le_bytes)
}

/// Fails with [`DecodeError::ReservedNotZero`] unless `size` bytes at `off`
/// are all zero.
pub(crate) fn reserved_at(
    buf: &[u8],
    off: usize,
    size: usize,
    field: &'static str,
) -> Result<(), DecodeError> {
    let too_short = DecodeError::TooShort {
        needed: off.saturating_add(size),
        actual: buf.len(),
    };
    let end = off.checked_add(size).ok_or(too_short)?;
    let bytes = buf.get(off..end).ok_or(too_short)?;
    if bytes.iter().all(|&b| b == 0) {
        Ok(())
    } else {
        Err(DecodeError::ReservedNotZero { field })
    }
}

fn put<const N: usize>(buf: &mut [u8], off: usize, bytes: [u8; N]) {
    if let Some(field) = off.checked_add(N).and_then(|end| buf.get_mut(off..end)) {
        field.copy_from_slice(&bytes);
    }
}

pub(crate) fn put_u8(buf: &mut [u8], off: usize, v: u8) {
    put(buf, off, v.to_le_bytes());
}

pub(crate) fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    put(buf, off, v.to_le_bytes());
}

pub(crate) fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    put(buf, off, v.to_le_bytes());
}

pub(crate) fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    put(buf, off, v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_little_endian_and_bounded() {
        let buf = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(u16_at(&buf, 0), Ok(0x0201));
        assert_eq!(u32_at(&buf, 1), Ok(0x0504_0302));
        assert_eq!(u64_at(&buf, 1), Ok(0x0908_0706_0504_0302));
        assert_eq!(
            u64_at(&buf, 2),
            Err(DecodeError::TooShort {
                needed: 10,
                actual: 9
            })
        );
        assert!(u8_at(&buf, usize::MAX).is_err());
        assert!(reserved_at(&buf, usize::MAX, 4, "r").is_err());
    }

    #[test]
    fn writes_past_the_end_write_nothing() {
        let mut buf = [0u8; 4];
        put_u64(&mut buf, 0, u64::MAX);
        assert_eq!(buf, [0; 4]);
        put_u16(&mut buf, 2, 0xBEEF);
        assert_eq!(buf, [0, 0, 0xEF, 0xBE]);
        put_u32(&mut buf, usize::MAX, 1);
        assert_eq!(buf, [0, 0, 0xEF, 0xBE]);
    }

    #[test]
    fn reserved_bytes_must_be_zero() {
        let buf = [0u8, 0, 1, 0];
        assert_eq!(reserved_at(&buf, 0, 2, "r"), Ok(()));
        assert_eq!(
            reserved_at(&buf, 0, 4, "r"),
            Err(DecodeError::ReservedNotZero { field: "r" })
        );
    }
}
