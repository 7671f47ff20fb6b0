//! `[state]`: where the policy state that outlives a process (budgets' spend, pins and approvals,
//! auto-ban counts, a mirror of the bans) is kept, and how often it is written.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, PartialEq, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    /// The folder of the store (`state.redb` inside); default `/var/lib/mcp-gateway/<instance>/`
    /// (`$STATE_DIRECTORY/<instance>/` under systemd's `StateDirectory=`).
    #[serde(default)]
    pub path: Option<String>,
    /// How often the control thread writes what changed (the most spend a crash can lose is
    /// what was spent in one interval). Default 1000.
    #[serde(default)]
    pub flush_interval_ms: Option<u64>,
    /// Keep nothing across restarts (budgets, pins and approvals start afresh each run).
    #[serde(default)]
    pub disabled: bool,
    /// A fleet of gateways shares its state through this Redis (`redis://host:port/db`):
    /// tenant, agent and tool rates, budgets, pins and approvals, bans, and the key that seals
    /// session ids. Unset: this gateway is alone.
    #[serde(default)]
    pub redis: Option<String>,
    /// The fleet's name: gateways with the same Redis and name share their state (default
    /// `default`).
    #[serde(default)]
    pub fleet: Option<String>,
    /// How often the fleet agent exchanges leases and spend with Redis. Default 25.
    #[serde(default)]
    pub fleet_round_ms: Option<u64>,
    /// With Redis unreachable, budgets admit on this host's own counts instead of refusing.
    #[serde(default)]
    pub fleet_fail_open: bool,
    /// With `rediss://`: the CA (PEM) that signed Redis's certificate, for a private CA
    /// (default: the system's roots). The connection is TLS or nothing, never plaintext.
    #[serde(default)]
    pub redis_ca_file: Option<String>,
    /// With `rediss://`: this gateway's client certificate (PEM) for a Redis that asks for
    /// one (`tls-auth-clients`); needs `redis_client_key_file`.
    #[serde(default)]
    pub redis_client_cert_file: Option<String>,
    /// With `rediss://`: the private key (PEM) of `redis_client_cert_file`.
    #[serde(default)]
    pub redis_client_key_file: Option<String>,
    /// The environment variable holding the fleet's secret (at least 32 characters, the same
    /// on every gateway of the fleet): the session key is derived from it and approvals and
    /// bans in Redis carry a MAC made with it, so that reading Redis does not give the session
    /// key and writing Redis neither approves a tool nor bans an address. Unset: Redis is
    /// trusted with all three (warned at start).
    #[serde(default)]
    pub fleet_secret_env: Option<String>,
    /// The environment variable holding the password Redis asks for (`AUTH`; with the user
    /// named in the address, if any), so that it need not be written in this file. An address
    /// that carries a password too is refused.
    #[serde(default)]
    pub redis_password_env: Option<String>,
}

/// The validated `[state]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    /// The store's folder; `None` when the store is disabled.
    pub dir: Option<PathBuf>,
    pub flush_interval: Duration,
    /// `[state] redis`: the fleet this gateway belongs to.
    pub fleet: Option<FleetConfig>,
}

/// The validated fleet settings of `[state]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    pub redis: String,
    pub name: String,
    pub round: Duration,
    pub fail_open: bool,
    /// `rediss://`: the CA and client certificate files (read when the agent connects).
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The fleet's secret, read from `fleet_secret_env` at validation.
    pub secret: Option<FleetSecret>,
    /// Redis's password, read from `redis_password_env` at validation.
    pub password: Option<RedisPassword>,
}

/// Redis's password; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisPassword(pub String);

impl std::fmt::Debug for RedisPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisPassword(<redacted>)")
    }
}

/// The fleet's secret (SHA-256 of the environment variable's value); never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct FleetSecret(pub [u8; 32]);

impl std::fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetSecret(<redacted>)")
    }
}

/// The shortest fleet secret accepted, in bytes.
const MIN_SECRET: usize = 32;

/// Where the store lives when `[state] path` is not given (and systemd did not name a state
/// directory).
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/mcp-gateway";

/// The folder the stores of instances go in: systemd's `StateDirectory=` (`$STATE_DIRECTORY`, its
/// first entry) when set, else [`DEFAULT_STATE_ROOT`].
pub fn state_root() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT))
}

