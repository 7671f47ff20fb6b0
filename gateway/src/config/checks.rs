//! Checks that catch likely mistakes in a configuration before it is served: millisecond fields
//! given in seconds, tool rules naming an upstream that does not exist, and (for `gateway check`
//! only) facts of the host such as missing interfaces. Also how a load may leave out the
//! environment (secrets) and DNS, so that `gateway check` runs on a machine without either.
//! Nothing here creates a file or changes the host.

use globset::GlobBuilder;

use super::{ConfigError, RawConfig, RawPolicy, invalid};

/// The shortest time a timeout or interval in milliseconds may be (0 keeps its own meaning where
/// a field allows it). A value below is nearly always seconds written as milliseconds.
pub const MS_FLOOR: u64 = 100;

/// How a configuration is loaded. The default reads the environment and resolves host names, as
/// a start does; `gateway check --no-env --offline` needs neither.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Environment variables named by the file (tokens, credentials) are not read: each gets a
    /// placeholder, so a configuration can be checked without the production secrets.
    pub no_env: bool,
    /// Upstream host names are not resolved (no DNS, no network).
    pub offline: bool,
    /// The configuration is for another host: the log files and directories it names are not
    /// looked at here (files read at load, such as a JWKS, still are).
    pub no_host: bool,
}

/// What `--no-env` puts in place of an environment variable (long enough for every length check).
pub const ENV_PLACEHOLDER: &str = "<not read: --no-env placeholder>";

impl LoadOptions {
    /// The value of environment variable `var`, or the placeholder under `no_env`.
    pub fn env(&self, var: &str) -> Result<String, std::env::VarError> {
        if self.no_env {
            return Ok(ENV_PLACEHOLDER.to_owned());
        }
        std::env::var(var)
    }

    /// Whether the gateway could append to a log file, unless the file is another host's.
    pub(super) fn writable_log_path(&self, path: &std::path::Path) -> Result<(), String> {
        if self.no_host {
            return Ok(());
        }
        super::writable_log_path(path)
    }
}

fn floor(key: String, ms: u64) -> Result<(), ConfigError> {
    if ms == 0 || ms >= MS_FLOOR {
        return Ok(());
    }
    Err(invalid(
        key,
        format!(
            "{ms} ms is below the floor of {MS_FLOOR} ms; did you mean {ms} seconds ({})?",
            ms * 1000
        ),
    ))
}

impl RawConfig {
    /// Every timeout and interval in milliseconds is 0 (where a field allows it; checked with
    /// the field) or at least [`MS_FLOOR`].
    pub(super) fn check_ms_floors(&self) -> Result<(), ConfigError> {
        floor(
            "gateway.shutdown_grace_ms".into(),
            self.gateway.shutdown_grace_ms,
        )?;
        floor(
            "http.request_timeout_ms".into(),
            self.http.request_timeout_ms,
        )?;
        floor("http.idle_timeout_ms".into(), self.http.idle_timeout_ms)?;
        for (i, l) in self.listeners.iter().enumerate() {
            if let Some(ms) = l.tls.as_ref().and_then(|t| t.handshake_timeout_ms) {
                floor(format!("listeners[{i}].tls.handshake_timeout_ms"), ms)?;
            }
            if let Some(p) = &l.proxy_protocol {
                floor(
                    format!("listeners[{i}].proxy_protocol.header_timeout_ms"),
                    p.header_timeout_ms,
                )?;
            }
        }
        if let Some(ms) = self.admin.tls.as_ref().and_then(|t| t.handshake_timeout_ms) {
            floor("admin.tls.handshake_timeout_ms".into(), ms)?;
        }
        if let Some(o) = &self.telemetry.otlp {
            floor("telemetry.otlp.timeout_ms".into(), o.timeout_ms)?;
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = |f: &str| format!("upstreams[{i}].{f}");
            for (f, ms) in [
                ("resolve_every_ms", u.resolve_every_ms),
                ("connect_timeout_ms", u.connect_timeout_ms),
                ("response_timeout_ms", u.response_timeout_ms),
                ("stream_idle_timeout_ms", u.stream_idle_timeout_ms),
                ("idle_reuse_ms", u.idle_reuse_ms),
            ] {
                floor(key(f), ms)?;
            }
            if let Some(s) = &u.stdio {
                floor(key("stdio.start_timeout_ms"), s.start_timeout_ms)?;
                floor(key("stdio.idle_shutdown_ms"), s.idle_shutdown_ms)?;
            }
            if let Some(b) = &u.breaker {
                floor(key("breaker.open_ms"), b.open_ms)?;
            }
        }
        Ok(())
    }

