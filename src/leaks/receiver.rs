//! [`LeakReceiver`]: checks a report's signature, tells our tokens from others with no I/O, and
//! applies the [`LeakPolicy`] through the [`KeyManager`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::keys::{
    FetchKeys, FetchedKeys, HttpFetcher, KeySet, MAX_KEY_IDENTIFIER_LEN, MAX_SIGNATURE_LEN,
    PublicKeys, Unverified,
};
use crate::audit::{Actor, EventDraft, EventType, Journal, Origin};
use crate::error::AuthError;
use crate::key::{KeyDigest, MAX_KEY_LEN};
use crate::manage::{KeyManager, RevokeReason, RotateOptions};
use crate::principal::Principal;

/// Largest report body read, in bytes (413 `REQUEST_BODY_TOO_LARGE` past it).
pub const MAX_REPORT_BYTES: usize = 256 * 1024;
/// Most tokens in one report (400 `APIKEY_INVALID` past it; scanners split larger batches).
pub const MAX_REPORT_TOKENS: usize = 1000;
/// Shortest time between two fetches of a scanner's public keys.
pub const KEY_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// What a verified report about one of our keys does, per owner ([`LeakPolicy`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeakAction {
    /// Label the token, log it (never the token), change nothing.
    Notify,
    /// End the leaked secret only: the key is given a new secret nobody sees, so the leaked one
    /// stops working at once on every instance, while the key's id, its listing and the keys it
    /// created stay; its owner rotates it to use it again. (A revocation always takes the key's
    /// descendants with it: invariant I1.) A replayed report then finds no key and labels the
    /// token a false positive.
    EndSecret,
    /// Revoke the key and every key it created, transitively, with reason
    /// [`leaked`](RevokeReason::Leaked): a leaked secret may have minted keys. The default.
    #[default]
    RevokeWithDescendants,
}

/// Which [`LeakAction`] applies to an owner's keys: a default, and overrides per owner.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeakPolicy {
    default: LeakAction,
    owners: HashMap<String, LeakAction>,
}

impl LeakPolicy {
    /// The default policy: every owner's leaked keys are revoked with their descendants.
    pub fn new() -> Self {
        Self::default()
    }

    /// What applies to owners without an override.
    #[must_use]
    pub fn default_action(mut self, action: LeakAction) -> Self {
        self.default = action;
        self
    }

    /// What applies to `owner`'s keys.
    #[must_use]
    pub fn owner(mut self, owner: impl Into<String>, action: LeakAction) -> Self {
        self.owners.insert(owner.into(), action);
        self
    }

    /// The action for `owner`'s keys.
    pub fn action_for(&self, owner: &str) -> LeakAction {
        self.owners.get(owner).copied().unwrap_or(self.default)
    }
}

/// A scanner that sends reports, told apart by its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scanner {
    /// GitHub's secret-scanning partner program: `Github-Public-Key-Identifier`,
    /// `Github-Public-Key-Signature`; keys at `https://api.github.com/meta/public_keys/secret_scanning`.
    GitHub,
    /// deps.dev (Google's open-source insights, also used by PyPI): `GOSST-Public-Key-Identifier`,
    /// `GOSST-Public-Key-Signature`; keys at
    /// `https://storage.googleapis.com/depsdev-gcp-public-keys/secret_scanning`.
    DepsDev,
}

impl Scanner {
    const ALL: [Self; 2] = [Self::GitHub, Self::DepsDev];

    /// The header naming the signing key.
    pub const fn identifier_header(self) -> &'static str {
        match self {
            Self::GitHub => "github-public-key-identifier",
            Self::DepsDev => "gosst-public-key-identifier",
        }
    }

    /// The header carrying the signature.
    pub const fn signature_header(self) -> &'static str {
        match self {
            Self::GitHub => "github-public-key-signature",
            Self::DepsDev => "gosst-public-key-signature",
        }
    }
}

