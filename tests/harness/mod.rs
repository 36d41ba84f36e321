//! A VMM and a guest driver in one test process, talking to the real
//! daemon binary over its real vhost-user socket.
//!
//! The harness starts `vhost-gpu-nc`, connects with the `vhost` crate's
//! frontend, shares memfd-backed guest RAM, sets up split virtqueues in that
//! RAM (descriptor table, avail and used rings written by hand, as a guest
//! driver would), and kicks/waits through eventfds. Tests build descriptor
//! chains directly, so malformed chains are as easy to send as good ones.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod session;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::gpu_message::GpuBackendReq;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_gpu_nc::virtio_gpu::protocol::{
    CtrlHdr, VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE, VIRTIO_GPU_CMD_CTX_CREATE,
    VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, VIRTIO_GPU_CMD_RESOURCE_CREATE_3D,
    VIRTIO_GPU_CMD_SUBMIT_3D, VIRTIO_GPU_F_CONTEXT_INIT, VIRTIO_GPU_F_EDID,
    VIRTIO_GPU_F_RESOURCE_BLOB, VIRTIO_GPU_F_VIRGL, VIRTIO_GPU_FLAG_FENCE,
    VIRTIO_GPU_FLAG_INFO_RING_IDX, VIRTIO_GPU_RESP_OK_NODATA,
};
use vm_memory::ByteValued;
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

