//! A test secret scanner: its own P-256 key pair, its public-key document in GitHub's JSON shape,
//! and signed reports.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey as _, LineEnding};

pub struct Scanner {
    pub identifier: String,
    key: SigningKey,
}

impl Scanner {
    pub fn new(identifier: &str) -> Self {
        loop {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).unwrap();
            if let Ok(key) = SigningKey::from_slice(&bytes) {
                return Self {
                    identifier: identifier.to_owned(),
                    key,
                };
            }
        }
    }

    pub fn pem(&self) -> String {
        self.key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    /// `{"public_keys": [...]}` with these scanners' keys.
    pub fn document(scanners: &[&Scanner]) -> String {
        let keys: Vec<_> = scanners
            .iter()
            .map(|s| serde_json::json!({"key_identifier": s.identifier, "key": s.pem(), "is_current": true}))
            .collect();
        serde_json::json!({ "public_keys": keys }).to_string()
    }

    /// Base64 of the DER signature of `body`.
    pub fn sign(&self, body: &[u8]) -> String {
        let signature: Signature = self.key.sign(body);
        STANDARD.encode(signature.to_der().as_bytes())
    }
}

/// A report body of `tokens`.
pub fn report(tokens: &[&str]) -> String {
    let items: Vec<_> = tokens
        .iter()
        .map(|t| serde_json::json!({"token": t, "type": "tower_api_key", "url": "https://github.com/o/r/blob/main/leak.txt", "source": "content"}))
        .collect();
    serde_json::Value::Array(items).to_string()
}
