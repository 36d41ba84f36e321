//! A VMM and a guest driver in one test process, talking to the real
//! daemon binary over its real vhost-user socket.
//!
//! The harness starts `vhost-gpu-nc`, connects with the `vhost` crate's
//! frontend, shares memfd-backed guest RAM, sets up split virtqueues in that
//! RAM (descriptor table, avail and used rings written by hand, as a guest
//! driver would), and kicks/waits through eventfds. Tests build descriptor
//! chains directly, so malformed chains are as easy to send as good ones.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const RAM_SIZE: usize = 64 << 20;
pub const QUEUE_SIZE: u16 = 256;
/// Guest-physical layout of the harness's own structures.
const RING_BASE: u64 = 0x1_0000;
const RING_STRIDE: u64 = 0x1_0000;
/// Request and response buffers.
pub const REQ_GPA: u64 = 0x10_0000;
pub const RESP_GPA: u64 = 0x20_0000;
/// Memory the tests hand out to resources.
pub const HEAP_GPA: u64 = 0x40_0000;

pub mod cmd {
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    pub const RESOURCE_UNREF: u32 = 0x0102;
    pub const SET_SCANOUT: u32 = 0x0103;
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    pub const GET_CAPSET_INFO: u32 = 0x0108;
    pub const GET_CAPSET: u32 = 0x0109;
    pub const GET_EDID: u32 = 0x010a;
    pub const RESOURCE_CREATE_BLOB: u32 = 0x010c;
    pub const CTX_CREATE: u32 = 0x0200;
    pub const CTX_DESTROY: u32 = 0x0201;
    pub const CTX_ATTACH_RESOURCE: u32 = 0x0202;
    pub const RESOURCE_CREATE_3D: u32 = 0x0204;
    pub const SUBMIT_3D: u32 = 0x0207;
    pub const OK_NODATA: u32 = 0x1100;
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    pub const OK_CAPSET_INFO: u32 = 0x1102;
    pub const OK_CAPSET: u32 = 0x1103;
    pub const OK_EDID: u32 = 0x1104;
    pub const ERR_UNSPEC: u32 = 0x1200;
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    pub const ERR_INVALID_CONTEXT_ID: u32 = 0x1204;
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;
}

pub const FLAG_FENCE: u32 = 1;
pub const FLAG_RING_IDX: u32 = 2;
pub const F_VIRGL: u64 = 1 << 0;
pub const F_EDID: u64 = 1 << 1;
pub const F_BLOB: u64 = 1 << 3;
pub const F_CONTEXT_INIT: u64 = 1 << 4;
const F_VERSION_1: u64 = 1 << 32;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// The daemon process.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("gpu.sock");
        let child = daemon_command()
            .arg("--socket-path")
            .arg(&socket)
            .args(["--compute-units", "2", "--log-level", "warn"])
            .args(args)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "daemon did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            child,
            socket,
            _dir: dir,
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// Makes `fd` the child's fd 3 (as systemd and libvirt-style launchers
/// pass sockets), inheritable across exec.
pub fn pass_as_fd3(cmd: &mut Command, fd: std::os::fd::OwnedFd) {
    use std::os::unix::process::CommandExt;
    let raw = fd.as_raw_fd();
    // SAFETY: between fork and exec only dup2/fcntl run (async-signal-safe);
    // `fd` outlives the spawn because the closure owns it.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fd;
            if raw == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Fields of /proc/PID/status (e.g. "Seccomp", "NoNewPrivs").
pub fn proc_status(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    })
}

