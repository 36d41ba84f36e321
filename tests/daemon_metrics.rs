//! The metrics endpoint of the real daemon binary (sandboxed, as it runs
//! by default): a session driven through the vhost-user socket, then
//! scrapes over the unix socket and loopback TCP, checked value by value
//! and by Debian's `promtool check metrics`; hostile requests get errors
//! and disturb nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use guest_proto::bind::{BindOp, PageList, VmBind};
use guest_proto::capset::Capset;
use guest_proto::command::{DecodeLimits, Dispatch, Profile};
use guest_proto::fault::{FaultOutcome, FaultReply, FaultReplyEntry};
use guest_proto::{DispatchStatus, GpuVa, GuestPhysAddr, Kernel, Perms, Request, SignalIndex};
use guest_runtime::client::{self as runtime, SessionLayout};
use harness::session::{SessionRam, Shared, SubmitChannel};
use harness::{Daemon, F_VIRGL, Vmm, req};
use vhost_gpu_nc::virtio_gpu::protocol::{VIRTIO_GPU_CMD_CTX_DESTROY, VIRTIO_GPU_RESP_OK_NODATA};

const SESSION_BYTES: u32 = 16384;

type Client = runtime::Client<SubmitChannel>;

/// A compat session in context `ctx` with its session buffer resource `res`.
fn open(vmm: &Shared, ctx: u32, res: u32) -> Client {
    let base = {
        let mut vmm = vmm.borrow_mut();
        assert_eq!(vmm.ctx_create(ctx, 0), VIRTIO_GPU_RESP_OK_NODATA);
        let gpa = vmm.buffer_3d(res, SESSION_BYTES);
        assert_eq!(vmm.ctx_attach(ctx, res), VIRTIO_GPU_RESP_OK_NODATA);
        gpa
    };
    let channel = SubmitChannel {
        ram: SessionRam::contiguous(vmm.clone(), base, u64::from(SESSION_BYTES)),
        ctx,
    };
    let limits = DecodeLimits::from_capset(&Capset::default());
    let mut c = runtime::Client::new(channel, SessionLayout::COMPACT, limits, None);
    c.start(guest_proto::ResourceId(res), Profile::Compat)
        .expect("SESSION_INIT");
    c
}