/// VIRTIO_GPU_F_* as feature masks.
pub const F_VIRGL: u64 = 1 << VIRTIO_GPU_F_VIRGL;
pub const F_EDID: u64 = 1 << VIRTIO_GPU_F_EDID;
pub const F_BLOB: u64 = 1 << VIRTIO_GPU_F_RESOURCE_BLOB;
pub const F_CONTEXT_INIT: u64 = 1 << VIRTIO_GPU_F_CONTEXT_INIT;
/// VIRTIO_RING_F_EVENT_IDX as a feature mask.
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The daemon process.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    /// Where its stderr goes, if captured.
    log: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::spawn(args, false)
    }

    /// Starts the daemon with its stderr (the log) captured in a file.
    pub fn start_logged(args: &[&str]) -> Daemon {
        Daemon::spawn(args, true)
    }

    fn spawn(args: &[&str], capture: bool) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("gpu.sock");
        let log = capture.then(|| dir.path().join("daemon.log"));
        let mut cmd = daemon_command();
        cmd.arg("--socket-path")
            .arg(&socket)
            .args(["--compute-units", "2"])
            .args(args);
        if !args.contains(&"--log-level") {
            cmd.args(["--log-level", "warn"]);
        }
        if let Some(log) = &log {
            cmd.stderr(Stdio::from(std::fs::File::create(log).unwrap()));
        }
        Daemon::spawn_command(cmd, dir, socket, log)
    }

    /// Starts another vhost-user GPU backend (`program --socket-path
    /// SOCK args...`, QEMU's `vhost-user-gpu` say) for the same harness.
    pub fn start_program(program: &Path, args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("gpu.sock");
        let mut cmd = Command::new(program);
        cmd.arg("--socket-path").arg(&socket).args(args);
        Daemon::spawn_command(cmd, dir, socket, None)
    }

    fn spawn_command(
        mut cmd: Command,
        dir: tempfile::TempDir,
        socket: PathBuf,
        log: Option<PathBuf>,
    ) -> Daemon {
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "daemon did not listen");
            std::thread::sleep(Duration::from_millis(1));
        }
        Daemon {
            child,
            socket,
            log,
            _dir: dir,
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// The captured log so far (empty if not captured).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned())
            .unwrap_or_default()
    }

    /// The daemon's open file descriptors (/proc/PID/fd).
    pub fn fds(&self) -> Vec<i32> {
        let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        fds.sort_unstable();
        fds
    }

    /// CPU time the daemon used so far (user + system).
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which is in parentheses).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Sets the daemon's soft RLIMIT_NOFILE; returns the previous limits.
    pub fn set_fd_limit(&self, soft: u64) -> libc::rlimit {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reading our child's limit into `old`.
        let rc =
            unsafe { libc::prlimit(self.pid(), libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        // SAFETY: setting our child's limit from a valid struct.
        let rc =
            unsafe { libc::prlimit(self.pid(), libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        old
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

/// Shared guest RAM (memfd) mapped into the test process. The mapping is
/// always `RAM_SIZE` long; the file may be shorter (a frontend that lies
/// about its regions), and then only `file_size` bytes may be touched here.
pub struct GuestRam {
    pub fd: std::fs::File,
    ptr: *mut u8,
    file_size: usize,
}

/// A fresh memfd of `size` bytes.
pub fn memfd(size: u64) -> std::fs::File {
    // SAFETY: memfd_create with a static NUL-terminated name.
    let raw = unsafe { libc::memfd_create(c"extra-ram".as_ptr(), 0) };
    assert!(raw >= 0);
    // SAFETY: we own the fresh fd.
    let fd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    fd.set_len(size).unwrap();
    fd
}

impl GuestRam {
    fn new(file_size: usize) -> GuestRam {
        // SAFETY: memfd_create with a static NUL-terminated name.
        let raw = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), 0) };
        assert!(raw >= 0);
        // SAFETY: we own the fresh fd.
        let fd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        fd.set_len(file_size as u64).unwrap();
        // SAFETY: a shared mapping of the memfd (pages past its end are
        // never touched by the harness).
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
            file_size,
        }
    }

    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }

    fn check(&self, gpa: u64, len: usize) {
        assert!(gpa as usize + len <= self.file_size, "{gpa:#x}+{len:#x}");
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.check(gpa, bytes.len());
        // SAFETY: in bounds of the mapping and the file (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(gpa as usize), bytes.len())
        };
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        self.check(gpa, len);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds of the mapping and the file (checked above).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), v.as_mut_ptr(), len) };
        v
    }

    pub fn u16(&self, gpa: u64) -> u16 {
        self.check(gpa, 2);
        // SAFETY: aligned, in bounds; the daemon writes it concurrently.
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize).cast::<u16>()) }
    }

    pub fn u32(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.read(gpa, 4).try_into().unwrap())
    }

    /// Acquire-load of the aligned `u32` at `gpa`, without a copy.
    pub fn u32_acquire(&self, gpa: u64) -> u32 {
        self.check(gpa, 4);
        assert_eq!(gpa % 4, 0);
        // SAFETY: aligned and in bounds of the mapping and the file
        // (checked above); the daemon writes it concurrently, atomically.
        unsafe {
            std::sync::atomic::AtomicU32::from_ptr(self.ptr.add(gpa as usize).cast())
                .load(std::sync::atomic::Ordering::Acquire)
        }
    }

    /// Acquire-load of the aligned `u64` at `gpa`, without a copy.
    pub fn u64_acquire(&self, gpa: u64) -> u64 {
        self.check(gpa, 8);
        assert_eq!(gpa % 8, 0);
        // SAFETY: as for `u32_acquire`.
        unsafe {
            std::sync::atomic::AtomicU64::from_ptr(self.ptr.add(gpa as usize).cast())
                .load(std::sync::atomic::Ordering::Acquire)
        }
    }

    /// Release-store of the aligned `u32` at `gpa`.
    pub fn set_u32_release(&self, gpa: u64, v: u32) {
        self.check(gpa, 4);
        assert_eq!(gpa % 4, 0);
        // SAFETY: as for `u32_acquire`.
        unsafe {
            std::sync::atomic::AtomicU32::from_ptr(self.ptr.add(gpa as usize).cast())
                .store(v, std::sync::atomic::Ordering::Release)
        }
    }

    pub fn u64(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.read(gpa, 8).try_into().unwrap())
    }

    pub fn set_u16(&self, gpa: u64, v: u16) {
        self.check(gpa, 2);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: aligned, in bounds.
        unsafe { std::ptr::write_volatile(self.ptr.add(gpa as usize).cast::<u16>(), v) };
    }

    /// A memory-table entry for `[gpa, gpa + size)`, backed by the same
    /// offset of the memfd.
    pub fn region(&self, gpa: u64, size: u64) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.host_addr(gpa),
            mmap_offset: gpa,
            mmap_handle: self.fd.as_raw_fd(),
        }
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
    err: EventFd,
}

