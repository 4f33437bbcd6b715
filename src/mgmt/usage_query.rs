//! The usage API's question, read from its query string: `from` and `to` (RFC 3339
//! timestamps or unix seconds) and `group_by`.
//!
//! Strict like the JSON bodies: an unknown or repeated parameter, a time that is not one,
//! a range backwards or over 400 days, a `group_by` the endpoint does not offer — each a 400
//! whose message names the parameter and what would be accepted. Times are turned into
//! unix seconds here and back into RFC 3339 (UTC) for answers, with `time`'s calendar (no
//! parsing features needed: the grammar is small and spelled out below).

use super::server::{error_reply, Reply};
use super::store::UsageGroup;

/// Longest range one question may cover.
const MAX_RANGE_S: i64 = 400 * 86_400;
/// `from` when not given: this long before `to`.
const DEFAULT_RANGE_S: i64 = 86_400;

/// A checked question: unix seconds, `from <= to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageParams {
    pub from: i64,
    pub to: i64,
    pub group: UsageGroup,
}

impl UsageParams {
    /// The minutes whose rows start within `from..to`, as (first, end exclusive).
    pub fn minutes(&self) -> (i64, i64) {
        let ceil = |t: i64| t.div_euclid(60) + i64::from(t.rem_euclid(60) != 0);
        (ceil(self.from), ceil(self.to))
    }
}

fn invalid(message: &str) -> Reply {
    error_reply(400, "invalid_query", message)
}

/// Reads `query` (the part after `?`). `allowed` are the groupings this endpoint offers.
pub fn usage_params(
    query: &str,
    allowed: &[UsageGroup],
    default: UsageGroup,
    now: i64,
) -> Result<UsageParams, Reply> {
    let (mut from, mut to, mut group) = (None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "from" => &mut from,
            "to" => &mut to,
            "group_by" => &mut group,
            _ => {
                return Err(invalid(&format!(
                    "unknown query parameter {name:?}: this endpoint takes from, to and group_by"
                )))
            }
        };
        let value = percent_decode(raw)
            .ok_or_else(|| invalid(&format!("{name}: not valid percent-encoded UTF-8")))?;
        if slot.replace(value).is_some() {
            return Err(invalid(&format!("{name}: given more than once")));
        }
    }
    let time = |name: &str, v: &str| {
        parse_time(v).ok_or_else(|| {
            invalid(&format!(
                "{name}: {v:?} is neither an RFC 3339 timestamp (e.g. 2026-01-31T00:00:00Z) nor unix seconds"
            ))
        })
    };
    let to = match to {
        Some(v) => time("to", &v)?,
        // The end of the current minute: rows are kept by minute, and the minute under way
        // (requests of the last seconds) is part of "now".
        None => (now.div_euclid(60) + 1) * 60,
    };
    let from = match from {
        Some(v) => time("from", &v)?,
        None => to - DEFAULT_RANGE_S,
    };
    if from > to {
        return Err(invalid(&format!(
            "from: {} is after to ({})",
            format_time(from),
            format_time(to)
        )));
    }
    if to - from > MAX_RANGE_S {
        return Err(invalid(
            "from: the range from..to is longer than 400 days; ask in parts",
        ));
    }
    let group = match group {
        None => default,
        Some(g) => UsageGroup::parse(&g)
            .filter(|g| allowed.contains(g))
            .ok_or_else(|| {
                let names: Vec<&str> = allowed.iter().map(|g| g.as_str()).collect();
                invalid(&format!(
                    "group_by: {g:?} is not one of {}",
                    names.join(", ")
                ))
            })?,
    };
    Ok(UsageParams { from, to, group })
}