    /// A tool rule whose glob names an upstream (`<upstream>/<tool>`) must name one that exists:
    /// a literal name exactly, a glob at least one. A rule for a misspelt upstream would never
    /// match, and a deny rule that never matches fails open.
    pub(super) fn check_rule_upstreams(&self) -> Result<(), ConfigError> {
        let names: Vec<&str> = self.upstreams.iter().map(|u| u.name.as_str()).collect();
        let check = |scope: String, p: &RawPolicy| -> Result<(), ConfigError> {
            for (i, rule) in p.tools.iter().enumerate() {
                let Some((upstream, _)) = rule.pattern.split_once('/') else {
                    continue;
                };
                let found = if upstream.contains(['*', '?', '[', '{']) {
                    // A bad glob is reported with its key by the policy compiler.
                    GlobBuilder::new(upstream).build().map_or(true, |g| {
                        let g = g.compile_matcher();
                        names.iter().any(|n| g.is_match(n))
                    })
                } else {
                    names.contains(&upstream)
                };
                if !found {
                    return Err(invalid(
                        format!("{scope}.tools[{i}].match"),
                        format!(
                            "`{}` names upstream `{upstream}`, which is not configured (upstreams: {})",
                            rule.pattern,
                            if names.is_empty() {
                                "none".to_owned()
                            } else {
                                names.join(", ")
                            }
                        ),
                    ));
                }
            }
            Ok(())
        };
        check("policy".into(), &self.policy)?;
        for t in &self.tenants {
            if let Some(p) = &t.policy {
                check(format!("tenants[{}].policy", t.name), p)?;
            }
        }
        for (i, pin) in self.policy.pins.iter().enumerate() {
            if !names.contains(&pin.upstream.as_str()) {
                return Err(invalid(
                    format!("policy.pins[{i}].upstream"),
                    format!("no upstream is named `{}`", pin.upstream),
                ));
            }
        }
        Ok(())
    }
}

impl super::Config {
    /// What a start would find missing on this host, beyond the file itself: the kernel
    /// program's interfaces. For `gateway check`; reads only.
    pub fn check_host(&self) -> Result<(), ConfigError> {
        if !self.kernel.enabled {
            return Ok(());
        }
        for (i, name) in self.kernel.interfaces.iter().enumerate() {
            if crate::host::interface_index(name) == 0 {
                return Err(invalid(
                    format!("kernel.interfaces[{i}]"),
                    format!("this host has no interface `{name}`"),
                ));
            }
        }
        Ok(())
    }
}

/// The API key of the embedded default's governed demo route (`/mcp/governed`). It is public:
/// a configuration that accepts it is a demo, and the gateway says so at start.
pub const DEMO_API_KEY: &str = "demo-key-not-for-production";

/// Logs, at start, the demo API key when the configuration accepts it (the embedded default,
/// or a copy of it): the demo needs it printed, and a production copy needs the warning.
pub fn warn_demo_key(c: &super::Config) {
    let digest = crate::config::sha256_hex(DEMO_API_KEY);
    if let Some(k) = c.auth.api_keys.iter().find(|k| k.sha256 == digest) {
        let route = c
            .routes
            .iter()
            .find(|r| r.auth.contains(&super::AuthMethod::ApiKey))
            .map_or("", |r| r.path.as_str());
        tracing::warn!(
            api_key = DEMO_API_KEY,
            tenant = %k.tenant,
            route,
            "this configuration accepts the public demo API key: try it with `Authorization: Bearer {DEMO_API_KEY}`; never use it in production"
        );
    }
}

#[cfg(test)]
#[path = "checks_tests.rs"]
mod tests;
