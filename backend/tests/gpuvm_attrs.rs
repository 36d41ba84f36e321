//! Range attributes of the GPU VM: defaults, splitting, merging,
//! validation, and a per-page oracle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ops::Range;

use gpu_backend::gpuvm::{AttrUpdate, EffectiveAttrs, GpuVm, GpuVmError, VaLayout};
use guest_proto::{FaultPolicy, GpuVa, PAGE_SIZE, Perms};
use proptest::prelude::*;

const BASE: u64 = 0x20_0000;

fn va(page: u64) -> GpuVa {
    GpuVa(BASE + page * PAGE_SIZE)
}

fn vm() -> GpuVm {
    GpuVm::new(VaLayout::protocol_default())
}

fn set(vm: &mut GpuVm, from: u64, to: u64, update: AttrUpdate) {
    vm.set_attrs(va(from), (to - from) * PAGE_SIZE, update)
        .unwrap();
}

fn fatal() -> AttrUpdate {
    AttrUpdate {
        fault_policy: Some(FaultPolicy::Fatal),
        ..AttrUpdate::default()
    }
}

fn granule(shift: u8) -> AttrUpdate {
    AttrUpdate {
        granule_shift: Some(shift),
        ..AttrUpdate::default()
    }
}

fn ranges(vm: &GpuVm, from: u64, to: u64) -> Vec<(Range<GpuVa>, EffectiveAttrs)> {
    vm.attr_ranges_in(va(from), (to - from) * PAGE_SIZE)
        .collect()
}

fn with(update: AttrUpdate) -> EffectiveAttrs {
    EffectiveAttrs::default().updated(&update)
}

#[test]
fn defaults_where_nothing_is_set() {
    let vm = vm();
    let d = vm.attrs_at(va(3));
    assert_eq!(d.access, Perms::ALL);
    assert_eq!(d.fault_policy, FaultPolicy::Recoverable);
    assert_eq!(d.granule_shift, 12);
    assert_eq!(ranges(&vm, 0, 10), vec![(va(0)..va(10), d)]);
    assert_eq!(vm.attr_range_count(), 0);
}

#[test]
fn setting_part_of_a_range_splits_it() {
    let mut vm = vm();
    set(&mut vm, 0, 10, fatal());
    set(&mut vm, 3, 5, granule(16));
    let both = with(fatal()).updated(&granule(16));
    assert_eq!(
        ranges(&vm, 0, 12),
        vec![
            (va(0)..va(3), with(fatal())),
            (va(3)..va(5), both),
            (va(5)..va(10), with(fatal())),
            (va(10)..va(12), EffectiveAttrs::default()),
        ]
    );
    assert_eq!(vm.attrs_at(va(4)), both);
    assert_eq!(vm.attrs_at(GpuVa(va(5).raw() - 1)), both);
    assert_eq!(vm.attrs_at(va(5)), with(fatal()));
    assert_eq!(vm.attrs_at(va(10)), EffectiveAttrs::default());
    // Clipped to the asked range.
    assert_eq!(
        ranges(&vm, 4, 6),
        vec![(va(4)..va(5), both), (va(5)..va(6), with(fatal()))]
    );
}

#[test]
fn equal_neighbours_merge() {
    let mut vm = vm();
    set(&mut vm, 0, 10, fatal());
    set(&mut vm, 3, 5, granule(16));
    assert_eq!(vm.attr_range_count(), 3);
    // Setting the middle back makes all three equal.
    set(&mut vm, 3, 5, granule(12));
    assert_eq!(ranges(&vm, 0, 10), vec![(va(0)..va(10), with(fatal()))]);
    assert_eq!(vm.attr_range_count(), 1);
    // Touching ranges set by separate requests merge too.
    set(&mut vm, 10, 20, fatal());
    assert_eq!(vm.attr_range_count(), 1);
    assert_eq!(ranges(&vm, 0, 20), vec![(va(0)..va(20), with(fatal()))]);
}

#[test]
fn back_to_the_defaults_stores_nothing() {
    let mut vm = vm();
    set(&mut vm, 2, 8, fatal());
    set(
        &mut vm,
        0,
        10,
        AttrUpdate {
            fault_policy: Some(FaultPolicy::Recoverable),
            ..AttrUpdate::default()
        },
    );
    assert_eq!(vm.attr_range_count(), 0);
    assert_eq!(
        ranges(&vm, 0, 10),
        vec![(va(0)..va(10), EffectiveAttrs::default())]
    );
}

#[test]
fn an_update_leaves_the_other_attributes_as_they_were() {
    let mut vm = vm();
    let read_only = AttrUpdate {
        access: Some(Perms::READ),
        ..AttrUpdate::default()
    };
    set(&mut vm, 0, 4, read_only);
    set(&mut vm, 2, 6, fatal());
    assert_eq!(vm.attrs_at(va(1)), with(read_only));
    assert_eq!(vm.attrs_at(va(3)), with(read_only).updated(&fatal()));
    assert_eq!(vm.attrs_at(va(5)), with(fatal()));
}

