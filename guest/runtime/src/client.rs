//! The client side of one session, independent of how bytes reach the
//! device.
//!
//! A session's client state is small and entirely protocol: where its reply
//! buffer, fault ring and signal area lie in the session buffer, the next
//! `seqno`, the fault ring's consumer index. Everything the client reads is
//! written by the device, so it is decoded with the codec's strict decoders
//! and every wait is bounded.
//!
//! The transport is a [`Channel`]: on a Linux guest the render node's
//! `EXECBUFFER` and an `mmap` of the session buffer
//! ([`crate::session::DrmChannel`]); in the daemon's own tests an
//! in-process compute backend, or a vhost-user socket driven by a test VMM.
//! One client serves all of them, so the protocol logic exists once.

use std::io;
use std::time::{Duration, Instant};

use guest_proto::attr::{RangeAttr, RangeAttrs};
use guest_proto::bind::{BindOp, VmBind};
use guest_proto::command::{
    DecodeLimits, Dispatch, Profile, QueueCreate, QueueDestroy, Region, SessionInit,
};
use guest_proto::fault::{
    FAULT_RING_HEAD_OFFSET, FAULT_RING_TAIL_OFFSET, FaultRecord, FaultReply, FaultReplyEntry,
    FaultRingLayout,
};
use guest_proto::reply::{
    DeviceQueryReply, FaultReplyAck, Reply, ReplyPayload, SessionInitReply, VmBindReply,
};
use guest_proto::signal::{SIGNAL_SLOT_SIZE, SignalSlot};
use guest_proto::uq::{QueueCountersReply, UserQueueCreate, UserQueueDestroy};
use guest_proto::writer::{RequestWriter, Ticket};
use guest_proto::{QueueId, Request, ResourceId, Status};

use crate::{GuestError, Result};

/// How a client reaches the device and the session buffer.
///
/// Offsets are byte offsets from the start of the session buffer (the
/// resource that holds the reply buffer, fault ring and signal area).
pub trait Channel {
    /// Submits one request stream: on `ring` in the native profile, on the
    /// context's default timeline (compat) with `None`. May return before
    /// the device has processed it.
    fn submit(&mut self, stream: &[u8], ring: Option<u32>) -> io::Result<()>;

    /// Copies bytes the device wrote.
    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes bytes the device reads.
    fn write(&self, off: u64, bytes: &[u8]) -> io::Result<()>;

    /// Acquire-load of a `u32` the device publishes (`seqno`, `tail`).
    fn load_u32(&self, off: u64) -> io::Result<u32>;

    /// Acquire-load of a `u64` the device publishes (a signal's `value`).
    fn load_u64(&self, off: u64) -> io::Result<u64>;

    /// Release-store of a `u32` the device reads (the fault ring's `head`).
    fn store_u32(&self, off: u64, value: u32) -> io::Result<()>;

    /// Called between polls while the client waits for the device. A
    /// transport whose device runs on the caller's thread (an in-process
    /// backend) drives it here; the default does nothing.
    fn idle(&mut self) {}
}

/// Where the session's regions lie in the session buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLayout {
    /// Offset of the reply buffer.
    pub reply_off: u64,
    /// Size of the reply buffer.
    pub reply_size: u64,
    /// Offset of the fault ring.
    pub ring_off: u64,
    /// Records in the fault ring.
    pub ring_capacity: u32,
    /// Offset of the signal area.
    pub signals_off: u64,
    /// Slots in the signal area.
    pub signal_slots: u32,
}

impl Default for SessionLayout {
    /// 4 KiB of replies, a 256-record fault ring and 128 signal slots in a
    /// 20 KiB buffer.
    fn default() -> SessionLayout {
        SessionLayout {
            reply_off: 0,
            reply_size: 4096,
            ring_off: 4096,
            ring_capacity: 256,
            signals_off: 16384,
            signal_slots: 128,
        }
    }
}

