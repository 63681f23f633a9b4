//! `herald`: parse arguments, start telemetry, run the chosen role.

mod args;
mod budget;
mod reference;
mod standalone;
mod telemetry;

use clap::Parser;

/// mimalloc instead of glibc's malloc: in a connection storm glibc spent a
/// fifth of comet's CPU in its free lists and in growing thread arenas one
/// `mprotect` at a time (`perf record` of `herald bench s4`), and idle
/// connections take a quarter less memory. Built without transparent huge
/// pages (`no_thp`): with them, a third of comet's storm CPU went to the
/// kernel zeroing fresh 2 MiB pages, each fault a pause of its own.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = args::Args::parse();
    telemetry::init(args.log_format);
    args.run()
}
