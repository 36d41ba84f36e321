//! What only the guest kernel's fault resolver gets right: each scenario
//! runs with the kernel path (`kernel-*`: must be correct) and with the
//! user-space resolver alone (`user-*`: must show the corruption or the
//! stale view that resolver cannot avoid, and fails if it looks correct,
//! so that the comparison itself can fail). Both variants print the same
//! figures, so a boot that runs both compares them in one run.

use std::time::Instant;

use guest_proto::attr::RangeAttrs;
use guest_proto::{DispatchStatus, GpuVa, Kernel};
use guest_runtime::mmap::Mmap;
use guest_runtime::session::{OwnedRange, Resolver, ResolverChoice, Session};

use super::{Outcome, Step, WAIT, ensure, open_with, wait_child};

const MIB: usize = 1 << 20;

/// Anonymous memory mapped by hand (shared or private), for the scenarios
/// that unmap and remap it under the GPU.
struct Area {
    addr: u64,
    len: usize,
}

impl Area {
    fn map(len: usize, shared: bool) -> Result<Area, String> {
        let kind = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        // SAFETY: a new anonymous mapping placed by the kernel; nothing
        // else is affected, and failure is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                kind | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        ensure(p != libc::MAP_FAILED, || "mmap".into())?;
        Ok(Area {
            addr: p as u64,
            len,
        })
    }

    /// munmap, then a new private mapping at the same address.
    fn remap_private(&self) -> Result<(), String> {
        let p = self.addr as *mut libc::c_void;
        // SAFETY: unmapping this area, which nothing else references, and
        // mapping fresh anonymous memory at exactly its address (MAP_FIXED
        // over a range we own and just unmapped).
        unsafe {
            ensure(libc::munmap(p, self.len) == 0, || "munmap".into())?;
            let n = libc::mmap(
                p,
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            );
            ensure(n == p, || "mmap at the same address".into())
        }
    }

    fn words(&self) -> usize {
        self.len / 4
    }

    fn get(&self, i: usize) -> u32 {
        assert!(i < self.words());
        // SAFETY: inside the live mapping, 4-aligned (page-aligned base).
        unsafe { std::ptr::read_volatile((self.addr as *const u32).add(i)) }
    }

    fn set(&self, i: usize, v: u32) {
        assert!(i < self.words());
        // SAFETY: inside the live, writable mapping, 4-aligned.
        unsafe { std::ptr::write_volatile((self.addr as *mut u32).add(i), v) }
    }

    fn fill(&self, v: u32) {
        for i in 0..self.words() {
            self.set(i, v);
        }
    }

    /// Words equal to `v`.
    fn count(&self, v: u32) -> usize {
        (0..self.words()).filter(|i| self.get(*i) == v).count()
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: unmapping the area this value owns.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn choice(r: Resolver) -> ResolverChoice {
    match r {
        Resolver::Kernel => ResolverChoice::Kernel,
        Resolver::User => ResolverChoice::User,
    }
}

/// A session with `resolver` owning `[addr, addr + len)` (identity) with
/// 2 MiB fault granules, and a queue.
fn setup(
    resolver: Resolver,
    addr: u64,
    len: usize,
) -> Result<(Session, guest_proto::QueueId), String> {
    let mut s = open_with(choice(resolver))?;
    ensure(s.resolver() == resolver, || {
        format!(
            "asked for the {resolver:?} resolver, got {:?}",
            s.resolver()
        )
    })?;
    s.own(OwnedRange {
        gpu: addr,
        cpu: addr,
        len: len as u64,
    })
    .step("own")?;
    s.set_attrs(
        addr,
        len as u64,
        RangeAttrs {
            granule_shift: Some(21),
            ..RangeAttrs::default()
        },
    )
    .step("RANGE_ATTR granularity")?;
    let q = s.create_queue().step("QUEUE_CREATE")?;
    Ok((s, q))
}

fn fill(addr: u64, words: usize, value: u32) -> Kernel {
    Kernel::Fill {
        dst: GpuVa(addr),
        count: words as u64,
        value,
    }
}

/// `faults`, faults per second over `elapsed`, and the mean round trip.
fn figures(faults: u64, elapsed: std::time::Duration, round_trip_ns: u64) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let per = round_trip_ns as f64 / faults.max(1) as f64 / 1e6;
    format!(
        "{faults} faults, {:.1} faults/s, fault round trip {per:.2} ms",
        faults as f64 / secs
    )
}

fn fork_child(f: impl FnOnce() -> i32) -> Result<i32, String> {
    // SAFETY: the scenarios fork from a single-threaded program; the child
    // runs `f` and leaves with _exit, without the parent's destructors.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = f();
        // SAFETY: see above.
        unsafe { libc::_exit(code) };
    }
    ensure(pid > 0, || "fork".into())?;
    Ok(pid)
}

