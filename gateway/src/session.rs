//! Federated sessions without shared state: the `Mcp-Session-Id` the gateway gives a client
//! carries the upstream session of every member, sealed with an HMAC under a key made at start.
//! Any worker can serve any request of the session (no lookup, no lock, no cross-core traffic);
//! a forged or altered id fails the check and gets 404, as an unknown session must. A restart
//! makes a new key, so clients start new sessions, as they would with a restarted server.
//!
//! Sessions belong to the caller (tenant and agent) that opened them: a sealed session names its
//! owner, and a passthrough client holds its upstream's session id [`sign`]ed with its owner.
//! Another caller presenting the id gets 404, as for an unknown session. The same signature
//! names the replica that minted an upstream session ([`endpoint_tag`]).

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::sync::atomic::{
    AtomicBool,
    Ordering::{AcqRel, Acquire, Release},
};

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
    /// With no agent, the credential that named who opened it
    /// ([`crate::policy::Identity::own`]). Ids sealed before it read as none.
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub own: Option<String>,
    /// Random ([`nonce`]): without it, the sessions one caller opens on a route whose members
    /// hold none of their own (stateless-only, stdio) would all be one id, and ending one would
    /// end every later one too. Ids sealed before it read as 0.
    #[serde(rename = "n", default)]
    pub nonce: u64,
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

/// A random number for a new session ([`FedSession::nonce`]); should the OS random source fail,
/// the clock and a count, still one of its own.
pub fn nonce() -> u64 {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    getrandom::u64().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos
            ^ COUNT
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .rotate_left(40)
    })
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

/// Sessions of the gateway's own ended at most this many at once remembered.
pub const MAX_ENDED: usize = 1 << 16;
/// Fresh ends waiting for the fleet agent at most (a round takes them every 25 ms or so; more
/// between two rounds, and the agent looks through the table for what it missed).
const FRESH: usize = 1 << 14;

/// Where a session the gateway gives its client ids for lives, in [`ended_key`].
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// A passthrough session bridged in front of this upstream (its name).
    Upstream(&'a str),
    /// A federated session.
    Federated,
}

/// The key a session id is remembered by in [`Ended`]: the first 8 bytes of an HMAC-SHA256
/// under the session key over the scope and the id (each part length-prefixed, in a context of
/// its own). The same on every gateway of a fleet (which agree the session key) and after an
/// upgrade (the key is handed over), and not to be made without the key: what the fleet shares
/// of an ended session is this, never its id.
pub fn ended_key(key: &[u8; 32], scope: Scope<'_>, id: &[u8]) -> u64 {
    let context: &[&[u8]] = match scope {
        Scope::Upstream(name) => &[b"ended", b"upstream", name.as_bytes()],
        Scope::Federated => &[b"ended", b"federated"],
    };
    let full = tagged(key, context, &[], id).finalize().into_bytes();
    let mut first = [0u8; 8];
    first.copy_from_slice(&full[..8]);
    u64::from_le_bytes(first)
}

/// The gateway's own sessions (those it makes for a session-era client of a stateless
/// upstream, which holds none) that their client ended with `DELETE`: [`ended_key`] → when
/// (unix s). A signed id needs no table to be valid; ending one does. Later uses get 404, as
/// the protocol wants. Bounded: when full, the oldest quarter is forgotten.
///
/// In a fleet, the agent [`share`](Ended::share)s: from then on each end made here is also
/// queued (lock-free, bounded) for the agent to send to the other gateways, and what they
/// ended comes in through [`absorb`](Ended::absorb), which queues nothing.
#[derive(Debug)]
pub struct Ended {
    map: papaya::HashMap<u64, u64, rustc_hash::FxBuildHasher>,
    /// Whether anything was ever ended: until then a check costs no hash.
    any: AtomicBool,
    /// Ends made here not yet taken by the fleet agent (only once it shares).
    fresh: std::sync::OnceLock<crossbeam_queue::ArrayQueue<u64>>,
    /// Whether `fresh` dropped ends since the agent last took it.
    overflowed: AtomicBool,
}

