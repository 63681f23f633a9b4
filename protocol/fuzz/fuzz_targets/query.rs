//! The query string of logic's HTTP API (`herald_protocol::query`): any
//! bytes parse, every decoded pair is kept in order, re-encoding the pairs
//! parses to the same parameters, and the typed getters keep their
//! promises (lists within their maximum and without empty values, ops
//! never reserved, `nonzero_op` never 0).
#![no_main]

use herald_protocol::op;
use herald_protocol::query::{Error, Params};
use libfuzzer_sys::fuzz_target;

/// The names logic's handlers read.
const NAMES: [&str; 9] = [
    "keys",
    "mids",
    "rooms",
    "operation",
    "type",
    "room",
    "speed",
    "limit",
    "platform",
];

fuzz_target!(|data: &[u8]| {
    let Some((&max, raw)) = data.split_first() else {
        return;
    };
    let max = usize::from(max % 8);
    let raw = String::from_utf8_lossy(raw);
    let params = Params::parse(Some(&raw));
    assert_eq!(Params::parse(None), Params::default());

    // Every pair, in order, under its name.
    let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (k, v) in &pairs {
        let i = seen.entry(k).or_default();
        assert_eq!(params.all(k).get(*i), Some(v), "{k}");
        *i += 1;
    }
    for (k, n) in &seen {
        assert_eq!(params.all(k).len(), *n);
    }

    // Re-encoded, the pairs read back the same.
    let encoded = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&pairs)
        .finish();
    assert_eq!(Params::parse(Some(&encoded)), params, "{encoded:?}");

    let names = NAMES.iter().copied().chain(pairs.iter().map(|(k, _)| k.as_str()));
    for name in names {
        let non_empty: Vec<&String> = params.all(name).iter().filter(|v| !v.is_empty()).collect();
        assert_eq!(params.one(name), non_empty.first().map(|s| s.as_str()));
        match params.list(name, max) {
            Ok(list) => {
                assert!(list.len() <= max);
                assert_eq!(list.iter().collect::<Vec<_>>(), non_empty);
            }
            Err(Error::TooMany { count, max: m, .. }) => {
                assert!(count > max && m == max && count == non_empty.len());
            }
            Err(other) => panic!("list: {other}"),
        }
        match params.required(name) {
            Ok(v) => assert!(!v.is_empty()),
            Err(e) => assert_eq!(e, Error::Required(name.to_owned())),
        }
        if let Ok(Some(n)) = params.num::<i64>(name) {
            assert_eq!(params.one(name).map(str::parse::<i64>), Some(Ok(n)));
        }
    }
    match params.op() {
        Ok(o) => assert!(!op::is_reserved(o)),
        Err(Error::ReservedOp(o)) => assert!(op::is_reserved(o)),
        Err(Error::NotANumber { .. }) => {}
        Err(other) => panic!("op: {other}"),
    }
    match params.nonzero_op() {
        Ok(o) => assert!(o != 0 && !op::is_reserved(o)),
        Err(Error::NoOperation | Error::ReservedOp(_) | Error::NotANumber { .. }) => {}
        Err(other) => panic!("nonzero_op: {other}"),
    }
});
