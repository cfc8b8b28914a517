//! JSON: the report itself (format documented in [`crate::report`]).

use super::common::RenderError;
use crate::report::Report;

pub fn render(report: &Report) -> Result<Vec<u8>, RenderError> {
    let mut out = serde_json::to_vec_pretty(report)?;
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn parses_back() {
        let r = sample_report();
        let bytes = render(&r).unwrap_or_default();
        let text = String::from_utf8(bytes).unwrap_or_default();
        assert!(text.ends_with("}\n"));
        assert_eq!(Report::from_json(&text).ok(), Some(r));
        insta::assert_snapshot!(text);
    }
}
