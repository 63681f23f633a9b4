//! The node-list document (§15.4): which comets exist, where clients and job
//! reach them, their load, and which are draining.
//!
//! The operator writes it into ConfigMap `<pushcluster>-nodes` (key
//! [`CONFIGMAP_KEY`]); logic and job read it (or the same JSON from a file
//! outside Kubernetes). One type for both sides, so the writer and the
//! readers cannot disagree on a field. Every field but `name` may be missing
//! when read (an older or hand-written document), and defaults to zero/empty.

use serde::{Deserialize, Serialize};

/// The key of the node list in the operator's ConfigMap.
pub const CONFIGMAP_KEY: &str = "nodes.json";

/// At most this many addresses in one node answer unless configured (goim: 5).
pub const DEFAULT_PICKED: usize = 5;

/// The whole `nodes.json` document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    /// Increases with every change the operator makes.
    #[serde(default)]
    pub generation: i64,
    /// RFC 3339 time of the last change (informational).
    #[serde(default)]
    pub updated: String,
    /// Every comet, draining or not.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// How comets drain on shutdown, for every comet of the cluster: read
    /// live, so changing it moves no client. Absent: each comet's flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainSettings>,
}

/// The shutdown drain of every comet (§15.4), set by the operator from
/// `spec.comet.drain`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainSettings {
    /// Every connection is closed by then, in milliseconds.
    pub deadline_ms: u64,
    /// Connections closed per second; 0 spreads them over the deadline.
    #[serde(default)]
    pub close_rate: u32,
}

/// One comet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Comet server id (= pod name; the value in Redis routes and PUSH records).
    pub name: String,
    /// `host:port` of its gRPC server, where job and the operator reach it.
    #[serde(default)]
    pub grpc: String,
    /// Host names for web clients (a PushCluster's domain), possibly none.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Addresses for native clients.
    #[serde(default)]
    pub addrs: Vec<String>,
    /// TCP client port.
    #[serde(default)]
    pub tcp_port: i32,
    /// WebSocket port.
    #[serde(default)]
    pub ws_port: i32,
    /// WebSocket-over-TLS port.
    #[serde(default)]
    pub wss_port: i32,
    /// Relative weight for handing it out.
    #[serde(default)]
    pub weight: u32,
    /// Connections at the last poll.
    #[serde(default)]
    pub connections: u64,
    /// Distinct client IPs at the last poll.
    #[serde(default)]
    pub client_ips: u64,
    /// Leaving: job still pushes to it, logic no longer hands it out.
    #[serde(default)]
    pub draining: bool,
}

impl NodeList {
    /// Parses a document.
    ///
    /// # Errors
    /// Input that is not node-list JSON.
    pub fn parse(json: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(json)
    }

    /// Non-draining nodes ordered by goim's score (§11, no region boost since
    /// goim's region lookup is empty), highest first.
    pub fn ranked(&self) -> Vec<&Node> {
        let live: Vec<&Node> = self.nodes.iter().filter(|n| !n.draining).collect();
        // Saturating: the counts come from a document (hand-written ones
        // too), and a sum past u64 must neither panic nor wrap the ranking.
        let total_conns = live
            .iter()
            .fold(0u64, |t, n| t.saturating_add(n.connections));
        let total_weight = live
            .iter()
            .fold(0u64, |t, n| t.saturating_add(u64::from(n.weight)));
        let score = |n: &Node| -> i64 {
            if total_conns == 0 || total_weight == 0 {
                return i64::from(n.weight);
            }
            let fw = f64::from(n.weight);
            let c = total_conns as f64;
            let s =
                fw + (c * (fw / total_weight as f64 - n.connections as f64 / (2.0 * c))).round();
            (s as i64).clamp(1, 1 << 20)
        };
        let mut scored: Vec<(i64, &Node)> = live.into_iter().map(|n| (score(n), n)).collect();
        // Stable sort: equal scores keep document order, so answers repeat.
        scored.sort_by_key(|&(score, _)| std::cmp::Reverse(score));
        scored.into_iter().map(|(_, n)| n).collect()
    }

    /// The addresses to hand a client (§11): host names for `platform=web`,
    /// public addresses otherwise; at most `count`, each once (comets behind
    /// one load balancer share its address), never a draining node. Also the
    /// best-ranked node, whose ports the answer carries.
    pub fn pick(&self, platform: &str, count: usize) -> (Vec<String>, Option<&Node>) {
        let ranked = self.ranked();
        let first = ranked.first().copied();
        let mut out: Vec<String> = Vec::new();
        let all = ranked.into_iter().flat_map(|n| {
            if platform == "web" {
                n.hosts.iter()
            } else {
                n.addrs.iter()
            }
        });
        for addr in all {
            if out.len() == count {
                break;
            }
            if !out.contains(addr) {
                out.push(addr.clone());
            }
        }
        (out, first)
    }

    /// Where a client of comet `own` goes when it drains: the other
    /// comets that are not draining, best ranked first, as host names when
    /// they have them (a domain) and addresses otherwise; at most `count`.
    pub fn redirect_targets(&self, own: &str, count: usize) -> Vec<String> {
        let others: Vec<&Node> = self
            .ranked()
            .into_iter()
            .filter(|n| n.name != own)
            .collect();
        let hosts: Vec<String> = others
            .iter()
            .flat_map(|n| n.hosts.iter().cloned())
            .collect();
        let out: Vec<String> = if hosts.is_empty() {
            others
                .iter()
                .flat_map(|n| n.addrs.iter().cloned())
                .collect()
        } else {
            hosts
        };
        let mut unique: Vec<String> = Vec::new();
        for addr in out {
            if !unique.contains(&addr) {
                unique.push(addr);
            }
        }
        unique.truncate(count);
        unique
    }

