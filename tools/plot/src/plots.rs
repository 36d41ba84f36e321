//! The plots, one function each. Every function reads its columns from the
//! table (a missing column or a bad number is an error), then draws one SVG.
//!
//! - [`fault_latency`]: the distribution of the fault round trip (dispatch ->
//!   fault record visible -> bind + reply -> dispatch done) through the
//!   vhost-user socket and in-process: one CDF per path on a log time axis,
//!   p50 and p99 in the legend.
//! - [`bind_vs_mappings`]: the time of one 4,096-op VM_BIND batch (map and
//!   unmap, socket and in-process) against the number of mappings the GPU VM
//!   already holds: does the range manager stay flat as it fills?
//! - [`copy_bandwidth`]: GB/s of a GPU COPY through the simulated GPU's VM
//!   against memcpy of the same guest buffers and of heap buffers, by copy
//!   size (log2 axis).
//! - [`bind_throughput`]: VM_BIND ops/s by ops per submit, socket against
//!   in-process (log ops/s axis): what batching buys over the socket.

use std::error::Error as StdError;
use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{SegmentValue, SegmentedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordi32;
use plotters::prelude::*;

use crate::Error;
use crate::csv::Table;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult = Result<(), Box<dyn StdError>>;

const SIZE: (u32, u32) = (900, 560);
const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
];
const FONT: &str = "sans-serif";

/// Draws into a fresh SVG at `out`; a drawing error names the file.
fn draw(out: &Path, f: impl FnOnce(&Area) -> DrawResult) -> Result<(), Error> {
    let root = SVGBackend::new(out, SIZE).into_drawing_area();
    let result = root
        .fill(&WHITE)
        .map_err(Box::from)
        .and_then(|()| f(&root))
        .and_then(|()| root.present().map_err(Box::from));
    result.map_err(|e| Error::Plot {
        path: out.to_owned(),
        msg: format!("drawing failed: {e}"),
    })
}

/// The `p`th percentile of sorted `v`, as the benchmarks compute it.
fn pct(v: &[f64], p: f64) -> f64 {
    let i = ((v.len() as f64 - 1.0) * p / 100.0).round() as usize;
    v[i.min(v.len() - 1)]
}

/// `v` with an SI suffix: 1500 -> "1.5k", 10000 -> "10k", 2e6 -> "2M".
fn si(v: f64) -> String {
    let (v, s) = match v {
        v if v >= 1e9 => (v / 1e9, "G"),
        v if v >= 1e6 => (v / 1e6, "M"),
        v if v >= 1e3 => (v / 1e3, "k"),
        v => (v, ""),
    };
    let t = format!("{v:.1}");
    format!("{}{s}", t.strip_suffix(".0").unwrap_or(&t))
}

/// A byte count: 4096 -> "4 KiB", 67108864 -> "64 MiB".
fn bytes(v: f64) -> String {
    match v {
        v if v >= (1u64 << 30) as f64 => format!("{} GiB", v / (1u64 << 30) as f64),
        v if v >= (1 << 20) as f64 => format!("{} MiB", v / (1 << 20) as f64),
        v if v >= 1024.0 => format!("{} KiB", v / 1024.0),
        v => format!("{v} B"),
    }
}

/// The rows' `x` and `ys` columns, sorted by `x`.
fn sorted(t: &Table, x: &str, ys: &[&str]) -> Result<(Vec<f64>, Vec<Vec<f64>>), Error> {
    let xs = t.numbers(x)?;
    let cols = ys
        .iter()
        .map(|y| t.numbers(y))
        .collect::<Result<Vec<_>, _>>()?;
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let ys = cols
        .iter()
        .map(|c| order.iter().map(|&i| c[i]).collect())
        .collect();
    Ok((order.iter().map(|&i| xs[i]).collect(), ys))
}

fn max(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().fold(0.0, f64::max)
}

/// `fault_latency.csv` -> the CDF of `round_trip_us` per `path`.
pub fn fault_latency(t: &Table, out: &Path) -> Result<(), Error> {
    let paths = t.strings("path")?;
    let trips = t.numbers("round_trip_us")?;
    // Paths in the order they first appear, each with its sorted samples.
    let mut by_path: Vec<(&str, Vec<f64>)> = Vec::new();
    for (p, v) in paths.into_iter().zip(trips) {
        match by_path.iter_mut().find(|(q, _)| *q == p) {
            Some((_, s)) => s.push(v),
            None => by_path.push((p, vec![v])),
        }
    }
    for (_, s) in &mut by_path {
        s.sort_by(f64::total_cmp);
    }
    let all = by_path.iter().flat_map(|(_, s)| s.iter().copied());
    let lo = all
        .clone()
        .filter(|&v| v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let lo = if lo.is_finite() { lo / 1.5 } else { 0.1 };
    let hi = (max(all) * 1.5).max(lo * 10.0);
    draw(out, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "Fault round trip (dispatch -> guest resolves -> done)",
                (FONT, 22),
            )
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..100.0)?;
        chart
            .configure_mesh()
            .x_desc("round trip (µs, log scale)")
            .y_desc("round trips at most x (%)")
            .x_label_formatter(&|v| si(*v))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (i, (name, s)) in by_path.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let n = s.len();
            // At most ~1,000 points per curve, the last always.
            let step = n.div_ceil(1000).max(1);
            let idx = (0..n)
                .step_by(step)
                .chain(((n - 1) % step != 0).then_some(n - 1));
            let points = idx.map(|j| (s[j].max(lo), 100.0 * (j + 1) as f64 / n as f64));
            let label = format!(
                "{name}: p50 {:.1} µs, p99 {:.1} µs ({n} samples)",
                pct(s, 50.0),
                pct(s, 99.0)
            );
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT, 16))
            .draw()?;
        Ok(())
    })
}

