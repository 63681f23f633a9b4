//! A comet rollout under load on the test bed, every pod a real `herald`
//! process (the loopback kubelet, as in `operator_e2e.rs`): three comets,
//! [`CLIENTS`] goim clients that follow op 18 the way an SDK does (connect
//! to a named node, then let go of the old connection), pushes every 50 ms
//! to users and to their room through logic, and an image change.
//!
//! Run twice: with the operator rolling the comets (`rollout.strategy:
//! Drain`, the default) and with a plain Deployment rolling update
//! (`Deployment`), and the same figures printed side by side: clients moved
//! exactly once, the fewest Ready comets seen, the highest reconnect rate in
//! any second against the drain close rate, and acknowledged pushes lost.
//! The operator's rollout must move every client once, never drop below the
//! comets asked for, stay at or under the close rate and lose nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use herald_client::Event;
use herald_e2e::kubelet::pod_ip;
use herald_e2e::{eventually, testbed_var, unique_name};
use herald_operator::crd::PushCluster;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client as KubeClient, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

mod common;

use common::goim::{GoimClient, PUSH_OP, json_token, warm_up};
use common::operator::{Operator, PodBed, ready_pods, secret_value, setup};

/// The goim clients connected through the rollout.
const CLIENTS: u64 = 300;
/// Comets asked for.
const COMETS: usize = 3;
/// The drain close rate (connections per second).
const CLOSE_RATE: usize = 25;
/// Every wait is bounded by this many seconds.
const WAIT: u64 = 120;
const TCP_PORT: u16 = 3101;
const LOGIC_HTTP: u16 = 3111;
const CLUSTER: &str = "chat";
/// First member id of the clients.
const FIRST_MID: u64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_image_moves_every_client_once_at_the_close_rate_without_loss() -> anyhow::Result<()>
{
    common::k8s::log_harness();
    let drained = roll("Drain", 35).await?;
    println!("{}\n{}", Figures::header(), drained.row());
    let plain = roll("Deployment", 36).await?;
    let table = format!(
        "comet rollout, {COMETS} comets, {CLIENTS} clients, close rate {CLOSE_RATE}/s:\n{}\n{}\n{}\n",
        Figures::header(),
        drained.row(),
        plain.row()
    );
    print!("{table}");
    // Where the test command prints it after the run (a passing test's
    // output is captured).
    let run = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/testbed");
    if run.is_dir() {
        std::fs::write(run.join("rollout.txt"), &table)?;
    }
    ensure!(
        drained.moved_once == CLIENTS,
        "every client moved exactly once: {drained:?}"
    );
    ensure!(
        drained.cut == 0,
        "a client was cut without op 18: {drained:?}"
    );
    ensure!(
        drained.min_ready >= COMETS,
        "fewer Ready comets than asked for: {drained:?}"
    );
    ensure!(
        drained.peak_rate <= CLOSE_RATE,
        "reconnects above the close rate: {drained:?}"
    );
    ensure!(
        drained.lost == 0,
        "acknowledged pushes lost for clients that followed op 18: {drained:?}"
    );
    ensure!(drained.acked > 100, "too few pushes to tell: {drained:?}");
    // Each kind was accepted, so each kind's deliveries were checked.
    ensure!(
        drained.acked_keys > 10 && drained.acked_mids > 10,
        "too few key or member-id pushes accepted: {drained:?}"
    );
    // The plain update moved everyone too (how often is what it shows).
    ensure!(plain.never_moved == 0, "{plain:?}");
    Ok(())
}

/// What a rollout did to the clients.
#[derive(Debug)]
struct Figures {
    strategy: &'static str,
    /// Clients moved exactly once / more than once / never.
    moved_once: u64,
    moved_more: u64,
    never_moved: u64,
    /// Reconnects without an op 18 first (a connection closed under it).
    cut: u64,
    /// The fewest Ready comet pods seen while it rolled.
    min_ready: usize,
    /// Most reconnects started in any one-second window.
    peak_rate: usize,
    /// Pushes logic acknowledged meanwhile.
    acked: usize,
    /// Of those, pushes by connection key and by member id (the rest went
    /// to the room).
    acked_keys: usize,
    acked_mids: usize,
    /// Deliveries of acknowledged pushes missing at clients that followed
    /// op 18 (clients that were cut are counted in `lost_cut`).
    lost: usize,
    lost_cut: usize,
    /// From the image change until every comet ran the new one.
    seconds: f64,
}

