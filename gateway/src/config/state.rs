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
}

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
                if scheme != Some("redis") {
                    return Err(invalid(
                        "state.redis",
                        "must be a `redis://host:port[/db]` address (`rediss://` is not supported yet)",
                    ));
                }
                if let Err(e) = redis::Client::open(url.as_str()) {
                    return Err(invalid("state.redis", format!("not a Redis address: {e}")));
                }
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
                })
            }
        };
        if self.redis.is_none()
            && (self.fleet.is_some() || self.fleet_round_ms.is_some() || self.fleet_fail_open)
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
