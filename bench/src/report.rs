//! One run's record: a JSON file with every figure, and a markdown page with
//! each target, its figure, the ratio to the floor and the machine's load.
//!
//! The markdown page is rendered in `markdown`, the plots chosen in
//! `plots`; this file holds the record's types and writes the files.

mod markdown;
mod plots;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

pub(crate) use self::plots::plots;
use crate::What;
use crate::proc::{Machine, Speed};

/// Why the report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be written.
    #[error("cannot write {path:?}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The record could not be serialised.
    #[error("cannot serialise the report")]
    Json(#[source] serde_json::Error),
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct Percentiles {
    pub(crate) count: u64,
    pub(crate) p50_us: f64,
    pub(crate) p90_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) max_us: f64,
}

impl Percentiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1_000.0;
        Percentiles {
            count: h.len(),
            p50_us: us(0.5),
            p90_us: us(0.9),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: h.max() as f64 / 1_000.0,
        }
    }
}

/// One target from the issues, with what this run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Target {
    pub(crate) scenario: &'static str,
    pub(crate) target: &'static str,
    pub(crate) goal: String,
    /// The figure as shown in the table.
    pub(crate) figure: String,
    /// The figure as a number, in the goal's unit.
    pub(crate) value: Option<f64>,
    /// Comet's figure divided by the floor's at the same N and batch size.
    pub(crate) floor_ratio: Option<f64>,
    /// `None` when the run could not decide (no data).
    pub(crate) met: Option<bool>,
    /// The 1-minute load average when the figure was taken.
    pub(crate) loadavg: f64,
}

impl Target {
    /// The target as a `PASS`/`FAIL` line (the soak's summary).
    pub(crate) fn verdict(&self) -> String {
        let word = match self.met {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a",
        };
        format!("{word} {} {}: {}", self.target, self.goal, self.figure)
    }
}

/// Everything one `herald bench` invocation measured.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Report {
    pub(crate) what: What,
    pub(crate) started_utc: String,
    pub(crate) command: String,
    pub(crate) machine: Machine,
    pub(crate) pinned: Option<(usize, usize)>,
    pub(crate) loadavg_start: f64,
    pub(crate) loadavg_end: f64,
    /// The machine's speed on the pinned cores at the start and the end.
    pub(crate) speed_start: Speed,
    pub(crate) speed_end: Option<Speed>,
    pub(crate) targets: Vec<Target>,
    pub(crate) scenarios: BTreeMap<String, serde_json::Value>,
    pub(crate) notes: Vec<String>,
}

/// The current UTC time, RFC 3339, to the second.
pub(crate) fn now_utc() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

fn write(path: &Path, contents: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Write {
            path: dir.to_owned(),
            source,
        })?;
    }
    std::fs::write(path, contents).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "–".to_owned()
    } else if v.abs() >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.1} k", v / 1e3)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v != 0.0 && v.abs() < 0.01 {
        // Per-message counts under coalescing: 0.00 would hide them.
        format!("{v:.1e}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    /// Writes `bench-<what>.json` and `bench-<what>.md` into `out`; returns the
    /// markdown.
    pub(crate) fn write(&self, out: &Path) -> Result<String> {
        let name = serde_json::to_value(self.what)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "run".to_owned());
        let json = serde_json::to_vec_pretty(self).map_err(Error::Json)?;
        write(&out.join(format!("bench-{name}.json")), &json)?;
        let md = self.markdown();
        write(&out.join(format!("bench-{name}.md")), md.as_bytes())?;
        Ok(md)
    }
}

/// Least-squares slope of `y` over `x`.
pub(crate) fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Writes `benchmarks.md` and the plots into `dir`, the project's docs.
pub(crate) fn write_docs(report: &Report, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut md = String::new();
    md.push_str(DOCS_HEAD);
    md.push_str("\n## Latest figures\n\n");
    md.push_str(&report.markdown());
    let plots = plots(report, dir);
    if !plots.is_empty() {
        md.push_str("\n## Plots\n\n");
        for (file, caption) in plots {
            let _ = writeln!(md, "![{caption}]({file})\n");
        }
    }
    write(&dir.join("benchmarks.md"), md.as_bytes())
}

const DOCS_HEAD: &str = include_str!("docs_head.md");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line() {
        let pts = [(1.0, 3.0), (2.0, 5.0), (4.0, 9.0)];
        assert!((slope(&pts).unwrap() - 2.0).abs() < 1e-9);
        assert!(slope(&pts[..1]).is_none());
    }
}