impl Default for Ended {
    fn default() -> Self {
        Self {
            map: papaya::HashMap::default(),
            any: AtomicBool::new(false),
            fresh: std::sync::OnceLock::new(),
            overflowed: AtomicBool::new(false),
        }
    }
}

impl Ended {
    /// Ends `session` here (and, when shared, in the fleet).
    pub fn end(&self, session: u64, now_s: u64) {
        self.insert(session, now_s, true);
        if let Some(q) = self.fresh.get()
            && q.force_push(session).is_some()
        {
            self.overflowed.store(true, Release);
        }
    }

    /// Ends `session` as another gateway of the fleet (or the process before an upgrade) did,
    /// at `when_s`: never queued to be sent. Answers whether it was not known here.
    pub fn absorb(&self, session: u64, when_s: u64) -> bool {
        self.insert(session, when_s, false)
    }

    fn insert(&self, session: u64, when_s: u64, refresh: bool) -> bool {
        self.any.store(true, Release);
        let map = self.map.pin();
        if map.len() >= MAX_ENDED && !map.contains_key(&session) {
            let mut when: Vec<u64> = map.values().copied().collect();
            when.sort_unstable();
            let cut = when.get(when.len() / 4).copied().unwrap_or(0);
            map.retain(|_, t| *t > cut);
        }
        if refresh {
            map.insert(session, when_s).is_none()
        } else {
            map.try_insert(session, when_s).is_ok()
        }
    }

    pub fn ended(&self, session: u64) -> bool {
        self.any.load(Acquire) && self.map.pin().contains_key(&session)
    }

    /// Whether the session `id` of `scope` was ended: no hash at all while nothing ever was.
    pub fn is_ended(&self, key: &[u8; 32], scope: Scope<'_>, id: &[u8]) -> bool {
        self.any.load(Acquire) && self.ended(ended_key(key, scope, id))
    }

    /// Every entry (key, when), to hand over to the next process of an upgrade (its keys are
    /// this one's: the session key is handed over too) or to publish to the fleet again.
    pub fn entries(&self) -> Vec<(u64, u64)> {
        self.map.pin().iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// From now on, ends made here are queued for the fleet agent ([`Ended::take_fresh`]).
    pub fn share(&self) {
        let _ = self
            .fresh
            .get_or_init(|| crossbeam_queue::ArrayQueue::new(FRESH));
    }

    /// The ends made here since the last call (at most `max`), and whether some were dropped
    /// from the queue since (the caller then looks through [`Ended::entries`]).
    pub fn take_fresh(&self, max: usize) -> (Vec<u64>, bool) {
        let overflowed = self.overflowed.swap(false, AcqRel);
        let Some(q) = self.fresh.get() else {
            return (Vec::new(), overflowed);
        };
        let mut out = Vec::with_capacity(q.len().min(max));
        while out.len() < max {
            match q.pop() {
                Some(k) => out.push(k),
                None => break,
            }
        }
        (out, overflowed)
    }
}

/// Requests in flight that their client may cancel with `notifications/cancelled`, where the
/// gateway, not the upstream, must act on it (a bridged call: closing its connection to the
/// stateless-era upstream is the cancellation there). The notification comes in another HTTP
/// request, maybe on another core: a keyed hash of (session, request id) → the call's
/// [`Cancel`], lock-free. An entry lives as long as its call ([`Registered`]).
#[derive(Debug, Default)]
pub struct Cancels {
    map: papaya::HashMap<u64, std::sync::Arc<Cancel>, rustc_hash::FxBuildHasher>,
}

#[derive(Debug, Default)]
pub struct Cancel {
    done: std::sync::atomic::AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

/// A call registered in [`Cancels`]; removed when dropped.
#[derive(Debug)]
pub struct Registered<'a> {
    cancels: &'a Cancels,
    key: u64,
    cancel: std::sync::Arc<Cancel>,
}

impl Cancels {
    pub fn register(&self, key: u64) -> Registered<'_> {
        let cancel = std::sync::Arc::new(Cancel::default());
        self.map.pin().insert(key, std::sync::Arc::clone(&cancel));
        Registered {
            cancels: self,
            key,
            cancel,
        }
    }

