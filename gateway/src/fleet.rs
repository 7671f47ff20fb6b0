//! The fleet agent (`[state] redis`): one task on the control thread that shares this
//! gateway's policy state with the other gateways of its fleet through Redis.
//!
//! Every round (`fleet_round_ms`, default 25 ms) it makes one exchange with Redis, with atomic
//! Lua scripts: it asks for the tokens of fleet-wide rates that this host's workers will need
//! (each rate is one token bucket in Redis; what it grants becomes this host's lease, which
//! the workers take with one atomic operation), sends the budget spend made here since the
//! last round and reads the fleet's totals, and, less often, beats its heartbeat, exchanges
//! bans and pin approvals. It also agrees the key that seals session ids at start.
//!
//! It never runs on the request path and the workers never wait for it: they read what it
//! published (leases, totals, the fleet mode) without locks. When Redis cannot be reached,
//! rates fall back to this host's share (`limit ÷ live hosts`) and budgets refuse (unless
//! `fleet_fail_open`); recovery is automatic at the next round that reaches Redis.
//!
//! Redis is a shared store, not a trusted one: the connection is TLS when the address is
//! `rediss://` (never plaintext then); a Redis that lost its data (an `epoch` key gone) is
//! re-seeded from what the hosts know rather than trusted at zero; with a fleet secret
//! (`fleet_secret_env`) the session key is derived from the secret (Redis holds only a salt)
//! and approvals and bans carry a MAC, so a Redis writer without the secret can neither approve
//! a tool nor ban an address (it can still delete what is there, and loosen or tighten the
//! fleet-wide rates and budgets, which Redis counts).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use redis::aio::MultiplexedConnection;
use sha2::Sha256;

use crate::{
    config::{FleetConfig, FleetSecret},
    policy::limits::{Counted, FLEET_FALLBACK, FLEET_LEASED, MILLI},
    runtime::Shared,
};

/// A host not heard from for this long is no longer counted live.
const HOST_TTL: Duration = Duration::from_secs(3);
/// A lease nobody asked for in this many rounds is dropped (its tokens with it).
const IDLE_ROUNDS: u32 = 400;

/// Leases tokens of each fleet-wide rate, shared fairly between the hosts that want them:
/// `KEYS` the rates, `ARGV[1]` this host, `ARGV[2]` the round in microseconds, then for each
/// rate its rate per second, burst, the tokens wanted and those the host holds unused. Each host has its own bucket in the rate's hash
/// (`host → want|at|level`), refilled at its share of the rate, the share being its want over
/// the wants of every host that asked in the last four rounds; so the hosts' shares add up to
/// the rate whatever order their rounds reach Redis in (one bucket taken first come, first
/// served starves a host whose rounds fall just after another's). A bucket and what its host
/// holds unused come to at most its share of the burst or of two rounds, whichever is more. Answers the thousandths of a token
/// granted for each rate (fractions add up on the host). Redis's own clock refills the
/// buckets, so the hosts' clocks do not matter; a host silent for a minute is forgotten.
const RATES: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local host = ARGV[1]
local round = tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[4 * i - 1])
  local burst = tonumber(ARGV[4 * i])
  local want = tonumber(ARGV[4 * i + 1])
  local held = tonumber(ARGV[4 * i + 2])
  local total = want
  local at, level = nil, nil
  local all = redis.call('HGETALL', key)
  for j = 1, #all, 2 do
    local w, a, l = string.match(all[j + 1], '^([^|]+)|([^|]+)|([^|]+)$')
    w, a, l = tonumber(w), tonumber(a), tonumber(l)
    if w == nil or a == nil or l == nil or now - a > 60000000 then
      redis.call('HDEL', key, all[j])
    elseif all[j] == host then
      at, level = a, l
    elseif now - a < 4 * round then
      total = total + w
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
return out
";

/// Adds this host's budget spend and answers every budget window's total: `KEYS[1]` the hash
/// (field `<end unix s>|<len s>|<window>|<what as JSON>` → total), `KEYS[2]` the fleet's epoch;
/// `ARGV[1]` `add` or `max`, `ARGV[2]` the epoch this host knows, `ARGV[3]` an epoch to set if
/// there is none, then pairs of field and spend since the last round (`add`), or this host's
/// whole count (`max`: each host offers what it knows and the highest is kept, never the sum).
/// An `add` against another epoch than the host's (Redis lost its data: FLUSHALL, eviction, a
/// restart without persistence) changes nothing and answers `lost`: the host then offers its
/// whole counts (`max`), so that spent budgets are not reopened. Otherwise answers the epoch,
/// then pairs of field and total. Windows that ended are deleted.
const BUDGETS: &str = r"
local epoch = redis.call('GET', KEYS[2])
if ARGV[1] == 'add' and epoch ~= ARGV[2] then
  return {'lost'}
