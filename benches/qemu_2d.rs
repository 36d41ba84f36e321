//! The daemon against QEMU's own C backend (`/usr/lib/qemu/vhost-user-gpu`
//! from Debian's `qemu-system-gui`, which `tests/qemu/setup.sh` installs)
//! on the same 2D workload, driven by the same frontend code: the harness
//! of `tests/harness` (a VMM with hand-built split rings and the GPU
//! socket's frontend end, answering display queries and reading every
//! update).
//!
//! One cycle of the workload, per resource (256 x 256 B8G8R8A8, its
//! 256 KiB of backing in 64 scattered 4 KiB pages that were written):
//! `RESOURCE_CREATE_2D`, `RESOURCE_ATTACH_BACKING`, `SET_SCANOUT`,
//! `TRANSFER_TO_HOST_2D` of the whole image, `RESOURCE_FLUSH` (whose pixels
//! go over the GPU socket), `RESOURCE_UNREF`. Measured in one run,
//! interleaved, for both backends:
//!
//! - serially (each command waits for its response, polled): throughput in
//!   commands per second and every command's p50;
//! - pipelined (up to 24 commands in flight): throughput;
//! - `GET_DISPLAY_INFO` (a round trip to the GPU socket's peer) p50;
//! - start-up (spawn to listening socket) and resident set after the run.
//!
//! Run: `cargo bench --bench qemu_2d [-- --quick]`; writes
//! `target/bench-results/qemu_2d.csv`. Without QEMU's backend it says so
//! and measures nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "../tests/harness/mod.rs"]
mod harness;

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Poll, pct, print_load, write_csv};
use harness::{Daemon, Desc, F_EVENT_IDX, GpuSocketPeer, PeerMode, Vmm, entries, req};
use vhost::vhost_user::gpu_message::GpuBackendReq;
use vhost_gpu_nc::virtio_gpu::protocol::{
    VIRTIO_GPU_CMD_GET_DISPLAY_INFO, VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING,
    VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, VIRTIO_GPU_CMD_RESOURCE_FLUSH,
    VIRTIO_GPU_CMD_RESOURCE_UNREF, VIRTIO_GPU_CMD_SET_SCANOUT, VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D,
    VIRTIO_GPU_RESP_OK_DISPLAY_INFO, VIRTIO_GPU_RESP_OK_NODATA,
};

const W: u32 = 256;
const H: u32 = 256;
const IMAGE: u64 = (W * H * 4) as u64;
const PAGE: u64 = 4096;
/// `VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM`.
const FORMAT: u32 = 1;
const SLOTS: usize = 24;
const NAMES: [&str; 6] = [
    "create_2d",
    "attach_backing",
    "set_scanout",
    "transfer_to_host_2d",
    "resource_flush",
    "resource_unref",
];

/// One backend and the frontend driving it.
struct Gpu {
    name: &'static str,
    daemon: Daemon,
    vmm: Vmm,
    peer: GpuSocketPeer,
    /// Request and response buffers.
    slots: Vec<(u64, u64)>,
    /// The image's backing entries (64 pages, every other page).
    backing: Vec<(u64, u32)>,
    startup: Duration,
    flushes: u64,
}

impl Gpu {
    fn start(name: &'static str, program: Option<&PathBuf>) -> Gpu {
        let t = Instant::now();
        let daemon = match program {
            None => Daemon::start(&[]),
            Some(p) => Daemon::start_program(p, &[]),
        };
        let startup = t.elapsed();
        // As a Linux guest: EVENT_IDX when offered, kicks only when the
        // device asks for them.
        let mut vmm = Vmm::connect(&daemon.socket, F_EVENT_IDX);
        let peer = vmm.set_gpu_socket_peer(PeerMode::Discards);
        vmm.suppress_kicks(true);
        let slots = (0..SLOTS)
            .map(|_| (vmm.alloc(PAGE), vmm.alloc(PAGE)))
            .collect();
        let region = vmm.alloc(2 * IMAGE);
        let backing: Vec<(u64, u32)> = (0..IMAGE / PAGE)
            .map(|i| (region + 2 * i * PAGE, PAGE as u32))
            .collect();
        // Written pixels, not the zero page.
        let pixels: Vec<u8> = (0..2 * IMAGE)
            .map(|i| (i as u8).wrapping_mul(29) ^ (i >> 12) as u8)
            .collect();
        vmm.ram.write(region, &pixels);
        Gpu {
            name,
            daemon,
            vmm,
            peer,
            slots,
            backing,
            startup,
            flushes: 0,
        }
    }

