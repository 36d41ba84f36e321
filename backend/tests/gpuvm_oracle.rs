//! The GpuVm against a per-page oracle: after any sequence of maps and
//! unmaps, every page resolves to the backing the oracle says, mappings
//! never overlap, and the bound byte count matches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use gpu_backend::gpuvm::{Backing, GpuVm, MapRequest, PageList, ResourceSizes, VaLayout};
use guest_proto::{GpuVa, GuestPhysAddr, Perms, ResourceId};
use proptest::prelude::*;

const P: u64 = 4096;
const BASE: u64 = 0x10_0000;
const WINDOW: u64 = 64;

struct Sizes;

impl ResourceSizes for Sizes {
    fn resource_size(&self, id: ResourceId) -> Option<u64> {
        (id.0 < 4).then_some(128 * P)
    }
}

/// What one page maps to: (resource or page list tag, page index), perms.
type PageTarget = ((u32, u64), u32);

#[derive(Clone, Debug)]
enum Action {
    MapResource {
        at: u64,
        pages: u64,
        res: u32,
        off: u64,
        perms: u32,
    },
    MapPages {
        at: u64,
        pages: u64,
        tag: u64,
        perms: u32,
    },
    Unmap {
        at: u64,
        pages: u64,
    },
    DropPlan {
        at: u64,
        pages: u64,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let range = (0..WINDOW).prop_flat_map(|at| (Just(at), 1..=(WINDOW - at).min(24)));
    prop_oneof![
        (range.clone(), 0..4u32, 0..64u64, 1..8u32).prop_map(|((at, pages), res, off, perms)| {
            Action::MapResource {
                at,
                pages,
                res,
                off,
                perms,
            }
        }),
        (range.clone(), 0..1000u64, 1..8u32).prop_map(|((at, pages), tag, perms)| {
            Action::MapPages {
                at,
                pages,
                tag,
                perms,
            }
        }),
        range
            .clone()
            .prop_map(|(at, pages)| Action::Unmap { at, pages }),
        range.prop_map(|(at, pages)| Action::DropPlan { at, pages }),
    ]
}

fn target_of(vm: &GpuVm, page: u64) -> Option<PageTarget> {
    let va = GpuVa(BASE + page * P);
    let m = vm.lookup(va)?;
    let skip = (va.raw() - m.va.raw()) / P;
    let what = match &m.backing {
        Backing::Resource { id, offset } => (id.0, offset / P + skip),
        Backing::Pages(list) => (100, list.pages()[skip as usize].raw() / P),
    };
    Some((what, m.perms.bits()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn matches_a_per_page_oracle(actions in prop::collection::vec(action(), 1..40)) {
        let mut vm = GpuVm::new(VaLayout::protocol_default());
        let mut oracle: BTreeMap<u64, PageTarget> = BTreeMap::new();
        for a in actions {
            match a {
                Action::MapResource { at, pages, res, off, perms } => {
                    let req = MapRequest {
                        va: GpuVa(BASE + at * P),
                        size: pages * P,
                        backing: Backing::Resource { id: ResourceId(res), offset: off * P },
                        perms: Perms::from_bits(perms).unwrap(),
                    };
                    vm.prepare_map(req, &Sizes).unwrap().commit();
                    for i in 0..pages {
                        oracle.insert(at + i, ((res, off + i), perms));
                    }
                }
                Action::MapPages { at, pages, tag, perms } => {
                    let list = (0..pages).map(|i| GuestPhysAddr((tag * 64 + i) * P)).collect();
                    let req = MapRequest {
                        va: GpuVa(BASE + at * P),
                        size: pages * P,
                        backing: Backing::Pages(PageList::new(list)),
                        perms: Perms::from_bits(perms).unwrap(),
                    };
                    vm.prepare_map(req, &Sizes).unwrap().commit();
                    for i in 0..pages {
                        oracle.insert(at + i, ((100, tag * 64 + i), perms));
                    }
                }
                Action::Unmap { at, pages } => {
                    let plan = vm.prepare_unmap(GpuVa(BASE + at * P), pages * P).unwrap();
                    let remaps = plan
                        .ops()
                        .iter()
                        .filter(|op| matches!(op, gpu_backend::gpuvm::Op::Remap { .. }))
                        .count();
                    prop_assert!(remaps <= 2);
                    plan.commit();
                    for i in 0..pages {
                        oracle.remove(&(at + i));
                    }
                }
                Action::DropPlan { at, pages } => {
                    drop(vm.prepare_unmap(GpuVa(BASE + at * P), pages * P).unwrap());
                }
            }
            for page in 0..WINDOW + 1 {
                prop_assert_eq!(target_of(&vm, page), oracle.get(&page).copied(), "page {}", page);
            }
            prop_assert_eq!(vm.bound_bytes(), oracle.len() as u64 * P);
            let mut last_end = 0;
            for m in vm.iter() {
                prop_assert!(m.va.raw() >= last_end, "overlap at {:?}", m.va);
                last_end = m.end().raw();
            }
        }
    }
}