end
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[2], epoch)
end
for i = 4, #ARGV, 2 do
  if ARGV[1] == 'max' then
    local have = tonumber(redis.call('HGET', KEYS[1], ARGV[i])) or 0
    if tonumber(ARGV[i + 1]) > have then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
  else
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
local now = tonumber(redis.call('TIME')[1])
local all = redis.call('HGETALL', KEYS[1])
local out = {epoch}
for i = 1, #all, 2 do
  local ends = tonumber(string.match(all[i], '^(%d+)|'))
  if ends == nil or ends <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
";

/// The live hosts of the fleet (`KEYS[1]`, as [`HEARTBEAT`] keeps them), without beating.
const LIVE_HOSTS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], now, '+inf')
";

/// Beats this host's heartbeat and answers how many hosts are live: `KEYS[1]` the set of
/// hosts (score: when the host expires, in ms of Redis's clock), `ARGV` the host and the TTL.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
";

/// Counters for `/metrics` (written by the agent).
#[derive(Debug, Default)]
pub struct Stats {
    pub enabled: AtomicBool,
    pub connected: AtomicBool,
    pub hosts: AtomicU64,
    pub rounds: AtomicU64,
    pub round_us_total: AtomicU64,
    pub failures: AtomicU64,
    /// In thousandths of a token.
    pub tokens_granted: AtomicU64,
    pub leases: AtomicU64,
    pub bans_received: AtomicU64,
    pub bans_sent: AtomicU64,
    pub approvals_received: AtomicU64,
    /// Values found in Redis that this host ignored: not sealed with the fleet's secret (or
    /// sealed when this host has none), or not readable.
    pub unsealed_ignored: AtomicU64,
    /// Times Redis was found to have lost the fleet's state and was re-seeded from here.
    pub reseeds: AtomicU64,
}

/// The control thread's bans, as the agent sees them.
pub trait Bans: Send + 'static {
    /// The bans in force here, with the time each has left.
    fn local(&self) -> Vec<(IpAddr, Duration)>;
    /// Bans `ip` here (kernel map and workers), as the ban path does.
    fn ban(&self, ip: IpAddr, ttl: Duration);
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
    fn budgets(&self) -> String {
        format!("{}:budgets", self.prefix)
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
    if !fleet.redis.starts_with("rediss://") {
        return redis::Client::open(fleet.redis.as_str()).map_err(|e| e.to_string());
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
        fleet.redis.as_str(),
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
            .query_async(&mut conn)
            .await?;
        let key = match fleet.secret {
            Some(_) => keys.session_salt(),
            None => keys.session_key(),
        };
        let mine = URL_SAFE_NO_PAD.encode(crate::mcp::session::new_key());
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(&mine)
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        let agreed: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
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
    /// Bans this host knows the fleet has (sent or received).
    known_bans: HashSet<IpAddr>,
    /// Pins as last agreed with the fleet: key → approved digest.
    agreed_pins: HashMap<String, String>,
    /// Budgets are offered whole at the next round (Redis was lost, and may have lost them).
    resync: bool,
    /// The fleet's epoch as this host last saw it (`None` before the first budget round).
    epoch: Option<String>,
}

/// Runs the agent until the task is dropped.
pub async fn run(shared: Arc<Shared>, fleet: FleetConfig, instance: String, bans: impl Bans) {
    let host = format!(
        "{}/{instance}/{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
        std::process::id()
    );
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
        known_bans: HashSet::new(),
        agreed_pins: HashMap::new(),
        resync: true,
        epoch: None,
    };
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
    // Whether the last round failed (`None` before the first).
    let mut down: Option<bool> = None;
    let beat_every = (Duration::from_millis(250).as_millis() / agent.fleet.round.as_millis().max(1))
        .max(1) as u64;
    let bans_every = (Duration::from_millis(200).as_millis() / agent.fleet.round.as_millis().max(1))
        .max(1) as u64;
    let pins_every = (Duration::from_millis(500).as_millis() / agent.fleet.round.as_millis().max(1))
        .max(1) as u64;
    loop {
        tick.tick().await;
        let start = Instant::now();
        let result = async {
            let c = match &mut conn {
                Some(c) => c,
                None => conn.insert(connect(&client, agent.fleet.round).await?),
            };
            // Heartbeat first after (re)connecting: the live hosts count shares.
            if round.is_multiple_of(beat_every) || down != Some(false) {
                agent.heartbeat(c).await?;
            }
            agent.rates(c).await?;
            agent.budgets(c).await?;
            if round.is_multiple_of(bans_every) {
                agent.exchange_bans(c).await?;
            }
            if round.is_multiple_of(pins_every) {
                agent.exchange_pins(c).await?;
            }
            Ok::<_, redis::RedisError>(())
        }
        .await;
        round += 1;
        let stats = &agent.shared.fleet;
        stats.rounds.fetch_add(1, Relaxed);
        stats.round_us_total.fetch_add(
            u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
        match result {
            Ok(()) => {
                if down != Some(false) {
                    tracing::info!(
                        redis = shown(&agent.fleet.redis),
                        hosts = stats.hosts.load(Relaxed),
                        "fleet connected: rates, budgets, bans and approvals are shared"
                    );
                }
                down = Some(false);
                stats.connected.store(true, Relaxed);
            }
            Err(e) => {
                conn = None;
                agent.resync = true;
                stats.failures.fetch_add(1, Relaxed);
                stats.connected.store(false, Relaxed);
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
                        "fleet: Redis unreachable ({e}); rates fall back to this host's share (limit ÷ {hosts} live hosts); tried again every round"
                    );
                }
                down = Some(true);
            }
        }
    }
}

