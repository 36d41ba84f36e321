//! Request and reply headers, and where a reply goes.
//!
//! Every request starts with a 16-byte header that frames it in the
//! `SUBMIT_3D` payload (`len`) and tells the device where to put the answer
//! (`reply_off` into the session's reply buffer). Replies are written into
//! guest memory, not returned through virtio: Linux does not report
//! `SUBMIT_3D` errors to user space, and in the compat profile fences cannot
//! be held, so a reply slot the guest polls is the only reliable channel.
//! `docs/protocol.md` section 4.

use crate::error::{DecodeError, FramingError};
use crate::opcode::{Command, reply_len};
use crate::status::Status;
use crate::wire::{put_u32, u32_at};

/// Size of a request header.
pub const REQUEST_HEADER_SIZE: usize = 16;
/// Size of a reply header.
pub const REPLY_HEADER_SIZE: usize = 16;
/// Requests start on multiples of this and their lengths are multiples of it;
/// `reply_off` must be a multiple of it too.
pub const REQUEST_ALIGN: usize = 8;
/// `reply_off` value meaning "execute, write no reply".
pub const NO_REPLY: u32 = 0xFFFF_FFFF;

/// The 16-byte header of a request (section 4.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RequestHeader {
    /// Command id; not necessarily a defined one.
    pub cmd: u32,
    /// Length of the whole request, header included.
    pub len: u32,
    /// Chosen by the guest, echoed in the reply.
    pub seqno: u32,
    /// Offset of the reply in the reply buffer, or [`NO_REPLY`].
    pub reply_off: u32,
}

impl RequestHeader {
    /// Reads the header at the start of `bytes`. Checks only that 16 bytes
    /// are there; [`RequestHeader::check_framing`] checks `len`.
    pub fn decode(bytes: &[u8]) -> Result<RequestHeader, DecodeError> {
        if bytes.len() < REQUEST_HEADER_SIZE {
            return Err(DecodeError::TooShort {
                needed: REQUEST_HEADER_SIZE,
                actual: bytes.len(),
            });
        }
        Ok(RequestHeader {
            cmd: u32_at(bytes, 0)?,
            len: u32_at(bytes, 4)?,
            seqno: u32_at(bytes, 8)?,
            reply_off: u32_at(bytes, 12)?,
        })
    }

    /// The wire form.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_SIZE] {
        let mut buf = [0u8; REQUEST_HEADER_SIZE];
        self.write(&mut buf);
        buf
    }

    /// Writes the header into the first 16 bytes of `buf`.
    pub(crate) fn write(&self, buf: &mut [u8]) {
        put_u32(buf, 0, self.cmd);
        put_u32(buf, 4, self.len);
        put_u32(buf, 8, self.seqno);
        put_u32(buf, 12, self.reply_off);
    }

    /// Checks that `len` frames a request in a payload that has `remaining`
    /// bytes left from this header on, and returns the request's length.
    /// An error here loses the framing of the whole stream (section 3.3).
    pub fn check_framing(&self, remaining: usize) -> Result<usize, FramingError> {
        let len = self.len;
        if (len as usize) < REQUEST_HEADER_SIZE {
            return Err(FramingError::LenTooSmall { len });
        }
        if !(len as usize).is_multiple_of(REQUEST_ALIGN) {
            return Err(FramingError::LenMisaligned { len });
        }
        if len as usize > remaining {
            return Err(FramingError::LenPastEnd { len, remaining });
        }
        Ok(len as usize)
    }

    /// The command, if `cmd` is defined.
    pub fn command(&self) -> Result<Command, DecodeError> {
        Command::from_u32(self.cmd).ok_or(DecodeError::UnknownCommand(self.cmd))
    }

    /// Where the reply to this request goes in a reply buffer of
    /// `buffer_size` bytes (section 4.2). A request whose reply has no valid
    /// place is not executed and counts as a lost reply.
    pub fn reply_slot(&self, buffer_size: u64) -> Result<ReplySlot, ReplyLost> {
        if self.reply_off == NO_REPLY {
            return Ok(ReplySlot::None);
        }
        let len = reply_len(self.cmd);
        let fits = u64::from(self.reply_off)
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= buffer_size);
        if !(self.reply_off as usize).is_multiple_of(REQUEST_ALIGN) || !fits {
            return Err(ReplyLost {
                reply_off: self.reply_off,
                len,
                buffer_size,
            });
        }
        Ok(ReplySlot::At {
            offset: self.reply_off,
            len,
        })
    }
}

/// Where a reply is written.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ReplySlot {
    /// The request asked for no reply (`reply_off = NO_REPLY`).
    None,
    /// The reply goes at `offset` in the reply buffer and is `len` bytes.
    At {
        /// Offset in the reply buffer; a multiple of 8.
        offset: u32,
        /// Length of the reply, header included.
        len: u32,
    },
}

/// A request's `reply_off` has no room for its reply: the request is not
/// executed and the session's `lost_replies` counter grows.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error(
    "reply of {len} bytes at offset {reply_off:#x} does not fit a reply buffer of {buffer_size} bytes"
)]
pub struct ReplyLost {
    /// The request's `reply_off`.
    pub reply_off: u32,
    /// Length of its reply.
    pub len: u32,
    /// Size of the reply buffer.
    pub buffer_size: u64,
}

