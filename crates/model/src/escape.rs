//! Making strings that others chose safe to show: control characters escaped (no terminal
//! escapes, no forged log lines) and length bounded (a peer's 1 MB error text must not become a
//! 1 MB ConfigMap). Pure; used wherever a peer- or user-chosen string reaches status or logs.

/// `s` with every control character (C0, DEL, C1) escaped as `\u{..}` and at most `max`
/// characters kept; a cut is marked with `…(N more)`.
pub fn bounded(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 16);
    let mut chars = s.chars();
    for (kept, c) in chars.by_ref().enumerate() {
        if kept == max {
            let rest = 1 + chars.count();
            out.push_str(&format!("…({rest} more)"));
            return out;
        }
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// The bound for a peer's error or free text in status: enough for any real message.
pub const MAX_TEXT: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_is_bounded() {
        assert_eq!(bounded("plain", 10), "plain");
        assert_eq!(bounded("a\u{1b}[2Jb\nc", 20), "a\\u{1b}[2Jb\\u{a}c");
        assert_eq!(bounded("abcdef", 3), "abc…(3 more)");
        assert_eq!(
            bounded(&"x".repeat(1_400_000), MAX_TEXT).len(),
            MAX_TEXT + "…(1399488 more)".len()
        );
    }
}
