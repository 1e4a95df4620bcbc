//! The `Sunset` response header (RFC 8594) for requests made with a key close to its expiry.
//!
//! A request authenticated by a key that expires within the layer's sunset window (default
//! [`DEFAULT_SUNSET_WINDOW`], one day: the last of the sweeper's warning windows) gets
//! `Sunset: <the key's expiry as an HTTP date>` on its response, so a client notices before the key
//! stops working. Set the window with [`ApiKeyLayer::sunset_window`](super::ApiKeyLayer::sunset_window)
//! (`None` turns the header off). A header the inner service set itself is left alone.

use std::time::Duration;

use http::HeaderValue;
use time::OffsetDateTime;
use time::macros::format_description;

use crate::principal::Principal;

/// The default window: keys expiring within a day get the header.
pub const DEFAULT_SUNSET_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// The `Sunset` header for a request made now by `principal`, if its key expires within `window`.
/// One comparison when it does not.
pub(crate) fn header(
    window: Option<Duration>,
    principal: Option<&Principal>,
) -> Option<HeaderValue> {
    let principal = principal?;
    let expires = principal.expires_nanos();
    let window = i64::try_from(window?.as_nanos()).unwrap_or(i64::MAX);
    if expires == i64::MAX || expires.saturating_sub(crate::clock::now_unix_nanos()) > window {
        return None;
    }
    HeaderValue::from_str(&http_date(principal.expires_at()?)).ok()
}

/// Adds `sunset` (taken: at most once) to `response` unless it has a `Sunset` header.
pub(crate) fn add<B>(sunset: &mut Option<HeaderValue>, response: &mut http::Response<B>) {
    if let Some(value) = sunset.take() {
        response
            .headers_mut()
            .entry(http::header::HeaderName::from_static("sunset"))
            .or_insert(value);
    }
}

/// `expires_at` as an IMF-fixdate (RFC 9110 §5.6.7): `Sun, 06 Nov 1994 08:49:37 GMT`.
pub(crate) fn http_date(at: OffsetDateTime) -> String {
    let format = format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    at.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .expect("a UTC date formats")
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn dates_are_imf_fixdates() {
        assert_eq!(
            http_date(datetime!(1994-11-06 08:49:37 UTC)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            http_date(datetime!(2030-01-02 03:04:05 +02:00)),
            "Wed, 02 Jan 2030 01:04:05 GMT"
        );
    }
}