/// One leaked token of a report: `{"token", "type", "url", "source"}`. `Debug` hides the token,
/// and its bytes are zeroed when the report is dropped.
#[derive(Deserialize)]
pub struct LeakedToken {
    #[serde(deserialize_with = "zeroized")]
    token: Zeroizing<String>,
    /// The name the scanner gave the matching pattern.
    #[serde(rename = "type", default)]
    pub token_type: String,
    /// Where the token was found (may be empty).
    #[serde(default)]
    pub url: String,
    /// What kind of place it was found in (`commit`, `npm`, ...).
    #[serde(default)]
    pub source: String,
}

fn zeroized<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

impl LeakedToken {
    /// A reported token (for applications that receive reports another way: see
    /// [`LeakReceiver::apply`]).
    pub fn new(
        token: impl Into<String>,
        token_type: impl Into<String>,
        url: impl Into<String>,
        source: impl Into<String>,
    ) -> Self {
        Self {
            token: Zeroizing::new(token.into()),
            token_type: token_type.into(),
            url: url.into(),
            source: source.into(),
        }
    }
}

impl fmt::Debug for LeakedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeakedToken")
            .field("token", &"…")
            .field("type", &self.token_type)
            .field("url", &self.url)
            .field("source", &self.source)
            .finish()
    }
}

/// GitHub's label for a reported token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// The token is one of our keys (active or not).
    TruePositive,
    /// The token is not one of our keys.
    FalsePositive,
}

/// One entry of the answer: `{"token_hash", "token_type", "label"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Feedback {
    /// SHA-256 of the token, lowercase hex.
    pub token_hash: String,
    /// The token's `type`, as reported.
    pub token_type: String,
    /// What the token is.
    pub label: Label,
}

/// Receives secret scanners' signed leak reports and applies a [`LeakPolicy`] to the keys they
/// name. Cheap to clone. Mount [`router`](super::router) or call [`receive`](Self::receive).
#[derive(Clone)]
pub struct LeakReceiver {
    inner: Arc<Inner>,
}

struct Inner {
    manager: KeyManager,
    scanners: HashMap<Scanner, KeySet>,
    policy: LeakPolicy,
}

impl fmt::Debug for LeakReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeakReceiver")
            .field("scanners", &self.inner.scanners)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// Builds a [`LeakReceiver`]: at least one scanner's keys, and a policy.
#[must_use]
pub struct LeakReceiverBuilder {
    manager: KeyManager,
    scanners: HashMap<Scanner, KeySet>,
    policy: LeakPolicy,
    fetcher: Arc<dyn FetchKeys>,
    refresh: Duration,
}

impl fmt::Debug for LeakReceiverBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeakReceiverBuilder")
            .field("scanners", &self.scanners)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl LeakReceiverBuilder {
    /// Accepts reports from `scanner` signed by one of `keys`.
    pub fn keys(mut self, scanner: Scanner, keys: PublicKeys) -> Self {
        self.scanners.insert(scanner, KeySet::Fixed(Arc::new(keys)));
        self
    }

    /// Accepts reports from `scanner` signed by one of the keys published at `url` (GitHub's JSON
    /// shape), fetched on the first report and again when a report names an identifier not held
    /// (at most once per [`refresh_interval`](Self::refresh_interval)).
    pub fn keys_url(mut self, scanner: Scanner, url: impl Into<String>) -> Self {
        let fetched = FetchedKeys::new(url.into(), self.fetcher.clone(), self.refresh);
        self.scanners
            .insert(scanner, KeySet::Fetched(Arc::new(fetched)));
        self
    }

    /// How documents given to later [`keys_url`](Self::keys_url) calls are fetched (default: plain
    /// HTTP/1.1, `http://` only).
    pub fn fetcher(mut self, fetcher: impl FetchKeys) -> Self {
        self.fetcher = Arc::new(fetcher);
        self
    }

    /// Shortest time between two fetches for later [`keys_url`](Self::keys_url) calls (default
    /// [`KEY_REFRESH_INTERVAL`]).
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh = interval;
        self
    }

    /// The policy (default: [`LeakAction::RevokeWithDescendants`] for every owner).
    pub fn policy(mut self, policy: LeakPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The receiver.
    pub fn build(self) -> LeakReceiver {
        LeakReceiver {
            inner: Arc::new(Inner {
                manager: self.manager,
                scanners: self.scanners,
                policy: self.policy,
            }),
        }
    }
}