/// The daemon binary, run under `$VHOST_GPU_NC_WRAPPER` (a command and its
/// arguments, split at spaces, e.g. `strace -f -o /tmp/trace`) when set.
pub fn daemon_command() -> Command {
    let bin = env!("CARGO_BIN_EXE_vhost-gpu-nc");
    match std::env::var("VHOST_GPU_NC_WRAPPER") {
        Ok(w) if !w.trim().is_empty() => {
            let mut words = w.split_whitespace();
            let mut c = Command::new(words.next().unwrap());
            c.args(words).arg(bin);
            c
        }
        _ => Command::new(bin),
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Shared guest RAM (memfd) mapped into the test process.
pub struct GuestRam {
    fd: std::fs::File,
    ptr: *mut u8,
}

impl GuestRam {
    fn new() -> GuestRam {
        // SAFETY: memfd_create with a static NUL-terminated name.
        let raw = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), 0) };
        assert!(raw >= 0);
        // SAFETY: we own the fresh fd.
        let fd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        fd.set_len(RAM_SIZE as u64).unwrap();
        // SAFETY: a shared mapping of the whole memfd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        GuestRam {
            fd,
            ptr: ptr.cast(),
        }
    }

    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= RAM_SIZE);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(gpa as usize), bytes.len())
        };
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= RAM_SIZE);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), v.as_mut_ptr(), len) };
        v
    }

    pub fn u16(&self, gpa: u64) -> u16 {
        // SAFETY: aligned, in bounds; the daemon writes it concurrently.
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize).cast::<u16>()) }
    }

    pub fn u32(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.read(gpa, 4).try_into().unwrap())
    }

    pub fn u64(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.read(gpa, 8).try_into().unwrap())
    }

    pub fn set_u16(&self, gpa: u64, v: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: aligned, in bounds.
        unsafe { std::ptr::write_volatile(self.ptr.add(gpa as usize).cast::<u16>(), v) };
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), RAM_SIZE) };
    }
}

/// One split virtqueue the harness drives.
struct Queue {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_idx: u16,
    kick: EventFd,
    call: EventFd,
}

/// A descriptor of a chain the test builds.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// The VMM + guest driver.
pub struct Vmm {
    pub frontend: Frontend,
    /// The same connection, for messages the frontend API lacks.
    raw: std::os::unix::net::UnixStream,
    pub ram: GuestRam,
    queues: Vec<Queue>,
    pub features: u64,
    heap: u64,
}