#[test]
fn attributes_are_independent_of_mappings() {
    let mut vm = vm();
    set(&mut vm, 0, 4, fatal());
    assert!(vm.is_empty());
    vm.prepare_unmap(va(0), 4 * PAGE_SIZE).unwrap().commit();
    assert_eq!(vm.attrs_at(va(1)), with(fatal()));
    vm.clear();
    assert_eq!(vm.attrs_at(va(1)), EffectiveAttrs::default());
}

#[test]
fn a_rejected_update_changes_nothing() {
    let mut vm = vm();
    set(&mut vm, 0, 10, fatal());
    set(&mut vm, 3, 5, granule(20));
    let before = ranges(&vm, 0, 20);
    let bad_granule = AttrUpdate {
        access: Some(Perms::READ),
        fault_policy: Some(FaultPolicy::Recoverable),
        granule_shift: Some(31),
    };
    let rs = VaLayout::protocol_default().reserved;
    let cases = [
        (
            va(0),
            4 * PAGE_SIZE,
            bad_granule,
            GpuVmError::BadGranule(31),
        ),
        (
            va(0),
            4 * PAGE_SIZE,
            granule(11),
            GpuVmError::BadGranule(11),
        ),
        (va(0), 0, fatal(), GpuVmError::ZeroSize(va(0))),
        (
            GpuVa(va(0).raw() + 8),
            PAGE_SIZE,
            fatal(),
            GpuVmError::Misaligned {
                what: "va",
                value: va(0).raw() + 8,
            },
        ),
        (
            va(0),
            PAGE_SIZE + 8,
            fatal(),
            GpuVmError::Misaligned {
                what: "size",
                value: PAGE_SIZE + 8,
            },
        ),
    ];
    for (at, size, update, error) in cases {
        assert_eq!(vm.set_attrs(at, size, update), Err(error));
        assert_eq!(ranges(&vm, 0, 20), before);
    }
    assert!(matches!(
        vm.set_attrs(GpuVa(0), PAGE_SIZE, fatal()),
        Err(GpuVmError::OutsideAperture { .. })
    ));
    assert!(matches!(
        vm.set_attrs(rs.start, PAGE_SIZE, fatal()),
        Err(GpuVmError::Reserved { .. })
    ));
    assert!(matches!(
        vm.set_attrs(GpuVa(!(PAGE_SIZE - 1)), 2 * PAGE_SIZE, fatal()),
        Err(GpuVmError::Overflow { .. })
    ));
    assert_eq!(ranges(&vm, 0, 20), before);
    assert_eq!(vm.attr_range_count(), 3);
}

#[test]
fn the_wire_attributes_convert_to_an_update() {
    let wire = guest_proto::attr::RangeAttrs {
        access: Some(Perms::RW),
        fault_policy: None,
        granule_shift: Some(21),
        prefault: Some(true),
    };
    assert_eq!(
        AttrUpdate::from(&wire),
        AttrUpdate {
            access: Some(Perms::RW),
            fault_policy: None,
            granule_shift: Some(21),
        }
    );
}

const WINDOW: u64 = 40;

fn update() -> impl Strategy<Value = AttrUpdate> {
    (
        proptest::option::of(0u32..=7),
        proptest::option::of(proptest::bool::ANY),
        proptest::option::of(12u8..=14),
    )
        .prop_map(|(access, fatal, shift)| AttrUpdate {
            access: access.and_then(Perms::from_bits),
            fault_policy: fatal.map(|f| {
                if f {
                    FaultPolicy::Fatal
                } else {
                    FaultPolicy::Recoverable
                }
            }),
            granule_shift: shift,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn attributes_match_a_per_page_oracle(
        steps in proptest::collection::vec((0..WINDOW, 1..=WINDOW, update()), 1..40)
    ) {
        let mut vm = vm();
        let mut oracle = vec![EffectiveAttrs::default(); WINDOW as usize];
        for (page, len, update) in steps {
            let len = len.min(WINDOW - page);
            set(&mut vm, page, page + len, update);
            for slot in &mut oracle[page as usize..(page + len) as usize] {
                *slot = slot.updated(&update);
            }
            for (p, expected) in oracle.iter().enumerate() {
                prop_assert_eq!(vm.attrs_at(va(p as u64)), *expected);
            }
            let got = ranges(&vm, 0, WINDOW);
            // Contiguous, covering, and neighbours always differ.
            prop_assert_eq!(got.first().map(|r| r.0.start), Some(va(0)));
            prop_assert_eq!(got.last().map(|r| r.0.end), Some(va(WINDOW)));
            for w in got.windows(2) {
                prop_assert_eq!(w[0].0.end, w[1].0.start);
                prop_assert_ne!(w[0].1, w[1].1);
            }
            // Nothing stored outside the window, and no stored range is
            // the default.
            let stored = oracle.iter().filter(|a| **a != EffectiveAttrs::default()).count();
            prop_assert!(vm.attr_range_count() <= stored);
            prop_assert_eq!(ranges(&vm, WINDOW, WINDOW + 10).len(), 1);
        }
    }
}
