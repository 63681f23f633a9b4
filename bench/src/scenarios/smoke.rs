//! The pass/fail checks of the `smoke` and `s5-smoke` profiles, read from
//! the finished report: every message delivered in order, every storm
//! client authenticated, every accepted push through Kafka.

use super::s4::S4_RECONNECTS;
use crate::report::Report;
use crate::{Error, Result};

/// The smoke profile passes only if every message of every step arrived, in
/// order, at every client, for both the floor and comet, and every storm
/// client authenticated.
pub(super) fn smoke_check(report: &Report) -> Result<()> {
    let mut problems = Vec::new();
    for (name, key) in [
        ("s0", "runs"),
        ("s2", "steps"),
        ("s3", "steps"),
        ("s3", "floor_steps"),
    ] {
        let Some(steps) = report.scenarios.get(name).and_then(|s| s[key].as_array()) else {
            problems.push(format!("{name} has no {key}"));
            continue;
        };
        if steps.is_empty() {
            problems.push(format!("{name} has no {key}"));
        }
        for step in steps {
            let delivered = step["delivered"].as_u64();
            let expected = step["expected"].as_u64();
            if delivered.is_none() || delivered != expected || expected == Some(0) {
                problems.push(format!("{name}: delivered {delivered:?} of {expected:?}"));
            }
            if step["lost"].as_u64() != Some(0) || step["reordered"].as_u64() != Some(0) {
                problems.push(format!(
                    "{name}: lost {} reordered {}",
                    step["lost"], step["reordered"]
                ));
            }
        }
    }
    // S4: every storm against the floor and against comet authenticated
    // every client it opened, and each began after the server had let go of
    // every client of the one before (for comet: logic got every
    // `Disconnect`).
    let s4 = report.scenarios.get("s4");
    let storms = s4
        .and_then(|s| s["storms"].as_array())
        .map_or(&[][..], Vec::as_slice);
    for server in ["floor", "comet"] {
        let of_server: Vec<_> = storms.iter().filter(|s| s["server"] == server).collect();
        if of_server.len() != 1 + S4_RECONNECTS {
            problems.push(format!("s4: {} {server} storms", of_server.len()));
        }
        for storm in of_server {
            let connect = &storm["connect"];
            if connect["connected"] != connect["requested"] || connect["failed"] != 0 {
                problems.push(format!("s4 {server} storm: {connect}"));
            }
            if storm["previous_closed"] != true {
                problems.push(format!(
                    "s4 {server}: the last storm's closes were not all seen"
                ));
            }
        }
    }
    // And the call floor's `Connect` calls were all answered.
    let run = s4.map(|s| &s["call_floor"]["run"]);
    if !run.is_some_and(|run| {
        run["calls"].as_u64().is_some_and(|n| n > 0) && run["ok"] == run["calls"]
    }) {
        problems.push(format!("s4 call floor: {run:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Smoke(problems.join("; ")))
    }
}

/// The S5 smoke passes only if every push accepted by logic reached every
/// client it was meant for (room members, key owners), through Kafka.
pub(super) fn s5_smoke_check(report: &Report) -> Result<()> {
    let mut problems = Vec::new();
    let Some(s5) = report.scenarios.get("s5") else {
        return Err(Error::Smoke("s5 has no record".to_owned()));
    };
    let steps = s5["room_steps"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(s5["key_steps"].as_array().into_iter().flatten())
        .chain(s5["capacity_steps"].as_array().into_iter().flatten());
    for step in steps {
        let delivered = step["delivered"].as_u64();
        let expected = step["expected"].as_u64();
        if delivered.is_none() || delivered != expected || expected == Some(0) {
            problems.push(format!("s5: delivered {delivered:?} of {expected:?}"));
        }
    }
    for floor in [&s5["kafka_floor"], &s5["kafka_floor_low_rate"]] {
        if floor["consumed"] != floor["scheduled"] || floor["scheduled"].as_u64() == Some(0) {
            problems.push(format!("s5 kafka floor: {floor}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Smoke(problems.join("; ")))
    }
}