fn pipe() -> Result<[i32; 2], String> {
    let mut p = [0i32; 2];
    // SAFETY: `p` is a valid array of two fds.
    ensure(unsafe { libc::pipe(p.as_mut_ptr()) } == 0, || "pipe".into())?;
    Ok(p)
}

fn send(fd: i32) {
    // SAFETY: writing one byte from a valid buffer.
    unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
}

fn receive(fd: i32) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into a valid buffer.
    unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) == 1 }
}

// --- unified memory, 64 MiB --------------------------------------------------

/// 64 MiB of plain anonymous memory filled by the GPU, every fault
/// resolved by the kernel: this process runs no resolver (the session's
/// own fault ring never gets a record).
pub fn kernel_unified() -> Outcome {
    let len = 64 * MIB;
    let host = Mmap::anonymous(len).step("mmap")?;
    let (mut s, q) = setup(Resolver::Kernel, host.addr(), len)?;
    let t0 = Instant::now();
    let st = s
        .run(q, fill(host.addr(), len / 4, 0x5EED_0001), WAIT)
        .step("fill")?;
    let elapsed = t0.elapsed();
    ensure(st.status == DispatchStatus::Ok, || {
        format!("fill ended {:?}", st.status)
    })?;
    let bad = (0..len / 4)
        .step_by(1021)
        .chain([len / 4 - 1])
        .find(|i| host.get_u32(*i) != Some(0x5EED_0001));
    ensure(bad.is_none(), || format!("fill data wrong at word {bad:?}"))?;
    let q = s.query().step("DEVICE_QUERY")?;
    let k = s.kernel_stats().ok_or("no kernel counters")?;
    ensure(s.faults_seen() == 0, || {
        format!("{} records reached the process's own ring", s.faults_seen())
    })?;
    ensure(k.faults_resolved >= 32 && q.faults_resolved >= 32, || {
        format!(
            "kernel resolved {}, device counted {}",
            k.faults_resolved, q.faults_resolved
        )
    })?;
    ensure(q.bound_bytes == len as u64, || {
        format!("bound {}", q.bound_bytes)
    })?;
    Ok(format!(
        "64 MiB in {} ms by the kernel resolver, no user-space resolver (0 records in the session's ring): {}",
        elapsed.as_millis(),
        figures(k.faults, elapsed, k.fault_ns)
    ))
}

/// The same 64 MiB with the user-space resolver: without a resolver thread
/// nothing resolves the faults (the fill times out), with one it works;
/// its figures are the baseline of `kernel-unified`.
pub fn user_unified() -> Outcome {
    let len = 64 * MIB;
    let host = Mmap::anonymous(len).step("mmap")?;
    {
        // No resolver running: nobody answers. (A session of its own, so
        // that its unanswered records do not reach the measured run.)
        let (mut alone, q) = setup(Resolver::User, host.addr(), len)?;
        alone
            .dispatch(q, fill(host.addr(), len / 4, 0x5EED_0002), 1, 0xA1)
            .step("dispatch")?;
        let st = alone
            .client()
            .wait_signal(1, 0xA1, WAIT, |_| Ok(false))
            .step("fill without a resolver")?;
        ensure(st.status == DispatchStatus::FaultTimedOut, || {
            format!(
                "without a resolver the fill ended {:?}: something else resolved its faults",
                st.status
            )
        })?;
        alone.destroy().step("SESSION_DESTROY")?;
    }
    let (mut s, q) = setup(Resolver::User, host.addr(), len)?;
    let t0 = Instant::now();
    let st = s
        .run(q, fill(host.addr(), len / 4, 0x5EED_0003), WAIT)
        .step("fill")?;
    let elapsed = t0.elapsed();
    ensure(st.status == DispatchStatus::Ok, || {
        format!("fill ended {:?}", st.status)
    })?;
    let bad = (0..len / 4)
        .step_by(1021)
        .chain([len / 4 - 1])
        .find(|i| host.get_u32(*i) != Some(0x5EED_0003));
    ensure(bad.is_none(), || format!("fill data wrong at word {bad:?}"))?;
    let u = s.user_stats();
    Ok(format!(
        "without a resolver thread the fill ended FAULT_TIMED_OUT (needs one); with the user-space resolver 64 MiB in {} ms: {}",
        elapsed.as_millis(),
        figures(u.faults, elapsed, u.ns)
    ))
}

