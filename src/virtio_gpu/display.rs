//! The scanout: display info, EDID, and pixels for QEMU's display.
//!
//! With QEMU's `vhost-user-gpu-pci` the daemon has no window of its own: it
//! sends scanout and update messages over the GPU socket QEMU hands it
//! (`VHOST_USER_GPU_SET_SOCKET`), and QEMU shows them. Without a socket
//! (crosvm, tests) the scanout is still tracked and answered.
//!
//! The socket's peer is not trusted to answer, or to read: every exchange
//! runs on a thread of its own (one per socket), and the vring worker waits
//! at most [`PEER_TIMEOUT`] for an answer. A peer that does not answer in
//! time gets the defaults and no more questions until it has caught up;
//! messages without an answer are dropped while it lags (bounded in count
//! and pixel bytes); a peer that closes the socket or breaks the protocol
//! is dropped. The vhost crate's `GpuBackend` gives no access to its fd, so
//! a thread stuck on a silent peer stays blocked until that peer closes its
//! end; at most [`MAX_LINKS`] such threads exist in the process.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{RecvTimeoutError, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use gpu_backend::poll::PollBudget;
use parking_lot::{Condvar, Mutex};
use vhost::vhost_user::GpuBackend;
use vhost::vhost_user::gpu_message::{
    VhostUserGpuCursorPos, VhostUserGpuCursorUpdate, VhostUserGpuEdidRequest, VhostUserGpuScanout,
    VhostUserGpuUpdate, VirtioGpuRespDisplayInfo, VirtioGpuRespGetEdid,
};

/// The default mode when the frontend does not say.
pub const DEFAULT_WIDTH: u32 = 1024;
/// The default mode when the frontend does not say.
pub const DEFAULT_HEIGHT: u32 = 768;
/// How long the vring worker waits for the GPU socket's peer to answer.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(1);
/// GPU socket threads alive in the process at most (stuck ones included).
pub const MAX_LINKS: usize = 8;
/// Messages queued for the peer at most.
const MAX_QUEUED: usize = 64;
/// Pixel bytes queued for the peer at most.
const MAX_QUEUED_PIXELS: usize = 64 << 20;
/// Pixel buffers kept for reuse (sent updates give theirs back), at most.
const SPARE_BUFFERS: usize = 4;
/// A spare pixel buffer larger than this is freed, not kept.
const MAX_SPARE_BYTES: usize = 16 << 20;

/// GPU socket threads alive.
static LINKS: AtomicUsize = AtomicUsize::new(0);

/// What the link thread does for the vring worker.
enum Job {
    DisplayInfo(SyncSender<std::io::Result<VirtioGpuRespDisplayInfo>>),
    Edid(SyncSender<std::io::Result<VirtioGpuRespGetEdid>>),
    Scanout(VhostUserGpuScanout),
    Update(VhostUserGpuUpdate, Vec<u8>),
    CursorPos(VhostUserGpuCursorPos),
    CursorUpdate(VhostUserGpuCursorUpdate, Box<[u8; 16384]>),
}

/// State shared with the link thread.
#[derive(Default)]
struct LinkState {
    /// A question went unanswered past the timeout and the thread has not
    /// finished it yet.
    stalled: AtomicBool,
    /// The socket failed; the thread is gone.
    dead: AtomicBool,
    /// Pixel bytes queued.
    pixels: AtomicUsize,
    /// The jobs, in order (at most [`MAX_QUEUED`]), and whether the
    /// device side is gone.
    queue: Mutex<(VecDeque<Job>, bool)>,
    /// Signalled when a job is queued or the device side goes.
    ready: Condvar,
    /// Pixel buffers of sent updates, for the next ones.
    spare: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkState")
            .field("stalled", &self.stalled)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

impl LinkState {
    /// Queues `job` unless [`MAX_QUEUED`] wait already. The link thread is
    /// woken only if it parked: a condition variable nobody waits on costs
    /// an atomic load to signal.
    fn push(&self, job: Job) -> Result<(), Job> {
        let mut q = self.queue.lock();
        if q.0.len() >= MAX_QUEUED || q.1 {
            return Err(job);
        }
        q.0.push_back(job);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job; `None` once the device side is gone and every job is
    /// done. Polls for a while before it parks (the adaptive budget of
    /// [`gpu_backend::poll`]): updates come in bursts.
    fn pop(&self, poll: &mut PollBudget) -> Option<Job> {
        let idle_since = Instant::now();
        let mut q = self.queue.lock();
        let mut polled = false;
        loop {
            if let Some(job) = q.0.pop_front() {
                poll.observe(idle_since.elapsed());
                return Some(job);
            }
            if q.1 {
                return None;
            }
            let budget = poll.budget();
            if !polled && !budget.is_zero() {
                polled = true;
                parking_lot::MutexGuard::unlocked(&mut q, || {
                    let mut round = 0u32;
                    while idle_since.elapsed() < budget && !self.has_jobs() {
                        gpu_backend::poll::relax(&mut round);
                    }
                });
                continue;
            }
            self.ready.wait(&mut q);
        }
    }

    fn has_jobs(&self) -> bool {
        self.queue.try_lock().is_none_or(|q| !q.0.is_empty() || q.1)
    }

    /// The device side is gone: the thread ends after the queued jobs.
    fn close(&self) {
        self.queue.lock().1 = true;
        self.ready.notify_all();
    }

    /// A cleared buffer of at least `len` bytes' capacity.
    fn buffer(&self, len: usize) -> Vec<u8> {
        let mut spare = self.spare.lock();
        match spare.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = spare.swap_remove(i);
                b.clear();
                b
            }
            None => Vec::with_capacity(len),
        }
    }

