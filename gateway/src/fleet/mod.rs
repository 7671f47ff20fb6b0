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
    /// What the fleet agreed in Redis (the session key's salt with a secret, else the key, as
    /// written there): published again when Redis loses it, and handed to an upgrade.
    pub agreed: Option<String>,
}

/// The fleet at start: the session key (the first gateway to reach Redis sets it, or with a
/// secret its salt; the others read it) and how many hosts are live. `proposal`: what the
/// gateway handing over in an upgrade had agreed, proposed in place of a new one (a Redis
/// that lost it gets it back, and the sessions opened before the upgrade go on).
pub async fn start(fleet: &FleetConfig, proposal: Option<&str>) -> Start {
    if fleet.secret.is_none() {
        tracing::warn!(
            fleet = %fleet.name,
            "fleet: no `[state] fleet_secret_env`: whoever reads this Redis can seal session ids, and whoever writes it can approve tools and ban addresses for every gateway of the fleet; keep Redis private, or set a fleet secret"
        );
    }
    let unreachable = Start {
        session_key: None,
        hosts: 2,
        agreed: None,
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
        let mine = proposal.map_or_else(
            || URL_SAFE_NO_PAD.encode(crate::session::new_key()),
            str::to_owned,
        );
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
            Start {
                session_key,
                hosts,
                agreed: Some(agreed.trim().to_owned()),
            }
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
    /// Lifts this host made or read in Redis, by the end of the ban each lifted, until then:
    /// published again when Redis lost them (see [`Agent::exchange_bans`]).
    lifts: HashMap<IpAddr, u64>,
    /// Whether a bans exchange has run in this process: until then the bans held here are
    /// those kept over a restart (see [`Agent::exchange_bans`]).
    bans_exchanged: bool,
    /// Pins as last agreed with the fleet: key → approved digest.
    agreed_pins: HashMap<String, String>,
    /// The digest of the changed definition held for approval, by pin, as last agreed with the
    /// fleet (see [`Agent::exchange_pins`]).
    agreed_pending: HashMap<String, Option<String>>,
    /// The fleet's epoch as this host last saw it (`None` before the first budget round).
    epoch: Option<String>,
    /// Redis lost the fleet's state: the session key (or salt) this gateway agreed is to be
    /// published again (see [`Agent::agree_session`]).
    agree_session: bool,
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
        lifts: HashMap::new(),
        bans_exchanged: false,
        agreed_pins: HashMap::new(),
        agreed_pending: HashMap::new(),
        epoch: None,
        agree_session: false,
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
        if agent.shared.fleet.paused.load(Relaxed) {
            continue;
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
            if std::mem::take(&mut agent.agree_session)
                && let Err(e) = agent.agree_session(c).await
            {
                agent.agree_session = true;
                return Err(e);
            }
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
    /// Publishes again the session key (or salt) this gateway agreed, after Redis lost it:
    /// else the next gateway to start agreed a new one, and sessions no longer went on from
    /// one gateway to another (an operator's review). Where another gateway set one first,
    /// it is said and counted: the two keep sealing with their own until restarted.
    async fn agree_session(
        &mut self,
        c: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        let Some(mine) = self.shared.fleet.session_agreed.get() else {
            return Ok(());
        };
        let key = match self.fleet.secret {
            Some(_) => self.keys.session_salt(),
            None => self.keys.session_key(),
        };
        let agreed: Vec<u8> = redis::cmd("EVAL")
            .arg(AGREE)
            .arg(1)
            .arg(&key)
            .arg(mine)
            .query_async(c)
            .await?;
        if String::from_utf8_lossy(&agreed).trim() != mine {
            self.shared.fleet.session_conflicts.fetch_add(1, Relaxed);
            tracing::error!(
                redis = shown(&self.fleet.redis),
                "fleet: Redis lost the session key this gateway agreed, and another gateway set a new one first: sessions opened here do not go on there, nor theirs here, until the gateways are restarted (mcp_gateway_fleet_session_key_conflicts_total)"
            );
        }
        Ok(())
    }
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
}

/// A pin as the fleet holds it: without the digest this host's configuration pins it to (each
/// host's own), with the changed definition held for approval (held on every host).
fn strip(pin: &crate::policy::pins::Pin) -> crate::policy::pins::Pin {
    let mut p = pin.clone();
    p.configured = None;
    p
}

mod bans_pins;
mod caps;
mod ended;
mod limits;
mod metrics;
mod scripts;
mod wire;

pub use metrics::render_metrics;
use scripts::*;
use wire::*;

#[cfg(test)]
mod tests;
