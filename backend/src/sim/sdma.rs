//! The copy engine: executes the gfx9 SDMA packets of a user queue
//! (protocol 1.1, 14.8; decoding in `guest_proto::sdma`).
//!
//! The engine keeps its position (bytes consumed, never wrapped) and the
//! last doorbell value it accepted. A packet in progress is kept across
//! slices and faults with how far it got: a copy or fill resumes at the
//! first byte not yet written, and a packet whose effect is done only
//! retries the read-pointer store (the *retire* phase), so no effect is
//! ever applied twice.

use guest_proto::GpuVa;
use guest_proto::sdma::{self, SdmaPacket};
use guest_proto::uq::QueueStopStatus;

use super::doorbell::{self, SdmaDoorbell};
use super::gpu_access::{self, MAX_STEP_BYTES, Stop};
use super::user_queue::{PacketEngine, SliceCtx, SliceEnd, StopInfo, run_packets};
use crate::device::Interrupt;

/// The longest packet the engine reads whole (an `ATOMIC`); a `NOP` body
/// is skipped, never read.
const MAX_PACKET_BYTES: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The packet's effect is being applied.
    Exec,
    /// The effect is done; the read pointer still has to be stored.
    Retire,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Current {
    /// Byte offset of the packet (the `rptr` unit).
    start: u64,
    /// Its length in bytes.
    len: u64,
    packet: SdmaPacket,
    /// Copy and fill: bytes written so far.
    done: u64,
    phase: Phase,
}

/// The state of one SDMA queue.
#[derive(Debug, Default)]
pub(crate) struct SdmaEngine {
    /// Bytes consumed: the start of the next packet.
    pos: u64,
    /// The last doorbell value accepted (at least `pos`).
    known: u64,
    cur: Option<Current>,
}

impl SdmaEngine {
    pub(crate) fn new() -> SdmaEngine {
        SdmaEngine::default()
    }

    /// The byte offset of the packet in progress, or of the next one.
    pub(crate) fn packet_position(&self) -> u64 {
        self.cur.map_or(self.pos, |c| c.start)
    }

    /// Runs packets until the slice's budget is spent, the queue is idle,
    /// a packet waits, faults or stops the queue.
    pub(crate) fn run(&mut self, ctx: &mut SliceCtx<'_>) -> SliceEnd {
        run_packets(self, ctx)
    }

    /// Whether a slice would find work: a packet in progress (a poll whose
    /// condition now holds, or anything else), or a doorbell past the
    /// position. Loads only.
    pub(crate) fn has_work(&mut self, ctx: &mut SliceCtx<'_>) -> bool {
        match self.cur {
            Some(Current {
                phase: Phase::Exec,
                packet:
                    SdmaPacket::PollMemory {
                        addr,
                        reference,
                        mask,
                        func,
                    },
                ..
            }) => match ctx.step(|m| gpu_access::load_u32(m, addr)) {
                Ok(v) => func.holds(v & mask, reference),
                Err(_) => true,
            },
            Some(_) => true,
            None if self.pos != self.known => true,
            None => match ctx.load_doorbell() {
                Ok(d) => !matches!(
                    doorbell::sdma_doorbell(d, self.pos, ctx.desc.ring_size),
                    SdmaDoorbell::Idle
                ),
                Err(_) => true,
            },
        }
    }

    /// Accepts a new doorbell value, or says why not.
    fn look_at_doorbell(&mut self, ctx: &mut SliceCtx<'_>) -> Result<bool, SliceEnd> {
        let d = ctx
            .load_doorbell()
            .map_err(|s| SliceEnd::from_stop(s, self.pos))?;
        match doorbell::sdma_doorbell(d, self.pos, ctx.desc.ring_size) {
            SdmaDoorbell::Idle => Ok(false),
            SdmaDoorbell::Work(v) => {
                self.known = self.known.max(v);
                Ok(true)
            }
            SdmaDoorbell::Bad => Err(SliceEnd::Stop(StopInfo::packet(
                QueueStopStatus::BadDoorbell,
                self.pos,
                d,
            ))),
        }
    }

    /// Reads and decodes the packet at the position.
    fn fetch(&mut self, ctx: &mut SliceCtx<'_>) -> Result<Current, SliceEnd> {
        if self.pos == self.known && !self.look_at_doorbell(ctx)? {
            return Err(SliceEnd::Idle);
        }
        let pos = self.pos;
        let mut first = [0u8; 4];
        read_ring(ctx, pos, &mut first).map_err(|s| SliceEnd::from_stop(s, pos))?;
        let header = u32::from_le_bytes(first);
        let bad = |status| SliceEnd::Stop(StopInfo::packet(status, pos, u64::from(header)));
        let dwords = sdma::packet_dwords(header).map_err(|e| bad(e.stop_status()))?;
        let len = u64::from(dwords) * 4;
        if len > ctx.desc.ring_size {
            return Err(bad(QueueStopStatus::BadPacket));
        }
        if pos.saturating_add(len) > self.known {
            // The doorbell does not cover the packet yet.
            self.look_at_doorbell(ctx)?;
            if pos.saturating_add(len) > self.known {
                return Err(SliceEnd::Waiting);
            }
        }
        let packet = if header & 0xFF == u32::from(sdma::opcode::NOP) {
            SdmaPacket::Nop { dwords }
        } else {
            let mut bytes = [0u8; MAX_PACKET_BYTES];
            let body = bytes
                .get_mut(..len as usize)
                .ok_or(bad(QueueStopStatus::BadPacket))?;
            read_ring(ctx, pos, body).map_err(|s| SliceEnd::from_stop(s, pos))?;
            let mut dws = [0u32; MAX_PACKET_BYTES / 4];
            for (d, c) in dws.iter_mut().zip(body.chunks_exact(4)) {
                *d = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            let dws = dws.get(..dwords as usize).unwrap_or_default();
            SdmaPacket::decode(dws).map_err(|e| bad(e.stop_status()))?
        };
        Ok(Current {
            start: pos,
            len,
            packet,
            done: 0,
            phase: Phase::Exec,
        })
    }
}

/// Reads ring bytes from byte offset `pos` (wrapped), across the ring's end.
fn read_ring(ctx: &mut SliceCtx<'_>, pos: u64, buf: &mut [u8]) -> Result<(), Stop> {
    let size = ctx.desc.ring_size;
    let ring = ctx.desc.ring.raw();
    let off = pos % size;
    let first = ((size - off) as usize).min(buf.len());
    let (a, b) = buf.split_at_mut(first);
    ctx.step(|m| gpu_access::read(m, GpuVa(ring + off), a))?;
    if !b.is_empty() {
        ctx.step(|m| gpu_access::read(m, GpuVa(ring), b))?;
    }
    Ok(())
}

impl PacketEngine for SdmaEngine {
    type Current = Current;

