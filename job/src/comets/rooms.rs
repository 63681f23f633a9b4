//! Which comets a room push may skip: each comet's rooms as its last
//! `Rooms` polls saw them ([`RoomView`]) and the poller that keeps that view.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_protocol::pb::CometClient;
use herald_protocol::pb::goim::comet::RoomsReq;
use herald_runtime::grpc_auth::AuthChannel;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// One comet's rooms as seen by its last `Rooms` polls.
///
/// # The race, and which side we err on
/// A client may join a room on a comet right after a poll that found the
/// room empty there; a room push sent before the next poll would skip that
/// comet and the client would miss it. That cannot be closed from job's
/// side without the comet telling it of every join, so a comet is skipped
/// only when all of these hold, and is sent to otherwise:
/// - its last poll succeeded and is at most two intervals old (a failing,
///   slow or never-answered comet always gets the push);
/// - its rooms set did not change in the last two intervals (a comet whose
///   rooms are moving is likely gaining members);
/// - the room is not in that set.
///
/// What remains: a client joining a room on a comet whose rooms set was
/// stable may miss room pushes for up to one poll interval after it joined.
#[derive(Debug, Default)]
pub(super) struct RoomView {
    last: Option<(HashSet<String>, Instant)>,
    changed: Option<Instant>,
}

impl RoomView {
    fn update(&mut self, answer: Option<HashSet<String>>, now: Instant) {
        match answer {
            None => self.last = None,
            Some(rooms) => {
                // A first answer (or one after failures) counts as a change:
                // skipping starts only once a comet's rooms have held still.
                if self.last.as_ref().is_none_or(|(old, _)| *old != rooms) {
                    self.changed = Some(now);
                }
                self.last = Some((rooms, now));
            }
        }
    }

    pub(super) fn skips(&self, room: &str, every: Duration, now: Instant) -> bool {
        let Some((rooms, at)) = &self.last else {
            return false;
        };
        let recent = |t: Instant| now.saturating_duration_since(t) <= every * 2;
        recent(*at) && !self.changed.is_some_and(recent) && !rooms.contains(room)
    }
}

/// Asks a comet for its rooms every `every` until `stop`; a failed answer
/// makes the view unknown (room pushes go to this comet).
pub(super) async fn poll_rooms(
    mut client: CometClient<AuthChannel>,
    view: Arc<Mutex<RoomView>>,
    every: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            answer = tokio::time::timeout(timeout, client.rooms(RoomsReq {})) => answer,
        };
        let rooms = match answer {
            Ok(Ok(reply)) => Some(
                reply
                    .into_inner()
                    .rooms
                    .into_iter()
                    .filter_map(|(room, member)| member.then_some(room))
                    .collect(),
            ),
            Ok(Err(status)) => {
                debug!(code = ?status.code(), cause = status.message(), "Rooms failed");
                None
            }
            Err(_) => {
                debug!("Rooms timed out");
                None
            }
        };
        let mut view = match view.lock() {
            Ok(view) => view,
            Err(poisoned) => poisoned.into_inner(),
        };
        view.update(rooms, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rooms(names: &[&str]) -> Option<HashSet<String>> {
        Some(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn room_view_skips_only_fresh_stable_answers_lacking_the_room() {
        let every = Duration::from_secs(1);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut view = RoomView::default();
        assert!(!view.skips("a", every, t0), "never answered: send");

        view.update(rooms(&["a"]), t0);
        assert!(
            !view.skips("b", every, at(500)),
            "a first answer counts as a change"
        );
        view.update(rooms(&["a"]), at(1000));
        view.update(rooms(&["a"]), at(2000));
        assert!(view.skips("b", every, at(2100)), "stable, fresh, lacks b");
        assert!(!view.skips("a", every, at(2100)), "has members in a");
        assert!(
            !view.skips("b", every, at(4500)),
            "poll older than 2 intervals"
        );

        view.update(rooms(&["a", "c"]), at(3000));
        assert!(!view.skips("b", every, at(3100)), "rooms just changed");
        assert!(
            !view.skips("b", every, at(4900)),
            "changed < 2 intervals ago"
        );
        view.update(rooms(&["a", "c"]), at(4000));
        view.update(rooms(&["a", "c"]), at(5000));
        assert!(view.skips("b", every, at(5100)), "stable again");

        view.update(None, at(6000));
        assert!(!view.skips("b", every, at(6100)), "failed poll: unknown");
        view.update(rooms(&["a", "c"]), at(7000));
        assert!(!view.skips("b", every, at(7100)), "back after a failure");
    }
}