impl LeakReceiver {
    /// A builder acting through `manager` (its resolver's key format tells our tokens apart).
    pub fn builder(manager: KeyManager) -> LeakReceiverBuilder {
        LeakReceiverBuilder {
            manager,
            scanners: HashMap::new(),
            policy: LeakPolicy::default(),
            fetcher: Arc::new(HttpFetcher),
            refresh: KEY_REFRESH_INTERVAL,
        }
    }

    /// The policy applied.
    pub fn policy(&self) -> &LeakPolicy {
        &self.inner.policy
    }

    /// Handles one report: `headers` and the raw `body` as received. A report whose signature is
    /// not accepted is refused (401 `LEAK_REPORT_UNVERIFIED`) before its body is even parsed.
    pub async fn receive(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Vec<Feedback>, AuthError> {
        if body.len() > MAX_REPORT_BYTES {
            return Err(AuthError::PayloadTooLarge {
                limit: MAX_REPORT_BYTES,
            });
        }
        self.verify(headers, body)
            .await
            .map_err(|why| AuthError::LeakReportUnverified(why.as_str()))?;
        let tokens: Vec<LeakedToken> = serde_json::from_slice(body)
            .map_err(|_| AuthError::invalid("the report is not a JSON array of leaked tokens"))?;
        if tokens.len() > MAX_REPORT_TOKENS {
            return Err(AuthError::invalid(format!(
                "a report holds at most {MAX_REPORT_TOKENS} tokens"
            )));
        }
        self.apply(&tokens).await
    }

    async fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), Unverified> {
        let mut found = None;
        for scanner in Scanner::ALL {
            let id = headers.get(scanner.identifier_header());
            let signature = headers.get(scanner.signature_header());
            match (id, signature) {
                (None, None) => continue,
                (Some(id), Some(signature)) if found.is_none() => {
                    let id = id.to_str().map_err(|_| Unverified::MalformedHeaders)?;
                    let signature = signature
                        .to_str()
                        .map_err(|_| Unverified::MalformedHeaders)?;
                    if id.len() > MAX_KEY_IDENTIFIER_LEN || signature.len() > MAX_SIGNATURE_LEN {
                        return Err(Unverified::MalformedHeaders);
                    }
                    found = Some((scanner, id, signature));
                }
                (Some(_), Some(_)) => return Err(Unverified::MalformedHeaders),
                _ => return Err(Unverified::MissingSignature),
            }
        }
        let (scanner, id, signature) = found.ok_or(Unverified::MissingSignature)?;
        let keys = self
            .inner
            .scanners
            .get(&scanner)
            .ok_or(Unverified::ScannerNotConfigured)?;
        keys.verify(id, signature, body).await
    }

    /// Labels every token of a verified report and applies the policy to the keys found. Tokens
    /// that fail the key format's check (prefix, length, checksum or keyed tag) are false
    /// positives found with no store lookup; the same token twice is looked up once.
    pub async fn apply(&self, tokens: &[LeakedToken]) -> Result<Vec<Feedback>, AuthError> {
        let manager = &self.inner.manager;
        let format = manager.resolver().format();
        let store = manager.resolver().store();
        let mut seen: HashMap<KeyDigest, Label> = HashMap::new();
        let mut acted = HashSet::new();
        let mut feedback = Vec::with_capacity(tokens.len());
        for leaked in tokens {
            let token = leaked.token.as_str();
            let digest = KeyDigest::of(token);
            let label = match seen.get(&digest) {
                Some(label) => *label,
                None => {
                    let ours = token.len() <= MAX_KEY_LEN && format.check(token).is_ok();
                    let label = match ours {
                        false => Label::FalsePositive,
                        true => match store.find_by_digest(&digest).await? {
                            None => Label::FalsePositive,
                            Some(record) => {
                                if acted.insert(record.id.clone()) {
                                    self.act(&record, leaked).await?;
                                }
                                Label::TruePositive
                            }
                        },
                    };
                    seen.insert(digest, label);
                    label
                }
            };
            feedback.push(Feedback {
                token_hash: hex_sha256(token.as_bytes()),
                token_type: leaked.token_type.clone(),
                label,
            });
        }
        Ok(feedback)
    }