/// The 16-byte header of a reply (section 4.2). The device writes `seqno`
/// last, with release ordering, so it is not part of the bytes written first;
/// see [`crate::reply::EncodedReply`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ReplyHeader {
    /// The request's `seqno`.
    pub seqno: u32,
    /// The outcome.
    pub status: Status,
    /// Length of the reply, header included.
    pub len: u32,
    /// The request's `cmd`.
    pub cmd: u32,
}

impl ReplyHeader {
    /// Reads a reply header; the status must be a defined one.
    pub fn decode(bytes: &[u8]) -> Result<ReplyHeader, DecodeError> {
        if bytes.len() < REPLY_HEADER_SIZE {
            return Err(DecodeError::TooShort {
                needed: REPLY_HEADER_SIZE,
                actual: bytes.len(),
            });
        }
        let raw_status = u32_at(bytes, 4)?;
        Ok(ReplyHeader {
            seqno: u32_at(bytes, 0)?,
            status: Status::from_u32(raw_status).ok_or(DecodeError::InvalidValue {
                field: "status",
                value: u64::from(raw_status),
            })?,
            len: u32_at(bytes, 8)?,
            cmd: u32_at(bytes, 12)?,
        })
    }

    /// Writes the header into the first 16 bytes of `buf`.
    pub(crate) fn write(&self, buf: &mut [u8]) {
        put_u32(buf, 0, self.seqno);
        put_u32(buf, 4, self.status.as_u32());
        put_u32(buf, 8, self.len);
        put_u32(buf, 12, self.cmd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_values_round_trip() {
        for v in 0..=17 {
            let s = Status::from_u32(v).unwrap();
            assert_eq!(s.as_u32(), v);
        }
        assert_eq!(Status::from_u32(18), None);
        assert_eq!(Status::Permission.name(), "ERR_PERMISSION");
        assert_eq!(Status::Unsupported.name(), "ERR_UNSUPPORTED");
    }

    #[test]
    fn request_header_layout() {
        let bytes = [
            0x10, 0, 0, 0, // cmd
            0x40, 0, 0, 0, // len
            7, 0, 0, 0, // seqno
            0x18, 0, 0, 0, // reply_off
        ];
        let h = RequestHeader::decode(&bytes).unwrap();
        assert_eq!(
            h,
            RequestHeader {
                cmd: 0x10,
                len: 0x40,
                seqno: 7,
                reply_off: 0x18
            }
        );
        assert_eq!(h.encode(), bytes);
    }

    #[test]
    fn framing_checks() {
        let h = |len| RequestHeader {
            cmd: 2,
            len,
            seqno: 0,
            reply_off: NO_REPLY,
        };
        assert_eq!(h(16).check_framing(16), Ok(16));
        assert_eq!(
            h(8).check_framing(16),
            Err(FramingError::LenTooSmall { len: 8 })
        );
        assert_eq!(
            h(20).check_framing(24),
            Err(FramingError::LenMisaligned { len: 20 })
        );
        assert_eq!(
            h(32).check_framing(24),
            Err(FramingError::LenPastEnd {
                len: 32,
                remaining: 24
            })
        );
        assert_eq!(
            h(0xFFFF_FFF8).check_framing(64),
            Err(FramingError::LenPastEnd {
                len: 0xFFFF_FFF8,
                remaining: 64
            })
        );
    }

    #[test]
    fn reply_slots() {
        // DEVICE_QUERY has an 80-byte reply.
        let h = |reply_off| RequestHeader {
            cmd: 3,
            len: 16,
            seqno: 1,
            reply_off,
        };
        assert_eq!(h(NO_REPLY).reply_slot(0), Ok(ReplySlot::None));
        assert_eq!(
            h(48).reply_slot(128),
            Ok(ReplySlot::At {
                offset: 48,
                len: 80
            })
        );
        assert_eq!(
            h(56).reply_slot(128),
            Err(ReplyLost {
                reply_off: 56,
                len: 80,
                buffer_size: 128
            })
        );
        assert!(h(4).reply_slot(128).is_err());
        assert!(h(NO_REPLY - 7).reply_slot(u64::MAX).is_ok());
        // An unknown command gets a header-only reply.
        let unknown = RequestHeader {
            cmd: 0x99,
            ..h(112)
        };
        assert_eq!(
            unknown.reply_slot(128),
            Ok(ReplySlot::At {
                offset: 112,
                len: 16
            })
        );
    }

    #[test]
    fn reply_header_layout() {
        let bytes = [
            9, 0, 0, 0, // seqno
            8, 0, 0, 0, // status
            32, 0, 0, 0, // len
            0x10, 0, 0, 0, // cmd
        ];
        let h = ReplyHeader::decode(&bytes).unwrap();
        assert_eq!(
            h,
            ReplyHeader {
                seqno: 9,
                status: Status::OutOfRange,
                len: 32,
                cmd: 0x10
            }
        );
        let mut out = [0u8; 16];
        h.write(&mut out);
        assert_eq!(out, bytes);
        let mut bad = bytes;
        bad[4] = 0x99;
        assert_eq!(
            ReplyHeader::decode(&bad),
            Err(DecodeError::InvalidValue {
                field: "status",
                value: 0x99
            })
        );
    }
}
