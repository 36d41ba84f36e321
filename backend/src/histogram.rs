//! A fixed-bucket latency histogram: plain counters, no allocation, cheap
//! enough to update on every fault answer.
//!
//! The bucket bounds cover 1 µs to 10 s in 1-2.5-5 steps, what a fault
//! round trip can take (a guest kernel resolving in-line answers in
//! microseconds, a user-space resolver in tens to hundreds of them, a
//! stalled guest runs into `fault_timeout_ms`, 10 s by default) and what a
//! doorbell waits (50 µs hot, 10 ms idle, 14.11). The daemon exposes them
//! as Prometheus histograms (docs/metrics.md).

use std::time::Duration;

/// Upper bounds of the buckets, in nanoseconds (each bucket counts the
/// samples `<=` its bound and above the previous one; one more bucket
/// takes everything above the last bound).
pub const LATENCY_BOUNDS_NS: [u64; 22] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Samples per bucket of [`LATENCY_BOUNDS_NS`] (not cumulative), the last
/// one for samples above every bound, their count and their sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Samples per bucket; `buckets[LATENCY_BOUNDS_NS.len()]` is above
    /// every bound.
    pub buckets: [u64; LATENCY_BOUNDS_NS.len() + 1],
    /// Number of samples.
    pub count: u64,
    /// Sum of the samples in nanoseconds (saturating).
    pub sum_ns: u64,
}

impl LatencyHistogram {
    /// Adds one sample.
    pub fn observe(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.partition_point(|&bound| bound < ns);
        if let Some(b) = self.buckets.get_mut(i) {
            *b = b.saturating_add(1);
        }
        self.count = self.count.saturating_add(1);
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Adds every sample of `other` (sessions of a context that ended).
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.saturating_add(*b);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    /// The cumulative count of samples `<=` each bound of
    /// [`LATENCY_BOUNDS_NS`] (a Prometheus histogram's buckets).
    pub fn cumulative(&self) -> [u64; LATENCY_BOUNDS_NS.len()] {
        let mut out = [0u64; LATENCY_BOUNDS_NS.len()];
        let mut total = 0u64;
        for (o, b) in out.iter_mut().zip(self.buckets.iter()) {
            total = total.saturating_add(*b);
            *o = total;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_the_bucket_of_their_upper_bound() {
        let mut h = LatencyHistogram::default();
        h.observe(Duration::from_nanos(999));
        h.observe(Duration::from_micros(1));
        h.observe(Duration::from_nanos(1_001));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(11));
        assert_eq!(h.buckets[0], 2, "999 ns and exactly 1 us");
        assert_eq!(h.buckets[1], 1, "1.001 us");
        assert_eq!(h.buckets[11], 1, "3 ms is in (2.5 ms, 5 ms]");
        assert_eq!(h.buckets[22], 1, "above 10 s");
        assert_eq!(h.count, 5);
        assert_eq!(h.sum_ns, 999 + 1_000 + 1_001 + 3_000_000 + 11_000_000_000);
        let c = h.cumulative();
        assert_eq!((c[0], c[1], c[10], c[11], c[21]), (2, 3, 3, 4, 4));
        let mut m = h;
        m.merge(&h);
        assert_eq!((m.count, m.cumulative()[21], m.buckets[22]), (10, 8, 2));
    }
}