    fn post(&mut self, slot: usize, request: &[u8], resp_len: u32) {
        let (r, p) = self.slots[slot];
        assert!(request.len() as u64 <= PAGE);
        self.vmm.ram.write(r, request);
        self.vmm.ram.write(p, &[0xFFu8; 4]);
        self.vmm.post(
            0,
            &[
                Desc {
                    addr: r,
                    len: request.len() as u32,
                    write: false,
                },
                Desc {
                    addr: p,
                    len: resp_len,
                    write: true,
                },
            ],
        );
    }

    /// Waits (polling) for the next used entry; checks its response type.
    fn reap(&mut self, slot: usize, want: u32) {
        let mut poll = Poll::new("a response");
        while self.vmm.poll_used(0).is_none() {
            poll.pause();
        }
        let ty = self.vmm.ram.u32_acquire(self.slots[slot].1);
        assert_eq!(ty, want, "{}: response {ty:#x}", self.name);
    }

    /// One command, waited for: its latency.
    fn command(&mut self, request: &[u8], want: u32, resp_len: u32) -> Duration {
        let t = Instant::now();
        self.post(0, request, resp_len);
        self.reap(0, want);
        t.elapsed()
    }

    fn cycle(&self, id: u32) -> [Vec<u8>; 6] {
        let mut attach = req(
            VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING,
            0,
            &[id, self.backing.len() as u32],
        );
        attach.extend(entries(&self.backing));
        let mut transfer = req(VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D, 0, &[0, 0, W, H]);
        transfer.extend_from_slice(&0u64.to_le_bytes());
        transfer.extend_from_slice(&id.to_le_bytes());
        transfer.extend_from_slice(&0u32.to_le_bytes());
        [
            req(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, &[id, FORMAT, W, H]),
            attach,
            req(VIRTIO_GPU_CMD_SET_SCANOUT, 0, &[0, 0, W, H, 0, id]),
            transfer,
            req(VIRTIO_GPU_CMD_RESOURCE_FLUSH, 0, &[0, 0, W, H, id, 0]),
            req(VIRTIO_GPU_CMD_RESOURCE_UNREF, 0, &[id, 0]),
        ]
    }

    /// `cycles` cycles, each command waited for; per-command latencies.
    fn serial(&mut self, cycles: u32, lat: &mut [Vec<Duration>; 6]) -> Duration {
        let start = Instant::now();
        let skip = std::env::var("QEMU2D_SKIP").unwrap_or_default();
        for i in 0..cycles {
            let cmds = self.cycle(1 + i % 8);
            for (k, c) in cmds.iter().enumerate() {
                if skip.contains(&k.to_string()) {
                    continue;
                }
                lat[k].push(self.command(c, VIRTIO_GPU_RESP_OK_NODATA, 24));
            }
            self.flushes += 1;
        }
        start.elapsed()
    }

    /// `cycles` cycles with up to `SLOTS` commands in flight.
    fn pipelined(&mut self, cycles: u32) -> Duration {
        let start = Instant::now();
        let mut inflight = std::collections::VecDeque::new();
        let mut next = 0usize;
        for i in 0..cycles {
            for c in self.cycle(1 + i % 8) {
                if inflight.len() == SLOTS {
                    let slot = inflight.pop_front().unwrap();
                    self.reap(slot, VIRTIO_GPU_RESP_OK_NODATA);
                }
                self.post(next, &c, 24);
                inflight.push_back(next);
                next = (next + 1) % SLOTS;
            }
            self.flushes += 1;
        }
        while let Some(slot) = inflight.pop_front() {
            self.reap(slot, VIRTIO_GPU_RESP_OK_NODATA);
        }
        start.elapsed()
    }

