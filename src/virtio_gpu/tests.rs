//! Queue draining and fence completion on `virtio_queue`'s mock split
//! queues: the vhost-user backend without a socket, in one thread.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use parking_lot::Mutex;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::protocol::{
    CtrlHdr, VIRTIO_GPU_CMD_CTX_CREATE, VIRTIO_GPU_CMD_GET_DISPLAY_INFO,
    VIRTIO_GPU_CMD_MOVE_CURSOR, VIRTIO_GPU_CMD_SUBMIT_3D, VIRTIO_GPU_FLAG_FENCE,
    VIRTIO_GPU_FLAG_INFO_RING_IDX, VIRTIO_GPU_RESP_ERR_UNSPEC, VIRTIO_GPU_RESP_OK_DISPLAY_INFO,
    VIRTIO_GPU_RESP_OK_NODATA,
};
use super::vring::GpuVring;
use super::{CONTROL_QUEUE, CURSOR_QUEUE, FENCE_EVENT, GpuLimits, GpuVhostBackend};
use crate::context_backend::{
    CapsetInfo, ContextBackend, ContextBackendError, ContextBackendFactory, ContextInit, CtxId,
    FenceCompleter, FenceDisposition, FenceRef, ResourceId, ResourceView,
};

/// Queue size of the mock queues.
const QSIZE: u16 = 16;
/// Where the control and cursor rings live.
const RINGS: [u64; 2] = [0x1_0000, 0x2_0000];
/// Request and response buffers: slot `i` at `DATA + i * 0x1000`.
const DATA: u64 = 0x10_0000;

/// Contexts that hold a submit's fence when its payload says "hold".
struct FakeContexts;

impl ContextBackend for FakeContexts {
    fn capsets(&self) -> Vec<CapsetInfo> {
        Vec::new()
    }
    fn capset(&self, _id: u32, _version: u32) -> Option<Vec<u8>> {
        None
    }
    fn set_memory(&mut self, _memory: gpu_backend::GuestRam) {}
    fn create_context(
        &mut self,
        _ctx: CtxId,
        _init: ContextInit,
        _name: &str,
    ) -> Result<(), ContextBackendError> {
        Ok(())
    }
    fn destroy_context(&mut self, _ctx: CtxId) {}
    fn attach_resource(
        &mut self,
        _ctx: CtxId,
        _res: &ResourceView,
    ) -> Result<(), ContextBackendError> {
        Ok(())
    }
    fn detach_resource(&mut self, _ctx: CtxId, _res: ResourceId) {}
    fn submit(
        &mut self,
        _ctx: CtxId,
        commands: &[u8],
        _fence: Option<FenceRef>,
    ) -> Result<FenceDisposition, ContextBackendError> {
        Ok(if commands == b"hold" {
            FenceDisposition::Hold
        } else {
            FenceDisposition::SignalNow
        })
    }
    fn tick(&mut self) {}
}

/// A backend on mock queues, and the completer its contexts were given.
struct Rig {
    mem: GuestMemoryMmap,
    backend: GpuVhostBackend,
    vrings: Vec<GpuVring>,
    completer: Arc<dyn FenceCompleter>,
}

