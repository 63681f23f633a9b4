//! docs/configuration.md is exactly what `herald config-reference` prints
//! from the flag definitions: a new, renamed or re-defaulted flag fails here
//! until the reference is regenerated.

#[test]
fn the_flag_reference_is_current() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("config-reference")
        .env_clear()
        .output()
        .expect("herald runs");
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).expect("UTF-8");
    for role in ["standalone", "comet", "logic", "job", "operator", "bench"] {
        assert!(generated.contains(&format!("## `herald {role}`")), "{role}");
    }
    assert!(generated.contains("`--node-domain` | `HERALD_NODE_DOMAIN`"));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/configuration.md is out of date: regenerate it with\n  \
         cargo run -q -p herald -- config-reference > docs/configuration.md"
    );
}