    fn display_info(&mut self) -> Duration {
        let r = req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[]);
        self.command(&r, VIRTIO_GPU_RESP_OK_DISPLAY_INFO, 24 + 16 * 24)
    }

    /// Updates the GPU socket's peer received so far.
    fn updates(&self) -> u64 {
        let update = u32::from(GpuBackendReq::UPDATE);
        self.peer
            .msgs
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.request == update)
            .count() as u64
    }

    /// Waits until the peer has every flush's update (or 2 s passed);
    /// returns how many it has.
    fn settle_updates(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.updates() < self.flushes && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.updates()
    }

    fn rss_kib(&self) -> u64 {
        harness::proc_status(self.daemon.pid() as u32, "VmRSS")
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

fn main() {
    if common::under_test() {
        return;
    }
    let quick = common::quick();
    let qemu = std::env::var_os("QEMU_VHOST_USER_GPU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/qemu/vhost-user-gpu"));
    if !qemu.exists() {
        println!(
            "qemu_2d: {} is missing (Debian's qemu-system-gui; tests/qemu/setup.sh installs it): \
             nothing measured",
            qemu.display()
        );
        return;
    }
    print_load("at start");
    let mut ours = Gpu::start("vhost-gpu-nc", None);
    let mut theirs = Gpu::start("qemu vhost-user-gpu", Some(&qemu));
    for g in [&ours, &theirs] {
        println!(
            "{}: EVENT_IDX {}",
            g.name,
            if g.vmm.features & F_EVENT_IDX != 0 {
                "negotiated"
            } else {
                "not offered"
            }
        );
    }
    let reps = if quick { 3 } else { 9 };
    let cycles = if quick { 300 } else { 1000 };
    let new_lat = || std::array::from_fn::<Vec<Duration>, 6, _>(|_| Vec::new());
    let (mut lat_o, mut lat_t) = (new_lat(), new_lat());
    let (mut ser_o, mut ser_t, mut pip_o, mut pip_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut di_o, mut di_t) = (Vec::new(), Vec::new());
    // Warm-up.
    ours.serial(50, &mut new_lat());
    theirs.serial(50, &mut new_lat());
    for _ in 0..reps {
        let cmds = f64::from(cycles * 6);
        ser_o.push(cmds / ours.serial(cycles, &mut lat_o).as_secs_f64());
        ser_t.push(cmds / theirs.serial(cycles, &mut lat_t).as_secs_f64());
        pip_o.push(cmds / ours.pipelined(cycles).as_secs_f64());
        pip_t.push(cmds / theirs.pipelined(cycles).as_secs_f64());
        for _ in 0..50 {
            di_o.push(ours.display_info());
            di_t.push(theirs.display_info());
        }
    }
    for g in [&ours, &theirs] {
        let n = g.settle_updates();
        println!(
            "{}: {n} of {} flushes reached the GPU socket's peer as updates",
            g.name, g.flushes
        );
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "\n== 2D workload, {W}x{H} images, same harness for both; {reps} interleaved rounds of {cycles} cycles =="
    );
    let (so, st) = (common::median(ser_o), common::median(ser_t));
    let (po, pt) = (common::median(pip_o), common::median(pip_t));
    println!(
        "serial:    vhost-gpu-nc {:.0} k commands/s, QEMU {:.0} k/s: {:.2}x",
        so / 1e3,
        st / 1e3,
        so / st
    );
    println!(
        "pipelined: vhost-gpu-nc {:.0} k commands/s, QEMU {:.0} k/s: {:.2}x",
        po / 1e3,
        pt / 1e3,
        po / pt
    );
    let mut rows = vec![
        format!("serial_commands_per_s,{so:.0},{st:.0}"),
        format!("pipelined_commands_per_s,{po:.0},{pt:.0}"),
    ];
    println!("per-command p50 (serial), vhost-gpu-nc vs QEMU:");
    for (k, name) in NAMES.iter().enumerate() {
        let (a, b) = (pct(&mut lat_o[k], 50.0), pct(&mut lat_t[k], 50.0));
        println!(
            "  {name:<20} {:6.1} us vs {:6.1} us ({:.2}x){}",
            us(a),
            us(b),
            a.as_secs_f64() / b.as_secs_f64(),
            if a <= b { "" } else { "  <- slower" }
        );
        rows.push(format!("{name}_p50_us,{:.2},{:.2}", us(a), us(b)));
    }
    let (a, b) = (pct(&mut di_o, 50.0), pct(&mut di_t, 50.0));
    println!(
        "  {:<20} {:6.1} us vs {:6.1} us ({:.2}x)",
        "get_display_info",
        us(a),
        us(b),
        a.as_secs_f64() / b.as_secs_f64()
    );
    rows.push(format!("get_display_info_p50_us,{:.2},{:.2}", us(a), us(b)));
    let (ro, rt) = (ours.rss_kib(), theirs.rss_kib());
    println!(
        "start-up {:.1} ms vs {:.1} ms; resident set after the run {} KiB vs {} KiB ({:.2}x)",
        ours.startup.as_secs_f64() * 1e3,
        theirs.startup.as_secs_f64() * 1e3,
        ro,
        rt,
        ro as f64 / rt.max(1) as f64
    );
    rows.push(format!(
        "startup_ms,{:.2},{:.2}",
        ours.startup.as_secs_f64() * 1e3,
        theirs.startup.as_secs_f64() * 1e3
    ));
    rows.push(format!("rss_kib,{ro},{rt}"));
    write_csv("qemu_2d", "what,vhost_gpu_nc,qemu", &rows);
    print_load("at end");
}
