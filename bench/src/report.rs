//! One run's record: a JSON file with every figure, and a markdown page with
//! each target, its figure, the ratio to the floor and the machine's load.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

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

    /// The markdown summary: machine, targets, then per-scenario tables.
    pub(crate) fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "Run `{}` at {} UTC.\n", self.command, self.started_utc);
        let _ = writeln!(
            md,
            "Machine: {} cores, {}, Linux {}. Load average (1 min) {:.2} at the start, {:.2} at the end{}.\n",
            m.nproc,
            m.cpu_model,
            m.kernel,
            self.loadavg_start,
            self.loadavg_end,
            match self.pinned {
                Some((s, g)) => format!("; server pinned to core {s}, generator to core {g}"),
                None => "; nothing pinned".to_owned(),
            }
        );
        let ns = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"));
        let end = self.speed_end.unwrap_or_default();
        let _ = writeln!(
            md,
            "Speed probe (ns per step of a fixed random walk over 8 MiB; lower is faster, and runs compare only at similar figures): server core {} at the start, {} at the end; generator core {}, {}.\n",
            ns(self.speed_start.server_ns),
            ns(end.server_ns),
            ns(self.speed_start.generator_ns),
            ns(end.generator_ns),
        );
        if !self.targets.is_empty() {
            md.push_str("| scenario | target | goal | figure | ratio to floor | met | load |\n");
            md.push_str("|---|---|---|---|---|---|---|\n");
            for t in &self.targets {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {:.2} |",
                    t.scenario,
                    t.target,
                    t.goal,
                    t.figure,
                    t.floor_ratio
                        .map(|r| format!("{:.0} %", r * 100.0))
                        .unwrap_or_else(|| "–".to_owned()),
                    match t.met {
                        Some(true) => "yes",
                        Some(false) => "**no**",
                        // A figure shown for information, with no goal.
                        None if t.goal.starts_with("reported") => "–",
                        None => "?",
                    },
                    t.loadavg
                );
            }
            md.push('\n');
        }
        if let Some(s0) = self.scenarios.get("s0") {
            md.push_str("Floor (raw fan-out server, same connections and batch sizes):\n\n");
            md.push_str("| connections | frames/push | writes/s | messages/s | floor CPU | generator CPU |\n|---|---|---|---|---|---|\n");
            for run in s0["runs"].as_array().into_iter().flatten() {
                let f = |k: &str| run[k].as_f64().unwrap_or(f64::NAN);
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {:.0} % | {:.0} % |",
                    f("connections"),
                    f("frames_per_push"),
                    fmt_num(f("writes_per_sec")),
                    fmt_num(f("messages_per_sec")),
                    f("cpu_share") * 100.0,
                    f("generator_cpu_share") * 100.0
                );
            }
            md.push('\n');
        }
        for (key, title) in [
            ("s2", "Room fan-out steps (comet, TCP clients):"),
            ("s2_ws", "Room fan-out steps (comet, WebSocket clients):"),
        ] {
            let Some(s2) = self.scenarios.get(key) else {
                continue;
            };
            md.push_str(title);
            md.push_str("\n\n| frames/push | pushes/s offered | messages/s expected | messages/s delivered | delivered/expected | comet CPU | syscalls/message | probe p50 µs | p99 µs |\n|---|---|---|---|---|---|---|---|---|\n");
            for step in s2["steps"].as_array().into_iter().flatten() {
                let f = |k: &str| step[k].as_f64().unwrap_or(f64::NAN);
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {:.3} | {:.0} % | {} | {} | {} |",
                    f("frames_per_push"),
                    fmt_num(f("offered_pushes_per_sec")),
                    fmt_num(f("expected_messages_per_sec")),
                    fmt_num(f("delivered_messages_per_sec")),
                    f("delivered_ratio"),
                    f("comet_cpu_share") * 100.0,
                    syscalls(
                        step,
                        "comet_perf_syscalls_per_message",
                        "comet_syscalls_per_message"
                    ),
                    fmt_num(step["latency"]["p50_us"].as_f64().unwrap_or(f64::NAN)),
                    fmt_num(step["latency"]["p99_us"].as_f64().unwrap_or(f64::NAN)),
                );
            }
            md.push('\n');
        }
        if let Some(s1) = self.scenarios.get("s1") {
            md.push_str("Idle memory (comet RSS by connections):\n\n| transport | connections | RSS MiB |\n|---|---|---|\n");
            for series in s1["series"].as_array().into_iter().flatten() {
                for p in series["points"].as_array().into_iter().flatten() {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {:.1} |",
                        series["transport"].as_str().unwrap_or("?"),
                        p["connections"],
                        p["rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0
                    );
                }
            }
            md.push('\n');
        }
        if let Some(s3) = self.scenarios.get("s3") {
            md.push_str("Single-key PushMsg (client-observed latency, from the scheduled send; the floor relay's p50 / p99 at the same rate in the last column):\n\n| pushes/s | delivered | p50 µs | p99 µs | p99.9 µs | max µs | comet CPU | syscalls/push | floor p50 / p99 µs |\n|---|---|---|---|---|---|---|---|---|\n");
            let floor_steps: Vec<&serde_json::Value> =
                s3["floor_steps"].as_array().into_iter().flatten().collect();
            for step in s3["steps"].as_array().into_iter().flatten() {
                let l = &step["latency"];
                let g = |k: &str| l[k].as_f64().unwrap_or(f64::NAN);
                let floor = floor_steps
                    .iter()
                    .find(|f| f["rate"] == step["rate"])
                    .map_or_else(
                        || "–".to_owned(),
                        |f| {
                            let q = |k: &str| f["latency"][k].as_f64().unwrap_or(f64::NAN);
                            format!("{} / {}", fmt_num(q("p50_us")), fmt_num(q("p99_us")))
                        },
                    );
                let _ = writeln!(
                    md,
                    "| {} | {}/{} | {} | {} | {} | {} | {:.0} % | {} | {floor} |",
                    fmt_num(step["rate"].as_f64().unwrap_or(f64::NAN)),
                    step["delivered"],
                    step["expected"],
                    fmt_num(g("p50_us")),
                    fmt_num(g("p99_us")),
                    fmt_num(g("p999_us")),
                    fmt_num(g("max_us")),
                    step["comet_cpu_share"].as_f64().unwrap_or(f64::NAN) * 100.0,
                    syscalls(
                        step,
                        "comet_perf_syscalls_per_push",
                        "comet_syscalls_per_push"
                    )
                );
            }
            md.push('\n');
        }
        if let Some(s5) = self.scenarios.get("s5") {
            md.push_str("End-to-end pushes (S5: HTTP → logic → Kafka → job → comet → client; latency from the scheduled HTTP send):\n\n");
            md.push_str("| push | rate | delivered | refused | lost | reordered | p50 ms | p90 ms | p99 ms | max ms | HTTP p99 ms | CPU µs/push (logic/job/comet) | syscalls/push |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
            let ms = |v: &serde_json::Value| {
                v.as_f64()
                    .map(|us| format!("{:.2}", us / 1e3))
                    .unwrap_or_else(|| "–".to_owned())
            };
            let row = |md: &mut String, kind: String, rate: String, step: &serde_json::Value| {
                let c = &step["cost"];
                let part = |p: &str| c[p]["cpu_us_per_push"].as_f64().unwrap_or(f64::NAN);
                let _ = writeln!(
                    md,
                    "| {kind} | {rate} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} ({:.0}/{:.0}/{:.0}) | {} |",
                    step["delivered"],
                    step["expected"],
                    // Pushes logic answered with an error: not accepted, so
                    // not owed to anyone.
                    step["refused"],
                    step["lost"],
                    step["reordered"],
                    ms(&step["latency"]["p50_us"]),
                    ms(&step["latency"]["p90_us"]),
                    ms(&step["latency"]["p99_us"]),
                    ms(&step["latency"]["max_us"]),
                    ms(&step["http_latency"]["p99_us"]),
                    c["cpu_us_per_push"].as_f64().unwrap_or(f64::NAN),
                    part("logic"),
                    part("job"),
                    part("comet"),
                    syscalls(c, "perf_syscalls_per_push", "syscalls_per_push"),
                );
            };
            for step in s5["room_steps"].as_array().into_iter().flatten() {
                row(
                    &mut md,
                    format!(
                        "room ({} rooms × {})",
                        step["rooms"],
                        step["members_per_room"].as_f64().unwrap_or(f64::NAN)
                    ),
                    format!(
                        "{}/s per room",
                        fmt_num(step["rate_per_room"].as_f64().unwrap_or(f64::NAN))
                    ),
                    step,
                );
            }
            // Older records have one `key_step`, newer ones a ramp.
            let keys = match s5["key_steps"].as_array() {
                Some(steps) => steps.iter().collect(),
                None => vec![&s5["key_step"]],
            };
            for key in keys {
                row(
                    &mut md,
                    format!("single key ({} keys)", key["keys"]),
                    format!("{}/s", fmt_num(key["rate"].as_f64().unwrap_or(f64::NAN))),
                    key,
                );
            }
            for key in s5["capacity_steps"].as_array().into_iter().flatten() {
                row(
                    &mut md,
                    format!("single key, closed loop ({} keys)", key["keys"]),
                    format!(
                        "{} callers: {}/s",
                        key["callers"],
                        fmt_num(key["rate"].as_f64().unwrap_or(f64::NAN))
                    ),
                    key,
                );
            }
            for floor in [&s5["kafka_floor_low_rate"], &s5["kafka_floor"]] {
                if floor.is_null() {
                    continue;
                }
                let _ = writeln!(
                    md,
                    "| Kafka alone (floor) | {}/s | {}/{} | – | – | – | {} | {} | {} | {} | {} (ack) | – | – |",
                    fmt_num(floor["rate"].as_f64().unwrap_or(f64::NAN)),
                    floor["consumed"],
                    floor["scheduled"],
                    ms(&floor["latency"]["p50_us"]),
                    ms(&floor["latency"]["p90_us"]),
                    ms(&floor["latency"]["p99_us"]),
                    ms(&floor["latency"]["max_us"]),
                    ms(&floor["ack_latency"]["p99_us"]),
                );
            }
            md.push('\n');
        }
        for note in &self.notes {
            let _ = writeln!(md, "- {note}");
        }
        md
    }
}

