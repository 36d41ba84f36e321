//! The packet processor: executes the HSA AQL packets of a user queue
//! (protocol 1.1, 14.9 and 14.10; decoding in `guest_proto::aql`).
//!
//! Barrier-AND and barrier-OR packets wait for their dependency signals;
//! every packet completes by decrementing its completion signal, storing
//! the signal's event id into its event mailbox (and raising an
//! interrupt), invalidating its slot and advancing the read index, each
//! step exactly once across faults. A kernel dispatch cannot run on a
//! simulated GPU (there is no gfx ISA to execute): it stops the queue with
//! `UNSUPPORTED_PACKET` at once.

use guest_proto::GpuVa;
use guest_proto::aql::{
    AQL_PACKET_SIZE, AqlPacket, BarrierKind, PROCESSED_HEADER, SignalHandle, amd_signal,
    packet_type,
};
use guest_proto::uq::QueueStopStatus;

use super::doorbell::{self, AqlDoorbell};
use super::gpu_access;
use super::user_queue::{PacketEngine, SliceCtx, SliceEnd, StopInfo, run_packets};
use crate::device::Interrupt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the packet's condition (a barrier's signals).
    Run,
    /// Reading the completion signal.
    ReadSignal,
    /// Decrementing it.
    Decrement { mailbox: u64, event_id: u32 },
    /// Storing the event id into the mailbox (then the interrupt).
    Mailbox { mailbox: u64, event_id: u32 },
    /// Setting the slot's header to `INVALID`.
    Header,
    /// Storing the read index.
    Rptr,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Current {
    index: u64,
    header: u16,
    packet: AqlPacket,
    phase: Phase,
}

/// The state of one AQL queue.
#[derive(Debug, Default)]
pub(crate) struct AqlEngine {
    /// Index of the next packet.
    next: u64,
    /// The last doorbell value accepted: packets up to it are written.
    known: Option<u64>,
    cur: Option<Current>,
}

impl AqlEngine {
    pub(crate) fn new() -> AqlEngine {
        AqlEngine::default()
    }

    /// The index of the packet in progress, or of the next one.
    pub(crate) fn packet_position(&self) -> u64 {
        self.cur.map_or(self.next, |c| c.index)
    }

    /// Runs packets until the slice's budget is spent, the queue is idle,
    /// a packet waits, faults or stops the queue.
    pub(crate) fn run(&mut self, ctx: &mut SliceCtx<'_>) -> SliceEnd {
        run_packets(self, ctx)
    }

    /// Whether a slice would find work: a packet in progress (a barrier
    /// whose condition now holds, or anything else), a doorbell past the
    /// position, or a written slot at it. Loads only.
    pub(crate) fn has_work(&mut self, ctx: &mut SliceCtx<'_>) -> bool {
        if let Some(cur) = self.cur {
            return match (cur.phase, cur.packet) {
                (Phase::Run, AqlPacket::Barrier { kind, deps, .. }) => {
                    barrier_holds(ctx, kind, &deps).unwrap_or(true)
                }
                _ => true,
            };
        }
        let index = self.next;
        let slots = ctx.desc.ring_size / AQL_PACKET_SIZE as u64;
        if self.known.is_none_or(|k| k < index) {
            match ctx.load_doorbell() {
                Ok(d) => {
                    if doorbell::aql_doorbell(d, index, slots) == AqlDoorbell::Bad {
                        return true;
                    }
                }
                Err(_) => return true,
            }
        }
        // Covered by the doorbell or not, the slot runs once it is written.
        let slot = slot_va(ctx, index);
        match ctx.step(|m| gpu_access::load_u32(m, slot)) {
            Ok(first) => (first as u16 & 0xFF) as u8 != packet_type::INVALID,
            Err(_) => true,
        }
    }

    fn fetch(&mut self, ctx: &mut SliceCtx<'_>) -> Result<Current, SliceEnd> {
        let index = self.next;
        let slots = ctx.desc.ring_size / AQL_PACKET_SIZE as u64;
        // Whether the doorbell covers the slot; if not, it is still run
        // when written: several producers may ring out of order, and the
        // last doorbell store may name an older packet.
        let mut covered = true;
        if self.known.is_none_or(|k| k < index) {
            let d = ctx
                .load_doorbell()
                .map_err(|s| SliceEnd::from_stop(s, index))?;
            match doorbell::aql_doorbell(d, index, slots) {
                AqlDoorbell::Idle => covered = false,
                AqlDoorbell::Bad => {
                    return Err(SliceEnd::Stop(StopInfo::packet(
                        QueueStopStatus::BadDoorbell,
                        index,
                        d,
                    )));
                }
                AqlDoorbell::Work(v) => self.known = Some(v),
            }
        }
        let slot = slot_va(ctx, index);
        let first = ctx
            .step(|m| gpu_access::load_u32(m, slot))
            .map_err(|s| SliceEnd::from_stop(s, index))?;
        let header = first as u16;
        if (header & 0xFF) as u8 == packet_type::INVALID {
            // Not written yet: wait here, as the command processor does.
            return Err(if covered {
                SliceEnd::Waiting
            } else {
                SliceEnd::Idle
            });
        }
        let mut bytes = [0u8; AQL_PACKET_SIZE];
        let (head, rest) = bytes.split_at_mut(4);
        head.copy_from_slice(&first.to_le_bytes());
        ctx.step(|m| gpu_access::read(m, GpuVa(slot.raw() + 4), rest))
            .map_err(|s| SliceEnd::from_stop(s, index))?;
        let packet = AqlPacket::decode(&bytes).map_err(|e| {
            SliceEnd::Stop(StopInfo::packet(e.stop_status(), index, u64::from(header)))
        })?;
        Ok(Current {
            index,
            header,
            packet,
            phase: Phase::Run,
        })
    }
}

