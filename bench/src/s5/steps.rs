//! S5's steps in order: connect the rooms' members and the key clients,
//! warm up, room pushes at each rate, single-key pushes (open, then closed
//! loop), then the floors alone; the record and its targets.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use super::cluster::Cluster;
use super::cost::{per_push, perf_start, perf_stop};
use super::floors::{kafka_floor, round_trip_floor};
use super::keys::{KeyLoad, KeyRun};
use super::targets::targets;
use super::{DRAIN_IDLE, Error, Outcome, PARTITIONS, Result, Setup};
use crate::inject::{self, HttpCall, Order};
use crate::load::{ClientSpec, Generator, Transport, new_histogram};
use crate::proc;
use crate::report::Percentiles;
use crate::wire::{self, BENCH_OP};

/// Longest unmeasured single-key warm-up before the measured steps.
const WARM_UP: Duration = Duration::from_secs(3);

fn specs(first_mid: u64, n: usize, room: &str, probe_every: usize) -> Vec<ClientSpec> {
    (0..n)
        .map(|i| ClientSpec {
            mid: first_mid + i as u64,
            room: room.to_owned(),
            transport: Transport::Tcp,
            auth: true,
            probe: i % probe_every == probe_every - 1,
            rcvbuf: None,
            body_seq: true,
        })
        .collect()
}

