//! The benchmark tool keeps working: `herald bench smoke` runs the floor, a
//! tiny room fan-out, single-key pushes (comet, then the floor relay) and
//! connection storms (the handshake floor, then comet)
//! against real processes of this binary and must deliver every message, in
//! order, to every client. No timing is asserted. The smoke runs use a
//! shared gRPC token (`--grpc-token-file`): the benchmark's own gRPC calls
//! and those between the servers it starts must carry it.

use herald_testkit::Herald;

/// `herald bench`, with the test process's environment (the test bed's
/// variables included) as a user's shell would pass it.
fn bench() -> Herald {
    Herald::new(env!("CARGO_BIN_EXE_herald"), "bench").keep_herald_env()
}

/// `--grpc-token-file` and a file in `out` holding a token.
fn grpc_token_flags(out: &std::path::Path) -> [std::ffi::OsString; 2] {
    std::fs::create_dir_all(out).expect("the output directory");
    let file = out.join("grpc-token");
    std::fs::write(&file, "bench-grpc-token\n").expect("the token file");
    ["--grpc-token-file".into(), file.into()]
}

#[test]
fn bench_smoke_delivers_everything_in_order() {
    let out = std::env::temp_dir().join(format!("herald-bench-smoke-{}", std::process::id()));
    let output = bench()
        .args(["smoke", "--out"])
        .arg(&out)
        .args(grpc_token_flags(&out))
        .output()
        .expect("run herald bench smoke");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "herald bench smoke failed:\n{stderr}"
    );
    let json = std::fs::read(out.join("bench-smoke.json")).expect("the JSON record");
    let report: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
    let floor = report["scenarios"]["s0"]["runs"]
        .as_array()
        .expect("floor runs");
    let steps = report["scenarios"]["s2"]["steps"]
        .as_array()
        .expect("S2 steps");
    assert_eq!(floor.len(), 2, "floor at 20 and 1 frames per push");
    assert_eq!(steps.len(), 2, "one step at 20 and one at 1 frame per push");
    for step in floor.iter().chain(steps) {
        let expected = step["expected"].as_u64().expect("expected");
        assert!(expected > 0, "{step}");
        assert_eq!(step["delivered"].as_u64(), Some(expected), "{step}");
        assert_eq!(step["lost"].as_u64(), Some(0), "{step}");
        assert_eq!(step["reordered"].as_u64(), Some(0), "{step}");
    }
    // 50 clients × 10 pushes/s × 1 s × 20 frames, all acknowledged by comet.
    assert_eq!(steps[0]["members"].as_u64(), Some(50));
    assert_eq!(steps[0]["injected"]["ok"].as_u64(), Some(10));
    assert_eq!(steps[0]["expected"].as_u64(), Some(50 * 10 * 20));
    // S3: 200 single-key pushes/s for 1 s over the 50 clients, through comet
    // and through the floor relay, each message to its own key's client.
    for key in ["steps", "floor_steps"] {
        let s3 = report["scenarios"]["s3"][key].as_array().expect("S3 steps");
        assert_eq!(s3.len(), 1, "one S3 rate in the smoke plan: {key}");
        assert_eq!(s3[0]["expected"].as_u64(), Some(200), "{key}: {}", s3[0]);
        assert_eq!(s3[0]["delivered"].as_u64(), Some(200), "{key}: {}", s3[0]);
        assert_eq!(s3[0]["lost"].as_u64(), Some(0), "{key}: {}", s3[0]);
        assert_eq!(
            s3[0]["latency"]["count"].as_u64(),
            Some(200),
            "{key}: {}",
            s3[0]
        );
    }
    // S4: a connect storm and reconnect storms of the 50 clients, against
    // the handshake floor and against comet, every client authenticated
    // (op 8 read) in each; the table compares comet with the floor.
    let storms = report["scenarios"]["s4"]["storms"]
        .as_array()
        .expect("S4 storms");
    for server in ["floor", "comet"] {
        let of_server: Vec<_> = storms.iter().filter(|s| s["server"] == server).collect();
        assert_eq!(of_server.len(), 5, "{server}: {storms:?}");
        for storm in of_server {
            assert_eq!(storm["connect"]["connected"].as_u64(), Some(50), "{storm}");
            assert_eq!(storm["connect"]["failed"].as_u64(), Some(0), "{storm}");
            assert!(storm["server_cpu"]["share"].as_f64().is_some(), "{storm}");
            // Comet's Disconnects (or the floor's closes) all arrived.
            assert_eq!(storm["previous_closed"], true, "{storm}");
        }
    }
    // The call floor made as many `Connect` calls to the stub as the storms
    // connect clients (5 × 50), every one answered, with a CPU figure.
    let call_floor = &report["scenarios"]["s4"]["call_floor"];
    assert_eq!(
        call_floor["run"]["calls"].as_u64(),
        Some(250),
        "{call_floor}"
    );
    assert_eq!(call_floor["run"]["ok"].as_u64(), Some(250), "{call_floor}");
    assert!(
        call_floor["cpu"]["user_s"].as_f64().is_some(),
        "{call_floor}"
    );
    // The speed probe ran on both cores at the start and the end: a walk of
    // 4 M steps cannot take under a nanosecond each or over a microsecond.
    for at in ["speed_start", "speed_end"] {
        for core in ["server_ns", "generator_ns"] {
            let ns = report[at][core].as_f64().unwrap_or(0.0);
            assert!(ns > 0.1 && ns < 1_000.0, "{at}.{core}: {}", report[at]);
        }
    }
    let md = std::fs::read_to_string(out.join("bench-smoke.md")).expect("the markdown table");
    assert!(md.contains("| S2 | room fan-out, 20 frames/push"), "{md}");
    assert!(md.contains("Speed probe (ns per step"), "{md}");
    assert!(
        md.lines().any(|l| l.starts_with("| S4 | connection storm")
            && l.contains("handshake floor")
            && l.contains("with its `Connect` call")),
        "{md}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `herald bench s5-smoke` runs S5 in miniature against the test bed's Redis
/// and Kafka: real logic, job and comet processes, room and single-key pushes
/// POSTed to logic's HTTP API. Every push must reach every client it was
/// meant for; no timing is asserted.
#[test]
fn bench_s5_smoke_delivers_every_push_through_kafka() {
    let redis = herald_e2e::testbed_var("HERALD_REDIS_URL");
    let kafka = herald_e2e::testbed_var("HERALD_KAFKA_BROKERS");
    let out = std::env::temp_dir().join(format!("herald-bench-s5-smoke-{}", std::process::id()));
    let output = bench()
        .args(["s5-smoke", "--redis", &redis, "--kafka", &kafka, "--out"])
        .arg(&out)
        .args(grpc_token_flags(&out))
        .output()
        .expect("run herald bench s5-smoke");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "herald bench s5-smoke failed:\n{stderr}"
    );
    let json = std::fs::read(out.join("bench-s5-smoke.json")).expect("the JSON record");
    let report: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
    let s5 = &report["scenarios"]["s5"];
    let rooms = s5["room_steps"].as_array().expect("room steps");
    assert_eq!(rooms.len(), 1, "one room rate in the smoke plan");
    // 2 rooms × 5 members, 5 pushes/s per room for 1 s: 10 pushes, 50 messages.
    assert_eq!(rooms[0]["pushes_ok"].as_u64(), Some(10), "{}", rooms[0]);
    assert_eq!(rooms[0]["expected"].as_u64(), Some(50), "{}", rooms[0]);
    assert_eq!(rooms[0]["delivered"].as_u64(), Some(50), "{}", rooms[0]);
    assert_eq!(rooms[0]["lost"].as_u64(), Some(0), "{}", rooms[0]);
    assert_eq!(rooms[0]["gaps"].as_u64(), Some(0), "{}", rooms[0]);
    // One room's pushes are serial and go through one partition: in order.
    assert_eq!(rooms[0]["reordered"].as_u64(), Some(0), "{}", rooms[0]);
    let keys = &s5["key_step"];
    assert_eq!(keys["injected"]["ok"].as_u64(), Some(50), "{keys}");
    assert_eq!(keys["delivered"].as_u64(), Some(50), "{keys}");
    // The closed-loop step: 4 callers, each push sent once the last was
    // answered, so with 10 keys a key's pushes never overlap: all delivered,
    // in order, at a rate measured from what logic accepted.
    let closed = &s5["capacity_steps"][0];
    assert_eq!(closed["callers"].as_u64(), Some(4), "{closed}");
    assert!(closed["expected"].as_u64().unwrap_or(0) > 0, "{closed}");
    assert_eq!(closed["delivered"], closed["expected"], "{closed}");
    assert_eq!(closed["refused"].as_u64(), Some(0), "{closed}");
    assert_eq!(closed["reordered"].as_u64(), Some(0), "{closed}");
    assert!(closed["rate"].as_f64().unwrap_or(0.0) > 0.0, "{closed}");
    // The floor ran at the same rate and Kafka delivered all of it.
    assert_eq!(s5["kafka_floor"]["consumed"].as_u64(), Some(50));
    // The round-trip floor echoed the key step's rate for the step's length,
    // and its CPU was read from its own process.
    let echo = &s5["round_trip_floor"];
    assert_eq!(echo["round_trips"].as_u64(), Some(50), "{echo}");
    assert!(echo["wall_s"].as_f64().unwrap_or(0.0) > 0.5, "{echo}");
    assert!(echo["cpu_s"].as_f64().unwrap_or(0.0) > 0.0, "{echo}");
    assert_eq!(echo["round_trips_per_push"].as_f64(), Some(6.5), "{echo}");
    // CPU was read from all three servers.
    for part in ["logic", "job", "comet"] {
        assert!(
            keys["cost"][part]["cpu"]["wall_s"].as_f64().unwrap_or(0.0) > 0.0,
            "{part}: {keys}"
        );
    }
    let md = std::fs::read_to_string(out.join("bench-s5-smoke.md")).expect("the markdown table");
    assert!(md.contains("| Kafka alone (floor) |"), "{md}");
    assert!(md.contains("round-trip floor"), "{md}");
    assert!(
        md.contains("| single key, closed loop (10 keys) | 4 callers: "),
        "{md}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `herald bench soak` for one minute in 10 s windows on the full path
/// (logic, job and comet on the test bed's Redis and Kafka), with a smaller
/// idle population: room and key pushes, connects and disconnects and slow
/// readers in every window. The bench exits non-zero on any loss it cannot
/// explain; every window must also deliver everything owed to the clients
/// that read, and the slow readers' losses must be the explained kind
/// (closed by comet as `slow_consumer`). Drift is printed, not asserted: a
/// minute on a shared 2-core machine is too noisy for it.
#[test]
fn bench_soak_minute_loses_nothing_unexplained() {
    let redis = herald_e2e::testbed_var("HERALD_REDIS_URL");
    let kafka = herald_e2e::testbed_var("HERALD_KAFKA_BROKERS");
    let out = std::env::temp_dir().join(format!("herald-bench-soak-{}", std::process::id()));
    let output = bench()
        .args(["soak", "--minutes", "1", "--window-seconds", "10"])
        .args([
            "--clients",
            "500",
            "--redis",
            &redis,
            "--kafka",
            &kafka,
            "--out",
        ])
        .arg(&out)
        .args(grpc_token_flags(&out))
        .output()
        .expect("run herald bench soak");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let md = std::fs::read_to_string(out.join("bench-soak.md")).unwrap_or_default();
    // The figures, drift included, for whoever reads the test's output.
    println!("{stderr}\n{md}");
    assert!(
        output.status.success(),
        "herald bench soak failed:\n{stderr}"
    );
    let json = std::fs::read(out.join("bench-soak.json")).expect("the JSON record");
    let report: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
    let soak = &report["scenarios"]["soak"];
    assert_eq!(soak["path"], "full", "{soak}");
    assert_eq!(soak["unexplained"].as_u64(), Some(0), "{}", soak["losses"]);
    let windows = soak["windows"].as_array().expect("windows");
    assert_eq!(windows.len(), 6, "one minute in 10 s windows");
    let mut slow_closed = 0;
    for w in windows.iter().chain([&soak["warm_up"]]) {
        let expected = w["expected"].as_u64().expect("expected");
        assert!(expected > 0, "{w}");
        assert_eq!(w["delivered"].as_u64(), Some(expected), "{w}");
        assert!(w["churn"]["connected"].as_u64().unwrap_or(0) > 0, "{w}");
        assert!(w["latency"]["count"].as_u64().unwrap_or(0) > 0, "{w}");
        let processes = w["processes"].as_array().expect("processes");
        let names: Vec<_> = processes.iter().map(|p| p["name"].clone()).collect();
        assert_eq!(names, ["comet", "logic", "job"], "{w}");
        for p in processes {
            assert!(p["rss_bytes"].as_u64().unwrap_or(0) > 0, "{p}");
            assert!(p["fds"].as_u64().unwrap_or(0) > 0, "{p}");
        }
        slow_closed += w["slow_readers"]["closed_slow_consumer"]
            .as_u64()
            .unwrap_or(0);
    }
    // The slow readers were closed by comet, and their messages are the
    // explained losses.
    assert!(slow_closed > 0, "no slow reader closed: {}", soak["losses"]);
    assert!(
        soak["explained"].as_u64().unwrap_or(0) > 0,
        "{}",
        soak["losses"]
    );
    assert!(md.contains("PASS unexplained losses 0"), "{md}");
    assert!(
        md.contains("RSS drift, last window against the first"),
        "{md}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// The children of `pid` whose command line contains `word`.
fn children_with(pid: u32, word: &str) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|child| {
            std::fs::read(format!("/proc/{child}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(word))
        })
        .collect()
}

/// Whether `pid` is still a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name in parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

#[test]
fn a_killed_bench_takes_its_servers_with_it() {
    use std::time::{Duration, Instant};
    let out = std::env::temp_dir().join(format!("herald-bench-kill-{}", std::process::id()));
    let mut bench = bench()
        .args(["s1", "--clients", "1000", "--out"])
        .arg(&out)
        .dir(&out)
        .start()
        .expect("start herald bench s1");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Wait for the comet itself, not its `setpriv` launcher: until setpriv
    // has set the parent-death signal and exec'd herald, a kill would orphan
    // it (a race of the launch, not of a running bench; CI once hit it).
    let comet = loop {
        let launched = children_with(bench.pid(), "comet").into_iter().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "herald")
        });
        if let Some(pid) = launched {
            break pid;
        }
        assert!(Instant::now() < deadline, "bench started no comet");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(alive(comet));
    // SIGKILL: no destructor in the bench runs.
    bench.kill().expect("kill and reap the bench");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(comet) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let outlived = alive(comet);
    if outlived {
        // Not left running when the test fails.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(comet).unwrap_or(i32::MAX)),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(!outlived, "comet {comet} outlived its bench");
}