/// Lines of `series` over the categories `labels` (x), linear or log y.
fn categorical(
    root: &Area,
    title: &str,
    x: (&str, &[String]),
    (y_desc, log_y): (&str, bool),
    series: &[(&str, Vec<f64>)],
) -> DrawResult {
    let values = || series.iter().flat_map(|(_, v)| v.iter().copied());
    let top = max(values()).max(1e-9);
    let bottom = values().filter(|&v| v > 0.0).fold(top, f64::min);
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, (FONT, 22))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70);
    let cats = (0..x.1.len() as i32 - 1).into_segmented();
    if log_y {
        let y = (bottom / 2.0..top * 3.0).log_scale();
        lines(
            builder.build_cartesian_2d(cats, y)?,
            x,
            y_desc,
            series,
            bottom / 2.0,
        )
    } else {
        lines(
            builder.build_cartesian_2d(cats, 0.0..top * 1.25)?,
            x,
            y_desc,
            series,
            0.0,
        )
    }
}

/// The mesh, lines with points and legend of [`categorical`]; values below
/// `floor` are drawn at it (0 on a log axis).
fn lines<'a, 'b: 'a, Y: Ranged<ValueType = f64> + ValueFormatter<f64>>(
    mut chart: ChartContext<'a, SVGBackend<'b>, Cartesian2d<SegmentedCoord<RangedCoordi32>, Y>>,
    (x_desc, labels): (&str, &[String]),
    y_desc: &str,
    series: &[(&str, Vec<f64>)],
    floor: f64,
) -> DrawResult {
    let label = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => usize::try_from(*i)
            .ok()
            .and_then(|i| labels.get(i))
            .cloned()
            .unwrap_or_default(),
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(labels.len())
        .x_label_formatter(&label)
        .y_label_formatter(&|v| si(*v))
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    for (k, (name, v)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<_> = (0..)
            .map(SegmentValue::CenterOf)
            .zip(v.iter().map(|&y| y.max(floor)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 16))
        .draw()?;
    Ok(())
}

/// `socket_bind_levels.csv` -> batch time (ms) by existing mappings.
pub fn bind_vs_mappings(t: &Table, out: &Path) -> Result<(), Error> {
    let cols = [
        "socket_map_ns",
        "socket_unmap_ns",
        "inprocess_map_ns",
        "inprocess_unmap_ns",
    ];
    let (levels, ys) = sorted(t, "mappings", &cols)?;
    let labels: Vec<String> = levels.iter().map(|&m| si(m)).collect();
    let names = [
        "socket map",
        "socket unmap",
        "in-process map",
        "in-process unmap",
    ];
    let series: Vec<_> = names
        .into_iter()
        .zip(ys)
        .map(|(n, v)| (n, v.into_iter().map(|ns| ns / 1e6).collect()))
        .collect();
    draw(out, |root| {
        categorical(
            root,
            "VM_BIND: one 4,096-op batch against mappings already in the GPU VM",
            ("mappings already in the GPU VM", &labels),
            ("batch time (ms)", false),
            &series,
        )
    })
}

/// `socket_bind.csv` -> bind ops/s by ops per submit, socket vs in-process.
pub fn bind_throughput(t: &Table, out: &Path) -> Result<(), Error> {
    let (sizes, ys) = sorted(
        t,
        "ops_per_submit",
        &["socket_ops_per_s", "inprocess_ops_per_s"],
    )?;
    let labels: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
    let series: Vec<_> = ["socket", "in-process"].into_iter().zip(ys).collect();
    draw(out, |root| {
        categorical(
            root,
            "VM_BIND throughput by batch size",
            ("bind ops per submit", &labels),
            ("bind ops per second (log scale)", true),
            &series,
        )
    })
}

/// `copy_bandwidth.csv` -> GB/s by copy size, three lines.
pub fn copy_bandwidth(t: &Table, out: &Path) -> Result<(), Error> {
    let cols = ["gpu_copy_gbps", "guest_memcpy_gbps", "heap_memcpy_gbps"];
    let (sizes, ys) = sorted(t, "bytes", &cols)?;
    let names = [
        "COPY through the GPU VM",
        "memcpy of the same guest buffers",
        "heap memcpy",
    ];
    let lo = sizes.iter().copied().find(|&s| s > 0.0).unwrap_or(1.0);
    let hi = max(sizes.iter().copied()).max(lo * 2.0);
    let top = max(ys.iter().flatten().copied()).max(0.1);
    draw(out, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "Copy bandwidth by size: simulated GPU COPY against memcpy",
                (FONT, 22),
            )
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d((lo / 1.5..hi * 1.5).log_scale().base(2.0), 0.0..top * 1.25)?;
        chart
            .configure_mesh()
            .x_desc("copy size (log2 scale)")
            .y_desc("bandwidth (GB/s)")
            .x_label_formatter(&|v| bytes(*v))
            .draw()?;
        for (k, (name, v)) in names.into_iter().zip(&ys).enumerate() {
            let color = COLORS[k % COLORS.len()];
            let pts: Vec<_> = sizes
                .iter()
                .map(|&s| s.max(lo))
                .zip(v.iter().copied())
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT, 16))
            .draw()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(si(0.0), "0");
        assert_eq!(si(10_000.0), "10k");
        assert_eq!(si(1_500.0), "1.5k");
        assert_eq!(si(1_000_000.0), "1M");
        assert_eq!(bytes(4096.0), "4 KiB");
        assert_eq!(bytes(64.0 * 1048576.0), "64 MiB");
        assert_eq!(pct(&[1.0, 2.0, 3.0], 50.0), 2.0);
    }
}