    /// Keeps a sent update's buffer for the next one.
    fn give_back(&self, buffer: Vec<u8>) {
        if buffer.capacity() <= MAX_SPARE_BYTES {
            let mut spare = self.spare.lock();
            if spare.len() < SPARE_BUFFERS {
                spare.push(buffer);
            }
        }
    }
}

/// One GPU socket and its thread.
struct Link {
    state: Arc<LinkState>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.state.close();
    }
}

impl Link {
    fn start(socket: GpuBackend) -> std::io::Result<Link> {
        if LINKS.fetch_add(1, Ordering::AcqRel) >= MAX_LINKS {
            LINKS.fetch_sub(1, Ordering::AcqRel);
            return Err(std::io::Error::other(format!(
                "{MAX_LINKS} GPU socket threads are alive (peers that never answered)"
            )));
        }
        let state = Arc::new(LinkState::default());
        let shared = state.clone();
        let spawned = std::thread::Builder::new()
            .name("gpu-socket".into())
            .spawn(move || {
                batch_policy();
                run_link(&socket, &shared);
                LINKS.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            LINKS.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        Ok(Link { state })
    }

    /// Whether questions may be asked.
    fn usable(&self) -> bool {
        !self.state.dead.load(Ordering::Acquire) && !self.state.stalled.load(Ordering::Acquire)
    }

    /// Asks the peer and waits at most [`PEER_TIMEOUT`].
    fn ask<T>(&self, job: impl FnOnce(SyncSender<std::io::Result<T>>) -> Job) -> Option<T> {
        if !self.usable() {
            return None;
        }
        let (tx, rx) = sync_channel(1);
        self.state.push(job(tx)).ok()?;
        match rx.recv_timeout(PEER_TIMEOUT) {
            Ok(Ok(v)) => Some(v),
            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                if !self.state.stalled.swap(true, Ordering::AcqRel) {
                    log::warn!(
                        "GPU socket: the frontend did not answer in {} ms; using defaults until \
                         it does",
                        PEER_TIMEOUT.as_millis()
                    );
                }
                None
            }
        }
    }

    /// Queues a message without an answer; dropped if the peer lags (an
    /// update first replaces the queued ones it paints over, see
    /// [`LinkState::push_update`]).
    fn tell(&self, job: Job) {
        if self.state.dead.load(Ordering::Acquire) {
            return;
        }
        let dropped = match job {
            Job::Update(u, px) => !self.state.push_update(u, px),
            job => self.state.push(job).is_err(),
        };
        if dropped {
            log::debug!("GPU socket: the frontend lags; message dropped");
        }
    }
}

/// Whether update `old`'s rectangle lies within `new`'s, on the same
/// scanout: once `new` is shown, nothing of `old` is left to see.
fn painted_over(old: &VhostUserGpuUpdate, new: &VhostUserGpuUpdate) -> bool {
    let end = |at: u32, len: u32| u64::from(at) + u64::from(len);
    old.scanout_id == new.scanout_id
        && old.x >= new.x
        && old.y >= new.y
        && end(old.x, old.width) <= end(new.x, new.width)
        && end(old.y, old.height) <= end(new.y, new.height)
}

impl LinkState {
    /// Queues an update. The queued updates it paints over go first: the
    /// ones after the last message of another kind (a scanout change keeps
    /// the updates before it) whose rectangle lies within this one's. A peer
    /// that reads slower than the guest flushes then gets the newest pixels
    /// of every region, instead of losing the newest flush to the queue
    /// bound and showing stale ones. False if it still does not fit
    /// ([`MAX_QUEUED`] messages, [`MAX_QUEUED_PIXELS`] bytes): dropped.
    fn push_update(&self, update: VhostUserGpuUpdate, pixels: Vec<u8>) -> bool {
        let mut spare = Vec::new();
        let mut q = self.queue.lock();
        let mut i = q.0.len();
        while i > 0 {
            i -= 1;
            match q.0.get(i) {
                Some(Job::Update(old, _)) if painted_over(old, &update) => {
                    if let Some(Job::Update(_, px)) = q.0.remove(i) {
                        spare.push(px);
                    }
                }
                Some(Job::Update(..)) => {}
                _ => break,
            }
        }
        let freed: usize = spare.iter().map(Vec::len).sum();
        self.pixels.fetch_sub(freed, Ordering::AcqRel);
        let fits = !q.1
            && q.0.len() < MAX_QUEUED
            && self
                .pixels
                .load(Ordering::Acquire)
                .saturating_add(pixels.len())
                <= MAX_QUEUED_PIXELS;
        if fits {
            self.pixels.fetch_add(pixels.len(), Ordering::AcqRel);
            q.0.push_back(Job::Update(update, pixels));
        } else {
            spare.push(pixels);
        }
        drop(q);
        if fits {
            self.ready.notify_one();
        }
        for px in spare {
            self.give_back(px);
        }
        fits
    }
}

/// Makes the calling thread `SCHED_BATCH`: it keeps its fair share of the
/// CPU, but waking it never preempts the thread that woke it. The vring
/// worker wakes the link thread for a scanout or an update and goes on
/// with the guest's next command; a link thread that took the worker's CPU
/// the moment it was woken delayed every command after a flush by its
/// whole send. Best effort: a failure only costs that.
fn batch_policy() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the calling thread (pid 0), a policy without privileges, a
    // valid parameter block.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if r != 0 {
        log::debug!(
            "GPU socket thread: SCHED_BATCH: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The link thread: one exchange at a time; the first failure ends it.
fn run_link(socket: &GpuBackend, state: &LinkState) {
    let mut poll = PollBudget::new();
    while let Some(job) = state.pop(&mut poll) {
        let result = match job {
            Job::DisplayInfo(reply) => {
                let r = socket.get_display_info();
                let failed = r.as_ref().err().map(ToString::to_string);
                let _ = reply.try_send(r);
                failed
            }
            Job::Edid(reply) => {
                let r = socket.get_edid(&VhostUserGpuEdidRequest { scanout_id: 0 });
                let failed = r.as_ref().err().map(ToString::to_string);
                let _ = reply.try_send(r);
                failed
            }
            Job::Scanout(m) => socket.set_scanout(&m).err().map(|e| e.to_string()),
            Job::Update(u, px) => {
                let r = socket.update_scanout(&u, &px);
                state.pixels.fetch_sub(px.len(), Ordering::AcqRel);
                state.give_back(px);
                r.err().map(|e| e.to_string())
            }
            Job::CursorPos(p) => socket.cursor_pos(&p).err().map(|e| e.to_string()),
            Job::CursorUpdate(u, img) => socket
                .cursor_update(&u, img.as_ref())
                .err()
                .map(|e| e.to_string()),
        };
        state.stalled.store(false, Ordering::Release);
        if let Some(e) = result {
            log::warn!("GPU socket: {e}; the frontend's display is no longer updated");
            state.dead.store(true, Ordering::Release);
            // Queued jobs go with the thread; askers see the reply
            // channel close.
            state.close();
            state.queue.lock().0.clear();
            return;
        }
    }
}

/// The display side of the device.
#[derive(Default)]
pub struct Display {
    link: Option<Link>,
}

impl std::fmt::Debug for Display {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Display")
            .field("socket", &self.link.is_some())
            .finish()
    }
}

impl Display {
    /// QEMU gave us its GPU socket.
    pub fn set_socket(&mut self, socket: GpuBackend) {
        match Link::start(socket) {
            Ok(link) => self.link = Some(link),
            Err(e) => log::warn!("GPU socket ignored: {e}"),
        }
    }

