//! Text output helpers: aligned tables, relative times, UTC timestamps and
//! byte counts, and escaping of what nodes report. Pure: callers pass `now`.
//!
//! Much of what weftctl shows comes from agents (endpoints as reported,
//! apply errors, peer endpoints, reasons, labels): a table cell or a field
//! value is always escaped whole (control characters, ANSI escapes, bidi
//! overrides become `\x1b`, `\u{202e}`, and a line break cannot fake a
//! row), and the whole output passes [`terminal_safe`] or [`json_safe`]
//! before it is printed.

use weft_dataplane_core::escape::{escape, escape_except, is_hidden};

/// Text for a terminal: every hidden character escaped but the line
/// breaks and tabs of our own layout.
pub(crate) fn terminal_safe(text: &str) -> String {
    escape_except(text, &['\n', '\t'])
}

/// JSON for a terminal, still valid JSON with the same values: hidden
/// characters (which serde_json leaves raw above U+001F: DEL, C1 controls,
/// bidi overrides...) become `\uXXXX` escapes. Outside strings JSON has
/// only ASCII punctuation, spaces and line breaks, so every such
/// character is inside a string.
pub(crate) fn json_safe(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c != '\n' && is_hidden(c) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A table with a header row, rendered with columns padded to the widest
/// cell and separated by three spaces (like `kubectl get`).
#[derive(Debug, Clone)]
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Starts a table with the given column headers.
    pub(crate) fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| (*h).to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row, each cell escaped; missing cells are blank, extra
    /// cells are kept.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| escape(c)).collect());
    }

    /// Renders the table, one line per row, each ending in `\n`, without
    /// trailing spaces.
    pub(crate) fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for line in std::iter::once(&self.header).chain(&self.rows) {
            for (w, cell) in widths.iter_mut().zip(line) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.header).chain(&self.rows) {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    text.push_str("   ");
                }
                text.push_str(cell);
                text.extend(std::iter::repeat_n(
                    ' ',
                    width.saturating_sub(cell.chars().count()),
                ));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Renders `label: value` lines with the values aligned (for `get` views).
pub(crate) fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0)
        + 1;
    let mut out = String::new();
    for (key, value) in pairs {
        let label = format!("{key}:");
        let value = escape(value);
        out.push_str(format!("{label:<width$}  {value}").trim_end());
        out.push('\n');
    }
    out
}

