//! Why bytes were refused, and which protocol status says so.
//!
//! Every decoder in this crate returns a [`DecodeError`]; every variant maps
//! to exactly one [`Status`] through [`DecodeError::status`], so the device
//! answers a bad request with the status `docs/protocol.md` section 4.3
//! prescribes without a second table of its own. The variants carry the
//! offending field's name and value, for logs.
//!
//! [`FramingError`] is kept apart because it is not about one request: a
//! request stream whose framing is lost cannot be read any further
//! (section 3.3), while any other error skips one request only.

use crate::status::Status;

/// Why the request stream of a `SUBMIT_3D` cannot be split any further.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum FramingError {
    /// Fewer bytes are left in the payload than a request header needs.
    #[error("{remaining} trailing bytes cannot hold a request header")]
    TruncatedHeader {
        /// Bytes left in the payload.
        remaining: usize,
    },
    /// The header's `len` is smaller than the header itself.
    #[error("request length {len} is shorter than the request header")]
    LenTooSmall {
        /// The header's `len`.
        len: u32,
    },
    /// The header's `len` is not a multiple of 8.
    #[error("request length {len} is not a multiple of 8")]
    LenMisaligned {
        /// The header's `len`.
        len: u32,
    },
    /// The header's `len` runs past the end of the payload.
    #[error("request length {len} runs past the {remaining} bytes left in the payload")]
    LenPastEnd {
        /// The header's `len`.
        len: u32,
        /// Bytes left in the payload, header included.
        remaining: usize,
    },
}

impl FramingError {
    /// The status of the reply to the request that lost the framing.
    pub const fn status(&self) -> Status {
        Status::Malformed
    }
}

/// Why a request, reply, capset or ring record was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end before a structure of known size does.
    #[error("{actual} bytes is too short, {needed} needed")]
    TooShort {
        /// Bytes the structure needs.
        needed: usize,
        /// Bytes there are.
        actual: usize,
    },
    /// A fixed-size structure has the wrong length.
    #[error("length {actual} is wrong, must be {expected}")]
    WrongLength {
        /// The length the structure has.
        expected: usize,
        /// The length that was given.
        actual: usize,
    },
    /// The request's header cannot be framed (section 3.3).
    #[error("framing lost: {0}")]
    Framing(#[from] FramingError),
    /// The request's `cmd` is not defined.
    #[error("unknown command {0:#x}")]
    UnknownCommand(u32),
    /// A major protocol version this implementation does not speak.
    #[error("unsupported major version {major}")]
    UnsupportedVersion {
        /// The major version that was sent.
        major: u16,
    },
    /// The capset payload does not start with the protocol's magic.
    #[error("bad capset magic {0:#x}")]
    BadMagic(u32),
    /// A reserved field is not zero.
    #[error("reserved field {field} is not zero")]
    ReservedNotZero {
        /// Which field.
        field: &'static str,
    },
    /// An address, size or offset that must be aligned is not.
    #[error("{field} {value:#x} is misaligned")]
    Misaligned {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A size or count that must be positive is zero.
    #[error("{field} is zero")]
    Zero {
        /// Which field.
        field: &'static str,
    },
    /// A count is larger than the protocol or the device allows.
    #[error("{field} {count} exceeds the limit {max}")]
    CountTooLarge {
        /// Which count.
        field: &'static str,
        /// Its value.
        count: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// A request's length does not match the counts in it.
    #[error("{field} {count} needs a request of {expected_len} bytes, got {len}")]
    CountMismatch {
        /// The count that fixes the length.
        field: &'static str,
        /// Its value.
        count: u32,
        /// The length the counts imply.
        expected_len: u64,
        /// The request's length.
        len: usize,
    },
    /// `start + size` wraps around 2^64.
    #[error("{field} wraps around the 64-bit space")]
    Overflow {
        /// Which range.
        field: &'static str,
    },
    /// A range runs past the end of the array or region it indexes.
    #[error("{field} is out of range")]
    OutOfRange {
        /// Which range.
        field: &'static str,
    },
    /// A field holds a value outside its domain.
    #[error("{field} has the invalid value {value:#x}")]
    InvalidValue {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// An attribute type appears twice in one `RANGE_ATTR`.
    #[error("attribute type {attr_type} is given twice")]
    DuplicateAttribute {
        /// The attribute type.
        attr_type: u32,
    },
    /// Two session regions share bytes.
    #[error("regions {first} and {second} overlap")]
    Overlap {
        /// One region.
        first: &'static str,
        /// The other region.
        second: &'static str,
    },
    /// A kernel's argument block is invalid (section 10).
    #[error("kernel arguments: {0}")]
    Kernel(#[from] KernelArgError),
}

impl DecodeError {
    /// The status the device replies with when a request fails this way.
    pub const fn status(&self) -> Status {
        match self {
            DecodeError::TooShort { .. }
            | DecodeError::WrongLength { .. }
            | DecodeError::Framing(_)
            | DecodeError::ReservedNotZero { .. }
            | DecodeError::CountMismatch { .. } => Status::Malformed,
            DecodeError::UnknownCommand(_) => Status::UnknownCommand,
            DecodeError::UnsupportedVersion { .. } | DecodeError::BadMagic(_) => Status::Version,
            DecodeError::Misaligned { .. } => Status::Misaligned,
            DecodeError::Zero { .. }
            | DecodeError::CountTooLarge { .. }
            | DecodeError::InvalidValue { .. }
            | DecodeError::DuplicateAttribute { .. }
            | DecodeError::Overlap { .. } => Status::InvalidArgument,
            DecodeError::Overflow { .. } | DecodeError::OutOfRange { .. } => Status::OutOfRange,
            DecodeError::Kernel(KernelArgError::Misaligned(_)) => Status::Misaligned,
            DecodeError::Kernel(KernelArgError::BadCount(_) | KernelArgError::Overlap(_)) => {
                Status::InvalidArgument
            }
            DecodeError::Kernel(KernelArgError::Overflow(_)) => Status::OutOfRange,
        }
    }
}

/// Why a request could not be encoded.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum EncodeError {
    /// The device would refuse the request; nothing was written.
    #[error("the request is invalid: {0}")]
    Invalid(#[from] DecodeError),
    /// The request, or the stream with it, would exceed the size limit.
    #[error("{len} bytes exceed the limit of {max} bytes")]
    TooLarge {
        /// The size it would have.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The reply area has no room for this request's reply.
    #[error("the reply needs {needed} bytes, {left} are left in the reply area")]
    ReplyAreaFull {
        /// Bytes the reply needs.
        needed: u32,
        /// Bytes left.
        left: u32,
    },
}

/// Why a kernel's arguments were refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum KernelArgError {
    /// An address is not aligned to the element size.
    #[error("argument {0} is misaligned")]
    Misaligned(&'static str),
    /// A count is zero where work is required, or above
    /// [`crate::kernel::MAX_DISPATCH_ELEMENTS`].
    #[error("argument {0} is out of range")]
    BadCount(&'static str),
    /// An array would run past the end of the 64-bit address space.
    #[error("array {0} wraps around the address space")]
    Overflow(&'static str),
    /// Two arrays that must be disjoint share bytes.
    #[error("array {0} overlaps another argument array")]
    Overlap(&'static str),
}