impl SessionLayout {
    /// A 16 KiB session buffer: 4 KiB of replies, a 64-record fault ring
    /// and 64 signal slots (what the daemon's own tests use).
    pub const COMPACT: SessionLayout = SessionLayout {
        reply_off: 0,
        reply_size: 4096,
        ring_off: 4096,
        ring_capacity: 64,
        signals_off: 8192,
        signal_slots: 64,
    };

    /// The fault ring's layout.
    pub fn ring(&self) -> Result<FaultRingLayout> {
        FaultRingLayout::new(self.ring_capacity).ok_or(GuestError::Invalid("ring capacity"))
    }

    /// Bytes the session buffer needs.
    pub fn bytes(&self) -> u64 {
        let signals_end = self.signals_off + u64::from(self.signal_slots) * SIGNAL_SLOT_SIZE;
        let ring_end = self.ring_off + self.ring().map_or(0, |r| r.size());
        signals_end
            .max(ring_end)
            .max(self.reply_off + self.reply_size)
    }

    /// The `SESSION_INIT` request for a session buffer that is resource
    /// `resource`.
    pub fn session_init(&self, resource: ResourceId, profile: Profile) -> Result<SessionInit> {
        let region = |offset, size| Region {
            resource,
            offset,
            size,
        };
        Ok(SessionInit::new(
            profile,
            region(self.reply_off, self.reply_size),
            region(self.ring_off, self.ring()?.size()),
            region(
                self.signals_off,
                u64::from(self.signal_slots) * SIGNAL_SLOT_SIZE,
            ),
        ))
    }

    /// Offset of signal slot `slot`.
    pub fn signal_off(&self, slot: u32) -> Result<u64> {
        if slot >= self.signal_slots {
            return Err(GuestError::Invalid("signal slot"));
        }
        Ok(self.signals_off + u64::from(slot) * SIGNAL_SLOT_SIZE)
    }
}

/// Back-off for polling memory the device writes: spin briefly, then
/// yield, then sleep up to 2 ms.
#[derive(Debug, Default)]
pub struct Backoff {
    round: u32,
}

impl Backoff {
    /// The pause before the next poll.
    pub fn next_pause(&mut self) -> Duration {
        self.round = self.round.saturating_add(1);
        match self.round {
            0..=64 => Duration::ZERO,
            65..=128 => Duration::from_micros(10),
            n => Duration::from_micros(u64::from(n.min(400) - 128) * 10)
                .min(Duration::from_millis(2)),
        }
    }

    /// Waits before the next poll.
    pub fn wait(&mut self) {
        match self.next_pause() {
            Duration::ZERO => std::hint::spin_loop(),
            d if d < Duration::from_micros(20) => std::thread::yield_now(),
            d => std::thread::sleep(d),
        }
    }
}

/// Offset of the fault ring header's `interrupts` counter (protocol 1.1,
/// 8.1: 20; offset 16 is the guest kernel's ring `state`, 15.5).
pub use guest_proto::fault::FAULT_RING_INTERRUPTS_OFFSET;

/// How long a reply may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// The client of one session over a [`Channel`].
#[derive(Debug)]
pub struct Client<C> {
    channel: C,
    layout: SessionLayout,
    limits: DecodeLimits,
    /// The ring requests go on (`Some(0)` in the native profile).
    ring: Option<u32>,
    seq: u32,
    head: u32,
    faults_seen: u64,
    reply_flag: u32,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> GuestError {
    move |e| GuestError::Io { what, source: e }
}

/// `Ok(reply)` if its status is `OK`, else the status as an error.
pub fn check(reply: Reply) -> Result<Reply> {
    if reply.status == Status::Ok {
        Ok(reply)
    } else {
        Err(GuestError::Status {
            cmd: reply.payload.cmd(),
            status: reply.status,
        })
    }
}

impl<C: Channel> Client<C> {
    /// A client whose requests go on `ring`, decoded within `limits` (the
    /// device's capset). Nothing is sent yet.
    pub fn new(channel: C, layout: SessionLayout, limits: DecodeLimits, ring: Option<u32>) -> Self {
        Client {
            channel,
            layout,
            limits,
            ring,
            seq: 1,
            head: 0,
            faults_seen: 0,
            reply_flag: 0,
        }
    }

