//! What the fleet writes in Redis and reads back: values sealed with the fleet's secret, the
//! fields of windows, spends and caps, and Redis values read as the types expected.

use super::*;

/// HMAC-SHA256 of `parts` under `key`, each part length-prefixed.
pub(super) fn hmac(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    #[expect(
        clippy::expect_used,
        reason = "HMAC takes a key of any length: this cannot fail"
    )]
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p);
    }
    m
}

/// The session key of a fleet with a secret: derived from the secret and a salt kept in
/// Redis, so that who reads Redis cannot seal a session id.
pub(super) fn derive_session_key(secret: &FleetSecret, fleet: &str, salt: &str) -> [u8; 32] {
    hmac(
        &secret.0,
        &[
            b"mcp-gateway fleet session key v1",
            fleet.as_bytes(),
            salt.as_bytes(),
        ],
    )
    .finalize()
    .into_bytes()
    .into()
}

/// The prefix of a value sealed with the fleet's secret.
pub(super) const SEALED: &str = "sealed1:";

/// `value` as the fleet keeps it under `field` of `what`: with a secret, a MAC over the three
/// comes first, so that a Redis writer without the secret cannot make one the hosts take.
pub(super) fn seal(
    secret: Option<&FleetSecret>,
    fleet: &str,
    what: &str,
    field: &str,
    value: &str,
) -> String {
    match secret {
        None => value.to_owned(),
        Some(s) => {
            let mac = hmac(
                &s.0,
                &[
                    b"mcp-gateway fleet value v1",
                    fleet.as_bytes(),
                    what.as_bytes(),
                    field.as_bytes(),
                    value.as_bytes(),
                ],
            )
            .finalize()
            .into_bytes();
            format!("{SEALED}{}:{value}", URL_SAFE_NO_PAD.encode(mac))
        }
    }
}

/// The value of a sealed `raw` (see [`seal`]), or `None` when it is not sealed with this
/// fleet's secret (or is sealed and this host has no secret).
pub(super) fn open<'a>(
    secret: Option<&FleetSecret>,
    fleet: &str,
    what: &str,
    field: &str,
    raw: &'a str,
) -> Option<&'a str> {
    match (secret, raw.strip_prefix(SEALED)) {
        (None, None) => Some(raw),
        (None, Some(_)) | (Some(_), None) => None,
        (Some(s), Some(rest)) => {
            let (mac, value) = rest.split_once(':')?;
            let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
            hmac(
                &s.0,
                &[
                    b"mcp-gateway fleet value v1",
                    fleet.as_bytes(),
                    what.as_bytes(),
                    field.as_bytes(),
                    value.as_bytes(),
                ],
            )
            .verify_slice(&mac)
            .ok()?;
            Some(value)
        }
    }
}

/// The bytes of a reply's string (bulk or simple).
pub(super) fn bytes(v: &redis::Value) -> Option<&[u8]> {
    match v {
        redis::Value::BulkString(b) => Some(b),
        redis::Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// A reply's string as text (`None`: not a string, or not UTF-8).
pub(super) fn text(v: &redis::Value) -> Option<&str> {
    std::str::from_utf8(bytes(v)?).ok()
}

/// Whether `id` reads as a stream entry's id (`<ms>-<seq>`).
pub(super) fn is_stream_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        !ms.is_empty()
            && !seq.is_empty()
            && ms.bytes().chain(seq.bytes()).all(|b| b.is_ascii_digit())
    })
}

/// A reply's integer.
pub(super) fn int(v: &redis::Value) -> Option<i64> {
    match v {
        redis::Value::Int(n) => Some(*n),
        _ => text(v)?.parse().ok(),
    }
}

/// A budget window as the fleet names it: `<end unix s>|<len s>|<window>|<what as JSON>`.
pub(super) fn window_field(what: &Counted, len_s: u64, window: u64) -> Option<String> {
    let ends = window.saturating_add(1).saturating_mul(len_s);
    serde_json::to_string(what)
        .ok()
        .map(|w| format!("{ends}|{len_s}|{window}|{w}"))
}

/// A budget window read back from its field.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct WindowField {
    pub(super) end: u64,
    pub(super) len_s: u64,
    pub(super) window: u64,
    pub(super) what: Counted,
}

/// Reads a window field (see [`window_field`]): `None` unless it is one this host would write
/// (a budget's, its end matching its window).
pub(super) fn parse_window_field(wf: &str) -> Option<WindowField> {
    let mut parts = wf.splitn(4, '|');
    let end = parts.next()?.parse::<u64>().ok()?;
    let len_s = parts.next()?.parse::<u64>().ok()?;
    let window = parts.next()?.parse::<u64>().ok()?;
    let what = serde_json::from_str::<Counted>(parts.next()?).ok()?;
    let ok = len_s > 0
        && window.checked_add(1).and_then(|w| w.checked_mul(len_s)) == Some(end)
        && matches!(what, Counted::Budget { .. });
    ok.then_some(WindowField {
        end,
        len_s,
        window,
        what,
    })
}

/// Whether another host's spend is taken when `seen` spends are known, `runs` of them runs':
/// runs take at most half of [`BUDGET_SEEN`], so that the windows of tenants and agents (as
/// many as the configuration names) always find room.
pub(super) fn room_for(seen: usize, runs: usize, run: bool) -> bool {
    seen < BUDGET_SEEN && !(run && runs >= BUDGET_SEEN / 2)
}

/// A host's budget field, `<window field>|<host>`, split (host names never hold a `|`).
pub(super) fn split_host(field: &str) -> Option<(&str, &str)> {
    field
        .rsplit_once('|')
        .filter(|(wf, host)| !wf.is_empty() && !host.is_empty())
}

/// A host's spend in a window as published: `<amount>|<seq>`.
pub(super) fn parse_spend(v: &str) -> Option<(i64, u64)> {
    let (amount, seq) = v.split_once('|')?;
    let amount = amount.parse::<i64>().ok().filter(|a| *a >= 0)?;
    Some((amount, seq.parse().ok()?))
}

/// What a host's count under a concurrency cap is sealed with: the cap's name and the host.
pub(super) fn cap_field(name: &str, host: &str) -> String {
    format!("{name}|{host}")
}

/// A host's count under a concurrency cap as published: digits only, at most a million (no
/// host holds more requests or connections at once; a larger value is not a host's).
pub(super) fn parse_count(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 7 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|n| *n <= 1_000_000)
}
