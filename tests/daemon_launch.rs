//! How management layers launch the daemon: an inherited listening socket
//! (`--fd`, systemd socket activation), a connected socketpair end (what
//! libvirt passes), `--print-capabilities`, and the sandbox every launch
//! runs in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use vhost_gpu_nc::virtio_gpu::protocol::{
    VIRTIO_GPU_CMD_GET_DISPLAY_INFO, VIRTIO_GPU_RESP_OK_DISPLAY_INFO, VIRTIO_GPU_RESP_OK_NODATA,
};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-gpu-nc");

/// A daemon started with fd 3 set up by the test.
struct Launched {
    child: std::process::Child,
}

impl Launched {
    fn spawn(mut cmd: Command, fd: OwnedFd) -> Launched {
        pass_as_fd3(&mut cmd, fd);
        cmd.args(["--compute-units", "2", "--log-level", "warn"]);
        Launched {
            child: cmd.spawn().unwrap(),
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET_DISPLAY_INFO answers: the device is being served.
fn device_answers(vmm: &mut Vmm) {
    let resp = vmm.ctrl(&req(VIRTIO_GPU_CMD_GET_DISPLAY_INFO, 0, &[]), 408);
    assert_eq!(
        u32::from_le_bytes(resp[0..4].try_into().unwrap()),
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    );
}

#[test]
fn print_capabilities_is_the_interop_json_for_a_gpu() {
    let out = Command::new(BIN)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    assert_eq!(compact, r#"{"type":"gpu","features":[]}"#);
}

#[test]
fn an_inherited_listening_socket_is_served_like_a_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut cmd = daemon_command();
    cmd.arg("--fd=3");
    let mut d = Launched::spawn(cmd, listener.into());
    // Two frontends one after the other: a listening fd is served for
    // the life of the daemon.
    for _ in 0..2 {
        let mut vmm = Vmm::connect(&path, F_VIRGL);
        device_answers(&mut vmm);
        drop(vmm);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon exited");
    // The daemon did not create the socket, so it leaves the file alone.
    // SAFETY: kill with a valid pid and signal.
    unsafe { libc::kill(i32::try_from(d.child.id()).unwrap(), libc::SIGTERM) };
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("no exit on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(path.exists());
}

#[test]
fn a_connected_socket_is_served_once_and_the_daemon_exits_with_it() {
    // What libvirt does: socketpair(), --fd=N with one end for the daemon,
    // the other end for QEMU's -chardev socket,fd=M.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = daemon_command();
    cmd.arg("--fd=3");
    let mut d = Launched::spawn(cmd, theirs.into());
    let mut vmm = Vmm::from_stream(ours, F_VIRGL);
    device_answers(&mut vmm);
    // Real work over the bridged connection: a context and a submit.
    assert_eq!(vmm.ctx_create(1, 0), VIRTIO_GPU_RESP_OK_NODATA);
    assert!(d.child.try_wait().unwrap().is_none());
    drop(vmm);
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon did not exit when its one frontend left");
    assert!(status.success(), "{status:?}");
}

#[test]
fn systemd_socket_activation_takes_fd_3() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // LISTEN_PID must be the daemon's own pid: the shell sets it to its pid
    // and exec keeps it.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=gpu exec \"$0\" \"$@\"",
        BIN,
    ]);
    let _d = Launched::spawn(cmd, listener.into());
    let mut vmm = Vmm::connect(&path, F_VIRGL);
    device_answers(&mut vmm);
}

#[test]
fn activation_for_another_process_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("x.sock")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.env("LISTEN_PID", "1").env("LISTEN_FDS", "1");
    cmd.stderr(Stdio::piped());
    let mut d = Launched::spawn(cmd, listener.into());
    let status = d.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(2), "no socket given: a usage error");
}

#[test]
fn a_bad_fd_is_refused_with_a_clear_error() {
    let file = tempfile::tempfile().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("--fd=3").stderr(Stdio::piped());
    pass_as_fd3(&mut cmd, file.into());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--fd=3: not a socket (a regular file)"),
        "{err}"
    );

    let out = Command::new(BIN)
        .arg("--fd=77")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--fd=77: not an open file descriptor"),
        "{err}"
    );
}

#[test]
fn the_running_daemon_is_sandboxed_and_none_turns_it_off() {
    let mut d = Daemon::start(&[]);
    // Connecting proves the sandbox is on by now (it goes on before the
    // first accept) and that serving works inside it.
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    device_answers(&mut vmm);
    let pid = d.child.id();
    assert_eq!(
        proc_status(pid, "Seccomp").as_deref(),
        Some("2"),
        "filter mode"
    );
    assert_eq!(proc_status(pid, "NoNewPrivs").as_deref(), Some("1"));
    // Every thread, including those that existed before the filter.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status =
            std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "a thread without the filter:\n{status}"
        );
    }
    drop(vmm);
    assert!(d.alive());

    let d = Daemon::start(&["--sandbox=none"]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    device_answers(&mut vmm);
    assert_eq!(proc_status(d.child.id(), "Seccomp").as_deref(), Some("0"));
}

#[test]
fn logs_go_to_syslog_when_asked() {
    // /dev/log cannot be replaced in a test; a missing one must be a clear
    // start-up error, not a silent loss of logs.
    if std::path::Path::new("/dev/log").exists() {
        return;
    }
    let out = Command::new(BIN)
        .args([
            "--socket-path",
            "/nonexistent/x.sock",
            "--log-target",
            "syslog",
        ])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--log-target=syslog: /dev/log"), "{err}");
}

#[test]
fn stderr_logs_carry_timestamps() {
    let out = Command::new(BIN)
        .args([
            "--socket-path",
            "/nonexistent/dir/x.sock",
            "--log-target",
            "stderr",
        ])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // [2026-12-01T17:50:21.189123Z ERROR vhost_gpu_nc] cannot listen on ...
    let line = err
        .lines()
        .find(|l| l.contains("cannot listen"))
        .expect(&err);
    let stamp = line.trim_start_matches('[').split(' ').next().unwrap();
    assert!(
        stamp.len() >= 20
            && stamp.as_bytes()[4] == b'-'
            && stamp.contains('T')
            && stamp.ends_with('Z'),
        "{line}"
    );
}

#[test]
fn a_missing_journal_is_a_clear_start_up_error() {
    if std::path::Path::new("/run/systemd/journal/socket").exists() {
        return;
    }
    let out = Command::new(BIN)
        .args([
            "--socket-path",
            "/nonexistent/x.sock",
            "--log-target",
            "journal",
        ])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--log-target=journal: no journal"), "{err}");
}