impl Vmm {
    /// Connects and sets the device up like QEMU does, acking `features`
    /// (VIRTIO_GPU_F_* bits) of what the device offers.
    pub fn connect(socket: &Path, features: u64) -> Vmm {
        // The socket file appears at bind(), a moment before listen().
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("connecting to the daemon: {e}"),
            }
        };
        Vmm::from_stream(stream, features)
    }

    /// Sets the device up over an already connected socket (the frontend's
    /// end of the socketpair libvirt makes).
    pub fn from_stream(stream: std::os::unix::net::UnixStream, features: u64) -> Vmm {
        let raw = stream.try_clone().unwrap();
        let mut frontend = Frontend::from_stream(stream, 2);
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        assert_ne!(offered & F_PROTOCOL_FEATURES, 0);
        let acked = offered & (features | F_VERSION_1 | F_PROTOCOL_FEATURES);
        frontend.set_features(acked).unwrap();
        let pf = frontend.get_protocol_features().unwrap();
        assert!(pf.contains(VhostUserProtocolFeatures::CONFIG));
        frontend
            .set_protocol_features(
                pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
            )
            .unwrap();
        let ram = GuestRam::new();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: RAM_SIZE as u64,
            userspace_addr: ram.host_addr(0),
            mmap_offset: 0,
            mmap_handle: ram.fd.as_raw_fd(),
        };
        frontend.set_mem_table(&[region]).unwrap();
        let mut queues = Vec::new();
        for q in 0..2usize {
            let base = RING_BASE + q as u64 * RING_STRIDE;
            let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
            frontend.set_vring_num(q, QUEUE_SIZE).unwrap();
            frontend
                .set_vring_addr(
                    q,
                    &VringConfigData {
                        queue_max_size: QUEUE_SIZE,
                        queue_size: QUEUE_SIZE,
                        flags: 0,
                        desc_table_addr: ram.host_addr(desc),
                        used_ring_addr: ram.host_addr(used),
                        avail_ring_addr: ram.host_addr(avail),
                        log_addr: None,
                    },
                )
                .unwrap();
            frontend.set_vring_base(q, 0).unwrap();
            let kick = EventFd::new(0).unwrap();
            let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            frontend.set_vring_kick(q, &kick).unwrap();
            frontend.set_vring_call(q, &call).unwrap();
            frontend.set_vring_enable(q, true).unwrap();
            queues.push(Queue {
                desc,
                avail,
                used,
                avail_idx: 0,
                used_idx: 0,
                kick,
                call,
            });
        }
        Vmm {
            frontend,
            raw,
            ram,
            queues,
            features: acked,
            heap: HEAP_GPA,
        }
    }

    /// The device config space.
    pub fn config(&mut self) -> Vec<u8> {
        let (_, payload) = self
            .frontend
            .get_config(0, 16, VhostUserConfigFlags::WRITABLE, &[0u8; 16])
            .unwrap();
        payload.to_vec()
    }

    /// Page-aligned guest memory for resources.
    pub fn alloc(&mut self, bytes: u64) -> u64 {
        let gpa = self.heap;
        self.heap += bytes.next_multiple_of(4096);
        assert!(self.heap <= RAM_SIZE as u64);
        gpa
    }

    /// Places a chain on queue `q` and kicks. Returns the head index.
    pub fn post(&mut self, q: usize, chain: &[Desc]) -> u16 {
        let queue = &mut self.queues[q];
        let head = queue.avail_idx % QUEUE_SIZE;
        // Chains use descriptors [head*4, head*4 + len) modulo the table.
        let first = (head as usize * 4) % QUEUE_SIZE as usize;
        for (i, d) in chain.iter().enumerate() {
            let idx = (first + i) % QUEUE_SIZE as usize;
            let next = ((first + i + 1) % QUEUE_SIZE as usize) as u16;
            let mut flags = 0u16;
            if i + 1 < chain.len() {
                flags |= 1;
            }
            if d.write {
                flags |= 2;
            }
            let mut bytes = Vec::with_capacity(16);
            bytes.extend_from_slice(&d.addr.to_le_bytes());
            bytes.extend_from_slice(&d.len.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
            bytes.extend_from_slice(&next.to_le_bytes());
            self.ram.write(queue.desc + idx as u64 * 16, &bytes);
        }
        self.publish(q, first as u16)
    }

    /// Writes a raw descriptor (for malformed chains).
    pub fn raw_desc(&mut self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut bytes = Vec::with_capacity(16);
        bytes.extend_from_slice(&addr.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&next.to_le_bytes());
        let desc = self.queues[q].desc;
        self.ram.write(desc + u64::from(idx) * 16, &bytes);
    }

    /// Makes descriptor `head` available and kicks.
    pub fn publish(&mut self, q: usize, head: u16) -> u16 {
        let queue = &mut self.queues[q];
        let slot = queue.avail + 4 + u64::from(queue.avail_idx % QUEUE_SIZE) * 2;
        self.ram.set_u16(slot, head);
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        self.ram.set_u16(queue.avail + 2, queue.avail_idx);
        queue.kick.write(1).unwrap();
        head
    }

    /// Waits for the next used entry: (head, len), or None on timeout.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Option<(u16, u32)> {
        let queue = &mut self.queues[q];
        let deadline = Instant::now() + timeout;
        loop {
            if self.ram.u16(queue.used + 2) != queue.used_idx {
                let at = queue.used + 4 + u64::from(queue.used_idx % QUEUE_SIZE) * 8;
                let head = self.ram.u32(at) as u16;
                let len = self.ram.u32(at + 4);
                queue.used_idx = queue.used_idx.wrapping_add(1);
                let _ = queue.call.read();
                return Some((head, len));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Sends a control request and returns the response bytes.
    pub fn ctrl(&mut self, request: &[u8], resp_len: u32) -> Vec<u8> {
        self.ram.write(REQ_GPA, request);
        self.ram.write(RESP_GPA, &vec![0u8; resp_len as usize]);
        self.post(
            0,
            &[
                Desc {
                    addr: REQ_GPA,
                    len: request.len() as u32,
                    write: false,
                },
                Desc {
                    addr: RESP_GPA,
                    len: resp_len,
                    write: true,
                },
            ],
        );
        let (_, len) = self
            .wait_used(0, Duration::from_secs(20))
            .expect("no response");
        self.ram.read(RESP_GPA, len as usize)
    }

    /// Sends a control request and returns the response type.
    pub fn ctrl_type(&mut self, request: &[u8]) -> u32 {
        let r = self.ctrl(request, 64);
        u32::from_le_bytes(r[..4].try_into().unwrap())
    }
}

/// A request header.
pub fn hdr(type_: u32, flags: u32, fence: u64, ctx: u32, ring: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&type_.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&fence.to_le_bytes());
    v.extend_from_slice(&ctx.to_le_bytes());
    v.push(ring);
    v.extend_from_slice(&[0; 3]);
    v
}

/// A request: header then little-endian u32 fields.
pub fn req(type_: u32, ctx: u32, fields: &[u32]) -> Vec<u8> {
    let mut v = hdr(type_, 0, 0, ctx, 0);
    for f in fields {
        v.extend_from_slice(&f.to_le_bytes());
    }
    v
}

/// Memory entries of a backing.
pub fn entries(list: &[(u64, u32)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (a, l) in list {
        v.extend_from_slice(&a.to_le_bytes());
        v.extend_from_slice(&l.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
    }
    v
}

impl Vmm {
    /// RESOURCE_CREATE_3D of a PIPE_BUFFER with `bytes` of guest backing;
    /// returns the backing's GPA.
    pub fn buffer_3d(&mut self, id: u32, bytes: u32) -> u64 {
        let r = req(
            cmd::RESOURCE_CREATE_3D,
            0,
            &[id, 0, 64, 1, bytes, 1, 1, 1, 0, 0, 0, 0],
        );
        assert_eq!(self.ctrl_type(&r), cmd::OK_NODATA);
        let gpa = self.alloc(u64::from(bytes));
        let mut a = req(cmd::RESOURCE_ATTACH_BACKING, 0, &[id, 1]);
        a.extend(entries(&[(gpa, bytes.next_multiple_of(4096))]));
        assert_eq!(self.ctrl_type(&a), cmd::OK_NODATA);
        gpa
    }

    /// CTX_CREATE with `context_init`.
    pub fn ctx_create(&mut self, ctx: u32, context_init: u32) -> u32 {
        let mut r = req(cmd::CTX_CREATE, ctx, &[4, context_init]);
        let mut name = [0u8; 64];
        name[..4].copy_from_slice(b"test");
        r.extend_from_slice(&name);
        self.ctrl_type(&r)
    }

    /// CTX_ATTACH_RESOURCE.
    pub fn ctx_attach(&mut self, ctx: u32, id: u32) -> u32 {
        self.ctrl_type(&req(cmd::CTX_ATTACH_RESOURCE, ctx, &[id, 0]))
    }

    /// SUBMIT_3D of `commands` on `ctx`, with an optional (fence, ring).
    /// Posts the chain and returns without waiting.
    pub fn post_submit(&mut self, ctx: u32, commands: &[u8], fence: Option<(u64, Option<u8>)>) {
        let (flags, id, ring) = match fence {
            None => (0, 0, 0),
            Some((id, None)) => (FLAG_FENCE, id, 0),
            Some((id, Some(r))) => (FLAG_FENCE | FLAG_RING_IDX, id, r),
        };
        let mut r = hdr(cmd::SUBMIT_3D, flags, id, ctx, ring);
        r.extend_from_slice(&(commands.len() as u32).to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        r.extend_from_slice(commands);
        // Each submit uses its own request/response buffers so several may
        // be outstanding.
        let slot = u64::from(self.queues[0].avail_idx % 16);
        let req_gpa = REQ_GPA + slot * 0x1_0000 + 0x1000;
        let resp_gpa = RESP_GPA + slot * 0x100 + 0x1000;
        self.ram.write(req_gpa, &r);
        self.post(
            0,
            &[
                Desc {
                    addr: req_gpa,
                    len: r.len() as u32,
                    write: false,
                },
                Desc {
                    addr: resp_gpa,
                    len: 24,
                    write: true,
                },
            ],
        );
    }

    /// SUBMIT_3D and wait for its response type.
    pub fn submit(&mut self, ctx: u32, commands: &[u8]) -> u32 {
        self.post_submit(ctx, commands, None);
        let (head, _) = self
            .wait_used(0, Duration::from_secs(20))
            .expect("no response");
        let slot = u64::from(head / 4 % 16);
        let _ = slot;
        // The response lives in the slot of the posted request.
        self.last_submit_type()
    }

    fn last_submit_type(&self) -> u32 {
        let slot = u64::from(self.queues[0].avail_idx.wrapping_sub(1) % 16);
        self.ram.u32(RESP_GPA + slot * 0x100 + 0x1000)
    }
}

/// What the frontend's end of QEMU's GPU socket received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuMsg {
    pub request: u32,
    pub body: Vec<u8>,
}

/// The frontend's end of the GPU socket: answers display queries with a
/// 800x600 mode and records everything else.
pub struct GpuSocketPeer {
    pub msgs: std::sync::Arc<std::sync::Mutex<Vec<GpuMsg>>>,
}

impl Vmm {
    /// Sends VHOST_USER_GPU_SET_SOCKET (33) with one end of a socketpair,
    /// as QEMU does; the vhost frontend API has no call for it.
    pub fn set_gpu_socket(&mut self) -> GpuSocketPeer {
        use std::io::{Read, Write};
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let hdr: Vec<u8> = [33u32, 1, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
        send_with_fd(&self.raw, &hdr, theirs.as_raw_fd());
        drop(theirs);
        // No reply without REPLY_ACK: a request that has one orders us
        // after the backend handled the socket.
        self.frontend.get_features().unwrap();
        let msgs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = msgs.clone();
        std::thread::spawn(move || {
            let mut sock = ours;
            loop {
                let mut h = [0u8; 12];
                if sock.read_exact(&mut h).is_err() {
                    return;
                }
                let request = u32::from_le_bytes(h[0..4].try_into().unwrap());
                let size = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
                let mut body = vec![0u8; size];
                if sock.read_exact(&mut body).is_err() {
                    return;
                }
                let reply: Option<Vec<u8>> = match request {
                    3 => {
                        // virtio_gpu_resp_display_info: header, 16 modes.
                        let mut b = vec![0u8; 24 + 16 * 24];
                        for (i, v) in [0u32, 0, 800, 600, 1, 0].iter().enumerate() {
                            b[24 + i * 4..28 + i * 4].copy_from_slice(&v.to_le_bytes());
                        }
                        Some(b)
                    }
                    // No EDID from this frontend: size 0.
                    11 => Some(vec![0u8; 24 + 8 + 1024]),
                    _ => None,
                };
                if let Some(b) = reply {
                    let mut out: Vec<u8> = [request, 0x4, b.len() as u32]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect();
                    out.extend(b);
                    sock.write_all(&out).unwrap();
                } else {
                    log.lock().unwrap().push(GpuMsg { request, body });
                }
            }
        });
        GpuSocketPeer { msgs }
    }
}

fn send_with_fd(sock: &std::os::unix::net::UnixStream, bytes: &[u8], fd: i32) {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer in it refers to live
    // buffers above, and the cmsg header is written inside `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        assert_eq!(
            libc::sendmsg(sock.as_raw_fd(), &msg, 0),
            bytes.len() as isize
        );
    }
}