    /// ORs `flag` into every `reply_off` (a guest kernel's client sets
    /// [`guest_proto::svm::KERNEL_REPLY`]: its reply buffer is the kernel
    /// reply region). Replies are still read at their plain offset.
    pub fn with_reply_flag(mut self, flag: u32) -> Self {
        self.reply_flag = flag;
        self
    }

    /// The channel.
    pub fn channel(&self) -> &C {
        &self.channel
    }

    /// The channel, mutably.
    pub fn channel_mut(&mut self) -> &mut C {
        &mut self.channel
    }

    /// The layout of the session buffer.
    pub fn layout(&self) -> &SessionLayout {
        &self.layout
    }

    /// Fault records read so far.
    pub fn faults_seen(&self) -> u64 {
        self.faults_seen
    }

    /// Sends `SESSION_INIT` for the session buffer `resource`; the fault
    /// ring starts empty again.
    pub fn start(&mut self, resource: ResourceId, profile: Profile) -> Result<SessionInitReply> {
        let init = self.layout.session_init(resource, profile)?;
        self.head = 0;
        match self.call(&Request::SessionInit(init))?.payload {
            ReplyPayload::SessionInit(r) => Ok(r),
            _ => Err(GuestError::Invalid("SESSION_INIT reply")),
        }
    }

