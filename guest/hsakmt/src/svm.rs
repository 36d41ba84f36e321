//! SVM range attributes (`hsaKmtSVMSetAttr` / `GetAttr`), kept per page
//! range with split/merge semantics like KFD's `svm_range`s, and their
//! translation into the device's `RANGE_ATTR` (docs/protocol.md 5.6).

use std::collections::BTreeMap;

use guest_proto::attr::{MAX_GRANULE_SHIFT, RangeAttrs};
use guest_proto::{PAGE_SHIFT, Perms};

use crate::topology::GPU_NODE;
use crate::types::*;

/// KFD's `KFD_IOCTL_SVM_LOCATION_UNDEFINED`.
pub const LOCATION_UNDEFINED: u32 = 0xffff_ffff;
/// KFD's default granularity: 2^9 pages = 2 MiB.
pub const DEFAULT_GRANULARITY: u32 = 9;
/// KFD's default flags.
pub const DEFAULT_FLAGS: u32 = HSA_SVM_FLAG_HOST_ACCESS | HSA_SVM_FLAG_COHERENT;

/// GPU access to a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `HSA_SVM_ATTR_NO_ACCESS`.
    None,
    /// `HSA_SVM_ATTR_ACCESS`.
    Access,
    /// `HSA_SVM_ATTR_ACCESS_IN_PLACE`.
    InPlace,
}

/// The attributes of one range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attrs {
    /// Preferred location (node id, or undefined).
    pub preferred: u32,
    /// Prefetch location (node id; 0 = system memory).
    pub prefetch: u32,
    /// The GPU's access (with XNACK on, every range is accessible).
    pub access: Access,
    /// `HSA_SVM_FLAG_*`.
    pub flags: u32,
    /// log2 of the granule in pages.
    pub granularity: u32,
}

impl Default for Attrs {
    fn default() -> Attrs {
        Attrs {
            preferred: LOCATION_UNDEFINED,
            prefetch: 0,
            access: Access::Access,
            flags: DEFAULT_FLAGS,
            granularity: DEFAULT_GRANULARITY,
        }
    }
}

/// A set request, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    preferred: Option<u32>,
    prefetch: Option<u32>,
    access: Option<Access>,
    set_flags: u32,
    clr_flags: u32,
    granularity: Option<u32>,
}

fn valid_node(n: u32) -> bool {
    n <= GPU_NODE || n == LOCATION_UNDEFINED
}

impl Change {
    /// Validates attributes as the real thunk + KFD do: locations and
    /// access entries must name a known node; flags must be known bits.
    pub fn parse(attrs: &[HSA_SVM_ATTRIBUTE]) -> Result<Change, HsakmtStatus> {
        let bad = HSAKMT_STATUS_INVALID_PARAMETER;
        let mut c = Change::default();
        for a in attrs {
            match a.type_ {
                HSA_SVM_ATTR_PREFERRED_LOC if valid_node(a.value) => c.preferred = Some(a.value),
                HSA_SVM_ATTR_PREFETCH_LOC if valid_node(a.value) => c.prefetch = Some(a.value),
                HSA_SVM_ATTR_ACCESS | HSA_SVM_ATTR_ACCESS_IN_PLACE | HSA_SVM_ATTR_NO_ACCESS => {
                    if a.value != GPU_NODE {
                        return Err(bad);
                    }
                    c.access = Some(match a.type_ {
                        HSA_SVM_ATTR_ACCESS => Access::Access,
                        HSA_SVM_ATTR_ACCESS_IN_PLACE => Access::InPlace,
                        _ => Access::None,
                    });
                }
                HSA_SVM_ATTR_SET_FLAGS if a.value & !0x3f == 0 => c.set_flags |= a.value,
                HSA_SVM_ATTR_CLR_FLAGS if a.value & !0x3f == 0 => c.clr_flags |= a.value,
                HSA_SVM_ATTR_GRANULARITY if a.value <= 18 => c.granularity = Some(a.value),
                _ => return Err(bad),
            }
        }
        Ok(c)
    }

    fn apply(&self, a: &mut Attrs) {
        if let Some(p) = self.preferred {
            a.preferred = p;
        }
        if let Some(p) = self.prefetch {
            a.prefetch = p;
        }
        if let Some(x) = self.access {
            a.access = x;
        }
        a.flags = (a.flags | self.set_flags) & !self.clr_flags;
        if let Some(g) = self.granularity {
            a.granularity = g;
        }
    }

    /// What the device must be told about the range after this change.
    pub fn device_attrs(&self, after: &Attrs) -> RangeAttrs {
        let touches_access = self.access.is_some() || self.set_flags != 0 || self.clr_flags != 0;
        RangeAttrs {
            access: touches_access.then(|| device_perms(after)),
            fault_policy: None,
            granule_shift: self
                .granularity
                .map(|g| (PAGE_SHIFT + g).min(u32::from(MAX_GRANULE_SHIFT)) as u8),
            prefault: (self.prefetch == Some(GPU_NODE)).then_some(true),
        }
    }
}