/// `%XX` escapes decoded (a `+` stays a `+`: it is a time zone's sign here, not a space).
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Unix seconds, or RFC 3339: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` (`t` or a space may
/// stand for `T`; a leap second counts as :59).
pub fn parse_time(s: &str) -> Option<i64> {
    if !s.is_empty() && s.len() <= 12 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok();
    }
    let b = s.as_bytes();
    let num = |from: usize, to: usize| s.get(from..to).and_then(digits);
    let separators = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't' | b' ')
        && b[13] == b':'
        && b[16] == b':';
    if !separators {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let mut zone = s.get(19..)?;
    if let Some(fraction) = zone.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        zone = &fraction[digits..];
    }
    let offset = match zone {
        "Z" | "z" => 0,
        _ => {
            let sign = match zone.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if zone.len() != 6 || zone.as_bytes()[3] != b':' {
                return None;
            }
            let (h, m) = (digits(zone.get(1..3)?)?, digits(zone.get(4..6)?)?);
            if h > 23 || m > 59 {
                return None;
            }
            sign * i64::from(h * 3600 + m * 60)
        }
    };
    let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year as i32, month, u8::try_from(day).ok()?).ok()?;
    let clock = time::Time::from_hms(
        u8::try_from(hour).ok()?,
        u8::try_from(minute).ok()?,
        u8::try_from(second.min(59)).ok()?,
    )
    .ok()?;
    let utc = time::PrimitiveDateTime::new(date, clock).assume_utc();
    Some(utc.unix_timestamp() - offset)
}

/// A number written with ASCII digits only (no sign).
fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// RFC 3339 in UTC, to the second.
pub fn format_time(t: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(t) {
        Ok(d) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            d.year(),
            u8::from(d.month()),
            d.day(),
            d.hour(),
            d.minute(),
            d.second()
        ),
        Err(_) => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [UsageGroup; 5] = [
        UsageGroup::User,
        UsageGroup::Key,
        UsageGroup::Model,
        UsageGroup::Hour,
        UsageGroup::Day,
    ];

    fn params(query: &str) -> Result<UsageParams, String> {
        usage_params(query, &ALL, UsageGroup::Model, 1_800_000_000)
            .map_err(|r| String::from_utf8_lossy(&r.body).into_owned())
    }

    #[test]
    fn times_both_ways() {
        assert_eq!(parse_time("1700000000"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14t22:13:20.123z"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-15T00:13:20+02:00"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14 20:13:20-02:00"), Some(1_700_000_000));
        assert_eq!(format_time(1_700_000_000), "2023-11-14T22:13:20Z");
        for bad in [
            "",
            "-5",
            "yesterday",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-02-30T00:00:00Z",
            "2023-11-14T25:00:00Z",
            "2023-11-14T22:13:20+2:00",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20Zjunk",
            "２０２３-11-14T22:13:20Z",
        ] {
            assert_eq!(parse_time(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn defaults_and_minutes() {
        let p = params("").unwrap();
        assert_eq!(
            (p.from, p.to, p.group),
            (1_799_913_660, 1_800_000_060, UsageGroup::Model)
        );
        let p = params("from=60&to=121&group_by=hour").unwrap();
        assert_eq!(p.minutes(), (1, 3));
        let p = params("from=2023-11-14T22%3A13%3A20%2B00%3A00&to=2023-11-14T22:13:20Z").unwrap();
        assert_eq!((p.from, p.to), (1_700_000_000, 1_700_000_000));
    }

    #[test]
    fn refusals_name_the_parameter() {
        for (query, starts) in [
            ("from=soon", "from: "),
            ("to=2023-13-01T00:00:00Z", "to: "),
            ("from=200&to=100", "from: "),
            ("from=0&to=40000000", "from: "),
            ("group_by=domain", "group_by: "),
            ("group_by=user&group_by=key", "group_by: "),
            ("from=%zz", "from: "),
            ("limit=5", "unknown query parameter"),
        ] {
            let e = params(query).unwrap_err();
            let message = serde_json::from_str::<serde_json::Value>(&e).unwrap()["error"]
                ["message"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(message.starts_with(starts), "{query}: {message}");
        }
        let e = params("group_by=week").unwrap_err();
        assert!(e.contains("user, key, model, hour, day"), "{e}");
    }
}
