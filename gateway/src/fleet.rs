//! The fleet agent (`[state] redis`): one task on the control thread that shares this
//! gateway's policy state with the other gateways of its fleet through Redis.
//!
//! Every round (`fleet_round_ms`, default 25 ms) it makes one exchange with Redis, with atomic
//! Lua scripts: it asks for the tokens of fleet-wide rates that this host's workers will need
//! (each rate is one token bucket in Redis; what it grants becomes this host's lease, which
//! the workers take with one atomic operation), sends the budget spend made here since the
//! last round and reads the fleet's totals, and, less often, beats its heartbeat, exchanges
//! bans and pin approvals and the sessions their clients ended (of those the gateway itself
//! holds: a session ended on one gateway is ended on all). It also agrees the key that seals
//! session ids at start.
//!
//! It never runs on the request path and the workers never wait for it: they read what it
//! published (leases, totals, the fleet mode) without locks. When Redis cannot be reached,
//! rates fall back to this host's share (`limit ÷ live hosts`) and budgets refuse (unless
//! `fleet_fail_open`); recovery is automatic at the next round that reaches Redis. Rounds that
//! fail for under a second once the fleet was reached (a slow command in Redis, a connection
//! made again) keep the fleet's state instead ([`FALLBACK_AFTER`]).
//!
//! Redis is a shared store, not a trusted one: the connection is TLS when the address is
//! `rediss://` (never plaintext then); a Redis that lost its data (an `epoch` key gone) is
//! re-seeded from what the hosts know rather than trusted at zero; with a fleet secret
//! (`fleet_secret_env`) the session key is derived from the secret (Redis holds only a salt)
//! and approvals, bans, ended sessions, each host's budget spend and its entry in the
//! live-hosts registry carry a MAC, so a Redis writer without the secret can neither approve a
//! tool, nor ban an address, nor end a session, nor lower or replay a spend (it can still
//! delete what is there, which the hosts write back, and loosen or tighten the fleet-wide
//! rates, which Redis counts). Whatever Redis holds, a round goes on: keys of the wrong type
//! and values that do not parse are deleted and counted, and a round's work is bounded by what
//! the host knows, not by what is in Redis.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant, SystemTime},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use redis::aio::MultiplexedConnection;
use sha2::Sha256;

use crate::{
    config::{FleetConfig, FleetSecret},
    policy::limits::{Counted, FLEET_FALLBACK, FLEET_LEASED, MILLI},
    session::MAX_ENDED,
    shared::{FleetStats, Shared},
};

/// A host not heard from for this long is no longer counted live.
const HOST_TTL: Duration = Duration::from_secs(3);
/// Rounds that fail for less than this after the fleet was reached keep its state (leases,
/// totals, the others' counts): a Redis that is slow for a moment, or a connection that has to
/// be made again, does not make every gateway refuse budgets at once. A gateway that has not
/// reached Redis since it started, or rounds failing for longer, fall back. The grace is
/// given again only after this long without a failed round: whoever can slow Redis cannot keep
/// the gateways on state a second old by letting a round through now and then.
const FALLBACK_AFTER: Duration = Duration::from_secs(1);
/// A lease nobody asked for in this many rounds is dropped (its tokens with it).
const IDLE_ROUNDS: u32 = 400;