/// The device permissions a range's attributes allow.
pub fn device_perms(a: &Attrs) -> Perms {
    match a.access {
        Access::None => Perms::NONE,
        _ => {
            let mut p = Perms::READ;
            if a.flags & HSA_SVM_FLAG_GPU_RO == 0 {
                p = p.union(Perms::WRITE);
            }
            if a.flags & HSA_SVM_FLAG_GPU_EXEC != 0 {
                p = p.union(Perms::EXEC);
            }
            p
        }
    }
}

/// Attributes over page ranges: `start -> (end, attrs)`, non-overlapping;
/// pages not covered have the defaults.
#[derive(Debug, Default)]
pub struct SvmRanges {
    ranges: BTreeMap<u64, (u64, Attrs)>,
}

/// Most ranges kept (a hostile caller cannot grow the table without bound).
pub const MAX_RANGES: usize = 65_536;

impl SvmRanges {
    /// Pieces covering `[start, end)` in order, defaults filled in.
    fn pieces(&self, start: u64, end: u64) -> Vec<(u64, u64, Attrs)> {
        let mut out = Vec::new();
        let mut at = start;
        let first = self
            .ranges
            .range(..=start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map(|(s, _)| *s)
            .unwrap_or(start);
        for (s, (e, a)) in self.ranges.range(first..end) {
            let (s, e) = ((*s).max(start), (*e).min(end));
            if s > at {
                out.push((at, s, Attrs::default()));
            }
            if e > s {
                out.push((s, e, *a));
            }
            at = at.max(e);
        }
        if at < end {
            out.push((at, end, Attrs::default()));
        }
        out
    }

    /// Applies a change to `[start, end)` (page-aligned).
    pub fn set(&mut self, start: u64, end: u64, c: &Change) -> Result<(), HsakmtStatus> {
        let pieces = self.pieces(start, end);
        // Split the ranges straddling the ends.
        let keep: Vec<(u64, (u64, Attrs))> = self
            .ranges
            .range(..end)
            .filter(|(s, (e, _))| *e > start && **s < end)
            .map(|(s, v)| (*s, *v))
            .collect();
        if self.ranges.len() + pieces.len() + 2 > MAX_RANGES {
            return Err(HSAKMT_STATUS_NO_MEMORY);
        }
        for (s, (e, a)) in keep {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, (start, a));
            }
            if e > end {
                self.ranges.insert(end, (e, a));
            }
        }
        for (s, e, mut a) in pieces {
            c.apply(&mut a);
            self.ranges.insert(s, (e, a));
        }
        self.merge_around(start, end);
        Ok(())
    }

    fn merge_around(&mut self, start: u64, end: u64) {
        let from = self
            .ranges
            .range(..start)
            .next_back()
            .map(|(s, _)| *s)
            .unwrap_or(start);
        let keys: Vec<u64> = self.ranges.range(from..=end).map(|(s, _)| *s).collect();
        let mut prev: Option<u64> = None;
        for k in keys {
            let Some(&(e, a)) = self.ranges.get(&k) else {
                continue;
            };
            if let Some(p) = prev {
                if let Some(&(pe, pa)) = self.ranges.get(&p) {
                    if pe == k && pa == a {
                        self.ranges.remove(&k);
                        self.ranges.insert(p, (e, a));
                        continue;
                    }
                }
            }
            prev = Some(k);
        }
    }

    /// `GetAttr` over `[start, end)`: each query in `attrs` is answered
    /// the way KFD answers it for a range whose pieces differ (locations:
    /// undefined unless uniform; set flags: the AND; clear flags: what no
    /// piece has; granularity: the smallest; access: the weakest).
    pub fn get(
        &self,
        start: u64,
        end: u64,
        attrs: &mut [HSA_SVM_ATTRIBUTE],
    ) -> Result<(), HsakmtStatus> {
        let pieces = self.pieces(start, end);
        let uniform = |f: fn(&Attrs) -> u32| {
            let mut it = pieces.iter().map(|p| f(&p.2));
            let first = it.next().unwrap_or(LOCATION_UNDEFINED);
            if it.all(|v| v == first) {
                first
            } else {
                LOCATION_UNDEFINED
            }
        };
        for a in attrs.iter_mut() {
            match a.type_ {
                HSA_SVM_ATTR_PREFERRED_LOC => a.value = uniform(|x| x.preferred),
                HSA_SVM_ATTR_PREFETCH_LOC => a.value = uniform(|x| x.prefetch),
                HSA_SVM_ATTR_ACCESS | HSA_SVM_ATTR_ACCESS_IN_PLACE | HSA_SVM_ATTR_NO_ACCESS => {
                    if a.value != GPU_NODE {
                        return Err(HSAKMT_STATUS_INVALID_PARAMETER);
                    }
                    let weakest = pieces
                        .iter()
                        .map(|p| p.2.access)
                        .fold(Access::Access, |w, x| match (w, x) {
                            (Access::None, _) | (_, Access::None) => Access::None,
                            (Access::InPlace, _) | (_, Access::InPlace) => Access::InPlace,
                            _ => Access::Access,
                        });
                    a.type_ = match weakest {
                        Access::None => HSA_SVM_ATTR_NO_ACCESS,
                        Access::InPlace => HSA_SVM_ATTR_ACCESS_IN_PLACE,
                        Access::Access => HSA_SVM_ATTR_ACCESS,
                    };
                }
                HSA_SVM_ATTR_SET_FLAGS => {
                    a.value = pieces.iter().fold(!0, |f, p| f & p.2.flags) & 0x3f
                }
                HSA_SVM_ATTR_CLR_FLAGS => {
                    a.value = !pieces.iter().fold(0, |f, p| f | p.2.flags) & 0x3f
                }
                HSA_SVM_ATTR_GRANULARITY => {
                    a.value = pieces
                        .iter()
                        .map(|p| p.2.granularity)
                        .min()
                        .unwrap_or(DEFAULT_GRANULARITY)
                }
                _ => return Err(HSAKMT_STATUS_INVALID_PARAMETER),
            }
        }
        Ok(())
    }

    /// Ranges stored.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(type_: u32, value: u32) -> HSA_SVM_ATTRIBUTE {
        HSA_SVM_ATTRIBUTE { type_, value }
    }

    #[test]
    fn set_then_get_round_trips_and_splits() {
        let mut r = SvmRanges::default();
        let c = Change::parse(&[
            attr(HSA_SVM_ATTR_PREFERRED_LOC, GPU_NODE),
            attr(HSA_SVM_ATTR_SET_FLAGS, HSA_SVM_FLAG_GPU_RO),
            attr(HSA_SVM_ATTR_GRANULARITY, 4),
            attr(HSA_SVM_ATTR_ACCESS_IN_PLACE, GPU_NODE),
        ])
        .unwrap();
        r.set(0x10000, 0x20000, &c).unwrap();
        let mut q = [
            attr(HSA_SVM_ATTR_PREFERRED_LOC, 0),
            attr(HSA_SVM_ATTR_SET_FLAGS, 0),
            attr(HSA_SVM_ATTR_GRANULARITY, 0),
            attr(HSA_SVM_ATTR_ACCESS, GPU_NODE),
        ];
        r.get(0x10000, 0x20000, &mut q).unwrap();
        assert_eq!(q[0].value, GPU_NODE);
        assert_eq!(q[1].value, DEFAULT_FLAGS | HSA_SVM_FLAG_GPU_RO);
        assert_eq!(q[2].value, 4);
        assert_eq!(q[3].type_, HSA_SVM_ATTR_ACCESS_IN_PLACE);
        // Half inside, half outside: locations are no longer uniform.
        r.get(0x18000, 0x28000, &mut q).unwrap();
        assert_eq!(q[0].value, LOCATION_UNDEFINED);
        assert_eq!(q[1].value, DEFAULT_FLAGS);
        assert_eq!(q[2].value, 4);
        // A set in the middle splits the range in three; undoing merges.
        let mid = Change::parse(&[attr(HSA_SVM_ATTR_PREFERRED_LOC, 0)]).unwrap();
        r.set(0x14000, 0x18000, &mid).unwrap();
        assert_eq!(r.len(), 3);
        let back = Change::parse(&[attr(HSA_SVM_ATTR_PREFERRED_LOC, GPU_NODE)]).unwrap();
        r.set(0x14000, 0x18000, &back).unwrap();
        assert_eq!(r.len(), 1, "merged again");
    }

    #[test]
    fn bad_attributes_are_refused() {
        assert!(Change::parse(&[attr(99, 0)]).is_err());
        assert!(
            Change::parse(&[attr(HSA_SVM_ATTR_ACCESS, 7)]).is_err(),
            "unknown node"
        );
        assert!(Change::parse(&[attr(HSA_SVM_ATTR_SET_FLAGS, 1 << 20)]).is_err());
        assert!(Change::parse(&[attr(HSA_SVM_ATTR_GRANULARITY, 40)]).is_err());
    }

    #[test]
    fn device_attrs_follow_access_and_granularity() {
        let c = Change::parse(&[
            attr(HSA_SVM_ATTR_NO_ACCESS, GPU_NODE),
            attr(HSA_SVM_ATTR_GRANULARITY, 9),
            attr(HSA_SVM_ATTR_PREFETCH_LOC, GPU_NODE),
        ])
        .unwrap();
        let mut a = Attrs::default();
        c.apply(&mut a);
        let d = c.device_attrs(&a);
        assert_eq!(d.access, Some(Perms::NONE));
        assert_eq!(d.granule_shift, Some(21));
        assert_eq!(d.prefault, Some(true));
        let ro = Change::parse(&[attr(HSA_SVM_ATTR_SET_FLAGS, HSA_SVM_FLAG_GPU_RO)]).unwrap();
        let mut a = Attrs::default();
        ro.apply(&mut a);
        assert_eq!(ro.device_attrs(&a).access, Some(Perms::READ));
        assert_eq!(ro.device_attrs(&a).granule_shift, None);
    }
}
