//! Watching doorbells without MMIO: the budget (protocol 14.11).
//!
//! A real GPU learns of new work from a doorbell *write* (an MMIO store
//! that the hardware sees). Here a doorbell is a `u64` in guest memory, so
//! the command processor has to look at it, and every look costs CPU time.
//! The budget keeps an idle daemon near 0% CPU while keeping the latency of
//! a busy queue low:
//!
//! - a queue that completed a packet within [`HOT_WINDOW`] is looked at
//!   every [`HOT_PERIOD`]: a runtime that just submitted usually submits
//!   again soon (ROCr's copies come in bursts);
//! - every other live queue is looked at every [`IDLE_PERIOD`];
//! - a kick (`DOORBELL_KICK`, `EVENT_ARM`, any request of the session, a
//!   resolved fault, a packet completing on another queue of the VM) makes
//!   the next look immediate.
//!
//! The figures are measured by `backend/benches/user_queues.rs` (the CPU
//! time of idle queues and the doorbell-to-first-packet latency).

use std::time::{Duration, Instant};

/// How long after its last completed packet a queue stays hot.
pub const HOT_WINDOW: Duration = Duration::from_millis(2);
/// How often a hot queue is looked at.
pub const HOT_PERIOD: Duration = Duration::from_micros(50);
/// How often any other live queue is looked at.
pub const IDLE_PERIOD: Duration = Duration::from_millis(10);

/// When a queue whose last packet completed at `last_progress` (if ever)
/// is to be looked at next, seen at `now`: the next point after `now` of
/// the period's grid counted from `epoch`. Every queue of a command
/// processor uses the same grid, so all idle queues are looked at in one
/// wake-up every [`IDLE_PERIOD`] instead of one wake-up per queue.
pub fn next_look(epoch: Instant, now: Instant, last_progress: Option<Instant>) -> Instant {
    let hot = last_progress.is_some_and(|t| now.saturating_duration_since(t) < HOT_WINDOW);
    let period = if hot { HOT_PERIOD } else { IDLE_PERIOD };
    let since = now.saturating_duration_since(epoch).as_nanos();
    let p = period.as_nanos().max(1);
    let next = (since / p + 1).saturating_mul(p);
    epoch + Duration::from_nanos(u64::try_from(next).unwrap_or(u64::MAX))
}

/// What the doorbell of an SDMA queue says, given the engine's position
/// (bytes consumed) and the ring size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SdmaDoorbell {
    /// Nothing new.
    Idle,
    /// Work up to this byte offset.
    Work(u64),
    /// A lie: the queue stops `BAD_DOORBELL`.
    Bad,
}

/// Checks an SDMA doorbell value: a multiple of 4, not below the
/// position, at most a ring ahead of it.
pub fn sdma_doorbell(value: u64, position: u64, ring_size: u64) -> SdmaDoorbell {
    if !value.is_multiple_of(4) || value < position || value - position > ring_size {
        SdmaDoorbell::Bad
    } else if value == position {
        SdmaDoorbell::Idle
    } else {
        SdmaDoorbell::Work(value)
    }
}

/// What the doorbell of an AQL queue says, given the index of the next
/// packet and the ring's packet slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AqlDoorbell {
    /// Nothing new (an old or duplicate doorbell: producers may ring out
    /// of order).
    Idle,
    /// Packets up to and including this index.
    Work(u64),
    /// More than a ring of packets: the queue stops `BAD_DOORBELL`.
    Bad,
}

/// Checks an AQL doorbell value (the index of the last packet written).
pub fn aql_doorbell(value: u64, next: u64, slots: u64) -> AqlDoorbell {
    if value < next {
        AqlDoorbell::Idle
    } else if value - next >= slots {
        AqlDoorbell::Bad
    } else {
        AqlDoorbell::Work(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_then_idle_on_a_shared_grid() {
        let e = Instant::now();
        assert_eq!(next_look(e, e, None), e + IDLE_PERIOD);
        assert_eq!(next_look(e, e, Some(e)), e + HOT_PERIOD);
        let t = e + Duration::from_micros(70);
        assert_eq!(next_look(e, t, Some(e)), e + 2 * HOT_PERIOD);
        // Two idle queues seen at different times share the next tick.
        let a = next_look(e, e + Duration::from_millis(3), None);
        let b = next_look(e, e + Duration::from_millis(7), None);
        assert_eq!(a, b);
        assert_eq!(a, e + IDLE_PERIOD);
        let later = e + HOT_WINDOW;
        assert_eq!(next_look(e, later, Some(e)), e + IDLE_PERIOD);
    }

    #[test]
    fn sdma_doorbells_that_lie() {
        let ring = 4096;
        assert_eq!(sdma_doorbell(64, 64, ring), SdmaDoorbell::Idle);
        assert_eq!(sdma_doorbell(96, 64, ring), SdmaDoorbell::Work(96));
        assert_eq!(
            sdma_doorbell(64 + ring, 64, ring),
            SdmaDoorbell::Work(64 + ring)
        );
        assert_eq!(
            sdma_doorbell(68 + ring, 64, ring),
            SdmaDoorbell::Bad,
            "beyond the ring"
        );
        assert_eq!(sdma_doorbell(32, 64, ring), SdmaDoorbell::Bad, "backwards");
        assert_eq!(
            sdma_doorbell(66, 64, ring),
            SdmaDoorbell::Bad,
            "not a dword"
        );
        assert_eq!(sdma_doorbell(u64::MAX - 3, 0, ring), SdmaDoorbell::Bad);
    }

    #[test]
    fn aql_doorbells_that_lie() {
        assert_eq!(aql_doorbell(0, 0, 64), AqlDoorbell::Work(0));
        assert_eq!(aql_doorbell(4, 5, 64), AqlDoorbell::Idle, "old doorbell");
        assert_eq!(aql_doorbell(68, 5, 64), AqlDoorbell::Work(68));
        assert_eq!(aql_doorbell(69, 5, 64), AqlDoorbell::Bad, "a ring ahead");
        assert_eq!(aql_doorbell(u64::MAX, 0, 64), AqlDoorbell::Bad);
    }
}