    /// The mode of scanout 0: asked from the frontend when it has a socket.
    pub fn mode(&self) -> (u32, u32, bool) {
        let info = self.link.as_ref().and_then(|l| l.ask(Job::DisplayInfo));
        if let Some(info) = info {
            let one = info.pmodes[0];
            if one.r.width > 0 && one.r.height > 0 {
                return (one.r.width, one.r.height, one.enabled != 0);
            }
        }
        (DEFAULT_WIDTH, DEFAULT_HEIGHT, true)
    }

    /// The EDID of scanout 0: the frontend's, else one we build.
    pub fn edid(&self) -> Vec<u8> {
        if let Some(r) = self.link.as_ref().and_then(|l| l.ask(Job::Edid)) {
            let n = (r.size as usize).min(r.edid.len());
            if n >= 128 {
                return r.edid[..n].to_vec();
            }
        }
        let (w, h, _) = self.mode();
        build_edid(w, h).to_vec()
    }

    /// A resource of `width` x `height` now shows on scanout 0 (or nothing).
    pub fn set_scanout(&self, width: u32, height: u32) {
        if let Some(l) = &self.link {
            l.tell(Job::Scanout(VhostUserGpuScanout {
                scanout_id: 0,
                width,
                height,
            }));
        }
    }

    /// A cleared buffer for `len` bytes of pixels, reused from an update
    /// the peer already got when there is one (no allocation, no fresh
    /// pages to fault in); `None` without a socket (nobody would see the
    /// pixels).
    pub fn pixel_buffer(&self, len: usize) -> Option<Vec<u8>> {
        self.link.as_ref().map(|l| l.state.buffer(len))
    }