/// Fills `pages` unbound pages at `va`; every fault is resolved by binding
/// a fresh page. Returns the number of faults.
fn fill_resolving(vmm: &Shared, c: &mut Client, va: u64, pages: u64) -> usize {
    let q = c.create_queue(1).unwrap();
    let d = Dispatch {
        queue: q,
        kernel: Kernel::Fill {
            dst: GpuVa(va),
            count: pages * 1024,
            value: 0xF111,
        },
        signal: Some(SignalIndex(0)),
        notify: false,
        completion_value: 9,
    };
    c.clear_signal(0).unwrap();
    assert_eq!(
        c.request(&Request::Dispatch(d)).unwrap().status,
        guest_proto::Status::Ok
    );
    let mut answered = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.signal(0).unwrap().value != 9 {
        for f in c.take_faults().unwrap() {
            let page = vmm.borrow_mut().alloc(4096);
            let pages = [GuestPhysAddr(page)];
            let op = [BindOp::MapPages {
                va: f.va,
                perms: Perms::RW,
                pages: PageList::new(&pages),
            }];
            let r = c.request(&Request::VmBind(VmBind::new(&op))).unwrap();
            assert_eq!(r.status, guest_proto::Status::Ok);
            let e = [FaultReplyEntry {
                fault_id: f.fault_id,
                outcome: FaultOutcome::Resolved,
            }];
            let r = c
                .request(&Request::FaultReply(FaultReply::new(&e)))
                .unwrap();
            assert_eq!(r.status, guest_proto::Status::Ok);
            answered += 1;
        }
        assert!(Instant::now() < deadline, "fill never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(c.signal(0).unwrap().status, DispatchStatus::Ok);
    answered
}

/// A daemon with `--metrics=unix:...`, and that socket's path.
fn daemon_with_metrics(dir: &Path) -> (Daemon, PathBuf) {
    let path = dir.join("metrics.sock");
    let arg = format!("--metrics=unix:{}", path.display());
    let d = Daemon::start_logged(&[&arg]);
    assert!(path.exists(), "no metrics socket");
    (d, path)
}

/// Sends `request` on a new connection and returns everything the daemon
/// answered before closing.
fn exchange(path: &Path, request: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if !request.is_empty() {
        s.write_all(request).unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

/// `GET /metrics`: the status line and the body.
fn get(path: &Path) -> (String, String) {
    let raw = exchange(path, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    split_response(&raw)
}

fn split_response(raw: &[u8]) -> (String, String) {
    let text = String::from_utf8(raw.to_vec()).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.lines().next().unwrap().to_owned();
    if status.starts_with("HTTP/1.1 200") {
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
    }
    (status, body.to_owned())
}

fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(key.as_str())?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Debian's `promtool check metrics` on `text`: its verdict and output.
/// promtool is installed by tests/qemu/setup.sh; a missing one is a setup
/// error, not a skip.
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool: {e}: install Debian's prometheus package (tests/qemu/setup.sh does)")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && msg.trim().is_empty(), msg)
}

#[test]
fn promtool_refuses_a_broken_exposition() {
    // The check can fail: a counter without _total and a histogram
    // without +Inf are reported.
    let (ok, msg) = promtool(
        "# HELP x_bytes x\n# TYPE x_bytes counter\nx_bytes 1\n\
         # HELP h_seconds h\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"1\"} 1\n\
         h_seconds_sum 1\nh_seconds_count 1\n",
    );
    assert!(!ok, "promtool accepted it: {msg}");
}

#[test]
fn a_session_with_resolved_faults_is_scraped_and_promtool_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, path) = daemon_with_metrics(dir.path());
    let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(&d.socket, F_VIRGL)));
    let mut c = open(&vmm, 4, 40);
    assert_eq!(fill_resolving(&vmm, &mut c, 0x3000_0000, 2), 2);

    let (status, text) = get(&path);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let l = r#"guest="1",ctx="4""#;
    let v = |name: &str| sample(&text, name, l).unwrap_or_else(|| panic!("{name}:\n{text}"));
    assert_eq!(v("vhost_gpu_nc_faults_raised_total"), 2.0);
    assert_eq!(v("vhost_gpu_nc_faults_resolved_total"), 2.0);
    assert_eq!(v("vhost_gpu_nc_faults_pending"), 0.0);
    assert_eq!(v("vhost_gpu_nc_fault_round_trip_seconds_count"), 2.0);
    assert_eq!(v("vhost_gpu_nc_binds_total"), 2.0);
    assert_eq!(v("vhost_gpu_nc_bind_bytes_total"), 8192.0);
    assert_eq!(v("vhost_gpu_nc_bound_bytes"), 8192.0);
    assert_eq!(v("vhost_gpu_nc_dispatches_started_total"), 1.0);
    assert_eq!(
        sample(
            &text,
            "vhost_gpu_nc_dispatches_ended_total",
            r#"guest="1",ctx="4",status="ok""#
        ),
        Some(1.0)
    );
    assert_eq!(v("vhost_gpu_nc_queue_depth"), 0.0);
    assert_eq!(v("vhost_gpu_nc_session_active"), 1.0);
    let g = r#"guest="1""#;
    assert_eq!(
        sample(&text, "vhost_gpu_nc_guest_bound_bytes", g),
        Some(8192.0)
    );
    assert_eq!(
        sample(&text, "vhost_gpu_nc_guest_bound_bytes_limit", g),
        Some((64u64 << 30) as f64)
    );
    let cmd = |name: &str| {
        sample(
            &text,
            "vhost_gpu_nc_virtio_gpu_commands_total",
            &format!(r#"guest="1",cmd="{name}""#),
        )
        .unwrap()
    };
    assert_eq!(cmd("CTX_CREATE"), 1.0);
    assert!(
        cmd("SUBMIT_3D") >= 6.0,
        "init, queue, dispatch, 2 binds, 2 replies"
    );
    assert_eq!(
        sample(&text, "vhost_gpu_nc_connections_total", ""),
        Some(1.0)
    );
    assert_eq!(sample(&text, "vhost_gpu_nc_guests", ""), Some(1.0));
    assert!(sample(&text, "process_cpu_seconds_total", "").unwrap() > 0.0);
    let (ok, msg) = promtool(&text);
    assert!(ok, "promtool check metrics:\n{msg}\n{text}");

    // A connection that only reads gets the exposition alone.
    let bare = String::from_utf8(exchange(&path, b"")).unwrap();
    assert!(bare.starts_with("# HELP "), "{bare}");
    assert_eq!(
        sample(&bare, "vhost_gpu_nc_faults_resolved_total", l),
        Some(2.0)
    );
    let (ok, msg) = promtool(&bare);
    assert!(ok, "promtool check metrics (bare):\n{msg}");

    // A destroyed context's series go.
    let destroy = req(VIRTIO_GPU_CMD_CTX_DESTROY, 4, &[]);
    assert_eq!(
        vmm.borrow_mut().ctrl_type(&destroy),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    let (_, text) = get(&path);
    assert_eq!(sample(&text, "vhost_gpu_nc_faults_raised_total", l), None);
    assert_eq!(sample(&text, "vhost_gpu_nc_contexts", g), Some(0.0));

    // A guest's series go with its connection; the next one is guest 2.
    drop(c);
    drop(vmm);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = get(&path);
        if sample(&text, "vhost_gpu_nc_guests", "") == Some(0.0) {
            assert_eq!(sample(&text, "vhost_gpu_nc_contexts", g), None);
            break;
        }
        assert!(Instant::now() < deadline, "the guest never went:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(&d.socket, F_VIRGL)));
    let _c = open(&vmm, 1, 10);
    let (_, text) = get(&path);
    assert_eq!(
        sample(&text, "vhost_gpu_nc_session_active", r#"guest="2",ctx="1""#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "vhost_gpu_nc_connections_total", ""),
        Some(2.0)
    );
    assert!(d.alive(), "{}", d.log());
}

#[test]
fn malformed_oversized_and_slow_requests_get_errors_and_disturb_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, path) = daemon_with_metrics(dir.path());
    let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(&d.socket, F_VIRGL)));
    let mut c = open(&vmm, 1, 10);

    let status = |raw: &[u8]| split_response(&exchange(&path, raw)).0;
    assert_eq!(
        status(b"\x00\x01garbage\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        status(b"GET /metrics HTTP/9\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        status(b"POST /metrics HTTP/1.1\r\n\r\n"),
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        status(b"GET /etc/passwd HTTP/1.1\r\n\r\n"),
        "HTTP/1.1 404 Not Found"
    );
    // Headers that never end: cut at the request limit.
    let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    big.resize(64 * 1024, b'a');
    assert_eq!(status(&big), "HTTP/1.1 431 Request Header Fields Too Large");
    // A request that stops half way.
    let t = Instant::now();
    let mut half = UnixStream::connect(&path).unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x").unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    half.read_to_end(&mut out).unwrap();
    assert_eq!(
        split_response(&out).0,
        "HTTP/1.1 400 Bad Request",
        "the client closed its side mid-request"
    );
    let mut slow = UnixStream::connect(&path).unwrap();
    slow.write_all(b"GET /metrics HT").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    slow.read_to_end(&mut out).unwrap();
    assert_eq!(split_response(&out).0, "HTTP/1.1 408 Request Timeout");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());

    // More silent connections than serving threads: every one is answered
    // and a real scrape still gets through.
    let idle: Vec<UnixStream> = (0..12)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    let t = Instant::now();
    let (st, text) = get(&path);
    assert_eq!(st, "HTTP/1.1 200 OK");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(idle);
    let r = |result: &str| {
        sample(
            &text,
            "vhost_gpu_nc_metrics_requests_total",
            &format!(r#"result="{result}""#),
        )
    };
    assert_eq!(r("bad_request"), Some(3.0));
    assert_eq!(r("method_not_allowed"), Some(1.0));
    assert_eq!(r("not_found"), Some(1.0));
    assert_eq!(r("too_large"), Some(1.0));
    assert_eq!(r("timeout"), Some(1.0));

    // The daemon and the guest's session carry on.
    assert_eq!(fill_resolving(&vmm, &mut c, 0x3000_0000, 1), 1);
    assert!(d.alive(), "{}", d.log());
    let (_, text) = get(&path);
    assert_eq!(
        sample(
            &text,
            "vhost_gpu_nc_faults_resolved_total",
            r#"guest="1",ctx="1""#
        ),
        Some(1.0)
    );
}

#[test]
fn tcp_metrics_are_served_on_loopback_only() {
    // Port 0: the log names the port picked.
    let d = Daemon::start_logged(&["--metrics=tcp:127.0.0.1:0", "--log-level", "info"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        if let Some(a) = d
            .log()
            .lines()
            .find_map(|l| l.split("metrics on tcp:").nth(1).map(str::to_owned))
        {
            break a;
        }
        assert!(Instant::now() < deadline, "no metrics line: {}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut s = std::net::TcpStream::connect(addr.trim()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let (status, text) = split_response(&raw);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(sample(&text, "vhost_gpu_nc_guests", ""), Some(0.0));
    let (ok, msg) = promtool(&text);
    assert!(ok, "{msg}");

    for bad in ["--metrics=tcp:0.0.0.0:9464", "--metrics=tcp:[::]:9464"] {
        let out = harness::daemon_command()
            .args(["--socket-path", "/nonexistent/x.sock", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a loopback address"), "{bad}: {err}");
    }
}
