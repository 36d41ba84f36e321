//! The kernel set the device runs.
//!
//! A real GPU runs arbitrary shader code; the simulated GPU runs a fixed set
//! of kernels that between them exercise every access pattern the memory
//! model has to get right: streaming writes (fill), streaming reads and
//! writes on two ranges (copy), atomics from many compute units (atomic add),
//! floating point read-modify-write (saxpy), data-dependent addresses
//! (gather) and a serial chain of dependent loads across pages (pointer
//! chase). `docs/protocol.md` gives their wire layouts.

use crate::types::GpuVa;

/// Wire ids of the kernels (the `kernel` field of a DISPATCH request).
pub mod id {
    /// [`super::Kernel::Fill`]
    pub const FILL: u32 = 1;
    /// [`super::Kernel::Copy`]
    pub const COPY: u32 = 2;
    /// [`super::Kernel::AtomicAdd`]
    pub const ATOMIC_ADD: u32 = 3;
    /// [`super::Kernel::Saxpy`]
    pub const SAXPY: u32 = 4;
    /// [`super::Kernel::Gather`]
    pub const GATHER: u32 = 5;
    /// [`super::Kernel::PointerChase`]
    pub const POINTER_CHASE: u32 = 6;
}

/// Bit `1 << id` for every kernel the simulated GPU runs (the capset's
/// `kernels` field).
pub const ALL_KERNELS_MASK: u64 = (1 << id::FILL)
    | (1 << id::COPY)
    | (1 << id::ATOMIC_ADD)
    | (1 << id::SAXPY)
    | (1 << id::GATHER)
    | (1 << id::POINTER_CHASE);

/// Size in bytes of one node of the list that [`Kernel::PointerChase`]
/// follows: `{ next: u64 (GPU VA, 0 ends the list), value: u64 }`.
pub const CHASE_NODE_SIZE: u64 = 16;

/// Size in bytes of the result [`Kernel::PointerChase`] writes:
/// `{ sum: u64, steps: u64 }`.
pub const CHASE_RESULT_SIZE: u64 = 16;

/// The most elements (or bytes, for copy) one dispatch may cover.
pub const MAX_DISPATCH_ELEMENTS: u64 = 1 << 36;

/// One kernel launch with its arguments, already validated.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kernel {
    /// `dst[i] = value` for `i in 0..count`, on `u32` elements.
    Fill {
        /// First element; 4-byte aligned.
        dst: GpuVa,
        /// Number of `u32` elements.
        count: u64,
        /// The value stored.
        value: u32,
    },
    /// Copies `size` bytes from `src` to `dst` (ranges must not overlap).
    Copy {
        /// Destination.
        dst: GpuVa,
        /// Source.
        src: GpuVa,
        /// Bytes to copy.
        size: u64,
    },
    /// `counters[i % num_counters] += addend` atomically, for `i in 0..items`.
    AtomicAdd {
        /// Array of `u64` counters; 8-byte aligned.
        counters: GpuVa,
        /// Number of counters, at least 1.
        num_counters: u32,
        /// Number of work items.
        items: u64,
        /// Value added by every work item.
        addend: u64,
    },
    /// `y[i] = a * x[i] + y[i]` on `f32`, for `i in 0..count`.
    Saxpy {
        /// Input vector; 4-byte aligned.
        x: GpuVa,
        /// Input and output vector; 4-byte aligned.
        y: GpuVa,
        /// Number of elements.
        count: u64,
        /// The scale factor.
        a: f32,
    },
    /// `dst[i] = src[indices[i]]` on `u32` elements and `u32` indices.
    Gather {
        /// Output; 4-byte aligned.
        dst: GpuVa,
        /// Table read through the indices; 4-byte aligned.
        src: GpuVa,
        /// Index array; 4-byte aligned.
        indices: GpuVa,
        /// Number of elements.
        count: u64,
    },
    /// Follows a linked list of 16-byte nodes `{ next, value }` from `head`
    /// for at most `max_steps` nodes (stopping at `next == 0`), summing the
    /// values, and writes `{ sum, steps }` to `result`. One work item.
    PointerChase {
        /// First node; 8-byte aligned. 0 means an empty list.
        head: GpuVa,
        /// Upper bound on the nodes visited (cycles end here).
        max_steps: u64,
        /// Where `{ sum: u64, steps: u64 }` goes; 8-byte aligned.
        result: GpuVa,
    },
}

