//! Generating keys: [`KeyFormat::generate`], from the operating system's CSPRNG.

use super::api_key::ApiKey;
use super::format::KeyFormat;
use super::shape::{BASE62, BODY_LEN, encode_checksum};

impl KeyFormat {
    /// Generates a fresh key from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// If the operating system cannot provide random bytes, which on supported platforms means the
    /// process cannot do anything safely anyway.
    pub fn generate(&self) -> ApiKey {
        // Sized for the whole key, so that no reallocation leaves a copy behind; both buffers are
        // zeroed when dropped.
        let mut key = zeroize::Zeroizing::new(String::with_capacity(self.key_len()));
        key.push_str(&self.prefix);
        key.push('_');
        let mut filled = 0;
        let mut buf = zeroize::Zeroizing::new([0u8; 64]);
        while filled < BODY_LEN {
            getrandom::fill(&mut *buf).expect("the operating system's CSPRNG is unavailable");
            for &b in buf.iter() {
                // Rejection sampling keeps every character uniform: 248 = 4 × 62.
                if b < 248 && filled < BODY_LEN {
                    key.push(BASE62[usize::from(b % 62)] as char);
                    filled += 1;
                }
            }
        }
        match &self.keyed {
            None => {
                let checksum = crc32fast::hash(key.as_bytes());
                key.push_str(std::str::from_utf8(&encode_checksum(checksum)).expect("base62"));
            }
            Some(keyed) => {
                key.push(BASE62[usize::from(keyed.minting())] as char);
                let tag = keyed
                    .tag(keyed.minting(), key.as_bytes())
                    .expect("the minting version is accepted");
                key.push_str(std::str::from_utf8(&tag).expect("base62"));
            }
        }
        debug_assert_eq!(key.len(), self.key_len());
        ApiKey(key)
    }
}

#[cfg(test)]
mod tests {
    use super::super::shape::CHECKSUM_LEN;
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let format = KeyFormat::new("sk_live").unwrap();
        let key = format.generate();
        let s = key.expose_secret();
        assert!(s.starts_with("sk_live_"));
        assert_eq!(s.len(), "sk_live_".len() + BODY_LEN + CHECKSUM_LEN);
        assert!(
            s["sk_live_".len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        );
        assert_eq!(format.check(s), Ok(()));
        assert_ne!(format.generate().expose_secret(), s, "two keys must differ");
    }

    #[test]
    fn characters_are_spread_over_the_whole_alphabet() {
        let format = KeyFormat::default();
        let mut seen = [0u32; 128];
        for _ in 0..400 {
            let key = format.generate();
            for b in key.expose_secret()[3..3 + BODY_LEN].bytes() {
                seen[usize::from(b)] += 1;
            }
        }
        // 17,200 draws over 62 symbols: each expected ≈ 277 times.
        for &c in BASE62 {
            let n = seen[usize::from(c)];
            assert!((150..450).contains(&n), "{} drawn {n} times", c as char);
        }
    }
}
