//! The client address of a request, for keys with `allowed_networks`.
//!
//! Only requests made with a key that has networks look at any of this: everything else pays one
//! branch (`Principal::allowed_networks` is `None`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::{Extensions, HeaderMap};

use crate::error::AuthError;
use crate::network::Networks;
use crate::principal::Principal;

/// The header a trusted proxy appends the address it received a request from to.
const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// How the layer reads the peer (socket) address from a request's extensions.
pub(crate) type PeerAddrFn = fn(&Extensions) -> Option<SocketAddr>;

/// The default: axum's `ConnectInfo<SocketAddr>` (what `into_make_service_with_connect_info`
/// inserts), else a bare [`SocketAddr`].
pub(crate) fn default_peer_addr(extensions: &Extensions) -> Option<SocketAddr> {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) =
        extensions.get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(*addr);
    }
    extensions.get::<SocketAddr>().copied()
}

/// The client's address as the layer worked it out behind trusted proxies (`X-Forwarded-For`), in
/// the request's extensions when [`trusted_proxies`](super::ApiKeyLayer::trusted_proxies) is set:
/// the address the management router records in audit events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ForwardedClient(pub(crate) IpAddr);

/// Where the client address comes from; part of the layer's configuration.
#[derive(Clone)]
pub(crate) struct ClientAddress {
    pub(crate) peer: PeerAddrFn,
    pub(crate) trusted_proxies: Option<Networks>,
}

impl Default for ClientAddress {
    fn default() -> Self {
        Self {
            peer: default_peer_addr,
            trusted_proxies: None,
        }
    }
}

impl fmt::Debug for ClientAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAddress")
            .field("trusted_proxies", &self.trusted_proxies)
            .finish_non_exhaustive()
    }
}

impl ClientAddress {
    /// Admits `principal`'s request if its key may be used from where the request came from.
    ///
    /// One branch for a key without networks; otherwise the client address is worked out and
    /// judged. No address known: refused (fail closed).
    #[inline]
    pub(crate) fn admit(
        &self,
        principal: &Principal,
        headers: &HeaderMap,
        extensions: &Extensions,
    ) -> Result<(), AuthError> {
        let Some(networks) = principal.allowed_networks() else {
            return Ok(());
        };
        match self.client(headers, extensions) {
            Some(client) if networks.contains(client) => Ok(()),
            _ => Err(AuthError::NetworkNotAllowed),
        }
    }

