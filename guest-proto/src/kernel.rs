//! The kernel set the device runs.
//!
//! A real GPU runs arbitrary shader code; the simulated GPU runs a fixed set
//! of kernels that between them exercise every access pattern the memory
//! model has to get right: streaming writes (fill), streaming reads and
//! writes on two ranges (copy), atomics from many compute units (atomic add),
//! floating point read-modify-write (saxpy), data-dependent addresses
//! (gather) and a serial chain of dependent loads across pages (pointer
//! chase). `docs/protocol.md` section 10 gives their argument blocks,
//! which [`Kernel::decode_args`] and [`Kernel::write_args`] read and write.

use crate::error::{DecodeError, KernelArgError};
use crate::types::GpuVa;
use crate::wire::{put_u32, put_u64, reserved_at, u32_at, u64_at};

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

/// Size in bytes of each kernel's argument block (section 10).
pub mod args_len {
    /// `dst, count, value, reserved`
    pub const FILL: usize = 24;
    /// `dst, src, size`
    pub const COPY: usize = 24;
    /// `counters, items, addend, num_counters, reserved`
    pub const ATOMIC_ADD: usize = 32;
    /// `x, y, count, a, reserved`
    pub const SAXPY: usize = 32;
    /// `dst, src, indices, count`
    pub const GATHER: usize = 32;
    /// `head, max_steps, result`
    pub const POINTER_CHASE: usize = 24;
}

/// The size of the argument block of kernel `kernel_id`, or `None` for an
/// undefined kernel.
pub const fn args_len_of(kernel_id: u32) -> Option<usize> {
    match kernel_id {
        id::FILL => Some(args_len::FILL),
        id::COPY => Some(args_len::COPY),
        id::ATOMIC_ADD => Some(args_len::ATOMIC_ADD),
        id::SAXPY => Some(args_len::SAXPY),
        id::GATHER => Some(args_len::GATHER),
        id::POINTER_CHASE => Some(args_len::POINTER_CHASE),
        _ => None,
    }
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

    /// The size of this kernel's argument block.
    pub const fn args_len(&self) -> usize {
        match self {
            Kernel::Fill { .. } => args_len::FILL,
            Kernel::Copy { .. } => args_len::COPY,
            Kernel::AtomicAdd { .. } => args_len::ATOMIC_ADD,
            Kernel::Saxpy { .. } => args_len::SAXPY,
            Kernel::Gather { .. } => args_len::GATHER,
            Kernel::PointerChase { .. } => args_len::POINTER_CHASE,
        }
    }

    /// Decodes the argument block `args` of kernel `kernel_id` and
    /// validates it ([`Kernel::validate`]). `args` must be exactly the
    /// kernel's block; reserved fields must be zero.
    pub fn decode_args(kernel_id: u32, args: &[u8]) -> Result<Kernel, DecodeError> {
        let expected = args_len_of(kernel_id).ok_or(DecodeError::InvalidValue {
            field: "kernel",
            value: u64::from(kernel_id),
        })?;
        if args.len() != expected {
            return Err(DecodeError::WrongLength {
                expected,
                actual: args.len(),
            });
        }
        let va = |off| u64_at(args, off).map(GpuVa);
        let kernel = match kernel_id {
            id::FILL => {
                reserved_at(args, 20, 4, "fill.reserved")?;
                Kernel::Fill {
                    dst: va(0)?,
                    count: u64_at(args, 8)?,
                    value: u32_at(args, 16)?,
                }
            }
            id::COPY => Kernel::Copy {
                dst: va(0)?,
                src: va(8)?,
                size: u64_at(args, 16)?,
            },
            id::ATOMIC_ADD => {
                reserved_at(args, 28, 4, "atomic_add.reserved")?;
                Kernel::AtomicAdd {
                    counters: va(0)?,
                    items: u64_at(args, 8)?,
                    addend: u64_at(args, 16)?,
                    num_counters: u32_at(args, 24)?,
                }
            }
            id::SAXPY => {
                reserved_at(args, 28, 4, "saxpy.reserved")?;
                Kernel::Saxpy {
                    x: va(0)?,
                    y: va(8)?,
                    count: u64_at(args, 16)?,
                    a: f32::from_bits(u32_at(args, 24)?),
                }
            }
            id::GATHER => Kernel::Gather {
                dst: va(0)?,
                src: va(8)?,
                indices: va(16)?,
                count: u64_at(args, 24)?,
            },
            _ => Kernel::PointerChase {
                head: va(0)?,
                max_steps: u64_at(args, 8)?,
                result: va(16)?,
            },
        };
        kernel.validate()?;
        Ok(kernel)
    }

    /// Writes the argument block into the first [`Kernel::args_len`] bytes
    /// of `buf`, reserved fields zero.
    pub fn write_args(&self, buf: &mut [u8]) {
        match *self {
            Kernel::Fill { dst, count, value } => {
                put_u64(buf, 0, dst.raw());
                put_u64(buf, 8, count);
                put_u32(buf, 16, value);
                put_u32(buf, 20, 0);
            }
            Kernel::Copy { dst, src, size } => {
                put_u64(buf, 0, dst.raw());
                put_u64(buf, 8, src.raw());
                put_u64(buf, 16, size);
            }
            Kernel::AtomicAdd {
                counters,
                num_counters,
                items,
                addend,
            } => {
                put_u64(buf, 0, counters.raw());
                put_u64(buf, 8, items);
                put_u64(buf, 16, addend);
                put_u32(buf, 24, num_counters);
                put_u32(buf, 28, 0);
            }
            Kernel::Saxpy { x, y, count, a } => {
                put_u64(buf, 0, x.raw());
                put_u64(buf, 8, y.raw());
                put_u64(buf, 16, count);
                put_u32(buf, 24, a.to_bits());
                put_u32(buf, 28, 0);
            }
            Kernel::Gather {
                dst,
                src,
                indices,
                count,
            } => {
                put_u64(buf, 0, dst.raw());
                put_u64(buf, 8, src.raw());
                put_u64(buf, 16, indices.raw());
                put_u64(buf, 24, count);
            }
            Kernel::PointerChase {
                head,
                max_steps,
                result,
            } => {
                put_u64(buf, 0, head.raw());
                put_u64(buf, 8, max_steps);
                put_u64(buf, 16, result.raw());
            }
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
                check_array("src", src, size, 1)?;
                // Both ranges fit below 2^64 (checked above).
                let disjoint = dst.raw().saturating_add(size) <= src.raw()
                    || src.raw().saturating_add(size) <= dst.raw();
                if disjoint {
                    Ok(())
                } else {
                    Err(KernelArgError::Overlap("src"))
                }
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
    if !base.raw().is_multiple_of(elem_size) {
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
