//! S5's rows in the targets table: room and single-key latency (the latter
//! against Kafka's floor) and CPU per push (against the round-trip floor).

use super::ROUND_TRIPS_PER_PUSH;
use crate::proc;
use crate::report::Target;

pub(super) fn targets<'a>(
    room_steps: &'a [serde_json::Value],
    key_steps: &'a [serde_json::Value],
    capacity_steps: &'a [serde_json::Value],
    floor: &serde_json::Value,
    round_trip: &serde_json::Value,
) -> Vec<Target> {
    let f = |v: &serde_json::Value| v.as_f64();
    let null = serde_json::Value::Null;
    let key_step = key_steps.first().unwrap_or(&null);
    let mut targets = Vec::new();
    // Issue 4: at ≤ 1 push/s per room.
    let slow = room_steps
        .iter()
        .filter(|s| f(&s["rate_per_room"]).is_some_and(|r| r <= 1.0))
        .min_by(|a, b| {
            f(&a["rate_per_room"])
                .unwrap_or(f64::MAX)
                .total_cmp(&f(&b["rate_per_room"]).unwrap_or(f64::MAX))
        });
    let all = |s: &serde_json::Value| s["delivered"] == s["expected"];
    for (q, goal, limit, target) in [
        (
            "p50_us",
            "≤ 5 ms",
            5_000.0,
            "room push end to end at 1 push/s per room, p50",
        ),
        (
            "p99_us",
            "≤ 20 ms",
            20_000.0,
            "room push end to end at 1 push/s per room, p99",
        ),
    ] {
        let value = slow.and_then(|s| f(&s["latency"][q]));
        targets.push(Target {
            scenario: "S5",
            target,
            goal: goal.to_owned(),
            figure: match (value, slow) {
                (Some(v), Some(s)) => format!(
                    "{:.1} ms ({}/{} delivered)",
                    v / 1e3,
                    s["delivered"],
                    s["expected"]
                ),
                _ => "not run".to_owned(),
            },
            value,
            floor_ratio: None,
            met: value.zip(slow).map(|(v, s)| v <= limit && all(s)),
            loadavg: proc::loadavg(),
        });
    }
    let herald = f(&key_step["latency"]["p99_us"]).filter(|v| *v > 0.0);
    let kafka = f(&floor["latency"]["p99_us"]).filter(|v| *v > 0.0);
    let diff = herald.zip(kafka).map(|(h, k)| h - k);
    targets.push(Target {
        scenario: "S5",
        target: "single-key push end to end, p99 minus Kafka's own p99 at the same rate",
        goal: "≤ 3 ms".to_owned(),
        figure: match (herald, kafka, diff) {
            (Some(h), Some(k), Some(d)) => format!(
                "{:+.2} ms (Herald p99 {:.2} ms, Kafka p99 {:.2} ms; {}/{} delivered)",
                d / 1e3,
                h / 1e3,
                k / 1e3,
                key_step["delivered"],
                key_step["expected"]
            ),
            _ => "not measured".to_owned(),
        },
        value: diff.map(|d| d / 1e3),
        // The floor here is Kafka: Herald's p99 over Kafka's.
        floor_ratio: herald.zip(kafka).map(|(h, k)| h / k),
        met: diff.map(|d| d <= 3_000.0 && all(key_step)),
        loadavg: proc::loadavg(),
    });
    // CPU per push at the busiest room step (most pushes to spread the
    // fixed costs over) and at the key step.
    let busiest = room_steps.iter().max_by(|a, b| {
        f(&a["cost"]["pushes"])
            .unwrap_or(0.0)
            .total_cmp(&f(&b["cost"]["pushes"]).unwrap_or(0.0))
    });
    // Of some steps, the one with the highest rate that delivered every push.
    let fastest_in_full = |steps: &'a [serde_json::Value], skip| {
        steps
            .iter()
            .skip(skip)
            .filter(|s| all(s) && s["expected"].as_u64().is_some_and(|n| n > 0))
            .max_by(|a, b| {
                f(&a["rate"])
                    .unwrap_or(0.0)
                    .total_cmp(&f(&b["rate"]).unwrap_or(0.0))
            })
    };
    // The fastest single-key step that delivered every push: what a push
    // costs once the processes are busy enough to batch (at the first,
    // slower step most of it is waking idle threads).
    let fastest = fastest_in_full(key_steps, 1);
    // Only the latency step has a floor: it runs at the echo's rate, where
    // every round trip is a wake-up of its own.
    let key_floor = f(&round_trip["cpu_us_per_push"]).filter(|v| *v > 0.0);
    // The 100 µs goal is read for a push to one client; a room push is one
    // delivery per member (comet's share grows with the room), so its row
    // is reported, with the cost per delivered message beside it.
    let mut cpu_rows = vec![
        (
            busiest,
            "CPU per room push (logic + job + comet), busiest room step",
            None,
        ),
        (
            key_steps.first(),
            "CPU per single-key push (logic + job + comet), latency step",
            key_floor,
        ),
    ];
    if key_steps.len() > 1 {
        cpu_rows.push((
            fastest,
            "CPU per single-key push (logic + job + comet), fastest step delivered in full",
            None,
        ));
    }
    // The closed-loop step that pushed the most and delivered all of it:
    // the three at their capacity on one core.
    if !capacity_steps.is_empty() {
        cpu_rows.push((
            fastest_in_full(capacity_steps, 0),
            "CPU per single-key push (logic + job + comet) at capacity: closed loop, most pushes/s delivered in full",
            None,
        ));
    }
    for (step, target, floor) in cpu_rows {
        let room = step.and_then(|s| f(&s["members_per_room"]));
        let value = step.and_then(|s| f(&s["cost"]["cpu_us_per_push"]));
        let per = |s: &serde_json::Value, p: &str| {
            f(&s["cost"][p]["cpu_us_per_push"]).unwrap_or(f64::NAN)
        };
        targets.push(Target {
            scenario: "S5",
            target,
            goal: if room.is_some() {
                "reported (≤ 100 µs is for a push to one client)".to_owned()
            } else {
                "≤ 100 µs".to_owned()
            },
            figure: match step {
                Some(s) => format!(
                    "{:.0} µs at {} (logic {:.0}, job {:.0}, comet {:.0}; {}){}{}",
                    value.unwrap_or(f64::NAN),
                    step_rate(s),
                    per(s, "logic"),
                    per(s, "job"),
                    per(s, "comet"),
                    syscall_figure(&s["cost"]),
                    floor.map_or(String::new(), |fl| format!(
                        "; round-trip floor {fl:.0} µs ({ROUND_TRIPS_PER_PUSH} × {:.1} µs)",
                        fl / ROUND_TRIPS_PER_PUSH
                    )),
                    match (room, value) {
                        (Some(m), Some(v)) if m > 0.0 =>
                            format!("; {:.1} µs per delivered message", v / m),
                        _ => String::new(),
                    }
                ),
                None => "not run".to_owned(),
            },
            value,
            floor_ratio: value.zip(floor).map(|(v, fl)| v / fl),
            met: value.filter(|_| room.is_none()).map(|v| v <= 100.0),
            loadavg: proc::loadavg(),
        });
    }
    targets
}

/// A step's push rate as the table shows it.
fn step_rate(step: &serde_json::Value) -> String {
    match (step["rate"].as_f64(), step["rate_per_room"].as_f64()) {
        (Some(r), _) if step["callers"].is_u64() => format!(
            "{}/s reached by {} callers",
            crate::report::fmt_num(r),
            step["callers"]
        ),
        (Some(r), _) => format!("{}/s", crate::report::fmt_num(r)),
        (None, Some(r)) => format!("{}/s per room", crate::report::fmt_num(r)),
        (None, None) => "–".to_owned(),
    }
}

/// System calls per push as the table shows them: perf's exact count when it
/// ran, else the read/write-class lower bound from `/proc`.
fn syscall_figure(cost: &serde_json::Value) -> String {
    match (
        cost["perf_syscalls_per_push"].as_f64(),
        cost["syscalls_per_push"].as_f64(),
    ) {
        (Some(all), _) => format!("{all:.1} syscalls/push"),
        (None, Some(rw)) => format!("≥ {rw:.1} read/write syscalls/push"),
        (None, None) => "syscalls not counted".to_owned(),
    }
}
