//! Range attributes: per-range policy for faults, set like `madvise`.
//!
//! Attributes are independent of mappings (they may be set before anything
//! is bound and survive unmaps), but split over ranges the same way: setting
//! an attribute on part of a range splits it, and the other attributes of
//! every piece stay as they were. Only ranges that differ from the defaults
//! are stored, and neighbours with equal attributes are merged after every
//! change, so the map stays as small as the guest's actual policy and never
//! grows with the number of requests that produced it.

use std::collections::BTreeMap;
use std::ops::Range;

use guest_proto::attr::{MAX_GRANULE_SHIFT, MIN_GRANULE_SHIFT};
use guest_proto::{FaultPolicy, GpuVa, PAGE_SHIFT, Perms};

use super::GpuVmError;

/// The attributes in effect at one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EffectiveAttrs {
    /// The permissions the GPU may be granted; a fault needing more is
    /// fatal. Default: read, write, execute.
    pub access: Perms,
    /// Forward faults to the guest or fail the work at once. Default:
    /// recoverable.
    pub fault_policy: FaultPolicy,
    /// log2 of the fault granule. Default: one page (12).
    pub granule_shift: u8,
}

impl Default for EffectiveAttrs {
    fn default() -> Self {
        EffectiveAttrs {
            access: Perms::ALL,
            fault_policy: FaultPolicy::Recoverable,
            granule_shift: PAGE_SHIFT as u8,
        }
    }
}

impl EffectiveAttrs {
    /// These attributes with `update` applied.
    pub fn updated(self, update: &AttrUpdate) -> EffectiveAttrs {
        EffectiveAttrs {
            access: update.access.unwrap_or(self.access),
            fault_policy: update.fault_policy.unwrap_or(self.fault_policy),
            granule_shift: update.granule_shift.unwrap_or(self.granule_shift),
        }
    }
}

/// A change to the attributes of a range; `None` leaves one as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AttrUpdate {
    /// New `access`.
    pub access: Option<Perms>,
    /// New `fault_policy`.
    pub fault_policy: Option<FaultPolicy>,
    /// New `granule_shift`; must be in 12 ..= 30.
    pub granule_shift: Option<u8>,
}

impl AttrUpdate {
    /// Checks every value of the update.
    pub fn validate(&self) -> Result<(), GpuVmError> {
        match self.granule_shift {
            Some(s) if !(MIN_GRANULE_SHIFT..=MAX_GRANULE_SHIFT).contains(&s) => {
                Err(GpuVmError::BadGranule(s))
            }
            _ => Ok(()),
        }
    }

    /// Whether the update changes nothing.
    pub fn is_empty(&self) -> bool {
        self.access.is_none() && self.fault_policy.is_none() && self.granule_shift.is_none()
    }
}

/// The persistent attributes of a `RANGE_ATTR` request (its one-shot
/// `prefault` is not an attribute and is left to the caller).
impl From<&guest_proto::attr::RangeAttrs> for AttrUpdate {
    fn from(wire: &guest_proto::attr::RangeAttrs) -> Self {
        AttrUpdate {
            access: wire.access,
            fault_policy: wire.fault_policy,
            granule_shift: wire.granule_shift,
        }
    }
}

/// The non-default attribute ranges of a VM: start -> (end, attributes).
/// Ranges are disjoint, non-empty, never default, and two ranges that touch
/// never have equal attributes.
#[derive(Clone, Debug, Default)]
pub(super) struct AttrMap {
    ranges: BTreeMap<u64, (u64, EffectiveAttrs)>,
}

impl AttrMap {
    /// The attributes at `va`.
    pub(super) fn at(&self, va: GpuVa) -> EffectiveAttrs {
        match self.ranges.range(..=va.raw()).next_back() {
            Some((_, &(end, attrs))) if va.raw() < end => attrs,
            _ => EffectiveAttrs::default(),
        }
    }

    /// Applies `update` to `[start, end)` (non-empty, validated). Cannot
    /// fail.
    pub(super) fn apply(&mut self, start: u64, end: u64, update: &AttrUpdate) {
        self.split_at(start);
        self.split_at(end);
        let mut pieces = Vec::new();
        let mut at = start;
        for (&s, &(e, attrs)) in self.ranges.range(start..end) {
            if s > at {
                pieces.push((at, s, EffectiveAttrs::default().updated(update)));
            }
            pieces.push((s, e, attrs.updated(update)));
            at = e;
        }
        if at < end {
            pieces.push((at, end, EffectiveAttrs::default().updated(update)));
        }
        let old: Vec<u64> = self.ranges.range(start..end).map(|(&s, _)| s).collect();
        for s in old {
            self.ranges.remove(&s);
        }
        for (s, e, attrs) in pieces {
            if attrs != EffectiveAttrs::default() {
                self.ranges.insert(s, (e, attrs));
            }
        }
        self.merge_around(start, end);
    }

    /// The ranges covering `[start, end)`, defaults included, clipped to it.
    pub(super) fn ranges_in(&self, start: u64, end: u64) -> Vec<(Range<GpuVa>, EffectiveAttrs)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let first = match self.ranges.range(..=start).next_back() {
            Some((&s, &(e, _))) if e > start => s,
            _ => start,
        };
        let mut at = start;
        for (&s, &(e, attrs)) in self.ranges.range(first..end) {
            if s > at {
                out.push((GpuVa(at)..GpuVa(s), EffectiveAttrs::default()));
            }
            out.push((GpuVa(s.max(start))..GpuVa(e.min(end)), attrs));
            at = e;
        }
        if at < end {
            out.push((GpuVa(at)..GpuVa(end), EffectiveAttrs::default()));
        }
        out
    }

    /// Number of stored (non-default) ranges.
    pub(super) fn stored_ranges(&self) -> usize {
        self.ranges.len()
    }

    pub(super) fn clear(&mut self) {
        self.ranges.clear();
    }

    /// Makes `at` a range boundary: a range spanning it is cut in two.
    fn split_at(&mut self, at: u64) {
        let Some((&s, &(e, attrs))) = self.ranges.range(..at).next_back() else {
            return;
        };
        if e > at {
            self.ranges.insert(s, (at, attrs));
            self.ranges.insert(at, (e, attrs));
        }
    }

    /// Merges touching equal ranges from the one ending at `start` to the
    /// one starting at `end`.
    fn merge_around(&mut self, start: u64, end: u64) {
        let from = match self.ranges.range(..start).next_back() {
            Some((&s, _)) => s,
            None => start,
        };
        let keys: Vec<u64> = self.ranges.range(from..=end).map(|(&s, _)| s).collect();
        let mut current: Option<u64> = None;
        for s in keys {
            let Some(&(e, attrs)) = self.ranges.get(&s) else {
                continue;
            };
            if let Some(c) = current {
                if let Some(&(ce, cattrs)) = self.ranges.get(&c) {
                    if ce == s && cattrs == attrs {
                        self.ranges.remove(&s);
                        self.ranges.insert(c, (e, attrs));
                        continue;
                    }
                }
            }
            current = Some(s);
        }
    }
}
