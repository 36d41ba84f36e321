//! Range attributes: fault policy over VA ranges, set the way `madvise`
//! sets advice on CPU memory.
//!
//! Only ranges whose attributes differ from the defaults are stored. Setting
//! attributes on a range splits the stored ranges at its ends (like a map
//! request splits mappings), applies the update to every piece inside, and
//! merges neighbours that end up equal, so the map stays minimal and a
//! lookup is one ordered-map search.

use std::collections::BTreeMap;
use std::ops::Range;

use guest_proto::attr::{MAX_GRANULE_SHIFT, MIN_GRANULE_SHIFT};
use guest_proto::{FaultPolicy, Perms};

use super::GpuVmError;

/// The attributes in force at an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeAttrs {
    /// Permissions the GPU may be granted; a fault needing more is fatal.
    pub access: Perms,
    /// Forward faults to the guest, or fail the work at once.
    pub fault_policy: FaultPolicy,
    /// log2 of the fault granule.
    pub granule_shift: u8,
}

impl Default for RangeAttrs {
    fn default() -> RangeAttrs {
        RangeAttrs {
            access: Perms::ALL,
            fault_policy: FaultPolicy::Recoverable,
            granule_shift: MIN_GRANULE_SHIFT,
        }
    }
}

/// A change to some attributes; `None` leaves one as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttrUpdate {
    /// New access permissions.
    pub access: Option<Perms>,
    /// New fault policy.
    pub fault_policy: Option<FaultPolicy>,
    /// New granule shift.
    pub granule_shift: Option<u8>,
}

impl AttrUpdate {
    /// Checks the values are in their domains.
    pub fn validate(&self) -> Result<(), GpuVmError> {
        match self.granule_shift {
            Some(s) if !(MIN_GRANULE_SHIFT..=MAX_GRANULE_SHIFT).contains(&s) => {
                Err(GpuVmError::BadGranule(s))
            }
            _ => Ok(()),
        }
    }

    fn apply(&self, to: RangeAttrs) -> RangeAttrs {
        RangeAttrs {
            access: self.access.unwrap_or(to.access),
            fault_policy: self.fault_policy.unwrap_or(to.fault_policy),
            granule_shift: self.granule_shift.unwrap_or(to.granule_shift),
        }
    }
}

/// Non-default attribute ranges, keyed by start, values `(end, attrs)`.
#[derive(Debug, Default)]
pub(super) struct AttrMap {
    ranges: BTreeMap<u64, (u64, RangeAttrs)>,
}

impl AttrMap {
    pub(super) fn at(&self, addr: u64) -> RangeAttrs {
        self.ranges
            .range(..=addr)
            .next_back()
            .filter(|(_, (end, _))| addr < *end)
            .map_or_else(RangeAttrs::default, |(_, (_, a))| *a)
    }

    /// Every piece of `[start, end)` with its attributes, gaps as defaults.
    pub(super) fn ranges_in(&self, start: u64, end: u64) -> Vec<(Range<u64>, RangeAttrs)> {
        let mut out = Vec::new();
        let mut at = start;
        let first = self
            .ranges
            .range(..=start)
            .next_back()
            .map_or(start, |(s, _)| *s);
        for (&s, &(e, a)) in self.ranges.range(first..end) {
            if e <= at {
                continue;
            }
            if s > at {
                out.push((at..s, RangeAttrs::default()));
            }
            let piece_end = e.min(end);
            out.push((s.max(at)..piece_end, a));
            at = piece_end;
        }
        if at < end {
            out.push((at..end, RangeAttrs::default()));
        }
        out
    }