/// Why a kernel's arguments were refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum KernelArgError {
    /// An address is not aligned to the element size.
    #[error("argument {0} is misaligned")]
    Misaligned(&'static str),
    /// A count is zero where work is required, or above
    /// [`MAX_DISPATCH_ELEMENTS`].
    #[error("argument {0} is out of range")]
    BadCount(&'static str),
    /// An array would run past the end of the 64-bit address space.
    #[error("array {0} wraps around the address space")]
    Overflow(&'static str),
}

impl Kernel {
    /// The wire id of this kernel.
    pub const fn id(&self) -> u32 {
        match self {
            Kernel::Fill { .. } => id::FILL,
            Kernel::Copy { .. } => id::COPY,
            Kernel::AtomicAdd { .. } => id::ATOMIC_ADD,
            Kernel::Saxpy { .. } => id::SAXPY,
            Kernel::Gather { .. } => id::GATHER,
            Kernel::PointerChase { .. } => id::POINTER_CHASE,
        }
    }

    /// Checks alignment, counts and that every array fits in the address
    /// space. A kernel that passes can be executed without any overflowing
    /// address arithmetic.
    pub fn validate(&self) -> Result<(), KernelArgError> {
        match *self {
            Kernel::Fill { dst, count, .. } => {
                check_count("count", count)?;
                check_array("dst", dst, count, 4)
            }
            Kernel::Copy { dst, src, size } => {
                check_count("size", size)?;
                check_array("dst", dst, size, 1)?;
                check_array("src", src, size, 1)
            }
            Kernel::AtomicAdd {
                counters,
                num_counters,
                items,
                ..
            } => {
                if num_counters == 0 {
                    return Err(KernelArgError::BadCount("num_counters"));
                }
                check_count("items", items)?;
                check_array("counters", counters, u64::from(num_counters), 8)
            }
            Kernel::Saxpy { x, y, count, .. } => {
                check_count("count", count)?;
                check_array("x", x, count, 4)?;
                check_array("y", y, count, 4)
            }
            Kernel::Gather {
                dst,
                src,
                indices,
                count,
            } => {
                check_count("count", count)?;
                check_array("dst", dst, count, 4)?;
                check_array("indices", indices, count, 4)?;
                // Every index is a u32, so the table spans at most 2^32 elements.
                check_array("src", src, 1 << 32, 4)
            }
            Kernel::PointerChase {
                head,
                max_steps,
                result,
            } => {
                if max_steps > MAX_DISPATCH_ELEMENTS {
                    return Err(KernelArgError::BadCount("max_steps"));
                }
                if head.raw() % 8 != 0 {
                    return Err(KernelArgError::Misaligned("head"));
                }
                check_array("result", result, CHASE_RESULT_SIZE / 8, 8)
            }
        }
    }
}

fn check_count(name: &'static str, count: u64) -> Result<(), KernelArgError> {
    if count == 0 || count > MAX_DISPATCH_ELEMENTS {
        Err(KernelArgError::BadCount(name))
    } else {
        Ok(())
    }
}

fn check_array(
    name: &'static str,
    base: GpuVa,
    elements: u64,
    elem_size: u64,
) -> Result<(), KernelArgError> {
    if base.raw() % elem_size != 0 {
        return Err(KernelArgError::Misaligned(name));
    }
    elements
        .checked_mul(elem_size)
        .and_then(|len| base.checked_add(len))
        .map(|_| ())
        .ok_or(KernelArgError::Overflow(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rejects_bad_arguments() {
        let fill = |dst, count| Kernel::Fill {
            dst: GpuVa(dst),
            count,
            value: 0,
        };
        assert_eq!(fill(0x1000, 16).validate(), Ok(()));
        assert_eq!(
            fill(0x1002, 16).validate(),
            Err(KernelArgError::Misaligned("dst"))
        );
        assert_eq!(
            fill(0x1000, 0).validate(),
            Err(KernelArgError::BadCount("count"))
        );
        assert_eq!(
            fill(u64::MAX - 7, 4).validate(),
            Err(KernelArgError::Overflow("dst"))
        );
        let add = Kernel::AtomicAdd {
            counters: GpuVa(0x1000),
            num_counters: 0,
            items: 1,
            addend: 1,
        };
        assert_eq!(
            add.validate(),
            Err(KernelArgError::BadCount("num_counters"))
        );
    }

    #[test]
    fn ids_are_distinct_and_in_the_mask() {
        let kernels = [
            Kernel::Fill {
                dst: GpuVa(0),
                count: 1,
                value: 0,
            },
            Kernel::Copy {
                dst: GpuVa(0),
                src: GpuVa(8),
                size: 1,
            },
            Kernel::AtomicAdd {
                counters: GpuVa(0),
                num_counters: 1,
                items: 1,
                addend: 1,
            },
            Kernel::Saxpy {
                x: GpuVa(0),
                y: GpuVa(8),
                count: 1,
                a: 1.0,
            },
            Kernel::Gather {
                dst: GpuVa(0),
                src: GpuVa(8),
                indices: GpuVa(16),
                count: 1,
            },
            Kernel::PointerChase {
                head: GpuVa(0),
                max_steps: 1,
                result: GpuVa(8),
            },
        ];
        let mut seen = 0u64;
        for k in kernels {
            let bit = 1u64 << k.id();
            assert_eq!(seen & bit, 0);
            seen |= bit;
        }
        assert_eq!(seen, ALL_KERNELS_MASK);
    }
}
