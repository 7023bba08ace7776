//! HTTP dates (RFC 9110 IMF-fixdate), for `Idempotency-Key-Expires`.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderValue;

const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Formats `at` as an HTTP date (IMF-fixdate, always GMT), truncated to the second; times
/// before 1970 are written as the epoch.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use idem_http::fmt_http_date;
///
/// let at = UNIX_EPOCH + Duration::from_secs(784_111_777);
/// assert_eq!(fmt_http_date(at), "Sun, 06 Nov 1994 08:49:37 GMT");
/// ```
pub fn fmt_http_date(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    // 1970-01-01 was a Thursday.
    let weekday = WEEKDAYS[(days % 7) as usize];
    let (year, month, day) = civil_from_days(days);
    format!(
        "{weekday}, {day:02} {} {year:04} {:02}:{:02}:{:02} GMT",
        MONTHS[month - 1],
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// [`fmt_http_date`] as a header value. The last second formatted is kept per thread:
/// records completed within one second mostly expire within one second too, and
/// formatting costs a few allocations per response.
pub(crate) fn http_date_value(at: SystemTime) -> Option<HeaderValue> {
    thread_local! {
        static LAST: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
    }
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let format = || HeaderValue::from_maybe_shared(Bytes::from(fmt_http_date(at))).ok();
    LAST.try_with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((cached, value)) if *cached == secs => Some(value.clone()),
            _ => {
                let value = format()?;
                *last = Some((secs, value.clone()));
                Some(value)
            }
        }
    })
    .unwrap_or_else(|_| format())
}

/// Year, month (1-12) and day of the month of the day `days` after 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, usize, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month as usize, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> String {
        fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn formats_known_dates() {
        assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(at(1_767_225_599), "Wed, 31 Dec 2025 23:59:59 GMT");
        assert_eq!(at(1_767_225_600), "Thu, 01 Jan 2026 00:00:00 GMT");
        assert_eq!(at(4_107_542_400), "Mon, 01 Mar 2100 00:00:00 GMT");
        assert_eq!(
            fmt_http_date(UNIX_EPOCH - Duration::from_secs(5)),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
    }

    #[test]
    fn the_cached_value_is_the_formatted_date_of_its_second() {
        for secs in [
            1_767_225_599,
            1_767_225_599,
            1_767_225_600,
            0,
            1_767_225_599,
        ] {
            for nanos in [0, 999_999_999] {
                let at = UNIX_EPOCH + Duration::new(secs, nanos);
                assert_eq!(http_date_value(at).unwrap(), fmt_http_date(at).as_str());
            }
        }
        let before = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(
            http_date_value(before).unwrap(),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
    }
}