// --- munmap + mmap at the same address ------------------------------------------

/// The GPU fills a shared range; a child keeps its pages alive and checks
/// them; the parent munmaps and maps new pages at the same address; the
/// GPU fills again. Returns (the child's verdict, words of the new mapping
/// the second fill wrote, the session).
fn remap(resolver: Resolver) -> Result<(i32, usize, usize, u64, Session), String> {
    let size = 2 * MIB;
    let area = Area::map(size, true)?;
    let (mut s, q) = setup(resolver, area.addr, size)?;
    let st = s
        .run(q, fill(area.addr, area.words(), 0x1111_1111), WAIT)
        .step("first fill")?;
    ensure(st.status == DispatchStatus::Ok, || {
        format!("first fill {:?}", st.status)
    })?;
    ensure(area.count(0x1111_1111) == area.words(), || {
        "first fill data".into()
    })?;
    let go = pipe()?;
    let (addr, words) = (area.addr, area.words());
    let child = fork_child(|| {
        // The old pages, shared with the parent until it unmaps them: the
        // canary must survive.
        if !receive(go[0]) {
            return 2;
        }
        let old = Area { addr, len: size };
        let intact = old.count(0x1111_1111);
        let overwritten = old.count(0x2222_2222);
        std::mem::forget(old);
        println!(
            "child: old pages: {intact} canary words intact, {overwritten} overwritten by the GPU"
        );
        if intact == words {
            0
        } else if overwritten > 0 {
            3
        } else {
            4
        }
    })?;
    area.remap_private()?;
    area.fill(0x5a5a_5a5a);
    let raised = s.query().step("DEVICE_QUERY")?.faults_raised;
    let st = s
        .run(q, fill(area.addr, area.words(), 0x2222_2222), WAIT)
        .step("second fill")?;
    send(go[1]);
    let verdict = wait_child(child)?;
    ensure(st.status == DispatchStatus::Ok, || {
        format!("second fill {:?}", st.status)
    })?;
    let written = area.count(0x2222_2222);
    let faulted = s.query().step("DEVICE_QUERY")?.faults_raised - raised;
    Ok((verdict, written, area.words(), faulted, s))
}

/// munmap + mmap: the GPU writes the new pages, never the old ones.
pub fn kernel_remap() -> Outcome {
    let (verdict, written, words, faulted, s) = remap(Resolver::Kernel)?;
    ensure(verdict == 0, || {
        format!("the GPU wrote the old pages (child verdict {verdict})")
    })?;
    ensure(written == words, || {
        format!("{written} of {words} new words written")
    })?;
    ensure(faulted > 0, || "the second fill did not fault".into())?;
    let k = s.kernel_stats().ok_or("no kernel counters")?;
    Ok(format!(
        "the second fill faulted ({faulted} faults) and wrote the new pages, the old pages' canary intact (checked by another process); invalidation to unbound {:.2} ms ({} unbinds)",
        k.unbind_ns as f64 / k.unbinds.max(1) as f64 / 1e6,
        k.unbinds
    ))
}

/// munmap + mmap with the user-space resolver: nothing unbinds the old
/// pages, so the GPU writes them (another process's memory now).
pub fn user_remap() -> Outcome {
    let (verdict, written, words, faulted, _s) = remap(Resolver::User)?;
    ensure(verdict != 0 || written != words, || {
        "the user-space resolver got munmap + mmap right: the comparison shows nothing".into()
    })?;
    ensure(verdict == 3, || format!("child verdict {verdict}"))?;
    Ok(format!(
        "old page written (corruption shown): the second fill raised {faulted} faults and overwrote the other process's canary, {written} of {words} words of the new mapping written"
    ))
}

// --- MADV_DONTNEED ----------------------------------------------------------------

