//! What a configuration change changed, in a line an operator reads in the log: routes,
//! upstreams and tenants added, removed and changed (by name), and the other sections that
//! differ. Compares two validated configurations; never touches files or the running state.

use std::fmt;

use super::Config;

/// Names added, removed and changed in one list of named items.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Changes {
    fn of<T: PartialEq>(old: &[T], new: &[T], name: impl Fn(&T) -> &str) -> Self {
        let mut c = Self::default();
        for n in new {
            match old.iter().find(|o| name(o) == name(n)) {
                None => c.added.push(name(n).to_owned()),
                Some(o) if o != n => c.changed.push(name(n).to_owned()),
                Some(_) => {}
            }
        }
        for o in old {
            if !new.iter().any(|n| name(n) == name(o)) {
                c.removed.push(name(o).to_owned());
            }
        }
        c
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The difference between a running configuration and the one replacing it.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigDiff {
    pub routes: Changes,
    pub upstreams: Changes,
    pub tenants: Changes,
    /// Other sections that differ (`policy`, `auth`, `http`, ...).
    pub sections: Vec<&'static str>,
}

impl ConfigDiff {
    pub fn new(old: &Config, new: &Config) -> Self {
        let mut sections = Vec::new();
        for (name, differs) in [
            ("listeners", old.listeners != new.listeners),
            (
                "admin",
                old.admin_tls != new.admin_tls
                    || old.admin_token != new.admin_token
                    || old.admin_per_address != new.admin_per_address,
            ),
            ("telemetry", old.telemetry != new.telemetry),
            ("kernel", old.kernel != new.kernel),
            ("http", old.http != new.http),
            ("auth", old.auth != new.auth || old.jwks != new.jwks),
            ("policy", old.policy != new.policy),
            ("audit", old.audit != new.audit),
            ("auto_ban", old.auto_ban != new.auto_ban),
            ("default_tenant", old.default_tenant != new.default_tenant),
            ("shutdown_grace", old.shutdown_grace != new.shutdown_grace),
        ] {
            if differs {
                sections.push(name);
            }
        }
        Self {
            routes: Changes::of(&old.routes, &new.routes, |r| r.path.as_str()),
            upstreams: Changes::of(&old.upstreams, &new.upstreams, |u| u.name.as_str()),
            tenants: Changes::of(&old.tenants, &new.tenants, |t| t.name.as_str()),
            sections,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
            && self.upstreams.is_empty()
            && self.tenants.is_empty()
            && self.sections.is_empty()
    }
}

impl fmt::Display for ConfigDiff {
    /// `routes +/b ~/a; upstreams -old; policy changed`, or `no change`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no change");
        }
        let mut parts = Vec::new();
        for (what, c) in [
            ("routes", &self.routes),
            ("upstreams", &self.upstreams),
            ("tenants", &self.tenants),
        ] {
            if c.is_empty() {
                continue;
            }
            let names = c
                .added
                .iter()
                .map(|n| format!("+{n}"))
                .chain(c.removed.iter().map(|n| format!("-{n}")))
                .chain(c.changed.iter().map(|n| format!("~{n}")))
                .collect::<Vec<_>>()
                .join(" ");
            parts.push(format!("{what} {names}"));
        }
        if !self.sections.is_empty() {
            parts.push(format!("changed {}", self.sections.join(" ")));
        }
        f.write_str(&parts.join("; "))
    }
}

#[cfg(test)]
#[path = "diff_tests.rs"]
mod tests;