pub(super) async fn measure(
    setup: &Setup<'_>,
    run_id: &str,
    topic: &str,
    floor_topics: &[String; 2],
) -> Result<Outcome> {
    let &Setup {
        binary,
        core,
        out,
        clock,
        sweep,
        services,
        plan,
        perf,
        grpc_flags,
    } = setup;
    let step = Duration::from_secs_f64(plan.seconds.max(0.1));
    let cluster =
        Cluster::start(binary, core, services, topic, run_id, out, grpc_flags, &[]).await?;
    let mut generator = Generator::new(clock, sweep);
    // Mids unique to this process, so two runs sharing a Redis never route
    // each other's keys.
    let first_mid = 1_000_000_000_000 + u64::from(std::process::id() % 100_000) * 1_000_000;
    let room_names: Vec<String> = (0..plan.rooms).map(|r| format!("s5-{r}")).collect();
    let mut connect = Vec::new();
    for (r, name) in room_names.iter().enumerate() {
        let stats = generator
            .connect(
                cluster.comet.tcp,
                specs(
                    first_mid + (r * plan.members) as u64,
                    plan.members,
                    &format!("live://{name}"),
                    plan.probe_every.max(1),
                ),
                256,
            )
            .await;
        connect.push(stats);
    }
    let key_mid = first_mid + (plan.rooms * plan.members) as u64;
    let key_connect = generator
        .connect(
            cluster.comet.tcp,
            specs(key_mid, plan.key_clients, "live://s5-keys", 1),
            256,
        )
        .await;
    generator.start_sweeping();
    let members: Vec<u64> = connect.iter().map(|c| c.connected as u64).collect();
    let keys: Vec<String> = (0..key_connect.connected as u64)
        .map(|i| wire::key(key_mid + i))
        .collect();

    // Job learns which rooms comet holds by polling it (1 s); wait until the
    // new rooms are in its view, then one push per room checks the path.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut room_seq = vec![0i32; plan.rooms];
    let before = generator.totals();
    for (r, name) in room_names.iter().enumerate() {
        room_seq[r] += 1;
        let seq = room_seq[r];
        let call = room_call(name, seq, clock.ns());
        if let Err(err) = inject::Sender::send(&cluster.http, call).await {
            return Err(Error::Process(format!("warm-up room push failed: {err}")));
        }
    }
    let warm_expected: u64 = members.iter().sum();
    let (warm_total, _) = generator
        .wait_delivered(before.messages + warm_expected, Duration::from_secs(10))
        .await;
    let warm_delivered = warm_total - before.messages;
    eprintln!("  warm-up: {warm_delivered}/{warm_expected} delivered");
    // Then a few unmeasured seconds of single-key pushes at the latency
    // step's rate: a broker that was idle until now is still compiling its
    // hot paths, and the Kafka floor, which runs last, meets a warm one.
    let mut key_seq = vec![0i32; keys.len()];
    let warm_keys = KeyRun {
        label: "warm-up key push",
        cluster: &cluster,
        clock,
        load: KeyLoad::Rate(plan.key_rates.first().copied().unwrap_or(1.0)),
        duration: step.min(WARM_UP),
        keys: &keys,
        perf: false,
        out,
    }
    .measure(&mut generator, &mut key_seq)
    .await;

    let mut room_steps = Vec::new();
    for &rate in &plan.room_rates {
        let seconds = plan.seconds.max(plan.room_min_seconds);
        let duration = Duration::from_secs_f64(seconds);
        let counting = perf_start(perf, cluster.pids(), out).await;
        let before = generator.totals();
        let _ = generator.take_latency();
        let s0 = cluster.samples();
        // One serial injector per room: pushes to one room never overlap
        // (their order is the room's), rooms run side by side, their
        // schedules spread over the interval rather than all at once.
        let mut runs = Vec::new();
        let interval = Duration::from_secs_f64(1.0 / rate.max(1e-9));
        for (r, name) in room_names.iter().enumerate() {
            let base = room_seq[r];
            let http = cluster.http.clone();
            let name = name.clone();
            let phase = interval.mul_f64(r as f64 / room_names.len().max(1) as f64);
            runs.push(async move {
                inject::run_phased(
                    &http,
                    clock,
                    rate,
                    duration,
                    Order::Serial,
                    phase,
                    |i, sched| room_call(&name, base + 1 + i as i32, sched),
                )
                .await
            });
        }
        let injected = futures::future::join_all(runs).await;
        for (r, inj) in injected.iter().enumerate() {
            room_seq[r] += inj.scheduled as i32;
        }
        let expected: u64 = injected
            .iter()
            .zip(&members)
            .map(|(inj, m)| inj.ok * m)
            .sum();
        let (total, _) = generator
            .wait_delivered(before.messages + expected, DRAIN_IDLE)
            .await;
        let s1 = cluster.samples();
        let counted = perf_stop(counting);
        let after = generator.totals();
        let delivered = total - before.messages;
        let ok: u64 = injected.iter().map(|i| i.ok).sum();
        let errors: u64 = injected.iter().map(|i| i.errors).sum();
        let first_error = injected.iter().find_map(|i| i.first_error.clone());
        let latency = Percentiles::of(&generator.take_latency());
        let mut http_latency = new_histogram();
        for inj in &injected {
            if let Some(h) = &inj.rpc_latency {
                let _ = http_latency.add(h);
            }
        }
        // Pushes delivered: messages over the members of a room.
        let per_room = members.iter().sum::<u64>() as f64 / members.len().max(1) as f64;
        let pushes = (delivered as f64 / per_room.max(1.0)).round() as u64;
        let cost = per_push(&s0, &s1, counted, pushes);
        eprintln!(
            "  room push {rate}/s per room × {}: delivered {delivered}/{expected}, p50 {:.0} µs, p99 {:.0} µs, {:.0} µs CPU/push",
            plan.rooms, latency.p50_us, latency.p99_us, cost["cpu_us_per_push"]
        );
        room_steps.push(json!({
            "rate_per_room": rate,
            "rooms": plan.rooms,
            "members_per_room": per_room,
            "seconds": seconds,
            "pushes_ok": ok,
            // Pushes logic answered with an error, as for single keys.
            "refused": errors,
            "first_error": first_error,
            "expected": expected,
            "delivered": delivered,
            // Accepted by logic and never delivered. The generator's gap
            // count also spans pushes logic refused (their numbers were
            // handed out before the answer), so it is kept apart.
            "lost": expected.saturating_sub(delivered),
            "gaps": after.lost - before.lost,
            "reordered": after.reordered - before.reordered,
            "latency": latency,
            "http_latency": Percentiles::of(&http_latency),
            "cost": cost,
            "loadavg": proc::loadavg(),
        }));
    }

    let key_run = |load| KeyRun {
        label: "key push",
        cluster: &cluster,
        clock,
        load,
        duration: step,
        keys: &keys,
        perf,
        out,
    };
    // Single-key pushes, spread over the key clients, overlapping freely.
    let mut key_steps = Vec::new();
    for &rate in &plan.key_rates {
        let run = key_run(KeyLoad::Rate(rate));
        key_steps.push(run.measure(&mut generator, &mut key_seq).await);
    }
    // Then closed loop: the capacity of the three on their core.
    let mut capacity_steps = Vec::new();
    for &callers in &plan.key_callers {
        let run = key_run(KeyLoad::Callers(callers));
        capacity_steps.push(run.measure(&mut generator, &mut key_seq).await);
    }
    let key_step = key_steps.first().cloned().unwrap_or_default();
    generator.close_all().await;
    drop(cluster);

    // The floors last, alone: our servers are stopped, and Kafka (a JVM,
    // possibly just started) has been warmed by the steps above. One at the
    // single-key rate (the target's comparison), one at the slowest room
    // step's total rate, where the room latency targets apply.
    let floor = kafka_floor(
        &services.kafka,
        &floor_topics[0],
        &format!("herald-bench-floor-{run_id}"),
        clock,
        plan.key_rates.first().copied().unwrap_or(1.0),
        step,
    )
    .await?;
    let low_rate = plan
        .room_rates
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        * plan.rooms as f64;
    let floor_low = if low_rate.is_finite() && low_rate > 0.0 {
        Some(
            kafka_floor(
                &services.kafka,
                &floor_topics[1],
                &format!("herald-bench-floor-low-{run_id}"),
                clock,
                low_rate,
                Duration::from_secs_f64(plan.seconds.max(plan.room_min_seconds)),
            )
            .await?,
        )
    } else {
        None
    };

    // What the kernel alone charges the servers' core for a push's round
    // trips at the latency step's rate.
    let round_trip = round_trip_floor(
        binary,
        core,
        plan.key_rates.first().copied().unwrap_or(1.0),
        step,
    )
    .await?;

    let targets = targets(
        &room_steps,
        &key_steps,
        &capacity_steps,
        &floor,
        &round_trip,
    );
    Ok(Outcome {
        record: json!({
            "topic_partitions": PARTITIONS,
            "connect": connect,
            "key_connect": key_connect,
            "warm_up": { "expected": warm_expected, "delivered": warm_delivered },
            "warm_up_keys": warm_keys,
            "room_steps": room_steps,
            "key_step": key_step,
            "key_steps": key_steps,
            "capacity_steps": capacity_steps,
            "kafka_floor": floor,
            "kafka_floor_low_rate": floor_low,
            "round_trip_floor": round_trip,
            "first_error": generator.first_error(),
        }),
        targets,
    })
}

fn room_call(room: &str, seq: i32, sched_ns: u64) -> HttpCall {
    room_post(room, Bytes::from(wire::message_body(seq, sched_ns)))
}

/// A push of `body` to room `live://<room>` through logic's HTTP API.
pub(crate) fn room_post(room: &str, body: Bytes) -> HttpCall {
    HttpCall {
        path_and_query: format!("/goim/push/room?operation={BENCH_OP}&type=live&room={room}"),
        body,
    }
}

/// A push of `body` to `key` through logic's HTTP API.
pub(crate) fn key_post(key: &str, body: Bytes) -> HttpCall {
    HttpCall {
        path_and_query: format!("/goim/push/keys?operation={BENCH_OP}&keys={key}"),
        body,
    }
}
