//! Command-line arguments: one subcommand per role.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;
use herald_runtime::shutdown::signal;

/// Herald: a goim-compatible push server and its Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "herald", version, about, long_about = None, propagate_version = true)]
pub(crate) struct Args {
    /// Log line format on stderr (filter with RUST_LOG, default "info").
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "HERALD_LOG_FORMAT"
    )]
    pub(crate) log_format: LogFormat,

    /// Parse and check the role's settings (flags and `HERALD_*` variables),
    /// print them and exit: 0 when the role would start, 2 when not.
    #[arg(long, global = true)]
    check_config: bool,

    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Comet, logic and job in one process with in-memory state: no Redis,
    /// Kafka or cluster needed. The first thing to run.
    Standalone(Box<crate::standalone::Args>),
    /// Hold client connections (TCP 3101, WebSocket 3102, WSS 3103) and
    /// deliver pushes received over gRPC (3109).
    Comet(Box<herald_comet::Args>),
    /// Serve the HTTP push API (3111) and goim.logic gRPC (3119); route via
    /// Redis and write push records to Kafka.
    Logic(Box<herald_logic::Args>),
    /// Consume push records from Kafka and deliver them to comets over gRPC.
    Job(Box<herald_job::Args>),
    /// Reconcile PushCluster resources in a Kubernetes cluster.
    Operator(Box<herald_operator::Args>),
    /// Print the PushCluster CustomResourceDefinition as YAML.
    Crdgen,
    /// Print the flag reference (docs/configuration.md) as markdown.
    #[command(hide = true)]
    ConfigReference,
    /// Benchmark a comet (started by the tool) against its targets and the
    /// kernel floor; prints figures, writes JSON and markdown.
    Bench(Box<herald_bench::Args>),
    /// Check a deployed cluster end to end: a goim client on a comet receives
    /// a push to its member id and one to its room, sent through logic's HTTP
    /// API. Exit status 0 when both arrived (the chart's `helm test`).
    Probe(Box<herald_bench::probe::Args>),
}

impl Args {
    /// Runs the chosen role to completion and returns the process status.
    pub(crate) fn run(self) -> ExitCode {
        let Args {
            log_format: _,
            check_config,
            role,
        } = self;
        if check_config {
            return role.check_config();
        }
        match role {
            Role::Comet(args) => serve("comet", comet(*args)),
            Role::Logic(args) => serve("logic", logic(*args)),
            Role::Job(args) => serve("job", job(*args)),
            Role::Standalone(args) => serve("standalone", crate::standalone::run(*args, signal())),
            Role::Operator(args) => serve("operator", operator(*args)),
            Role::Crdgen => crdgen(),
            Role::ConfigReference => {
                print!("{}", crate::reference::markdown());
                ExitCode::SUCCESS
            }
            Role::Bench(args) => bench(*args),
            Role::Probe(args) => probe(*args),
        }
    }
}

impl Role {
    /// `--check-config`: what the role would run with, or why it would not
    /// start. The operator's tests run every command line it generates
    /// through this, so a flag or variable the role does not know fails there.
    fn check_config(self) -> ExitCode {
        let checked: Result<String, String> = match self {
            Role::Comet(args) => {
                let listeners = format!("{args:#?}");
                Ok(format!("{listeners}\n{:#?}", args.config()))
            }
            Role::Logic(args) => args
                .into_config()
                .map(|c| format!("{c:#?}"))
                .map_err(|e| e.to_string()),
            Role::Job(args) => args
                .into_config()
                .map(|c| format!("{c:#?}"))
                .map_err(|e| e.to_string()),
            Role::Operator(args) => Ok(format!("{:#?}", args.into_config())),
            Role::Standalone(args) => Ok(format!("{args:#?}")),
            Role::Bench(args) => Ok(format!("{args:#?}")),
            Role::Probe(args) => Ok(format!("{args:#?}")),
            Role::Crdgen | Role::ConfigReference => Ok("no settings".to_owned()),
        };
        match checked {
            Ok(shown) => {
                println!("{shown}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("herald: invalid configuration: {err}");
                ExitCode::from(2)
            }
        }
    }
}

async fn operator(args: herald_operator::Args) -> anyhow::Result<()> {
    let config = args.into_config();
    let listeners = herald_operator::Listeners::bind(config.metrics_addr).await?;
    herald_operator::run(config, listeners, signal()).await?;
    Ok(())
}

/// Prints the PushCluster CRD; `crds/pushcluster.yaml` is this output.
fn crdgen() -> ExitCode {
    match herald_operator::crd::crd_yaml() {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("herald crdgen: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn comet(args: herald_comet::Args) -> anyhow::Result<()> {
    let listeners = args.bind().await?;
    herald_comet::run(args.config(), listeners, signal()).await?;
    Ok(())
}

async fn logic(args: herald_logic::Args) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let listeners = herald_logic::Listeners::bind(&config).await?;
    herald_logic::run(config, listeners, signal()).await?;
    Ok(())
}

async fn job(args: herald_job::Args) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let listeners = herald_job::Listeners::bind(config.http_addr).await?;
    herald_job::run(config, listeners, signal()).await?;
    Ok(())
}

/// The benchmark builds its own single-threaded runtime: its generator is
/// meant to use exactly one core.
fn bench(args: herald_bench::Args) -> ExitCode {
    match herald_bench::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let cause = herald_runtime::error_chain(&err);
            tracing::error!(cause, "benchmark failed");
            eprintln!("herald bench: {cause}");
            ExitCode::FAILURE
        }
    }
}

/// `herald probe`: prints what it measured, or why it failed (exit 1).
fn probe(args: herald_bench::probe::Args) -> ExitCode {
    let (comet, logic) = (args.comet.clone(), args.logic.clone());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("herald probe: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(herald_bench::probe::run(args)) {
        Ok(report) => {
            println!(
                "herald probe: ok: a client on comet {comet} received a member-id push in {:?} and a room push in {:?}, both sent through logic {logic}",
                report.mid_push, report.room_push
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            let cause = herald_runtime::error_chain(&err);
            eprintln!("herald probe: FAILED: {cause}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a role's future on a multi-threaded runtime; a failure is logged with
/// its causes and turns into exit status 1.
///
/// The future runs as a task on the runtime's workers, not on the main
/// thread that `block_on` parks: job's consume loop lives in it, and on the
/// main thread every record would cross to a worker and back (two thread
/// wake-ups per push when the process is pinned to one core).
fn serve(
    role: &str,
    future: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(role, cause = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let task = runtime.spawn(future);
    let outcome = runtime
        .block_on(task)
        .unwrap_or_else(|err| Err(anyhow::anyhow!("the {role} task ended abnormally: {err}")));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(role, cause = format!("{err:#}"), "stopped with an error");
            ExitCode::FAILURE
        }
    }
}
