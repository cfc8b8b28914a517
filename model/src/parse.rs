//! Parsing shared by the places that read what a user typed or a file they named.

use serde::de::DeserializeOwned;

/// A 32-bit number as users write reasons and leaves: decimal, or hex after `0x`/`0X`,
/// surrounding blanks ignored. `None` for anything else, including a sign after `0x`
/// (which `from_str_radix` would take).
pub fn u32_dec_or_hex(text: &str) -> Option<u32> {
    let t = text.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) if hex.starts_with(['+', '-']) => None,
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// Parses a JSON document whose `schema` field must be `expected`. The schema is
/// checked first, so a document of another version is refused for its version, not
/// for whichever field changed; `schema_error` makes that error from the schema found.
pub fn versioned_json<T, E>(
    text: &str,
    expected: &str,
    schema_error: impl FnOnce(String) -> E,
) -> Result<T, E>
where
    T: DeserializeOwned,
    E: From<serde_json::Error>,
{
    #[derive(serde::Deserialize)]
    struct Header {
        schema: String,
    }
    let header: Header = serde_json::from_str(text)?;
    if header.schema != expected {
        return Err(schema_error(header.schema));
    }
    Ok(serde_json::from_str(text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_decimal_or_hex_without_sign() {
        assert_eq!(u32_dec_or_hex(" 0x4FFFFFFE "), Some(0x4fff_fffe));
        assert_eq!(u32_dec_or_hex("0X1f"), Some(31));
        assert_eq!(u32_dec_or_hex("48"), Some(48));
        for bad in [
            "0x+5",
            "0x-5",
            "0x",
            "",
            "-1",
            "0x1ffffffff",
            "4294967296",
            "x",
        ] {
            assert_eq!(u32_dec_or_hex(bad), None, "{bad}");
        }
    }

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Doc {
        schema: String,
        n: u32,
    }

    #[derive(Debug)]
    enum Error {
        Json,
        Schema(String),
    }

    impl From<serde_json::Error> for Error {
        fn from(_: serde_json::Error) -> Self {
            Error::Json
        }
    }

    #[test]
    fn the_schema_is_checked_before_the_fields() {
        let parse = |t: &str| versioned_json::<Doc, Error>(t, "v1", Error::Schema);
        assert!(matches!(
            parse(r#"{"schema":"v1","n":3}"#),
            Ok(Doc { n: 3, .. })
        ));
        // A v2 document is refused for its version even though `n` is missing.
        assert!(matches!(parse(r#"{"schema":"v2"}"#), Err(Error::Schema(s)) if s == "v2"));
        assert!(matches!(parse(r#"{"schema":"v1"}"#), Err(Error::Json)));
        assert!(matches!(parse("[]"), Err(Error::Json)));
    }
}