    async fn act(
        &self,
        record: &crate::store::KeyRecord,
        leaked: &LeakedToken,
    ) -> Result<(), AuthError> {
        let manager = &self.inner.manager;
        let action = self.inner.policy.action_for(&record.owner);
        let master = Principal::master();
        let owner = Some(record.owner.as_str());
        tracing::warn!(
            api_key_id = %record.id,
            owner = %record.owner,
            url = %leaked.url,
            source = %leaked.source,
            action = ?action,
            "a secret scanner reported an API key as leaked"
        );
        // `key.leaked`, once per key and report location, in the audit trail (and so to
        // webhooks) before the action's own event.
        let event = EventDraft::new(
            EventType::KEY_LEAKED,
            Actor::master(),
            &Origin::default(),
            &record.owner,
        )
        .about(record)
        .detail("url", leaked.url.as_str())
        .detail("source", leaked.source.as_str())
        .detail(
            "action",
            match action {
                LeakAction::Notify => "notify",
                LeakAction::EndSecret => "end_secret",
                LeakAction::RevokeWithDescendants => "revoke_with_descendants",
            },
        );
        let notice = format!(
            "leaked:{}",
            &hex_sha256(format!("{}\n{}", leaked.url, leaked.source).as_bytes())[..32]
        );
        let at = event.at;
        match manager
            .resolver()
            .store()
            .record_notice_with(&record.id, &notice, at, &Journal::of(event))
            .await
        {
            // A store that keeps no notices: the action's own event still tells.
            Err(e) if e.kind() == crate::store::StoreErrorKind::Unsupported => {}
            other => drop(other?),
        }
        match action {
            LeakAction::Notify => {}
            LeakAction::RevokeWithDescendants => {
                manager
                    .revoke_because(
                        &master,
                        &record.id,
                        owner,
                        Some(RevokeReason::Leaked.as_str()),
                    )
                    .await?;
            }
            LeakAction::EndSecret => {
                if !record.is_active(time::OffsetDateTime::now_utc()) {
                    return Ok(()); // revoked or expired: the secret already works nowhere
                }
                // The leaked secret is the current one or one still in a rotation's grace: a
                // rotation without grace ends both, and the new secret is dropped (zeroed) unseen.
                match manager
                    .rotate_in(&master, &record.id, owner, RotateOptions::new())
                    .await
                {
                    Ok(created) => drop(created),
                    // Revoked or expired meanwhile (the only refusals of a master rotation
                    // without grace): the secret already works nowhere.
                    Err(AuthError::InvalidRequest(_)) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    }
}

/// SHA-256 of `bytes`, lowercase hex: GitHub's `token_hash`.
pub fn hex_sha256(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for byte in digest.iter() {
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hashes_are_lowercase_sha256_hex() {
        assert_eq!(
            hex_sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_leaked_token_never_shows_in_debug() {
        let token = LeakedToken::new("sk_live_secretsecret", "t", "https://x", "commit");
        let shown = format!("{token:?}");
        assert!(!shown.contains("secretsecret"), "{shown}");
        assert!(shown.contains("https://x"));
        let parsed: Vec<LeakedToken> =
            serde_json::from_str(r#"[{"token":"sk_live_secretsecret","type":"t"}]"#).unwrap();
        assert!(!format!("{parsed:?}").contains("secretsecret"));
        assert_eq!(parsed[0].url, "", "missing fields default to empty");
    }

    #[test]
    fn the_policy_applies_overrides_per_owner() {
        let policy = LeakPolicy::new()
            .default_action(LeakAction::Notify)
            .owner("a", LeakAction::EndSecret);
        assert_eq!(policy.action_for("a"), LeakAction::EndSecret);
        assert_eq!(policy.action_for("b"), LeakAction::Notify);
        assert_eq!(
            LeakPolicy::new().action_for("b"),
            LeakAction::RevokeWithDescendants
        );
    }
}
