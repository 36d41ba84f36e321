//! The sandbox: a seccomp-bpf allowlist, on by default.
//!
//! Installed once, in every thread at once (`SECCOMP_FILTER_FLAG_TSYNC`),
//! after start-up (device model and its compute-unit threads, signal
//! thread, logger, listening socket) and before the first frontend byte is
//! read. Every thread started later (the vhost-user request thread and the
//! vring workers of each connection) inherits it. A system call outside the
//! list kills the whole process with SIGSYS (`SECCOMP_RET_KILL_PROCESS`),
//! so a compromised daemon cannot execute programs or create sockets;
//! opening a file fails with `EACCES` (see [`filters`] for why it does not
//! kill). `PR_SET_NO_NEW_PRIVS` is set first (seccompiler does it as part
//! of installing), so no set-uid program could ever regain privileges.
//!
//! The list was derived by running the daemon under `strace -f` through the
//! socket harness tests and the QEMU suite (both profiles of work, QEMU
//! restarts, scanout over the GPU socket, every log target) and keeping what
//! the serving phase calls; `tests/sandbox-syscalls.sh` repeats that
//! derivation and names anything missing. The whole test suite runs with
//! the sandbox on: a missing entry is a SIGSYS there.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Whether the sandbox is installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SandboxMode {
    /// The seccomp allowlist plus no-new-privs (the default).
    #[default]
    Seccomp,
    /// Nothing: for debugging (strace, gdb, profilers) only.
    None,
}

/// Why the sandbox could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The filter did not compile (a bug in the list).
    #[error("building the seccomp filter: {0}")]
    Build(#[source] seccompiler::BackendError),
    /// This architecture has no list.
    #[error("no seccomp allowlist for this architecture: {0}")]
    Arch(#[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("installing the seccomp filter: {0}")]
    Install(#[source] seccompiler::Error),
}

/// System calls allowed without argument checks.
const ALLOWED: &[i64] = &[
    // Memory: guest RAM regions (mmap of the frontend's memfds), the
    // allocator (brk, mremap for large reallocations), thread stacks.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // File descriptors handed over by the frontend (memory regions, kick
    // and call eventfds, the GPU socket) and the daemon's own; fstat and
    // lseek to check a memory region's size.
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_read,
    libc::SYS_write,
    // vhost-user: accept, messages with fds (the frontend socket, the GPU
    // socket, the relay of a connected --fd); sends of the log targets.
    libc::SYS_accept4,
    // The metrics endpoint (`--metrics`): reads of its TCP connections.
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    // Event loops: vring workers, kicks, calls, timers, held fences.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    // Threads: a request thread and vring workers per connection (glibc
    // 2.36 creates them with clone3 only), locks (futex; parking_lot
    // yields), HashMap keys of new threads (getrandom).
    libc::SYS_clone3,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Signals: the signal thread's sigwait, masks and alternate stacks of
    // new threads; abort() (a panic that aborts must end as SIGABRT, not
    // as a sandbox violation).
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    // Time and sleeping (the vDSO answers most clock reads).
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // The socket file is removed on SIGINT/SIGTERM.
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// `fcntl` commands allowed: fd and status flags, the dup of a connection
/// (vhost-user-backend keeps a second handle), the seals of a journal
/// memfd.
const FCNTL_CMDS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
    libc::F_ADD_SEALS as u64,
];

/// `prctl` options allowed (thread names; the simulated GPU's command
/// processor sets its own timer slack).
const PRCTL_OPTIONS: &[u64] = &[
    libc::PR_SET_NAME as u64,
    libc::PR_GET_NAME as u64,
    libc::PR_SET_TIMERSLACK as u64,
];

/// `setsockopt` options allowed, all at `SOL_SOCKET`: the read and write
/// timeouts of the metrics endpoint's connections.
const SOCKOPTS: &[u64] = &[libc::SO_RCVTIMEO as u64, libc::SO_SNDTIMEO as u64];

/// Rules matching `setsockopt(_, SOL_SOCKET, one of SOCKOPTS, ...)`.
fn setsockopt_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    SOCKOPTS
        .iter()
        .map(|&opt| {
            SeccompRule::new(vec![
                SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::SOL_SOCKET as u64,
                )?,
                SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, opt)?,
            ])
        })
        .collect()
}

