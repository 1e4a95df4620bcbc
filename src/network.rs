//! Where a key may be used from: [`Networks`], a key's `allowed_networks` (IPv4 and IPv6 CIDR
//! blocks). One of a key's grants, like its scopes, expiry and usage limits: a delegated key's
//! networks lie within its creator's ([`Networks::within`]), and
//! [`ApiKeyLayer`](crate::layer::ApiKeyLayer) refuses a request from elsewhere with 403
//! `AUTH_NETWORK_NOT_ALLOWED` before any budget is spent.
//!
//! ```
//! use tower_api_keys::network::Networks;
//!
//! let office: Networks = "10.1.0.0/16 2001:db8::/32".parse().unwrap();
//! assert!(office.contains("10.1.2.3".parse().unwrap()));
//! assert!(!office.contains("10.2.0.1".parse().unwrap()));
//! let desk: Networks = "10.1.7.0/24".parse().unwrap();
//! assert!(desk.within(&office));
//! assert!(!office.within(&desk));
//! ```

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

pub use ipnet::IpNet;

/// Most networks in one list.
pub const MAX_NETWORKS: usize = 32;

/// A list of networks is malformed or too long; the message names the entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidNetworks(String);

impl fmt::Display for InvalidNetworks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidNetworks {}

/// A non-empty list of at most [`MAX_NETWORKS`] CIDR blocks, each normalised to its network
/// address (`10.1.2.3/16` is `10.1.0.0/16`). Cheap to clone (one `Arc`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Networks(Arc<[IpNet]>);

impl Networks {
    /// The list, validated: 1 to [`MAX_NETWORKS`] blocks.
    pub fn new(networks: impl IntoIterator<Item = IpNet>) -> Result<Self, InvalidNetworks> {
        let mut list: Vec<IpNet> = networks.into_iter().map(|n| n.trunc()).collect();
        if list.is_empty() {
            return Err(InvalidNetworks(
                "allowed_networks must list at least one network (leave it out to allow any)"
                    .into(),
            ));
        }
        if list.len() > MAX_NETWORKS {
            return Err(InvalidNetworks(format!(
                "allowed_networks lists at most {MAX_NETWORKS} networks"
            )));
        }
        list.sort();
        list.dedup();
        Ok(Self(list.into()))
    }

    /// Parses CIDR blocks (a bare address is a single-host block), one per string.
    pub fn parse<I, S>(blocks: I) -> Result<Self, InvalidNetworks>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Vec::new();
        for (i, block) in blocks.into_iter().enumerate() {
            let block = block.as_ref();
            if list.len() == MAX_NETWORKS {
                return Err(InvalidNetworks(format!(
                    "allowed_networks lists at most {MAX_NETWORKS} networks"
                )));
            }
            let net = block
                .parse::<IpNet>()
                .or_else(|_| block.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    InvalidNetworks(format!(
                        "allowed_networks[{i}] is not an IPv4 or IPv6 network in CIDR notation"
                    ))
                })?;
            list.push(net);
        }
        Self::new(list)
    }

    /// The blocks, sorted.
    pub fn as_slice(&self) -> &[IpNet] {
        &self.0
    }

    /// Whether `addr` lies in one of the blocks. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
    /// what a dual-stack socket reports) is judged as the IPv4 address it carries.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|net| net.contains(&addr))
    }

    /// Whether every block of `self` lies inside some block of `other`: what a delegated key may
    /// be given by its creator.
    pub fn within(&self, other: &Networks) -> bool {
        self.0
            .iter()
            .all(|mine| other.0.iter().any(|theirs| theirs.contains(mine)))
    }
}

/// Whether `child` (`None`: anywhere) is within `parent` (`None`: anywhere).
pub fn within(child: Option<&Networks>, parent: Option<&Networks>) -> bool {
    match (child, parent) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(child), Some(parent)) => child.within(parent),
    }
}

impl FromStr for Networks {
    type Err = InvalidNetworks;

    /// Blocks separated by whitespace or commas.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(
            s.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|b| !b.is_empty()),
        )
    }
}

impl fmt::Debug for Networks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|n| n.to_string()))
            .finish()
    }
}

impl fmt::Display for Networks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for Networks {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|n| n.to_string()))
    }
}

impl<'de> serde::Deserialize<'de> for Networks {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let blocks = Vec::<String>::deserialize(deserializer)?;
        Self::parse(&blocks).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_normalised_and_judged() {
        let nets: Networks = "10.1.2.3/16, 192.0.2.7 2001:db8::/32".parse().unwrap();
        assert_eq!(nets.to_string(), "10.1.0.0/16 192.0.2.7/32 2001:db8::/32");
        assert!(nets.contains("192.0.2.7".parse().unwrap()));
        assert!(!nets.contains("192.0.2.8".parse().unwrap()));
        assert!(nets.contains("::ffff:10.1.9.9".parse().unwrap()));
        assert!(nets.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!nets.contains("2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn within_is_containment_of_every_block() {
        let parent: Networks = "10.0.0.0/8".parse().unwrap();
        let child: Networks = "10.1.0.0/16 10.2.3.4".parse().unwrap();
        let outside: Networks = "10.1.0.0/16 11.0.0.1".parse().unwrap();
        assert!(child.within(&parent));
        assert!(!outside.within(&parent));
        assert!(!parent.within(&child));
        assert!(within(None, None));
        assert!(within(Some(&child), None));
        assert!(!within(None, Some(&parent)));
        assert!(within(Some(&child), Some(&parent)));
    }

    #[test]
    fn bad_lists_name_the_entry() {
        assert!(Networks::parse(Vec::<String>::new()).is_err());
        let err = Networks::parse(["10.0.0.0/8", "nope"]).unwrap_err();
        assert!(err.to_string().contains("allowed_networks[1]"), "{err}");
        assert!(Networks::parse(["10.0.0.0/33"]).is_err());
        let many: Vec<String> = (0..=MAX_NETWORKS)
            .map(|i| format!("10.0.{i}.0/24"))
            .collect();
        assert!(Networks::parse(&many).is_err());
        let json = serde_json::to_string(&"10.0.0.0/8".parse::<Networks>().unwrap()).unwrap();
        assert_eq!(json, r#"["10.0.0.0/8"]"#);
        assert!(serde_json::from_str::<Networks>(r#"["x"]"#).is_err());
    }
}