impl Figures {
    fn header() -> String {
        format!(
            "{:<11} {:>10} {:>10} {:>6} {:>4} {:>9} {:>9} {:>6} {:>5} {:>8} {:>7}",
            "strategy",
            "moved once",
            "moved 2+",
            "never",
            "cut",
            "min ready",
            "peak /s",
            "acked",
            "lost",
            "lost cut",
            "seconds"
        )
    }

    fn row(&self) -> String {
        format!(
            "{:<11} {:>10} {:>10} {:>6} {:>4} {:>9} {:>9} {:>6} {:>5} {:>8} {:>7.1}",
            self.strategy,
            self.moved_once,
            self.moved_more,
            self.never_moved,
            self.cut,
            self.min_ready,
            self.peak_rate,
            self.acked,
            self.lost,
            self.lost_cut,
            self.seconds
        )
    }
}

/// One client's record.
#[derive(Debug, Default)]
struct Record {
    /// Push bodies received (on any of its connections).
    received: BTreeSet<String>,
    /// When each move started: an op 18 (`true`) or a close (`false`).
    moves: Vec<(Instant, bool)>,
}

type Shared = Arc<Mutex<Record>>;

/// A push logic acknowledged: its body, and the members it was for (`None`:
/// the room, every client).
/// A push logic accepted: its body, its members (none: the room), when.
type Acked = (String, Option<Vec<u64>>, Instant);

/// One rollout under load with `strategy`, in a namespace, kubelet (pods on
/// 127.0.`net`.x) and operator of its own.
async fn roll(strategy: &'static str, net: u8) -> anyhow::Result<Figures> {
    let (client, ns) = setup(&format!("op-roll-{}", strategy.to_lowercase())).await?;
    let mut bed = PodBed::start(&client, &ns, "operator_rollout", net).await?;
    bed.start_operator("op-roll");
    let result = scenario(&client, &ns, strategy).await;
    if result.is_err() {
        eprintln!(
            "pod logs: {}",
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join("operator_rollout")
                .display()
        );
    }
    bed.stop().await?;
    result
}

