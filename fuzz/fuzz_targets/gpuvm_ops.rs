//! GpuVm operation sequences checked against the per-page model after every
//! step: maps (resource and page-list backed, committed or dropped), unmaps,
//! unmapping a resource, rebinding part of a mapping exactly as it is. The
//! model and its checks are the property test's (`backend/tests/support/
//! gpuvm_model.rs`); the fuzzer only chooses the steps.

#![no_main]
#![allow(clippy::unwrap_used)]

#[path = "../../backend/tests/support/gpuvm_model.rs"]
mod model;

use arbitrary::Arbitrary;
use gpu_backend::gpuvm::{GpuVm, VaLayout};
use libfuzzer_sys::fuzz_target;
use model::{MAX_LEN, RESOURCE_PAGES, Source, Step, WINDOW_PAGES};

#[derive(Arbitrary, Debug)]
enum FuzzSource {
    Resource { id: u8, first: u8 },
    Pages { base: u32, stride: u8 },
}

#[derive(Arbitrary, Debug)]
enum FuzzStep {
    Map {
        page: u8,
        len: u8,
        source: FuzzSource,
        perms: u8,
        commit: bool,
    },
    Unmap {
        page: u8,
        len: u8,
        commit: bool,
    },
    UnmapResource {
        id: u8,
    },
    Rebind {
        page: u8,
        skip: u8,
        len: u8,
    },
}

/// A place in the window: `len` pages from `page`, never past the end.
fn place(page: u8, len: u8) -> (u64, u64) {
    let page = u64::from(page) % WINDOW_PAGES;
    let len = (u64::from(len) % MAX_LEN + 1).min(WINDOW_PAGES - page);
    (page, len)
}

impl From<&FuzzStep> for Step {
    fn from(s: &FuzzStep) -> Step {
        match *s {
            FuzzStep::Map {
                page,
                len,
                ref source,
                perms,
                commit,
            } => {
                let (page, len) = place(page, len);
                let source = match *source {
                    FuzzSource::Resource { id, first } => Source::Resource {
                        id: u32::from(id % 3 + 1),
                        first: u64::from(first) % (RESOURCE_PAGES - MAX_LEN),
                    },
                    FuzzSource::Pages { base, stride } => Source::Pages {
                        base: u64::from(base % (1 << 20)),
                        stride: u64::from(stride % 3 + 1),
                    },
                };
                Step::Map {
                    page,
                    len,
                    source,
                    perms: u32::from(perms % 7 + 1),
                    commit,
                }
            }
            FuzzStep::Unmap { page, len, commit } => {
                let (page, len) = place(page, len);
                Step::Unmap { page, len, commit }
            }
            FuzzStep::UnmapResource { id } => Step::UnmapResource {
                id: u32::from(id % 3 + 1),
            },
            FuzzStep::Rebind { page, skip, len } => Step::Rebind {
                page: u64::from(page) % WINDOW_PAGES,
                skip: u64::from(skip) % MAX_LEN,
                len: u64::from(len) % MAX_LEN + 1,
            },
        }
    }
}

fuzz_target!(|steps: Vec<FuzzStep>| {
    let mut vm = GpuVm::new(VaLayout::protocol_default());
    let mut oracle = model::empty();
    for step in steps.iter().take(256) {
        model::apply(&mut vm, &mut oracle, &Step::from(step));
    }
    let bound = vm.bound_bytes();
    let cleared: u64 = vm.clear().iter().map(|m| m.size).sum();
    assert_eq!(cleared, bound);
    assert_eq!(vm.bound_bytes(), 0);
});