    pub(super) fn set(&mut self, start: u64, end: u64, update: &AttrUpdate) {
        let pieces = self.ranges_in(start, end);
        // Split the stored ranges that straddle the ends.
        let overlapping: Vec<u64> = {
            let first = self
                .ranges
                .range(..=start)
                .next_back()
                .filter(|(_, (e, _))| *e > start)
                .map_or(start, |(s, _)| *s);
            self.ranges.range(first..end).map(|(s, _)| *s).collect()
        };
        for s in overlapping {
            if let Some((e, a)) = self.ranges.remove(&s) {
                if s < start {
                    self.ranges.insert(s, (start, a));
                }
                if e > end {
                    self.ranges.insert(end, (e, a));
                }
            }
        }
        for (r, a) in pieces {
            let new = update.apply(a);
            if new != RangeAttrs::default() {
                self.ranges.insert(r.start, (r.end, new));
            }
        }
        self.merge_around(start, end);
    }

    /// Merges equal neighbours in and next to `[start, end]`.
    fn merge_around(&mut self, start: u64, end: u64) {
        let from = self
            .ranges
            .range(..start)
            .next_back()
            .map_or(start, |(s, _)| *s);
        let keys: Vec<u64> = self.ranges.range(from..=end).map(|(s, _)| *s).collect();
        let mut prev: Option<u64> = None;
        for s in keys {
            let Some(&(e, a)) = self.ranges.get(&s) else {
                continue;
            };
            if let Some(p) = prev {
                if let Some(&(pe, pa)) = self.ranges.get(&p) {
                    if pe == s && pa == a {
                        self.ranges.remove(&s);
                        self.ranges.insert(p, (e, a));
                        continue;
                    }
                }
            }
            prev = Some(s);
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn fatal() -> AttrUpdate {
        AttrUpdate {
            fault_policy: Some(FaultPolicy::Fatal),
            ..AttrUpdate::default()
        }
    }

    #[test]
    fn set_splits_and_defaults_fill_gaps() {
        let mut m = AttrMap::default();
        m.set(4 * PAGE, 8 * PAGE, &fatal());
        m.set(
            6 * PAGE,
            10 * PAGE,
            &AttrUpdate {
                granule_shift: Some(16),
                ..AttrUpdate::default()
            },
        );
        assert_eq!(m.at(3 * PAGE), RangeAttrs::default());
        assert_eq!(m.at(5 * PAGE).fault_policy, FaultPolicy::Fatal);
        assert_eq!(m.at(5 * PAGE).granule_shift, 12);
        assert_eq!(m.at(7 * PAGE).fault_policy, FaultPolicy::Fatal);
        assert_eq!(m.at(7 * PAGE).granule_shift, 16);
        assert_eq!(m.at(9 * PAGE).fault_policy, FaultPolicy::Recoverable);
        assert_eq!(m.at(9 * PAGE).granule_shift, 16);
        assert_eq!(m.at(10 * PAGE), RangeAttrs::default());
        assert_eq!(m.len(), 3);
        let pieces = m.ranges_in(0, 12 * PAGE);
        let bounds: Vec<_> = pieces
            .iter()
            .map(|(r, _)| (r.start / PAGE, r.end / PAGE))
            .collect();
        assert_eq!(bounds, vec![(0, 4), (4, 6), (6, 8), (8, 10), (10, 12)]);
    }

    #[test]
    fn equal_neighbours_merge_and_defaults_vanish() {
        let mut m = AttrMap::default();
        m.set(0, 2 * PAGE, &fatal());
        m.set(2 * PAGE, 4 * PAGE, &fatal());
        assert_eq!(m.len(), 1);
        assert_eq!(m.ranges_in(0, 4 * PAGE).len(), 1);
        m.set(
            PAGE,
            3 * PAGE,
            &AttrUpdate {
                fault_policy: Some(FaultPolicy::Recoverable),
                ..AttrUpdate::default()
            },
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m.at(2 * PAGE), RangeAttrs::default());
        m.set(
            0,
            4 * PAGE,
            &AttrUpdate {
                fault_policy: Some(FaultPolicy::Recoverable),
                ..AttrUpdate::default()
            },
        );
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn bad_granules_are_refused() {
        for s in [0u8, 11, 31, 255] {
            let u = AttrUpdate {
                granule_shift: Some(s),
                ..AttrUpdate::default()
            };
            assert_eq!(u.validate(), Err(GpuVmError::BadGranule(s)));
        }
    }
}
