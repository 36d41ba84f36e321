//! The compute units' scheduler: which ready wave runs next.
//!
//! A wave runs for at most one time slice ([`SimConfig::time_slice`]), then
//! goes back here, like a hardware queue's quantum on a GPU with compute
//! time slicing (amdgpu's MES / HWS quantum, NVIDIA's time-sliced
//! scheduling). What runs next is decided in two levels, both *weighted
//! fair queueing* on device time actually used (a virtual clock per
//! entity, the entity with the smallest virtual time runs next, CFS-style):
//!
//! 1. **Between VMs (contexts)**, all with the same weight: every context
//!    with ready work gets an equal share of the compute units, however many
//!    queues or waves it has. One context's long dispatches cannot hold the
//!    device from the others for more than a slice at a time.
//! 2. **Between the queues of one VM**, weighted by queue priority: a queue
//!    of priority `p` (0..=15) has weight `p + 1`, so when queues compete a
//!    priority-15 queue gets 16 times the device time of a priority-0 one.
//!    No queue starves: a ready queue's virtual time stands still while it
//!    waits and the others' advances, so it is picked again after the
//!    others have used at most `weight_other / weight_own` of its last slice
//!    each (for priority 15 against 0: 16 slices).
//!
//! Waves of one queue run in arrival order. An entity that becomes ready
//! after idling starts no earlier than one slice's worth of virtual time
//! before the current virtual clock of its level: idle time is not banked
//! as credit beyond that (and a busy entity's debt is kept), while a queue
//! that is empty for a moment between two dispatches keeps the lead its
//! weight earned.
//!
//! [`SimConfig::time_slice`]: super::SimConfig::time_slice

use std::collections::{BTreeSet, HashMap, VecDeque};

use guest_proto::QueueId;

/// Highest queue priority; higher values are clamped to it.
pub const MAX_PRIORITY: u8 = 15;

/// Who a wave belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Key {
    /// The VM (context).
    pub vm: u64,
    /// The queue in the VM.
    pub queue: QueueId,
    /// The queue's priority, 0..=15.
    pub priority: u8,
}

/// Virtual time a queue of `priority` is charged per nanosecond it runs:
/// `L / (priority + 1)` with `L` the least common multiple of 1..=16, so
/// every weight `priority + 1` is exact.
fn queue_rate(priority: u8) -> u128 {
    720_720 / (u128::from(priority.min(MAX_PRIORITY)) + 1)
}

struct QueueRq<W> {
    vtime: u128,
    priority: u8,
    waves: VecDeque<W>,
}

struct VmRq<W> {
    vtime: u64,
    /// Virtual clock of the VM's queues: the virtual time of the queue
    /// picked last.
    clock: u128,
    queues: HashMap<QueueId, QueueRq<W>>,
    /// Queues with ready waves, by virtual time.
    ready: BTreeSet<(u128, QueueId)>,
}

/// Ready waves of every VM; see the module docs for the policy.
pub(crate) struct Scheduler<W> {
    /// The most credit an entity keeps when it becomes ready: one time
    /// slice, in nanoseconds.
    slice_ns: u64,
    /// Virtual clock of the VMs: the virtual time of the VM picked last.
    clock: u64,
    vms: HashMap<u64, VmRq<W>>,
    /// VMs with ready waves, by virtual time.
    ready: BTreeSet<(u64, u64)>,
}

impl<W> Scheduler<W> {
    /// An empty scheduler for time slices of `slice_ns` nanoseconds.
    pub(crate) fn new(slice_ns: u64) -> Self {
        Scheduler {
            slice_ns,
            clock: 0,
            vms: HashMap::new(),
            ready: BTreeSet::new(),
        }
    }

