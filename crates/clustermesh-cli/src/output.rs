//! `-o table|json|yaml`, and a plain aligned table.

use anyhow::Result;
use clap::ValueEnum;
use serde::Serialize;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
    /// YAML.
    Yaml,
}

/// Prints `value` as JSON or YAML; `false` for table output (the caller prints the table).
pub(crate) fn structured(format: Format, value: &impl Serialize) -> Result<bool> {
    match format {
        Format::Table => Ok(false),
        Format::Json => {
            println!("{}", serde_json::to_string_pretty(value)?);
            Ok(true)
        }
        Format::Yaml => {
            print!("{}", serde_saphyr::to_string(value)?);
            Ok(true)
        }
    }
}

/// Renders rows under a header, columns padded to their widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// "3m ago", "in 89d".
pub(crate) fn relative(unix: i64, now: i64) -> String {
    let d = now - unix;
    let (n, future) = if d >= 0 { (d, false) } else { (-d, true) };
    let s = if n < 120 {
        format!("{n}s")
    } else if n < 7200 {
        format!("{}m", n / 60)
    } else if n < 172_800 {
        format!("{}h", n / 3600)
    } else {
        format!("{}d", n / 86_400)
    };
    if future {
        format!("in {s}")
    } else {
        format!("{s} ago")
    }
}

/// Seconds since the epoch.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_and_relative_times_read_well() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A     BB\nxxx   1\ny     22\n");
        assert_eq!(relative(100, 130), "30s ago");
        assert_eq!(relative(100 + 86_400 * 90, 100), "in 90d");
        assert_eq!(relative(0, 3 * 3600), "3h ago");
    }
}
