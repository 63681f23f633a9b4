//! The Events the operator publishes about a PushCluster (`events.k8s.io/v1`).
//!
//! Not kube's `Recorder`: it folds every Event with the same type, reason and
//! action about an object into one series that keeps the first note, so after
//! comets went 1 -> 2 -> 3 `kubectl describe` showed "1 -> 2" twice, and a
//! second drain showed the first drained pod. Here the note is part of what
//! makes an Event the same: the same note again (within [`SERIES_TTL`]) counts
//! in its series, any other note is an Event of its own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use serde_json::json;

/// How long a repeated note still counts in the series of its first Event
/// (kube's `Recorder` uses the same).
const SERIES_TTL: Duration = Duration::from_secs(6 * 60);

/// The apiserver refuses notes over 1 kB.
const MAX_NOTE: usize = 1024;

/// What makes two Events the same.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    namespace: String,
    name: String,
    uid: String,
    warning: bool,
    reason: String,
    note: String,
}

/// An Event created, and how often its note was seen.
#[derive(Clone, Debug)]
struct Sent {
    name: String,
    count: i32,
    last: Timestamp,
}

/// Publishes Events as one reporting controller instance.
pub(super) struct Events {
    client: Client,
    controller: String,
    instance: String,
    /// Short critical sections (no await inside), hence std's Mutex.
    sent: Mutex<HashMap<Key, Sent>>,
}

impl Events {
    pub(super) fn new(client: Client, controller: &str, instance: &str) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.to_owned(),
            sent: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an Event about `regarding`: a new one, or, for a note
    /// published within [`SERIES_TTL`], one more in that Event's series.
    ///
    /// # Errors
    /// The apiserver refusing the create or patch.
    pub(super) async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> kube::Result<()> {
        let note = truncate(note, MAX_NOTE);
        let namespace = regarding.namespace.clone().unwrap_or_default();
        let key = Key {
            namespace: namespace.clone(),
            name: regarding.name.clone().unwrap_or_default(),
            uid: regarding.uid.clone().unwrap_or_default(),
            warning: type_ == EventType::Warning,
            reason: reason.to_owned(),
            note: note.clone(),
        };
        let now = Timestamp::now();
        let repeat = {
            let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
            sent.retain(|_, s| fresh(s.last, now));
            sent.get(&key).cloned()
        };
        let api = Api::<Event>::namespaced(self.client.clone(), &namespace);
        let sent = match repeat {
            Some(mut sent) => {
                sent.count += 1;
                sent.last = now;
                let series = json!({"series": {
                    "count": sent.count,
                    "lastObservedTime": MicroTime(now),
                }});
                api.patch(&sent.name, &PatchParams::default(), &Patch::Merge(&series))
                    .await?;
                sent
            }
            None => {
                let event = Event {
                    metadata: ObjectMeta {
                        name: Some(format!(
                            "{}.{:x}",
                            key.name,
                            now.as_nanosecond().unsigned_abs()
                        )),
                        namespace: Some(namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    event_time: Some(MicroTime(now)),
                    type_: Some(
                        match type_ {
                            EventType::Normal => "Normal",
                            EventType::Warning => "Warning",
                        }
                        .to_owned(),
                    ),
                    reason: Some(reason.to_owned()),
                    action: Some(action.to_owned()),
                    note: Some(note),
                    regarding: Some(regarding.clone()),
                    reporting_controller: Some(self.controller.clone()),
                    reporting_instance: Some(self.instance.clone()),
                    ..Event::default()
                };
                let created = api.create(&PostParams::default(), &event).await?;
                Sent {
                    name: created.metadata.name.unwrap_or_default(),
                    count: 1,
                    last: now,
                }
            }
        };
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, sent);
        Ok(())
    }
}

fn fresh(last: Timestamp, now: Timestamp) -> bool {
    let ttl = i64::try_from(SERIES_TTL.as_secs()).unwrap_or(i64::MAX);
    now.as_second() - last.as_second() < ttl
}

/// `note` cut to at most `max` bytes, on a character boundary.
fn truncate(mut note: String, max: usize) -> String {
    if note.len() > max {
        let mut end = max;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("abc".to_owned(), 1024), "abc");
        assert_eq!(truncate("aé".to_owned(), 2), "a");
        assert_eq!(truncate("x".repeat(2000), MAX_NOTE).len(), MAX_NOTE);
    }

    #[test]
    fn series_last_six_minutes() {
        let now = Timestamp::now();
        let earlier = |secs: i64| now - k8s_openapi::jiff::SignedDuration::from_secs(secs);
        assert!(fresh(earlier(359), now));
        assert!(!fresh(earlier(360), now));
    }
}
