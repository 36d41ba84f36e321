//! The daemon's real seccomp filter kills a process that makes a system
//! call outside the allowlist, with SIGSYS, and lets allowed ones through.
//!
//! Each case forks; the child installs the filter (as the daemon does, but
//! in a single thread) and makes one system call. The parent reads how the
//! child ended.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use vhost_gpu_nc::sandbox;

/// How a forked child that installed the filter and ran `body` ended:
/// `Ok(exit code)` or `Err(signal)`.
fn in_sandboxed_child(body: fn() -> i32) -> Result<i32, i32> {
    let programs = sandbox::filters().unwrap();
    // SAFETY: the child only installs the filter (prctl + seccomp, no
    // allocation), runs `body` (raw system calls only) and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        for program in &programs {
            if seccompiler::apply_filter(program).is_err() {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(100) };
            }
        }
        let code = body();
        // SAFETY: as above.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    if libc::WIFSIGNALED(status) {
        Err(libc::WTERMSIG(status))
    } else {
        Ok(libc::WEXITSTATUS(status))
    }
}

#[test]
fn execve_is_killed_with_sigsys() {
    let r = in_sandboxed_child(|| {
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        // SAFETY: valid NUL-terminated argv/envp arrays.
        unsafe {
            libc::syscall(
                libc::SYS_execve,
                c"/bin/true".as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
            )
        };
        0
    });
    assert_eq!(r, Err(libc::SIGSYS));
}

#[test]
fn opening_a_file_fails_with_eacces_and_creates_nothing() {
    let path = std::env::temp_dir().join(format!("vhost-gpu-nc-sandbox-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    static PATH: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();
    PATH.set(std::ffi::CString::new(path.to_str().unwrap()).unwrap())
        .unwrap();
    let r = in_sandboxed_child(|| {
        let p = PATH.get().unwrap().as_ptr();
        // SAFETY: a NUL-terminated path; raw system calls only.
        unsafe {
            let rc = libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                p,
                libc::O_CREAT | libc::O_WRONLY,
                0o600,
            );
            if rc != -1 || *libc::__errno_location() != libc::EACCES {
                return 1;
            }
            let rc = libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/etc/hostname".as_ptr(),
                libc::O_RDONLY,
            );
            if rc != -1 || *libc::__errno_location() != libc::EACCES {
                return 2;
            }
        }
        0
    });
    assert_eq!(r, Ok(0), "openat was not refused with EACCES");
    assert!(!path.exists(), "the sandboxed child created a file");
}

#[test]
fn a_new_socket_is_killed_with_sigsys() {
    let r = in_sandboxed_child(|| {
        // SAFETY: plain integer arguments.
        unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
        0
    });
    assert_eq!(r, Err(libc::SIGSYS));
}

#[test]
fn ptrace_and_a_disallowed_prctl_are_killed_with_sigsys() {
    let r = in_sandboxed_child(|| {
        // SAFETY: plain integer arguments.
        unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
        0
    });
    assert_eq!(r, Err(libc::SIGSYS));
    // prctl is allowed for thread names only.
    let r = in_sandboxed_child(|| {
        // SAFETY: plain integer arguments.
        unsafe { libc::syscall(libc::SYS_prctl, libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
        0
    });
    assert_eq!(r, Err(libc::SIGSYS));
}

#[test]
fn allowed_calls_pass() {
    let r = in_sandboxed_child(|| {
        // SAFETY: raw system calls with valid pointers.
        unsafe {
            if libc::syscall(libc::SYS_eventfd2, 0, libc::EFD_CLOEXEC) < 0 {
                return 1;
            }
            if libc::syscall(libc::SYS_prctl, libc::PR_SET_NAME, c"t".as_ptr(), 0, 0, 0) != 0 {
                return 2;
            }
            if libc::syscall(libc::SYS_getpid) <= 0 {
                return 3;
            }
            // memfd + mmap, as guest RAM regions are mapped.
            let fd = libc::syscall(libc::SYS_memfd_create, c"ram".as_ptr(), 0) as i32;
            if fd < 0 {
                return 4;
            }
            let p = libc::syscall(
                libc::SYS_mmap,
                0,
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if p == -1 {
                return 5;
            }
        }
        0
    });
    assert_eq!(r, Ok(0));
}

#[test]
fn without_the_filter_the_same_child_runs() {
    // Control: the fork harness itself does not cause the SIGSYS.
    // SAFETY: as in in_sandboxed_child, minus the filter.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: a plain integer system call, then _exit.
        unsafe {
            let fd = libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
            libc::_exit(if fd >= 0 { 0 } else { 1 });
        }
    }
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
}

#[test]
fn a_crash_inside_the_sandbox_stays_a_crash() {
    // A segfault must end the process with SIGSEGV (and a core), not turn
    // into a sandbox violation inside the runtime's signal handler.
    let r = in_sandboxed_child(|| {
        // SAFETY: deliberately faulting; the child dies here.
        unsafe { std::ptr::write_volatile(std::ptr::null_mut::<u64>(), 1) };
        0
    });
    assert_eq!(r, Err(libc::SIGSEGV));
}

#[test]
fn the_metrics_endpoints_socket_timeouts_pass_and_other_socket_options_are_killed() {
    // The endpoint sets SO_RCVTIMEO/SO_SNDTIMEO on accepted connections
    // and reads TCP ones with recvfrom.
    // The pair exists before the filter, as the endpoint's sockets do.
    static FDS: [std::sync::atomic::AtomicI32; 2] = [
        std::sync::atomic::AtomicI32::new(-1),
        std::sync::atomic::AtomicI32::new(-1),
    ];
    let mut fds = [0i32; 2];
    // SAFETY: a valid out-array of two fds.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0);
    for (a, fd) in FDS.iter().zip(fds) {
        a.store(fd, std::sync::atomic::Ordering::Relaxed);
    }
    let r = in_sandboxed_child(|| {
        let fds = FDS
            .each_ref()
            .map(|a| a.load(std::sync::atomic::Ordering::Relaxed));
        // SAFETY: raw system calls with valid pointers and lengths.
        unsafe {
            let tv = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            let len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
            for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
                let p = (&tv as *const libc::timeval).cast::<libc::c_void>();
                if libc::syscall(libc::SYS_setsockopt, fds[0], libc::SOL_SOCKET, opt, p, len) != 0 {
                    return 2;
                }
            }
            if libc::syscall(libc::SYS_sendto, fds[1], c"x".as_ptr(), 1, 0, 0, 0) != 1 {
                return 3;
            }
            let mut b = [0u8; 1];
            if libc::syscall(libc::SYS_recvfrom, fds[0], b.as_mut_ptr(), 1, 0, 0, 0) != 1 {
                return 4;
            }
        }
        0
    });
    assert_eq!(r, Ok(0));
    let r = in_sandboxed_child(|| {
        let one: libc::c_int = 1;
        // SAFETY: a raw system call with a valid pointer and length (on
        // fd 0, whatever it is: the filter decides before the kernel).
        unsafe {
            libc::syscall(
                libc::SYS_setsockopt,
                0,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast::<libc::c_void>(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        0
    });
    assert_eq!(r, Err(libc::SIGSYS));
}
