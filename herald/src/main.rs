//! `herald`: parse arguments, start telemetry, run the chosen role.

mod args;
mod signal;
mod standalone;
mod telemetry;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = args::Args::parse();
    telemetry::init(args.log_format);
    args.run()
}