/// A descriptor of a chain the test builds.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// How the guest memory is given to the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemSetup {
    /// One SET_MEM_TABLE region of `RAM_SIZE` bytes.
    Table,
    /// ADD_MEM_REG of two regions, halves of `RAM_SIZE` (needs
    /// CONFIGURE_MEM_SLOTS).
    Slots,
}

/// How the harness sets the device up.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// VIRTIO_GPU_F_* bits to ack (of what the device offers).
    pub features: u64,
    /// Protocol features to ask for besides CONFIG, MQ and REPLY_ACK.
    pub protocol: VhostUserProtocolFeatures,
    /// The memfd's real size (the regions claim `RAM_SIZE`).
    pub file_size: usize,
    pub memory: MemSetup,
}

impl Setup {
    pub fn new(features: u64) -> Setup {
        Setup {
            features,
            protocol: VhostUserProtocolFeatures::empty(),
            file_size: RAM_SIZE,
            memory: MemSetup::Table,
        }
    }
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
    /// Kick only when the device asks for it (see [`Vmm::suppress_kicks`]).
    suppress_kicks: bool,
    /// Kicks sent so far.
    pub kicks: u64,
}

/// Connects to the daemon's socket, retrying while it is between bind()
/// and listen().
pub fn connect_socket(socket: &Path) -> std::os::unix::net::UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("connecting to the daemon: {e}"),
        }
    }
}

impl Vmm {
    /// Connects and sets the device up like QEMU does, acking `features`
    /// (VIRTIO_GPU_F_* bits) of what the device offers.
    pub fn connect(socket: &Path, features: u64) -> Vmm {
        Vmm::connect_with(socket, Setup::new(features))
    }

    /// Sets the device up over an already connected socket (the frontend's
    /// end of the socketpair libvirt makes).
    pub fn from_stream(stream: std::os::unix::net::UnixStream, features: u64) -> Vmm {
        Vmm::try_connect_stream(stream, Setup::new(features)).unwrap()
    }

    pub fn connect_with(socket: &Path, setup: Setup) -> Vmm {
        Vmm::try_connect(socket, setup).unwrap()
    }

    /// Connects and sets the device up; the first vhost-user error is
    /// returned (every request waits for its REPLY_ACK).
    pub fn try_connect(socket: &Path, setup: Setup) -> Result<Vmm, vhost::Error> {
        Vmm::try_connect_stream(connect_socket(socket), setup)
    }

    /// Sets the device up over an already connected stream.
    pub fn try_connect_stream(
        stream: std::os::unix::net::UnixStream,
        setup: Setup,
    ) -> Result<Vmm, vhost::Error> {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let raw = stream.try_clone().unwrap();
        let mut frontend = Frontend::from_stream(stream, 2);
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        assert_ne!(offered & F_PROTOCOL_FEATURES, 0);
        let acked = offered & (setup.features | F_VERSION_1 | F_PROTOCOL_FEATURES);
        frontend.set_features(acked)?;
        let pf = frontend.get_protocol_features()?;
        assert!(pf.contains(VhostUserProtocolFeatures::CONFIG));
        let want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | setup.protocol;
        frontend.set_protocol_features(pf & want)?;
        // Every request without a reply of its own waits for its ack, so
        // the daemon has handled it when the call returns.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let ram = GuestRam::new(setup.file_size);
        match setup.memory {
            MemSetup::Table => {
                frontend.set_mem_table(&[ram.region(0, RAM_SIZE as u64)])?;
            }
            MemSetup::Slots => {
                let half = RAM_SIZE as u64 / 2;
                frontend.add_mem_region(&ram.region(0, half))?;
                frontend.add_mem_region(&ram.region(half, half))?;
            }
        }
        let mut vmm = Vmm {
            frontend,
            raw,
            ram,
            queues: Vec::new(),
            features: acked,
            heap: HEAP_GPA,
            suppress_kicks: false,
            kicks: 0,
        };
        for q in 0..2usize {
            let base = RING_BASE + q as u64 * RING_STRIDE;
            let queue = Queue {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                avail_idx: 0,
                used_idx: 0,
                kick: EventFd::new(0).unwrap(),
                call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                err: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            };
            vmm.queues.push(queue);
            vmm.start_queue(q)?;
        }
        Ok(vmm)
    }

