//! What Herald's tests share, in one place. Dev only: every user lists it
//! under `[dev-dependencies]`, so the shipped binary never links it.
//!
//! # Layout
//! - [`process`]: the one way to start `herald` subprocesses
//!   ([`Herald`], [`HeraldProcess`]): logs captured to files, killed by pid
//!   when dropped, waits that fail early when the process exits, SIGTERM
//!   stops.
//! - [`stub`]: the stub `goim.logic.Logic` comet runs against in tests (the
//!   benchmark's own, [`herald_bench::stub`], re-exported: one definition).
//! - [`http`]: a bare HTTP/1.1 client for logic's push API and the
//!   `/metrics` `/healthz` `/readyz` endpoints.
//! - [`expect_silence`]: a [`herald_client::Client`] receives nothing for a
//!   while.
//!
//! Goim clients themselves come from `herald-client`.

pub mod http;
pub mod process;

pub use herald_bench::stub;
pub use process::{Herald, HeraldProcess};

use std::time::Duration;

use herald_client::{Client, Error};

/// Fails if `client` receives anything, or its connection ends, within
/// `quiet`.
///
/// # Errors
/// What arrived, or how the connection failed.
pub async fn expect_silence(client: &mut Client, quiet: Duration) -> anyhow::Result<()> {
    let bound = client.timeout();
    client.set_timeout(Some(quiet));
    let got = client.next_message().await;
    client.set_timeout(bound);
    match got {
        Err(Error::Timeout(_)) => Ok(()),
        Ok(frame) => anyhow::bail!("expected silence for {quiet:?}, got {frame:?}"),
        Err(err) => anyhow::bail!("expected silence for {quiet:?}: {err}"),
    }
}
