//! Human durations for command-line flags: `<number><unit>` parts in a row
//! (`30s`, `1h30m`, `200us`), each caller naming the units it accepts.
//! `weftctl` takes seconds to days (`--ttl`), `weft-agent` microseconds to
//! seconds (`--busy-poll`).

use std::time::Duration;

/// A unit a flag accepts: its suffix and its length.
pub type Unit = (&'static str, Duration);

/// `s`, `m` (minutes), `h`, `d`.
pub const SECONDS_TO_DAYS: &[Unit] = &[
    ("s", Duration::from_secs(1)),
    ("m", Duration::from_secs(60)),
    ("h", Duration::from_secs(3600)),
    ("d", Duration::from_secs(86_400)),
];

/// `us`, `ms`, `s`.
pub const MICROS_TO_SECONDS: &[Unit] = &[
    ("us", Duration::from_micros(1)),
    ("ms", Duration::from_millis(1)),
    ("s", Duration::from_secs(1)),
];

/// Parses `<number><unit>` parts in `units` (the longest suffix that
/// matches wins, so `ms` is not `m` then `s`). A bare number is refused:
/// the unit must be explicit. The error says why, without the input, for
/// the caller to put in its own message.
pub fn parse(s: &str, units: &[Unit]) -> Result<Duration, String> {
    let names = unit_list(units);
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("empty duration".to_string());
    }
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err("expected a number".to_string());
        }
        let (number, after) = rest.split_at(digits);
        let value: u64 = number.parse().map_err(|_| "number too large".to_string())?;
        let Some((suffix, size)) = units
            .iter()
            .filter(|(suffix, _)| after.starts_with(suffix))
            .max_by_key(|(suffix, _)| suffix.len())
        else {
            return Err(match after.chars().next() {
                Some(c) => format!("unknown unit {c:?}, expected {names}"),
                None => format!("missing unit after the number, expected {names}"),
            });
        };
        // At most 2^64 times a day in nanoseconds: no u128 overflow.
        nanos = nanos
            .checked_add(u128::from(value) * size.as_nanos())
            .ok_or_else(|| "too large".to_string())?;
        rest = &after[suffix.len()..];
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| "too large".to_string())?;
    // The remainder is below 10^9.
    let sub = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    Ok(Duration::new(secs, sub))
}

/// `s, m, h or d`.
fn unit_list(units: &[Unit]) -> String {
    match units.split_last() {
        Some((last, [])) => last.0.to_string(),
        Some((last, init)) => {
            let init: Vec<&str> = init.iter().map(|(u, _)| *u).collect();
            format!("{} or {}", init.join(", "), last.0)
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn longest_suffix_wins_and_errors_say_why() {
        assert_eq!(parse("1m30s", SECONDS_TO_DAYS), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse("1s500ms", MICROS_TO_SECONDS),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(
            parse("200us", MICROS_TO_SECONDS),
            Ok(Duration::from_micros(200))
        );
        for (input, units, why) in [
            ("", SECONDS_TO_DAYS, "empty"),
            ("h", SECONDS_TO_DAYS, "expected a number"),
            ("1hm", SECONDS_TO_DAYS, "expected a number"),
            (
                "10",
                SECONDS_TO_DAYS,
                "missing unit after the number, expected s, m, h or d",
            ),
            (
                "1x",
                SECONDS_TO_DAYS,
                "unknown unit 'x', expected s, m, h or d",
            ),
            (
                "20m",
                MICROS_TO_SECONDS,
                "unknown unit 'm', expected us, ms or s",
            ),
            ("99999999999999999999s", SECONDS_TO_DAYS, "number too large"),
            ("999999999999999d", SECONDS_TO_DAYS, "too large"),
        ] {
            let e = parse(input, units).expect_err(input);
            assert!(e.contains(why), "{input:?}: {e}");
        }
    }

    proptest! {
        /// Any run of parts parses to the sum of its parts.
        #[test]
        fn parts_add_up(parts in prop::collection::vec((0u64..100_000, 0usize..4), 1..5)) {
            let text: String = parts
                .iter()
                .map(|(n, u)| format!("{n}{}", SECONDS_TO_DAYS[*u].0))
                .collect();
            let want: Duration = parts
                .iter()
                .map(|(n, u)| SECONDS_TO_DAYS[*u].1 * u32::try_from(*n).unwrap_or(0))
                .sum();
            prop_assert_eq!(parse(&text, SECONDS_TO_DAYS), Ok(want));
        }
    }
}
