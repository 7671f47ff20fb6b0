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
}

/// The validated `[state]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    /// The store's folder; `None` when the store is disabled.
    pub dir: Option<PathBuf>,
    pub flush_interval: Duration,
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
        Ok(StateConfig {
            dir,
            flush_interval: Duration::from_millis(ms),
        })
    }
}
