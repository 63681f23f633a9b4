//! A soak window's losses: every message, push or connection owed and
//! missing, with its reason, and whether that reason explains it.

use std::collections::BTreeMap;

use super::{CLIENT, Churn, SLOW_CLOSE_WAIT, SLOW_CONSUMER};
use crate::inject::Injected;

/// Messages (or pushes, or clients) owed and not delivered, with why.
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct Loss {
    pub(super) window: usize,
    /// What went missing: "messages", "pushes", "connections".
    pub(super) unit: &'static str,
    pub(super) count: u64,
    pub(super) to: String,
    pub(super) reason: String,
    pub(super) explained: bool,
}

/// What one window's losses are worked out from.
pub(super) struct Accounting<'a> {
    pub(super) window: usize,
    pub(super) expected: u64,
    pub(super) delivered: u64,
    /// Reading clients whose connection ended during the window.
    pub(super) active_closed: u64,
    /// Sequence gaps at reading clients.
    pub(super) gaps: u64,
    pub(super) injected: Vec<Injected>,
    pub(super) readers: u64,
    /// Slow readers that could not connect.
    pub(super) slow_failed: u64,
    pub(super) slow_pushes: u64,
    pub(super) closes: &'a BTreeMap<String, u64>,
    pub(super) churn: &'a Churn,
}

/// Every loss of a window, explained or not.
pub(super) fn losses(a: &Accounting<'_>) -> Vec<Loss> {
    let mut out = Vec::new();
    let loss = |unit, count, to: &str, reason: String, explained| Loss {
        window: a.window,
        unit,
        count,
        to: to.to_owned(),
        reason,
        explained,
    };
    let slow_closed = a.closes.get(SLOW_CONSUMER).copied().unwrap_or(0);
    // Slow readers never read: everything pushed to their room is owed to
    // them and missing. Explained for the ones comet closed as slow
    // consumers (all of them, unless a reading client was closed so too).
    if a.readers > 0 && a.slow_pushes > 0 {
        let closed = slow_closed.min(a.readers);
        if closed > 0 {
            out.push(loss(
                "messages",
                a.slow_pushes * closed,
                &format!("{closed} slow readers"),
                "slow reader closed as slow_consumer".to_owned(),
                true,
            ));
        }
        if a.readers > closed {
            let open = a.readers - closed;
            out.push(loss(
                "messages",
                a.slow_pushes * open,
                &format!("{open} slow readers"),
                format!(
                    "slow reader not closed by comet within {SLOW_CLOSE_WAIT:?} of the window's end"
                ),
                false,
            ));
        }
    }
    // Closes comet made for any reason but a client's own close or a slow
    // reader (more slow_consumer closes than slow readers hit reading clients).
    let mut other_closes: Vec<String> = a
        .closes
        .iter()
        .filter(|(reason, _)| *reason != CLIENT && *reason != SLOW_CONSUMER)
        .map(|(reason, n)| format!("{n} {reason}"))
        .collect();
    if slow_closed > a.readers {
        other_closes.push(format!(
            "{} slow_consumer beyond the slow readers",
            slow_closed - a.readers
        ));
    }
    let shortfall = a.expected.saturating_sub(a.delivered);
    if shortfall > 0 {
        let why = if !other_closes.is_empty() {
            format!("comet closed clients: {}", other_closes.join(", "))
        } else if a.active_closed > 0 {
            format!("{} reading clients' connections ended", a.active_closed)
        } else if a.gaps > 0 {
            format!("{} sequence gaps at reading clients", a.gaps)
        } else {
            "not delivered; no close or gap seen".to_owned()
        };
        out.push(loss("messages", shortfall, "reading clients", why, false));
    } else if !other_closes.is_empty() || a.active_closed > 0 {
        out.push(loss(
            "connections",
            a.active_closed.max(1),
            "reading clients",
            format!(
                "closed ({}) though every message arrived",
                if other_closes.is_empty() {
                    "by the server".to_owned()
                } else {
                    other_closes.join(", ")
                }
            ),
            false,
        ));
    }
    let refused: u64 = a.injected.iter().map(|i| i.errors).sum();
    if refused > 0 {
        let first = a.injected.iter().find_map(|i| i.first_error.clone());
        out.push(loss(
            "pushes",
            refused,
            "rooms and keys",
            format!("push refused: {}", first.unwrap_or_default()),
            false,
        ));
    }
    let skipped: u64 = a.injected.iter().map(|i| i.skipped).sum();
    if skipped > 0 {
        out.push(loss(
            "pushes",
            skipped,
            "rooms and keys",
            "not sent: too many calls in flight".to_owned(),
            false,
        ));
    }
    if a.slow_failed > 0 {
        out.push(loss(
            "connections",
            a.slow_failed,
            "slow readers",
            "could not connect".to_owned(),
            false,
        ));
    }
    if a.churn.failed > 0 {
        out.push(loss(
            "connections",
            a.churn.failed,
            "churn clients",
            format!(
                "could not connect: {}",
                a.churn.first_error.clone().unwrap_or_default()
            ),
            false,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounting<'a>(
        expected: u64,
        delivered: u64,
        closes: &'a BTreeMap<String, u64>,
        churn: &'a Churn,
    ) -> Accounting<'a> {
        Accounting {
            window: 1,
            expected,
            delivered,
            active_closed: 0,
            gaps: 0,
            injected: Vec::new(),
            readers: 5,
            slow_failed: 0,
            slow_pushes: 100,
            closes,
            churn,
        }
    }

    fn closes(list: &[(&str, u64)]) -> BTreeMap<String, u64> {
        list.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect()
    }

    #[test]
    fn slow_readers_closed_as_slow_consumers_are_the_only_explained_loss() {
        let churn = Churn::default();
        let all_closed = closes(&[("slow_consumer", 5), ("client", 50)]);
        let lost = losses(&accounting(1_000, 1_000, &all_closed, &churn));
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].explained);
        assert_eq!(lost[0].count, 500, "100 pushes owed to each of 5 readers");

        // Two readers left open, and a shortfall at the reading clients.
        let three = closes(&[("slow_consumer", 3)]);
        let lost = losses(&accounting(1_000, 990, &three, &churn));
        let unexplained: u64 = lost.iter().filter(|l| !l.explained).map(|l| l.count).sum();
        assert_eq!(unexplained, 200 + 10, "{lost:?}");

        // A reading client closed for another reason, nothing missing yet.
        let idle = closes(&[("slow_consumer", 5), ("idle", 1)]);
        let lost = losses(&accounting(1_000, 1_000, &idle, &churn));
        assert!(
            lost.iter()
                .any(|l| !l.explained && l.reason.contains("1 idle")),
            "{lost:?}"
        );
    }

    #[test]
    fn refused_pushes_and_failed_connects_are_unexplained() {
        let churn = Churn {
            failed: 2,
            ..Churn::default()
        };
        let slow = closes(&[("slow_consumer", 5)]);
        let mut a = accounting(10, 10, &slow, &churn);
        a.injected = vec![Injected {
            offered_rate: 1.0,
            scheduled: 3,
            ok: 1,
            errors: 2,
            skipped: 0,
            first_error: Some("503".to_owned()),
            seconds: 1.0,
            started: None,
            rpc_latency: None,
        }];
        let lost = losses(&a);
        let units: Vec<_> = lost
            .iter()
            .filter(|l| !l.explained)
            .map(|l| (l.unit, l.count))
            .collect();
        assert_eq!(units, [("pushes", 2), ("connections", 2)], "{lost:?}");
    }
}