/// A syscalls-per-thing cell: perf's exact count (`all`) when it ran, else
/// `/proc`'s read/write-class count (`rw`) marked as a lower bound.
fn syscalls(v: &serde_json::Value, all: &str, rw: &str) -> String {
    match (v[all].as_f64(), v[rw].as_f64()) {
        (Some(n), _) => fmt_num(n),
        (None, Some(n)) => format!("≥ {}", fmt_num(n)),
        (None, None) => "–".to_owned(),
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

/// Draws the run's plots into `dir`; returns (file name, caption) of each
/// one drawn. A plot that fails is reported on stderr and left out.
pub(crate) fn plots(report: &Report, dir: &Path) -> Vec<(String, String)> {
    use crate::plot::{COLORS, Series, chart};
    let mut drawn = Vec::new();
    let mut draw = |file: &str, caption: &str, x: &str, y: &str, series: Vec<Series>| {
        if series.iter().all(|s| s.points.is_empty()) {
            return;
        }
        match chart(&dir.join(file), caption, x, y, &series) {
            Ok(()) => drawn.push((file.to_owned(), caption.to_owned())),
            Err(err) => eprintln!("herald bench: {err}"),
        }
    };
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    if let Some(s2) = report.scenarios.get("s2") {
        let steps: Vec<&serde_json::Value> = s2["steps"].as_array().into_iter().flatten().collect();
        let mut series = Vec::new();
        for (i, fpp) in [20.0, 1.0].into_iter().enumerate() {
            let points: Vec<(f64, f64)> = steps
                .iter()
                .filter(|s| f(s, "frames_per_push") == fpp)
                .map(|s| {
                    (
                        f(s, "expected_messages_per_sec"),
                        f(s, "delivered_messages_per_sec"),
                    )
                })
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            let max_x = points.iter().map(|p| p.0).fold(0.0, f64::max);
            series.push(Series {
                name: format!("comet {fpp} frames/push"),
                color: COLORS[i],
                points,
            });
            let floor = report.scenarios.get("s0").and_then(|s0| {
                s0["runs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| f(r, "frames_per_push") == fpp)
                    .map(|r| f(r, "messages_per_sec"))
            });
            if let Some(floor) = floor.filter(|v| v.is_finite()) {
                series.push(Series {
                    name: format!("floor {fpp} frames/push"),
                    color: COLORS[i + 2],
                    points: vec![(0.0, floor), (max_x, floor)],
                });
            }
        }
        draw(
            "bench-fanout.png",
            "S2 room fan-out: delivered vs offered",
            "offered messages/s",
            "delivered messages/s",
            series,
        );
        let lat = |q: &str, color| Series {
            name: q.to_owned(),
            color,
            points: steps
                .iter()
                .filter(|s| f(s, "frames_per_push") == 20.0)
                .map(|s| (f(s, "expected_messages_per_sec"), f(&s["latency"], q)))
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect(),
        };
        draw(
            "bench-fanout-latency.png",
            "S2 probe latency, 20 frames/push",
            "offered messages/s",
            "latency, microseconds",
            vec![
                lat("p50_us", COLORS[0]),
                lat("p99_us", COLORS[1]),
                lat("p999_us", COLORS[2]),
            ],
        );
    }
    if let Some(s3) = report.scenarios.get("s3") {
        let steps: Vec<&serde_json::Value> = s3["steps"].as_array().into_iter().flatten().collect();
        let lat = |q: &str, color| Series {
            name: q.to_owned(),
            color,
            points: steps
                .iter()
                .map(|s| (f(s, "rate"), f(&s["latency"], q)))
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect(),
        };
        let floor_p99 = Series {
            name: "floor relay p99_us".to_owned(),
            color: COLORS[3],
            points: s3["floor_steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| (f(s, "rate"), f(&s["latency"], "p99_us")))
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect(),
        };
        draw(
            "bench-pushmsg-latency.png",
            "S3 single-key PushMsg latency",
            "pushes/s",
            "latency, microseconds",
            vec![
                lat("p50_us", COLORS[0]),
                lat("p99_us", COLORS[1]),
                lat("p999_us", COLORS[2]),
                floor_p99,
            ],
        );
    }
    if let Some(s5) = report.scenarios.get("s5") {
        let steps: Vec<&serde_json::Value> =
            s5["room_steps"].as_array().into_iter().flatten().collect();
        let lat = |q: &str, color| Series {
            name: format!("room {q}"),
            color,
            points: steps
                .iter()
                .map(|s| (f(s, "rate_per_room"), f(&s["latency"], q) / 1e3))
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect(),
        };
        let max_x = steps
            .iter()
            .map(|s| f(s, "rate_per_room"))
            .fold(0.0, f64::max);
        let kafka = f(&s5["kafka_floor"]["latency"], "p99_us") / 1e3;
        let mut series = vec![
            lat("p50_us", COLORS[0]),
            lat("p90_us", COLORS[1]),
            lat("p99_us", COLORS[2]),
        ];
        if kafka.is_finite() {
            series.push(Series {
                name: "Kafka alone p99".to_owned(),
                color: COLORS[3],
                points: vec![(0.0, kafka), (max_x, kafka)],
            });
        }
        draw(
            "bench-e2e-latency.png",
            "S5 room push end to end (HTTP to client)",
            "pushes/s per room",
            "latency, milliseconds",
            series,
        );
    }
    drawn
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
