//! The one duration syntax of every flag of every binary: humantime's (`1m30s`, `200ms`, `30s`,
//! `90d`), with a unit always required, so that a bare `30` is never silently seconds in one
//! binary and milliseconds in another.
//!
//! Must not pick defaults or ranges: callers validate the value against their own bounds.

use std::time::Duration;

/// Parses a duration such as `1m30s`, `200ms`, `30s` or `90d`. A bare number is refused with a
/// hint that the unit is required. For clap's `value_parser`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid duration {s:?}: add a unit ({t}s, {t}ms, 1m30s)"
        ));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("invalid duration {s:?}: {e} (durations look like 30s, 500ms, 1m30s, 90d)")
    })
}

/// [`parse`], refusing zero.
pub fn parse_positive(s: &str) -> Result<Duration, String> {
    let d = parse(s)?;
    if d.is_zero() {
        return Err(format!("invalid duration {s:?}: must be more than zero"));
    }
    Ok(d)
}

/// A timeout: [`parse`], where `0` (with or without a unit) means "no timeout" (`None`), as
/// kubectl's `--request-timeout` reads it.
pub fn parse_timeout(s: &str) -> Result<Option<Duration>, String> {
    if s.trim() == "0" {
        return Ok(None);
    }
    let d = parse(s)?;
    Ok((!d.is_zero()).then_some(d))
}

/// Formats a duration in the syntax [`parse`] reads (`1m 30s`, `200ms`).
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_compound_forms() {
        for (text, want) in [
            ("30s", Duration::from_secs(30)),
            ("200ms", Duration::from_millis(200)),
            ("1m30s", Duration::from_secs(90)),
            ("1m 30s", Duration::from_secs(90)),
            ("2h", Duration::from_secs(7200)),
            ("90d", Duration::from_secs(90 * 86_400)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn a_bare_number_is_refused_with_a_hint_about_the_unit() {
        assert_eq!(
            parse("30").unwrap_err(),
            "invalid duration \"30\": add a unit (30s, 30ms, 1m30s)"
        );
        let e = parse("5 parsecs").unwrap_err();
        assert!(e.starts_with("invalid duration \"5 parsecs\": "), "{e}");
        assert!(parse("").is_err());
        assert!(parse("-1s").is_err());
    }

    #[test]
    fn zero_is_refused_where_positive_and_means_none_for_a_timeout() {
        assert!(parse_positive("0s").is_err());
        assert_eq!(parse_positive("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_timeout("0"), Ok(None));
        assert_eq!(parse_timeout("0s"), Ok(None));
        assert_eq!(parse_timeout("5s"), Ok(Some(Duration::from_secs(5))));
        assert!(parse_timeout("5").is_err());
    }

    #[test]
    fn formatted_durations_parse_back() {
        for d in [Duration::from_millis(200), Duration::from_secs(90)] {
            assert_eq!(parse(&format(d)), Ok(d));
        }
        assert_eq!(format(Duration::from_secs(90)), "1m 30s");
    }
}
