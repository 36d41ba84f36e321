//! virtio-gpu control messages on the wire (virtio spec 5.7.6).
//!
//! Requests are parsed from the bytes the guest put in the readable part of
//! a descriptor chain, with every field read through a bounds-checked
//! cursor: a short request is an error, never a panic.

/// Command and response types.
pub mod cmd {
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    pub const RESOURCE_UNREF: u32 = 0x0102;
    pub const SET_SCANOUT: u32 = 0x0103;
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    pub const RESOURCE_DETACH_BACKING: u32 = 0x0107;
    pub const GET_CAPSET_INFO: u32 = 0x0108;
    pub const GET_CAPSET: u32 = 0x0109;
    pub const GET_EDID: u32 = 0x010a;
    pub const RESOURCE_CREATE_BLOB: u32 = 0x010c;
    pub const SET_SCANOUT_BLOB: u32 = 0x010d;
    pub const CTX_CREATE: u32 = 0x0200;
    pub const CTX_DESTROY: u32 = 0x0201;
    pub const CTX_ATTACH_RESOURCE: u32 = 0x0202;
    pub const CTX_DETACH_RESOURCE: u32 = 0x0203;
    pub const RESOURCE_CREATE_3D: u32 = 0x0204;
    pub const TRANSFER_TO_HOST_3D: u32 = 0x0205;
    pub const TRANSFER_FROM_HOST_3D: u32 = 0x0206;
    pub const SUBMIT_3D: u32 = 0x0207;
    pub const RESOURCE_MAP_BLOB: u32 = 0x0208;
    pub const RESOURCE_UNMAP_BLOB: u32 = 0x0209;
    pub const UPDATE_CURSOR: u32 = 0x0300;
    pub const MOVE_CURSOR: u32 = 0x0301;
}

/// Response types.
pub mod resp {
    pub const OK_NODATA: u32 = 0x1100;
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    pub const OK_CAPSET_INFO: u32 = 0x1102;
    pub const OK_CAPSET: u32 = 0x1103;
    pub const OK_EDID: u32 = 0x1104;
    pub const ERR_UNSPEC: u32 = 0x1200;
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    pub const ERR_INVALID_CONTEXT_ID: u32 = 0x1204;
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;
}

/// `VIRTIO_GPU_FLAG_FENCE`.
pub const FLAG_FENCE: u32 = 1;
/// `VIRTIO_GPU_FLAG_INFO_RING_IDX`.
pub const FLAG_INFO_RING_IDX: u32 = 2;
/// Size of `virtio_gpu_ctrl_hdr`.
pub const HDR_SIZE: usize = 24;

/// `virtio_gpu_ctrl_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlHdr {
    /// Command or response type.
    pub type_: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Fence id, with `FLAG_FENCE`.
    pub fence_id: u64,
    /// Context id (3D commands).
    pub ctx_id: u32,
    /// Ring index, with `FLAG_INFO_RING_IDX`.
    pub ring_idx: u8,
}

impl CtrlHdr {
    /// Parses the header at the start of `r`.
    pub fn parse(r: &mut Cursor<'_>) -> Option<CtrlHdr> {
        let hdr = CtrlHdr {
            type_: r.u32()?,
            flags: r.u32()?,
            fence_id: r.u64()?,
            ctx_id: r.u32()?,
            ring_idx: r.u8()?,
        };
        r.skip(3)?;
        Some(hdr)
    }

    /// The response header to a request with this header.
    pub fn response(&self, type_: u32) -> CtrlHdr {
        CtrlHdr {
            type_,
            flags: self.flags & (FLAG_FENCE | FLAG_INFO_RING_IDX),
            fence_id: self.fence_id,
            ctx_id: self.ctx_id,
            ring_idx: self.ring_idx,
        }
    }

    /// Appends the wire form.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.type_.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.fence_id.to_le_bytes());
        out.extend_from_slice(&self.ctx_id.to_le_bytes());
        out.push(self.ring_idx);
        out.extend_from_slice(&[0; 3]);
    }
}

/// A bounds-checked little-endian reader.
#[derive(Debug)]
pub struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    /// Reads from the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Cursor<'a> {
        Cursor { bytes, at: 0 }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    /// A `u8`.
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|b| b.first().copied())
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
}

/// `virtio_gpu_rect`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    /// Parses a rectangle.
    pub fn parse(r: &mut Cursor<'_>) -> Option<Rect> {
        Some(Rect {
            x: r.u32()?,
            y: r.u32()?,
            width: r.u32()?,
            height: r.u32()?,
        })
    }

    /// Whether the rectangle lies inside a `width` x `height` image.
    pub fn inside(&self, width: u32, height: u32) -> bool {
        self.x.checked_add(self.width).is_some_and(|r| r <= width)
            && self.y.checked_add(self.height).is_some_and(|b| b <= height)
    }

    /// Appends the wire form.
    pub fn write(&self, out: &mut Vec<u8>) {
        for v in [self.x, self.y, self.width, self.height] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_short_input() {
        let h = CtrlHdr {
            type_: cmd::SUBMIT_3D,
            flags: FLAG_FENCE | FLAG_INFO_RING_IDX | 0x80,
            fence_id: 9,
            ctx_id: 3,
            ring_idx: 1,
        };
        let mut out = Vec::new();
        h.write(&mut out);
        assert_eq!(out.len(), HDR_SIZE);
        assert_eq!(CtrlHdr::parse(&mut Cursor::new(&out)), Some(h));
        let r = h.response(resp::OK_NODATA);
        assert_eq!(r.flags, FLAG_FENCE | FLAG_INFO_RING_IDX);
        assert_eq!(CtrlHdr::parse(&mut Cursor::new(&out[..23])), None);
    }

    #[test]
    fn rects_are_checked_without_overflow() {
        let r = Rect {
            x: u32::MAX,
            y: 0,
            width: 2,
            height: 1,
        };
        assert!(!r.inside(100, 100));
        assert!(
            Rect {
                x: 10,
                y: 10,
                width: 90,
                height: 90
            }
            .inside(100, 100)
        );
        assert!(
            !Rect {
                x: 10,
                y: 10,
                width: 91,
                height: 90
            }
            .inside(100, 100)
        );
    }
}
