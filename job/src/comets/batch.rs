//! Room batching: how the calls a worker gathered are cut into batches
//! within the frame and byte caps, in order.

use super::CallSettings;

/// Splits one room's frames, or a run of pushes, into batches within the
/// frame and byte caps (`size` gives an item's frame bytes), in order; a
/// single item above the byte cap goes alone.
pub(super) fn batches<T>(
    items: Vec<T>,
    settings: &CallSettings,
    size: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut current: Vec<T> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let len = size(&item);
        let full = current.len() >= settings.batch_frames.max(1)
            || (!current.is_empty() && bytes + len > settings.batch_bytes);
        if full {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += len;
        current.push(item);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::sync::oneshot;

    use super::super::queue::Done;
    use super::super::worker::RoomFrames;
    use super::*;

    fn settings(frames: usize, bytes: usize) -> CallSettings {
        CallSettings {
            timeout: Duration::from_secs(1),
            attempts: 1,
            backoff: Duration::from_millis(1),
            backoff_max: Duration::from_millis(1),
            batch_frames: frames,
            batch_bytes: bytes,
            max_queued: 100,
        }
    }

    fn frames(sizes: &[usize]) -> RoomFrames {
        sizes
            .iter()
            .map(|&n| {
                let done = Done::new(oneshot::channel().0, Arc::new(AtomicUsize::new(1)));
                (Bytes::from(vec![n as u8; n]), done)
            })
            .collect()
    }

    fn shape(batches: &[RoomFrames]) -> Vec<Vec<usize>> {
        batches
            .iter()
            .map(|b| b.iter().map(|(f, _)| f.len()).collect())
            .collect()
    }

    #[test]
    fn batches_respect_frame_cap_and_keep_order() {
        let out = batches(frames(&[1, 2, 3, 4, 5]), &settings(2, 1000), |(f, _)| {
            f.len()
        });
        assert_eq!(shape(&out), vec![vec![1, 2], vec![3, 4], vec![5]]);
    }

    #[test]
    fn batches_respect_byte_cap_and_pass_oversized_frames_alone() {
        let out = batches(frames(&[10, 10, 10, 50, 5]), &settings(20, 25), |(f, _)| {
            f.len()
        });
        assert_eq!(shape(&out), vec![vec![10, 10], vec![10], vec![50], vec![5]]);
    }
}
