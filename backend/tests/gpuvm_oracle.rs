//! The GPU VM against a per-page oracle: random maps and unmaps over a small
//! window, and after every step each page's backing and permissions, the
//! mapping invariants and `bound_bytes` must match the oracle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/gpuvm_model.rs"]
mod model;

use gpu_backend::gpuvm::{GpuVm, VaLayout};
use guest_proto::PAGE_SIZE;
use model::{MAX_LEN, RESOURCE_PAGES, Source, Step, WINDOW_PAGES};
use proptest::prelude::*;

fn source() -> impl Strategy<Value = Source> {
    prop_oneof![
        (1u32..=3, 0..RESOURCE_PAGES - MAX_LEN)
            .prop_map(|(id, first)| Source::Resource { id, first }),
        (0u64..1 << 20, 1u64..=3).prop_map(|(base, stride)| Source::Pages { base, stride }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let place = (0..WINDOW_PAGES, 1..=MAX_LEN).prop_map(|(page, len)| {
        let len = len.min(WINDOW_PAGES - page);
        (page, len)
    });
    prop_oneof![
        3 => (place.clone(), source(), 1u32..=7, proptest::bool::weighted(0.9)).prop_map(
            |((page, len), source, perms, commit)| Step::Map { page, len, source, perms, commit }
        ),
        2 => (place, proptest::bool::weighted(0.9))
            .prop_map(|((page, len), commit)| Step::Unmap { page, len, commit }),
        1 => (1u32..=3).prop_map(|id| Step::UnmapResource { id }),
        1 => (0..WINDOW_PAGES, 0..MAX_LEN, 1..=MAX_LEN)
            .prop_map(|(page, skip, len)| Step::Rebind { page, skip, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gpuvm_matches_a_per_page_oracle(steps in proptest::collection::vec(step(), 1..60)) {
        let mut vm = GpuVm::new(VaLayout::protocol_default());
        let mut oracle = model::empty();
        for step in &steps {
            model::apply(&mut vm, &mut oracle, step);
        }
        let cleared = vm.clear();
        prop_assert_eq!(cleared.iter().map(|m| m.size).sum::<u64>(),
            oracle.iter().filter(|p| p.is_some()).count() as u64 * PAGE_SIZE);
        prop_assert_eq!(vm.bound_bytes(), 0);
    }
}