/// GPU fills, the process drops the pages, the GPU copies them out.
/// Returns (words of the copy that are zero, words that hold the old fill,
/// words in all, the session).
fn dontneed(resolver: Resolver) -> Result<(usize, usize, usize, Session), String> {
    let size = 2 * MIB;
    let area = Area::map(2 * size, false)?;
    let (mut s, q) = setup(resolver, area.addr, 2 * size)?;
    let words = size / 4;
    let st = s
        .run(q, fill(area.addr, words, 0x3333_3333), WAIT)
        .step("fill")?;
    ensure(st.status == DispatchStatus::Ok, || {
        format!("fill {:?}", st.status)
    })?;
    let p = area.addr as *mut libc::c_void;
    if resolver == Resolver::User {
        // What freeing pinned memory has to do first: MADV_DONTNEED
        // refuses locked pages.
        guest_runtime::memory::unpin(area.addr, size as u64);
    }
    // SAFETY: dropping the pages of the first half of our own mapping.
    let rc = unsafe { libc::madvise(p, size, libc::MADV_DONTNEED) };
    ensure(rc == 0, || "madvise(MADV_DONTNEED)".into())?;
    ensure((0..words).all(|i| area.get(i) == 0), || {
        "the CPU does not see zeroes".into()
    })?;
    let dst = area.addr + size as u64;
    for i in words..2 * words {
        area.set(i, 0xeeee_eeee);
    }
    let k = Kernel::Copy {
        dst: GpuVa(dst),
        src: GpuVa(area.addr),
        size: size as u64,
    };
    let st = s.run(q, k, WAIT).step("copy")?;
    ensure(st.status == DispatchStatus::Ok, || {
        format!("copy {:?}", st.status)
    })?;
    let zero = (words..2 * words).filter(|i| area.get(*i) == 0).count();
    let old = (words..2 * words)
        .filter(|i| area.get(*i) == 0x3333_3333)
        .count();
    Ok((zero, old, words, s))
}

/// MADV_DONTNEED, then a GPU read sees zeroes.
pub fn kernel_dontneed() -> Outcome {
    let (zero, _, words, s) = dontneed(Resolver::Kernel)?;
    ensure(zero == words, || {
        format!("the GPU read {} non-zero words", words - zero)
    })?;
    let k = s.kernel_stats().ok_or("no kernel counters")?;
    Ok(format!(
        "GPU read zeroes after MADV_DONTNEED; invalidation to unbound {:.2} ms ({} unbinds)",
        k.unbind_ns as f64 / k.unbinds.max(1) as f64 / 1e6,
        k.unbinds
    ))
}

/// MADV_DONTNEED with the user-space resolver: the GPU still reads the
/// frames the kernel took back.
pub fn user_dontneed() -> Outcome {
    let (zero, old, words, _s) = dontneed(Resolver::User)?;
    ensure(zero < words, || {
        "the user-space resolver's GPU read zeroes: the comparison shows nothing".into()
    })?;
    Ok(format!(
        "stale view shown: the GPU read {} of {words} non-zero words from the freed frames ({old} still the old fill, the rest already reused) while the CPU sees zeroes",
        words - zero
    ))
}

// --- fork and copy-on-write ------------------------------------------------------

/// GPU fills, fork, the parent writes (COW: new pages for it), GPU fills
/// again. Returns (the child's verdict, words of the parent's pages the
/// second fill wrote, words, the session).
fn fork(resolver: Resolver) -> Result<(i32, usize, usize, Session), String> {
    let size = 2 * MIB;
    let area = Area::map(size, false)?;
    let (mut s, q) = setup(resolver, area.addr, size)?;
    let st = s
        .run(q, fill(area.addr, area.words(), 0x4444_4444), WAIT)
        .step("fill")?;
    ensure(st.status == DispatchStatus::Ok, || {
        format!("fill {:?}", st.status)
    })?;
    let go = pipe()?;
    let (addr, words) = (area.addr, area.words());
    let child = fork_child(|| {
        if !receive(go[0]) {
            return 2;
        }
        let mine = Area { addr, len: size };
        let (intact, gpu) = (mine.count(0x4444_4444), mine.count(0x5555_5555));
        std::mem::forget(mine);
        println!("child: {intact} words intact, {gpu} written by the parent's GPU work");
        if intact == words {
            0
        } else if gpu > 0 {
            3
        } else {
            4
        }
    })?;
    area.fill(0x6666_6666); // copy-on-write: the parent gets new pages
    let st = s
        .run(q, fill(area.addr, area.words(), 0x5555_5555), WAIT)
        .step("fill after fork")?;
    send(go[1]);
    let verdict = wait_child(child)?;
    ensure(st.status == DispatchStatus::Ok, || {
        format!("fill after fork {:?}", st.status)
    })?;
    Ok((verdict, area.count(0x5555_5555), area.words(), s))
}

/// fork + COW: the GPU follows the parent's pages.
pub fn kernel_fork() -> Outcome {
    let (verdict, written, words, s) = fork(Resolver::Kernel)?;
    ensure(verdict == 0, || {
        format!("the GPU wrote the child's pages (verdict {verdict})")
    })?;
    ensure(written == words, || {
        format!("{written} of {words} of the parent's words written")
    })?;
    let k = s.kernel_stats().ok_or("no kernel counters")?;
    Ok(format!(
        "the GPU followed the parent's pages after fork + COW, the child's stayed; {} invalidations, {} unbinds",
        k.invalidations, k.unbinds
    ))
}

