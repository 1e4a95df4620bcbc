//! [`KeyId`]: the stable public id of a key.

use std::fmt;
use std::sync::Arc;

/// The stable public id of a key, e.g. `key_01JD3M7Q8X9ZB2C4E6G8J0K2M4`. It survives rotation and is
/// what provenance stamps record. New ids sort by creation time. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(Arc<str>);

/// The id the master key's principal carries.
pub(crate) const MASTER_KEY_ID: &str = "master";

impl KeyId {
    /// A new id: `key_` followed by a 26-character ULID (48-bit millisecond time + 80 random bits,
    /// Crockford base32), so ids sort by creation time.
    pub fn generate() -> Self {
        const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut random = [0u8; 10];
        getrandom::fill(&mut random).expect("the operating system's CSPRNG is unavailable");
        let mut value = u128::from(millis & 0xFFFF_FFFF_FFFF) << 80;
        for (i, b) in random.iter().enumerate() {
            value |= u128::from(*b) << (8 * (9 - i));
        }
        let mut id = String::with_capacity(30);
        id.push_str("key_");
        for i in (0..26).rev() {
            id.push(CROCKFORD[((value >> (5 * i)) & 31) as usize] as char);
        }
        Self(id.into())
    }

    /// Wraps an existing id (as read back from a store or a URL).
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for KeyId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Self(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_sort_by_time() {
        let a = KeyId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = KeyId::generate();
        assert_ne!(a, b);
        assert!(a < b, "{a} < {b}");
        assert_eq!(a.as_str().len(), 30);
        assert!(a.as_str().starts_with("key_"));
    }
}
