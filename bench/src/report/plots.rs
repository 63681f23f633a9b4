//! Which plots a run gets (S2's fan-out and its latency, S3's and S5's
//! latency) and their series, read from the record; [`crate::plot`] draws
//! them.

use std::path::Path;

use super::Report;

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
