//! Spin-then-park with an adaptive budget, for threads that wait for work
//! which usually comes within microseconds while a guest is busy, and not
//! at all while it is idle (the daemon's vring worker, the simulated GPU's
//! compute units).
//!
//! Waking a parked thread costs far more than the work it then does: on a
//! 2-core VM of the kind the daemon runs on, waking a thread whose vCPU went
//! idle costs 30-40 us, a condition variable ping-pong 4 us at p50 and
//! 33 us at p90 (the measurements). A thread that keeps looking
//! for work for a short while after its last piece (polling) sees the next
//! one at once, at the price of the CPU time it polls.
//!
//! The budget is that of Linux's `cpuidle-haltpoll` governor: the time a
//! thread polls before it parks adapts to the gaps it sees between two
//! pieces of work.
//!
//! - It starts at zero: a thread that never sees work in quick succession
//!   never polls, so an idle guest costs nothing.
//! - A gap longer than the budget but at most [`MAX_POLL`] would have been
//!   caught by a longer poll: the budget doubles (from [`START_POLL`]), up
//!   to [`MAX_POLL`].
//! - A gap longer than [`MAX_POLL`] was not worth polling for: the budget
//!   halves, and drops to zero below [`START_POLL`].
//! - A gap within the budget was caught: no change.
//!
//! So polling costs at most [`MAX_POLL`] of CPU per gap, and only while the
//! gaps are short; a few long gaps in a row turn it off. Polling threads
//! yield the CPU every few rounds ([`relax`]), so on a machine with fewer
//! cores than busy threads they do not keep the thread they wait for from
//! running.

use std::time::Duration;

/// The longest a thread polls before it parks.
pub const MAX_POLL: Duration = Duration::from_micros(100);
/// The first non-zero budget, and the smallest.
pub const START_POLL: Duration = Duration::from_micros(10);

/// How long to poll before parking, adapted to the gaps seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollBudget {
    budget: Duration,
}

impl PollBudget {
    /// A budget of zero (no polling until short gaps are seen).
    pub const fn new() -> PollBudget {
        PollBudget {
            budget: Duration::ZERO,
        }
    }

    /// How long to poll now.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// The next piece of work came `gap` after the previous one ended.
    pub fn observe(&mut self, gap: Duration) {
        if gap <= self.budget {
            return;
        }
        if gap <= MAX_POLL {
            self.budget = (self.budget * 2).clamp(START_POLL, MAX_POLL);
        } else {
            self.budget /= 2;
            if self.budget < START_POLL {
                self.budget = Duration::ZERO;
            }
        }
    }
}

/// One round of a polling loop: a spin hint, and every 8th round the CPU
/// is yielded to any other runnable thread (`sched_yield`).
#[inline]
pub fn relax(round: &mut u32) {
    *round = round.wrapping_add(1);
    if (*round).is_multiple_of(8) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn short_gaps_grow_the_budget_to_the_cap_long_ones_turn_it_off() {
        let mut p = PollBudget::new();
        assert_eq!(p.budget(), Duration::ZERO, "no polling at first");
        p.observe(5 * US);
        assert_eq!(p.budget(), START_POLL);
        p.observe(5 * US);
        assert_eq!(p.budget(), START_POLL, "caught: unchanged");
        p.observe(30 * US);
        assert_eq!(p.budget(), 20 * US);
        for _ in 0..10 {
            p.observe(90 * US);
        }
        assert_eq!(p.budget(), MAX_POLL, "capped");
        p.observe(MAX_POLL);
        assert_eq!(p.budget(), MAX_POLL);
        // Long gaps: halved each time, then off.
        let mut seen = Vec::new();
        for _ in 0..6 {
            p.observe(Duration::from_millis(5));
            seen.push(p.budget());
        }
        assert_eq!(
            seen,
            vec![
                50 * US,
                25 * US,
                12500 * US / 1000,
                Duration::ZERO,
                Duration::ZERO,
                Duration::ZERO
            ]
        );
    }

    #[test]
    fn an_idle_thread_never_polls() {
        let mut p = PollBudget::new();
        for _ in 0..1000 {
            p.observe(Duration::from_millis(10));
            assert_eq!(p.budget(), Duration::ZERO);
        }
    }
}
