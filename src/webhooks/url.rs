//! Which webhook URLs may be called: [`UrlPolicy`], against server-side request forgery.
//!
//! By default a URL must be `https` and every address its host resolves to must be public: not
//! loopback, private, shared (CGNAT), link-local (cloud metadata lives there), unspecified,
//! multicast, broadcast, documentation or reserved, in IPv4 or IPv6 (IPv4-mapped, -compatible,
//! NAT64 and 6to4 IPv6 addresses are judged by the IPv4 address they carry). The check runs at
//! registration and again at each delivery, which resolves the host once and connects to the
//! address it checked: a DNS answer that changes in between (rebinding) cannot redirect it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::Uri;

use crate::error::AuthError;

/// The longest webhook URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// Which webhook URLs are allowed. The default is strict: `https` to public addresses only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    allow_private: bool,
    allow_http: bool,
}

/// A URL taken apart, and the address to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Destination {
    pub(crate) https: bool,
    /// The host name (an IPv6 address without brackets), for TLS.
    pub(crate) host: String,
    /// `host[:port]` as written: the `Host` header.
    pub(crate) authority: String,
    pub(crate) path_and_query: String,
    /// The checked address.
    pub(crate) addr: SocketAddr,
}

impl UrlPolicy {
    /// The strict default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also allow loopback, private, link-local and other non-public addresses (a receiver on the
    /// same host or network). Off by default: anyone who may register a webhook could otherwise
    /// make the server call its internal services or the cloud metadata endpoint.
    #[must_use]
    pub fn allow_private(mut self, allow: bool) -> Self {
        self.allow_private = allow;
        self
    }

    /// Also allow plain `http` URLs (deliveries readable on the way). Off by default.
    #[must_use]
    pub fn allow_http(mut self, allow: bool) -> Self {
        self.allow_http = allow;
        self
    }

    /// Checks `url` and resolves its host once: the address to connect to, or why not.
    pub(crate) async fn resolve(&self, url: &str) -> Result<Destination, AuthError> {
        let refused = AuthError::WebhookUrlRefused;
        if url.len() > MAX_URL_LEN {
            return Err(refused("malformed"));
        }
        let uri: Uri = url.parse().map_err(|_| refused("malformed"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if self.allow_http => false,
            Some("http") => return Err(refused("not_https")),
            _ => return Err(refused("malformed")),
        };
        let authority = uri.authority().ok_or(refused("malformed"))?;
        if authority.as_str().contains('@') {
            return Err(refused("credentials"));
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(refused("malformed"));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|_| refused("unresolvable"))?
                .collect(),
        };
        let first = *addrs.first().ok_or(refused("unresolvable"))?;
        // Every address must pass: a name that also resolves to a private address is refused.
        if !self.allow_private && addrs.iter().any(|a| !is_public(a.ip())) {
            return Err(refused("private_address"));
        }
        Ok(Destination {
            https,
            host: host.to_owned(),
            authority: authority.as_str().to_owned(),
            path_and_query: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            addr: first,
        })
    }
}

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || a == 0 // "this network"
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16: cloud metadata
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || ip.is_documentation()
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || ip.is_multicast()
        || a >= 240) // reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    // Addresses carrying an IPv4 address are judged by it.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    if seg[..6] == [0; 6] {
        // IPv4-compatible (deprecated), `::` and `::1` among them.
        return !ip.is_unspecified() && !ip.is_loopback() && is_public_v4(embedded(seg[6], seg[7]));
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(embedded(seg[6], seg[7])); // NAT64
    }
    if seg[0] == 0x2002 {
        return is_public_v4(embedded(seg[1], seg[2])); // 6to4
    }
    !((seg[0] & 0xfe00) == 0xfc00 // unique local (fd00:ec2::254: metadata)
        || (seg[0] & 0xffc0) == 0xfe80 // link-local
        || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (seg[0] & 0xff00) == 0xff00 // multicast
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        || (seg[0] == 0x0100 && seg[1..4] == [0, 0, 0])) // discard-only
}

fn embedded(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_unicast_addresses_pass() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn urls_are_https_to_public_addresses_unless_allowed() {
        let strict = UrlPolicy::new();
        let reason = |r: Result<Destination, AuthError>| match r {
            Err(AuthError::WebhookUrlRefused(reason)) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason(strict.resolve("http://1.1.1.1/hook").await),
            "not_https"
        );
        assert_eq!(
            reason(strict.resolve("https://127.0.0.1/hook").await),
            "private_address"
        );
        assert_eq!(
            reason(strict.resolve("https://[::ffff:10.0.0.1]/").await),
            "private_address"
        );
        assert_eq!(
            reason(strict.resolve("https://u:p@1.1.1.1/").await),
            "credentials"
        );
        assert_eq!(reason(strict.resolve("ftp://1.1.1.1/").await), "malformed");
        assert_eq!(reason(strict.resolve("not a url").await), "malformed");
        let ok = strict
            .resolve("https://1.1.1.1:8443/hook?x=1")
            .await
            .unwrap();
        assert_eq!(
            (ok.https, ok.addr.port(), ok.path_and_query.as_str()),
            (true, 8443, "/hook?x=1")
        );
        let local = UrlPolicy::new().allow_private(true).allow_http(true);
        let ok = local.resolve("http://127.0.0.1:9/hook").await.unwrap();
        assert_eq!((ok.https, ok.authority.as_str()), (false, "127.0.0.1:9"));
    }
}