/// Lua helpers every script starts with. `fix` deletes a key of another type than the script
/// expects (a `SET` over a hash, by anyone: a WRONGTYPE error would fail every round of every
/// host) and answers 1 for the count of what was ignored; `num` reads a finite number ≥ 0.
macro_rules! lua_prelude {
    () => {
        r"
local function fix(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= kind and t ~= 'none' then
    redis.call('DEL', key)
    return 1
  end
  return 0
end
local function num(s)
  local n = tonumber(s)
  if n == nil or n ~= n or n < 0 or n == math.huge then
    return nil
  end
  return n
end
"
    };
}

/// Leases tokens of each fleet-wide rate, shared fairly between the hosts that want them:
/// `KEYS` the rates, `ARGV[1]` this host, `ARGV[2]` the round in microseconds, `ARGV[3]` how
/// many other live hosts follow (their names), then for each rate its rate per second, burst,
/// the tokens wanted and those the host holds unused. Each host has its own bucket in the
/// rate's hash (`host → want|at|level`), refilled at its share of the rate, the share being its
/// want over the wants of every live host that asked in the last four rounds; so the hosts'
/// shares add up to the rate whatever order their rounds reach Redis in (one bucket taken first
/// come, first served starves a host whose rounds fall just after another's). A bucket and what
/// its host holds unused come to at most its share of the burst or of two rounds, whichever is
/// more. Only the live hosts' fields are read (`HMGET`), and a host's want counts at most what
/// a host may ask (a field written by someone else cannot shrink the others' shares beyond
/// that); a field that does not parse is deleted, and a hash grown well beyond the live hosts
/// is cut back to them. Answers the thousandths of a token granted for each rate (fractions add
/// up on the host), then the count of what was ignored. Redis's own clock refills the buckets,
/// so the hosts' clocks do not matter; a host silent for a minute is forgotten.
const RATES: &str = concat!(
    lua_prelude!(),
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local host = ARGV[1]
local round = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local hosts = {host}
for j = 1, n do
  hosts[j + 1] = ARGV[3 + j]
end
local bad = 0
local out = {}
for i, key in ipairs(KEYS) do
  local b = 3 + n + 4 * (i - 1)
  local rate = tonumber(ARGV[b + 1])
  local burst = tonumber(ARGV[b + 2])
  local want = tonumber(ARGV[b + 3])
  local held = tonumber(ARGV[b + 4])
  local most = math.max(burst, rate * 2 * round / 1000000) + 1
  bad = bad + fix(key, 'hash')
  local total = want
  local at, level = nil, nil
  local kept = {}
  local vals = redis.call('HMGET', key, unpack(hosts))
  for j = 1, #hosts do
    local raw = vals[j]
    if raw then
      local w, a, l = string.match(raw, '^([^|]+)|([^|]+)|([^|]+)$')
      w, a, l = num(w), num(a), num(l)
      if w == nil or a == nil or l == nil then
        redis.call('HDEL', key, hosts[j])
        bad = bad + 1
      elseif now - a > 60000000 then
        redis.call('HDEL', key, hosts[j])
      elseif j == 1 then
        at, level = a, l
      else
        kept[#kept + 1] = hosts[j]
        kept[#kept + 1] = raw
        if now - a < 4 * round then
          total = total + math.min(w, most)
        end
      end
    end
  end
  if redis.call('HLEN', key) > #hosts + 16 then
    redis.call('DEL', key)
    if #kept > 0 then
      redis.call('HSET', key, unpack(kept))
    end
  end
  local share = want / total
  local cap = math.max(0, math.max(burst, rate * 2 * round / 1000000) * share - held)
  if level == nil then
    level = cap
  else
    level = math.min(cap, level + math.max(0, now - at) * rate * share / 1000000)
  end
  local grant = math.floor(math.max(0, math.min(want, level)) * 1000)
  level = level - grant / 1000
  redis.call('HSET', key, host, string.format('%d|%.0f|%.6f', want, now, level))
  redis.call('PEXPIRE', key, 60000)
  out[i] = grant
end
out[#KEYS + 1] = bad
return out
"
);

/// How many fields of the budgets' hash a round looks through for counts this host does not
/// know yet (an `HSCAN` step; a hash flooded with fields costs more rounds, not more work).
const BUDGET_SCAN: u64 = 512;
/// At most this many budget fields are asked for by name in a round, and remembered.
const BUDGET_GETS: usize = 4096;
const BUDGET_SEEN: usize = 16384;

/// Publishes this host's budget spend and reads the others': `KEYS[1]` the hash (field
/// `<end unix s>|<len s>|<window>|<what as JSON>|<host>` → `<spend>|<seq>`, sealed with a
/// fleet secret: each host's whole spend in the window, `seq` growing with each change),
/// `KEYS[2]` the fleet's epoch. `ARGV[1]` an epoch to set if there is none, `ARGV[2]` the
/// `HSCAN` cursor, `ARGV[3]` its step, `ARGV[4]` and `ARGV[5]` how many fields to delete and
/// how many field and value pairs to write follow, then those, then the fields to read. A
/// value is written only over one with a lower `seq` (or none, or one without), so the hosts
/// that publish again what they know after a loss never go back. Answers the epoch, the count
/// of what was ignored here, the next cursor, how many values read follow (`''`: none), them,
/// then the fields and values of the scan step; fields of windows that ended, or that do not
/// parse, are deleted.
const BUDGETS: &str = concat!(
    lua_prelude!(),
    r"
local bad = fix(KEYS[1], 'hash') + fix(KEYS[2], 'string')
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
local nd, np = tonumber(ARGV[4]), tonumber(ARGV[5])
local i = 6
for j = 1, nd do
  redis.call('HDEL', KEYS[1], ARGV[i])
  i = i + 1
end
for j = 1, np do
  local f, v = ARGV[i], ARGV[i + 1]
  i = i + 2
  local old = redis.call('HGET', KEYS[1], f)
  local had = old and tonumber(string.match(old, '|(%d+)$'))
  local new = tonumber(string.match(v, '|(%d+)$'))
  if new and (not had or new > had) then
    redis.call('HSET', KEYS[1], f, v)
  end
end
local gets = {}
for j = i, #ARGV do
  gets[#gets + 1] = ARGV[j]
end
local out = {epoch, 0, '0', #gets}
if #gets > 0 then
  local vals = redis.call('HMGET', KEYS[1], unpack(gets))
  for j = 1, #gets do
    out[#out + 1] = vals[j] or ''
  end
end
local now = tonumber(redis.call('TIME')[1])
local scan = redis.call('HSCAN', KEYS[1], ARGV[2], 'COUNT', ARGV[3])
out[3] = scan[1]
local all = scan[2]
for j = 1, #all, 2 do
  local ends = tonumber(string.match(all[j], '^(%d+)|'))
  if ends == nil then
    redis.call('HDEL', KEYS[1], all[j])
    bad = bad + 1
  elseif ends <= now then
    redis.call('HDEL', KEYS[1], all[j])
  else
    out[#out + 1] = all[j]
    out[#out + 1] = all[j + 1]
  end
end
out[2] = bad
return out
"
);

/// Reads a hash (`KEYS[1]`) with the fleet's epoch (`KEYS[2]`), atomically: answers the count
/// of keys of the wrong type deleted, the epoch (`''`: none), then the fields and values.
const READ_HASH: &str = concat!(
    lua_prelude!(),
    r"
local bad = fix(KEYS[1], 'hash') + fix(KEYS[2], 'string')
local out = {bad, redis.call('GET', KEYS[2]) or ''}
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all do
  out[#out + 1] = all[j]
end
return out
"
);

/// The live hosts of the fleet (`KEYS[1]`, as [`HEARTBEAT`] keeps them), without beating.
const LIVE_HOSTS: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], now, now + 2 * tonumber(ARGV[1]))
";

/// Agrees a value (`KEYS[1]`): sets `ARGV[1]` unless there is one, answers the one there. A key
/// of another type is replaced.
const AGREE: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' then
  redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
";

/// Beats this host's heartbeat and answers the live hosts: `KEYS[1]` the set of hosts (score:
/// when the host expires, in ms of Redis's clock), `ARGV` this host's member, the TTL, then
/// members to remove (found not sealed with the fleet's secret). Members expiring later than
/// a heartbeat could set are removed (not set by a host). Answers the count of what was
/// ignored here, then at most 256 live members.
const HEARTBEAT: &str = concat!(
    lua_prelude!(),
    r"
local bad = fix(KEYS[1], 'zset')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for j = 3, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[j])
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
bad = bad + redis.call('ZREMRANGEBYSCORE', KEYS[1], string.format('(%d', now + 2 * ttl), '+inf')
local out = {bad}
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'LIMIT', 0, 256)
for j = 1, #live do
  out[j + 1] = live[j]
end
return out
"
);

/// At most this many concurrency caps are shared (each a hash in Redis, read every round);
/// beyond, a cap counts on each host alone.
const CAPS_MAX: usize = 1024;

/// Publishes what this host holds under each concurrency cap and reads what the other live
/// hosts hold: `KEYS` one hash per cap (field: host → count, sealed with a fleet secret),
/// `ARGV[1]` this host, `ARGV[2]` how many other live hosts follow (their names), then for each
/// cap this host's value (`''`: left as it is). Only the live hosts' fields
/// are read (`HMGET`): a host's count goes with its liveness; a hash grown 16 fields past the
/// live hosts is cut back to them. Answers for each cap the others' values in the order of
/// the hosts (`''`: none), then the count of what was ignored.
const CAPS: &str = concat!(
    lua_prelude!(),
    r"
local host = ARGV[1]
local n = tonumber(ARGV[2])
local hosts = {}
for j = 1, n do
  hosts[j] = ARGV[2 + j]
end
local bad = 0
local out = {}
for i, key in ipairs(KEYS) do
  bad = bad + fix(key, 'hash')
  local mine = ARGV[2 + n + i]
  if mine ~= '' then
    redis.call('HSET', key, host, mine)
    redis.call('PEXPIRE', key, 60000)
  end
  local vals = {}
  if n > 0 then
    vals = redis.call('HMGET', key, unpack(hosts))
  end
  if redis.call('HLEN', key) > n + 17 then
    local own = redis.call('HGET', key, host)
    local kept = {}
    for j = 1, n do
      if vals[j] then
        kept[#kept + 1] = hosts[j]
        kept[#kept + 1] = vals[j]
      end
    end
    if own then
      kept[#kept + 1] = host
      kept[#kept + 1] = own
    end
    redis.call('DEL', key)
    if #kept > 0 then
      redis.call('HSET', key, unpack(kept))
      redis.call('PEXPIRE', key, 60000)
    end
  end
  local row = {}
  for j = 1, n do
    row[j] = vals[j] or ''
  end
  out[i] = row
end
out[#KEYS + 1] = bad
return out
"
);

/// At most this many sessions ended here are sent in a round, and this many entries of the
/// stream of ended sessions read (a host behind, a new one reading from the start, reads on at
/// the next round).
const ENDED_SEND: usize = 1024;
const ENDED_READ: usize = 4096;

/// Sessions ended on the gateways of the fleet (`KEYS[1]`, a stream, each entry `k` → the
/// session's [`crate::session::ended_key`] in hex, sealed with a fleet secret): `ARGV[1]`
/// the id of the last entry this host read (`0-0`: none), `ARGV[2]` how many to read,
/// `ARGV[3]` the stream's length kept (about: `MAXLEN ~`), then the values to add. When the
/// entry at the cursor is gone (Redis lost the stream, someone deleted it, or the host fell
/// more than the length kept behind), the stream is read from the start. Answers the count of
/// what was ignored here, 1 if the stream was read again from the start (else 0), the new
/// cursor, then the id and value of each entry read (`''`: an entry without a `k`). Entry ids
/// are Redis's, so the hosts' clocks do not matter.
const ENDED: &str = concat!(
    lua_prelude!(),
    r"
local bad = fix(KEYS[1], 'stream')
local cursor = ARGV[1]
local count = tonumber(ARGV[2])
if not string.match(cursor, '^%d+%-%d+$') then
  cursor = '0-0'
end
local reset = 0
if cursor ~= '0-0' and #redis.call('XRANGE', KEYS[1], cursor, cursor) == 0 then
  reset, cursor = 1, '0-0'
end
for j = 4, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'k', ARGV[j])
end
local read = redis.call('XRANGE', KEYS[1], cursor, '+', 'COUNT', count + 1)
local out = {bad, reset, cursor}
local n = 0
for _, e in ipairs(read) do
  if e[1] ~= cursor and n < count then
    n = n + 1
    local f = e[2]
    local v = ''
    if f[1] == 'k' and f[2] then
      v = f[2]
    end
    out[#out + 1] = e[1]
    out[#out + 1] = v
    out[3] = e[1]
  end
end
return out
"
);

/// The scripts of a round, called by their SHA1 (`EVALSHA`): Redis keeps each compiled, and a
/// round sends its hash instead of its text. A Redis that does not know one (a new connection,
/// a restart, `SCRIPT FLUSH`) answers `NOSCRIPT`, and the round loads them and is sent again.
static ROUND_SCRIPTS: std::sync::LazyLock<[(&str, String); 6]> = std::sync::LazyLock::new(|| {
    [RATES, BUDGETS, READ_HASH, HEARTBEAT, ENDED, CAPS]
        .map(|src| (src, redis::Script::new(src).get_hash().to_owned()))
});
/// Indexes of [`ROUND_SCRIPTS`].
const S_RATES: usize = 0;
const S_BUDGETS: usize = 1;
const S_READ_HASH: usize = 2;
const S_HEARTBEAT: usize = 3;
const S_ENDED: usize = 4;
const S_CAPS: usize = 5;

/// An `EVALSHA` of the script `script` of [`ROUND_SCRIPTS`] over `keys` keys.
fn evalsha(script: usize, keys: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(ROUND_SCRIPTS[script].1.as_str()).arg(keys);
    cmd
}

/// Sends a round's commands in one exchange (a pipeline): answers each command's reply, a
/// server error among them as a value. Scripts Redis does not know are loaded, and the
/// round sent again (scripts that ran are not: a `NOSCRIPT` answers them all).
async fn exchange(
    c: &mut MultiplexedConnection,
    pipe: &redis::Pipeline,
) -> redis::RedisResult<Vec<redis::Value>> {
    let no_script = |v: &redis::Value| matches!(v, redis::Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript));
    let mut replies: Vec<redis::Value> = pipe.query_async(c).await?;
    if replies.iter().any(no_script) {
        let mut load = redis::pipe();
        for (src, _) in ROUND_SCRIPTS.iter() {
            load.cmd("SCRIPT").arg("LOAD").arg(*src).ignore();
        }
        let () = load.query_async(c).await?;
        replies = pipe.query_async(c).await?;
    }
    Ok(replies)
}

/// A pipeline for [`exchange`]: each command's reply is answered, errors as values.
fn round_pipe() -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    pipe
}

/// A script's reply as the array it answers, or the error Redis answered instead.
fn array(v: redis::Value) -> redis::RedisResult<Vec<redis::Value>> {
    match v {
        redis::Value::Array(a) => Ok(a),
        redis::Value::ServerError(e) => Err(e.into()),
        _ => Err((
            redis::ErrorKind::UnexpectedReturnType,
            "a fleet script answered no array",
        )
            .into()),
    }
}

/// A hash of the fleet's as read with the epoch (`None`: no epoch): its fields and values.
type HashRead = (Option<String>, Vec<(Vec<u8>, Vec<u8>)>);

/// One part of a round's exchange, with what its reply is read with.
enum Part {
    Heartbeat,
    Rates(Vec<(u64, u64)>),
    Budgets(Box<BudgetRound>),
    Bans,
    Pins,
    /// The sessions ended here sent in the round.
    Ended(Vec<u64>),
    /// The caps, and the other hosts whose counts were asked for (in the reply's order: a
    /// heartbeat earlier in the round may change the live hosts).
    Caps(Vec<CapSent>, Vec<String>),
}

/// What a concurrency cap counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CapOf {
    /// Requests in flight (`max_concurrent`), under this key of the limits' state.
    InFlight(u64),
    /// Live connections of the tenant of this id (`max_connections`).
    Conns(u32),
}

/// A concurrency cap as a caps exchange sent it.
#[derive(Debug)]
struct CapSent {
    /// What the fleet counts it under (the same words on every host).
    name: String,
    /// `None`: removed here (0 published, once).
    of: Option<CapOf>,
    /// This host's count, if sent.
    here: Option<u64>,
}

/// What a budgets exchange sent, kept until Redis answers (or put back if it does not).
struct BudgetRound {
    /// This host's last sequence number after the round.
    seq: u64,
    /// This host's spend after this round, kept once Redis has answered.
    changed: Vec<(String, Spend)>,
    puts: Vec<(String, String)>,
    gets: Vec<String>,
    /// The delta sent for each window.
    sent: HashMap<String, i64>,
    drops: Vec<Vec<u8>>,
}

/// The control thread's bans, as the agent sees them.
pub trait Bans: Send + 'static {
    /// The bans in force here, with the time each has left.
    fn local(&self) -> Vec<(IpAddr, Duration)>;
    /// Bans `ip` here (kernel map and workers), as the ban path does; false when it could not
    /// (a full ban map): the fleet's ban is then not taken as known here, so it is neither
    /// lifted as if an operator had lifted it here nor forgotten (the next round tries again).
    fn ban(&self, ip: IpAddr, ttl: Duration) -> bool;
    /// Lifts a ban here.
    fn unban(&self, ip: IpAddr);
}

/// The names the fleet's keys live under in Redis.
struct Keys {
    prefix: String,
}

impl Keys {
    fn new(fleet: &str) -> Self {
        Self {
            prefix: format!("mcp-gateway:{fleet}"),
        }
    }
    /// A rate's bucket, named with its settings: a changed limit (a reload, or hosts of a
    /// rolling reload with different settings) counts in a fresh bucket of its own instead of
    /// inheriting tokens refilled at another rate.
    fn rate(&self, name: &str, rate: u64, burst: u64) -> String {
        format!("{}:rate:{rate}/{burst}:{name}", self.prefix)
    }
    fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }
    /// With a fleet secret: the salt the session key is derived with (the key itself is never
    /// in Redis).
    fn session_salt(&self) -> String {
        format!("{}:session-salt", self.prefix)
    }
    fn hosts(&self) -> String {
        format!("{}:hosts", self.prefix)
    }
    /// Each host's budget spend (a `budgets` hash of totals was the layout before: gateways of
    /// the two layouts do not share budgets, nor disturb each other's).
    fn budgets(&self) -> String {
        format!("{}:spend", self.prefix)
    }
    fn bans(&self) -> String {
        format!("{}:bans", self.prefix)
    }
    fn pins(&self) -> String {
        format!("{}:pins", self.prefix)
    }
    fn session_key(&self) -> String {
        format!("{}:session-key", self.prefix)
    }
    /// The stream of sessions ended on the fleet's gateways.
    fn ended(&self) -> String {
        format!("{}:ended", self.prefix)
    }
    /// What each host holds under a concurrency cap (`name`: see [`Agent::caps`]).
    fn cap(&self, name: &str) -> String {
        format!("{}:cap:{name}", self.prefix)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

/// Where the Redis of `url` is, without the password a URL may carry (for the log).
fn shown(url: &str) -> &str {
    url.rsplit_once('@').map_or(url, |(_, host)| host)
}

/// The client of the fleet's Redis: plaintext for `redis://`, TLS for `rediss://` (with the
/// configured CA, else the system's roots, and perhaps a client certificate). A `rediss://`
/// address never falls back to plaintext: a connection that cannot be made with TLS fails.
pub fn client(fleet: &FleetConfig) -> Result<redis::Client, String> {
    let mut info = redis::IntoConnectionInfo::into_connection_info(fleet.redis.as_str())
        .map_err(|e| e.to_string())?;
    if let Some(password) = &fleet.password {
        let settings = info.redis_settings().clone().set_password(&password.0);
        info = info.set_redis_settings(settings);
    }
    if !fleet.redis.starts_with("rediss://") {
        return redis::Client::open(info).map_err(|e| e.to_string());
    }
    // The redis crate's rustls takes the process's provider; the gateway's is aws-lc-rs.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let read = |file: &std::path::Path| {
        std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))
    };
    let root_cert = fleet.ca_file.as_deref().map(read).transpose()?;
    let client_tls = match &fleet.client_cert {
        Some((cert, key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        None => None,
    };
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| e.to_string())
}

async fn connect(
    client: &redis::Client,
    round: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    // A round's exchange that takes longer than a few rounds is a Redis that is not there.
    let wait = (round * 8).max(Duration::from_millis(200));
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(wait))
        .set_response_timeout(Some(wait));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// HMAC-SHA256 of `parts` under `key`, each part length-prefixed.
fn hmac(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
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
fn derive_session_key(secret: &FleetSecret, fleet: &str, salt: &str) -> [u8; 32] {
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
const SEALED: &str = "sealed1:";

/// `value` as the fleet keeps it under `field` of `what`: with a secret, a MAC over the three
/// comes first, so that a Redis writer without the secret cannot make one the hosts take.
fn seal(secret: Option<&FleetSecret>, fleet: &str, what: &str, field: &str, value: &str) -> String {
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
fn open<'a>(
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
fn bytes(v: &redis::Value) -> Option<&[u8]> {
    match v {
        redis::Value::BulkString(b) => Some(b),
        redis::Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// A reply's string as text (`None`: not a string, or not UTF-8).
fn text(v: &redis::Value) -> Option<&str> {
    std::str::from_utf8(bytes(v)?).ok()
}

/// Whether `id` reads as a stream entry's id (`<ms>-<seq>`).
fn is_stream_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        !ms.is_empty()
            && !seq.is_empty()
            && ms.bytes().chain(seq.bytes()).all(|b| b.is_ascii_digit())
    })
}

/// A reply's integer.
fn int(v: &redis::Value) -> Option<i64> {
    match v {
        redis::Value::Int(n) => Some(*n),
        _ => text(v)?.parse().ok(),
    }
}

/// A budget window as the fleet names it: `<end unix s>|<len s>|<window>|<what as JSON>`.
fn window_field(what: &Counted, len_s: u64, window: u64) -> Option<String> {
    let ends = window.saturating_add(1).saturating_mul(len_s);
    serde_json::to_string(what)
        .ok()
        .map(|w| format!("{ends}|{len_s}|{window}|{w}"))
}

/// A budget window read back from its field.
#[derive(Debug, PartialEq, Eq)]
struct WindowField {
    end: u64,
    len_s: u64,
    window: u64,
    what: Counted,
}

/// Reads a window field (see [`window_field`]): `None` unless it is one this host would write
/// (a budget's, its end matching its window).
fn parse_window_field(wf: &str) -> Option<WindowField> {
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
fn room_for(seen: usize, runs: usize, run: bool) -> bool {
    seen < BUDGET_SEEN && !(run && runs >= BUDGET_SEEN / 2)
}

/// A host's budget field, `<window field>|<host>`, split (host names never hold a `|`).
fn split_host(field: &str) -> Option<(&str, &str)> {
    field
        .rsplit_once('|')
        .filter(|(wf, host)| !wf.is_empty() && !host.is_empty())
}

/// A host's spend in a window as published: `<amount>|<seq>`.
fn parse_spend(v: &str) -> Option<(i64, u64)> {
    let (amount, seq) = v.split_once('|')?;
    let amount = amount.parse::<i64>().ok().filter(|a| *a >= 0)?;
    Some((amount, seq.parse().ok()?))
}

/// What a host's count under a concurrency cap is sealed with: the cap's name and the host.
fn cap_field(name: &str, host: &str) -> String {
    format!("{name}|{host}")
}

/// A host's count under a concurrency cap as published: digits only, at most a million (no
/// host holds more requests or connections at once; a larger value is not a host's).
fn parse_count(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 7 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|n| *n <= 1_000_000)
}

/// What a gateway learns from the fleet at start.
#[derive(Debug)]
pub struct Start {
    /// The key that seals session ids, agreed by the fleet; `None` when Redis cannot be
    /// reached (this gateway then seals with a key of its own, and its sessions continue only
    /// through it).
    pub session_key: Option<[u8; 32]>,
    /// The live hosts of the fleet, this one included (2 when Redis cannot be reached): until
    /// its first round, this gateway admits each fleet-wide rate at `limit ÷ hosts`.
    pub hosts: u64,
}

/// The fleet at start: the session key (the first gateway to reach Redis sets it, or with a
/// secret its salt; the others read it) and how many hosts are live.
pub async fn start(fleet: &FleetConfig) -> Start {
    if fleet.secret.is_none() {
        tracing::warn!(
            fleet = %fleet.name,
            "fleet: no `[state] fleet_secret_env`: whoever reads this Redis can seal session ids, and whoever writes it can approve tools and ban addresses for every gateway of the fleet; keep Redis private, or set a fleet secret"
        );
    }
    let unreachable = Start {
        session_key: None,
        hosts: 2,
    };
    let client = match client(fleet) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                redis = shown(&fleet.redis),
                "fleet: Redis client refused: {e}"
            );
            return unreachable;
        }
    };
    let keys = Keys::new(&fleet.name);
    let attempt = async {
        let mut conn = connect(&client, Duration::from_millis(250)).await?;
        let hosts: u64 = redis::cmd("EVAL")
            .arg(LIVE_HOSTS)
            .arg(1)
            .arg(keys.hosts())
            .arg(u64::try_from(HOST_TTL.as_millis()).unwrap_or(u64::MAX))
            .query_async(&mut conn)
            .await?;
        let key = match fleet.secret {
            Some(_) => keys.session_salt(),
            None => keys.session_key(),
        };
        let mine = URL_SAFE_NO_PAD.encode(crate::session::new_key());
        let agreed: Vec<u8> = redis::cmd("EVAL")
            .arg(AGREE)
            .arg(1)
            .arg(&key)
            .arg(&mine)
            .query_async(&mut conn)
            .await?;
        let agreed = String::from_utf8_lossy(&agreed).into_owned();
        Ok::<_, redis::RedisError>((agreed, hosts))
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok((agreed, hosts))) => {
            let hosts = hosts.saturating_add(1);
            let session_key = match &fleet.secret {
                Some(secret) => Some(derive_session_key(secret, &fleet.name, agreed.trim())),
                None => match URL_SAFE_NO_PAD
                    .decode(agreed.trim())
                    .ok()
                    .and_then(|k| <[u8; 32]>::try_from(k).ok())
                {
                    Some(key) => Some(key),
                    None => {
                        tracing::error!(
                            "the fleet's session key in Redis is not 32 bytes in base64; sessions are sealed with this gateway's own key"
                        );
                        None
                    }
                },
            };
            Start { session_key, hosts }
        }
        Ok(Err(e)) => {
            tracing::warn!(
                redis = shown(&fleet.redis),
                "the fleet's session key could not be read ({e}); sessions are sealed with this gateway's own key and continue only through it"
            );
            unreachable
        }
        Err(_) => {
            tracing::warn!(
                redis = shown(&fleet.redis),
                "the fleet's session key could not be read in time; sessions are sealed with this gateway's own key and continue only through it"
            );
            unreachable
        }
    }
}

/// What the agent keeps between rounds.
struct Agent<B> {
    shared: Arc<Shared>,
    fleet: FleetConfig,
    keys: Keys,
    host: String,
    bans: B,
    /// Rounds each lease went unasked.
    idle: HashMap<u64, u32>,
    /// Leases in use not asked for in the last round (they held enough).
    rested: HashSet<u64>,
    /// Bans this host knows the fleet has (sent or received).
    known_bans: HashSet<IpAddr>,
    /// Pins as last agreed with the fleet: key → approved digest.
    agreed_pins: HashMap<String, String>,
    /// The fleet's epoch as this host last saw it (`None` before the first budget round).
    epoch: Option<String>,
    /// Budgets: this host's whole spend in each window (by window field), as published.
    own: HashMap<String, Spend>,
    /// The other hosts' spend in each window (window field → host → spend): the value with
    /// the highest sequence number seen, kept so that a value deleted from Redis or written
    /// back older never lowers this host's totals (and is published again from here).
    seen: HashMap<String, HashMap<String, Spend>>,
    /// How many spends `seen` holds (at most [`BUDGET_SEEN`]), and how many of them are runs'
    /// (at most half: run ids are the clients' to choose, and must not crowd out the windows
    /// of tenants and agents).
    seen_count: usize,
    seen_runs: usize,
    /// The sequence number of this host's last published spend.
    seq: u64,
    /// Where the scan of the budgets' hash goes on from.
    cursor: String,
    /// Budget fields to delete at the next round (values not sealed with the fleet's secret, or
    /// unreadable) and values to write again (known here, lost or older in Redis).
    drop_fields: Vec<Vec<u8>>,
    rewrite: HashMap<String, String>,
    /// Whether a budgets round has read the fleet since start: until then nothing is published
    /// (this host's counts may hold others' spend, restored from its state file).
    learned: bool,
    /// The other live hosts (members of the registry sealed with the fleet's secret), and
    /// members to remove from it at the next heartbeat.
    peers: Vec<String>,
    drop_hosts: Vec<Vec<u8>>,
    /// Sessions ended here to send (at most [`MAX_ENDED`], the oldest dropped beyond).
    outbox: std::collections::VecDeque<u64>,
    /// The id of the last entry read of the stream of ended sessions (`0-0`: none yet).
    ended_cursor: String,
    /// Whether the last read of that stream was cut short (more to read at the next round).
    ended_more: bool,
    /// When (unix s) the ends made here were last taken.
    ended_taken_s: u64,
    /// The count of each concurrency cap this host last published (by the cap's name).
    caps_sent: HashMap<String, u64>,
    /// The last valid count read of each live host under each cap (by [`cap_field`]): a value
    /// found forged or unreadable counts as that, never lower.
    caps_seen: HashMap<String, u64>,
}

/// A host's whole spend in a budget window, as published (`<amount>|<seq>`, perhaps sealed).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spend {
    amount: i64,
    seq: u64,
    raw: String,
}

/// Runs the agent until the task is dropped.
pub async fn run(shared: Arc<Shared>, fleet: FleetConfig, instance: String, bans: impl Bans) {
    // Never with a `|`: it ends the budget fields it names.
    let host = format!(
        "{}/{instance}/{}/{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
        std::process::id(),
        unix_ms()
    )
    .replace('|', "_");
    let client = match client(&fleet) {
        Ok(c) => c,
        Err(e) => {
            // The address was validated; a TLS file unreadable now: never plaintext instead.
            tracing::error!(
                redis = shown(&fleet.redis),
                "fleet: Redis client refused: {e}"
            );
            shared.fleet.enabled.store(true, Relaxed);
            shared.limits.set_fleet_fail_open(fleet.fail_open);
            shared.limits.set_fleet(FLEET_FALLBACK, 1);
            return;
        }
    };
    shared.fleet.enabled.store(true, Relaxed);
    shared.limits.set_fleet_fail_open(fleet.fail_open);
    let mut agent = Agent {
        keys: Keys::new(&fleet.name),
        shared,
        host,
        bans,
        fleet,
        idle: HashMap::new(),
        rested: HashSet::new(),
        known_bans: HashSet::new(),
        agreed_pins: HashMap::new(),
        epoch: None,
        own: HashMap::new(),
        seen: HashMap::new(),
        seen_count: 0,
        seen_runs: 0,
        // Above any value an earlier process of the same name could have published.
        seq: unix_ms().saturating_mul(1000),
        cursor: "0".to_owned(),
        drop_fields: Vec::new(),
        rewrite: HashMap::new(),
        learned: false,
        peers: Vec::new(),
        drop_hosts: Vec::new(),
        outbox: std::collections::VecDeque::new(),
        ended_cursor: "0-0".to_owned(),
        ended_more: false,
        ended_taken_s: crate::policy::limits::State::unix_s(),
        caps_sent: HashMap::new(),
        caps_seen: HashMap::new(),
    };
    // From now on the sessions ended here are queued for the fleet.
    agent.shared.ended_sessions.share();
    tracing::info!(
        redis = shown(&agent.fleet.redis),
        fleet = %agent.fleet.name,
        host = %agent.host,
        round_ms = agent.fleet.round.as_millis() as u64,
        "fleet agent started"
    );
    let mut conn: Option<MultiplexedConnection> = None;
    let mut tick = tokio::time::interval(agent.fleet.round);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round: u64 = 0;
    // Whether the fleet's state is given up for the fallback (`None` before the first round).
    let mut down: Option<bool> = None;
    // Since when rounds fail, while the fleet's state is kept (see `FALLBACK_AFTER`), and
    // since when they succeed again (the grace is given again after `FALLBACK_AFTER` of them).
    let mut failing_since: Option<Instant> = None;
    let mut healthy_since: Option<Instant> = None;
    // The heartbeat, and with it the bans and (every other time) the approvals, every 250 ms:
    // an idle round with nothing to report sends nothing.
    let beat_every = (Duration::from_millis(250).as_millis() / agent.fleet.round.as_millis().max(1))
        .max(1) as u64;
    let pins_every = beat_every * 2;
    // Rounds in a row that had nothing to send.
    let mut quiet: u32 = 0;
    loop {
        // A host with no lease in use and nothing to send for two rounds wakes only for its
        // heartbeat (4 times a second instead of 40): a lease first asked for, a spend or an
        // ended session waits at most until then (the workers admit at this host's share of a
        // rate meanwhile, as before a first lease).
        let idle = quiet >= 2 && agent.shared.fleet.leases.load(Relaxed) == 0;
        if idle && !round.is_multiple_of(beat_every) {
            let skip = beat_every - round % beat_every;
            tokio::time::sleep(agent.fleet.round * u32::try_from(skip).unwrap_or(1)).await;
            round += skip;
            tick.reset();
        } else {
            tick.tick().await;
        }
        let start = Instant::now();
        // Whether the round had work beyond the heartbeat's (see below).
        let mut worked = false;
        // Taken every round, Redis reached or not: the queue stays short.
        agent.take_ended();
        let result = async {
            let fresh = conn.is_none();
            let c = match &mut conn {
                Some(c) => c,
                None => conn.insert(connect(&client, agent.fleet.round).await?),
            };
            let mut beat = round.is_multiple_of(beat_every);
            // Heartbeat first after (re)connecting: the live hosts count shares.
            if fresh || down != Some(false) {
                let mut pipe = round_pipe();
                pipe.add_command(agent.heartbeat_cmd());
                let reply = exchange(c, &pipe).await?.into_iter().next();
                agent.absorb_heartbeat(array(reply.unwrap_or(redis::Value::Nil))?);
                beat = false;
            }
            let bans = round.is_multiple_of(beat_every);
            let pins = round.is_multiple_of(pins_every);
            // Every part of the round in one exchange.
            let mut pipe = round_pipe();
            let mut parts: Vec<Part> = Vec::new();
            if beat {
                pipe.add_command(agent.heartbeat_cmd());
                parts.push(Part::Heartbeat);
            }
            if let Some((cmd, asks)) = agent.rates_cmd() {
                pipe.add_command(cmd);
                parts.push(Part::Rates(asks));
            }
            // The bans' read is compared with the epoch the budgets' exchange reads.
            if let Some((cmd, b)) = agent.budgets_cmd(bans || pins) {
                pipe.add_command(cmd);
                parts.push(Part::Budgets(Box::new(b)));
            }
            if bans {
                pipe.add_command(agent.read_hash_cmd(&agent.keys.bans()));
                parts.push(Part::Bans);
            }
            if pins {
                pipe.add_command(agent.read_hash_cmd(&agent.keys.pins()));
                parts.push(Part::Pins);
            }
            if let Some((cmd, sent)) = agent.ended_cmd(bans) {
                pipe.add_command(cmd);
                parts.push(Part::Ended(sent));
            }
            if let Some((cmd, sent)) = agent.caps_cmd(bans) {
                pipe.add_command(cmd);
                parts.push(Part::Caps(sent, agent.peers.clone()));
            }
            if parts.is_empty() {
                return Ok(());
            }
            // Work of its own, beyond what every heartbeat carries: a lease asked for, spend
            // sent between heartbeats, ended sessions sent or more of them to read.
            worked = parts.iter().any(|p| match p {
                Part::Rates(_) => true,
                Part::Budgets(_) => !(bans || pins),
                Part::Ended(s) => !s.is_empty() || agent.ended_more,
                // Read every round: the others' counts are at most a round old.
                Part::Caps(..) => true,
                _ => false,
            });
            let replies = match exchange(c, &pipe).await {
                Ok(r) if r.len() == parts.len() => r,
                other => {
                    for part in parts {
                        match part {
                            Part::Budgets(b) => agent.budgets_failed(*b),
                            Part::Ended(sent) => agent.ended_failed(sent),
                            _ => {}
                        }
                    }
                    return Err(other.err().unwrap_or_else(|| {
                        (
                            redis::ErrorKind::UnexpectedReturnType,
                            "a fleet round's replies do not match its commands",
                        )
                            .into()
                    }));
                }
            };
            // The first part that failed fails the round; the others are taken.
            let mut failed: Option<redis::RedisError> = None;
            for (part, reply) in parts.into_iter().zip(replies) {
                let reply = match array(reply) {
                    Ok(r) => r,
                    Err(e) => {
                        match part {
                            Part::Budgets(b) => agent.budgets_failed(*b),
                            Part::Ended(sent) => agent.ended_failed(sent),
                            _ => {}
                        }
                        failed.get_or_insert(e);
                        continue;
                    }
                };
                match part {
                    Part::Heartbeat => agent.absorb_heartbeat(reply),
                    Part::Rates(asks) => agent.absorb_rates(&asks, &reply),
                    Part::Budgets(b) => agent.absorb_budgets(*b, reply),
                    Part::Bans => {
                        let read = agent.parse_read_hash(reply);
                        agent.exchange_bans(c, read).await?;
                    }
                    Part::Pins => {
                        let read = agent.parse_read_hash(reply);
                        agent.exchange_pins(c, read).await?;
                    }
                    Part::Ended(sent) => agent.absorb_ended(&sent, &reply),
                    Part::Caps(sent, peers) => agent.absorb_caps(sent, &peers, &reply),
                }
            }
            failed.map_or(Ok(()), Err)
        }
        .await;
        round += 1;
        quiet = if worked || result.is_err() {
            0
        } else {
            quiet + 1
        };
        let stats = &agent.shared.fleet;
        stats.rounds.fetch_add(1, Relaxed);
        stats.round_us_total.fetch_add(
            u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
        match result {
            Ok(()) => {
                if failing_since.is_some() {
                    let healthy = *healthy_since.get_or_insert(start);
                    if healthy.elapsed() >= FALLBACK_AFTER {
                        failing_since = None;
                        healthy_since = None;
                    }
                }
                if down != Some(false) {
                    tracing::info!(
                        redis = shown(&agent.fleet.redis),
                        hosts = stats.hosts.load(Relaxed),
                        "fleet connected: rates, budgets, concurrency caps, bans, approvals and ended sessions are shared"
                    );
                }
                down = Some(false);
                stats.connected.store(true, Relaxed);
            }
            Err(e) => {
                conn = None;
                healthy_since = None;
                stats.failures.fetch_add(1, Relaxed);
                stats.connected.store(false, Relaxed);
                let first = failing_since.is_none();
                let since = *failing_since.get_or_insert(start);
                if down == Some(false) && since.elapsed() < FALLBACK_AFTER {
                    if first {
                        tracing::warn!(
                            redis = shown(&agent.fleet.redis),
                            "fleet: a round failed ({e}); the fleet's state is kept while Redis is tried again every round, for up to {} ms before falling back",
                            FALLBACK_AFTER.as_millis()
                        );
                    }
                    continue;
                }
                let hosts = stats.hosts.load(Relaxed).max(1);
                agent.shared.limits.set_fleet(FLEET_FALLBACK, hosts);
                if down != Some(true) {
                    tracing::error!(
                        redis = shown(&agent.fleet.redis),
                        hosts,
                        budgets = if agent.fleet.fail_open {
                            "admitted on this host's counts (fleet_fail_open)"
                        } else {
                            "refused (fail closed)"
                        },
                        "fleet: Redis unreachable ({e}); rates and concurrency caps fall back to this host's share (limit ÷ {hosts} live hosts); tried again every round"
                    );
                }
                down = Some(true);
            }
        }
    }
}

impl<B: Bans> Agent<B> {
    /// This host's heartbeat (see [`HEARTBEAT`]), read with [`Agent::absorb_heartbeat`].
    fn heartbeat_cmd(&self) -> redis::Cmd {
        let ttl = u64::try_from(HOST_TTL.as_millis()).unwrap_or(u64::MAX);
        let member = seal(
            self.fleet.secret.as_ref(),
            &self.fleet.name,
            "hosts",
            "",
            &self.host,
        );
        let mut cmd = evalsha(S_HEARTBEAT, 1);
        cmd.arg(self.keys.hosts()).arg(&member).arg(ttl);
        for m in &self.drop_hosts {
            cmd.arg(m);
        }
        cmd
    }

    /// Takes the live hosts a heartbeat answered.
    fn absorb_heartbeat(&mut self, reply: Vec<redis::Value>) {
        let secret = self.fleet.secret.as_ref();
        let fleet = self.fleet.name.as_str();
        self.drop_hosts.clear();
        let mut ignored = reply.first().and_then(int).unwrap_or(0).max(0) as u64;
        let mut live = 0u64;
        let mut peers = Vec::new();
        for m in reply.iter().skip(1) {
            let Some(raw) = bytes(m) else { continue };
            match std::str::from_utf8(raw)
                .ok()
                .and_then(|r| open(secret, fleet, "hosts", "", r))
            {
                Some(h) if h == self.host => live += 1,
                Some(h) => {
                    live += 1;
                    peers.push(h.to_owned());
                }
                None => {
                    // Not a host of this fleet's (no seal, or not sealed with its secret).
                    ignored += 1;
                    self.drop_hosts.push(raw.to_vec());
                }
            }
        }
        self.count_ignored(ignored);
        self.peers = peers;
        let hosts = live.max(1);
        self.shared.fleet.hosts.store(hosts, Relaxed);
        self.shared.limits.set_fleet(FLEET_LEASED, hosts);
    }

    fn count_ignored(&self, n: u64) {
        if n > 0 {
            self.shared.fleet.unsealed_ignored.fetch_add(n, Relaxed);
            tracing::debug!(
                n,
                "fleet: values in Redis ignored (not sealed with the fleet's secret, unreadable, older than known, or of the wrong type)"
            );
        }
    }

    /// Asks for each lease the tokens the last round's demand suggests (and one spare), at
    /// most two rounds of the fleet's rate: what a host holds unused is the bound by which the
    /// fleet may exceed its limit.
    /// Answers the command (see [`RATES`]) and, for each lease asked for, its key and the
    /// tokens asked; `None` when no lease needs tokens.
    fn rates_cmd(&mut self) -> Option<(redis::Cmd, Vec<(u64, u64)>)> {
        let round_s = self.fleet.round.as_secs_f64();
        let mut asks: Vec<(u64, String, u64, u64, u64, u64)> = Vec::new();
        let hosts = self.shared.fleet.hosts.load(Relaxed).max(1);
        let mut idle: Vec<u64> = Vec::new();
        let mut leases = 0u64;
        self.shared.limits.for_each_lease(|key, lease| {
            leases += 1;
            // A lease in use that holds two rounds of what it was asked for since the last
            // round, and most of its share of the burst, is not asked for in every other round:
            // its demand counts at the next (so its want stays among the live wants Redis
            // shares the rate by, which are those of the last four rounds).
            let pending = lease.demand();
            let held = lease.tokens();
            let reserve = lease.burst.load(Relaxed).div_ceil(hosts).max(1);
            if pending > 0
                && held >= pending.saturating_add(1).saturating_mul(2)
                && held >= reserve - reserve / 4
                && self.rested.insert(key)
            {
                return;
            }
            self.rested.remove(&key);
            let demand = lease.take_demand();
            let rounds_idle = self.idle.entry(key).or_insert(0);
            if demand == 0 {
                *rounds_idle += 1;
                if *rounds_idle > IDLE_ROUNDS {
                    idle.push(key);
                    return;
                }
            } else {
                *rounds_idle = 0;
            }
            let rate = lease.rate.load(Relaxed);
            let burst = lease.burst.load(Relaxed);
            let cap = ((rate as f64 * round_s * 2.0).ceil() as u64).max(1);
            // Kept at hand: this host's share of the burst (`reserve`), so that a burst arriving
            // between two rounds is served (one spare token met 429 on the second of five quick
            // calls).
            let want = (demand + 1)
                .max(reserve)
                .saturating_sub(held)
                .min(cap.max(reserve));
            if want > 0 {
                asks.push((
                    key,
                    self.keys.rate(&lease.name, rate, burst.max(1)),
                    rate,
                    burst,
                    want,
                    held,
                ));
            }
        });
        self.shared.fleet.leases.store(leases, Relaxed);
        if !idle.is_empty() {
            for k in &idle {
                self.idle.remove(k);
                self.rested.remove(k);
            }
            self.shared.limits.drop_leases(&idle);
        }
        if asks.is_empty() {
            return None;
        }
        let mut cmd = evalsha(S_RATES, asks.len());
        for (_, name, ..) in &asks {
            cmd.arg(name);
        }
        cmd.arg(&self.host)
            .arg(
                u64::try_from(self.fleet.round.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .arg(self.peers.len());
        for p in &self.peers {
            cmd.arg(p);
        }
        for (_, _, rate, burst, want, held) in &asks {
            cmd.arg(*rate).arg((*burst).max(1)).arg(*want).arg(*held);
        }
        Some((
            cmd,
            asks.into_iter()
                .map(|(key, .., want, _)| (key, want))
                .collect(),
        ))
    }

    /// Adds to each lease what Redis granted of what [`Agent::rates_cmd`] asked.
    fn absorb_rates(&mut self, asks: &[(u64, u64)], reply: &[redis::Value]) {
        let count = |v: &redis::Value| u64::try_from(int(v).unwrap_or(0)).unwrap_or(0);
        if let Some(bad) = reply.get(asks.len()) {
            self.count_ignored(count(bad));
        }
        // Never take more than was asked, whatever Redis answers (thousandths of a token).
        let granted: HashMap<u64, u64> = asks
            .iter()
            .zip(reply)
            .map(|((key, want), n)| (*key, count(n).min(want.saturating_mul(MILLI as u64))))
            .collect();
        let mut total = 0;
        self.shared.limits.for_each_lease(|key, lease| {
            if let Some(n) = granted.get(&key) {
                lease.grant_milli(*n);
                total += *n;
            }
        });
        self.shared.fleet.tokens_granted.fetch_add(total, Relaxed);
    }

    /// Publishes this host's spend in each budget window and takes the fleet's totals: the sum
    /// over the hosts of the highest-numbered valid spend seen of each (see [`BUDGETS`]).
    /// Answers the command and what it sent, read with [`Agent::absorb_budgets`]; `None` when
    /// the round has nothing to say or to learn of budgets (no budget configured, none
    /// counted or known here, nothing to write back) and `force` is not set.
    fn budgets_cmd(&mut self, force: bool) -> Option<(redis::Cmd, BudgetRound)> {
        let mut counts = self.shared.limits.fleet_counts();
        // Runs last: the reads of a round are bounded, and the windows of tenants and agents
        // come first.
        counts.sort_by_key(|c| c.what.is_run());
        let quiet = counts.is_empty()
            && self.learned
            && self.own.is_empty()
            && self.seen.is_empty()
            && self.rewrite.is_empty()
            && self.drop_fields.is_empty()
            && !self
                .shared
                .snapshot
                .load()
                .policy
                .tenants
                .iter()
                .any(|t| t.budget.is_some());
        if quiet && !force {
            return None;
        }
        let secret = self.fleet.secret.clone();
        let fleet = self.fleet.name.clone();
        let mut seq = self.seq;
        // This host's spend after this round, kept once Redis has answered.
        let mut changed: Vec<(String, Spend)> = Vec::new();
        let mut puts: Vec<(String, String)> =
            std::mem::take(&mut self.rewrite).into_iter().collect();
        let mut gets: Vec<String> = Vec::new();
        let mut sent: HashMap<String, i64> = HashMap::new();
        for count in &counts {
            let Some(wf) = window_field(&count.what, count.len_s, count.window) else {
                continue;
            };
            let mine = format!("{wf}|{}", self.host);
            if self.learned {
                let amount = match self.own.get(&wf) {
                    Some(s) => s.amount.saturating_add(count.delta),
                    // First spend here in this window: what is above the others' spend.
                    None => {
                        (i64::try_from(count.used).unwrap_or(i64::MAX) - self.others(&wf)).max(0)
                    }
                };
                if self
                    .own
                    .get(&wf)
                    .map_or(amount != 0, |s| s.amount != amount)
                {
                    seq += 1;
                    let raw = seal(
                        secret.as_ref(),
                        &fleet,
                        "budgets",
                        &mine,
                        &format!("{amount}|{seq}"),
                    );
                    puts.push((mine.clone(), raw.clone()));
                    changed.push((wf.clone(), Spend { amount, seq, raw }));
                }
                sent.insert(wf.clone(), count.delta);
            }
            if gets.len() < BUDGET_GETS {
                gets.push(mine);
                if let Some(hosts) = self.seen.get(&wf) {
                    gets.extend(
                        hosts
                            .keys()
                            .take(BUDGET_GETS.saturating_sub(gets.len()))
                            .map(|h| format!("{wf}|{h}")),
                    );
                }
            }
        }
        let drops = std::mem::take(&mut self.drop_fields);
        let mut cmd = evalsha(S_BUDGETS, 2);
        cmd.arg(self.keys.budgets())
            .arg(self.keys.epoch())
            .arg(URL_SAFE_NO_PAD.encode(crate::session::new_key()))
            .arg(&self.cursor)
            .arg(BUDGET_SCAN)
            .arg(drops.len())
            .arg(puts.len());
        for f in &drops {
            cmd.arg(f);
        }
        for (f, v) in &puts {
            cmd.arg(f).arg(v);
        }
        for f in &gets {
            cmd.arg(f);
        }
        Some((
            cmd,
            BudgetRound {
                seq,
                changed,
                puts,
                gets,
                sent,
                drops,
            },
        ))
    }

    /// A budgets exchange that failed: what it would have deleted or written back is sent again
    /// next round (this host's new spend is worked out again from its counts).
    fn budgets_failed(&mut self, round: BudgetRound) {
        self.drop_fields.extend(round.drops);
        // This host's own spend of the round is not: its sequence number was not kept, and the
        // next round publishes the spend anew, with it (the same number again would not
        // replace the older value in Redis).
        let own: HashSet<String> = round
            .changed
            .iter()
            .map(|(wf, _)| format!("{wf}|{}", self.host))
            .collect();
        self.rewrite
            .extend(round.puts.into_iter().filter(|(f, _)| !own.contains(f)));
    }

    /// Takes what a budgets exchange answered: the fleet's spend, merged into this host's counts.
    fn absorb_budgets(&mut self, round: BudgetRound, reply: Vec<redis::Value>) {
        let BudgetRound {
            seq,
            changed,
            gets,
            sent,
            ..
        } = round;
        self.seq = seq;
        for (wf, s) in changed {
            self.own.insert(wf, s);
        }
        let mut reply = reply.iter();
        let epoch = reply.next().and_then(text).unwrap_or_default().to_owned();
        let mut ignored = reply.next().and_then(int).unwrap_or(0).max(0) as u64;
        self.cursor = reply
            .next()
            .and_then(text)
            .filter(|c| c.parse::<u64>().is_ok())
            .unwrap_or("0")
            .to_owned();
        let n = usize::try_from(reply.next().and_then(int).unwrap_or(0)).unwrap_or(0);
        if self.epoch.as_ref().is_some_and(|e| *e != epoch) {
            // Redis lost the fleet's state (FLUSHALL, eviction, a restart without persistence,
            // its epoch deleted): everything known here is published again.
            tracing::warn!(
                redis = shown(&self.fleet.redis),
                "fleet: Redis lost the fleet's state (its epoch is gone or changed); budgets, bans, approvals and ended sessions are published again from here"
            );
            self.shared.fleet.reseeds.fetch_add(1, Relaxed);
            self.known_bans.clear();
            self.agreed_pins.clear();
            self.republish_ended();
            let own = self
                .own
                .iter()
                .map(|(wf, s)| (format!("{wf}|{}", self.host), s.raw.clone()));
            let others = self.seen.iter().flat_map(|(wf, hosts)| {
                hosts
                    .iter()
                    .map(move |(h, s)| (format!("{wf}|{h}"), s.raw.clone()))
            });
            let all: Vec<(String, String)> = own.chain(others).collect();
            self.rewrite.extend(all);
        }
        self.epoch = Some(epoch);
        for (field, value) in gets.iter().zip(reply.by_ref().take(n)) {
            match bytes(value) {
                Some([]) | None => {
                    // Gone from Redis (deleted by someone, or lost): published again.
                    if let Some(known) = self.known(field) {
                        self.rewrite.insert(field.clone(), known.raw.clone());
                    }
                }
                Some(raw) => ignored += self.absorb(field.as_bytes(), raw),
            }
        }
        let rest: Vec<&redis::Value> = reply.collect();
        for pair in rest.chunks(2) {
            if let [f, v] = pair {
                let (Some(f), Some(v)) = (bytes(f), bytes(v)) else {
                    continue;
                };
                ignored += self.absorb(f, v);
            }
        }
        self.count_ignored(ignored);
        // Windows that ended are forgotten.
        let now = crate::policy::limits::State::unix_s();
        let live = |wf: &String| parse_window_field(wf).filter(|w| w.end > now);
        self.own.retain(|wf, _| live(wf).is_some());
        // Each field read once: whether it is live, and whether it counts a run.
        let (mut count, mut runs) = (0, 0);
        self.seen.retain(|wf, hosts| {
            let Some(w) = live(wf).filter(|_| !hosts.is_empty()) else {
                return false;
            };
            count += hosts.len();
            if w.what.is_run() {
                runs += hosts.len();
            }
            true
        });
        self.seen_count = count;
        self.seen_runs = runs;
        if !self.learned {
            // The first read: this host's counts rise to the others' spend at once (a gateway
            // that starts after a budget was spent refuses from its first request); its own
            // spend is set at the next round, to what they hold above the others'.
            self.learned = true;
            let firsts: Vec<(String, i64)> = self
                .seen
                .keys()
                .map(|wf| (wf.clone(), self.others(wf)))
                .collect();
            for (wf, others) in firsts {
                if let Some(w) = parse_window_field(&wf) {
                    let total = u64::try_from(others.max(0)).unwrap_or(0);
                    self.shared
                        .limits
                        .fleet_floor(w.what, w.len_s, w.window, total);
                }
            }
            return;
        }
        let mut windows: HashSet<&String> = self.seen.keys().collect();
        windows.extend(self.own.keys());
        windows.extend(sent.keys());
        for wf in windows {
            let Some(w) = parse_window_field(wf) else {
                continue;
            };
            let total = self.own.get(wf).map_or(0, |s| s.amount) + self.others(wf);
            self.shared.limits.fleet_merge(
                w.what,
                w.len_s,
                w.window,
                sent.get(wf).copied().unwrap_or(0),
                u64::try_from(total.max(0)).unwrap_or(0),
            );
        }
    }

    /// The other hosts' spend in window `wf`, as known here.
    fn others(&self, wf: &str) -> i64 {
        self.seen
            .get(wf)
            .map_or(0, |h| h.values().map(|s| s.amount).sum())
    }

    /// What this host knows of a budget field (`<window field>|<host>`).
    fn known(&self, field: &str) -> Option<&Spend> {
        let (wf, host) = split_host(field)?;
        if host == self.host {
            self.own.get(wf)
        } else {
            self.seen.get(wf)?.get(host)
        }
    }

    /// Takes a budget field read from Redis: a valid value newer than known is remembered; one
    /// older than known (written back), or one this host does not write under its own name,
    /// is replaced by what is known; one that is not valid (unsealed, unreadable) is deleted.
    /// Answers how many values were ignored.
    fn absorb(&mut self, field: &[u8], raw: &[u8]) -> u64 {
        let secret = self.fleet.secret.as_ref();
        let fleet = self.fleet.name.as_str();
        let parsed = std::str::from_utf8(field).ok().and_then(|f| {
            let (wf, host) = split_host(f)?;
            let run = parse_window_field(wf)?.what.is_run();
            let value = std::str::from_utf8(raw).ok()?;
            let spend = open(secret, fleet, "budgets", f, value).and_then(parse_spend)?;
            Some((f, wf, host, run, spend, value))
        });
        let Some((f, wf, host, run, (amount, seq), value)) = parsed else {
            self.drop_fields.push(field.to_vec());
            if let Some(known) = std::str::from_utf8(field).ok().and_then(|f| self.known(f)) {
                self.rewrite.insert(
                    String::from_utf8_lossy(field).into_owned(),
                    known.raw.clone(),
                );
            }
            return 1;
        };
        if host == self.host {
            return match self.own.get(wf) {
                Some(mine) if mine.seq != seq => {
                    // Not this host's latest: written back, or not by this host.
                    self.rewrite.insert(f.to_owned(), mine.raw.clone());
                    if seq > mine.seq {
                        self.drop_fields.push(field.to_vec());
                    }
                    1
                }
                _ => 0,
            };
        }
        let full = !room_for(self.seen_count, self.seen_runs, run);
        let hosts = self.seen.entry(wf.to_owned()).or_default();
        match hosts.get(host) {
            Some(known) if known.seq > seq => {
                // An older value written back: what is known here stands, and is published.
                self.rewrite.insert(f.to_owned(), known.raw.clone());
                1
            }
            Some(known) if known.seq == seq => 0,
            None if full => 1,
            known => {
                if known.is_none() {
                    self.seen_count += 1;
                    self.seen_runs += usize::from(run);
                }
                hosts.insert(
                    host.to_owned(),
                    Spend {
                        amount,
                        seq,
                        raw: value.to_owned(),
                    },
                );
                0
            }
        }
    }

    /// Takes the sessions ended here since the last round into the outbox; if the queue
    /// dropped some, those ended since the last take are found in the table.
    fn take_ended(&mut self) {
        let ended = &self.shared.ended_sessions;
        let (fresh, overflowed) = ended.take_fresh(MAX_ENDED);
        let since = self.ended_taken_s.saturating_sub(1);
        self.ended_taken_s = crate::policy::limits::State::unix_s();
        let missed: Vec<u64> = if overflowed {
            ended
                .entries()
                .into_iter()
                .filter(|(_, when)| *when >= since)
                .map(|(k, _)| k)
                .collect()
        } else {
            Vec::new()
        };
        self.queue_ended(fresh.into_iter().chain(missed));
    }

    /// Queues ends to send, keeping the last [`MAX_ENDED`] (what the stream keeps).
    fn queue_ended(&mut self, keys: impl IntoIterator<Item = u64>) {
        self.outbox.extend(keys);
        let over = self.outbox.len().saturating_sub(MAX_ENDED);
        self.outbox.drain(..over);
    }

    /// Every session ended known here, to be sent again (Redis lost them).
    fn republish_ended(&mut self) {
        let mut all = self.shared.ended_sessions.entries();
        all.sort_unstable_by_key(|(_, when)| *when);
        self.queue_ended(all.into_iter().map(|(k, _)| k));
    }

    /// Sends sessions ended here and reads those ended elsewhere (see [`ENDED`]): when some
    /// wait to be sent, when the last read was cut short, or when `due` (the heartbeat's
    /// cadence). Answers the command and what it sends, read with [`Agent::absorb_ended`].
    fn ended_cmd(&mut self, due: bool) -> Option<(redis::Cmd, Vec<u64>)> {
        if !due && self.outbox.is_empty() && !self.ended_more {
            return None;
        }
        let n = self.outbox.len().min(ENDED_SEND);
        let sent: Vec<u64> = self.outbox.drain(..n).collect();
        let mut cmd = evalsha(S_ENDED, 1);
        cmd.arg(self.keys.ended())
            .arg(&self.ended_cursor)
            .arg(ENDED_READ)
            .arg(MAX_ENDED);
        let secret = self.fleet.secret.as_ref();
        for k in &sent {
            cmd.arg(seal(
                secret,
                &self.fleet.name,
                "ended",
                "",
                &format!("{k:016x}"),
            ));
        }
        Some((cmd, sent))
    }

    /// What an ended sessions' exchange would have sent is sent at the next round.
    fn ended_failed(&mut self, sent: Vec<u64>) {
        for k in sent.into_iter().rev() {
            self.outbox.push_front(k);
        }
    }

    /// Takes the sessions ended elsewhere that an [`ENDED`] exchange read. An entry not sealed
    /// with the fleet's secret, or unreadable, is ignored (and counted): who writes Redis
    /// without the secret ends no session.
    fn absorb_ended(&mut self, sent: &[u64], reply: &[redis::Value]) {
        let secret = self.fleet.secret.as_ref();
        let fleet = self.fleet.name.as_str();
        let stats = &self.shared.fleet;
        stats
            .sessions_ended_sent
            .fetch_add(sent.len() as u64, Relaxed);
        let mut ignored = reply.first().and_then(int).unwrap_or(0).max(0) as u64;
        let reset = reply.get(1).and_then(int) == Some(1);
        let cursor = reply
            .get(2)
            .and_then(text)
            .filter(|c| is_stream_id(c))
            .unwrap_or("0-0")
            .to_owned();
        let entries = reply.get(3..).unwrap_or_default();
        let now_s = crate::policy::limits::State::unix_s();
        let mut received = 0u64;
        for pair in entries.chunks(2) {
            let [id, value] = pair else { continue };
            // When Redis added it: the hosts' clocks do not matter.
            let when = text(id)
                .and_then(|id| id.split_once('-'))
                .and_then(|(ms, _)| ms.parse::<u64>().ok())
                .map_or(now_s, |ms| ms / 1000);
            let key = text(value)
                .and_then(|raw| open(secret, fleet, "ended", "", raw))
                .filter(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            match key {
                Some(k) => {
                    if self.shared.ended_sessions.absorb(k, when) {
                        received += 1;
                    }
                }
                None => ignored += 1,
            }
        }
        stats.sessions_ended_received.fetch_add(received, Relaxed);
        self.count_ignored(ignored);
        self.ended_more = entries.len() / 2 >= ENDED_READ;
        if reset {
            // The entry this host read last is gone: Redis lost the stream (or someone deleted
            // it). Read again from the start, and what is known here is sent again.
            tracing::warn!(
                redis = shown(&self.fleet.redis),
                "fleet: the stream of ended sessions lost entries this host had read; the sessions ended known here are published again"
            );
            self.republish_ended();
        }
        self.ended_cursor = cursor;
    }

    /// The concurrency caps configured, as the fleet names them, with what each counts:
    /// `in-flight/tenant/<tenant>`, `in-flight/tool/<tenant>/<rule's label>` (the keys the
    /// policy takes their slots under) and `connections/<tenant>`; at most [`CAPS_MAX`].
    fn caps(&self) -> Vec<(String, CapOf)> {
        let snap = self.shared.snapshot.load();
        let limits = &self.shared.limits;
        let mut caps = Vec::new();
        for t in &snap.policy.tenants {
            if t.max_concurrent.is_some() {
                caps.push((
                    format!("in-flight/tenant/{}", t.name),
                    CapOf::InFlight(limits.key(("in-flight", &t.name))),
                ));
            }
            for r in t.rules().filter(|r| r.max_concurrent.is_some()) {
                caps.push((
                    format!("in-flight/tool/{}/{}", t.name, r.label),
                    CapOf::InFlight(limits.key(("in-flight", &t.name, &r.label))),
                ));
            }
        }
        for t in &snap.config.tenants {
            if t.max_connections.is_some() {
                caps.push((format!("connections/{}", t.name), CapOf::Conns(t.id)));
            }
        }
        caps.truncate(CAPS_MAX);
        caps
    }

    /// Publishes what this host holds under each concurrency cap (when it changed, and at
    /// every heartbeat) and reads the other live hosts' counts (see [`CAPS`]), every round
    /// while a cap is configured; a cap no longer configured is published once as 0 (a field
    /// gone counts as its last value on the other hosts). `None`: no cap.
    fn caps_cmd(&mut self, beat: bool) -> Option<(redis::Cmd, Vec<CapSent>)> {
        let caps = self.caps();
        if caps.is_empty() && self.caps_sent.is_empty() {
            self.shared.fleet.caps.store(0, Relaxed);
            self.shared.fleet.in_flight_others.store(0, Relaxed);
            return None;
        }
        let limits = &self.shared.limits;
        let mut sent: Vec<CapSent> = Vec::with_capacity(caps.len());
        for (name, of) in caps {
            let here = match of {
                CapOf::InFlight(key) => u64::from(limits.in_flight_here(key)),
                CapOf::Conns(id) => self.shared.conns.total(id),
            };
            let send = beat || self.caps_sent.get(&name) != Some(&here);
            sent.push(CapSent {
                name,
                of: Some(of),
                here: send.then_some(here),
            });
        }
        let gone: Vec<String> = self
            .caps_sent
            .keys()
            .filter(|n| !sent.iter().any(|c| c.name == **n))
            .cloned()
            .collect();
        sent.extend(gone.into_iter().map(|name| CapSent {
            name,
            of: None,
            here: Some(0),
        }));
        let mut cmd = evalsha(S_CAPS, sent.len());
        for c in &sent {
            cmd.arg(self.keys.cap(&c.name));
        }
        cmd.arg(&self.host).arg(self.peers.len());
        for p in &self.peers {
            cmd.arg(p);
        }
        let secret = self.fleet.secret.as_ref();
        for c in &sent {
            match c.here {
                None => cmd.arg(""),
                Some(n) => cmd.arg(seal(
                    secret,
                    &self.fleet.name,
                    "caps",
                    &cap_field(&c.name, &self.host),
                    &n.to_string(),
                )),
            };
        }
        Some((cmd, sent))
    }

    /// Takes the other hosts' counts a caps exchange read (`peers`: the hosts it asked for, in
    /// order): each cap's sum over the live hosts becomes what its workers count as held
    /// elsewhere. A value not sealed with the fleet's secret, or unreadable (counted as
    /// ignored), or gone counts as the host's last valid count (its host writes it again at
    /// its next heartbeat): who writes Redis without the secret cannot lower a count.
    fn absorb_caps(&mut self, sent: Vec<CapSent>, peers: &[String], reply: &[redis::Value]) {
        let secret = self.fleet.secret.as_ref();
        let fleet = self.fleet.name.as_str();
        let mut ignored = reply.get(sent.len()).and_then(int).unwrap_or(0).max(0) as u64;
        let mut conns: Vec<(u32, u64)> = Vec::new();
        let mut in_flight = 0u64;
        let mut shared = 0u64;
        let mut seen: HashMap<String, u64> = HashMap::new();
        for (cap, row) in sent.into_iter().zip(reply) {
            let Some(of) = cap.of else {
                self.caps_sent.remove(&cap.name);
                continue;
            };
            if let Some(n) = cap.here {
                self.caps_sent.insert(cap.name.clone(), n);
            }
            shared += 1;
            let mut others = 0u64;
            if let redis::Value::Array(row) = row {
                for (peer, v) in peers.iter().zip(row) {
                    let raw = text(v).unwrap_or_default();
                    let field = cap_field(&cap.name, peer);
                    let last = self.caps_seen.get(&field).copied();
                    let n = match open(secret, fleet, "caps", &field, raw).and_then(parse_count) {
                        Some(n) => n,
                        // Not published yet (0), or gone (Redis lost it, or someone deleted
                        // it): the host's last count stands until it writes it again, at its
                        // next heartbeat at the latest.
                        None if raw.is_empty() => match last {
                            Some(n) => n,
                            None => continue,
                        },
                        None => {
                            // Not sealed with the fleet's secret, or unreadable: the host's
                            // last valid count stands until it writes its own again.
                            ignored += 1;
                            last.unwrap_or(0)
                        }
                    };
                    others = others.saturating_add(n);
                    seen.insert(field, n);
                }
            }
            match of {
                CapOf::InFlight(key) => {
                    in_flight = in_flight.saturating_add(others);
                    self.shared
                        .limits
                        .set_in_flight_others(key, u32::try_from(others).unwrap_or(u32::MAX));
                }
                CapOf::Conns(id) => conns.push((id, others)),
            }
        }
        self.caps_seen = seen;
        self.shared.limits.set_conns_others(&conns);
        // The first exchange of a new host reads no peers (the heartbeat that names them is
        // answered in the same round): its caps stay at its share until one that did.
        if !peers.is_empty() || self.shared.fleet.hosts.load(Relaxed) <= 1 {
            self.shared.limits.set_fleet_caps_read();
        }
        self.shared.fleet.caps.store(shared, Relaxed);
        self.shared.fleet.in_flight_others.store(in_flight, Relaxed);
        self.count_ignored(ignored);
    }

    /// Sends the bans made here and takes those made elsewhere (into the kernel's ban map, by
    /// the control thread's ban path); a ban lifted here is lifted in the fleet.
    /// `read`: the bans' hash as [`Agent::read_hash_cmd`] read it.
    async fn exchange_bans(
        &mut self,
        c: &mut MultiplexedConnection,
        read: HashRead,
    ) -> redis::RedisResult<()> {
        let key = self.keys.bans();
        // Read with the epoch, atomically: bans read from a Redis that lost its data since this
        // round's budgets would look lifted everywhere; the next round re-seeds it instead.
        // A value this host cannot read is ignored (and deleted), never a failed round.
        let (epoch, remote) = read;
        if epoch.is_none() || epoch != self.epoch {
            return Ok(());
        }
        let now = unix_ms();
        let secret = self.fleet.secret.as_ref();
        let fleet = self.fleet.name.as_str();
        let mut remote_live: HashMap<IpAddr, u64> = HashMap::new();
        // With a secret, a lift is a sealed `lifted:<end>` left until the ban's end, so that a
        // ban deleted from Redis by someone without the secret is not lifted.
        let mut lifted: HashSet<IpAddr> = HashSet::new();
        let mut ended: Vec<Vec<u8>> = Vec::new();
        // Bans in Redis not sealed with the fleet's secret (or unreadable): never applied.
        let mut forged: HashSet<IpAddr> = HashSet::new();
        for (field, raw) in remote {
            let Some((k, ip)) = std::str::from_utf8(&field)
                .ok()
                .and_then(|k| Some((k, k.parse::<IpAddr>().ok()?)))
            else {
                self.shared.fleet.unsealed_ignored.fetch_add(1, Relaxed);
                ended.push(field);
                continue;
            };
            let raw = String::from_utf8_lossy(&raw);
            let value = open(secret, fleet, "bans", k, &raw).and_then(|v| {
                match v.strip_prefix("lifted:") {
                    Some(until) if secret.is_some() => until.parse::<u64>().ok().map(|u| (u, true)),
                    Some(_) => None,
                    None => v.parse::<u64>().ok().map(|u| (u, false)),
                }
            });
            match value {
                Some((until, false)) if until > now => {
                    remote_live.insert(ip.to_canonical(), until);
                }
                Some((until, true)) if until > now => {
                    lifted.insert(ip.to_canonical());
                }
                Some(_) => ended.push(field),
                None => {
                    self.shared.fleet.unsealed_ignored.fetch_add(1, Relaxed);
                    tracing::warn!(source = %ip, "fleet: a ban in Redis is not sealed with the fleet's secret (or unreadable); ignored");
                    // Replaced below by this host's own ban if it has one, else removed.
                    ended.push(field);
                    forged.insert(ip.to_canonical());
                }
            }
        }
        let local: HashMap<IpAddr, Duration> = self
            .bans
            .local()
            .into_iter()
            .map(|(ip, left)| (ip.to_canonical(), left))
            .collect();
        let mut pipe = redis::pipe();
        for k in &ended {
            pipe.hdel(&key, k).ignore();
        }
        for (ip, until) in &remote_live {
            if !local.contains_key(ip) {
                if self.known_bans.contains(ip) {
                    // Known to the fleet, gone here: lifted by the operator here.
                    if secret.is_some() {
                        let field = ip.to_string();
                        let lift = seal(secret, fleet, "bans", &field, &format!("lifted:{until}"));
                        pipe.hset(&key, field, lift).ignore();
                    } else {
                        pipe.hdel(&key, ip.to_string()).ignore();
                    }
                    self.known_bans.remove(ip);
                    continue;
                }
                let left = Duration::from_millis(until - now);
                if !self.bans.ban(*ip, left) {
                    continue;
                }
                self.known_bans.insert(*ip);
                self.shared.fleet.bans_received.fetch_add(1, Relaxed);
                tracing::warn!(source = %ip, ban_s = left.as_secs(), "fleet: banned here as another gateway of the fleet banned it");
            } else {
                self.known_bans.insert(*ip);
            }
        }
        let mut sent: HashSet<IpAddr> = HashSet::new();
        for (ip, left) in &local {
            let known = self.known_bans.contains(ip);
            // With a secret, a known ban gone from Redis without a sealed lift (and not about
            // to end) was deleted by someone without the secret: published again, not lifted.
            let deleted = secret.is_some()
                && known
                && !remote_live.contains_key(ip)
                && !lifted.contains(ip)
                && *left > Duration::from_secs(2);
            if deleted && !forged.contains(ip) {
                tracing::warn!(source = %ip, "fleet: a ban was deleted from Redis without a sealed lift; published again");
            }
            if forged.contains(ip) || deleted || !known && !remote_live.contains_key(ip) {
                let left = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
                let field = ip.to_string();
                let until = seal(
                    secret,
                    fleet,
                    "bans",
                    &field,
                    &now.saturating_add(left).to_string(),
                );
                pipe.hset(&key, field, until).ignore();
                self.known_bans.insert(*ip);
                sent.insert(*ip);
                self.shared.fleet.bans_sent.fetch_add(1, Relaxed);
            }
        }
        // Known, gone from the fleet (lifted elsewhere, or ended; with a secret, by a sealed
        // lift): lifted here too.
        let gone: Vec<IpAddr> = self
            .known_bans
            .iter()
            .filter(|ip| !remote_live.contains_key(ip) && !sent.contains(ip))
            .copied()
            .collect();
        for ip in gone {
            self.known_bans.remove(&ip);
            if local.contains_key(&ip) {
                self.bans.unban(ip);
                tracing::info!(source = %ip, "fleet: ban lifted here as it was lifted in the fleet");
            }
        }
        if pipe.cmd_iter().next().is_some() {
            let _: () = pipe.query_async(c).await?;
        }
        Ok(())
    }

    /// Reads a hash of the fleet's and the epoch, atomically ([`READ_HASH`]); either key of the
    /// wrong type is deleted (and counted). The reply is read with [`Agent::parse_read_hash`].
    fn read_hash_cmd(&self, key: &str) -> redis::Cmd {
        let mut cmd = evalsha(S_READ_HASH, 2);
        cmd.arg(key).arg(self.keys.epoch());
        cmd
    }

    /// The epoch and the fields and values a [`READ_HASH`] answered.
    fn parse_read_hash(&self, reply: Vec<redis::Value>) -> HashRead {
        let mut reply = reply.iter();
        self.count_ignored(reply.next().and_then(int).unwrap_or(0).max(0) as u64);
        let epoch = reply
            .next()
            .and_then(text)
            .filter(|e| !e.is_empty())
            .map(str::to_owned);
        let rest: Vec<&redis::Value> = reply.collect();
        let pairs = rest
            .chunks(2)
            .filter_map(|p| match p {
                [k, v] => Some((bytes(k)?.to_vec(), bytes(v)?.to_vec())),
                _ => None,
            })
            .collect();
        (epoch, pairs)
    }

    /// Sends pins first seen or approved here, and takes approvals made elsewhere (an approval
    /// on one host unhides the tool on all).
    /// `read`: the pins' hash as [`Agent::read_hash_cmd`] read it.
    async fn exchange_pins(
        &mut self,
        c: &mut MultiplexedConnection,
        read: HashRead,
    ) -> redis::RedisResult<()> {
        let key = self.keys.pins();
        let (_, remote) = read;
        let remote: HashMap<String, String> = remote
            .into_iter()
            .filter_map(|(k, v)| {
                // A field that is not UTF-8 names no tool of this host's: left alone.
                Some((
                    String::from_utf8(k).ok()?,
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .collect();
        let mut pipe = redis::pipe();
        let mut any = false;
        let secret = self.fleet.secret.as_ref();
        let fleet = self.fleet.name.as_str();
        for (name, pin) in self.shared.pins.snapshot() {
            let raw = remote.get(&name);
            let theirs = raw
                .and_then(|r| open(secret, fleet, "pins", &name, r))
                .and_then(|j| serde_json::from_str::<crate::policy::pins::Pin>(j).ok());
            let forged = raw.is_some() && theirs.is_none();
            if forged {
                // Not sealed with the fleet's secret (or unreadable): ignored, and replaced by
                // what this host knows.
                self.shared.fleet.unsealed_ignored.fetch_add(1, Relaxed);
                tracing::warn!(tool = %name, "fleet: a pin in Redis is not sealed with the fleet's secret (or unreadable); ignored");
            }
            let agreed = self.agreed_pins.get(&name);
            match theirs {
                None => {
                    if let Ok(j) = serde_json::to_string(&strip(&pin)) {
                        let j = seal(secret, fleet, "pins", &name, &j);
                        if forged {
                            pipe.hset(&key, &name, j).ignore();
                        } else {
                            pipe.hset_nx(&key, &name, j).ignore();
                        }
                        any = true;
                    }
                    self.agreed_pins.insert(name, pin.approved.clone());
                }
                Some(theirs) if theirs.approved == pin.approved => {
                    self.agreed_pins.insert(name, pin.approved.clone());
                }
                Some(theirs) => {
                    let changed_here = agreed.is_some_and(|a| *a != pin.approved);
                    if changed_here || pin.configured.is_some() {
                        // Approved here since the last agreement: the fleet takes it.
                        if let Ok(j) = serde_json::to_string(&strip(&pin)) {
                            let j = seal(secret, fleet, "pins", &name, &j);
                            pipe.hset(&key, &name, j).ignore();
                            any = true;
                        }
                        self.agreed_pins.insert(name, pin.approved.clone());
                    } else {
                        // Approved elsewhere: taken here; what waits here for approval stays
                        // waiting unless it is what was approved.
                        let mut adopted = theirs;
                        adopted.configured = None;
                        adopted.pending =
                            pin.pending.clone().filter(|(d, _)| *d != adopted.approved);
                        tracing::info!(
                            tool = %name,
                            approved = %adopted.approved,
                            "fleet: tool definition approved by another gateway of the fleet"
                        );
                        self.agreed_pins
                            .insert(name.clone(), adopted.approved.clone());
                        self.shared.pins.restore(name, adopted);
                        self.shared.fleet.approvals_received.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        if any {
            let _: () = pipe.query_async(c).await?;
        }
        Ok(())
    }
}

/// A pin as the fleet keeps it: what is approved, without what waits here.
fn strip(pin: &crate::policy::pins::Pin) -> crate::policy::pins::Pin {
    let mut p = pin.clone();
    p.pending = None;
    p.configured = None;
    p
}

/// `/metrics` lines of the fleet agent.
pub fn render_metrics(stats: &FleetStats, limits: &crate::policy::limits::State, out: &mut String) {
    use std::fmt::Write as _;
    if !stats.enabled.load(Relaxed) {
        return;
    }
    let fallback = limits.fleet_mode() == FLEET_FALLBACK;
    let lines: [(&str, &str, &str, String); 14] = [
        (
            "mcp_gateway_fleet_connected",
            "gauge",
            "1 while the fleet agent reaches Redis.",
            u64::from(stats.connected.load(Relaxed)).to_string(),
        ),
        (
            "mcp_gateway_fleet_fallback_active",
            "gauge",
            "1 while Redis is unreachable: rates at this host's share, budgets fail closed unless fleet_fail_open.",
            u64::from(fallback).to_string(),
        ),
        (
            "mcp_gateway_fleet_hosts_live",
            "gauge",
            "Gateways of the fleet alive at the last heartbeat (this one included).",
            stats.hosts.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_rounds_total",
            "counter",
            "Exchanges with Redis (lease round trips).",
            stats.rounds.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_round_seconds_total",
            "counter",
            "Time spent in exchanges with Redis.",
            format!("{:.6}", stats.round_us_total.load(Relaxed) as f64 / 1e6),
        ),
        (
            "mcp_gateway_fleet_round_failures_total",
            "counter",
            "Exchanges with Redis that failed.",
            stats.failures.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_tokens_granted_total",
            "counter",
            "Tokens of fleet-wide rates leased to this host.",
            format!(
                "{:.3}",
                stats.tokens_granted.load(Relaxed) as f64 / MILLI as f64
            ),
        ),
        (
            "mcp_gateway_fleet_leases",
            "gauge",
            "Fleet-wide rates this host holds a lease of.",
            stats.leases.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_bans_received_total",
            "counter",
            "Bans made by another gateway of the fleet, applied here.",
            stats.bans_received.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_approvals_received_total",
            "counter",
            "Tool approvals made by another gateway of the fleet, taken here.",
            stats.approvals_received.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_unsealed_ignored_total",
            "counter",
            "Values in Redis ignored here: not sealed with the fleet's secret, unreadable, older than one seen, or keys of the wrong type.",
            stats.unsealed_ignored.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_caps_shared",
            "gauge",
            "Concurrency caps (max_concurrent, max_connections) shared with the fleet.",
            stats.caps.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_in_flight_others",
            "gauge",
            "Requests in flight on the other gateways of the fleet under the caps shared (summed), as last read.",
            stats.in_flight_others.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_reseeds_total",
            "counter",
            "Times Redis had lost the fleet's state and was published again from here.",
            stats.reseeds.load(Relaxed).to_string(),
        ),
    ];
    for (name, kind, help, value) in lines {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let name = "mcp_gateway_fleet_sessions_ended_total";
    let _ = writeln!(
        out,
        "# HELP {name} The gateway's own sessions ended by their client: sent to the fleet from here, or ended on another gateway and taken here.\n# TYPE {name} counter\n{name}{{direction=\"sent\"}} {}\n{name}{{direction=\"received\"}} {}",
        stats.sessions_ended_sent.load(Relaxed),
        stats.sessions_ended_received.load(Relaxed),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Counted {
        Counted::Budget {
            scope: "tenant".into(),
            tenant: "a|b".into(),
            subject: "x".into(),
        }
    }

    #[test]
    fn runs_fill_at_most_half_of_the_other_hosts_windows() {
        let run = Counted::Budget {
            scope: "run".into(),
            tenant: "a".into(),
            subject: "scope\":\"tenant".into(),
        };
        let is_run = |what: &Counted| {
            let field = window_field(what, 60, 1000).expect("field");
            parse_window_field(&field).expect("read back").what.is_run()
        };
        assert!(is_run(&run) && !is_run(&budget()));
        let half = BUDGET_SEEN / 2;
        assert!(room_for(half - 1, half - 1, true));
        assert!(!room_for(half, half, true), "runs hold their half");
        assert!(
            room_for(half, half, false),
            "a tenant's window still finds room"
        );
        assert!(!room_for(BUDGET_SEEN, 0, false));
    }

    #[test]
    fn a_window_field_reads_back_and_a_malformed_one_does_not() {
        let wf = window_field(&budget(), 60, 1000).expect("field");
        assert_eq!(
            parse_window_field(&wf),
            Some(WindowField {
                end: 60_060,
                len_s: 60,
                window: 1000,
                what: budget()
            })
        );
        // The host comes after the last `|`, whatever the JSON holds.
        let field = format!("{wf}|host/gw/1/2");
        assert_eq!(split_host(&field), Some((wf.as_str(), "host/gw/1/2")));
        for bad in [
            "abc".to_owned(),
            "1|2|3".to_owned(),
            // An end that is not the window's.
            wf.replacen("60060", "99999999999", 1),
            "60060|0|1000|{}".to_owned(),
            format!(
                "60060|60|1000|{}",
                r#"{"kind":"refusals","source":"1.2.3.4"}"#
            ),
        ] {
            assert_eq!(parse_window_field(&bad), None, "{bad}");
        }
        assert_eq!(split_host("abc|"), None);
        assert_eq!(split_host("|h"), None);
    }

    #[test]
    fn a_spend_reads_only_as_amount_and_sequence() {
        assert_eq!(parse_spend("5|17"), Some((5, 17)));
        for bad in ["abc", "5", "-1|3", "5|x", "5|3|1", "1e3|2", ""] {
            assert_eq!(parse_spend(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_sealed_spend_opens_only_under_its_field_and_the_secret() {
        let secret = FleetSecret([7; 32]);
        let field = "60060|60|1000|{}|h1";
        let raw = seal(Some(&secret), "f", "budgets", field, "5|17");
        assert_eq!(
            open(Some(&secret), "f", "budgets", field, &raw),
            Some("5|17")
        );
        // Moved to another host's field, another fleet, or changed: refused.
        assert_eq!(
            open(Some(&secret), "f", "budgets", "60060|60|1000|{}|h2", &raw),
            None
        );
        assert_eq!(open(Some(&secret), "g", "budgets", field, &raw), None);
        let lowered = raw.replace(":5|17", ":0|18");
        assert_eq!(open(Some(&secret), "f", "budgets", field, &lowered), None);
        // Bare, or under another secret: refused; without a secret, a bare value is taken.
        assert_eq!(open(Some(&secret), "f", "budgets", field, "5|17"), None);
        assert_eq!(
            open(Some(&FleetSecret([8; 32])), "f", "budgets", field, &raw),
            None
        );
        assert_eq!(open(None, "f", "budgets", field, "5|17"), Some("5|17"));
        // A host's member of the registry.
        let member = seal(Some(&secret), "f", "hosts", "", "h1");
        assert_eq!(open(Some(&secret), "f", "hosts", "", &member), Some("h1"));
        assert_eq!(open(Some(&secret), "f", "hosts", "", "h1"), None);
    }

    #[test]
    fn an_ended_session_opens_only_sealed_for_this_fleet_and_cursors_read_as_stream_ids() {
        let secret = FleetSecret([7; 32]);
        let hex = format!("{:016x}", 0x0123_4567_89ab_cdefu64);
        let sealed = seal(Some(&secret), "f", "ended", "", &hex);
        assert_eq!(
            open(Some(&secret), "f", "ended", "", &sealed),
            Some(hex.as_str())
        );
        // Bare, of another fleet, or as another kind of value: refused.
        assert_eq!(open(Some(&secret), "f", "ended", "", &hex), None);
        assert_eq!(open(Some(&secret), "g", "ended", "", &sealed), None);
        let ban = seal(Some(&secret), "f", "bans", "", &hex);
        assert_eq!(open(Some(&secret), "f", "ended", "", &ban), None);
        for ok in ["0-0", "1732800000000-0", "1-17"] {
            assert!(is_stream_id(ok), "{ok}");
        }
        for bad in ["", "-", "1-", "-1", "1", "1-2-3", "a-1", "1-+2", "+1-2"] {
            assert!(!is_stream_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_cap_count_opens_only_under_its_cap_and_host_and_reads_only_as_digits() {
        let secret = FleetSecret([7; 32]);
        let field = cap_field("in-flight/tenant/a", "h1");
        let raw = seal(Some(&secret), "f", "caps", &field, "4");
        let read = |s: Option<&FleetSecret>, field: &str, raw: &str| {
            open(s, "f", "caps", field, raw).and_then(parse_count)
        };
        assert_eq!(read(Some(&secret), &field, &raw), Some(4));
        // Moved to another host or cap, lowered, bare, or of another kind: refused.
        assert_eq!(
            read(Some(&secret), &cap_field("in-flight/tenant/a", "h2"), &raw),
            None
        );
        assert_eq!(
            read(Some(&secret), &cap_field("connections/a", "h1"), &raw),
            None
        );
        assert_eq!(read(Some(&secret), &field, &raw.replace(":4", ":0")), None);
        assert_eq!(read(Some(&secret), &field, "0"), None);
        let spend = seal(Some(&secret), "f", "budgets", &field, "4");
        assert_eq!(read(Some(&secret), &field, &spend), None);
        // Without a secret: digits, at most a million.
        assert_eq!(read(None, &field, "17"), Some(17));
        for bad in [
            "",
            "-1",
            "+1",
            "1.5",
            "1e3",
            " 1",
            "x",
            "99999999999999999999",
            "1000001",
        ] {
            assert_eq!(read(None, &field, bad), None, "{bad}");
        }
        assert_eq!(read(None, &field, "1000000"), Some(1_000_000));
    }

    #[test]
    fn replies_are_read_as_bytes_never_failing_on_what_is_not_utf8() {
        let v = redis::Value::BulkString(vec![0xff, b'a']);
        assert_eq!(bytes(&v), Some(&[0xff, b'a'][..]));
        assert_eq!(text(&v), None);
        assert_eq!(int(&redis::Value::Int(3)), Some(3));
        assert_eq!(int(&redis::Value::BulkString(b"12".to_vec())), Some(12));
        assert_eq!(int(&redis::Value::Nil), None);
    }
}
