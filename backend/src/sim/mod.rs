//! The simulated GPU: the daemon's default device.
//!
//! It stands in for hardware we do not have, so it behaves like hardware
//! where the layers above can tell:
//!
//! - every VM has its own four-level page tables ([`page_table`]); every
//!   access goes through a compute unit's TLB ([`tlb`]) or a page walk;
//! - an unmap clears the entries, shoots the TLBs down (a generation bump)
//!   and waits for accesses in flight, so guest pages can be reused as soon
//!   as it returns;
//! - compute queues run the protocol's kernel set on a pool of worker
//!   threads, one per compute unit, in *waves* of work items ([`kernels`]);
//! - a wave that touches an unmapped or under-privileged page stalls and
//!   raises a *retry fault*, like amdgpu with XNACK on or NVIDIA UVM: faults
//!   are deduplicated per page, delivered in batches, and each ends exactly
//!   once, by a replay of the stalled waves or by cancelling their dispatch
//!   ([`vm`]);
//! - user-mode queues (protocol 1.1): a command processor thread (`cp.rs`)
//!   watches their doorbells in guest memory under a CPU budget
//!   ([`doorbell`]) and runs a copy engine (`sdma.rs`) and an AQL packet
//!   processor (`aql.rs`) whose every access goes through the VM exactly
//!   like a wave's (`gpu_access.rs`), faults included (`user_queue.rs`).
//!
//! Guest memory is touched only through vm-memory, so an address outside
//! guest RAM fails the work instead of reaching host memory.

mod aql;
mod cp;
pub mod doorbell;
mod gpu_access;
pub mod kernels;
pub mod page_table;
mod sdma;
pub mod tlb;
mod user_queue;
pub mod vm;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::device::{Device, DeviceError, DeviceInfo, DeviceVm, VmConfig, VmEvents};
use cp::CommandProcessor;
use guest_proto::kernel::ALL_KERNELS_MASK;
use vm::{SimVm, Wave};

/// Settings of the simulated GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Compute units, one worker thread each.
    pub compute_units: usize,
    /// Waves of one dispatch that may be in flight (running or stalled on a
    /// fault) at once.
    pub max_waves_per_dispatch: u32,
    /// Queues one VM may have.
    pub max_queues_per_vm: u32,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            compute_units: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_waves_per_dispatch: 64,
            max_queues_per_vm: 64,
        }
    }
}

/// The waves ready to run, shared by the compute units.
pub(crate) struct Pool {
    ready: Mutex<VecDeque<Wave>>,
    wakeup: Condvar,
    stop: AtomicBool,
}

impl Pool {
    pub(crate) fn push(&self, wave: Wave) {
        self.ready.lock().push_back(wave);
        self.wakeup.notify_one();
    }

    fn pop(&self) -> Option<Wave> {
        let mut ready = self.ready.lock();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            if let Some(w) = ready.pop_front() {
                return Some(w);
            }
            self.wakeup.wait(&mut ready);
        }
    }
}

/// The simulated GPU.
pub struct SimGpu {
    info: DeviceInfo,
    config: SimConfig,
    pool: Arc<Pool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    next_vm: AtomicU64,
    cp: Arc<CommandProcessor>,
}

impl std::fmt::Debug for SimGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimGpu")
            .field("info", &self.info)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SimGpu {
    /// Starts the compute units.
    pub fn new(config: SimConfig) -> Arc<SimGpu> {
        let config = SimConfig {
            compute_units: config.compute_units.max(1),
            max_waves_per_dispatch: config.max_waves_per_dispatch.max(1),
            ..config
        };
        let pool = Arc::new(Pool {
            ready: Mutex::new(VecDeque::new()),
            wakeup: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let workers = (0..config.compute_units)
            .filter_map(|cu| {
                let pool = pool.clone();
                std::thread::Builder::new()
                    .name(format!("sim-cu{cu}"))
                    .spawn(move || vm::compute_unit(&pool))
                    .map_err(|e| log::error!("cannot start compute unit {cu}: {e}"))
                    .ok()
            })
            .collect();
        let info = DeviceInfo {
            name: "vhost-gpu-nc simulated GPU".into(),
            va_bits: page_table::VA_BITS as u8,
            page_sizes: 1 << guest_proto::PAGE_SHIFT,
            compute_units: u32::try_from(config.compute_units).unwrap_or(u32::MAX),
            max_queues_per_vm: config.max_queues_per_vm,
            kernels: ALL_KERNELS_MASK,
            recoverable_faults: true,
            user_queue_kinds: guest_proto::uq::USER_QUEUE_KINDS_ALL,
        };
        Arc::new(SimGpu {
            info,
            config,
            pool,
            workers: Mutex::new(workers),
            next_vm: AtomicU64::new(1),
            cp: CommandProcessor::start(),
        })
    }
}

impl Drop for SimGpu {
    fn drop(&mut self) {
        {
            // Under the lock: a compute unit between its check of `stop` and
            // its wait cannot miss the wakeup.
            let _ready = self.pool.ready.lock();
            self.pool.stop.store(true, Ordering::Release);
        }
        self.pool.wakeup.notify_all();
        for w in self.workers.lock().drain(..) {
            let _ = w.join();
        }
        self.cp.shutdown();
    }
}

impl Device for SimGpu {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn create_vm(
        &self,
        config: VmConfig,
        events: Arc<dyn VmEvents>,
    ) -> Result<Arc<dyn DeviceVm>, DeviceError> {
        let id = self.next_vm.fetch_add(1, Ordering::Relaxed);
        Ok(SimVm::new(
            id,
            config,
            events,
            self.pool.clone(),
            self.config,
            self.cp.clone(),
        ))
    }
}
