//! `herald operator`'s flags ([`Args`]) and the [`Config`] they become.

use std::net::SocketAddr;
use std::time::Duration;

use herald_runtime::contract;

use crate::ServiceAddresses;

/// `herald operator` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Namespaces whose PushClusters are reconciled (repeat or comma-separate);
    /// none means every namespace.
    #[arg(
        long = "namespace",
        env = "HERALD_OPERATOR_NAMESPACES",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// HTTP listener for `/metrics` and `/healthz`.
    #[arg(
        long,
        env = "HERALD_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:3180"
    )]
    pub metrics_addr: SocketAddr,
    /// Name of the coordination.k8s.io Lease that elects the acting replica.
    #[arg(
        long,
        env = "HERALD_OPERATOR_LEASE_NAME",
        default_value = "herald-operator"
    )]
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = contract::POD_NAMESPACE, default_value = "default")]
    pub lease_namespace: String,
    /// Lease holder identity; defaults to the pod name, else a random one.
    #[arg(long, env = contract::POD_NAME)]
    pub identity: Option<String>,
    /// Lease duration in seconds: how long a dead leader blocks a successor.
    #[arg(long, env = "HERALD_OPERATOR_LEASE_SECS", default_value_t = 15)]
    pub lease_secs: u64,
    /// How often each PushCluster's comets are polled for load, in milliseconds.
    #[arg(long, env = "HERALD_OPERATOR_POLL_MS", default_value_t = 5000)]
    pub poll_interval_ms: u64,
    /// How comet pods are given the logic Service's address: `dns` (its
    /// name) or `cluster-ip` (for clusters without DNS for pods).
    #[arg(
        long,
        env = "HERALD_OPERATOR_SERVICE_ADDRESSES",
        value_enum,
        default_value_t = ServiceAddresses::Dns
    )]
    pub service_addresses: ServiceAddresses,
}

/// Runtime settings of [`crate::run`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespaces watched; empty = all.
    pub namespaces: Vec<String>,
    /// Lease name.
    pub lease_name: String,
    /// Lease namespace.
    pub lease_namespace: String,
    /// Holder identity.
    pub identity: String,
    /// Lease duration.
    pub lease_secs: u64,
    /// Load poll interval.
    pub poll_interval: Duration,
    /// How pods are told Service addresses.
    pub service_addresses: ServiceAddresses,
    /// Where `/metrics`, `/healthz` and `/readyz` listen (used by
    /// [`crate::Listeners::bind`]).
    pub metrics_addr: SocketAddr,
}

impl Args {
    /// The run settings these flags say; a missing identity becomes a
    /// random one.
    pub fn into_config(self) -> Config {
        // Destructured so that a new flag cannot be silently ignored.
        let Args {
            namespaces,
            metrics_addr,
            lease_name,
            lease_namespace,
            identity,
            lease_secs,
            poll_interval_ms,
            service_addresses,
        } = self;
        let identity =
            identity.unwrap_or_else(|| format!("herald-operator-{:016x}", rand::random::<u64>()));
        Config {
            namespaces,
            lease_name,
            lease_namespace,
            identity,
            lease_secs,
            poll_interval: Duration::from_millis(poll_interval_ms),
            service_addresses,
            metrics_addr,
        }
    }
}
