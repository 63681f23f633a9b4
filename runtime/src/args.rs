//! Flag defaults taken from the clap definitions, so each default is written
//! once, on its flag, and a role's `Config::default()` cannot drift from what
//! `herald <role>` starts with.

/// `A` as parsed from an empty command line, ignoring the environment (a
/// test's or a pod's `HERALD_*` variables must not leak into defaults).
///
/// # Panics
/// When `A` has a required argument: a programming error, caught by the
/// role's own unit test of its defaults.
pub fn defaults<A: clap::FromArgMatches + clap::Args>() -> A {
    let command =
        A::augment_args(clap::Command::new("defaults")).mut_args(|arg| arg.env(None::<&str>));
    let matches = command.get_matches_from(["defaults"]);
    #[allow(clippy::expect_used)]
    A::from_arg_matches(&matches).expect("every flag has a default")
}

#[cfg(test)]
mod tests {
    #[derive(Debug, clap::Args)]
    struct Flags {
        #[arg(long, env = "HERALD_RUNTIME_TEST_PORT", default_value_t = 3101)]
        port: u16,
        #[arg(long)]
        name: Option<String>,
    }

    #[test]
    fn defaults_come_from_the_flags() {
        let flags: Flags = super::defaults();
        assert_eq!(flags.port, 3101);
        assert!(flags.name.is_none());
    }

    /// Runs this test binary again with the flag's variable set to something
    /// that is no port: the child's `defaults()` must still say 3101.
    #[test]
    fn defaults_ignore_the_environment() {
        if std::env::var_os("HERALD_RUNTIME_TEST_CHILD").is_some() {
            let flags: Flags = super::defaults();
            assert_eq!(flags.port, 3101);
            return;
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "args::tests::defaults_ignore_the_environment"])
            .env("HERALD_RUNTIME_TEST_CHILD", "1")
            .env("HERALD_RUNTIME_TEST_PORT", "not-a-port")
            .status()
            .unwrap();
        assert!(status.success());
    }
}