/// How long ago a Unix time was: `3s ago`, `5m ago`, `2h ago`, `4d ago`;
/// `never` for 0. Times ahead of `now` (clock skew) read as `just now`.
pub(crate) fn ago(then_unix: u64, now_unix: u64) -> String {
    if then_unix == 0 {
        return "never".to_string();
    }
    let Some(secs) = now_unix.checked_sub(then_unix) else {
        return "just now".to_string();
    };
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// How far ahead a Unix time is: `in 45m`, or `expired` once passed.
pub(crate) fn until(then_unix: u64, now_unix: u64) -> String {
    match then_unix.checked_sub(now_unix) {
        None | Some(0) => "expired".to_string(),
        Some(secs @ 0..60) => format!("in {secs}s"),
        Some(secs @ 60..3600) => format!("in {}m", secs / 60),
        Some(secs @ 3600..86_400) => format!("in {}h", secs / 3600),
        Some(secs) => format!("in {}d", secs / 86_400),
    }
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS UTC`; `-` for 0.
pub(crate) fn utc(unix: u64) -> String {
    if unix == 0 {
        return "-".to_string();
    }
    let days = unix / 86_400;
    let rem = unix % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`, restricted to dates after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// A byte count in IEC units: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    // Precision loss above 2^53 bytes is irrelevant for one decimal.
    #[allow(clippy::cast_precision_loss)]
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A value or `-` when empty, so table columns never collapse.
pub(crate) fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "198.18.0.1:51820\x1b[2J\x1b]0;owned\x07\u{202e}\u{9b}31m\nFAKE ROW\r";

    #[test]
    fn hostile_cells_and_fields_are_escaped_on_one_line() {
        let mut t = Table::new(&["NAME", "ENDPOINT"]);
        t.row(vec!["a1".into(), HOSTILE.into()]);
        let out = t.render();
        assert_eq!(out.lines().count(), 2, "no forged row:\n{out}");
        assert!(!out.chars().any(|c| c != '\n' && is_hidden(c)), "{out:?}");
        assert!(
            out.contains(
                "198.18.0.1:51820\\x1b[2J\\x1b]0;owned\\x07\\u{202e}\\u{9b}31m\\nFAKE ROW\\r"
            ),
            "{out}"
        );
        let out = fields(&[("Apply error", HOSTILE.into()), ("Name", "a1".into())]);
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(!out.chars().any(|c| c != '\n' && is_hidden(c)), "{out:?}");
    }

    #[test]
    fn terminal_safe_keeps_our_layout_only() {
        assert_eq!(
            terminal_safe("a\tb\nc\x1b[0m\u{202e}"),
            "a\tb\nc\\x1b[0m\\u{202e}"
        );
    }

    #[test]
    fn json_safe_output_is_valid_json_with_the_same_values() {
        let value = serde_json::json!({"endpoint": HOSTILE, "emoji": "😀", "del": "\x7f"});
        let raw = serde_json::to_string_pretty(&value).expect("encodes");
        assert!(raw.contains('\u{202e}'), "serde_json leaves bidi raw");
        let safe = json_safe(&raw);
        assert!(!safe.chars().any(|c| c != '\n' && is_hidden(c)), "{safe:?}");
        let back: serde_json::Value = serde_json::from_str(&safe).expect("still JSON");
        assert_eq!(back, value, "same values");
    }

    #[test]
    fn table_pads_columns_to_the_widest_cell() {
        let mut t = Table::new(&["NAME", "SITE", "CONNECTED"]);
        t.row(vec!["a1".into(), "site-long".into(), "yes".into()]);
        t.row(vec!["node-number-2".into(), "b".into(), "no".into()]);
        let want = "\
NAME            SITE        CONNECTED
a1              site-long   yes
node-number-2   b           no
";
        assert_eq!(t.render(), want);
    }

    #[test]
    fn table_has_no_trailing_spaces_and_tolerates_short_rows() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["x".into()]);
        t.row(vec!["yy".into(), String::new()]);
        let out = t.render();
        assert_eq!(out, "A    B\nx\nyy\n");
        assert!(
            out.lines().all(|l| !l.ends_with(' ')),
            "no line may end in a space: {out:?}"
        );
    }

    #[test]
    fn table_counts_characters_not_bytes() {
        let mut t = Table::new(&["N", "X"]);
        t.row(vec!["é".into(), "1".into()]);
        assert_eq!(t.render(), "N   X\né   1\n");
    }

    #[test]
    fn empty_table_is_just_the_header() {
        assert_eq!(Table::new(&["NAME", "ID"]).render(), "NAME   ID\n");
    }

    #[test]
    fn fields_align_values() {
        let out = fields(&[
            ("Name", "a1".into()),
            ("Public key", "k".into()),
            ("Error", String::new()),
        ]);
        assert_eq!(out, "Name:        a1\nPublic key:  k\nError:\n");
    }

    #[test]
    fn ago_picks_the_largest_unit() {
        assert_eq!(ago(0, 1000), "never");
        assert_eq!(ago(997, 1000), "3s ago");
        assert_eq!(ago(1000, 1000), "0s ago");
        assert_eq!(ago(1000 - 125, 1000), "2m ago");
        assert_eq!(ago(10_000 - 7200, 10_000), "2h ago");
        assert_eq!(ago(1_000_000 - 3 * 86_400, 1_000_000), "3d ago");
        assert_eq!(ago(1005, 1000), "just now");
    }

    #[test]
    fn until_counts_down_then_says_expired() {
        assert_eq!(until(1045, 1000), "in 45s");
        assert_eq!(until(1000 + 3599, 1000), "in 59m");
        assert_eq!(until(1000 + 3600, 1000), "in 1h");
        assert_eq!(until(1000, 1000), "expired");
        assert_eq!(until(10, 1000), "expired");
    }

    #[test]
    fn utc_formats_known_dates() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1), "1970-01-01 00:00:01 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(4_102_444_799), "2099-12-31 23:59:59 UTC");
    }

    #[test]
    fn bytes_uses_iec_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }
}
