//! `plot`: turns the benchmarks' CSV output into the SVG plots of `docs/perf`.
//!
//! ```text
//! cargo run --release --manifest-path tools/plot/Cargo.toml -- [RESULTS_DIR] [OUT_DIR]
//! ```
//!
//! `RESULTS_DIR` defaults to `$BENCH_RESULTS_DIR` (where the benchmarks write
//! when it is set), else `target/bench-results`; `OUT_DIR` to `docs/perf`,
//! both under the repository root. Each CSV below that is present becomes its
//! plot (see [`plots`] for what each shows); a missing one is skipped with a
//! note, a malformed one is an error.
//!
//! | CSV (written by)                                  | SVG                     |
//! |---------------------------------------------------|-------------------------|
//! | `fault_latency.csv` (`benches/socket.rs`)         | `fault-latency.svg`     |
//! | `socket_bind_levels.csv` (`benches/socket.rs`)    | `bind-vs-mappings.svg`  |
//! | `copy_bandwidth.csv` (`backend/benches/sim.rs`)   | `copy-bandwidth.svg`    |
//! | `socket_bind.csv` (`benches/socket.rs`)           | `bind-throughput.svg`   |

mod csv;
mod plots;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use csv::Table;

/// Why a plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: line {line}: {msg}", path.display())]
    Csv {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: {msg}", path.display())]
    Plot { path: PathBuf, msg: String },
}

/// A plot: the CSV it reads, the SVG it writes, the function drawing it.
type Plot = (
    &'static str,
    &'static str,
    fn(&Table, &Path) -> Result<(), Error>,
);

const PLOTS: [Plot; 4] = [
    (
        "fault_latency.csv",
        "fault-latency.svg",
        plots::fault_latency,
    ),
    (
        "socket_bind_levels.csv",
        "bind-vs-mappings.svg",
        plots::bind_vs_mappings,
    ),
    (
        "copy_bandwidth.csv",
        "copy-bandwidth.svg",
        plots::copy_bandwidth,
    ),
    (
        "socket_bind.csv",
        "bind-throughput.svg",
        plots::bind_throughput,
    ),
];

/// Plots every CSV of `results` that is present into `out`; returns the SVGs
/// written (empty if no CSV was there).
pub fn run(results: &Path, out: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut written = Vec::new();
    for (csv, svg, draw) in PLOTS {
        let src = results.join(csv);
        let Some(table) = Table::read(&src)? else {
            eprintln!("note: {} not found, skipping {svg}", src.display());
            continue;
        };
        std::fs::create_dir_all(out).map_err(|source| Error::Io {
            path: out.to_owned(),
            source,
        })?;
        let dst = out.join(svg);
        draw(&table, &dst)?;
        written.push(dst);
    }
    Ok(written)
}

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.len() > 2 || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!(
            "usage: plot [RESULTS_DIR] [OUT_DIR]   (defaults: target/bench-results docs/perf)"
        );
        return ExitCode::from(2);
    }
    // This package lives in tools/plot of the repository.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap_or(Path::new("."));
    let results = args.first().map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("BENCH_RESULTS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/bench-results"))
    });
    let out = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("docs/perf"));
    match run(&results, &out) {
        Ok(written) if written.is_empty() => {
            eprintln!(
                "error: no benchmark CSVs in {} (run the benchmarks first)",
                results.display()
            );
            ExitCode::FAILURE
        }
        Ok(written) => {
            for p in written {
                println!("wrote {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small CSVs in the benchmarks' formats: every plot gets drawn, each SVG
    /// holds its series names and a drawn line.
    #[test]
    fn plots_every_csv() {
        let dir = tempfile::tempdir().unwrap();
        let (results, out) = (dir.path().join("results"), dir.path().join("out"));
        std::fs::create_dir(&results).unwrap();
        let mut fault = String::from("path,round_trip_us,visible_us,resolve_us\n");
        for i in 1..=200 {
            fault.push_str(&format!("socket,{},1.0,2.0\n", 20.0 + f64::from(i) * 0.1));
            fault.push_str(&format!(
                "in-process,{},0.5,1.0\n",
                2.0 + f64::from(i) * 0.01
            ));
        }
        let files = [
            ("fault_latency.csv", fault),
            (
                "socket_bind_levels.csv",
                "mappings,socket_map_ns,socket_unmap_ns,inprocess_map_ns,inprocess_unmap_ns\n\
                 0,2000000,1500000,900000,700000\n10000,2100000,1600000,950000,720000\n\
                 100000,2200000,1650000,990000,750000\n1000000,2500000,1800000,1100000,800000\n"
                    .into(),
            ),
            (
                "copy_bandwidth.csv",
                "bytes,gpu_copy_gbps,guest_memcpy_gbps,heap_memcpy_gbps\n\
                 4096,3.1,9.0,10.2\n65536,6.0,11.5,12.0\n1048576,8.2,11.0,11.8\n67108864,7.9,9.1,9.5\n"
                    .into(),
            ),
            (
                "socket_bind.csv",
                "ops_per_submit,socket_ops_per_s,inprocess_ops_per_s\n\
                 4096,5200000,7400000\n64,2100000,6900000\n1,61000,2400000\n"
                    .into(),
            ),
        ];
        for (name, text) in &files {
            std::fs::write(results.join(name), text).unwrap();
        }
        let written = run(&results, &out).unwrap();
        let expect: [(&str, &[&str]); 4] = [
            (
                "fault-latency.svg",
                &["socket: p50 30.1 µs, p99 39.8 µs", "in-process: p50 3.0 µs"],
            ),
            (
                "bind-vs-mappings.svg",
                &[
                    "socket map",
                    "socket unmap",
                    "in-process map",
                    "in-process unmap",
                    "1M",
                ],
            ),
            (
                "copy-bandwidth.svg",
                &[
                    "COPY through the GPU VM",
                    "memcpy of the same guest buffers",
                    "heap memcpy",
                    "64 MiB",
                ],
            ),
            ("bind-throughput.svg", &["socket", "in-process", "4096"]),
        ];
        assert_eq!(written.len(), expect.len());
        for (svg, names) in expect {
            let path = out.join(svg);
            assert!(written.contains(&path), "{svg} not reported");
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("<svg"),
                "{svg}: {}",
                &text[..text.len().min(80)]
            );
            assert!(
                text.contains("<polyline") || text.contains("<path"),
                "{svg}: no line"
            );
            for n in names {
                assert!(text.contains(n), "{svg}: no `{n}`");
            }
        }
    }

    #[test]
    fn missing_csvs_are_skipped_and_malformed_ones_fail() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        assert!(run(dir.path(), &out).unwrap().is_empty());
        assert!(
            !out.exists(),
            "nothing to plot, yet {} was made",
            out.display()
        );

        std::fs::write(
            dir.path().join("socket_bind.csv"),
            "ops_per_submit,socket_ops_per_s,inprocess_ops_per_s\n1,61000,fast\n",
        )
        .unwrap();
        let e = run(dir.path(), &out).unwrap_err().to_string();
        assert!(
            e.contains("socket_bind.csv: line 2") && e.contains("`fast`"),
            "{e}"
        );
        assert!(!out.join("bind-throughput.svg").exists());

        std::fs::write(
            dir.path().join("socket_bind.csv"),
            "ops_per_submit,socket_ops_per_s\n1,61000\n",
        )
        .unwrap();
        let e = run(dir.path(), &out).unwrap_err().to_string();
        assert!(e.contains("no column `inprocess_ops_per_s`"), "{e}");
    }
}