    /// New pixels (4 bytes each, rows of `width`) for the rectangle at
    /// `x`, `y`.
    pub fn update(&self, x: u32, y: u32, width: u32, height: u32, pixels: Vec<u8>) {
        if let Some(l) = &self.link {
            let u = VhostUserGpuUpdate {
                scanout_id: 0,
                x,
                y,
                width,
                height,
            };
            l.tell(Job::Update(u, pixels));
        }
    }

    /// Moves the cursor.
    pub fn cursor_move(&self, x: u32, y: u32) {
        if let Some(l) = &self.link {
            l.tell(Job::CursorPos(VhostUserGpuCursorPos {
                scanout_id: 0,
                x,
                y,
            }));
        }
    }

    /// A new 64x64 cursor image.
    pub fn cursor_update(&self, x: u32, y: u32, hot_x: u32, hot_y: u32, image: &[u8; 16384]) {
        if let Some(l) = &self.link {
            let u = VhostUserGpuCursorUpdate {
                pos: VhostUserGpuCursorPos {
                    scanout_id: 0,
                    x,
                    y,
                },
                hot_x,
                hot_y,
            };
            l.tell(Job::CursorUpdate(u, Box::new(*image)));
        }
    }
}

/// A 128-byte EDID 1.4 block with one detailed timing for `width` x
/// `height` at 60 Hz (CVT-like blanking) and a valid checksum.
pub fn build_edid(width: u32, height: u32) -> [u8; 128] {
    let mut e = [0u8; 128];
    e[..8].copy_from_slice(&[0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00]);
    // Manufacturer "VGN" (5-bit letters), product 1, serial 0.
    let m = u16::from(b'V' - b'@') << 10 | u16::from(b'G' - b'@') << 5 | u16::from(b'N' - b'@');
    e[8..10].copy_from_slice(&m.to_be_bytes());
    e[10] = 1;
    e[16] = 1; // week
    e[17] = 36; // year 2026
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0xA5; // digital, 8 bpc, DisplayPort
    e[21] = 34; // 34 x 19 cm
    e[22] = 19;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // RGB 4:4:4, preferred timing is native
    // Detailed timing descriptor.
    let (hblank, vblank) = (160u32, 30u32);
    let clock = (width + hblank) * (height + vblank) * 60 / 10_000; // 10 kHz units
    let d = &mut e[54..72];
    d[0..2].copy_from_slice(&(clock.min(0xFFFF) as u16).to_le_bytes());
    d[2] = (width & 0xFF) as u8;
    d[3] = (hblank & 0xFF) as u8;
    d[4] = (((width >> 8) & 0xF) << 4 | ((hblank >> 8) & 0xF)) as u8;
    d[5] = (height & 0xFF) as u8;
    d[6] = (vblank & 0xFF) as u8;
    d[7] = (((height >> 8) & 0xF) << 4 | ((vblank >> 8) & 0xF)) as u8;
    d[8] = 48; // hsync offset
    d[9] = 32; // hsync width
    d[10] = (3 << 4) | 5; // vsync offset, width
    d[17] = 0x1E; // digital separate sync
    // Display name descriptor.
    let n = &mut e[72..90];
    n[3] = 0xFC;
    n[5..18].copy_from_slice(b"vhost-gpu-nc\n");
    for block in [90usize, 108] {
        e[block + 3] = 0x10; // dummy descriptor
    }
    let sum = e[..127].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(scanout_id: u32, x: u32, y: u32, width: u32, height: u32) -> VhostUserGpuUpdate {
        VhostUserGpuUpdate {
            scanout_id,
            x,
            y,
            width,
            height,
        }
    }

    fn queued(state: &LinkState) -> Vec<(u32, u32, u8)> {
        state
            .queue
            .lock()
            .0
            .iter()
            .map(|j| match j {
                Job::Update(u, px) => (u.scanout_id, u.width, px[0]),
                Job::Scanout(s) => (s.scanout_id, s.width, 0xff),
                _ => (u32::MAX, 0, 0),
            })
            .collect()
    }

    /// A peer that reads slower than the guest flushes: every full-screen
    /// flush still fits (it replaces the queued one it paints over) and the
    /// queue holds the newest pixels. It used to fill up after 64 and drop
    /// the newest flushes, leaving the display stale.
    #[test]
    fn a_lagging_peer_gets_the_newest_pixels_not_a_full_queue() {
        let state = LinkState::default();
        for frame in 0..200u8 {
            let px = vec![frame; 256 * 256 * 4];
            assert!(
                state.push_update(update(0, 0, 0, 256, 256), px),
                "frame {frame}"
            );
        }
        assert_eq!(queued(&state), vec![(0, 256, 199)]);
        assert_eq!(state.pixels.load(Ordering::Acquire), 256 * 256 * 4);
        // Replaced buffers came back for reuse.
        assert!(!state.spare.lock().is_empty());
    }

    /// Only updates within the new rectangle, on the same scanout, after the
    /// last message of another kind, are replaced.
    #[test]
    fn only_updates_painted_over_since_the_last_other_message_go() {
        let state = LinkState::default();
        let scanout = |id| {
            Job::Scanout(VhostUserGpuScanout {
                scanout_id: id,
                width: 7,
                height: 7,
            })
        };
        assert!(state.push(scanout(0)).is_ok());
        assert!(state.push_update(update(0, 0, 0, 64, 64), vec![1; 16]));
        assert!(state.push_update(update(0, 60, 60, 8, 8), vec![2; 16])); // sticks out
        assert!(state.push_update(update(1, 0, 0, 8, 8), vec![3; 16])); // other scanout
        assert!(state.push_update(update(0, 8, 8, 8, 8), vec![4; 16])); // inside the first
        assert!(state.push(scanout(0)).is_ok());
        assert!(state.push_update(update(0, 0, 0, 64, 64), vec![5; 16]));
        assert_eq!(
            queued(&state),
            vec![
                (0, 7, 0xff),
                (0, 64, 1),
                (0, 8, 2),
                (1, 8, 3),
                (0, 8, 4),
                (0, 7, 0xff),
                (0, 64, 5)
            ],
            "nothing before the scanout change is replaced"
        );
        assert!(state.push_update(update(0, 0, 0, 1024, 1024), vec![6; 16]));
        assert_eq!(
            queued(&state),
            vec![
                (0, 7, 0xff),
                (0, 64, 1),
                (0, 8, 2),
                (1, 8, 3),
                (0, 8, 4),
                (0, 7, 0xff),
                (0, 1024, 6)
            ]
        );
        // Updates that paint over nothing still meet the bound.
        let state = LinkState::default();
        for i in 0..MAX_QUEUED as u32 {
            assert!(state.push_update(update(0, i, 0, 1, 1), vec![0; 4]));
        }
        assert!(!state.push_update(update(0, 1000, 0, 1, 1), vec![0; 4]));
        assert_eq!(state.queue.lock().0.len(), MAX_QUEUED);
        assert_eq!(state.pixels.load(Ordering::Acquire), MAX_QUEUED * 4);
    }

    #[test]
    fn edid_has_header_mode_and_checksum() {
        let e = build_edid(1024, 768);
        assert_eq!(&e[..8], &[0, 255, 255, 255, 255, 255, 255, 0]);
        assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u32::from(e[56]) | (u32::from(e[58] >> 4) << 8), 1024);
        assert_eq!(u32::from(e[59]) | (u32::from(e[61] >> 4) << 8), 768);
    }
}