fn slot_va(ctx: &SliceCtx<'_>, index: u64) -> GpuVa {
    let slots = ctx.desc.ring_size / AQL_PACKET_SIZE as u64;
    GpuVa(ctx.desc.ring.raw() + (index % slots) * AQL_PACKET_SIZE as u64)
}

/// Whether a barrier's condition holds: AND, every dependency signal is
/// 0; OR, one is (or there is none).
fn barrier_holds(
    ctx: &mut SliceCtx<'_>,
    kind: BarrierKind,
    deps: &[Option<SignalHandle>],
) -> Result<bool, super::gpu_access::Stop> {
    let mut any_zero = false;
    let mut all_zero = true;
    let mut count = 0;
    for dep in deps.iter().flatten() {
        let va = dep.value_va();
        let v = ctx.step(|m| gpu_access::load_u64(m, va))?;
        count += 1;
        if v == 0 {
            any_zero = true;
        } else {
            all_zero = false;
        }
    }
    Ok(match kind {
        BarrierKind::And => all_zero,
        BarrierKind::Or => count == 0 || any_zero,
    })
}

fn completion_of(packet: &AqlPacket) -> Option<SignalHandle> {
    match *packet {
        AqlPacket::Barrier { completion, .. } | AqlPacket::Pm4Ib { completion } => completion,
        AqlPacket::Invalid => None,
    }
}

impl PacketEngine for AqlEngine {
    type Current = Current;

    fn current(&mut self) -> &mut Option<Current> {
        &mut self.cur
    }

    fn fetch(&mut self, ctx: &mut SliceCtx<'_>) -> Result<Current, SliceEnd> {
        AqlEngine::fetch(self, ctx)
    }

    fn execute(cur: &mut Current, ctx: &mut SliceCtx<'_>) -> Option<SliceEnd> {
        step(cur, ctx)
    }

    fn retire(&mut self, cur: Current, _ctx: &mut SliceCtx<'_>) -> Option<SliceEnd> {
        self.next = cur.index.wrapping_add(1);
        None
    }
}

/// Advances the packet's phases; `None` when it completed.
fn step(cur: &mut Current, ctx: &mut SliceCtx<'_>) -> Option<SliceEnd> {
    let index = cur.index;
    let fail = |s| Some(SliceEnd::from_stop(s, index));
    loop {
        match cur.phase {
            Phase::Run => {
                if let AqlPacket::Barrier { kind, deps, .. } = cur.packet {
                    match barrier_holds(ctx, kind, &deps) {
                        Ok(true) => {}
                        Ok(false) => return Some(SliceEnd::Waiting),
                        Err(s) => return fail(s),
                    }
                }
                cur.phase = if completion_of(&cur.packet).is_some() {
                    Phase::ReadSignal
                } else {
                    Phase::Header
                };
            }
            Phase::ReadSignal => {
                let Some(sig) = completion_of(&cur.packet) else {
                    cur.phase = Phase::Header;
                    continue;
                };
                let read = ctx.step(|m| {
                    let kind = gpu_access::load_u64(m, sig.field(amd_signal::KIND))?;
                    let mailbox =
                        gpu_access::load_u64(m, sig.field(amd_signal::EVENT_MAILBOX_PTR))?;
                    let event_id = gpu_access::load_u32(m, sig.field(amd_signal::EVENT_ID))?;
                    Ok((kind.cast_signed(), mailbox, event_id))
                });
                let (kind, mailbox, event_id) = match read {
                    Ok(v) => v,
                    Err(s) => return fail(s),
                };
                if kind != amd_signal::KIND_USER || mailbox % 4 != 0 {
                    return Some(SliceEnd::Stop(StopInfo::packet(
                        QueueStopStatus::BadPacket,
                        index,
                        u64::from(cur.header),
                    )));
                }
                cur.phase = Phase::Decrement { mailbox, event_id };
            }
            Phase::Decrement { mailbox, event_id } => {
                let Some(sig) = completion_of(&cur.packet) else {
                    cur.phase = Phase::Header;
                    continue;
                };
                let va = sig.value_va();
                if let Err(s) =
                    ctx.step(|m| gpu_access::atomic_update(m, va, true, |v| v.wrapping_sub(1)))
                {
                    return fail(s);
                }
                cur.phase = if mailbox != 0 {
                    Phase::Mailbox { mailbox, event_id }
                } else {
                    Phase::Header
                };
            }
            Phase::Mailbox { mailbox, event_id } => {
                if let Err(s) = ctx.step(|m| gpu_access::store_u32(m, GpuVa(mailbox), event_id)) {
                    return fail(s);
                }
                let queue = ctx.queue;
                ctx.out
                    .interrupts
                    .push(Interrupt::Signal { queue, event_id });
                cur.phase = Phase::Header;
            }
            Phase::Header => {
                let slot = slot_va(ctx, index);
                if let Err(s) = ctx.step(|m| gpu_access::store_u16(m, slot, PROCESSED_HEADER)) {
                    return fail(s);
                }
                cur.phase = Phase::Rptr;
            }
            Phase::Rptr => {
                if let Err(s) = ctx.store_rptr(index.wrapping_add(1)) {
                    return fail(s);
                }
                return None;
            }
        }
    }
}
