//! Federated sessions without shared state: the `Mcp-Session-Id` the gateway gives a client
//! carries the upstream session of every member, sealed with an HMAC under a key made at start.
//! Any worker can serve any request of the session (no lookup, no lock, no cross-core traffic);
//! a forged or altered id fails the check and gets 404, as an unknown session must. A restart
//! makes a new key, so clients start new sessions, as they would with a restarted server.
//!
//! Sessions belong to the caller (tenant and agent) that opened them: a sealed session names its
//! owner, and the upstream sessions of passthrough routes are remembered with theirs in
//! [`Owners`]. Another caller presenting the id gets 404, as for an unknown session.

use std::sync::atomic::{AtomicU64, Ordering};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Bytes of the HMAC-SHA256 tag kept (128 bits).
const TAG: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FedSession {
    /// The protocol version agreed with the client.
    #[serde(rename = "v")]
    pub version: String,
    #[serde(rename = "m")]
    pub members: Vec<MemberSession>,
    /// Who opened it: tenant and agent.
    #[serde(rename = "o")]
    pub owner: Owner,
}

/// The caller a session belongs to: tenant name and agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner(pub String, pub Option<String>);

/// One member's upstream session: upstream name, its `Mcp-Session-Id` (if it gave one) and the
/// version it agreed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSession(pub String, pub Option<String>, pub String);

impl FedSession {
    pub fn member(&self, upstream: &str) -> Option<&MemberSession> {
        self.members.iter().find(|m| m.0 == upstream)
    }
}

#[expect(
    clippy::expect_used,
    reason = "at start only: no randomness, no gateway"
)]
pub fn new_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("the OS random source works");
    key
}

#[expect(
    clippy::expect_used,
    reason = "HMAC takes keys of any length: cannot fail"
)]
fn mac(key: &[u8; 32]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length")
}

/// The session id for `s`: visible ASCII, as MCP requires.
#[expect(
    clippy::expect_used,
    reason = "a struct of strings serializes: cannot fail"
)]
pub fn seal(key: &[u8; 32], s: &FedSession) -> String {
    let payload = serde_json::to_vec(s).expect("a session serializes");
    let mut m = mac(key);
    m.update(&payload);
    let tag = m.finalize().into_bytes();
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(&tag[..TAG])
    )
}

/// The session sealed in `id`, if it was sealed with `key` and not altered.
pub fn open(key: &[u8; 32], id: &str) -> Option<FedSession> {
    let (payload, tag) = id.split_once('.')?;
    let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    if tag.len() != TAG {
        return None;
    }
    let mut m = mac(key);
    m.update(&payload);
    m.verify_truncated_left(&tag).ok()?;
    serde_json::from_slice(&payload).ok()
}

/// Passthrough sessions seen at most this many at once (24 bytes each, and the map's own).
const MAX_OWNED: usize = 1 << 16;

/// The owner of each passthrough upstream session the gateway has seen opened, shared by the
/// workers: a keyed hash of (upstream, session id) → a keyed hash of the owner, and when it was
/// last used (s). Bounded: when full, the least recently used quarter is forgotten (their
/// clients get 404 and initialize again, as after a restart).
#[derive(Debug, Default)]
pub struct Owners {
    map: papaya::HashMap<u64, (u64, AtomicU64), rustc_hash::FxBuildHasher>,
}

impl Owners {
    /// Remembers that `session` belongs to `owner`. A session that already has another owner
    /// keeps it (an upstream that hands out a session id twice does not transfer it).
    pub fn bind(&self, session: u64, owner: u64, now_s: u64) {
        let map = self.map.pin();
        if map.get(&session).is_some_and(|(o, _)| *o != owner) {
            return;
        }
        if map.len() >= MAX_OWNED && !map.contains_key(&session) {
            let mut used: Vec<u64> = map
                .iter()
                .map(|(_, (_, t))| t.load(Ordering::Relaxed))
                .collect();
            used.sort_unstable();
            let cut = used.get(used.len() / 4).copied().unwrap_or(0);
            map.retain(|_, (_, t)| t.load(Ordering::Relaxed) > cut);
        }
        map.insert(session, (owner, AtomicU64::new(now_s)));
    }

    /// Forgets `session` if `owner` owns it (its `DELETE`): later uses get 404.
    pub fn end(&self, session: u64, owner: u64) {
        self.map
            .pin()
            .remove_if(&session, |_, (o, _)| *o == owner)
            .ok();
    }

    /// Every session with its owner and when it was last used: what a binary upgrade hands to
    /// the new process (whose keyed hashes match: it takes over the hash seed too).
    pub fn export(&self) -> Vec<(u64, u64, u64)> {
        self.map
            .pin()
            .iter()
            .map(|(s, (o, t))| (*s, *o, t.load(Ordering::Relaxed)))
            .collect()
    }

    /// Takes over what [`Owners::export`] gave (bounded like [`Owners::bind`]).
    pub fn import(&self, entries: impl IntoIterator<Item = (u64, u64, u64)>) {
        for (session, owner, used) in entries.into_iter().take(MAX_OWNED) {
            self.bind(session, owner, used);
        }
    }

    /// Whether `owner` may use `session`: only the owner of a session the gateway saw opened.
    pub fn may_use(&self, session: u64, owner: u64, now_s: u64) -> bool {
        match self.map.pin().get(&session) {
            Some((o, t)) if *o == owner => {
                t.store(now_s, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_sessions_open_only_unaltered_and_under_their_key() {
        let key = new_key();
        let s = FedSession {
            version: "2025-11-25".into(),
            members: vec![
                MemberSession("a".into(), Some("3f2c-é".into()), "2025-11-25".into()),
                MemberSession("b".into(), None, "2025-06-18".into()),
            ],
            owner: Owner("acme".into(), Some("bot".into())),
        };
        let id = seal(&key, &s);
        assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        assert_eq!(open(&key, &id), Some(s.clone()));
        assert_eq!(open(&new_key(), &id), None, "another key");
        // Any altered byte fails.
        for i in 0..id.len() {
            let mut bytes = id.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(bytes).unwrap();
            if altered != id {
                assert_eq!(open(&key, &altered), None, "byte {i}");
            }
        }
        let (payload, tag) = id.split_once('.').unwrap();
        assert_eq!(
            open(&key, &format!("{payload}.{}", &tag[..4])),
            None,
            "short tag"
        );
        assert_eq!(open(&key, payload), None);
        assert_eq!(open(&key, ""), None);
    }

    #[test]
    fn passthrough_sessions_are_usable_by_their_owner_only_and_the_table_is_bounded() {
        let owners = Owners::default();
        owners.bind(1, 10, 5);
        assert!(owners.may_use(1, 10, 6));
        assert!(!owners.may_use(1, 11, 6), "another owner");
        assert!(!owners.may_use(2, 10, 6), "never seen opened");
        // An upstream that hands the same id out again does not move it to another owner.
        owners.bind(1, 11, 6);
        assert!(owners.may_use(1, 10, 6) && !owners.may_use(1, 11, 6));
        for i in 0..MAX_OWNED as u64 + 10 {
            owners.bind(100 + i, 10, 7 + i);
        }
        assert!(owners.map.len() <= MAX_OWNED);
        assert!(
            owners.may_use(100 + MAX_OWNED as u64, 10, 9),
            "recent ones stay"
        );
    }
}
