//! Timestamps on the wire, for the records written most (jobs, events, messages):
//! RFC 3339 in UTC exactly as chrono's `Serialize` writes them
//! (`2026-12-07T21:24:39.123Z`, the fraction in 0, 3, 6 or 9 digits, the fewest that
//! show it whole), but written straight into a buffer. chrono formats through
//! `fmt::Display` a character at a time: ~5% of a queue cycle's instructions and 7% of
//! a script run's on the server. Reading is chrono's.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Deserialize, Deserializer, Serializer};

/// The text of `at`, or `None` where chrono's form is not the plain one (years outside
/// 0000–9999, a leap second): those are left to chrono.
fn format(at: &DateTime<Utc>, out: &mut [u8; 30]) -> Option<usize> {
    let year = at.year();
    let nanos = at.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return None;
    }
    fn digits(out: &mut [u8], mut value: u32) {
        for slot in out.iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    digits(&mut out[0..4], year as u32);
    out[4] = b'-';
    digits(&mut out[5..7], at.month());
    out[7] = b'-';
    digits(&mut out[8..10], at.day());
    out[10] = b'T';
    digits(&mut out[11..13], at.hour());
    out[13] = b':';
    digits(&mut out[14..16], at.minute());
    out[16] = b':';
    digits(&mut out[17..19], at.second());
    let mut end = 19;
    let (fraction, width) = if nanos == 0 {
        (0, 0)
    } else if nanos.is_multiple_of(1_000_000) {
        (nanos / 1_000_000, 3)
    } else if nanos.is_multiple_of(1_000) {
        (nanos / 1_000, 6)
    } else {
        (nanos, 9)
    };
    if width > 0 {
        out[end] = b'.';
        digits(&mut out[end + 1..end + 1 + width], fraction);
        end += 1 + width;
    }
    out[end] = b'Z';
    Some(end + 1)
}

pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let mut buffer = [0u8; 30];
    match format(at, &mut buffer) {
        // Only ASCII digits and separators were written.
        Some(n) => match std::str::from_utf8(&buffer[..n]) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => serde::Serialize::serialize(at, serializer),
        },
        None => serde::Serialize::serialize(at, serializer),
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    DateTime::<Utc>::deserialize(deserializer)
}

/// The same for an optional timestamp (`null` when absent).
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(
        at: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => super::serialize(at, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<DateTime<Utc>>::deserialize(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ours(at: &DateTime<Utc>) -> String {
        let mut json = serde_json::Serializer::new(Vec::new());
        serialize(at, &mut json).unwrap();
        String::from_utf8(json.into_inner()).unwrap()
    }

    #[test]
    fn times_are_written_as_chrono_writes_them() {
        let base = Utc.with_ymd_and_hms(2026, 12, 7, 21, 4, 9).unwrap();
        let mut times = vec![
            base,
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            Utc::now(),
        ];
        for nanos in [
            1,
            9,
            10,
            999,
            1_000,
            1_001,
            120_000,
            999_999,
            1_000_000,
            1_000_001,
            5_000_000,
            123_000_000,
            123_456_000,
            123_456_789,
            999_999_999,
        ] {
            times.push(base + chrono::Duration::nanoseconds(nanos));
        }
        // A leap second (nanosecond field past 1e9).
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        times.push(leap);
        // Every millisecond of a second and a spread of other instants.
        for i in 0..1000 {
            times.push(base + chrono::Duration::milliseconds(i));
            times.push(base + chrono::Duration::microseconds(i * 7919 + 1));
            times.push(base + chrono::Duration::seconds(i * 86_413 * 37));
        }
        for at in times {
            assert_eq!(ours(&at), serde_json::to_string(&at).unwrap(), "{at:?}");
            let back: DateTime<Utc> = serde_json::from_str(&ours(&at)).unwrap();
            assert_eq!(back, at);
        }
    }

    #[test]
    fn optional_times_are_null_when_absent() {
        let mut json = serde_json::Serializer::new(Vec::new());
        option::serialize(&None, &mut json).unwrap();
        assert_eq!(json.into_inner(), b"null");
    }
}