async fn scenario(
    client: &KubeClient,
    ns: &str,
    strategy: &'static str,
) -> anyhow::Result<Figures> {
    let clusters = Api::<PushCluster>::namespaced(client.clone(), ns);
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let redis_url = testbed_var("HERALD_REDIS_URL");
    let redis_addr = redis_url
        .trim_start_matches("redis://")
        .trim_end_matches('/');
    let brokers = testbed_var("HERALD_KAFKA_BROKERS");
    let topic = unique_name("op-roll");
    common::create_topic(&brokers, &topic, 2).await?;
    let cluster: PushCluster = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
        "metadata": {"name": CLUSTER},
        "spec": {
            "image": "herald:v1",
            "redis": {"addr": redis_addr},
            "kafka": {"brokers": brokers.split(',').collect::<Vec<_>>(),
                      "topic": topic, "group": format!("{topic}-job")},
            "comet": {
                "replicas": COMETS,
                "drain": {"deadlineSeconds": 60, "closeRate": CLOSE_RATE},
                "rollout": {"strategy": strategy},
            },
        }
    }))?;
    clusters.create(&PostParams::default(), &cluster).await?;

    // Three comets, logic and job Ready; the push path warm.
    let comets = eventually(WAIT, "3 comets, logic and job Ready", || async {
        let comets = ready_pods(&pods, CLUSTER, "comet").await?;
        let logic = ready_pods(&pods, CLUSTER, "logic").await?;
        let job = ready_pods(&pods, CLUSTER, "job").await?;
        Ok((comets.len() == COMETS && logic.len() == 1 && job.len() == 1).then_some(comets))
    })
    .await?;
    let logic_ip = services
        .get(&format!("{CLUSTER}-logic"))
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("logic ClusterIP")?;
    let logic = SocketAddr::from((logic_ip.parse::<Ipv4Addr>()?, LOGIC_HTTP));
    let key = secret_value(client, ns, &format!("{CLUSTER}-api-key"), "api-key").await?;
    let addrs: Vec<SocketAddr> = comets
        .values()
        .map(|pod| Ok(SocketAddr::from((pod_ip(pod)?, TCP_PORT))))
        .collect::<anyhow::Result<_>>()?;
    let mut warm = GoimClient::connect(addrs[0], 1, json_token(1))
        .await?
        .client;
    warm_up(&mut warm, 60, || {
        let path = format!("/goim/push/all?operation={PUSH_OP}");
        let key = key.clone();
        async move {
            common::logic_call(logic, Some(&key), "POST", &path, b"warm-up")
                .await
                .map(drop)
        }
    })
    .await?;
    drop(warm);

    // The clients, spread over the three comets.
    let (stop_tx, stop) = watch::channel(false);
    // The pusher stops first, so the last accepted push has time to arrive
    // before the clients stop reading.
    let (stop_pushing, pushing_stopped) = watch::channel(false);
    let mut records = BTreeMap::new();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let mid = FIRST_MID + i;
        let addr = addrs[usize::try_from(i).unwrap_or(0) % addrs.len()];
        let record = Shared::default();
        records.insert(mid, record.clone());
        let first = GoimClient::connect(addr, mid, json_token(mid)).await?;
        clients.spawn(roam(first, record, stop.clone(), logic, key.clone()));
    }

    // Ready comets, watched throughout.
    let min_ready = Arc::new(Mutex::new(usize::MAX));
    let watcher = {
        let (pods, min_ready, mut stop) = (pods.clone(), min_ready.clone(), stop.clone());
        tokio::spawn(async move {
            while !*stop.borrow() {
                if let Ok(ready) = ready_pods(&pods, CLUSTER, "comet").await {
                    let mut min = min_ready.lock().unwrap_or_else(|e| e.into_inner());
                    *min = (*min).min(ready.len());
                }
                tokio::select! {
                    _ = stop.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        })
    };

    // Pushes every 50 ms, to five users (by key or by member id) or to the
    // room, in turn.
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let pusher = {
        let (acked, key, mut stop) = (acked.clone(), key.clone(), pushing_stopped);
        tokio::spawn(async move {
            let mut seq = 0u64;
            while !*stop.borrow() {
                seq += 1;
                let (path, body, targets) = if seq.is_multiple_of(2) {
                    let mids: Vec<u64> = (0..5)
                        .map(|k| FIRST_MID + (seq * 7 + k * 61) % CLIENTS)
                        .collect();
                    // By connection key and by member id in turn: a key
                    // is routed to the comet its client is on now, so a
                    // key push tests the reconnect's new route too.
                    let by_key = seq.is_multiple_of(4);
                    // A list is its parameter repeated (§7): a comma-joined
                    // one is one key, or a mid that is not a number (400).
                    let list: String = mids
                        .iter()
                        .map(|mid| {
                            if by_key {
                                format!("&keys=e2e-{mid}")
                            } else {
                                format!("&mids={mid}")
                            }
                        })
                        .collect();
                    let path = if by_key {
                        format!("/goim/push/keys?operation={PUSH_OP}{list}")
                    } else {
                        format!("/goim/push/mids?operation={PUSH_OP}{list}")
                    };
                    let kind = if by_key { "keys" } else { "mids" };
                    (path, format!("{kind}-{seq}"), Some(mids))
                } else {
                    (
                        format!("/goim/push/room?operation={PUSH_OP}&type=live&room=7"),
                        format!("room-{seq}"),
                        None,
                    )
                };
                if common::logic_call(logic, Some(&key), "POST", &path, body.as_bytes())
                    .await
                    .is_ok()
                {
                    acked.lock().unwrap_or_else(|e| e.into_inner()).push((
                        body,
                        targets,
                        Instant::now(),
                    ));
                }
                tokio::select! {
                    _ = stop.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The image change.
    let old: BTreeSet<String> = comets.keys().cloned().collect();
    let started = Instant::now();
    clusters
        .patch(
            CLUSTER,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"image": "herald:v2"}})),
        )
        .await?;
    eventually(WAIT, "every comet on the new image", || async {
        let all = pods
            .list(&kube::api::ListParams::default().labels(&format!(
                "app.kubernetes.io/instance={CLUSTER},app.kubernetes.io/component=comet"
            )))
            .await?
            .items;
        let ready = ready_pods(&pods, CLUSTER, "comet").await?;
        let new_image = ready.values().all(|pod| {
            pod.spec.as_ref().map(|s| s.containers[0].image.as_deref()) == Some(Some("herald:v2"))
        });
        let done = all.len() == COMETS
            && ready.len() == COMETS
            && new_image
            && ready.keys().all(|name| !old.contains(name));
        Ok(done.then_some(()))
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    // Pushes go on a little; the last ones get time to arrive (through
    // Kafka and job, on a loaded machine); then every client reports.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_pushing.send(true);
    pusher.await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop_tx.send(true);
    watcher.await?;
    let mut ended = 0;
    while let Some(joined) = clients.join_next().await {
        joined??;
        ended += 1;
    }
    ensure!(ended == CLIENTS, "{ended} clients ended");

    // Figures.
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut figures = Figures {
        strategy,
        moved_once: 0,
        moved_more: 0,
        never_moved: 0,
        cut: 0,
        min_ready: *min_ready.lock().unwrap_or_else(|e| e.into_inner()),
        peak_rate: 0,
        acked: acked.len(),
        acked_keys: acked
            .iter()
            .filter(|(b, ..)| b.starts_with("keys-"))
            .count(),
        acked_mids: acked
            .iter()
            .filter(|(b, ..)| b.starts_with("mids-"))
            .count(),
        lost: 0,
        lost_cut: 0,
        seconds,
    };
    let mut starts = Vec::new();
    for (mid, record) in &records {
        let record = record.lock().unwrap_or_else(|e| e.into_inner());
        match record.moves.len() {
            0 => figures.never_moved += 1,
            1 => figures.moved_once += 1,
            _ => figures.moved_more += 1,
        }
        let cut = record
            .moves
            .iter()
            .filter(|(_, redirected)| !redirected)
            .count();
        figures.cut += u64::try_from(cut).unwrap_or(0);
        starts.extend(record.moves.iter().map(|(at, _)| *at));
        let missing: Vec<String> = acked
            .iter()
            .filter(|(body, targets, _)| {
                targets.as_ref().is_none_or(|mids| mids.contains(mid))
                    && !record.received.contains(body)
            })
            .map(|(body, _, at)| {
                let at = at.saturating_duration_since(started).as_secs_f64();
                format!("{body} (accepted at {at:.2}s)")
            })
            .collect();
        if !missing.is_empty() {
            // Which push, and when the client moved: enough to tell a stale
            // route from a lost frame when this fails.
            let moves: Vec<String> = record
                .moves
                .iter()
                .map(|(at, redirected)| {
                    format!(
                        "{:.2}s{}",
                        (*at - started).as_secs_f64(),
                        if *redirected { "" } else { " cut" }
                    )
                })
                .collect();
            eprintln!("{strategy}: member {mid} missed {missing:?}; moved at {moves:?}");
        }
        let missing = missing.len();
        if cut == 0 {
            figures.lost += missing;
        } else {
            figures.lost_cut += missing;
        }
    }
    starts.sort();
    figures.peak_rate = starts
        .iter()
        .enumerate()
        .map(|(i, at)| {
            starts[i..]
                .iter()
                .take_while(|later| **later < *at + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    Ok(figures)
}

/// A client through the rollout: reads pushes; on op 18 connects to one of
/// the named comets and only then lets go of the old connection (which it
/// goes on reading until the comet closes it: a push already on its way
/// there still arrives); on a close without op 18, gets a comet from
/// logic's node list. Until `stop`.
async fn roam(
    mut current: GoimClient,
    record: Shared,
    mut stop: watch::Receiver<bool>,
    logic: SocketAddr,
    key: String,
) -> anyhow::Result<()> {
    let mid = current.mid;
    let mut old_readers = tokio::task::JoinSet::new();
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            event = current.client.next_event() => event,
        };
        match event {
            Ok(Event::Push(push)) => note_push(&record, &push),
            Ok(Event::Redirect(redirect)) => {
                note_move(&record, true);
                let host = redirect
                    .nodes
                    .get(usize::try_from(mid).unwrap_or(0) % redirect.nodes.len().max(1))
                    .with_context(|| format!("op 18 without nodes: {redirect:?}"))?;
                let ip: Ipv4Addr = host.parse()?;
                ensure!(ip.is_loopback(), "redirected off loopback: {redirect:?}");
                let port = u16::try_from(redirect.tcp_port).unwrap_or(TCP_PORT);
                // A named comet that refuses (draining itself, say) sends
                // the client to the node list, as a cut does.
                let next =
                    match GoimClient::connect(SocketAddr::from((ip, port)), mid, json_token(mid))
                        .await
                    {
                        Ok(next) => next,
                        Err(_) => {
                            note_move(&record, false);
                            reconnect(mid, logic, &key).await?
                        }
                    };
                let old = std::mem::replace(&mut current, next);
                old_readers.spawn(read_until_closed(old, record.clone()));
            }
            Err(_) => {
                note_move(&record, false);
                current = reconnect(mid, logic, &key).await?;
            }
        }
    }
    old_readers.abort_all();
    Ok(())
}

/// Reads a connection the client is leaving until the comet closes it.
async fn read_until_closed(mut old: GoimClient, record: Shared) {
    old.client.set_timeout(Some(Duration::from_secs(10)));
    while let Ok(event) = old.client.next_event().await {
        if let Event::Push(push) = event {
            note_push(&record, &push);
        }
    }
}

/// Records that the client starts a move now: after an op 18
/// (`redirected`), or after its connection closed under it.
fn note_move(record: &Shared, redirected: bool) {
    record
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .moves
        .push((Instant::now(), redirected));
}

/// Keeps the body of a push of op [`PUSH_OP`] (on whichever connection).
fn note_push(record: &Shared, push: &herald_client::Push) {
    if push.op == PUSH_OP {
        record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .received
            .insert(String::from_utf8_lossy(&push.body).into_owned());
    }
}

/// A client cut without op 18 asks logic's node list for a comet, as an
/// SDK does, and connects there (retrying for up to 30 s).
async fn reconnect(mid: u64, logic: SocketAddr, key: &str) -> anyhow::Result<GoimClient> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = common::logic_call(
            logic,
            Some(key),
            "GET",
            "/goim/nodes/weighted?platform=android",
            b"",
        )
        .await;
        let picked = nodes.ok().and_then(|nodes| {
            let list = nodes["data"]["nodes"].as_array()?.clone();
            let host = list
                .get(usize::try_from(mid).unwrap_or(0) % list.len().max(1))?
                .as_str()?
                .to_owned();
            host.parse::<Ipv4Addr>().ok()
        });
        if let Some(ip) = picked
            && let Ok(client) =
                GoimClient::connect(SocketAddr::from((ip, TCP_PORT)), mid, json_token(mid)).await
        {
            return Ok(client);
        }
        ensure!(Instant::now() < deadline, "client {mid} found no comet");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A new comet that never becomes Ready stops the rollout: `Degraded`
/// `RolloutStuck`, no old comet drained, both still serving. A new spec then
/// restarts it cleanly: the stuck comet goes without a drain, comets of the
/// newest template come one at a time, each old one drained after it.
/// (In-process comets stand in for the pods here, on 127.0.37.x: the
/// operator's side is what is tested.)
#[tokio::test]
async fn a_stuck_rollout_stops_and_a_new_spec_restarts_it() -> anyhow::Result<()> {
    use common::operator::{
        PodComet, cluster_json, condition, events_of, has_condition, node_flags, wait_cluster,
        wait_comet_pods,
    };
    let (client, ns) = setup("op-roll-stuck").await?;
    let grpc_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let operator = Operator::start(&client, &ns, "op-a");
    let comet = json!({"replicas": 2, "ports": {"grpc": grpc_port},
                       "drain": {"deadlineSeconds": 10},
                       "rollout": {"progressDeadlineSeconds": 3}});
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    clusters
        .create(
            &PostParams::default(),
            &serde_json::from_value(cluster_json("chat", json!({ "comet": comet })))?,
        )
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let configmaps = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), &ns);
    let mut comets: BTreeMap<String, PodComet> = BTreeMap::new();
    let mut next_ip = 2u8;
    // Each pod not yet served gets a comet on an address of its own.
    async fn serve(
        pods: &Api<Pod>,
        comets: &mut BTreeMap<String, PodComet>,
        next_ip: &mut u8,
        names: &[String],
        grpc_port: u16,
    ) -> anyhow::Result<()> {
        for name in names {
            if !comets.contains_key(name) {
                let ip = format!("127.0.37.{next_ip}");
                *next_ip += 1;
                comets.insert(
                    name.clone(),
                    PodComet::start(pods, name, &ip, grpc_port).await?,
                );
            }
        }
        Ok(())
    }
    let old = wait_comet_pods(&pods, "chat", 2).await?;
    serve(&pods, &mut comets, &mut next_ip, &old, grpc_port).await?;
    let both = |want: bool| {
        let old = old.clone();
        move |listed: &BTreeMap<String, bool>| {
            old.iter().all(|name| listed.get(name) == Some(&want)) && listed.len() == 2
        }
    };
    common::operator::wait_node_flags(&configmaps, "chat", 30, "both comets listed", both(false))
        .await?;

    // A new image whose comet never becomes Ready.
    let image = |tag: &str| Patch::Merge(json!({"spec": {"image": format!("herald:{tag}")}}));
    clusters
        .patch("chat", &PatchParams::default(), &image("v2"))
        .await?;
    let stuck = wait_cluster(&clusters, "chat", 30, "Degraded RolloutStuck", |cluster| {
        condition(cluster, "Degraded").is_some_and(|c| c == ("True".into(), "RolloutStuck".into()))
    })
    .await?;
    assert!(has_condition(&stuck, "Progressing", "True"));
    let status = stuck.status.clone().unwrap_or_default();
    assert_eq!(status.updated_comets.as_deref(), Some("0/2"), "{status:?}");
    assert_eq!(status.comets_ready.as_deref(), Some("2/2"), "{status:?}");
    let all = wait_comet_pods(&pods, "chat", 3).await?;
    let surge: Vec<&String> = all.iter().filter(|n| !old.contains(n)).collect();
    assert_eq!(surge.len(), 1, "one new comet at a time: {all:?}");
    // No old comet drained while the new one is not Ready.
    assert!(both(false)(&node_flags(&configmaps, "chat").await?));
    for name in &old {
        let pod = pods.get(name).await?;
        assert!(
            !pod.annotations().contains_key("herald.dev/drain-started"),
            "{name}"
        );
    }
    let events = events_of(&client, &ns, "chat").await?;
    assert!(
        events.iter().any(|(type_, reason, note)| type_ == "Warning"
            && reason == "RolloutStuck"
            && note.contains(surge[0].as_str())),
        "{events:?}"
    );

    // A new spec: the stuck comet goes without a drain, the rollout starts
    // over on v3 and completes, one comet at a time.
    clusters
        .patch("chat", &PatchParams::default(), &image("v3"))
        .await?;
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = pods
            .list(
                &kube::api::ListParams::default()
                    .labels("app.kubernetes.io/instance=chat,app.kubernetes.io/component=comet"),
            )
            .await?
            .items;
        let live: Vec<&Pod> = list
            .iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .collect();
        let v3: Vec<String> = live
            .iter()
            .filter(|pod| {
                pod.spec.as_ref().map(|s| s.containers[0].image.clone())
                    == Some(Some("herald:v3".to_owned()))
            })
            .map(|pod| pod.name_any())
            .collect();
        ensure!(
            !live.iter().any(|pod| pod.name_any() == *surge[0]) || v3.is_empty(),
            "the stuck comet outlived the new spec's first comet"
        );
        let new_v3 = v3.iter().filter(|n| !comets.contains_key(*n)).count();
        most = most.max(new_v3);
        ensure!(
            new_v3 <= 1,
            "more than one new comet started at once: {v3:?}"
        );
        serve(&pods, &mut comets, &mut next_ip, &v3, grpc_port).await?;
        let cluster = clusters.get("chat").await?;
        let status = cluster.status.clone().unwrap_or_default();
        if v3.len() == 2
            && live.len() == 2
            // (Logic and job have no pods here, so Progressing stays True
            // for them: only the comets' part is over.)
            && condition(&cluster, "Progressing").is_some_and(|c| c.1 != "RollingComets")
            && has_condition(&cluster, "Degraded", "False")
            && status.updated_comets.as_deref() == Some("2/2")
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "rollout to v3 not done: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(most, 1);
    // Only the v3 ReplicaSet is left.
    let deployments =
        Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), &ns);
    let sets = eventually(30, "the old ReplicaSets deleted", || async {
        let sets = common::operator::comet_replica_sets(&deployments, "chat").await?;
        Ok((sets.len() == 1).then_some(sets))
    })
    .await?;
    let template = sets[0].spec.as_ref().and_then(|s| s.template.as_ref());
    let image = template
        .and_then(|t| t.spec.as_ref())
        .and_then(|s| s.containers[0].image.clone());
    assert_eq!(image.as_deref(), Some("herald:v3"));
    let events = events_of(&client, &ns, "chat").await?;
    let finished = events
        .iter()
        .filter(|(_, reason, _)| reason == "DrainFinished")
        .count();
    assert_eq!(finished, 2, "each old comet drained once: {events:?}");

    operator.stop().await?;
    drop(comets);
    common::operator::delete_namespace(&client, &ns).await
}
