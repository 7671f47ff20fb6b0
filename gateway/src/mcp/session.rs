//! Federated sessions without shared state: the `Mcp-Session-Id` the gateway gives a client
//! carries the upstream session of every member, sealed with an HMAC under a key made at start.
//! Any worker can serve any request of the session (no lookup, no lock, no cross-core traffic);
//! a forged or altered id fails the check and gets 404, as an unknown session must. A restart
//! makes a new key, so clients start new sessions, as they would with a restarted server.

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
}

/// One member's upstream session: upstream name, its `Mcp-Session-Id` (if it gave one) and the
/// version it agreed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSession(pub String, pub Option<String>, pub String);

impl FedSession {
    pub fn member(&self, upstream: &str) -> Option<&MemberSession> {
        self.members.iter().find(|m| m.0 == upstream)
    }
}

pub fn new_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("the OS random source works");
    key
}

fn mac(key: &[u8; 32]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length")
}

/// The session id for `s`: visible ASCII, as MCP requires.
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
}