    /// Cancels the call registered as `key`, if there is one.
    pub fn cancel(&self, key: u64) {
        if let Some(c) = self.map.pin().get(&key) {
            c.done.store(true, std::sync::atomic::Ordering::Release);
            c.waker.wake();
        }
    }
}

impl Registered<'_> {
    /// Resolves when the call is cancelled.
    pub async fn cancelled(&self) {
        std::future::poll_fn(|cx| {
            self.cancel.waker.register(cx.waker());
            if self.cancel.done.load(std::sync::atomic::Ordering::Acquire) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        // Only this call's entry: a later call with the same id may have taken the key.
        let _ = self
            .cancels
            .map
            .pin()
            .remove_if(&self.key, |_, c| std::sync::Arc::ptr_eq(c, &self.cancel));
    }
}

/// Bytes of the tag on a client's passthrough session id, and of an endpoint's tag (64 bits:
/// a forger's guess succeeds once in 2^64 tries).
const SIGNED_TAG: usize = 16;
pub const ENDPOINT_TAG: usize = 8;

/// `value` (an upstream's session id: visible ASCII) with `extra` and a tag under `key` over
/// `context`, `extra` and the value: `{value}.{base64url(extra ‖ tag)}`. What the client holds
/// instead of the upstream's id, so that the gateway needs no table to know what the id is
/// bound to (its owner, the replica that minted it): any worker, a new process after an
/// upgrade, or another gateway of a fleet (same key) reads it from the id itself.
pub fn sign(key: &[u8; 32], context: &[&[u8]], extra: &[u8], value: &[u8]) -> Vec<u8> {
    signed_form(value, extra, &signed_tag(key, context, extra, value))
}

/// `{value}.{extra and tag}`, the two in base64: what [`sign`] and [`Signer::sign`] write.
fn signed_form(value: &[u8], extra: &[u8], tag: &[u8]) -> Vec<u8> {
    let mut tail = Vec::with_capacity(extra.len() + tag.len());
    tail.extend_from_slice(extra);
    tail.extend_from_slice(tag);
    let mut out = Vec::with_capacity(value.len() + 1 + (tail.len() * 4).div_ceil(3));
    out.extend_from_slice(value);
    out.push(b'.');
    out.extend_from_slice(URL_SAFE_NO_PAD.encode(&tail).as_bytes());
    out
}

/// The value and its `N` bytes of extra from what [`sign`] made with the same key and context;
/// `None` for anything else (altered, forged, another context).
pub fn verify<'a, const N: usize>(
    key: &[u8; 32],
    context: &[&[u8]],
    signed: &'a [u8],
) -> Option<(&'a [u8], [u8; N])> {
    let dot = signed.iter().rposition(|b| *b == b'.')?;
    let (value, tail) = (&signed[..dot], &signed[dot + 1..]);
    if tail.len() > 64 {
        return None;
    }
    let tail = URL_SAFE_NO_PAD.decode(tail).ok()?;
    if tail.len() != N + SIGNED_TAG {
        return None;
    }
    let (extra, tag) = tail.split_at(N);
    let m = tagged(key, context, extra, value);
    m.verify_truncated_left(tag).ok()?;
    Some((value, extra.try_into().ok()?))
}

/// [`sign`] of many values under one key, context and `extra`: the context is hashed once,
/// each value after it (the event ids of one answer's stream, say).
#[derive(Clone)]
pub struct Signer {
    mac: Hmac<Sha256>,
    extra: Vec<u8>,
}

impl Signer {
    pub fn new(key: &[u8; 32], context: &[&[u8]], extra: &[u8]) -> Self {
        Self {
            mac: with_parts(mac(key), context.iter().copied().chain([extra])),
            extra: extra.to_vec(),
        }
    }

    /// What [`sign`] makes of `value` with this key, context and extra: `{value}.{extra and
    /// tag}`.
    pub fn sign(&self, value: &[u8]) -> Vec<u8> {
        let full = with_parts(self.mac.clone(), [value])
            .finalize()
            .into_bytes();
        signed_form(value, &self.extra, &full[..SIGNED_TAG])
    }
}