/// Rules matching when argument `index` (a 32-bit value) is one of `values`.
fn arg_index_in(index: u8, values: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    values
        .iter()
        .map(|&v| {
            SeccompRule::new(vec![SeccompCondition::new(
                index,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                v,
            )?])
        })
        .collect()
}

/// System calls that open files: on the allowlist, failed with `EACCES` by
/// the other filter (see [`filters`]).
#[cfg(target_arch = "x86_64")]
const OPEN_CALLS: &[i64] = &[libc::SYS_open, libc::SYS_openat, libc::SYS_openat2];
#[cfg(not(target_arch = "x86_64"))]
const OPEN_CALLS: &[i64] = &[libc::SYS_openat, libc::SYS_openat2];

/// The daemon's filters, compiled to BPF for this architecture, in the
/// order they are installed:
///
/// 1. file opening fails with `EACCES`. The daemon opens no file once it
///    serves, but the C library and the Rust runtime probe optional files
///    on rare paths (`/proc/self/maps` from a fault handler, cgroup limits
///    for CPU counts, `/sys/devices/system/cpu/online`); those fall back on
///    an error, and a serving daemon must not die of SIGSYS for it. Still,
///    no file can be opened;
/// 2. the allowlist: any system call not on it kills the process with
///    SIGSYS (`SECCOMP_RET_KILL_PROCESS`).
///
/// With several filters the kernel takes the most restrictive verdict, so
/// the first only ever turns the allowlist's "allow" for opens into an error.
pub fn filters() -> Result<Vec<BpfProgram>, SandboxError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(SandboxError::Arch)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .chain(OPEN_CALLS)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    // Journal records too large for one datagram travel as a memfd; every
    // socket, on the other hand, exists before the sandbox (no `socket`).
    rules.insert(libc::SYS_memfd_create, Vec::new());
    rules.insert(
        libc::SYS_fcntl,
        arg_index_in(1, FCNTL_CMDS).map_err(SandboxError::Build)?,
    );
    rules.insert(
        libc::SYS_setsockopt,
        setsockopt_rules().map_err(SandboxError::Build)?,
    );
    rules.insert(
        libc::SYS_prctl,
        arg_index_in(0, PRCTL_OPTIONS).map_err(SandboxError::Build)?,
    );
    // The GPU socket thread makes itself SCHED_BATCH (`virtio_gpu::display`):
    // its own thread (pid 0) and that policy only, so no thread can ask for
    // a real-time one.
    rules.insert(
        libc::SYS_sched_setscheduler,
        vec![
            SeccompRule::new(vec![
                SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0)
                    .map_err(SandboxError::Build)?,
                SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::SCHED_BATCH as u64,
                )
                .map_err(SandboxError::Build)?,
            ])
            .map_err(SandboxError::Build)?,
        ],
    );
    let allowlist = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(SandboxError::Build)?;
    let no_open = SeccompFilter::new(
        OPEN_CALLS.iter().map(|&nr| (nr, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .map_err(SandboxError::Build)?;
    // The allowlist goes last: once it is on, installing another filter
    // (prctl, seccomp) is itself forbidden.
    Ok(vec![
        no_open.try_into().map_err(SandboxError::Build)?,
        allowlist.try_into().map_err(SandboxError::Build)?,
    ])
}

/// Installs the sandbox in every thread of the process (`mode` permitting).
pub fn install(mode: SandboxMode) -> Result<(), SandboxError> {
    match mode {
        SandboxMode::None => {
            log::warn!("sandbox disabled (--sandbox=none): no seccomp filter");
            Ok(())
        }
        SandboxMode::Seccomp => {
            for program in filters()? {
                seccompiler::apply_filter_all_threads(&program).map_err(SandboxError::Install)?;
            }
            log::info!(
                "sandbox on: seccomp allowlist of {} system calls (file opens fail with EACCES) \
                 in every thread, no-new-privs",
                ALLOWED.len() + 4
            );
            Ok(())
        }
    }
}