    /// SET_VRING_NUM, _ADDR, _BASE (0), _KICK, _CALL, _ERR and _ENABLE for
    /// queue `q`, with its rings where the harness keeps them.
    fn start_queue(&mut self, q: usize) -> Result<(), vhost::Error> {
        let queue = &self.queues[q];
        let (desc, avail, used) = (queue.desc, queue.avail, queue.used);
        self.frontend.set_vring_num(q, QUEUE_SIZE)?;
        self.frontend.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: self.ram.host_addr(desc),
                used_ring_addr: self.ram.host_addr(used),
                avail_ring_addr: self.ram.host_addr(avail),
                log_addr: None,
            },
        )?;
        self.frontend.set_vring_base(q, 0)?;
        let queue = &self.queues[q];
        self.frontend.set_vring_kick(q, &queue.kick)?;
        self.frontend.set_vring_call(q, &queue.call)?;
        self.frontend.set_vring_err(q, &queue.err)?;
        self.frontend.set_vring_enable(q, true)?;
        Ok(())
    }

    /// Stops queue `q` (GET_VRING_BASE, as QEMU does on a guest reset),
    /// clears its rings and starts it again from index 0.
    pub fn reset_queue(&mut self, q: usize) {
        self.frontend.get_vring_base(q).unwrap();
        let queue = &mut self.queues[q];
        self.ram.write(queue.desc, &[0u8; 0x3000]);
        queue.avail_idx = 0;
        queue.used_idx = 0;
        self.start_queue(q).unwrap();
    }

    /// Sets the device up again after RESET_DEVICE (features, both rings
    /// from index 0), as a frontend does when the driver starts over.
    pub fn restart_after_reset(&mut self) {
        self.frontend.set_features(self.features).unwrap();
        for q in 0..2 {
            self.reset_queue(q);
        }
    }

    /// Whether the daemon signalled queue `q`'s error eventfd
    /// (VHOST_USER_SET_VRING_ERR) since the last call.
    pub fn vring_error(&self, q: usize) -> bool {
        self.queues[q].err.read().is_ok()
    }

    /// Moves queue `q`'s avail index by `n` without writing entries, and
    /// kicks.
    pub fn advance_avail(&mut self, q: usize, n: u16) {
        let queue = &mut self.queues[q];
        queue.avail_idx = queue.avail_idx.wrapping_add(n);
        self.ram.set_u16(queue.avail + 2, queue.avail_idx);
        queue.kick.write(1).unwrap();
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

    /// Makes descriptor `head` available and kicks (unless kicks are
    /// suppressed and the device did not ask for one).
    pub fn publish(&mut self, q: usize, head: u16) -> u16 {
        let event_idx = self.features & F_EVENT_IDX != 0;
        let queue = &mut self.queues[q];
        let slot = queue.avail + 4 + u64::from(queue.avail_idx % QUEUE_SIZE) * 2;
        self.ram.set_u16(slot, head);
        let old = queue.avail_idx;
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        self.ram.set_u16(queue.avail + 2, queue.avail_idx);
        let kick = !self.suppress_kicks || {
            // As Linux's virtqueue_kick_prepare: the new index must be
            // visible before the device's suppression state is read.
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if event_idx {
                let avail_event = self.ram.u16(queue.used + 4 + 8 * u64::from(QUEUE_SIZE));
                // vring_need_event(avail_event, new, old)
                queue.avail_idx.wrapping_sub(avail_event).wrapping_sub(1)
                    < queue.avail_idx.wrapping_sub(old)
            } else {
                self.ram.u16(queue.used) & 1 == 0
            }
        };
        if kick {
            queue.kick.write(1).unwrap();
            self.kicks += 1;
        }
        head
    }

    /// Kicks only when the device asks for one, as a Linux driver does
    /// (`VIRTIO_RING_F_EVENT_IDX`'s `avail_event` when negotiated, else
    /// the used ring's `NO_NOTIFY` flag). Off by default: tests kick on
    /// every chain.
    pub fn suppress_kicks(&mut self, on: bool) {
        self.suppress_kicks = on;
    }

    /// The next used entry of queue `q`, if the device returned one.
    pub fn poll_used(&mut self, q: usize) -> Option<(u16, u32)> {
        let queue = &mut self.queues[q];
        if self.ram.u16(queue.used + 2) == queue.used_idx {
            return None;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let at = queue.used + 4 + u64::from(queue.used_idx % QUEUE_SIZE) * 8;
        let head = self.ram.u32(at) as u16;
        let len = self.ram.u32(at + 4);
        queue.used_idx = queue.used_idx.wrapping_add(1);
        Some((head, len))
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
        assert!(request.len() as u64 <= RESP_GPA - REQ_GPA, "use ctrl_at");
        self.ctrl_at(REQ_GPA, request, resp_len)
    }

    /// Sends a control request placed at `req_gpa` (for requests larger
    /// than the harness's request buffer) and returns the response bytes.
    pub fn ctrl_at(&mut self, req_gpa: u64, request: &[u8], resp_len: u32) -> Vec<u8> {
        self.ram.write(req_gpa, request);
        self.ram.write(RESP_GPA, &vec![0u8; resp_len as usize]);
        self.post(
            0,
            &[
                Desc {
                    addr: req_gpa,
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
    let h = CtrlHdr {
        type_: type_.into(),
        flags: flags.into(),
        fence_id: fence.into(),
        ctx_id: ctx.into(),
        ring_idx: ring,
        padding: [0; 3],
    };
    h.as_slice().to_vec()
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
            VIRTIO_GPU_CMD_RESOURCE_CREATE_3D,
            0,
            &[id, 0, 64, 1, bytes, 1, 1, 1, 0, 0, 0, 0],
        );
        assert_eq!(self.ctrl_type(&r), VIRTIO_GPU_RESP_OK_NODATA);
        let gpa = self.alloc(u64::from(bytes));
        let mut a = req(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, 0, &[id, 1]);
        a.extend(entries(&[(gpa, bytes.next_multiple_of(4096))]));
        assert_eq!(self.ctrl_type(&a), VIRTIO_GPU_RESP_OK_NODATA);
        gpa
    }

    /// CTX_CREATE with `context_init`.
    pub fn ctx_create(&mut self, ctx: u32, context_init: u32) -> u32 {
        let mut r = req(VIRTIO_GPU_CMD_CTX_CREATE, ctx, &[4, context_init]);
        let mut name = [0u8; 64];
        name[..4].copy_from_slice(b"test");
        r.extend_from_slice(&name);
        self.ctrl_type(&r)
    }

    /// CTX_ATTACH_RESOURCE.
    pub fn ctx_attach(&mut self, ctx: u32, id: u32) -> u32 {
        self.ctrl_type(&req(VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE, ctx, &[id, 0]))
    }

    /// SUBMIT_3D of `commands` on `ctx`, with an optional (fence, ring).
    /// Posts the chain and returns its head without waiting.
    pub fn post_submit(
        &mut self,
        ctx: u32,
        commands: &[u8],
        fence: Option<(u64, Option<u8>)>,
    ) -> u16 {
        let (flags, id, ring) = match fence {
            None => (0, 0, 0),
            Some((id, None)) => (VIRTIO_GPU_FLAG_FENCE, id, 0),
            Some((id, Some(r))) => (VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX, id, r),
        };
        let mut r = hdr(VIRTIO_GPU_CMD_SUBMIT_3D, flags, id, ctx, ring);
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
        )
    }

    /// SUBMIT_3D and wait for its response type.
    pub fn submit(&mut self, ctx: u32, commands: &[u8]) -> u32 {
        let _ = self.post_submit(ctx, commands, None);
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

/// How the frontend's end of the GPU socket behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerMode {
    /// Answers display queries (800x600, no EDID), records the rest.
    Answers,
    /// Reads and records everything, answers nothing.
    Silent,
    /// Closes its end at once.
    Closes,
    /// Answers like `Answers`, records every other message without its
    /// body (for benchmarks that send many pixels).
    Discards,
}

impl Vmm {
    /// Sends VHOST_USER_GPU_SET_SOCKET with one end of a socketpair,
    /// as QEMU does; the vhost frontend API has no call for it.
    pub fn set_gpu_socket(&mut self) -> GpuSocketPeer {
        self.set_gpu_socket_peer(PeerMode::Answers)
    }

    pub fn set_gpu_socket_peer(&mut self, mode: PeerMode) -> GpuSocketPeer {
        use std::io::{Read, Write};
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let set_socket = u32::from(FrontendReq::GPU_SET_SOCKET);
        let hdr: Vec<u8> = [set_socket, 1, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        send_with_fd(&self.raw, &hdr, theirs.as_raw_fd());
        drop(theirs);
        // No reply without REPLY_ACK: a request that has one orders us
        // after the backend handled the socket.
        self.frontend.get_features().unwrap();
        let msgs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        if mode == PeerMode::Closes {
            drop(ours);
            return GpuSocketPeer { msgs };
        }
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
                let display_info = u32::from(GpuBackendReq::GET_DISPLAY_INFO);
                let get_edid = u32::from(GpuBackendReq::GET_EDID);
                let get_features = u32::from(GpuBackendReq::GET_PROTOCOL_FEATURES);
                let answers = matches!(mode, PeerMode::Answers | PeerMode::Discards);
                let reply: Option<Vec<u8>> = match (answers, request) {
                    // No GPU protocol features (no EDID, no dmabuf).
                    (true, r) if r == get_features => Some(vec![0u8; 8]),
                    (true, r) if r == display_info => {
                        // virtio_gpu_resp_display_info: header (of type
                        // OK_DISPLAY_INFO, as QEMU's frontend fills it in:
                        // QEMU's own backend passes it on), 16 modes.
                        let mut b = vec![0u8; 24 + 16 * 24];
                        b[..4].copy_from_slice(&0x1101u32.to_le_bytes());
                        for (i, v) in [0u32, 0, 800, 600, 1, 0].iter().enumerate() {
                            b[24 + i * 4..28 + i * 4].copy_from_slice(&v.to_le_bytes());
                        }
                        Some(b)
                    }
                    // No EDID from this frontend: size 0.
                    (true, r) if r == get_edid => Some(vec![0u8; 24 + 8 + 1024]),
                    _ => None,
                };
                if let Some(b) = reply {
                    let mut out: Vec<u8> =
                        [request, VhostUserHeaderFlag::REPLY.bits(), b.len() as u32]
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect();
                    out.extend(b);
                    sock.write_all(&out).unwrap();
                } else if mode == PeerMode::Discards {
                    log.lock().unwrap().push(GpuMsg {
                        request,
                        body: Vec::new(),
                    });
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
            isize::try_from(bytes.len()).unwrap()
        );
    }
}