    /// The client's address: the peer's, or, when the peer is a trusted proxy, the first address in
    /// `X-Forwarded-For`, from the right, that is not a trusted proxy's.
    pub(crate) fn client(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<IpAddr> {
        let peer = (self.peer)(extensions)?.ip();
        match &self.trusted_proxies {
            Some(trusted) if trusted.contains(peer) => forwarded_client(headers, trusted, peer),
            _ => Some(peer),
        }
    }
}

/// Walks `X-Forwarded-For` (every field line, in order, as one list) from the right, skipping
/// trusted proxies: the first untrusted address is the client's. Every address trusted (or no
/// header): the leftmost one, the peer if the list is empty. An entry that is not an address
/// before the client is found: `None` (the chain cannot be followed).
fn forwarded_client(headers: &HeaderMap, trusted: &Networks, peer: IpAddr) -> Option<IpAddr> {
    let mut leftmost = peer;
    let lines: Vec<&http::HeaderValue> = headers.get_all(X_FORWARDED_FOR).iter().collect();
    for line in lines.into_iter().rev() {
        let line = line.to_str().ok()?;
        for entry in line.rsplit(',') {
            let addr = parse_entry(entry.trim())?;
            if !trusted.contains(addr) {
                return Some(addr);
            }
            leftmost = addr;
        }
    }
    Some(leftmost)
}

/// `192.0.2.1`, `2001:db8::1`, `192.0.2.1:4711`, `[2001:db8::1]:4711` or `[2001:db8::1]`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(addr) = entry.parse::<IpAddr>() {
        return Some(addr);
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    entry
        .strip_prefix('[')?
        .strip_suffix(']')?
        .parse::<std::net::Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(X_FORWARDED_FOR, line.parse().unwrap());
        }
        headers
    }

    fn with_peer(addr: &str) -> Extensions {
        let mut extensions = Extensions::new();
        extensions.insert(addr.parse::<SocketAddr>().unwrap());
        extensions
    }

    fn client(trusted: Option<&str>, peer: &str, xff: &[&str]) -> Option<String> {
        let address = ClientAddress {
            peer: default_peer_addr,
            trusted_proxies: trusted.map(|t| t.parse().unwrap()),
        };
        address
            .client(&headers(xff), &with_peer(peer))
            .map(|a| a.to_string())
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        assert_eq!(
            client(None, "192.0.2.9:1", &["10.0.0.1"]).as_deref(),
            Some("192.0.2.9")
        );
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let trusted = Some("10.0.0.0/8");
        assert_eq!(
            client(trusted, "192.0.2.9:1", &["10.1.1.1"]).as_deref(),
            Some("192.0.2.9")
        );
    }

    #[test]
    fn the_walk_goes_from_the_right_and_skips_trusted_proxies() {
        let trusted = Some("10.0.0.0/8 2001:db8::/32");
        // The client forged the leftmost entry; the proxies appended the rest.
        let xff = ["203.0.113.66, 198.51.100.7, 10.0.0.2"];
        assert_eq!(
            client(trusted, "10.0.0.1:443", &xff).as_deref(),
            Some("198.51.100.7")
        );
        // Several field lines are one list, in order.
        let lines = ["203.0.113.66", "198.51.100.7,2001:db8::5", " 10.0.0.2 "];
        assert_eq!(
            client(trusted, "[2001:db8::1]:443", &lines).as_deref(),
            Some("198.51.100.7")
        );
        // Ports and brackets.
        for entry in ["198.51.100.7:4711", "[2001:db9::7]:1", "[2001:db9::7]"] {
            let got = client(trusted, "10.0.0.1:443", &[entry]).unwrap();
            assert!(entry.contains(got.as_str()), "{entry} -> {got}");
        }
    }

    #[test]
    fn all_trusted_is_the_leftmost_and_no_header_is_the_peer() {
        let trusted = Some("10.0.0.0/8");
        assert_eq!(
            client(trusted, "10.0.0.1:443", &["10.0.0.3, 10.0.0.2"]).as_deref(),
            Some("10.0.0.3")
        );
        assert_eq!(
            client(trusted, "10.0.0.1:443", &[]).as_deref(),
            Some("10.0.0.1")
        );
    }

    #[test]
    fn garbage_before_the_client_is_unknown_and_after_it_is_ignored() {
        let trusted = Some("10.0.0.0/8");
        assert_eq!(
            client(trusted, "10.0.0.1:443", &["198.51.100.7, unknown"]),
            None
        );
        assert_eq!(client(trusted, "10.0.0.1:443", &[", 10.0.0.2"]), None);
        assert_eq!(
            client(trusted, "10.0.0.1:443", &["garbage, 198.51.100.7"]).as_deref(),
            Some("198.51.100.7")
        );
    }

    #[test]
    fn no_peer_address_is_no_client() {
        let address = ClientAddress::default();
        assert_eq!(address.client(&headers(&[]), &Extensions::new()), None);
    }

    #[cfg(feature = "axum")]
    #[test]
    fn axum_connect_info_is_read_first() {
        let mut extensions = with_peer("192.0.2.1:1");
        extensions.insert(axum::extract::ConnectInfo(
            "198.51.100.1:2".parse::<SocketAddr>().unwrap(),
        ));
        assert_eq!(
            ClientAddress::default()
                .client(&HeaderMap::new(), &extensions)
                .map(|a| a.to_string())
                .as_deref(),
            Some("198.51.100.1")
        );
    }

    #[test]
    fn keys_without_networks_are_admitted_without_an_address() {
        let address = ClientAddress::default();
        let principal = Principal::master();
        assert!(
            address
                .admit(&principal, &HeaderMap::new(), &Extensions::new())
                .is_ok()
        );
    }
}
