//! Building a request stream on the guest side.
//!
//! A guest batches requests into one `SUBMIT_3D` (a bind followed by the
//! fault reply it enables is the normal case), gives each a seqno and a
//! reply slot, and later polls the slots. [`RequestWriter`] does the
//! bookkeeping: it appends correctly framed requests, hands out increasing
//! seqnos (never 0, so a zero-filled reply slot never looks answered) and
//! consecutive 8-byte-aligned reply slots from a reply area, and refuses,
//! writing nothing, any request the device's decoder would refuse.

use alloc::vec::Vec;
use core::ops::Range;

use crate::capset::DEFAULT_MAX_REQUEST_BYTES;
use crate::command::{DecodeLimits, Request};
use crate::error::{DecodeError, EncodeError};
use crate::header::{NO_REPLY, REQUEST_ALIGN};
use crate::opcode::Command;

/// What the guest needs to find the answer to a request it queued.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Ticket {
    /// The request's command.
    pub cmd: Command,
    /// The seqno the reply will carry.
    pub seqno: u32,
    /// Where the reply goes, or `None` for a request without reply.
    pub reply_off: Option<u32>,
    /// Length of the reply.
    pub reply_len: u32,
}

/// Appends requests to a `SUBMIT_3D` payload.
#[derive(Clone, Debug)]
pub struct RequestWriter {
    buf: Vec<u8>,
    next_seqno: u32,
    reply_next: u32,
    reply_end: u32,
    max_bytes: usize,
    limits: DecodeLimits,
    reply_flag: u32,
}

impl RequestWriter {
    /// A writer whose replies go into `reply_area` (offsets in the reply
    /// buffer; the start is rounded up to a multiple of 8). Seqnos start at
    /// 1; the payload is limited to the default `max_request_bytes`.
    pub fn new(reply_area: Range<u32>) -> RequestWriter {
        let mut w = RequestWriter {
            buf: Vec::new(),
            next_seqno: 1,
            reply_next: 0,
            reply_end: 0,
            max_bytes: DEFAULT_MAX_REQUEST_BYTES as usize,
            limits: DecodeLimits::PROTOCOL,
            reply_flag: 0,
        };
        w.set_reply_area(reply_area);
        w
    }

    /// Starts the seqnos at `seqno` (0 is skipped).
    pub fn with_first_seqno(mut self, seqno: u32) -> RequestWriter {
        self.next_seqno = seqno.max(1);
        self
    }

    /// Limits the payload to `max_bytes` (the capset's `max_request_bytes`).
    pub fn with_max_bytes(mut self, max_bytes: usize) -> RequestWriter {
        self.max_bytes = max_bytes;
        self
    }

    /// Checks requests against the device's limits too.
    pub fn with_limits(mut self, limits: DecodeLimits) -> RequestWriter {
        self.limits = limits;
        self
    }

    /// ORs `flag` into every `reply_off` written ([`crate::svm::KERNEL_REPLY`]
    /// for a guest kernel whose replies go into its kernel reply region);
    /// tickets keep the plain offset in the area. The area must then end
    /// below `flag`.
    pub fn with_reply_flag(mut self, flag: u32) -> RequestWriter {
        self.reply_flag = flag;
        self
    }

    /// Empties the payload and takes a fresh reply area; seqnos keep
    /// increasing.
    pub fn reset(&mut self, reply_area: Range<u32>) {
        self.buf.clear();
        self.set_reply_area(reply_area);
    }

    fn set_reply_area(&mut self, area: Range<u32>) {
        let align = REQUEST_ALIGN as u32;
        let start = area
            .start
            .checked_next_multiple_of(align)
            .unwrap_or(area.end);
        self.reply_next = start.min(area.end);
        self.reply_end = area.end;
    }

    /// Appends `request` with a reply slot (none for `EVENT_ARM`).
    pub fn push(&mut self, request: &Request<'_>) -> Result<Ticket, EncodeError> {
        let want_reply = request.command().has_reply();
        self.append(request, want_reply)
    }

    /// Appends `request` with `reply_off = NO_REPLY`.
    pub fn push_no_reply(&mut self, request: &Request<'_>) -> Result<Ticket, EncodeError> {
        self.append(request, false)
    }

    fn append(&mut self, request: &Request<'_>, want_reply: bool) -> Result<Ticket, EncodeError> {
        let cmd = request.command();
        let reply_len = cmd.reply_len();
        let len = request.encoded_len()?;
        let total = self.buf.len().saturating_add(len as usize);
        if total > self.max_bytes {
            return Err(EncodeError::TooLarge {
                len: total as u64,
                max: self.max_bytes as u64,
            });
        }
        let reply_off = if want_reply {
            let left = self.reply_end.saturating_sub(self.reply_next);
            if left < reply_len {
                return Err(EncodeError::ReplyAreaFull {
                    needed: reply_len,
                    left,
                });
            }
            Some(self.reply_next)
        } else {
            None
        };
        let seqno = self.next_seqno;
        let start = self.buf.len();
        let wire_off = reply_off.map_or(NO_REPLY, |off| off | self.reply_flag);
        request.encode(seqno, wire_off, &mut self.buf)?;
        if let Err(e) = self.check_appended(start) {
            self.buf.truncate(start);
            return Err(EncodeError::Invalid(e));
        }
        self.next_seqno = match seqno.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        if reply_off.is_some() {
            // All reply lengths are multiples of 8: the next slot stays aligned.
            self.reply_next = self.reply_next.saturating_add(reply_len);
        }
        Ok(Ticket {
            cmd,
            seqno,
            reply_off,
            reply_len,
        })
    }

    /// Decodes the request appended at `start` the way the device will,
    /// including every op of a `VM_BIND` (which the device decodes lazily).
    fn check_appended(&self, start: usize) -> Result<(), DecodeError> {
        let written = self.buf.get(start..).unwrap_or_default();
        if let Request::VmBind(bind) = Request::decode_with(written, &self.limits)? {
            for op in bind.ops() {
                op?;
            }
        }
        Ok(())
    }

    /// The payload so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Length of the payload so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no request was appended.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The seqno the next request will get.
    pub const fn next_seqno(&self) -> u32 {
        self.next_seqno
    }

    /// Bytes left in the reply area.
    pub const fn reply_space(&self) -> u32 {
        self.reply_end.saturating_sub(self.reply_next)
    }

    /// The payload, ending the writer.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}