impl Rig {
    fn new() -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let slot: Arc<Mutex<Option<Arc<dyn FenceCompleter>>>> = Arc::new(Mutex::new(None));
        let keep = slot.clone();
        let factory: ContextBackendFactory = Arc::new(move |completer| {
            *keep.lock() = Some(completer);
            Box::new(FakeContexts)
        });
        let backend = GpuVhostBackend::new(&factory, GpuLimits::default()).unwrap();
        let shared = GuestMemoryAtomic::new(mem.clone());
        backend.update_memory(shared.clone()).unwrap();
        let vrings = RINGS
            .iter()
            .map(|&base| {
                let mock = MockSplitQueue::create(&mem, GuestAddress(base), QSIZE);
                let vring = GpuVring::new(shared.clone(), QSIZE).unwrap();
                vring.set_queue_size(QSIZE);
                vring
                    .set_queue_info(
                        mock.desc_table_addr().0,
                        mock.avail_addr().0,
                        mock.used_addr().0,
                    )
                    .unwrap();
                vring.set_queue_ready(true);
                vring.set_enabled(true);
                vring
            })
            .collect();
        let completer = slot.lock().clone().unwrap();
        Rig {
            mem,
            backend,
            vrings,
            completer,
        }
    }

    /// The mock queues over the rings (made once per test: making one
    /// zeroes its ring indices).
    fn mocks(&self) -> [MockSplitQueue<'_, GuestMemoryMmap>; 2] {
        RINGS.map(|base| MockSplitQueue::create(&self.mem, GuestAddress(base), QSIZE))
    }

    /// Makes `request` available on `mock`'s queue as a chain of a readable and
    /// a writable descriptor at descriptors `2 * slot`, `2 * slot + 1`, with
    /// buffers in data slot `slot`.
    fn post(&self, mock: &MockSplitQueue<'_, GuestMemoryMmap>, slot: u16, request: &[u8]) {
        let at = DATA + u64::from(slot) * 0x1000;
        self.mem.write_slice(request, GuestAddress(at)).unwrap();
        let d = |addr, len, flags, next| {
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
        };
        let descs = [
            d(at, request.len() as u32, VRING_DESC_F_NEXT, 2 * slot + 1),
            d(at + 0x800, 0x800, VRING_DESC_F_WRITE, 0),
        ];
        mock.add_desc_chains(&descs, 2 * slot).unwrap();
    }

    fn event(&self, event: u16) {
        self.backend
            .handle_event(event, EventSet::IN, &self.vrings, 0)
            .unwrap();
    }

    /// The used ring of `mock`'s queue: (head, length) in order.
    fn used(mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let n = u16::from_le(mock.used().idx().load());
        (0..n)
            .map(|i| {
                let e = mock.used().ring().ref_at(usize::from(i)).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    /// The response type written for data slot `slot`.
    fn response_type(&self, slot: u16) -> u32 {
        let at = DATA + u64::from(slot) * 0x1000 + 0x800;
        u32::from_le(self.mem.read_obj(GuestAddress(at)).unwrap())
    }
}

fn request(type_: u32, flags: u32, fence: u64, ctx: u32, ring: u8, body: &[u8]) -> Vec<u8> {
    let hdr = CtrlHdr {
        type_: type_.into(),
        flags: flags.into(),
        fence_id: fence.into(),
        ctx_id: ctx.into(),
        ring_idx: ring,
        padding: [0; 3],
    };
    [hdr.as_slice(), body].concat()
}

/// SUBMIT_3D of `payload` on context 1 with fence `fence` on `ring`.
fn submit(fence: u64, ring: u8, payload: &[u8]) -> Vec<u8> {
    let flags = VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX;
    let mut body = (payload.len() as u32).to_le_bytes().to_vec();
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(payload);
    request(VIRTIO_GPU_CMD_SUBMIT_3D, flags, fence, 1, ring, &body)
}

fn ctx_create(rig: &Rig, mock: &MockSplitQueue<'_, GuestMemoryMmap>, slot: u16) {
    let mut body = vec![0u8; 72];
    body[..4].copy_from_slice(&4u32.to_le_bytes());
    rig.post(
        mock,
        slot,
        &request(VIRTIO_GPU_CMD_CTX_CREATE, 0, 0, 1, 0, &body),
    );
    rig.event(CONTROL_QUEUE);
}

#[test]
fn draining_answers_every_chain_in_order() {
    let rig = Rig::new();
    let [ctrl, cur] = rig.mocks();
    rig.post(
        &ctrl,
        0,
        &request(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, 0, 0, 0, &[]),
    );
    rig.post(&ctrl, 1, &request(0x999, 0, 0, 0, 0, &[]));
    rig.post(&ctrl, 2, &[1, 2, 3]);
    rig.event(CONTROL_QUEUE);
    assert_eq!(Rig::used(&ctrl), vec![(0, 408), (2, 24), (4, 24)]);
    assert_eq!(rig.response_type(0), VIRTIO_GPU_RESP_OK_DISPLAY_INFO);
    assert_eq!(rig.response_type(1), VIRTIO_GPU_RESP_ERR_UNSPEC);
    assert_eq!(rig.response_type(2), VIRTIO_GPU_RESP_ERR_UNSPEC);
    // Nothing new: nothing more used.
    rig.event(CONTROL_QUEUE);
    assert_eq!(Rig::used(&ctrl).len(), 3);
    // The cursor queue is drained on its own event.
    let mut cursor = vec![0u8; 32];
    cursor[4..8].copy_from_slice(&10u32.to_le_bytes());
    rig.post(
        &cur,
        3,
        &request(VIRTIO_GPU_CMD_MOVE_CURSOR, 0, 0, 0, 0, &cursor),
    );
    rig.event(CURSOR_QUEUE);
    assert_eq!(Rig::used(&cur), vec![(6, 24)]);
    assert_eq!(rig.response_type(3), VIRTIO_GPU_RESP_OK_NODATA);
}

#[test]
fn held_fences_return_in_ring_order_and_other_rings_pass() {
    let rig = Rig::new();
    let [ctrl, _] = rig.mocks();
    ctx_create(&rig, &ctrl, 0);
    assert_eq!(Rig::used(&ctrl).len(), 1);
    rig.post(&ctrl, 1, &submit(10, 1, b"hold"));
    rig.post(&ctrl, 2, &submit(11, 1, b"now"));
    rig.post(&ctrl, 3, &submit(12, 0, b"now"));
    rig.event(CONTROL_QUEUE);
    // Ring 1 waits behind its held fence; ring 0 does not.
    assert_eq!(Rig::used(&ctrl)[1..], [(6, 24)]);
    rig.completer.complete(FenceRef {
        ctx: CtxId(1),
        fence_id: 10,
        ring_idx: Some(1),
    });
    rig.event(FENCE_EVENT);
    assert_eq!(Rig::used(&ctrl)[1..], [(6, 24), (2, 24), (4, 24)]);
    for slot in 1..=3 {
        assert_eq!(rig.response_type(slot), VIRTIO_GPU_RESP_OK_NODATA);
    }
}

#[test]
fn a_fence_held_twice_is_returned_once_per_completion() {
    // EVENT_ARM re-armed with the same fence: two held responses with one
    // fence id, each returned by its own completion, in order.
    let rig = Rig::new();
    let [ctrl, _] = rig.mocks();
    ctx_create(&rig, &ctrl, 0);
    rig.post(&ctrl, 1, &submit(40, 1, b"hold"));
    rig.post(&ctrl, 2, &submit(40, 1, b"hold"));
    rig.event(CONTROL_QUEUE);
    assert_eq!(Rig::used(&ctrl).len(), 1);
    let fence = FenceRef {
        ctx: CtxId(1),
        fence_id: 40,
        ring_idx: Some(1),
    };
    rig.completer.complete(fence);
    rig.event(FENCE_EVENT);
    assert_eq!(Rig::used(&ctrl)[1..], [(2, 24)]);
    rig.completer.complete(fence);
    rig.event(FENCE_EVENT);
    assert_eq!(Rig::used(&ctrl)[1..], [(2, 24), (4, 24)]);
    // A stray completion returns nothing.
    rig.completer.complete(fence);
    rig.event(FENCE_EVENT);
    assert_eq!(Rig::used(&ctrl).len(), 3);
}

#[test]
fn a_broken_ring_stops_its_queue_until_the_frontend_stops_it() {
    let rig = Rig::new();
    let [ctrl, cur] = rig.mocks();
    ctx_create(&rig, &ctrl, 0);
    rig.post(&ctrl, 1, &submit(50, 1, b"hold"));
    rig.event(CONTROL_QUEUE);
    // The driver publishes head 20 of a 16-entry queue.
    let idx = u16::from_le(ctrl.avail().idx().load());
    ctrl.avail()
        .ring()
        .ref_at(usize::from(idx % QSIZE))
        .unwrap()
        .store(u16::to_le(20));
    ctrl.avail().idx().store(u16::to_le(idx + 1));
    rig.event(CONTROL_QUEUE);
    assert_eq!(Rig::used(&ctrl).len(), 1, "nothing used for head 20");
    // Further work and completions on the broken queue are refused.
    rig.post(
        &ctrl,
        3,
        &request(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, 0, 0, 0, &[]),
    );
    rig.event(CONTROL_QUEUE);
    rig.completer.complete(FenceRef {
        ctx: CtxId(1),
        fence_id: 50,
        ring_idx: Some(1),
    });
    rig.event(FENCE_EVENT);
    assert_eq!(Rig::used(&ctrl).len(), 1);
    // The cursor queue works on.
    rig.post(
        &cur,
        4,
        &request(VIRTIO_GPU_CMD_MOVE_CURSOR, 0, 0, 0, 0, &[0; 32]),
    );
    rig.event(CURSOR_QUEUE);
    assert_eq!(Rig::used(&cur).len(), 1);
    // GET_VRING_BASE (the frontend stops the ring): the queue starts again
    // from where the frontend puts it.
    rig.backend.stop_vring(0).unwrap();
    let next = u16::from_le(ctrl.avail().idx().load());
    rig.vrings[0].set_queue_next_avail(next);
    rig.post(
        &ctrl,
        5,
        &request(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, 0, 0, 0, &[]),
    );
    rig.event(CONTROL_QUEUE);
    assert_eq!(Rig::used(&ctrl)[1..], [(10, 408)]);
}

#[test]
fn stopping_a_ring_returns_its_held_responses() {
    let rig = Rig::new();
    let [ctrl, _] = rig.mocks();
    ctx_create(&rig, &ctrl, 0);
    rig.post(&ctrl, 1, &submit(60, 1, b"hold"));
    rig.post(&ctrl, 2, &submit(61, 1, b"now"));
    rig.event(CONTROL_QUEUE);
    assert_eq!(Rig::used(&ctrl).len(), 1);
    rig.backend.stop_vring(0).unwrap();
    assert_eq!(Rig::used(&ctrl)[1..], [(2, 24), (4, 24)]);
    // The late completion finds nothing to return.
    rig.completer.complete(FenceRef {
        ctx: CtxId(1),
        fence_id: 60,
        ring_idx: Some(1),
    });
    rig.event(FENCE_EVENT);
    assert_eq!(Rig::used(&ctrl).len(), 3);
}
