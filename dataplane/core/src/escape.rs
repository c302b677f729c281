//! Text from the network made safe to show: what a node reports about
//! itself (endpoints, errors, reasons) reaches operators' terminals and
//! logs, and must not be able to move the cursor, recolour, retitle or
//! reorder what they read.

/// `value` with every [hidden](is_hidden) character as a visible escape
/// (`\x1b`, `\n`, `\u{202e}`); everything else is kept.
pub fn escape(value: &str) -> String {
    escape_except(value, &[])
}

/// Like [`escape`], but keeps the characters in `keep` (e.g. `'\n'` for a
/// whole multi-line text whose lines are ours).
pub fn escape_except(value: &str, keep: &[char]) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            c if keep.contains(&c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", u32::from(c)));
            }
            c if is_hidden(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// Characters a terminal acts on or hides rather than shows: C0 and C1
/// controls, DEL, bidi controls and marks, zero-width characters, line
/// and paragraph separators, the byte-order mark, interlinear annotation.
pub fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
        )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn controls_and_bidi_become_visible() {
        assert_eq!(escape("role=web"), "role=web");
        assert_eq!(escape("a\x1b[31mred"), "a\\x1b[31mred");
        assert_eq!(escape("x\ny\r\t"), "x\\ny\\r\\t");
        assert_eq!(escape("\u{202e}evil"), "\\u{202e}evil");
        assert_eq!(escape("\u{9b}2J"), "\\u{9b}2J", "C1 CSI");
        assert_eq!(escape("\x7f\x00"), "\\x7f\\x00");
        assert_eq!(escape("zero\u{200b}width"), "zero\\u{200b}width");
        assert_eq!(escape("café 東京"), "café 東京", "printable text is kept");
        assert_eq!(escape_except("a\nb\x1b", &['\n']), "a\nb\\x1b");
    }

    proptest! {
        #[test]
        fn escaped_text_has_no_hidden_character(s in any::<String>()) {
            let e = escape(&s);
            prop_assert!(!e.chars().any(is_hidden), "{:?} -> {:?}", s, e);
            if !s.chars().any(is_hidden) {
                prop_assert_eq!(e, s);
            }
        }
    }
}
