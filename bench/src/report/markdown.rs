//! The markdown page of a run: the machine and its speed, every target
//! with its figure and ratio to the floor, then one table per scenario.

use std::fmt::Write as _;

use super::{Report, fmt_num};

impl Report {
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
        if let Some(soak) = self.scenarios.get("soak") {
            self.soak_section(&mut md, soak);
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

impl Report {
    /// The soak: one row per window (the warm-up first), the drift, the
    /// PASS/FAIL lines and every loss with its reason.
    fn soak_section(&self, md: &mut String, soak: &serde_json::Value) {
        let load = &soak["load"];
        let _ = writeln!(
            md,
            "Soak ({} path, {:.1} min in {:.0} s windows): {} idle clients; {} rooms × {} members at {} pushes/s each; {} keys at {} pushes/s in all; {} clients connect and the {} before them close every {} s; a room of {} readers gets {} pushes/s of {} bytes, and {} slow readers join it each window and never read (comet queue {} bytes, send buffer {} bytes).\n",
            soak["path"].as_str().unwrap_or("?"),
            soak["minutes"].as_f64().unwrap_or(f64::NAN),
            soak["window_seconds"].as_f64().unwrap_or(f64::NAN),
            load["idle_clients"],
            load["rooms"],
            load["members_per_room"],
            load["room_pushes_per_sec"],
            load["key_clients"],
            load["key_pushes_per_sec"],
            load["churn_batch"],
            load["churn_batch"],
            load["churn_every_s"],
            load["slow_room_members"],
            load["slow_room_pushes_per_sec"],
            load["slow_room_body_bytes"],
            load["slow_readers_per_window"],
            load["comet_queue_bytes"],
            load["comet_send_buffer_bytes"],
        );
        let windows: Vec<&serde_json::Value> = std::iter::once(&soak["warm_up"])
            .chain(soak["windows"].as_array().into_iter().flatten())
            .filter(|w| !w.is_null())
            .collect();
        let names: Vec<String> = windows
            .first()
            .and_then(|w| w["processes"].as_array())
            .into_iter()
            .flatten()
            .map(|p| p["name"].as_str().unwrap_or("?").to_owned())
            .collect();
        md.push_str("| window | end s | delivered/expected | p50 ms | p99 ms |");
        for name in &names {
            let _ = write!(md, " {name} RSS MiB | {name} fds |");
        }
        md.push_str(
            " churn connected | slow readers closed | unexplained | load |\n|---|---|---|---|---|",
        );
        md.push_str(&"---|---|".repeat(names.len()));
        md.push_str("---|---|---|---|\n");
        let ms = |v: &serde_json::Value| {
            v.as_f64()
                .map_or("–".to_owned(), |us| format!("{:.2}", us / 1e3))
        };
        for w in windows {
            let _ = write!(
                md,
                "| {} | {:.0} | {}/{} | {} | {} |",
                if w["warm_up"] == true {
                    "warm-up".to_owned()
                } else {
                    w["window"].to_string()
                },
                w["end_s"].as_f64().unwrap_or(f64::NAN),
                w["delivered"],
                w["expected"],
                ms(&w["latency"]["p50_us"]),
                ms(&w["latency"]["p99_us"]),
            );
            for p in w["processes"].as_array().into_iter().flatten() {
                let _ = write!(
                    md,
                    " {:.1} | {} |",
                    p["rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                    p["fds"]
                );
            }
            let slow = &w["slow_readers"];
            let _ = writeln!(
                md,
                " {}/{} | {}/{} | {} | {:.2} |",
                w["churn"]["connected"],
                w["churn"]["connected"].as_u64().unwrap_or(0)
                    + w["churn"]["failed"].as_u64().unwrap_or(0),
                slow["closed_slow_consumer"],
                slow["connected"],
                w["unexplained"],
                w["loadavg"].as_f64().unwrap_or(f64::NAN),
            );
        }
        md.push('\n');
        let drift = &soak["drift"];
        if !drift.is_null() {
            let _ = write!(
                md,
                "Drift (window {} against window {}): p99 {} → {} ms ({:+.1} %)",
                drift["last_window"],
                drift["first_window"],
                ms(&drift["p99_first_us"]),
                ms(&drift["p99_last_us"]),
                drift["p99_drift_percent"].as_f64().unwrap_or(f64::NAN),
            );
            for p in drift["processes"].as_array().into_iter().flatten() {
                let _ = write!(
                    md,
                    "; {} RSS {:.1} → {:.1} MiB ({:+.1} %), fds {} → {}",
                    p["name"].as_str().unwrap_or("?"),
                    p["rss_first"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                    p["rss_last"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                    p["rss_drift_percent"].as_f64().unwrap_or(f64::NAN),
                    p["fds_first"],
                    p["fds_last"],
                );
            }
            md.push_str(".\n\n");
        }
        for t in self.targets.iter().filter(|t| t.scenario == "Soak") {
            let _ = writeln!(md, "    {}", t.verdict());
        }
        md.push('\n');
        let losses: Vec<&serde_json::Value> =
            soak["losses"].as_array().into_iter().flatten().collect();
        if losses.is_empty() {
            md.push_str("Not delivered: nothing.\n\n");
        } else {
            md.push_str("Not delivered:\n\n");
            for l in losses {
                let _ = writeln!(
                    md,
                    "- window {}: {} {} to {}: {} ({})",
                    l["window"],
                    l["count"],
                    l["unit"].as_str().unwrap_or(""),
                    l["to"].as_str().unwrap_or(""),
                    l["reason"].as_str().unwrap_or(""),
                    if l["explained"] == true {
                        "explained"
                    } else {
                        "**unexplained**"
                    },
                );
            }
            md.push('\n');
        }
    }
}
