//! The soak's drift (last window against the first) and its targets.

use serde_json::json;

use crate::proc;
use crate::report::Target;

/// Last window against the first: RSS and descriptors per process, p99.
pub(super) fn drift(windows: &[serde_json::Value]) -> serde_json::Value {
    let (Some(first), Some(last)) = (windows.first(), windows.last()) else {
        return serde_json::Value::Null;
    };
    let percent = |a: f64, b: f64| (b - a) / a * 100.0;
    let processes: Vec<serde_json::Value> = first["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(last["processes"].as_array().into_iter().flatten())
        .map(|(a, b)| {
            let rss = |p: &serde_json::Value| p["rss_bytes"].as_f64().unwrap_or(f64::NAN);
            json!({
                "name": a["name"],
                "rss_first": a["rss_bytes"],
                "rss_last": b["rss_bytes"],
                "rss_drift_percent": percent(rss(a), rss(b)),
                "fds_first": a["fds"],
                "fds_last": b["fds"],
            })
        })
        .collect();
    let p99 = |w: &serde_json::Value| w["latency"]["p99_us"].as_f64().unwrap_or(f64::NAN);
    json!({
        "first_window": first["window"],
        "last_window": last["window"],
        "processes": processes,
        "p99_first_us": p99(first),
        "p99_last_us": p99(last),
        "p99_drift_percent": percent(p99(first), p99(last)),
    })
}

/// The soak's three targets from its drift and losses.
pub(super) fn targets(drift: &serde_json::Value, unexplained: u64, explained: u64) -> Vec<Target> {
    let processes = drift["processes"].as_array().cloned().unwrap_or_default();
    let rss: Vec<(String, f64)> = processes
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("?").to_owned(),
                p["rss_drift_percent"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    let worst = rss.iter().map(|(_, d)| *d).fold(f64::NAN, f64::max);
    let p99_drift = drift["p99_drift_percent"].as_f64();
    let ms = |k: &str| drift[k].as_f64().unwrap_or(f64::NAN) / 1e3;
    vec![
        Target {
            scenario: "Soak",
            target: "RSS drift, last window against the first, each server",
            goal: "≤ 5 %".to_owned(),
            figure: rss
                .iter()
                .zip(&processes)
                .map(|((name, d), p)| {
                    format!(
                        "{name} {d:+.1} % ({:.1} → {:.1} MiB, fds {} → {})",
                        p["rss_first"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                        p["rss_last"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                        p["fds_first"],
                        p["fds_last"]
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            value: worst.is_finite().then_some(worst),
            floor_ratio: None,
            met: worst.is_finite().then_some(worst <= 5.0),
            loadavg: proc::loadavg(),
        },
        Target {
            scenario: "Soak",
            target: "p99 drift, last window against the first",
            goal: "≤ 10 %".to_owned(),
            figure: format!(
                "{:.2} → {:.2} ms ({:+.1} %)",
                ms("p99_first_us"),
                ms("p99_last_us"),
                p99_drift.unwrap_or(f64::NAN)
            ),
            value: p99_drift,
            floor_ratio: None,
            met: p99_drift.filter(|d| d.is_finite()).map(|d| d <= 10.0),
            loadavg: proc::loadavg(),
        },
        Target {
            scenario: "Soak",
            target: "unexplained losses",
            goal: "0".to_owned(),
            figure: format!(
                "{unexplained} unexplained; {explained} messages to slow readers closed as slow_consumer"
            ),
            value: Some(unexplained as f64),
            floor_ratio: None,
            met: Some(unexplained == 0),
            loadavg: proc::loadavg(),
        },
    ]
}
