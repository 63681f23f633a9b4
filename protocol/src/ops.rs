//! The body of subscribe (op 14) and unsubscribe (op 16): decimal i32 values
//! joined by `,` (§5.2). On any parse error the caller changes
//! nothing, so parsing is all-or-nothing.

/// Why an op list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The body was not UTF-8.
    #[error("op list is not UTF-8")]
    NotUtf8,
    /// One element was not a decimal i32.
    #[error("op list element {element:?} is not a 32-bit integer")]
    BadElement {
        /// The offending element, as sent.
        element: String,
    },
}

/// Parses `1001,1002` into `[1001, 1002]`.
///
/// An empty body is an empty list; whitespace around elements is not accepted
/// (goim's `strconv.ParseInt` refuses it too).
///
/// # Errors
/// [`Error`] when the body is not UTF-8 or any element is not an i32.
pub fn parse(body: &[u8]) -> Result<Vec<i32>, Error> {
    let text = std::str::from_utf8(body).map_err(|_| Error::NotUtf8)?;
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|element| {
            element.parse::<i32>().map_err(|_| Error::BadElement {
                element: element.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_t9_body() {
        assert_eq!(parse(b"1001,1002"), Ok(vec![1001, 1002]));
    }

    #[test]
    fn empty_is_empty_list() {
        assert_eq!(parse(b""), Ok(vec![]));
    }

    #[test]
    fn negative_values_are_i32() {
        assert_eq!(parse(b"-1,7"), Ok(vec![-1, 7]));
    }

    #[test]
    fn rejects_bad_elements_whole() {
        assert!(matches!(parse(b"1001,x"), Err(Error::BadElement { .. })));
        assert!(matches!(parse(b"1001,"), Err(Error::BadElement { .. })));
        assert!(matches!(parse(b" 1"), Err(Error::BadElement { .. })));
        assert!(matches!(
            parse(b"2147483648"),
            Err(Error::BadElement { .. })
        ));
        assert_eq!(parse(&[0xff]), Err(Error::NotUtf8));
    }
}
