//! The node-list document (`herald_protocol::nodes`, §15.4): any bytes; a
//! document that parses writes back to one that parses to the same list,
//! and the balancer's answers keep their promises: ranked and picked nodes
//! never draining, at most `count` addresses each once and all of live
//! nodes, redirect targets never of the draining comet itself.
#![no_main]

use std::collections::HashSet;

use herald_protocol::nodes::NodeList;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&count, json)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 8);
    let Ok(list) = NodeList::parse(json) else {
        return;
    };
    let written = serde_json::to_vec(&list).expect("a node list always serializes");
    assert_eq!(NodeList::parse(&written).ok().as_ref(), Some(&list));

    let live: Vec<_> = list.nodes.iter().filter(|n| !n.draining).collect();
    let ranked = list.ranked();
    assert_eq!(ranked.len(), live.len());
    assert!(ranked.iter().all(|n| !n.draining));

    for platform in ["web", "android"] {
        let (picked, first) = list.pick(platform, count);
        assert!(picked.len() <= count);
        assert_eq!(picked.iter().collect::<HashSet<_>>().len(), picked.len());
        let offered = |n: &&herald_protocol::nodes::Node| {
            if platform == "web" { n.hosts.clone() } else { n.addrs.clone() }
        };
        let all: HashSet<String> = live.iter().flat_map(offered).collect();
        assert!(picked.iter().all(|a| all.contains(a)), "{picked:?}");
        assert_eq!(picked.len(), all.len().min(count));
        assert_eq!(first.is_some(), !live.is_empty());
        assert!(first.is_none_or(|n| !n.draining));
    }

    let own = list.nodes.first().map_or("", |n| n.name.as_str());
    let targets = list.redirect_targets(own, count);
    assert!(targets.len() <= count);
    assert_eq!(targets.iter().collect::<HashSet<_>>().len(), targets.len());
    let others: Vec<_> = live.iter().filter(|n| n.name != own).collect();
    assert!(
        targets
            .iter()
            .all(|t| others.iter().any(|n| n.hosts.contains(t) || n.addrs.contains(t))),
        "{targets:?}"
    );
    let _ = list.totals();
});