    fn current(&mut self) -> &mut Option<Current> {
        &mut self.cur
    }

    fn fetch(&mut self, ctx: &mut SliceCtx<'_>) -> Result<Current, SliceEnd> {
        SdmaEngine::fetch(self, ctx)
    }

    fn execute(cur: &mut Current, ctx: &mut SliceCtx<'_>) -> Option<SliceEnd> {
        execute(cur, ctx)
    }

    /// Publishes the new read pointer.
    fn retire(&mut self, cur: Current, ctx: &mut SliceCtx<'_>) -> Option<SliceEnd> {
        let next = cur.start.wrapping_add(cur.len);
        if let Err(stop) = ctx.store_rptr(next) {
            return Some(SliceEnd::from_stop(stop, cur.start));
        }
        self.pos = next;
        None
    }
}

/// Applies the packet's effect; `None` when it is done (retire next),
/// else how the slice ends.
fn execute(cur: &mut Current, ctx: &mut SliceCtx<'_>) -> Option<SliceEnd> {
    if cur.phase == Phase::Retire {
        return None;
    }
    let at = cur.start;
    let fail = |s: Stop| Some(SliceEnd::from_stop(s, at));
    match cur.packet {
        SdmaPacket::Nop { .. } | SdmaPacket::PollRegister => {}
        SdmaPacket::CopyLinear { src, dst, bytes } => {
            while cur.done < bytes {
                if ctx.bytes_left == 0 {
                    return Some(SliceEnd::Budget);
                }
                let n = (bytes - cur.done).min(ctx.bytes_left).min(MAX_STEP_BYTES);
                let (s, d) = (
                    src.raw().wrapping_add(cur.done),
                    dst.raw().wrapping_add(cur.done),
                );
                let (copied, stop) = ctx.step(|m| gpu_access::copy(m, d, s, n));
                cur.done += copied;
                ctx.bytes_left = ctx.bytes_left.saturating_sub(copied);
                ctx.out.copy_bytes += copied;
                if let Some(stop) = stop {
                    return fail(stop);
                }
            }
        }
        SdmaPacket::ConstFill {
            dst,
            data,
            element_shift,
            elements,
        } => {
            let total = elements << element_shift;
            let bytes = data.to_le_bytes();
            let pattern = bytes.get(..1 << element_shift).unwrap_or(&bytes);
            while cur.done < total {
                if ctx.bytes_left == 0 {
                    return Some(SliceEnd::Budget);
                }
                let n = (total - cur.done).min(ctx.bytes_left).min(MAX_STEP_BYTES);
                let d = dst.raw().wrapping_add(cur.done);
                let (written, stop) = ctx.step(|m| gpu_access::fill(m, d, pattern, n));
                cur.done += written;
                ctx.bytes_left = ctx.bytes_left.saturating_sub(written);
                ctx.out.copy_bytes += written;
                if let Some(stop) = stop {
                    return fail(stop);
                }
            }
        }
        SdmaPacket::PollMemory {
            addr,
            reference,
            mask,
            func,
        } => match ctx.step(|m| gpu_access::load_u32(m, addr)) {
            Ok(v) if func.holds(v & mask, reference) => {}
            Ok(_) => return Some(SliceEnd::Waiting),
            Err(s) => return fail(s),
        },
        SdmaPacket::Atomic {
            op,
            wide,
            addr,
            src,
            cmp,
        } => {
            if let Err(s) = ctx.step(|m| {
                gpu_access::atomic_update(m, addr, wide, |old| op.apply(old, src, cmp, wide))
            }) {
                return fail(s);
            }
        }
        SdmaPacket::Fence { addr, data } => {
            if let Err(s) = ctx.step(|m| gpu_access::store_u32(m, addr, data)) {
                return fail(s);
            }
        }
        SdmaPacket::Trap { int_ctx } => {
            let queue = ctx.queue;
            ctx.out.interrupts.push(Interrupt::Trap { queue, int_ctx });
        }
        SdmaPacket::Timestamp { addr } => {
            let now = ctx.clock_ns();
            if let Err(s) = ctx.step(|m| gpu_access::store_u64(m, addr, now)) {
                return fail(s);
            }
        }
    }
    cur.phase = Phase::Retire;
    None
}
