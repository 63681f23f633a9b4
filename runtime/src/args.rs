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
    #[allow(clippy::expect_used)]
    parse(&[]).expect("every flag has a default")
}

/// `A` parsed from `flags` (no program name) with the environment ignored:
/// what a role's unit tests use, so they see only the flags they pass.
///
/// # Errors
/// clap's error for an unknown flag or a bad value.
pub fn parse<A: clap::FromArgMatches + clap::Args>(flags: &[&str]) -> Result<A, clap::Error> {
    let command =
        A::augment_args(clap::Command::new("herald")).mut_args(|arg| arg.env(None::<&str>));
    let argv = std::iter::once("herald").chain(flags.iter().copied());
    let matches = command.try_get_matches_from(argv)?;
    A::from_arg_matches(&matches)
}

/// Checks `A`'s definitions for conflicts clap would only find at run time
/// (duplicate flags, bad defaults); call it from a unit test.
///
/// # Panics
/// On any inconsistency, naming it.
pub fn assert_consistent<A: clap::Args>() {
    A::augment_args(clap::Command::new("herald")).debug_assert();
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
    fn flags_parse_and_bad_ones_fail() {
        super::assert_consistent::<Flags>();
        let flags: Flags = super::parse(&["--port", "9", "--name", "n"]).unwrap();
        assert_eq!((flags.port, flags.name.as_deref()), (9, Some("n")));
        assert!(super::parse::<Flags>(&["--port", "x"]).is_err());
        assert!(super::parse::<Flags>(&["--nope"]).is_err());
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
            // Captured: the child's own "test result" line must not be
            // counted as a second run by the suite's summary.
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
    }
}
