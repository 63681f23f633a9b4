//! One shutdown mechanism for every role.
//!
//! A role's `run(config, listeners, shutdown)` takes any future as its stop
//! signal (tests pass a oneshot, the binary passes [`signal`], `herald
//! standalone` passes a [`Shutdown::wait`]). Inside, [`Shutdown::on`] turns
//! that one future into a token every task can wait on or check, so a role
//! has one stop to fan out instead of a channel per task.

use std::future::Future;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// A stop signal that many tasks wait on; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A signal fired only by [`Shutdown::trigger`].
    pub fn new() -> Self {
        Shutdown::default()
    }

    /// A signal that fires when `stop` completes (or on [`Shutdown::trigger`]).
    ///
    /// # Panics
    /// Outside a Tokio runtime (it spawns the task that awaits `stop`).
    pub fn on(stop: impl Future<Output = ()> + Send + 'static) -> Self {
        let shutdown = Shutdown::new();
        let token = shutdown.token.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop => token.cancel(),
                // Fired by hand: nothing left to wait for.
                () = token.cancelled() => {}
            }
        });
        shutdown
    }

    /// Fires the signal; every waiter wakes. Idempotent.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether the signal has fired.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once the signal has fired; owns what it needs, so it can be
    /// handed to a server's graceful shutdown or another role's `run`.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        self.token.clone().cancelled_owned()
    }

    /// [`Shutdown::wait`] borrowing the signal: cheaper in a `select!` loop
    /// that polls it on every turn.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

/// Completes when the process is asked to stop: Ctrl-C or SIGTERM (what
/// Kubernetes sends before it kills a pod), whichever comes first.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = tokio::signal::ctrl_c();
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            }
        }
        Err(err) => {
            tracing::warn!(cause = %err, "cannot watch SIGTERM; Ctrl-C only");
            let _ = interrupt.await;
        }
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_when_its_future_completes_and_wakes_every_waiter() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::on(async move {
            let _ = rx.await;
        });
        let waiters: Vec<_> = (0..3).map(|_| tokio::spawn(shutdown.wait())).collect();
        tokio::task::yield_now().await;
        assert!(!shutdown.is_triggered());
        tx.send(()).unwrap();
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert!(shutdown.is_triggered());
    }

    #[tokio::test]
    async fn trigger_fires_without_the_future() {
        let shutdown = Shutdown::on(std::future::pending());
        let clone = shutdown.clone();
        clone.trigger();
        shutdown.wait().await;
        assert!(shutdown.is_triggered());
    }
}
