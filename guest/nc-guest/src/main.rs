//! nc-guest: the guest test program of the QEMU suite.
//!
//! `nc-guest <scenario>` runs one scenario against the virtio-gpu device and
//! prints progress lines and exactly one `RESULT <scenario> PASS <detail>`
//! or `RESULT <scenario> FAIL <reason>` line; the exit status is 0 only on
//! a pass. `nc-guest all` runs every scenario.
//!
//! `NC_EXPECT_PROFILE=compat|native` makes `discovery` and `smoke` fail
//! unless the device and the session come up in that transport profile.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use guest_proto::attr::RangeAttrs;
use guest_proto::capset::Features;
use guest_proto::kernel::ALL_KERNELS_MASK;
use guest_proto::{DispatchStatus, GpuVa, Kernel, Perms, QueueId, ResourceId, Status};
use guest_runtime::mmap::Mmap;
use guest_runtime::session::{
    OwnedRange, ProfileKind, RenderNode, ResolvePolicy, Session, dispatch_ok,
};

type Outcome = Result<String, String>;

/// A scenario: its name and what it runs.
type Scenario = (&'static str, fn() -> Outcome);

const SCENARIOS: &[Scenario] = &[
    ("discovery", discovery),
    ("binds", binds),
    ("unified", unified),
    ("offset", offset),
    ("isolation", isolation),
    ("bad-address", bad_address),
    ("killed", killed),
    ("whole-process", whole_process),
    ("smoke", smoke),
    ("event-poll", event_poll),
    ("rings", rings),
    ("blob-memory", blob_memory),
];

const WAIT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let name = std::env::args().nth(1).unwrap_or_default();
    let chosen: Vec<_> = SCENARIOS
        .iter()
        .filter(|(n, _)| name == "all" || *n == name)
        .collect();
    if chosen.is_empty() {
        eprintln!(
            "usage: nc-guest <all|{}>",
            SCENARIOS.iter().map(|s| s.0).collect::<Vec<_>>().join("|")
        );
        return ExitCode::from(2);
    }
    let mut failed = false;
    for (n, f) in chosen {
        let start = Instant::now();
        match f() {
            Ok(detail) => println!(
                "RESULT {n} PASS {detail} ({} ms)",
                start.elapsed().as_millis()
            ),
            Err(reason) => {
                failed = true;
                println!("RESULT {n} FAIL {reason}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `?` for runtime errors, with the step that failed.
trait Step<T> {
    fn step(self, what: &str) -> Result<T, String>;
}

impl<T, E: std::fmt::Display> Step<T> for Result<T, E> {
    fn step(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

fn open() -> Result<Session, String> {
    let device = RenderNode::open().step("discovery")?;
    Session::open(device).step("SESSION_INIT")
}

fn discovery() -> Outcome {
    let d = RenderNode::open().step("open render node")?;
    let c = &d.capset;
    println!(
        "device {}: virgl={} context_init={} blob={} profile={:?}",
        d.path.display(),
        d.virgl,
        d.context_init,
        d.blob,
        d.profile()
    );
    println!(
        "capset v1.{}: va_bits={} aperture={}..{} reserved={}..{} cus={} kernels={:#x} features={:#x} max_queues={}",
        c.version_minor,
        c.va_bits,
        c.aperture_start,
        c.aperture_end,
        c.reserved_start,
        c.reserved_end,
        c.compute_units,
        c.kernels,
        c.features.bits(),
        c.max_queues
    );
    ensure(d.virgl, || "VIRGL not offered".into())?;
    expect_profile(d.profile())?;
    ensure(c.va_bits == 48, || format!("va_bits {}", c.va_bits))?;
    ensure(c.kernels & ALL_KERNELS_MASK == ALL_KERNELS_MASK, || {
        "kernels missing".into()
    })?;
    ensure(c.features.contains(Features::RECOVERABLE_FAULTS), || {
        "no recoverable faults".into()
    })?;
    ensure(c.aperture_end <= c.reserved_start, || {
        "aperture overlaps reserved".into()
    })?;
    let mut s = Session::open(d).step("SESSION_INIT")?;
    let q = s.query().step("DEVICE_QUERY")?;
    ensure(q.queues == 0 && q.bound_bytes == 0, || {
        "fresh session not empty".into()
    })?;
    expect_profile(s.profile())?;
    Ok(format!(
        "profile={:?} cus={}",
        s.profile(),
        s.node().capset.compute_units
    ))
}

/// The suite says which profile this boot must come up with
/// (`NC_EXPECT_PROFILE=compat|native`); unset means no check.
fn expect_profile(got: ProfileKind) -> Result<(), String> {
    let Ok(want) = std::env::var("NC_EXPECT_PROFILE") else {
        return Ok(());
    };
    let want_kind = match want.as_str() {
        "compat" => ProfileKind::Compat,
        "native" => ProfileKind::Native,
        other => return Err(format!("NC_EXPECT_PROFILE={other}: not compat or native")),
    };
    ensure(got == want_kind, || {
        format!("profile {got:?}, but this boot expects {want}")
    })
}

fn read_u32s(buf: &guest_runtime::session::SharedBuffer, n: usize) -> Vec<u32> {
    (0..n).map_while(|i| buf.map.get_u32(i)).collect()
}

fn write_u32s(buf: &mut guest_runtime::session::SharedBuffer, f: impl Fn(usize) -> u32) {
    for i in 0..buf.map.len() / 4 {
        let _ = buf.map.set_u32(i, f(i));
    }
}

/// fill, copy, atomic add and saxpy on buffers bound at their CPU address.
fn binds() -> Outcome {
    let mut s = open()?;
    const N: usize = 64 * 1024;
    let bytes = (N * 4) as u64;
    let mut a = s.alloc(bytes).step("alloc a")?;
    let b = s.alloc(bytes).step("alloc b")?;
    for buf in [&a, &b] {
        s.map_buffer(buf, buf.map.addr(), Perms::RW)
            .step("VM_BIND")?;
    }
    let q = s.create_queue().step("QUEUE_CREATE")?;
    let (va_a, va_b) = (a.map.addr(), b.map.addr());

    let st = s
        .run(
            q,
            Kernel::Fill {
                dst: GpuVa(va_a),
                count: N as u64,
                value: 0xA5A5_0001,
            },
            WAIT,
        )
        .step("fill")?;
    dispatch_ok(&st).step("fill")?;
    ensure(read_u32s(&a, N).iter().all(|v| *v == 0xA5A5_0001), || {
        "fill data wrong".into()
    })?;

    write_u32s(&mut a, |i| i as u32 * 3);
    let st = s
        .run(
            q,
            Kernel::Copy {
                dst: GpuVa(va_b),
                src: GpuVa(va_a),
                size: bytes,
            },
            WAIT,
        )
        .step("copy")?;
    dispatch_ok(&st).step("copy")?;
    let got = read_u32s(&b, N);
    ensure(
        got.iter().enumerate().all(|(i, v)| *v == i as u32 * 3),
        || "copy data wrong".into(),
    )?;

    let counters = s.alloc(4096).step("alloc counters")?;
    s.map_buffer(&counters, counters.map.addr(), Perms::RW)
        .step("VM_BIND counters")?;
    let k = Kernel::AtomicAdd {
        counters: GpuVa(counters.map.addr()),
        num_counters: 8,
        items: 100_000,
        addend: 3,
    };
    dispatch_ok(&s.run(q, k, WAIT).step("atomic add")?).step("atomic add")?;
    let sums: Vec<u64> = (0..8).map_while(|i| counters.map.load_u64(i * 8)).collect();
    ensure(sums.iter().all(|v| *v == 100_000 / 8 * 3), || {
        format!("atomic sums {sums:?}")
    })?;

    write_u32s(&mut a, |i| (i as f32).to_bits());
    let mut b = b;
    write_u32s(&mut b, |_| 1.0f32.to_bits());
    let k = Kernel::Saxpy {
        x: GpuVa(va_a),
        y: GpuVa(va_b),
        count: N as u64,
        a: 2.0,
    };
    dispatch_ok(&s.run(q, k, WAIT).step("saxpy")?).step("saxpy")?;
    let y = read_u32s(&b, N);
    ensure(
        y.iter()
            .enumerate()
            .all(|(i, v)| f32::from_bits(*v) == 2.0 * i as f32 + 1.0),
        || "saxpy data wrong".into(),
    )?;

    // A userptr bind: pinned process memory mapped page by page.
    let host = Mmap::anonymous(bytes as usize).step("host buffer")?;
    s.map_host(host.addr(), host.addr(), bytes, Perms::RW)
        .step("MAP_PAGES")?;
    let k = Kernel::Copy {
        dst: GpuVa(host.addr()),
        src: GpuVa(va_b),
        size: bytes,
    };
    dispatch_ok(&s.run(q, k, WAIT).step("copy to host")?).step("copy to host")?;
    ensure(
        (0..N).all(|i| host.get_u32(i) == Some((2.0 * i as f32 + 1.0).to_bits())),
        || "userptr data wrong".into(),
    )?;
    host.set_u32(0, 0).ok_or("touch")?;
    let bound = s.query().step("query")?.bound_bytes;
    Ok(format!("fill copy atomic saxpy userptr ok, bound={bound}"))
}

/// A plain 64 MiB buffer used with no bind: faults forwarded and resolved.
fn unified() -> Outcome {
    unified_at(None, 64 << 20)
}

/// Unified memory at `gpu` (`None`: the CPU address, identity).
fn unified_at(gpu: Option<u64>, len: usize) -> Outcome {
    let mut s = open()?;
    let host = Mmap::anonymous(len).step("malloc")?;
    let gpu = gpu.unwrap_or(host.addr());
    s.own(OwnedRange {
        gpu,
        cpu: host.addr(),
        len: len as u64,
    });
    s.set_attrs(
        gpu,
        len as u64,
        RangeAttrs {
            granule_shift: Some(21),
            ..RangeAttrs::default()
        },
    )
    .step("RANGE_ATTR granularity")?;
    let q = s.create_queue().step("QUEUE_CREATE")?;
    let n = (len / 4) as u64;
    let st = s
        .run(
            q,
            Kernel::Fill {
                dst: GpuVa(gpu),
                count: n,
                value: 0x5EED,
            },
            WAIT,
        )
        .step("fill")?;
    dispatch_ok(&st).step("fill")?;
    let step = 1021;
    ensure(
        (0..n as usize)
            .step_by(step)
            .all(|i| host.get_u32(i) == Some(0x5EED)),
        || "fill data wrong".into(),
    )?;
    // The CPU writes the first half; the GPU copies it to the second half.
    let half = len / 2;
    for i in (0..half / 4).step_by(step) {
        host.set_u32(i, i as u32 ^ 0x1234).ok_or("cpu write")?;
    }
    let k = Kernel::Copy {
        dst: GpuVa(gpu + half as u64),
        src: GpuVa(gpu),
        size: half as u64,
    };
    dispatch_ok(&s.run(q, k, WAIT).step("copy")?).step("copy")?;
    let ok = (0..half / 4)
        .step_by(step)
        .all(|i| host.get_u32(half / 4 + i) == Some(i as u32 ^ 0x1234));
    ensure(ok, || "copy data wrong".into())?;
    let stats = s.query().step("query")?;
    println!(
        "faults raised={} resolved={} bound={}",
        stats.faults_raised, stats.faults_resolved, stats.bound_bytes
    );
    ensure(stats.faults_resolved > 0, || {
        "no fault was forwarded".into()
    })?;
    ensure(stats.bound_bytes == len as u64, || {
        format!("bound {} of {len}", stats.bound_bytes)
    })?;
    Ok(format!("{} MiB, faults={}", len >> 20, stats.faults_raised))
}

/// GPU VA != CPU VA, for a bound buffer and for unified memory.
fn offset() -> Outcome {
    let mut s = open()?;
    const N: usize = 16 * 1024;
    let buf = s.alloc((N * 4) as u64).step("alloc")?;
    let va = 0x1000_0000_0000u64;
    s.map_buffer(&buf, va, Perms::RW)
        .step("VM_BIND at offset VA")?;
    let q = s.create_queue().step("QUEUE_CREATE")?;
    dispatch_ok(
        &s.run(
            q,
            Kernel::Fill {
                dst: GpuVa(va),
                count: N as u64,
                value: 77,
            },
            WAIT,
        )
        .step("fill")?,
    )
    .step("fill")?;
    ensure(read_u32s(&buf, N).iter().all(|v| *v == 77), || {
        "offset fill wrong".into()
    })?;
    drop(s);
    unified_at(Some(0x2000_0000_0000), 4 << 20).map(|d| format!("bound at {va:#x}; unified {d}"))
}

/// Two processes with their own contexts cannot reach each other.
fn isolation() -> Outcome {
    let mut a = open()?;
    let buf = a.alloc(4096 * 4).step("alloc A")?;
    a.map_buffer(&buf, buf.map.addr(), Perms::RW)
        .step("bind A")?;
    let qa = a.create_queue().step("queue A")?;
    let (res_a, addr_a) = (buf.resource(), buf.map.addr());
    // SAFETY: fork in a single-threaded program; the child only runs Rust
    // code that does not depend on other threads and exits with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = match isolated_child(res_a, qa, addr_a) {
            Ok(()) => 0,
            Err(e) => {
                println!("child: {e}");
                1
            }
        };
        // SAFETY: terminating the forked child without running the
        // parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let status = wait_child(pid)?;
    ensure(status == 0, || "child could reach the other context".into())?;
    dispatch_ok(
        &a.run(
            qa,
            Kernel::Fill {
                dst: GpuVa(addr_a),
                count: 4096,
                value: 1,
            },
            WAIT,
        )
        .step("A fill")?,
    )
    .step("A fill")?;
    ensure(read_u32s(&buf, 4096).iter().all(|v| *v == 1), || {
        "A data wrong".into()
    })?;
    Ok("resource and queue ids of another context are unknown".into())
}

fn isolated_child(res_a: ResourceId, qa: QueueId, addr_a: u64) -> Result<(), String> {
    let mut b = open()?;
    let op = guest_proto::bind::BindOp::MapResource {
        va: GpuVa(0x1000_0000),
        size: 4096,
        perms: Perms::RW,
        resource: res_a,
        offset: 0,
    };
    let err = b.bind(&[op]).err().and_then(|e| e.status());
    ensure(err == Some(Status::UnknownResource), || {
        format!("foreign resource: {err:?}")
    })?;
    let err = b
        .dispatch(
            qa,
            Kernel::Fill {
                dst: GpuVa(addr_a),
                count: 1,
                value: 9,
            },
            1,
            1,
        )
        .err()
        .and_then(|e| e.status());
    ensure(err == Some(Status::UnknownQueue), || {
        format!("foreign queue: {err:?}")
    })?;
    // B's own work, at A's address: B has nothing there, so it faults and
    // B's resolver (owning nothing) rejects it. A's memory is untouched.
    let qb = b.create_queue().step("queue B")?;
    let st = b
        .run(
            qb,
            Kernel::Fill {
                dst: GpuVa(addr_a),
                count: 16,
                value: 0xBAD,
            },
            WAIT,
        )
        .step("B fill")?;
    ensure(st.status == DispatchStatus::FaultRejected, || {
        format!("B fill ended {:?}", st.status)
    })?;
    println!("child: foreign ids refused, foreign address rejected");
    Ok(())
}

fn wait_child(pid: i32) -> Result<i32, String> {
    ensure(pid > 0, || "fork failed".into())?;
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    ensure(rc == pid, || "waitpid failed".into())?;
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    })
}

/// Kernels at addresses nobody maps end with an error, and nothing hangs.
fn bad_address() -> Outcome {
    let mut s = open()?;
    let q = s.create_queue().step("QUEUE_CREATE")?;
    let st = s
        .run(
            q,
            Kernel::Fill {
                dst: GpuVa(0x4000_0000_0000),
                count: 1024,
                value: 1,
            },
            WAIT,
        )
        .step("unowned VA")?;
    ensure(st.status == DispatchStatus::FaultRejected, || {
        format!("unowned VA ended {:?}", st.status)
    })?;
    let reserved = s.node().capset.reserved_start.raw() + 0x100_0000;
    let st = s
        .run(
            q,
            Kernel::Fill {
                dst: GpuVa(reserved),
                count: 16,
                value: 1,
            },
            WAIT,
        )
        .step("reserved VA")?;
    ensure(st.status == DispatchStatus::FaultFatal, || {
        format!("reserved VA ended {:?}", st.status)
    })?;
    let st = s
        .run(
            q,
            Kernel::Fill {
                dst: GpuVa(0x100),
                count: 16,
                value: 1,
            },
            WAIT,
        )
        .step("NULL")?;
    ensure(st.status == DispatchStatus::FaultFatal, || {
        format!("NULL ended {:?}", st.status)
    })?;
    // The queue still works.
    let buf = s.alloc(4096).step("alloc")?;
    s.map_buffer(&buf, buf.map.addr(), Perms::RW).step("bind")?;
    dispatch_ok(
        &s.run(
            q,
            Kernel::Fill {
                dst: GpuVa(buf.map.addr()),
                count: 1024,
                value: 5,
            },
            WAIT,
        )
        .step("fill")?,
    )
    .step("fill")?;
    Ok("unowned VA rejected, reserved range and NULL guard fatal, queue still works".into())
}

/// A process killed with faults pending leaves the device healthy.
fn killed() -> Outcome {
    let mut pipe = [0i32; 2];
    // SAFETY: `pipe` is a valid array of two fds.
    ensure(unsafe { libc::pipe(pipe.as_mut_ptr()) } == 0, || {
        "pipe failed".into()
    })?;
    // SAFETY: see `isolation`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = match hanging_child(pipe[1]) {
            Ok(()) => 0,
            Err(e) => {
                println!("child: {e}");
                1
            }
        };
        // SAFETY: see `isolation`.
        unsafe { libc::_exit(code) };
    }
    ensure(pid > 0, || "fork failed".into())?;
    let mut byte = [0u8; 1];
    // SAFETY: reading one byte into a valid buffer.
    let n = unsafe { libc::read(pipe[0], byte.as_mut_ptr().cast(), 1) };
    ensure(n == 1 && byte[0] == b'F', || {
        "child never saw its faults".into()
    })?;
    // SAFETY: killing our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = wait_child(pid);
    smoke().map(|d| format!("child killed with faults pending; then {d}"))
}

fn hanging_child(ready: i32) -> Result<(), String> {
    let mut s = open()?;
    let host = Mmap::anonymous(1 << 20).step("malloc")?;
    s.set_policy(ResolvePolicy::Ignore);
    let q = s.create_queue().step("queue")?;
    s.dispatch(
        q,
        Kernel::Fill {
            dst: GpuVa(host.addr()),
            count: 1 << 18,
            value: 3,
        },
        0,
        1,
    )
    .step("dispatch")?;
    let deadline = Instant::now() + WAIT;
    while s.take_faults().step("fault ring")?.is_empty() {
        ensure(Instant::now() < deadline, || "no fault arrived".into())?;
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: writing one byte from a valid buffer.
    unsafe { libc::write(ready, b"F".as_ptr().cast(), 1) };
    std::thread::sleep(Duration::from_secs(120));
    Ok(())
}

/// The resolver that owns the whole process (XNACK, as the ROCm thunk
/// uses it): memory nobody registered is bound on faults if
/// `/proc/self/maps` grants the access, and rejected otherwise.
fn whole_process() -> Outcome {
    let mut s = open()?;
    s.set_policy(ResolvePolicy::Process);
    let len = 4 << 20;
    let src = Mmap::anonymous(len).step("src")?;
    let dst = Mmap::anonymous(len).step("dst")?;
    for m in [&src, &dst] {
        s.set_attrs(
            m.addr(),
            len as u64,
            RangeAttrs {
                granule_shift: Some(21),
                ..RangeAttrs::default()
            },
        )
        .step("RANGE_ATTR")?;
    }
    for i in 0..len / 4 {
        src.set_u32(i, (i as u32).wrapping_mul(2_654_435_761) ^ 0x77)
            .ok_or("cpu write")?;
    }
    let q = s.create_queue().step("QUEUE_CREATE")?;
    let copy = |dst: u64, src: u64, size: u64| Kernel::Copy {
        dst: GpuVa(dst),
        src: GpuVa(src),
        size,
    };
    let st = s
        .run(q, copy(dst.addr(), src.addr(), len as u64), WAIT)
        .step("copy")?;
    dispatch_ok(&st).step("copy between unregistered mappings")?;
    ensure(
        (0..len / 4).all(|i| dst.get_u32(i) == src.get_u32(i)),
        || "copy data wrong".into(),
    )?;
    let resolved = s.query().step("query")?.faults_resolved;
    ensure(resolved >= 4, || format!("{resolved} faults resolved"))?;
    // Address space only (PROT_NONE): never the GPU's.
    let hole = Mmap::reserve(1 << 20).step("reserve")?;
    let st = s
        .run(q, copy(dst.addr(), hole.addr(), 4096), WAIT)
        .step("copy from PROT_NONE")?;
    ensure(st.status == DispatchStatus::FaultRejected, || {
        format!("PROT_NONE source ended {:?}", st.status)
    })?;
    // A read-only mapping: readable by the GPU, not writable.
    let ro = Mmap::anonymous(1 << 20).step("ro")?;
    ro.set_u32(0, 0xfeed).ok_or("cpu write")?;
    // SAFETY: changing the protection of a mapping this function owns;
    // nothing writes it afterwards.
    let rc = unsafe { libc::mprotect(ro.addr() as *mut libc::c_void, 1 << 20, libc::PROT_READ) };
    ensure(rc == 0, || "mprotect".into())?;
    let st = s
        .run(
            q,
            Kernel::Fill {
                dst: GpuVa(ro.addr()),
                count: 16,
                value: 1,
            },
            WAIT,
        )
        .step("fill read-only")?;
    ensure(st.status == DispatchStatus::FaultRejected, || {
        format!("write to read-only memory ended {:?}", st.status)
    })?;
    let st = s
        .run(q, copy(dst.addr(), ro.addr(), 4096), WAIT)
        .step("copy from read-only")?;
    dispatch_ok(&st).step("copy from read-only")?;
    ensure(dst.get_u32(0) == Some(0xfeed), || "read-only data".into())?;
    ensure(ro.get_u32(0) == Some(0xfeed), || {
        "read-only memory changed".into()
    })?;
    let stats = s.query().step("query")?;
    Ok(format!(
        "unregistered 4 MiB copied via {} resolved faults; PROT_NONE and writes to read-only rejected ({})",
        stats.faults_resolved, stats.faults_rejected
    ))
}

/// Discovery, one bind and a fill (after a QEMU restart, for example).
fn smoke() -> Outcome {
    let mut s = open()?;
    expect_profile(s.profile())?;
    let profile = s.profile();
    let buf = s.alloc(64 * 1024).step("alloc")?;
    s.map_buffer(&buf, buf.map.addr(), Perms::RW).step("bind")?;
    let q = s.create_queue().step("queue")?;
    let st = s
        .run(
            q,
            Kernel::Fill {
                dst: GpuVa(buf.map.addr()),
                count: 16 * 1024,
                value: 0x600D,
            },
            WAIT,
        )
        .step("fill")?;
    dispatch_ok(&st).step("fill")?;
    ensure(
        read_u32s(&buf, 16 * 1024).iter().all(|v| *v == 0x600D),
        || "fill data wrong".into(),
    )?;
    s.destroy().step("SESSION_DESTROY")?;
    Ok(format!("bind + fill ok, profile={profile:?}"))
}

fn require_native(s: &Session) -> Result<(), String> {
    ensure(s.profile() == ProfileKind::Native, || {
        format!("needs the native profile, got {:?}", s.profile())
    })
}

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid out-pointer for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Native profile: the held EVENT_ARM fence wakes a guest thread blocked in
/// `poll()` on the DRM file when a fault arrives, and the thread slept
/// meanwhile (its CPU time stays a small part of the time it waited).
fn event_poll() -> Outcome {
    let mut s = open()?;
    require_native(&s)?;
    let q = s.create_queue().step("queue")?;
    let _event = s.arm_event().step("EVENT_ARM")?;
    let waiter = s.event_waiter();
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let (t0, cpu0) = (Instant::now(), thread_cpu());
        let woke = waiter.wait(Duration::from_secs(60));
        let _ = tx.send((
            woke.map_err(|e| e.to_string()),
            t0.elapsed(),
            thread_cpu() - cpu0,
        ));
    });
    std::thread::sleep(Duration::from_millis(500));
    ensure(rx.try_recv().is_err(), || {
        "the waiter woke with no event pending".into()
    })?;
    let raised = Instant::now();
    let fill = Kernel::Fill {
        dst: GpuVa(0x7000_0000),
        count: 16,
        value: 1,
    };
    s.dispatch(q, fill, 0, 1).step("dispatch")?;
    let (woke, waited, cpu) = rx
        .recv_timeout(WAIT)
        .map_err(|_| "the event fence never woke the waiter".to_string())?;
    let latency = raised.elapsed();
    let _ = thread.join();
    ensure(woke == Ok(true), || format!("poll() returned {woke:?}"))?;
    ensure(cpu * 10 < waited, || {
        format!("the waiter used {cpu:?} of CPU in {waited:?}: it spun")
    })?;
    // Nobody owns 0x7000_0000: the resolver rejects it and the fill fails.
    s.set_policy(ResolvePolicy::RejectAll);
    let st = s.wait_signal(0, 1, WAIT).step("signal")?;
    ensure(st.status == DispatchStatus::FaultRejected, || {
        format!("fill ended {:?}", st.status)
    })?;
    Ok(format!(
        "poll() slept {} ms ({} us CPU), woke {} ms after the faulting dispatch",
        waited.as_millis(),
        cpu.as_micros(),
        latency.as_millis()
    ))
}

/// Native profile: two rings, independent fences. A held EVENT_ARM fence
/// on ring 1 does not hold back ring 0: its submissions' fences signal one
/// after another, and the event fence signals only when a NOTIFY dispatch
/// ends.
fn rings() -> Outcome {
    let mut s = open()?;
    require_native(&s)?;
    let buf = s.alloc(64 * 1024).step("alloc")?;
    s.map_buffer(&buf, buf.map.addr(), Perms::RW).step("bind")?;
    let q = s.create_queue().step("queue")?;
    let event = s.arm_event().step("EVENT_ARM")?;
    let fd = |f: &std::os::fd::OwnedFd| std::os::fd::AsRawFd::as_raw_fd(f);
    let mut ring0 = 0;
    for _ in 0..32 {
        let f = s
            .submit_fenced(&[guest_proto::Request::DeviceQuery])
            .step("ring 0 submit")?;
        let done = guest_runtime::drm::poll_readable(fd(&f), 10_000).step("poll ring 0 fence")?;
        ensure(done, || "a ring 0 fence did not signal".into())?;
        ring0 += 1;
    }
    let held = !guest_runtime::drm::poll_readable(fd(&event), 0).step("poll event fence")?;
    ensure(held, || {
        "the event fence signalled with no event pending".into()
    })?;
    // A NOTIFY dispatch (the runtime sets NOTIFY in the native profile)
    // makes an event pending when it ends.
    let st = s
        .run(
            q,
            Kernel::Fill {
                dst: GpuVa(buf.map.addr()),
                count: 16 * 1024,
                value: 0xBEEF,
            },
            WAIT,
        )
        .step("fill")?;
    dispatch_ok(&st).step("fill")?;
    let signalled =
        guest_runtime::drm::poll_readable(fd(&event), 10_000).step("poll event fence")?;
    ensure(signalled, || {
        "the event fence did not signal after the NOTIFY dispatch".into()
    })?;
    Ok(format!(
        "{ring0} ring 0 fences signalled while the ring 1 fence was held; it signalled after the NOTIFY dispatch"
    ))
}

/// Native profile: shared buffers are guest-memory blobs
/// (RESOURCE_CREATE_BLOB, BLOB_MEM_GUEST): what the CPU writes in one the
/// GPU copies into another, and the CPU reads it back.
fn blob_memory() -> Outcome {
    let mut s = open()?;
    require_native(&s)?;
    const N: usize = 256 * 1024;
    let mut a = s.alloc((N * 4) as u64).step("blob a")?;
    let b = s.alloc((N * 4) as u64).step("blob b")?;
    write_u32s(&mut a, |i| (i as u32).wrapping_mul(0x9E37_79B9));
    s.map_buffer(&a, a.map.addr(), Perms::READ).step("bind a")?;
    s.map_buffer(&b, b.map.addr(), Perms::RW).step("bind b")?;
    let q = s.create_queue().step("queue")?;
    let k = Kernel::Copy {
        dst: GpuVa(b.map.addr()),
        src: GpuVa(a.map.addr()),
        size: (N * 4) as u64,
    };
    dispatch_ok(&s.run(q, k, WAIT).step("copy")?).step("copy")?;
    let got = read_u32s(&b, N);
    let bad = got
        .iter()
        .enumerate()
        .find(|(i, v)| **v != (*i as u32).wrapping_mul(0x9E37_79B9));
    ensure(bad.is_none(), || format!("copy wrong at {bad:?}"))?;
    Ok(format!(
        "{} KiB copied blob to blob, data verified",
        N * 4 / 1024
    ))
}
