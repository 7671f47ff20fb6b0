//! The Lua scripts a round runs in Redis (each atomic), loaded once and called by digest,
//! and the round's pipeline.

use super::*;

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
pub(super) const RATES: &str = concat!(
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
pub(super) const BUDGET_SCAN: u64 = 512;
/// At most this many budget fields are asked for by name in a round, and remembered.
pub(super) const BUDGET_GETS: usize = 4096;
pub(super) const BUDGET_SEEN: usize = 16384;

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
pub(super) const BUDGETS: &str = concat!(
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
pub(super) const READ_HASH: &str = concat!(
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
pub(super) const LIVE_HOSTS: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], now, now + 2 * tonumber(ARGV[1]))
";

/// Agrees a value (`KEYS[1]`): sets `ARGV[1]` unless there is one, answers the one there. A key
/// of another type is replaced.
pub(super) const AGREE: &str = r"
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
pub(super) const HEARTBEAT: &str = concat!(
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
pub(super) const CAPS_MAX: usize = 1024;

/// Publishes what this host holds under each concurrency cap and reads what the other live
/// hosts hold: `KEYS` one hash per cap (field: host → count, sealed with a fleet secret),
/// `ARGV[1]` this host, `ARGV[2]` how many other live hosts follow (their names), then for each
/// cap this host's value (`''`: left as it is). Only the live hosts' fields
/// are read (`HMGET`): a host's count goes with its liveness; a hash grown 16 fields past the
/// live hosts is cut back to them. Answers for each cap the others' values in the order of
/// the hosts (`''`: none), then the count of what was ignored.
pub(super) const CAPS: &str = concat!(
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
pub(super) const ENDED_SEND: usize = 1024;
pub(super) const ENDED_READ: usize = 4096;

/// Sessions ended on the gateways of the fleet (`KEYS[1]`, a stream, each entry `k` → the
/// session's [`crate::session::ended_key`] in hex, sealed with a fleet secret): `ARGV[1]`
/// the id of the last entry this host read (`0-0`: none), `ARGV[2]` how many to read,
/// `ARGV[3]` the stream's length kept (about: `MAXLEN ~`), then the values to add. When the
/// entry at the cursor is gone (Redis lost the stream, someone deleted it, or the host fell
/// more than the length kept behind), the stream is read from the start. Answers the count of
/// what was ignored here, 1 if the stream was read again from the start (else 0), the new
/// cursor, then the id and value of each entry read (`''`: an entry without a `k`). Entry ids
/// are Redis's, so the hosts' clocks do not matter.
pub(super) const ENDED: &str = concat!(
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
pub(super) static ROUND_SCRIPTS: std::sync::LazyLock<[(&str, String); 6]> =
    std::sync::LazyLock::new(|| {
        [RATES, BUDGETS, READ_HASH, HEARTBEAT, ENDED, CAPS]
            .map(|src| (src, redis::Script::new(src).get_hash().to_owned()))
    });
/// Indexes of [`ROUND_SCRIPTS`].
pub(super) const S_RATES: usize = 0;
pub(super) const S_BUDGETS: usize = 1;
pub(super) const S_READ_HASH: usize = 2;
pub(super) const S_HEARTBEAT: usize = 3;
pub(super) const S_ENDED: usize = 4;
pub(super) const S_CAPS: usize = 5;

/// An `EVALSHA` of the script `script` of [`ROUND_SCRIPTS`] over `keys` keys.
pub(super) fn evalsha(script: usize, keys: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(ROUND_SCRIPTS[script].1.as_str()).arg(keys);
    cmd
}

/// Sends a round's commands in one exchange (a pipeline): answers each command's reply, a
/// server error among them as a value. Scripts Redis does not know are loaded, and the
/// round sent again (scripts that ran are not: a `NOSCRIPT` answers them all).
pub(super) async fn exchange(
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
pub(super) fn round_pipe() -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    pipe
}

/// A script's reply as the array it answers, or the error Redis answered instead.
pub(super) fn array(v: redis::Value) -> redis::RedisResult<Vec<redis::Value>> {
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