impl<B: Bans> Agent<B> {
    async fn heartbeat(&mut self, c: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let ttl = u64::try_from(HOST_TTL.as_millis()).unwrap_or(u64::MAX);
        let hosts: u64 = redis::cmd("EVAL")
            .arg(HEARTBEAT)
            .arg(1)
            .arg(self.keys.hosts())
            .arg(&self.host)
            .arg(ttl)
            .query_async(c)
            .await?;
        self.shared.fleet.hosts.store(hosts.max(1), Relaxed);
        self.shared.limits.set_fleet(FLEET_LEASED, hosts.max(1));
        Ok(())
    }

    /// Asks for each lease the tokens the last round's demand suggests (and one spare), at
    /// most two rounds of the fleet's rate: what a host holds unused is the bound by which the
    /// fleet may exceed its limit.
    async fn rates(&mut self, c: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let round_s = self.fleet.round.as_secs_f64();
        let mut asks: Vec<(u64, String, u64, u64, u64, u64)> = Vec::new();
        let hosts = self.shared.fleet.hosts.load(Relaxed).max(1);
        let mut idle: Vec<u64> = Vec::new();
        let mut leases = 0u64;
        self.shared.limits.for_each_lease(|key, lease| {
            leases += 1;
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
            // Kept at hand: this host's share of the burst, so that a burst arriving between
            // two rounds is served (one spare token met 429 on the second of five quick calls).
            let reserve = burst.div_ceil(hosts).max(1);
            let held = lease.tokens();
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
            }
            self.shared.limits.drop_leases(&idle);
        }
        if asks.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RATES).arg(asks.len());
        for (_, name, ..) in &asks {
            cmd.arg(name);
        }
        cmd.arg(&self.host).arg(
            u64::try_from(self.fleet.round.as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        for (_, _, rate, burst, want, held) in &asks {
            cmd.arg(*rate).arg((*burst).max(1)).arg(*want).arg(*held);
        }
        let granted: Vec<u64> = cmd.query_async(c).await?;
        // Never take more than was asked, whatever Redis answers (thousandths of a token).
        let granted: HashMap<u64, u64> = asks
            .iter()
            .zip(granted)
            .map(|(a, n)| (a.0, n.min(a.4.saturating_mul(MILLI as u64))))
            .collect();
        let mut total = 0;
        self.shared.limits.for_each_lease(|key, lease| {
            if let Some(n) = granted.get(&key) {
                lease.grant_milli(*n);
                total += *n;
            }
        });
        self.shared.fleet.tokens_granted.fetch_add(total, Relaxed);
        Ok(())
    }

    /// Sends the spend made here since the last round and takes the fleet's totals.
    async fn budgets(&mut self, c: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let counts = self.shared.limits.fleet_counts();
        let field = |what: &Counted, len_s: u64, window: u64| {
            let ends = window.saturating_add(1).saturating_mul(len_s);
            serde_json::to_string(what)
                .ok()
                .map(|w| format!("{ends}|{len_s}|{window}|{w}"))
        };
        let mut sent: HashMap<String, i64> = HashMap::new();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(BUDGETS)
            .arg(2)
            .arg(self.keys.budgets())
            .arg(self.keys.epoch())
            .arg(if self.resync { "max" } else { "add" })
            .arg(self.epoch.as_deref().unwrap_or(""))
            .arg(URL_SAFE_NO_PAD.encode(crate::mcp::session::new_key()));
        for count in &counts {
            if count.delta == 0 && !self.resync {
                continue;
            }
            if let Some(f) = field(&count.what, count.len_s, count.window) {
                if self.resync {
                    cmd.arg(&f).arg(count.used);
                } else {
                    cmd.arg(&f).arg(count.delta);
                }
                sent.insert(f, count.delta);
            }
        }
        let answer: Vec<String> = cmd.query_async(c).await?;
        let mut answer = answer.into_iter();
        let epoch = answer.next().unwrap_or_default();
        if epoch == "lost" {
            // Redis lost the fleet's state: offer whole counts (the highest is kept, so a spent
            // budget stays spent) and publish again what this host knows.
            tracing::warn!(
                redis = shown(&self.fleet.redis),
                "fleet: Redis lost the fleet's state (its epoch is gone or changed); budgets, bans and approvals are published again from here"
            );
            self.shared.fleet.reseeds.fetch_add(1, Relaxed);
            self.resync = true;
            self.known_bans.clear();
            self.agreed_pins.clear();
            return Box::pin(self.budgets(c)).await;
        }
        if self.epoch.as_ref().is_some_and(|e| *e != epoch) {
            // Another host re-seeded a Redis that lost its data: publish again from here too.
            self.shared.fleet.reseeds.fetch_add(1, Relaxed);
            self.known_bans.clear();
            self.agreed_pins.clear();
        }
        self.epoch = Some(epoch);
        self.resync = false;
        let mut totals = Vec::new();
        while let (Some(f), Some(t)) = (answer.next(), answer.next()) {
            totals.push((f, t.parse::<i64>().unwrap_or(0)));
        }
        for (f, total) in totals {
            let mut parts = f.splitn(4, '|');
            let (Some(_), Some(len_s), Some(window), Some(what)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(len_s), Ok(window), Ok(what)) = (
                len_s.parse::<u64>(),
                window.parse::<u64>(),
                serde_json::from_str::<Counted>(what),
            ) else {
                continue;
            };
            let sent = sent.get(&f).copied().unwrap_or(0);
            self.shared.limits.fleet_merge(
                what,
                len_s,
                window,
                sent,
                u64::try_from(total.max(0)).unwrap_or(0),
            );
        }
        Ok(())
    }

    /// Sends the bans made here and takes those made elsewhere (into the kernel's ban map, by
    /// the control thread's ban path); a ban lifted here is lifted in the fleet.
    async fn exchange_bans(&mut self, c: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let key = self.keys.bans();
        // Read with the epoch, atomically: bans read from a Redis that lost its data since this
        // round's budgets would look lifted everywhere; the next round re-seeds it instead.
        // As text: a value this host cannot read is ignored, never a failed round.
        let (epoch, remote): (Option<String>, HashMap<String, String>) = redis::pipe()
            .atomic()
            .get(self.keys.epoch())
            .hgetall(&key)
            .query_async(c)
            .await?;
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
        let mut ended: Vec<String> = Vec::new();
        // Bans in Redis not sealed with the fleet's secret (or unreadable): never applied.
        let mut forged: HashSet<IpAddr> = HashSet::new();
        for (k, raw) in remote {
            let Ok(ip) = k.parse::<IpAddr>() else {
                ended.push(k);
                continue;
            };
            let value = open(secret, fleet, "bans", &k, &raw).and_then(|v| {
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
                Some(_) => ended.push(k),
                None => {
                    self.shared.fleet.unsealed_ignored.fetch_add(1, Relaxed);
                    tracing::warn!(source = %ip, "fleet: a ban in Redis is not sealed with the fleet's secret (or unreadable); ignored");
                    // Replaced below by this host's own ban if it has one, else removed.
                    ended.push(k);
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
                self.bans.ban(*ip, left);
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

    /// Sends pins first seen or approved here, and takes approvals made elsewhere (an approval
    /// on one host unhides the tool on all).
    async fn exchange_pins(&mut self, c: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let key = self.keys.pins();
        let remote: HashMap<String, String> =
            redis::cmd("HGETALL").arg(&key).query_async(c).await?;
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
pub fn render_metrics(stats: &Stats, limits: &crate::policy::limits::State, out: &mut String) {
    use std::fmt::Write as _;
    if !stats.enabled.load(Relaxed) {
        return;
    }
    let fallback = limits.fleet_mode() == FLEET_FALLBACK;
    let lines: [(&str, &str, &str, String); 12] = [
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
            "Values in Redis ignored here: not sealed with the fleet's secret, or unreadable.",
            stats.unsealed_ignored.load(Relaxed).to_string(),
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
}
