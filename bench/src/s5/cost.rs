//! What a step cost the three servers: their CPU and system calls over the
//! step, per push, with `perf stat`'s exact count when asked.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::proc::{CpuUse, PerfCount, Sample};

/// Starts `perf stat` on each server when asked, and gives it time to attach.
pub(super) async fn perf_start(
    enabled: bool,
    pids: [u32; 3],
    dir: &Path,
) -> Option<[Option<PerfCount>; 3]> {
    if !enabled {
        return None;
    }
    let names = ["logic", "job", "comet"];
    let counts = [0, 1, 2].map(|i| PerfCount::start(pids[i], dir, names[i]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    Some(counts)
}

pub(super) fn perf_stop(counts: Option<[Option<PerfCount>; 3]>) -> Option<[Option<u64>; 3]> {
    counts.map(|c| c.map(|p| p.and_then(PerfCount::stop)))
}

/// CPU and system calls of logic, job and comet over a step, per push.
pub(super) fn per_push(
    before: &[Sample; 3],
    after: &[Sample; 3],
    perf: Option<[Option<u64>; 3]>,
    pushes: u64,
) -> serde_json::Value {
    let uses: Vec<CpuUse> = before.iter().zip(after).map(|(b, a)| b.since(a)).collect();
    let cpu_us = |u: &CpuUse| (u.user_s + u.system_s) * 1e6 / pushes.max(1) as f64;
    let total_us: f64 = uses.iter().map(cpu_us).sum();
    let total_sys: Option<u64> = uses.iter().map(CpuUse::syscalls).sum();
    let mut v = json!({
        "pushes": pushes,
        "cpu_us_per_push": total_us,
        "syscalls_per_push": total_sys.filter(|_| pushes > 0).map(|s| s as f64 / pushes as f64),
    });
    let per = |n: Option<u64>| n.filter(|_| pushes > 0).map(|n| n as f64 / pushes as f64);
    if let Some(counts) = perf {
        let total: Option<u64> = counts.iter().copied().sum();
        v["perf_syscalls_per_push"] = json!(per(total));
    }
    for (i, (name, u)) in ["logic", "job", "comet"].into_iter().zip(&uses).enumerate() {
        v[name] = json!({
            "cpu": u,
            "cpu_us_per_push": cpu_us(u),
            "syscalls_per_push": u.syscalls_per(pushes),
            "perf_syscalls_per_push": perf.and_then(|c| per(c[i])),
        });
    }
    v
}