impl RawState {
    pub fn validate(&self, instance: &str) -> Result<StateConfig, ConfigError> {
        let ms = self.flush_interval_ms.unwrap_or(1000);
        if !(10..=60_000).contains(&ms) {
            return Err(invalid(
                "state.flush_interval_ms",
                "must be between 10 and 60000",
            ));
        }
        if self.path.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("state.path", "must not be empty"));
        }
        let dir = (!self.disabled).then(|| {
            self.path
                .as_ref()
                .map_or_else(|| state_root().join(instance), PathBuf::from)
        });
        let fleet = match &self.redis {
            None => None,
            Some(url) => {
                let scheme = url.split_once("://").map(|(s, _)| s);
                let tls = scheme == Some("rediss");
                if scheme != Some("redis") && !tls {
                    return Err(invalid(
                        "state.redis",
                        "must be a `redis://host:port[/db]` or `rediss://host:port[/db]` (TLS) address",
                    ));
                }
                if url.contains('#') {
                    // `#insecure` would ask the client not to verify Redis's certificate.
                    return Err(invalid(
                        "state.redis",
                        "must not carry a `#` fragment (certificates are always verified)",
                    ));
                }
                let ca_file = self.redis_ca_file.as_ref().map(PathBuf::from);
                let client_cert = match (&self.redis_client_cert_file, &self.redis_client_key_file)
                {
                    (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
                    (None, None) => None,
                    _ => {
                        return Err(invalid(
                            "state.redis_client_cert_file",
                            "needs `redis_client_key_file`, and the other way round",
                        ));
                    }
                };
                if !tls && (ca_file.is_some() || client_cert.is_some()) {
                    return Err(invalid(
                        "state.redis_ca_file",
                        "the Redis TLS settings need a `rediss://` address",
                    ));
                }
                for (field, file) in [
                    ("state.redis_ca_file", ca_file.as_ref()),
                    (
                        "state.redis_client_cert_file",
                        client_cert.as_ref().map(|c| &c.0),
                    ),
                    (
                        "state.redis_client_key_file",
                        client_cert.as_ref().map(|c| &c.1),
                    ),
                ] {
                    if let Some(file) = file
                        && let Err(e) = std::fs::metadata(file)
                    {
                        return Err(invalid(field, format!("{}: {e}", file.display())));
                    }
                }
                let secret = match &self.fleet_secret_env {
                    None => None,
                    Some(var) => match std::env::var(var) {
                        Ok(v) if v.len() >= MIN_SECRET => {
                            use sha2::Digest as _;
                            Some(FleetSecret(sha2::Sha256::digest(v.as_bytes()).into()))
                        }
                        Ok(_) => {
                            return Err(invalid(
                                "state.fleet_secret_env",
                                format!("`{var}` holds fewer than {MIN_SECRET} characters"),
                            ));
                        }
                        Err(_) => {
                            return Err(invalid(
                                "state.fleet_secret_env",
                                format!("`{var}` is not set in the environment"),
                            ));
                        }
                    },
                };
                let parsed = match redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                    Ok(info) => info,
                    Err(e) => {
                        return Err(invalid("state.redis", format!("not a Redis address: {e}")));
                    }
                };
                let password = match &self.redis_password_env {
                    None => None,
                    Some(_) if parsed.redis_settings().password().is_some() => {
                        return Err(invalid(
                            "state.redis_password_env",
                            "the address carries a password too: give it in one place (the environment)",
                        ));
                    }
                    Some(var) => match std::env::var(var) {
                        Ok(v) if !v.is_empty() => Some(RedisPassword(v)),
                        _ => {
                            return Err(invalid(
                                "state.redis_password_env",
                                format!("`{var}` is not set in the environment (or empty)"),
                            ));
                        }
                    },
                };
                let name = self.fleet.clone().unwrap_or_else(|| "default".to_owned());
                if name.is_empty()
                    || name.len() > 64
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(invalid(
                        "state.fleet",
                        "must be 1 to 64 letters, digits, `-` or `_`",
                    ));
                }
                let round = self.fleet_round_ms.unwrap_or(25);
                if !(5..=1000).contains(&round) {
                    return Err(invalid(
                        "state.fleet_round_ms",
                        "must be between 5 and 1000",
                    ));
                }
                Some(FleetConfig {
                    redis: url.clone(),
                    name,
                    round: Duration::from_millis(round),
                    fail_open: self.fleet_fail_open,
                    ca_file,
                    client_cert,
                    secret,
                    password,
                })
            }
        };
        if self.redis.is_none()
            && (self.fleet.is_some()
                || self.fleet_round_ms.is_some()
                || self.fleet_fail_open
                || self.redis_ca_file.is_some()
                || self.redis_client_cert_file.is_some()
                || self.redis_client_key_file.is_some()
                || self.fleet_secret_env.is_some()
                || self.redis_password_env.is_some())
        {
            return Err(invalid(
                "state.fleet",
                "the fleet settings need `state.redis`",
            ));
        }
        Ok(StateConfig {
            dir,
            flush_interval: Duration::from_millis(ms),
            fleet,
        })
    }
}
