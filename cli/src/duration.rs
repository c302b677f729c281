//! Human durations for flags such as `--ttl`: `30s`, `15m`, `1h`, `2d`, or
//! several parts in a row (`1h30m`).

use std::time::Duration;

use weft_dataplane_core::duration;

/// Parses a duration made of `<number><unit>` parts, units `s`, `m`, `h`,
/// `d`. A bare number is refused: the unit must be explicit.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad =
        |why: &str| format!("invalid duration {s:?}: {why} (use e.g. 30s, 15m, 1h, 2d or 1h30m)");
    let d = duration::parse(s, duration::SECONDS_TO_DAYS).map_err(|why| bad(&why))?;
    if d.is_zero() {
        return Err(bad("must be longer than zero"));
    }
    Ok(d)
}

/// Short form of a number of seconds, largest units first: `1h30m`, `2d`,
/// `45s`, `0s`.
pub(crate) fn format_secs(secs: u64) -> String {
    if secs == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    let mut rest = secs;
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        let n = rest / size;
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
            rest %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn parses_combined_parts_and_surrounding_space() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(
            parse_duration(" 1d2h3m4s "),
            Ok(Duration::from_secs(93_784))
        );
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("10", "missing unit"),
            ("1x", "unknown unit 'x'"),
            ("h", "expected a number"),
            ("-1h", "expected a number"),
            ("1.5h", "unknown unit '.'"),
            ("0s", "longer than zero"),
            ("99999999999999999999s", "number too large"),
            ("999999999999999d", "too large"),
            ("1hm", "expected a number"),
        ];
        for (input, want) in cases {
            let err = parse_duration(input).expect_err(input);
            assert!(
                err.contains(want),
                "error for {input:?} should mention {want:?}, got {err:?}"
            );
        }
    }

    #[test]
    fn formats_largest_units_first() {
        assert_eq!(format_secs(0), "0s");
        assert_eq!(format_secs(45), "45s");
        assert_eq!(format_secs(3600), "1h");
        assert_eq!(format_secs(5400), "1h30m");
        assert_eq!(format_secs(172_801), "2d1s");
    }
}
