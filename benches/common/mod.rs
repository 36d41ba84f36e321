//! What the daemon crate's benchmarks share: percentiles, the machine's
//! load, the results directory the plot tool reads, and polling waits.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where benchmarks write their CSV files: `$BENCH_RESULTS_DIR`, else
/// `target/bench-results` of the workspace.
pub fn results_dir() -> PathBuf {
    let dir = std::env::var_os("BENCH_RESULTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-results"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `rows` under `header` to `<results>/<name>.csv`.
pub fn write_csv(name: &str, header: &str, rows: &[String]) {
    let path = results_dir().join(format!("{name}.csv"));
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{header}").unwrap();
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
    println!("  (wrote {})", path.display());
}

/// The `p`-th percentile (0..=100) of `v` (sorted here).
pub fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p / 100.0).round() as usize;
    v[i.min(v.len() - 1)]
}

/// The median of `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Prints the machine's load (the issue asks every figure to say how
/// loaded the machine was).
pub fn print_load(when: &str) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine load {when}: {} ({cpus} CPUs)", loadavg());
}

/// CPU time of every thread of process `pid` so far (schedstat: time on
/// CPU in nanoseconds), and the user + system ticks of `/proc/PID/stat`.
pub fn process_cpu(pid: u32) -> (Duration, Duration) {
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks = stat
        .rfind(')')
        .map(|at| {
            let f: Vec<&str> = stat[at + 2..].split(' ').collect();
            f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (
        Duration::from_nanos(ns),
        Duration::from_millis(ticks * 1000 / hz),
    )
}

/// A polling wait: spins, yielding the CPU every 64 rounds (the guest
/// polls; it never sleeps), and panics after 20 s.
#[derive(Debug)]
pub struct Poll {
    round: u32,
    deadline: Instant,
    what: &'static str,
}

impl Poll {
    pub fn new(what: &'static str) -> Poll {
        Poll {
            round: 0,
            deadline: Instant::now() + Duration::from_secs(20),
            what,
        }
    }

    pub fn pause(&mut self) {
        self.round = self.round.wrapping_add(1);
        if self.round.is_multiple_of(64) {
            std::thread::yield_now();
            if self.round.is_multiple_of(4096) {
                assert!(Instant::now() < self.deadline, "timed out: {}", self.what);
            }
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Whether `--quick` (or `BENCH_QUICK=1`) asks for a short run.
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--quick")
        || std::env::var("BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty())
}

/// Whether `cargo test --benches` runs this (it passes no `--bench`):
/// then the benchmark returns at once.
pub fn under_test() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench")
}

/// Optional name filters given after `--bench` (all when none).
pub fn wanted(name: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}