    /// Ready waves.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.vms
            .values()
            .flat_map(|v| v.queues.values())
            .map(|q| q.waves.len())
            .sum()
    }

    /// Makes `wave` ready, behind the ready waves of its queue.
    pub(crate) fn push(&mut self, key: Key, wave: W) {
        let clock = self.clock;
        let vm_floor = clock.saturating_sub(self.slice_ns);
        // A slice at the lowest weight: the largest charge of one slice.
        let queue_credit = u128::from(self.slice_ns) * queue_rate(0);
        let vm = self.vms.entry(key.vm).or_insert_with(|| VmRq {
            vtime: vm_floor,
            clock: 0,
            queues: HashMap::new(),
            ready: BTreeSet::new(),
        });
        let vm_was_ready = !vm.ready.is_empty();
        let q_floor = vm.clock.saturating_sub(queue_credit);
        let q = vm.queues.entry(key.queue).or_insert_with(|| QueueRq {
            vtime: q_floor,
            priority: key.priority,
            waves: VecDeque::new(),
        });
        q.priority = key.priority;
        if q.waves.is_empty() {
            q.vtime = q.vtime.max(q_floor);
            vm.ready.insert((q.vtime, key.queue));
        }
        q.waves.push_back(wave);
        if !vm_was_ready {
            vm.vtime = vm.vtime.max(vm_floor);
            self.ready.insert((vm.vtime, key.vm));
        }
    }

    /// Takes the wave to run next.
    pub(crate) fn pop(&mut self) -> Option<(Key, W)> {
        let &(vm_vtime, vm_id) = self.ready.first()?;
        self.clock = self.clock.max(vm_vtime);
        let vm = self.vms.get_mut(&vm_id)?;
        let &(q_vtime, q_id) = vm.ready.first()?;
        vm.clock = vm.clock.max(q_vtime);
        let q = vm.queues.get_mut(&q_id)?;
        let wave = q.waves.pop_front()?;
        let key = Key {
            vm: vm_id,
            queue: q_id,
            priority: q.priority,
        };
        if q.waves.is_empty() {
            vm.ready.remove(&(q_vtime, q_id));
        }
        if vm.ready.is_empty() {
            self.ready.remove(&(vm_vtime, vm_id));
        }
        Some((key, wave))
    }

    /// Charges `ns` nanoseconds of device time to the wave's VM and queue.
    pub(crate) fn charge(&mut self, key: Key, ns: u64) {
        let Some(vm) = self.vms.get_mut(&key.vm) else {
            return;
        };
        let vm_ready = !vm.ready.is_empty();
        if vm_ready {
            self.ready.remove(&(vm.vtime, key.vm));
        }
        vm.vtime = vm.vtime.saturating_add(ns);
        if vm_ready {
            self.ready.insert((vm.vtime, key.vm));
        }
        if let Some(q) = vm.queues.get_mut(&key.queue) {
            let q_ready = !q.waves.is_empty();
            if q_ready {
                vm.ready.remove(&(q.vtime, key.queue));
            }
            q.vtime = q
                .vtime
                .saturating_add(u128::from(ns).saturating_mul(queue_rate(q.priority)));
            if q_ready {
                vm.ready.insert((q.vtime, key.queue));
            }
        }
    }

    /// Forgets a queue that has no ready wave (it was destroyed).
    pub(crate) fn forget_queue(&mut self, vm: u64, queue: QueueId) {
        if let Some(v) = self.vms.get_mut(&vm) {
            if v.queues.get(&queue).is_some_and(|q| q.waves.is_empty()) {
                v.queues.remove(&queue);
            }
        }
    }

    /// Forgets a VM that has no ready wave (it was released).
    pub(crate) fn forget_vm(&mut self, vm: u64) {
        if self.vms.get(&vm).is_some_and(|v| v.ready.is_empty()) {
            self.vms.remove(&vm);
        }
    }

    /// VMs and queues known (for tests of the bookkeeping's bounds).
    #[cfg(test)]
    pub(crate) fn entities(&self) -> (usize, usize) {
        (
            self.vms.len(),
            self.vms.values().map(|v| v.queues.len()).sum(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(vm: u64, queue: u32, priority: u8) -> Key {
        Key {
            vm,
            queue: QueueId(queue),
            priority,
        }
    }

    /// Runs the scheduler like compute units whose waves each run `ns` and
    /// come straight back; returns the owners of the first `n` picks.
    fn simulate(s: &mut Scheduler<u32>, n: usize, ns: u64) -> Vec<(u64, u32)> {
        (0..n)
            .map(|_| {
                let (k, w) = s.pop().unwrap();
                s.charge(k, ns);
                s.push(k, w);
                (k.vm, k.queue.0)
            })
            .collect()
    }

    #[test]
    fn vms_share_equally_whatever_their_queue_count() {
        let mut s = Scheduler::new(1_000_000);
        // VM 1: eight waves on four high-priority queues; VM 2: one wave.
        for q in 0..4 {
            s.push(key(1, q, 15), 0);
            s.push(key(1, q, 15), 1);
        }
        s.push(key(2, 9, 0), 2);
        let picks = simulate(&mut s, 1000, 1_000_000);
        let vm2 = picks.iter().filter(|p| p.0 == 2).count();
        assert!((499..=501).contains(&vm2), "VM 2 ran {vm2} of 1000 slices");
        // Never more than one slice of VM 1 between two of VM 2.
        assert!(picks.windows(2).all(|w| w[0].0 != 1 || w[1].0 != 1));
    }

    #[test]
    fn queue_priority_is_a_weight_and_nothing_starves() {
        let mut s = Scheduler::new(1_000_000);
        s.push(key(1, 1, 15), 0);
        s.push(key(1, 2, 0), 1);
        s.push(key(1, 3, 7), 2);
        let picks = simulate(&mut s, 2500, 1000);
        let share = |q: u32| picks.iter().filter(|p| p.1 == q).count();
        // Weights 16 : 1 : 8 of 25.
        assert!((1590..=1610).contains(&share(1)), "{}", share(1));
        assert!((95..=105).contains(&share(2)), "{}", share(2));
        assert!((795..=805).contains(&share(3)), "{}", share(3));
        // The lowest queue runs at least once in every 26 slices.
        let lows: Vec<usize> = picks
            .iter()
            .enumerate()
            .filter(|(_, p)| p.1 == 2)
            .map(|(i, _)| i)
            .collect();
        assert!(lows[0] < 26);
        assert!(lows.windows(2).all(|w| w[1] - w[0] <= 26), "{lows:?}");
    }

    #[test]
    fn idle_time_is_not_credit_and_waves_of_a_queue_keep_their_order() {
        let mut s = Scheduler::new(1_000_000);
        s.push(key(1, 1, 0), 10);
        simulate(&mut s, 100, 1_000_000);
        // VM 2 arrives after VM 1 ran alone for 100 slices: it keeps at
        // most one slice of credit, so it gets 6 of the next 10 slices and
        // never more than two in a row, not 100.
        s.push(key(2, 1, 0), 20);
        s.push(key(2, 1, 0), 21);
        let picks = simulate(&mut s, 10, 1_000_000);
        assert_eq!(picks.iter().filter(|p| p.0 == 2).count(), 6, "{picks:?}");
        assert!(picks.windows(3).all(|w| w.iter().any(|p| p.0 == 1)));
        assert_eq!(s.len(), 3);

        // One queue's waves come out in the order they went in.
        let mut s = Scheduler::new(1_000_000);
        for w in 0..5 {
            s.push(key(7, 1, 0), w);
        }
        let order: Vec<u32> = std::iter::from_fn(|| s.pop().map(|(_, w)| w)).collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn forgotten_queues_and_vms_leave_nothing_behind() {
        let mut s = Scheduler::new(1_000_000);
        s.push(key(1, 1, 3), 1);
        s.push(key(1, 2, 3), 2);
        s.forget_queue(1, QueueId(1));
        assert_eq!(s.entities(), (1, 2), "a queue with a ready wave stays");
        let (k, _) = s.pop().unwrap();
        s.forget_queue(k.vm, k.queue);
        s.forget_vm(1);
        assert_eq!(s.entities(), (1, 1), "a VM with a ready wave stays");
        let (k, _) = s.pop().unwrap();
        s.forget_queue(k.vm, k.queue);
        s.forget_vm(1);
        assert_eq!(s.entities(), (0, 0));
        assert!(s.pop().is_none());
    }
}
