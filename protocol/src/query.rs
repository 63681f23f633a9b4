//! The query string of logic's HTTP API (§7): `application/x-www-form-urlencoded`
//! pairs where a list is the same key repeated (`keys=a&keys=b`).
//!
//! It lives here, beside the other formats a peer controls, rather than in
//! logic's HTTP handlers: it is pure (no sockets, no state) and is fuzzed
//! (`protocol/fuzz`, target `query`) without building logic's Kafka and
//! Redis clients. serde's query deserializer cannot collect repeated keys,
//! hence this parser.

use std::collections::HashMap;

/// Why a parameter was refused; logic answers each with 400 and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// More values of a list parameter than allowed.
    #[error("too many {name}: {count} > {max}")]
    TooMany {
        /// The parameter.
        name: String,
        /// Its non-empty values.
        count: usize,
        /// The most allowed.
        max: usize,
    },
    /// A value that does not parse as the number it must be.
    #[error("{name} is not a valid number: {value:?}")]
    NotANumber {
        /// The parameter.
        name: String,
        /// The value as given.
        value: String,
    },
    /// A required parameter is missing or empty.
    #[error("{0} is required")]
    Required(String),
    /// `operation` is missing or zero where an op is needed.
    #[error("operation is required and non-zero")]
    NoOperation,
    /// `operation` is one no client may be sent ([`crate::op::is_reserved`]).
    #[error("operation {0} is reserved (10, 11 and 18-31 are never pushed)")]
    ReservedOp(i32),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The parameters of one query string, every value of a key kept in order.
/// An empty value counts as absent everywhere (`keys=&keys=a` is `["a"]`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params(HashMap<String, Vec<String>>);

impl Params {
    /// Splits and percent-decodes `raw` (the part after `?`); `None` is no
    /// query at all. Never fails: undecodable bytes become U+FFFD, as
    /// `form_urlencoded` does.
    pub fn parse(raw: Option<&str>) -> Self {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        if let Some(raw) = raw {
            for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
                map.entry(k.into_owned()).or_default().push(v.into_owned());
            }
        }
        Params(map)
    }

    /// Every value given for `name`, empty ones included, in query order.
    pub fn all(&self, name: &str) -> &[String] {
        self.0.get(name).map_or(&[], Vec::as_slice)
    }

    /// The first non-empty value.
    pub fn one(&self, name: &str) -> Option<&str> {
        self.all(name)
            .iter()
            .find(|s| !s.is_empty())
            .map(String::as_str)
    }

    /// All non-empty values, at most `max`.
    ///
    /// # Errors
    /// [`Error::TooMany`] past `max`.
    pub fn list(&self, name: &str, max: usize) -> Result<Vec<String>> {
        let values: Vec<String> = self
            .all(name)
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        if values.len() > max {
            return Err(Error::TooMany {
                name: name.to_owned(),
                count: values.len(),
                max,
            });
        }
        Ok(values)
    }

    /// A number; missing → `None`.
    ///
    /// # Errors
    /// [`Error::NotANumber`] when the first non-empty value does not parse.
    pub fn num<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>> {
        self.one(name)
            .map(|s| {
                s.parse::<T>().map_err(|_| Error::NotANumber {
                    name: name.to_owned(),
                    value: s.to_owned(),
                })
            })
            .transpose()
    }

    /// The first non-empty value of a parameter that must be there.
    ///
    /// # Errors
    /// [`Error::Required`] when it is missing or empty.
    pub fn required(&self, name: &str) -> Result<&str> {
        self.one(name)
            .ok_or_else(|| Error::Required(name.to_owned()))
    }

    /// `operation` of a key or mid push: missing is 0, as in goim.
    ///
    /// # Errors
    /// [`Error::NotANumber`], or [`Error::ReservedOp`] for an op no client
    /// may be sent.
    pub fn op(&self) -> Result<i32> {
        let op = self.num::<i32>("operation")?.unwrap_or(0);
        if crate::op::is_reserved(op) {
            return Err(Error::ReservedOp(op));
        }
        Ok(op)
    }

    /// `operation`, which must be there and non-zero (room and broadcast
    /// pushes).
    ///
    /// # Errors
    /// As [`Params::op`], and [`Error::NoOperation`] when missing or 0.
    pub fn nonzero_op(&self) -> Result<i32> {
        match self.op()? {
            0 => Err(Error::NoOperation),
            op => Ok(op),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_query_keys_collect() {
        let p = Params::parse(Some("keys=a&keys=b%20c&keys=&operation=5"));
        assert_eq!(p.list("keys", 10).unwrap(), vec!["a", "b c"]);
        assert_eq!(p.all("keys"), ["a", "b c", ""]);
        assert_eq!(
            p.list("keys", 1).unwrap_err().to_string(),
            "too many keys: 2 > 1"
        );
        assert_eq!(p.num::<i32>("operation").unwrap(), Some(5));
        assert_eq!(
            Params::parse(Some("operation=x"))
                .num::<i32>("operation")
                .unwrap_err()
                .to_string(),
            r#"operation is not a valid number: "x""#
        );
        assert_eq!(Params::parse(None).nonzero_op(), Err(Error::NoOperation));
        assert_eq!(Params::parse(None).op(), Ok(0));
        assert_eq!(
            Params::parse(Some("operation=18")).op(),
            Err(Error::ReservedOp(18))
        );
        assert_eq!(
            Params::parse(Some("operation=0")).nonzero_op(),
            Err(Error::NoOperation)
        );
        assert_eq!(
            Params::parse(Some("type="))
                .required("type")
                .unwrap_err()
                .to_string(),
            "type is required"
        );
    }
}