fn tagged(key: &[u8; 32], context: &[&[u8]], extra: &[u8], value: &[u8]) -> Hmac<Sha256> {
    with_parts(mac(key), context.iter().copied().chain([extra, value]))
}

/// `m` fed `parts`, each with its length: no two different contexts make the same input.
fn with_parts<'p>(mut m: Hmac<Sha256>, parts: impl IntoIterator<Item = &'p [u8]>) -> Hmac<Sha256> {
    for part in parts {
        m.update(&(part.len() as u64).to_le_bytes());
        m.update(part);
    }
    m
}

fn signed_tag(key: &[u8; 32], context: &[&[u8]], extra: &[u8], value: &[u8]) -> [u8; SIGNED_TAG] {
    let full = tagged(key, context, extra, value).finalize().into_bytes();
    let mut tag = [0u8; SIGNED_TAG];
    tag.copy_from_slice(&full[..SIGNED_TAG]);
    tag
}

/// A replica's name in the session ids it mints: a keyed hash of its address (the address
/// itself is not shown to clients).
pub fn endpoint_tag(key: &[u8; 32], addr: std::net::SocketAddr) -> [u8; ENDPOINT_TAG] {
    let full = tagged(key, &[b"endpoint"], &[], addr.to_string().as_bytes())
        .finalize()
        .into_bytes();
    let mut tag = [0u8; ENDPOINT_TAG];
    tag.copy_from_slice(&full[..ENDPOINT_TAG]);
    tag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signer_signs_as_sign_does() {
        let key = new_key();
        let context: [&[u8]; 3] = [b"event", b"up", b"acme"];
        let signer = Signer::new(&key, &context, &[]);
        let with_extra = Signer::new(&key, &context, b"12345678");
        for value in [&b"1_0"[..], b"", b"a.b.c", "é".as_bytes()] {
            let signed = signer.sign(value);
            assert_eq!(signed, sign(&key, &context, &[], value));
            assert_eq!(verify::<0>(&key, &context, &signed), Some((value, [])));
            let other: [&[u8]; 3] = [b"event", b"up", b"beta"];
            assert_eq!(verify::<0>(&key, &other, &signed), None);
            let signed = with_extra.sign(value);
            assert_eq!(signed, sign(&key, &context, b"12345678", value));
            assert_eq!(
                verify::<8>(&key, &context, &signed),
                Some((value, *b"12345678"))
            );
            assert_eq!(verify::<0>(&key, &context, &signed), None);
        }
    }

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
            own: None,
            nonce: nonce(),
        };
        let id = seal(&key, &s);
        // The same session made again is another id.
        let again = FedSession {
            nonce: nonce(),
            ..s.clone()
        };
        assert_ne!(seal(&key, &again), id);
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
    fn signed_ids_verify_only_unaltered_under_their_key_and_context() {
        let key = new_key();
        let ctx: [&[u8]; 3] = [b"owner", b"up", b"acme"];
        let id = String::from_utf8(sign(&key, &ctx, &[7; 8], b"3f2c.a-b")).unwrap();
        assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        assert!(
            id.starts_with("3f2c.a-b."),
            "the upstream's id stays readable"
        );
        assert_eq!(
            verify::<8>(&key, &ctx, id.as_bytes()),
            Some((&b"3f2c.a-b"[..], [7; 8]))
        );
        assert_eq!(
            verify::<8>(&new_key(), &ctx, id.as_bytes()),
            None,
            "another key"
        );
        let other: [&[u8]; 3] = [b"owner", b"up", b"acmf"];
        assert_eq!(
            verify::<8>(&key, &other, id.as_bytes()),
            None,
            "another owner"
        );
        // Parts are length-prefixed: moving a byte between them is another context.
        let shifted: [&[u8]; 3] = [b"owner", b"upa", b"cme"];
        assert_eq!(verify::<8>(&key, &shifted, id.as_bytes()), None);
        assert_eq!(
            verify::<0>(&key, &ctx, id.as_bytes()),
            None,
            "another shape"
        );
        for i in 0..id.len() {
            let mut bytes = id.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            if bytes != id.as_bytes() {
                assert_eq!(verify::<8>(&key, &ctx, &bytes), None, "byte {i}");
            }
        }
        assert_eq!(
            verify::<8>(&key, &ctx, b"3f2c"),
            None,
            "the bare upstream id"
        );
        assert_eq!(verify::<8>(&key, &ctx, b""), None);
        // Without extra.
        let plain = sign(&key, &ctx, &[], b"s1");
        assert_eq!(verify::<0>(&key, &ctx, &plain), Some((&b"s1"[..], [])));
        let a = "127.0.0.1:1".parse().unwrap();
        let b = "127.0.0.1:2".parse().unwrap();
        assert_eq!(endpoint_tag(&key, a), endpoint_tag(&key, a));
        assert_ne!(endpoint_tag(&key, a), endpoint_tag(&key, b));
    }

    #[test]
    fn ended_sessions_are_remembered_within_a_bound() {
        let ended = Ended::default();
        assert!(!ended.ended(1));
        ended.end(1, 5);
        assert!(ended.ended(1));
        for i in 0..MAX_ENDED as u64 + 10 {
            ended.end(100 + i, 6 + i);
        }
        assert!(ended.map.len() <= MAX_ENDED);
        assert!(ended.ended(100 + MAX_ENDED as u64), "recent ones stay");
    }

    #[test]
    fn an_ended_key_is_the_same_wherever_the_session_key_is_and_differs_by_scope() {
        let key = new_key();
        let id = b"eyJ2IjoiMjAyNS0wNi0xOCJ9.AAAA";
        let (here, there) = (Ended::default(), Ended::default());
        // Ended on one gateway, its key absorbed by another of the fleet: ended there too.
        assert!(!there.is_ended(&key, Scope::Federated, id));
        here.end(ended_key(&key, Scope::Federated, id), 10);
        for (k, when) in here.entries() {
            assert!(there.absorb(k, when));
            assert!(!there.absorb(k, when), "known already");
        }
        assert!(there.is_ended(&key, Scope::Federated, id));
        assert_eq!(
            ended_key(&key, Scope::Upstream("u"), id),
            ended_key(&key, Scope::Upstream("u"), id)
        );
        // Another scope, upstream, id or session key: another key.
        let other = [
            ended_key(&key, Scope::Upstream("u"), id),
            ended_key(&key, Scope::Upstream("v"), id),
            ended_key(&key, Scope::Upstream("federated"), id),
            ended_key(&key, Scope::Federated, b"eyJ2IjoiMjAyNS0wNi0xOCJ9.AAAB"),
            ended_key(&new_key(), Scope::Federated, id),
        ];
        for k in other {
            assert!(!there.ended(k));
        }
        let unique: std::collections::HashSet<u64> = other.iter().copied().collect();
        assert_eq!(unique.len(), other.len());
    }

    #[test]
    fn ends_made_here_are_queued_for_the_fleet_only_once_shared_and_never_those_absorbed() {
        let ended = Ended::default();
        ended.end(1, 5);
        assert_eq!(ended.take_fresh(10), (vec![], false), "not shared yet");
        ended.share();
        ended.end(2, 6);
        ended.absorb(3, 6);
        ended.end(4, 7);
        assert_eq!(ended.take_fresh(1), (vec![2], false));
        assert_eq!(ended.take_fresh(10), (vec![4], false));
        assert_eq!(ended.take_fresh(10), (vec![], false));
        // More than the queue holds between two takes: the oldest are dropped, and said to be.
        for i in 0..FRESH as u64 + 3 {
            ended.end(1000 + i, 8);
        }
        let (fresh, overflowed) = ended.take_fresh(usize::MAX);
        assert!(overflowed);
        assert_eq!(fresh.len(), FRESH);
        assert_eq!(fresh.first(), Some(&1003));
        assert!((1..4).all(|k| ended.ended(k)));
    }
}
