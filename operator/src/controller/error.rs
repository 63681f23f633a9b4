//! What a failed reconcile step is ([`Error`], labelled for metrics and
//! Events) and the error policy: how soon the controller looks again.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use tracing::warn;

use super::Context;
use crate::build;
use crate::crd::PushCluster;

/// A reconcile step that failed; named for metrics and Events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building children failed (a bug).
    #[error("building children")]
    Build(#[from] build::Error),
    /// Reading from the apiserver failed.
    #[error("reading {what}")]
    Fetch {
        /// What was read.
        what: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Writing to the apiserver failed.
    #[error("writing {what}")]
    Apply {
        /// What was written.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Serialising the node list or status failed (a bug).
    #[error("encoding")]
    Encode(#[from] serde_json::Error),
    /// `--service-addresses=cluster-ip`, but the Service has no ClusterIP.
    #[error("Service {0} has no ClusterIP")]
    NoClusterIp(String),
    /// The gRPC-token Secret holds something a header cannot carry (edited
    /// by hand).
    #[error("Secret {0} holds no usable gRPC token")]
    GrpcToken(String, #[source] herald_runtime::grpc_auth::Error),
}

impl Error {
    /// Low-cardinality label for the error counter.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Build(_) => "build",
            Self::Fetch { .. } => "fetch",
            Self::Apply { .. } => "apply",
            Self::Encode(_) => "encode",
            Self::NoClusterIp(_) => "no_cluster_ip",
            Self::GrpcToken(..) => "grpc_token",
        }
    }
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(super) fn error_policy(cluster: Arc<PushCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(cluster = %cluster.name_any(), cause = %error, kind = error.label(), "reconcile failed");
    ctx.metrics.reconcile_error(error.label());
    // Transient (apiserver, network): look again soon; the controller's own
    // backoff stretches this when the same object keeps failing.
    Action::requeue(Duration::from_secs(5))
}
