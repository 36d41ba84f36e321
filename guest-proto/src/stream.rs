//! Splitting a `SUBMIT_3D` payload into requests.
//!
//! The payload is a sequence of requests, each framed by its header's `len`.
//! `docs/protocol.md` 3.3 distinguishes two kinds of failure, and so does
//! [`RequestStream`]:
//!
//! - A header whose `len` cannot frame a request (shorter than a header,
//!   not a multiple of 8, past the end of the payload), or a payload tail
//!   too short to hold a header, **loses the framing**: nothing after it
//!   can be trusted to start a request. The iterator yields a
//!   [`FramingLost`] (with the header, if there was one, so the device can
//!   still write an `ERR_MALFORMED` reply) and then ends.
//! - A well-framed request whose contents are invalid is a [`Framed`]
//!   request whose [`Framed::decode`] fails; the stream goes on with the
//!   next request.
//!
//! The iterator never allocates and never reads outside the payload; the
//! work per request is bounded by the request's length.

use core::iter::FusedIterator;

use crate::command::{DecodeLimits, Request};
use crate::error::{DecodeError, FramingError};
use crate::header::RequestHeader;
use crate::status::Status;

/// Iterator over the requests of a `SUBMIT_3D` payload.
#[derive(Clone, Debug)]
pub struct RequestStream<'a> {
    payload: &'a [u8],
    offset: usize,
    limits: DecodeLimits,
    ended: bool,
}

impl<'a> RequestStream<'a> {
    /// A stream over `payload`, decoding with the protocol's own limits.
    pub const fn new(payload: &'a [u8]) -> RequestStream<'a> {
        RequestStream {
            payload,
            offset: 0,
            limits: DecodeLimits::PROTOCOL,
            ended: false,
        }
    }

    /// Decodes with the device's limits as well.
    pub const fn with_limits(mut self, limits: DecodeLimits) -> RequestStream<'a> {
        self.limits = limits;
        self
    }

    /// Offset of the next request in the payload.
    pub const fn offset(&self) -> usize {
        self.offset
    }
}

impl<'a> Iterator for RequestStream<'a> {
    type Item = Result<Framed<'a>, FramingLost>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        let rest = self.payload.get(self.offset..).unwrap_or_default();
        if rest.is_empty() {
            self.ended = true;
            return None;
        }
        let lost = |header, error| FramingLost {
            offset: self.offset,
            header,
            error,
        };
        let Ok(header) = RequestHeader::decode(rest) else {
            self.ended = true;
            return Some(Err(lost(
                None,
                FramingError::TruncatedHeader {
                    remaining: rest.len(),
                },
            )));
        };
        let len = match header.check_framing(rest.len()) {
            Ok(len) => len,
            Err(error) => {
                self.ended = true;
                return Some(Err(lost(Some(header), error)));
            }
        };
        let (bytes, _) = rest.split_at_checked(len)?;
        let framed = Framed {
            offset: self.offset,
            header,
            bytes,
            limits: self.limits,
        };
        self.offset = self.offset.saturating_add(len);
        Some(Ok(framed))
    }
}

impl FusedIterator for RequestStream<'_> {}

/// A well-framed request of a stream.
#[derive(Clone, Copy, Debug)]
pub struct Framed<'a> {
    /// Offset of the request in the payload.
    pub offset: usize,
    /// Its header; `len` is valid.
    pub header: RequestHeader,
    /// The whole request, header included.
    pub bytes: &'a [u8],
    limits: DecodeLimits,
}

impl<'a> Framed<'a> {
    /// Decodes the request. An error skips this request only: the device
    /// replies with [`DecodeError::status`] and goes on.
    pub fn decode(&self) -> Result<Request<'a>, DecodeError> {
        Request::decode_with(self.bytes, &self.limits)
    }
}

/// The stream's framing is lost at `offset`: nothing from here on is
/// processed and the `SUBMIT_3D` fails (section 3.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("request stream framing lost at offset {offset}: {error}")]
pub struct FramingLost {
    /// Offset in the payload of the request that broke the framing.
    pub offset: usize,
    /// Its header, when there were 16 bytes to read one: the device writes
    /// an `ERR_MALFORMED` reply to it if its `reply_off` is usable.
    pub header: Option<RequestHeader>,
    /// What was wrong.
    pub error: FramingError,
}

impl FramingLost {
    /// The status of the reply to the request that broke the framing.
    pub const fn status(&self) -> Status {
        self.error.status()
    }
}