/// fork + COW with the user-space resolver: the GPU keeps writing the
/// pages that now belong to the child.
pub fn user_fork() -> Outcome {
    let (verdict, written, words, _s) = fork(Resolver::User)?;
    ensure(verdict != 0 || written != words, || {
        "the user-space resolver followed COW: the comparison shows nothing".into()
    })?;
    ensure(verdict == 3, || format!("child verdict {verdict}"))?;
    Ok(format!(
        "corruption shown: the GPU wrote the child's pages, the parent's view is stale ({written} of {words} of its words written)"
    ))
}

// --- a process exiting mid-dispatch ----------------------------------------------

/// A child (sharing the parent's file and session) owns 64 MiB, starts a
/// fill, lets a few faults resolve and exits. Returns (how the fill
/// ended, bound bytes before, bound bytes after).
fn exit(resolver: Resolver) -> Result<(DispatchStatus, u64, u64), String> {
    let mut s = open_with(ResolverChoice::User)?;
    let before = s.query().step("DEVICE_QUERY")?.bound_bytes;
    let ready = pipe()?;
    let value = 0xE417;
    let child = fork_child(|| {
        let mut run = || -> Result<(), String> {
            let len = 64 * MIB;
            let p = Mmap::anonymous(len).step("mmap")?;
            if resolver == Resolver::Kernel {
                // This process's mm is the one the kernel mirrors.
                ensure(s.use_kernel_resolver().step("ENABLE")?, || {
                    "no kernel resolver".into()
                })?;
            }
            s.own(OwnedRange {
                gpu: p.addr(),
                cpu: p.addr(),
                len: len as u64,
            })
            .step("own")?;
            s.set_attrs(
                p.addr(),
                len as u64,
                RangeAttrs {
                    granule_shift: Some(21),
                    ..RangeAttrs::default()
                },
            )
            .step("granularity")?;
            let q = s.create_queue().step("queue")?;
            s.dispatch(q, fill(p.addr(), len / 4, 0x7777_7777), 2, value)
                .step("dispatch")?;
            let t0 = Instant::now();
            loop {
                let resolved = match resolver {
                    Resolver::Kernel => s.kernel_stats().map_or(0, |k| k.binds),
                    Resolver::User => {
                        s.pump_faults().step("resolve")?;
                        s.user_stats().faults
                    }
                };
                if resolved >= 2 {
                    break;
                }
                ensure(t0.elapsed() < WAIT, || "no fault resolved".into())?;
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            std::mem::forget(p);
            Ok(())
        };
        match run() {
            Ok(()) => {
                send(ready[1]);
                0
            }
            Err(e) => {
                println!("child: {e}");
                1
            }
        }
    })?;
    ensure(receive(ready[0]), || "the child did not get going".into())?;
    ensure(wait_child(child)? == 0, || "child failed".into())?;
    // The child's requests used this client's seqnos and reply slots too.
    let layout = *s.client().layout();
    let zeros = vec![0u8; usize::try_from(layout.reply_size).unwrap_or(0)];
    guest_runtime::client::Channel::write(s.client().channel(), layout.reply_off, &zeros)
        .step("clear the reply buffer")?;
    // Nobody in this process resolves: the fill ends however the device
    // and the kernel end it.
    let st = s
        .client()
        .wait_signal(2, value, WAIT, |_| Ok(false))
        .step("the exited process's fill")?;
    let after = s.query().step("DEVICE_QUERY")?.bound_bytes;
    Ok((st.status, before, after))
}

/// A process exiting mid-dispatch leaves nothing bound.
pub fn kernel_exit() -> Outcome {
    let (status, before, after) = exit(Resolver::Kernel)?;
    ensure(after == before, || {
        format!("bound bytes {before} before, {after} after the exit")
    })?;
    ensure(status != DispatchStatus::Ok, || {
        "the exited process's fill succeeded".into()
    })?;
    Ok(format!(
        "after the exit: bound bytes back to {after}, the fill ended {status:?}"
    ))
}

/// Exit mid-dispatch with the user-space resolver: its pages stay bound in
/// the GPU VM after the kernel freed them.
pub fn user_exit() -> Outcome {
    let (status, before, after) = exit(Resolver::User)?;
    ensure(after > before, || {
        "the user-space resolver's pages were unbound at exit: the comparison shows nothing".into()
    })?;
    Ok(format!(
        "corruption possible: {} bytes of the exited process's freed pages still bound in the GPU VM; the fill ended {status:?}",
        after - before
    ))
}