    /// Encodes `requests` as one stream with replies in the reply buffer,
    /// without sending it: for callers that submit it themselves (with a
    /// fence of their own, say). Read the replies with [`Client::reply`].
    pub fn encode(&mut self, requests: &[Request<'_>]) -> Result<(Vec<u8>, Vec<Ticket>)> {
        self.encode_with(requests, false)
    }

    /// Like [`Client::encode`], with `reply_off = NO_REPLY` for all.
    pub fn encode_no_reply(&mut self, requests: &[Request<'_>]) -> Result<Vec<u8>> {
        self.encode_with(requests, true).map(|(bytes, _)| bytes)
    }

    fn encode_with(
        &mut self,
        requests: &[Request<'_>],
        no_reply: bool,
    ) -> Result<(Vec<u8>, Vec<Ticket>)> {
        let reply_end = u32::try_from(self.layout.reply_size)
            .map_err(|_| GuestError::Invalid("reply buffer size"))?;
        let mut w = RequestWriter::new(0..reply_end)
            .with_first_seqno(self.seq)
            .with_limits(self.limits)
            .with_reply_flag(self.reply_flag);
        let mut tickets = Vec::with_capacity(requests.len());
        for r in requests {
            let t = if no_reply {
                w.push_no_reply(r)
            } else {
                w.push(r)
            };
            tickets.push(t.map_err(GuestError::Encode)?);
        }
        self.seq = w.next_seqno();
        Ok((w.as_bytes().to_vec(), tickets))
    }

    /// Sends `requests` in one submission and waits for their replies,
    /// whatever their status.
    pub fn requests(&mut self, requests: &[Request<'_>]) -> Result<Vec<Reply>> {
        let (bytes, tickets) = self.encode(requests)?;
        self.channel
            .submit(&bytes, self.ring)
            .map_err(io_err("submit"))?;
        tickets
            .iter()
            .filter_map(|t| self.wait(t).transpose())
            .collect()
    }

    /// Sends one request and returns its reply, whatever its status.
    pub fn request(&mut self, request: &Request<'_>) -> Result<Reply> {
        self.requests(std::slice::from_ref(request))?
            .pop()
            .ok_or(GuestError::Invalid("no reply"))
    }

    /// Sends one request; its reply if the status is `OK`.
    pub fn call(&mut self, request: &Request<'_>) -> Result<Reply> {
        check(self.request(request)?)
    }

    /// Sends a stream encoded by [`Client::encode_no_reply`] on `ring`.
    pub fn submit_raw(&mut self, stream: &[u8], ring: Option<u32>) -> Result<()> {
        self.channel.submit(stream, ring).map_err(io_err("submit"))
    }

    /// Waits for the reply of `ticket`; `None` for a request without one.
    pub fn wait(&mut self, ticket: &Ticket) -> Result<Option<Reply>> {
        let Some(off) = ticket.reply_off else {
            return Ok(None);
        };
        let at = self.layout.reply_off + u64::from(off);
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut backoff = Backoff::default();
        while self.channel.load_u32(at).map_err(io_err("reply"))? != ticket.seqno {
            if Instant::now() > deadline {
                return Err(GuestError::Timeout("reply"));
            }
            self.channel.idle();
            backoff.wait();
        }
        self.reply(ticket).map(Some)
    }

    /// The reply of `ticket` as it is in the reply buffer now.
    pub fn reply(&self, ticket: &Ticket) -> Result<Reply> {
        let off = ticket.reply_off.ok_or(GuestError::Invalid("no reply"))?;
        let mut bytes = vec![0u8; ticket.reply_len as usize];
        self.channel
            .read(self.layout.reply_off + u64::from(off), &mut bytes)
            .map_err(io_err("reply"))?;
        Reply::decode(&bytes).map_err(GuestError::Decode)
    }

    /// Applies bind ops.
    pub fn bind(&mut self, ops: &[BindOp<'_>]) -> Result<VmBindReply> {
        match self.call(&Request::VmBind(VmBind::new(ops)))?.payload {
            ReplyPayload::VmBind(b) => Ok(b),
            _ => Err(GuestError::Invalid("VM_BIND reply")),
        }
    }

    /// Sets range attributes.
    pub fn set_attrs(&mut self, va: u64, size: u64, attrs: RangeAttrs) -> Result<()> {
        let attr = RangeAttr {
            va: guest_proto::GpuVa(va),
            size,
            attrs,
        };
        self.call(&Request::RangeAttr(attr)).map(|_| ())
    }

    /// Creates a queue of `priority`.
    pub fn create_queue(&mut self, priority: u8) -> Result<QueueId> {
        match self
            .call(&Request::QueueCreate(QueueCreate { priority }))?
            .payload
        {
            ReplyPayload::QueueCreate(q) => Ok(q.queue),
            _ => Err(GuestError::Invalid("QUEUE_CREATE reply")),
        }
    }

    /// Destroys a queue.
    pub fn destroy_queue(&mut self, queue: QueueId) -> Result<()> {
        self.call(&Request::QueueDestroy(QueueDestroy { queue }))
            .map(|_| ())
    }

    /// Creates a user-mode queue (protocol 1.1 `USER_QUEUE_CREATE`).
    pub fn create_user_queue(&mut self, q: &UserQueueCreate) -> Result<QueueId> {
        match self.call(&Request::UserQueueCreate(*q))?.payload {
            ReplyPayload::UserQueueCreate(r) => Ok(r.queue),
            _ => Err(GuestError::Invalid("USER_QUEUE_CREATE reply")),
        }
    }

    /// Destroys a user-mode queue (`USER_QUEUE_DESTROY`): when this returns
    /// the device no longer touches its ring, pointers or status block.
    pub fn destroy_user_queue(&mut self, queue: QueueId) -> Result<()> {
        self.call(&Request::UserQueueDestroy(UserQueueDestroy { queue }))
            .map(|_| ())
    }

    /// `DOORBELL_KICK` without a reply (a hint: the device looks at the
    /// session's doorbells now); returns once it is submitted.
    pub fn kick_doorbells(&mut self) -> Result<()> {
        let bytes = self.encode_no_reply(&[Request::DoorbellKick])?;
        self.channel
            .submit(&bytes, self.ring)
            .map_err(io_err("submit"))
    }

    /// `QUEUE_COUNTERS` (1.1): the session's user-queue counters.
    pub fn queue_counters(&mut self) -> Result<QueueCountersReply> {
        match self.call(&Request::QueueCounters)?.payload {
            ReplyPayload::QueueCounters(q) => Ok(q),
            _ => Err(GuestError::Invalid("QUEUE_COUNTERS reply")),
        }
    }

    /// Queues a dispatch, first clearing its signal slot so that a value
    /// left from an earlier use cannot match.
    pub fn dispatch(&mut self, d: Dispatch) -> Result<()> {
        if let Some(slot) = d.signal {
            self.clear_signal(slot.0)?;
        }
        self.call(&Request::Dispatch(d)).map(|_| ())
    }

    /// Answers faults.
    pub fn answer(&mut self, entries: &[FaultReplyEntry]) -> Result<FaultReplyAck> {
        let reply = self.request(&Request::FaultReply(FaultReply::new(entries)))?;
        match (reply.status, reply.payload) {
            (Status::Ok | Status::UnknownFault, ReplyPayload::FaultReply(ack)) => Ok(ack),
            (status, payload) => Err(GuestError::Status {
                cmd: payload.cmd(),
                status,
            }),
        }
    }

    /// `DEVICE_QUERY` counters.
    pub fn query(&mut self) -> Result<DeviceQueryReply> {
        match self.call(&Request::DeviceQuery)?.payload {
            ReplyPayload::DeviceQuery(q) => Ok(q),
            _ => Err(GuestError::Invalid("DEVICE_QUERY reply")),
        }
    }

    /// Ends the session.
    pub fn destroy(&mut self) -> Result<()> {
        self.call(&Request::SessionDestroy).map(|_| ())
    }

    /// Zeroes signal slot `slot`.
    pub fn clear_signal(&mut self, slot: u32) -> Result<()> {
        let off = self.layout.signal_off(slot)?;
        self.channel
            .write(off, &[0u8; SIGNAL_SLOT_SIZE as usize])
            .map_err(io_err("signal slot"))
    }

    /// Signal slot `slot` as the device last wrote it.
    pub fn signal(&self, slot: u32) -> Result<SignalSlot> {
        let off = self.layout.signal_off(slot)?;
        // The value first, with acquire: a slot whose value matches has
        // its status and error VA in place.
        self.channel.load_u64(off).map_err(io_err("signal slot"))?;
        let mut bytes = [0u8; SIGNAL_SLOT_SIZE as usize];
        self.channel
            .read(off, &mut bytes)
            .map_err(io_err("signal slot"))?;
        SignalSlot::decode(&bytes).map_err(GuestError::Decode)
    }

    /// The value of signal slot `slot` (acquire).
    pub fn signal_value(&self, slot: u32) -> Result<u64> {
        let off = self.layout.signal_off(slot)?;
        self.channel.load_u64(off).map_err(io_err("signal slot"))
    }

    /// Consumes the fault records the device published since the last
    /// call (at most one ring's worth: a `tail` further ahead is garbage).
    pub fn take_faults(&mut self) -> Result<Vec<FaultRecord>> {
        let ring = self.layout.ring()?;
        let base = self.layout.ring_off;
        let tail = self
            .channel
            .load_u32(base + FAULT_RING_TAIL_OFFSET)
            .map_err(io_err("fault ring"))?;
        let mut out = Vec::new();
        for _ in 0..ring.capacity() {
            if self.head == tail {
                break;
            }
            let mut bytes = [0u8; 32];
            self.channel
                .read(base + ring.record_offset(self.head), &mut bytes)
                .map_err(io_err("fault record"))?;
            out.push(FaultRecord::decode(&bytes).map_err(GuestError::Decode)?);
            self.head = self.head.wrapping_add(1);
        }
        self.channel
            .store_u32(base + FAULT_RING_HEAD_OFFSET, self.head)
            .map_err(io_err("fault ring"))?;
        self.faults_seen += out.len() as u64;
        Ok(out)
    }

    /// The fault ring header's `interrupts` counter (protocol 1.1: offset
    /// 20, incremented by the device for every interrupt; 0 on a 1.0
    /// device, which leaves the field reserved).
    pub fn interrupts(&self) -> Result<u32> {
        self.channel
            .load_u32(self.layout.ring_off + FAULT_RING_INTERRUPTS_OFFSET)
            .map_err(io_err("fault ring"))
    }

    /// Waits until signal `slot` holds `value`, calling `on_idle` between
    /// polls (a resolver pumps faults there; it returns whether it found
    /// work, which restarts the back-off).
    pub fn wait_signal(
        &mut self,
        slot: u32,
        value: u64,
        timeout: Duration,
        mut on_idle: impl FnMut(&mut Self) -> Result<bool>,
    ) -> Result<SignalSlot> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::default();
        loop {
            if self.signal_value(slot)? == value {
                return self.signal(slot);
            }
            if on_idle(self)? {
                backoff = Backoff::default();
                continue;
            }
            if Instant::now() > deadline {
                return Err(GuestError::Timeout("signal"));
            }
            self.channel.idle();
            backoff.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A session buffer in a vector.
    struct Buffer(RefCell<Vec<u8>>);

    impl Channel for Buffer {
        fn submit(&mut self, _stream: &[u8], _ring: Option<u32>) -> io::Result<()> {
            Ok(())
        }

        fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
            let off = off as usize;
            buf.copy_from_slice(&self.0.borrow()[off..off + buf.len()]);
            Ok(())
        }

        fn write(&self, off: u64, bytes: &[u8]) -> io::Result<()> {
            let off = off as usize;
            self.0.borrow_mut()[off..off + bytes.len()].copy_from_slice(bytes);
            Ok(())
        }

        fn load_u32(&self, off: u64) -> io::Result<u32> {
            let mut b = [0u8; 4];
            self.read(off, &mut b)?;
            Ok(u32::from_le_bytes(b))
        }

        fn load_u64(&self, off: u64) -> io::Result<u64> {
            let mut b = [0u8; 8];
            self.read(off, &mut b)?;
            Ok(u64::from_le_bytes(b))
        }

        fn store_u32(&self, off: u64, value: u32) -> io::Result<()> {
            self.write(off, &value.to_le_bytes())
        }
    }

    #[test]
    fn interrupts_are_read_at_offset_20_of_the_ring_header() {
        let layout = SessionLayout::COMPACT;
        let buf = Buffer(RefCell::new(vec![0u8; layout.bytes() as usize]));
        // What the device writes (8.1): interrupts at 20; 16 is the
        // kernel ring's state, never the session ring's counter.
        buf.store_u32(layout.ring_off + 16, 2).unwrap();
        buf.store_u32(layout.ring_off + 20, 7).unwrap();
        let c = Client::new(buf, layout, DecodeLimits::PROTOCOL, None);
        assert_eq!(c.interrupts().unwrap(), 7);
    }

    #[test]
    fn backoff_spins_then_sleeps_at_most_2ms() {
        let mut b = Backoff::default();
        let pauses: Vec<Duration> = (0..1000).map(|_| b.next_pause()).collect();
        assert_eq!(pauses[0], Duration::ZERO);
        assert_eq!(pauses[100], Duration::from_micros(10));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*pauses.last().unwrap(), Duration::from_millis(2));
    }

    #[test]
    fn the_default_layout_fits_its_buffer_without_overlap() {
        let l = SessionLayout::default();
        let ring_end = l.ring_off + l.ring().unwrap().size();
        assert!(l.reply_off + l.reply_size <= l.ring_off);
        assert!(ring_end <= l.signals_off);
        assert_eq!(l.bytes(), l.signals_off + 128 * 32);
        assert!(l.signal_off(128).is_err());
        assert_eq!(l.signal_off(1).unwrap(), l.signals_off + 32);
    }
}