    /// `(connections, client IPs)` summed over every node (`/goim/online/total`).
    pub fn totals(&self) -> (u64, u64) {
        self.nodes.iter().fold((0, 0), |(c, i), n| {
            (
                c.saturating_add(n.connections),
                i.saturating_add(n.client_ips),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_targets_skip_self_and_draining_nodes() {
        let mut list = NodeList {
            nodes: vec![
                node("a", 10, 0, false),
                node("bb", 10, 0, true),
                node("ccc", 10, 0, false),
            ],
            ..NodeList::default()
        };
        for n in &mut list.nodes {
            n.hosts.clear();
        }
        assert_eq!(list.redirect_targets("a", 5), ["10.0.0.3"]);
        assert_eq!(list.redirect_targets("x", 1), ["10.0.0.1"]);
        // A domain wins over addresses.
        list.nodes[2].hosts = vec!["push.example.com".to_owned()];
        assert_eq!(list.redirect_targets("a", 5), ["push.example.com"]);
        // The drain settings are optional on read and left out when unset.
        let parsed = NodeList::parse(br#"{"nodes":[],"drain":{"deadline_ms":5000}}"#).unwrap();
        assert_eq!(
            parsed.drain,
            Some(DrainSettings {
                deadline_ms: 5000,
                close_rate: 0
            })
        );
        assert!(
            !serde_json::to_string(&NodeList::default())
                .unwrap()
                .contains("drain")
        );
    }

    fn node(name: &str, weight: u32, conns: u64, draining: bool) -> Node {
        Node {
            name: name.to_owned(),
            hosts: vec![format!("{name}.example.com")],
            addrs: vec![format!("10.0.0.{}", name.len())],
            weight,
            connections: conns,
            client_ips: conns / 2,
            draining,
            ..Node::default()
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let list = NodeList::parse(
            br#"{"generation": 42, "updated": "2026-11-27T10:00:00Z",
 "nodes": [{"name": "chat-comet-7d9f-abcde", "grpc": "127.0.0.12:3109",
            "hosts": ["comet-a.example.com"], "addrs": ["203.0.113.7"],
            "tcp_port": 3101, "ws_port": 3102, "wss_port": 3103,
            "weight": 10, "connections": 1532, "client_ips": 1200, "draining": false}]}"#,
        )
        .unwrap();
        assert_eq!(list.generation, 42);
        assert_eq!(list.nodes[0].wss_port, 3103);
        assert_eq!(list.totals(), (1532, 1200));
    }

    #[test]
    fn only_name_is_required() {
        let list = NodeList::parse(br#"{"nodes": [{"name": "c"}]}"#).unwrap();
        assert_eq!(
            list.nodes[0],
            Node {
                name: "c".to_owned(),
                ..Node::default()
            }
        );
        assert!(NodeList::parse(br#"{"nodes": [{"grpc": "x"}]}"#).is_err());
    }

    #[test]
    fn written_with_the_documented_field_names() {
        let json = serde_json::to_value(NodeList {
            generation: 1,
            updated: String::new(),
            nodes: vec![node("c", 1, 5, false)],
            drain: None,
        })
        .unwrap();
        for key in [
            "name",
            "grpc",
            "hosts",
            "addrs",
            "tcp_port",
            "ws_port",
            "wss_port",
            "weight",
            "connections",
            "client_ips",
            "draining",
        ] {
            assert!(json["nodes"][0].get(key).is_some(), "{key}");
        }
        assert_eq!(json["generation"], 1);
    }

    #[test]
    fn pick_skips_draining_and_prefers_less_loaded() {
        let list = NodeList {
            nodes: vec![
                node("a", 10, 900, false),
                node("bb", 10, 100, false),
                node("ccc", 100, 0, true),
            ],
            ..NodeList::default()
        };
        let (web, first) = list.pick("web", DEFAULT_PICKED);
        assert_eq!(web, vec!["bb.example.com", "a.example.com"]);
        assert_eq!(first.unwrap().name, "bb");
        let (native, _) = list.pick("android", DEFAULT_PICKED);
        assert_eq!(native, vec!["10.0.0.2", "10.0.0.1"]);
        assert_eq!(list.totals(), (1000, 500));
    }

    /// Found by the `nodes` fuzz target: connection counts summing past
    /// u64 overflowed in `ranked` (a panic in a debug build, a wrapped and
    /// so wrong ranking in a release one).
    #[test]
    fn connection_counts_past_u64_still_rank() {
        let list = NodeList {
            nodes: vec![
                node("a", 10, 0, false),
                node("bb", 10, u64::MAX, false),
                node("ccc", 10, 10, false),
            ],
            ..NodeList::default()
        };
        let names: Vec<&str> = list.ranked().iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "ccc", "bb"]);
        assert_eq!(list.totals().0, u64::MAX);
    }

    #[test]
    fn empty_and_all_draining_give_empty_lists() {
        assert!(NodeList::default().pick("web", 5).0.is_empty());
        let list = NodeList {
            nodes: vec![node("a", 1, 1, true)],
            ..NodeList::default()
        };
        assert!(list.pick("web", 5).0.is_empty());
    }

    #[test]
    fn count_bounds_the_answer() {
        let list = NodeList {
            nodes: (0..8)
                .map(|i| node(&"x".repeat(i + 1), 1, 0, false))
                .collect(),
            ..NodeList::default()
        };
        assert_eq!(list.pick("web", DEFAULT_PICKED).0.len(), 5);
        assert_eq!(list.pick("web", 2).0.len(), 2);
        assert_eq!(list.pick("web", 100).0.len(), 8);
    }
}
