//! Checking a file's settings (`RawConfig::validate_settings`): each section's raw form
//! checks itself and gives what the gateway uses, in the order a file's errors are reported
//! (the first one found is the one named).

use super::*;

impl RawConfig {
    /// Checks every setting and resolves what it names (the environment and host names as
    /// `opts` allows). The policy's globs, patterns and keys are checked by compiling them,
    /// which [`crate::load`] does after this: a file is read whole there.
    pub(crate) fn validate_settings(self, opts: LoadOptions) -> Result<Config, ConfigError> {
        self.check_ms_floors()?;
        self.check_rule_upstreams()?;
        let g = self.gateway;
        let workers = g.workers()?;

        if self.listeners.is_empty() {
            return Err(invalid(
                "listeners",
                "at least one [[listeners]] entry is needed",
            ));
        }
        let mut listeners = Vec::new();
        // A handshake's default limit (a zero timeout is refused below, with `http`).
        let request_timeout = Duration::from_millis(self.http.request_timeout_ms);
        for (i, l) in self.listeners.into_iter().enumerate() {
            let l = l.validate(i, request_timeout, &listeners)?;
            listeners.push(l);
        }
        let admin = self.admin.validate(opts, &listeners, request_timeout)?;
        let telemetry = self.telemetry.validate(opts)?;
        let k = self.kernel;
        let deny = k.deny()?;
        let tenants = RawTenant::validate_all(self.tenants)?;
        let default_tenant = match k.default_tenant {
            Some(name) => tenants
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.id)
                .ok_or_else(|| {
                    invalid(
                        "kernel.default_tenant",
                        format!("no tenant is named `{name}`"),
                    )
                })?,
            None if tenants.is_empty() => 0,
            None => {
                return Err(invalid(
                    "kernel.default_tenant",
                    "with tenants configured, name the one that unmatched sources belong to",
                ));
            }
        };
        let http = self.http.validate()?;
        let mut upstreams: Vec<Upstream> = Vec::new();
        for (i, u) in self.upstreams.into_iter().enumerate() {
            let u = u.validate(i, opts, &upstreams)?;
            upstreams.push(u);
        }
        let mut routes: Vec<Route> = Vec::new();
        for (i, r) in self.routes.into_iter().enumerate() {
            let r = r.validate(i, &routes, &upstreams, &listeners, &self.auth)?;
            routes.push(r);
        }

        let jwks = match &self.auth.jwt {
            None => None,
            Some(j) => Some(std::fs::read_to_string(&j.jwks_file).map_err(|e| {
                invalid(
                    "auth.jwt.jwks_file",
                    format!("cannot read `{}`: {e}", j.jwks_file),
                )
            })?),
        };
        if let Some(b) = &self.auto_ban
            && (b.max_refusals == 0 || b.window_s == 0 || b.ban_s == 0)
        {
            return Err(invalid(
                "auto_ban",
                "`max_refusals`, `window_s` and `ban_s` must be above 0",
            ));
        }
        if let Some(b) = &self.auto_ban
            && b.ipv6_widen_at == 1
        {
            // One ban would be its /56: every IPv6 auto-ban 256 /64s.
            return Err(invalid(
                "auto_ban.ipv6_widen_at",
                "must be 0 (never widened) or at least 2",
            ));
        }
        if self.audit.anonymous_refusals_per_second == 0 {
            return Err(invalid(
                "audit.anonymous_refusals_per_second",
                "must be above 0",
            ));
        }
        if let Some(p) = &self.audit.path {
            // Checked without creating anything (`gateway check` leaves no file behind).
            opts.writable_log_path(Path::new(p))
                .map_err(|e| invalid("audit.path", format!("cannot append to `{p}`: {e}")))?;
        }
        let pin_dir = Path::new(&k.bpffs).join(&g.instance);
        let state = self.state.validate(&g.instance)?;
        let config = Config {
            instance: g.instance,
            workers,
            pin_workers: g.pin_workers,
            shutdown_grace: Duration::from_millis(g.shutdown_grace_ms),
            listeners,
            admin: admin.address,
            admin_tls: admin.tls,
            admin_token: admin.token,
            admin_per_address: admin.per_address,
            telemetry,
            kernel: KernelConfig {
                enabled: k.enabled,
                interfaces: k.interfaces,
                mode: k.mode,
                deny,
                pin_dir,
                cap_poll: Duration::from_millis(k.cap_poll_ms),
            },
            tenants,
            default_tenant,
            http,
            upstreams,
            routes,
            auth: self.auth,
            jwks,
            policy: self.policy,
            audit: self.audit,
            auto_ban: self.auto_ban,
            state,
        };
        Ok(config)
    }
}

impl RawGateway {
    /// The number of workers (0 in the file: one per core), once the instance's name is checked.
    fn workers(&self) -> Result<usize, ConfigError> {
        let g = self;
        if g.instance.is_empty()
            || g.instance.len() > 64
            || !g
                .instance
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "gateway.instance",
                "must be 1-64 characters of letters, digits, '-' and '_' (it names a directory)",
            ));
        }
        if g.workers > 1024 {
            return Err(invalid(
                "gateway.workers",
                "at most 1024 (0 means one per core)",
            ));
        }
        Ok(if g.workers == 0 {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        } else {
            g.workers
        })
    }
}

impl RawListener {
    fn validate(
        self,
        i: usize,
        request_timeout: Duration,
        earlier: &[Listener],
    ) -> Result<Listener, ConfigError> {
        let l = self;
        let addr = parse_addr(&format!("listeners[{i}].address"), &l.address)?;
        if addr.port() == 0 {
            return Err(invalid(
                format!("listeners[{i}].address"),
                "port 0 is not allowed: the kernel program must know the port",
            ));
        }
        if earlier.iter().any(|l: &Listener| l.address == addr) {
            return Err(invalid(format!("listeners[{i}].address"), "listed twice"));
        }
        let tls = l
            .tls
            .map(|t| t.validate(&format!("listeners[{i}].tls"), request_timeout))
            .transpose()?;
        let proxy_protocol = match &l.proxy_protocol {
            None => None,
            Some(p) => {
                let key = |field: &str| format!("listeners[{i}].proxy_protocol.{field}");
                if p.trusted.is_empty() {
                    return Err(invalid(
                        key("trusted"),
                        "name the load balancers' source prefixes (every other source is refused)",
                    ));
                }
                let trusted = p
                    .trusted
                    .iter()
                    .enumerate()
                    .map(|(j, n)| parse_net(&key(&format!("trusted[{j}]")), n))
                    .collect::<Result<Vec<_>, _>>()?;
                if !(1..=60_000).contains(&p.header_timeout_ms) {
                    return Err(invalid(
                        key("header_timeout_ms"),
                        "must be between 1 and 60000",
                    ));
                }
                Some(ProxyProtocol {
                    trusted,
                    version: p.version,
                    header_timeout: Duration::from_millis(p.header_timeout_ms),
                })
            }
        };
        Ok(Listener {
            address: addr,
            tls,
            proxy_protocol,
        })
    }
}

/// What `[admin]` gives: its address, TLS, token and cap per client address.
struct AdminSettings {
    address: SocketAddr,
    tls: Option<Tls>,
    token: Option<String>,
    per_address: usize,
}

impl RawAdmin {
    fn validate(
        self,
        opts: LoadOptions,
        listeners: &[Listener],
        request_timeout: Duration,
    ) -> Result<AdminSettings, ConfigError> {
        let admin = parse_addr("admin.address", &self.address)?;
        let admin_per_address = match self.max_connections_per_address {
            0 => usize::MAX,
            n => n,
        };
        let admin_tls = self
            .tls
            .map(|t| t.validate("admin.tls", request_timeout))
            .transpose()?;
        if listeners.iter().any(|l| l.address.port() == admin.port()) {
            return Err(invalid("admin.address", "shares a port with a listener"));
        }
        let admin_token = match &self.token_env {
            None if !admin.ip().is_loopback() => {
                return Err(invalid(
                    "admin.token_env",
                    "the admin listener is not on loopback: it needs a token",
                ));
            }
            None => None,
            Some(var) => match opts.env(var) {
                Ok(t) if t.len() >= 16 => Some(t),
                Ok(_) => {
                    return Err(invalid(
                        "admin.token_env",
                        format!("`{var}` holds fewer than 16 characters"),
                    ));
                }
                Err(_) => {
                    return Err(invalid(
                        "admin.token_env",
                        format!("environment variable `{var}` is not set"),
                    ));
                }
            },
        };
        Ok(AdminSettings {
            address: admin,
            tls: admin_tls,
            token: admin_token,
            per_address: admin_per_address,
        })
    }
}

impl RawTelemetry {
    fn validate(self, opts: LoadOptions) -> Result<TelemetryConfig, ConfigError> {
        if self.max_tools == 0 {
            return Err(invalid("telemetry.max_tools", "must be above 0"));
        }
        if let Some(p) = &self.histogram_log {
            opts.writable_log_path(Path::new(p)).map_err(|e| {
                invalid(
                    "telemetry.histogram_log",
                    format!("cannot write `{p}`: {e}"),
                )
            })?;
        }
        Ok(TelemetryConfig {
            enabled: self.enabled,
            max_tools: self.max_tools,
            histogram_log: self.histogram_log.map(std::path::PathBuf::from),
            otlp: self.otlp.map(RawOtlp::validate).transpose()?,
            access_log: self
                .access_log
                .map(|a| {
                    opts.writable_log_path(Path::new(&a.path)).map_err(|e| {
                        invalid(
                            "telemetry.access_log.path",
                            format!("cannot append to `{}`: {e}", a.path),
                        )
                    })?;
                    if a.fields.is_empty() {
                        return Err(invalid("telemetry.access_log.fields", "names no field"));
                    }
                    if a.anonymous_refusals_per_second == 0 {
                        return Err(invalid(
                            "telemetry.access_log.anonymous_refusals_per_second",
                            "must be above 0",
                        ));
                    }
                    Ok(a)
                })
                .transpose()?,
        })
    }
}

impl RawKernel {
    /// Checks the section; the prefixes whose packets are all dropped.
    fn deny(&self) -> Result<Vec<IpNet>, ConfigError> {
        let k = self;
        if k.enabled && k.interfaces.is_empty() {
            return Err(invalid(
                "kernel.interfaces",
                "name at least one interface to attach to, or set kernel.enabled = false",
            ));
        }
        for (i, name) in k.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(invalid(
                    format!("kernel.interfaces[{i}]"),
                    "not an interface name",
                ));
            }
        }
        if !(1..=10_000).contains(&k.cap_poll_ms) {
            return Err(invalid("kernel.cap_poll_ms", "must be between 1 and 10000"));
        }
        let deny = k
            .deny
            .iter()
            .enumerate()
            .map(|(i, n)| parse_kernel_net(&format!("kernel.deny[{i}]"), n))
            .collect::<Result<Vec<_>, _>>()?;
        if deny.len() > gateway_common::MAX_PREFIXES as usize {
            return Err(invalid("kernel.deny", "too many prefixes"));
        }
        Ok(deny)
    }
}

impl RawTenant {
    /// The tenants in the order of their ids, each source prefix of one tenant only.
    fn validate_all(raw: Vec<RawTenant>) -> Result<Vec<Tenant>, ConfigError> {
        let mut tenants = Vec::new();
        let mut source_owner: BTreeMap<IpNet, String> = BTreeMap::new();
        for (i, t) in raw.into_iter().enumerate() {
            let t = t.validate(i, &tenants, &mut source_owner)?;
            tenants.push(t);
        }
        if source_owner.len() > gateway_common::MAX_PREFIXES as usize {
            return Err(invalid("tenants", "too many source prefixes"));
        }
        tenants.sort_by_key(|t| t.id);
        Ok(tenants)
    }

    fn validate(
        self,
        i: usize,
        earlier: &[Tenant],
        source_owner: &mut BTreeMap<IpNet, String>,
    ) -> Result<Tenant, ConfigError> {
        let t = self;
        let key = |field: &str| format!("tenants[{i}].{field}");
        // Tenant names are joined with others into the names of shared counts (a tool
        // breaker `<upstream>/<tool>@<tenant>`, a fleet rate `agent/<tenant>/<agent>`):
        // a `/` or `@` in one could make two tenants' counts one.
        if t.name.is_empty()
            || t.name.len() > 64
            || !t
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(invalid(
                key("name"),
                "must be 1 to 64 ASCII letters, digits, `_`, `-` or `.`",
            ));
        }
        if t.id >= gateway_common::MAX_TENANTS {
            return Err(invalid(
                key("id"),
                format!("must be below {}", gateway_common::MAX_TENANTS),
            ));
        }
        if let Some(other) = earlier.iter().find(|x| x.name == t.name) {
            return Err(invalid(
                key("name"),
                format!("`{}` is used twice (id {})", t.name, other.id),
            ));
        }
        if earlier.iter().any(|x| x.id == t.id) {
            return Err(invalid(key("id"), format!("id {} is used twice", t.id)));
        }
        let mut sources = Vec::new();
        for (j, s) in t.sources.iter().enumerate() {
            let net = parse_kernel_net(&format!("tenants[{i}].sources[{j}]"), s)?;
            if let Some(owner) = source_owner.insert(net, t.name.clone()) {
                return Err(invalid(
                    format!("tenants[{i}].sources[{j}]"),
                    format!("{net} already belongs to tenant `{owner}`"),
                ));
            }
            sources.push(net);
        }
        for (field, rate, burst) in [
            (
                "new_connections",
                t.new_connections_per_sec,
                t.new_connections_burst,
            ),
            (
                "per_source_new_connections",
                t.per_source_new_connections_per_sec,
                t.per_source_new_connections_burst,
            ),
        ] {
            if rate > 1_000_000_000 {
                return Err(invalid(key(&format!("{field}_per_sec")), "at most 1e9"));
            }
            if rate == 0 && burst != 0 {
                return Err(invalid(
                    key(&format!("{field}_burst")),
                    format!("a burst needs `{field}_per_sec` (0 means unlimited)"),
                ));
            }
        }
        for (field, cap) in [
            ("max_connections", t.max_connections),
            ("max_connections_per_source", t.max_connections_per_source),
        ] {
            if cap == Some(0) {
                return Err(invalid(
                    key(field),
                    "0 would refuse every connection; omit it for no cap",
                ));
            }
        }
        Ok(Tenant {
            name: t.name,
            id: t.id,
            sources,
            new_connections_per_sec: t.new_connections_per_sec,
            // A rate without a burst admits one second's worth at once, as the policy's
            // rates do (one at a time would refuse a client's few parallel connections).
            new_connections_burst: default_burst(
                t.new_connections_per_sec,
                t.new_connections_burst,
            ),
            per_source_new_connections_per_sec: t.per_source_new_connections_per_sec,
            per_source_new_connections_burst: default_burst(
                t.per_source_new_connections_per_sec,
                t.per_source_new_connections_burst,
            ),
            max_connections: t.max_connections,
            max_connections_per_source: t.max_connections_per_source,
            policy: t.policy,
        })
    }
}

impl RawHttp {
    fn validate(self) -> Result<HttpConfig, ConfigError> {
        let h = self;
        if !(1024..=1024 * 1024).contains(&h.max_header_bytes) {
            return Err(invalid(
                "http.max_header_bytes",
                "must be between 1 KiB and 1 MiB",
            ));
        }
        if !(1..=1024 * 1024 * 1024).contains(&h.max_body_bytes) {
            return Err(invalid(
                "http.max_body_bytes",
                "must be between 1 byte and 1 GiB",
            ));
        }
        for (key, ms) in [
            ("http.request_timeout_ms", h.request_timeout_ms),
            ("http.idle_timeout_ms", h.idle_timeout_ms),
        ] {
            if ms == 0 {
                return Err(invalid(key, "must be above 0"));
            }
        }
        let http = HttpConfig {
            max_header_bytes: h.max_header_bytes,
            max_body_bytes: h.max_body_bytes,
            request_timeout: Duration::from_millis(h.request_timeout_ms),
            idle_timeout: Duration::from_millis(h.idle_timeout_ms),
            allowed_origins: h.allowed_origins,
            cors: crate::http::cors::Cors {
                allow_headers: h.cors.allow_headers,
                expose_headers: h.cors.expose_headers,
                max_age: Duration::from_secs(h.cors.max_age_s.unwrap_or(600)),
                allow_credentials: h.cors.allow_credentials,
            },
        };
        for (key, names) in [
            ("http.cors.allow_headers", &http.cors.allow_headers),
            ("http.cors.expose_headers", &http.cors.expose_headers),
        ] {
            if let Some(bad) = names.iter().find(|n| !crate::http::is_token(n.as_bytes())) {
                return Err(invalid(key, format!("`{bad}` is not a header name")));
            }
        }
        if let Some(bad) = http.allowed_origins.iter().find(|o| {
            !crate::http::is_clean_value(o.as_bytes())
                || o.is_empty()
                || o.eq_ignore_ascii_case("null")
        }) {
            return Err(invalid(
                "http.allowed_origins",
                format!("{bad:?} is not an origin (`null` is every sandboxed page's)"),
            ));
        }
        Ok(http)
    }
}

/// The key of an upstream's field in the file, for its errors.
fn upstream_key(i: usize, field: &str) -> String {
    format!("upstreams[{i}].{field}")
}

impl RawUpstream {
    fn validate(
        self,
        i: usize,
        opts: LoadOptions,
        earlier: &[Upstream],
    ) -> Result<Upstream, ConfigError> {
        let u = self;
        let key = |f: &str| upstream_key(i, f);
        if u.name.is_empty() || earlier.iter().any(|x| x.name == u.name) {
            return Err(invalid(
                key("name"),
                format!("`{}` is empty or used twice", u.name),
            ));
        }
        if !u
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(invalid(
                key("name"),
                format!("`{}`: only ASCII letters, digits, `_` and `-`", u.name),
            ));
        }
        let (url_text, stdio) = u.transport(i)?;
        if stdio.is_some() && !u.relay_response_headers.is_empty() {
            return Err(invalid(
                key("relay_response_headers"),
                "is for `url` and `endpoints` upstreams only (a stdio server's answers have no head)",
            ));
        }
        let relay_headers = crate::http::relayed::Relayed::parse(&u.relay_response_headers)
            .map_err(|why| invalid(key("relay_response_headers"), why))?;
        let first_key = if u.endpoints.is_some() {
            "endpoints[0]"
        } else {
            "url"
        };
        let parsed = parse_url(&url_text).map_err(|why| invalid(key(first_key), why))?;
        let https = parsed.https;
        for (f, set) in [
            ("ca_file", u.ca_file.is_some()),
            ("server_name", u.server_name.is_some()),
            ("client_cert", u.client_cert.is_some()),
            ("client_key", u.client_key.is_some()),
        ] {
            if set && !https {
                return Err(invalid(key(f), "is for https:// upstreams only"));
            }
        }
        let sni = u.server_name.as_deref().unwrap_or(&parsed.host);
        let authority = match (&u.server_name, parsed.explicit_port) {
            (None, _) => parsed.authority.clone(),
            (Some(n), explicit) => {
                let n = if n.parse::<std::net::Ipv6Addr>().is_ok() {
                    format!("[{n}]")
                } else {
                    n.clone()
                };
                if explicit {
                    format!("{n}:{}", parsed.port)
                } else {
                    n
                }
            }
        };
        let tls = if https {
            let t = crate::endpoints::tls::build(&crate::endpoints::tls::Settings {
                server_name: sni,
                ca_file: u.ca_file.as_deref(),
                client_cert: u.client_cert.as_deref(),
                client_key: u.client_key.as_deref(),
            })
            .map_err(|(f, why)| invalid(key(f), why))?;
            Some(std::sync::Arc::new(t))
        } else {
            None
        };
        let replicas = u.replicas(i, opts, &parsed, stdio.is_some())?;
        let url_text = match &u.endpoints {
            Some(list) => list.join(" "),
            None => url_text,
        };
        let path = parsed.path;
        let pool_key = pool_key(&u.name, &url_text, &authority, tls.as_deref());
        u.check_limits(i)?;
        let authorization = match &u.bearer_token_env {
            None => None,
            Some(var) => Some(format!(
                "Bearer {}",
                opts.env(var).map_err(|_| invalid(
                    key("bearer_token_env"),
                    format!("environment variable `{var}` is not set")
                ))?
            )),
        };
        Ok(Upstream {
            url: match &stdio {
                Some(spec) => format!("stdio:{}", spec.command.join(" ")),
                None => url_text,
            },
            name: u.name,
            replicas: std::sync::Arc::new(replicas),
            authority,
            tls,
            key: pool_key,
            path,
            connect_timeout: Duration::from_millis(u.connect_timeout_ms),
            response_timeout: Duration::from_millis(u.response_timeout_ms),
            stream_idle_timeout: Duration::from_millis(u.stream_idle_timeout_ms),
            authorization,
            max_idle: u.max_idle_connections_per_worker,
            idle_reuse: Duration::from_millis(u.idle_reuse_ms),
            breaker: u.breaker,
            stdio,
            era: u.era,
            held_session: u.held_session,
            closing_cancels: u.closing_cancels,
            relay_headers,
        })
    }

    /// What serves the upstream: `url`, `endpoints` (replicas of one server) or `command` (a
    /// stdio server): its first URL, and a stdio server's spec.
    fn transport(
        &self,
        i: usize,
    ) -> Result<(String, Option<std::sync::Arc<crate::stdio::StdioSpec>>), ConfigError> {
        let u = self;
        let key = |f: &str| upstream_key(i, f);
        Ok(match (&u.url, &u.endpoints, &u.command) {
            (Some(url), None, None) => {
                if u.stdio.is_some() {
                    return Err(invalid(key("stdio"), "is for `command` upstreams only"));
                }
                (url.clone(), None)
            }
            (None, Some(list), None) => {
                if u.stdio.is_some() {
                    return Err(invalid(key("stdio"), "is for `command` upstreams only"));
                }
                let Some(first) = list.first() else {
                    return Err(invalid(key("endpoints"), "must list at least one URL"));
                };
                if list.len() > 64 {
                    return Err(invalid(key("endpoints"), "at most 64 URLs"));
                }
                (first.clone(), None)
            }
            (None, None, Some(command)) => {
                let spec = stdio_spec(&u.name, command, u.stdio.clone(), u.response_timeout_ms)
                    .map_err(|(f, why)| invalid(key(f), why))?;
                // The HTTP fields below get inert values (an address literal: no lookup).
                (
                    "http://127.0.0.1:9/".to_owned(),
                    Some(std::sync::Arc::new(spec)),
                )
            }
            _ => {
                return Err(invalid(
                    key("url"),
                    "give exactly one of `url` (an HTTP server), `endpoints` (replicas of one) and `command` (a stdio server)",
                ));
            }
        })
    }

    /// The addresses calls go to (every endpoint resolved unless `opts` is offline) and when
    /// one is set aside after failures.
    fn replicas(
        &self,
        i: usize,
        opts: LoadOptions,
        parsed: &Url,
        stdio: bool,
    ) -> Result<crate::endpoints::Replicas, ConfigError> {
        let u = self;
        let key = |f: &str| upstream_key(i, f);
        let first_key = if u.endpoints.is_some() {
            "endpoints[0]"
        } else {
            "url"
        };
        let every = Duration::from_millis(u.resolve_every_ms);
        let resolve = |host: &str, port: u16, f: String| {
            if opts.offline && host.parse::<std::net::IpAddr>().is_err() {
                Ok(crate::endpoints::Addresses::unresolved(host, port, every))
            } else {
                crate::endpoints::Addresses::resolve_now(host, port, every)
                    .map_err(|e| invalid(f, format!("cannot resolve `{host}`: {e}")))
            }
        };
        let mut sources = vec![resolve(&parsed.host, parsed.port, key(first_key))?];
        for (j, other) in u.endpoints.iter().flatten().enumerate().skip(1) {
            let f = key(&format!("endpoints[{j}]"));
            let p = parse_url(other).map_err(|why| invalid(f.clone(), why))?;
            if p.https != parsed.https || p.path != parsed.path {
                return Err(invalid(
                    f,
                    format!("`{other}`: every endpoint has the first one's scheme and path"),
                ));
            }
            if parsed.https && u.server_name.is_none() && p.host != parsed.host {
                return Err(invalid(
                    f,
                    "https endpoints on different hosts need `server_name` (the name their certificates carry)",
                ));
            }
            if u.endpoints.iter().flatten().take(j).any(|x| x == other) {
                return Err(invalid(f, format!("`{other}` is listed twice")));
            }
            sources.push(resolve(&p.host, p.port, f)?);
        }
        let ejection = crate::endpoints::Ejection {
            after_failures: u
                .eject_after_failures
                .unwrap_or(default_eject_after_failures()),
            base: Duration::from_millis(u.eject_base_ms.unwrap_or(default_eject_base_ms())),
            max: Duration::from_millis(u.eject_max_ms.unwrap_or(default_eject_max_ms())),
        };
        if ejection.base.is_zero() || ejection.max < ejection.base {
            return Err(invalid(
                key("eject_base_ms"),
                "must be above 0 and at most `eject_max_ms`",
            ));
        }
        let replicas = crate::endpoints::Replicas::new(sources, ejection);
        let set = [
            ("eject_after_failures", u.eject_after_failures.is_some()),
            ("eject_base_ms", u.eject_base_ms.is_some()),
            ("eject_max_ms", u.eject_max_ms.is_some()),
        ];
        if let Some((f, _)) = set.iter().find(|(_, set)| *set)
            && (stdio || !replicas.pins_sessions())
        {
            let why = if stdio {
                "is for HTTP upstreams (`url`, `endpoints`): a `command` upstream has no endpoints to eject"
            } else {
                "has nothing to eject: the upstream is one address literal (list several `endpoints`, or give a host name)"
            };
            return Err(invalid(key(f), why));
        }
        Ok(replicas)
    }

    /// The breaker's settings and the timeouts.
    fn check_limits(&self, i: usize) -> Result<(), ConfigError> {
        let u = self;
        let key = |f: &str| upstream_key(i, f);
        if let Some(b) = &u.breaker {
            if b.consecutive_failures.is_none() && b.failure_ratio.is_none() {
                return Err(invalid(
                    key("breaker"),
                    "give `consecutive_failures`, `failure_ratio` or both",
                ));
            }
            if b.failure_ratio.is_some_and(|r| !(r > 0.0 && r <= 1.0)) {
                return Err(invalid(key("breaker.failure_ratio"), "must be in (0, 1]"));
            }
            if b.open_ms == 0 || b.window_s == 0 || b.half_open_probes == 0 {
                return Err(invalid(
                    key("breaker"),
                    "`open_ms`, `window_s` and `half_open_probes` must be above 0",
                ));
            }
        }
        for (f, ms) in [
            ("connect_timeout_ms", u.connect_timeout_ms),
            ("response_timeout_ms", u.response_timeout_ms),
            ("stream_idle_timeout_ms", u.stream_idle_timeout_ms),
        ] {
            if ms == 0 {
                return Err(invalid(key(f), "must be above 0"));
            }
        }
        Ok(())
    }
}

/// The index of the upstream named `name`.
fn upstream_named(upstreams: &[Upstream], name: &str, key: String) -> Result<usize, ConfigError> {
    upstreams
        .iter()
        .position(|u| u.name == name)
        .ok_or_else(|| invalid(key, format!("no upstream is named `{name}`")))
}

impl RawRoute {
    fn validate(
        self,
        i: usize,
        earlier: &[Route],
        upstreams: &[Upstream],
        listeners: &[Listener],
        auth: &RawAuth,
    ) -> Result<Route, ConfigError> {
        let r = self;
        if !r.path.starts_with('/') || r.path.contains(['?', '#', ' ']) {
            return Err(invalid(
                format!("routes[{i}].path"),
                "must be an absolute path without query",
            ));
        }
        if earlier.iter().any(|x| x.path == r.path) {
            return Err(invalid(
                format!("routes[{i}].path"),
                format!("`{}` is routed twice", r.path),
            ));
        }
        let target = match (r.upstream, r.federate) {
            (Some(name), None) => Target::Passthrough(upstream_named(
                upstreams,
                &name,
                format!("routes[{i}].upstream"),
            )?),
            (None, Some(members)) => Target::Federation(federation(i, members, upstreams)?),
            _ => {
                return Err(invalid(
                    format!("routes[{i}]"),
                    "give exactly one of `upstream` (passthrough) and `federate`",
                ));
            }
        };
        if r.auth.contains(&AuthMethod::Mtls)
            && !listeners
                .iter()
                .any(|l| l.tls.as_ref().is_some_and(|t| t.client_ca.is_some()))
        {
            return Err(invalid(
                format!("routes[{i}].auth"),
                "`mtls` needs a listener with TLS and `client_ca` (client certificates)",
            ));
        }
        if r.auth.contains(&AuthMethod::ApiKey) && auth.api_keys.is_empty() {
            return Err(invalid(
                format!("routes[{i}].auth"),
                "`api_key` needs at least one [[auth.api_keys]] entry (no key could pass)",
            ));
        }
        if r.auth.contains(&AuthMethod::Jwt) && auth.jwt.is_none() {
            return Err(invalid(
                format!("routes[{i}].auth"),
                "`jwt` needs an [auth.jwt] section",
            ));
        }
        let upstream_query = match &target {
            Target::Passthrough(u) => upstreams[*u].path.contains('?'),
            Target::Federation(members) => members
                .iter()
                .any(|m| upstreams[m.upstream].path.contains('?')),
        };
        Ok(Route {
            path: r.path,
            target,
            auth: r.auth,
            upstream_query,
        })
    }
}

/// A federation's members, each with a prefix no other member's starts with or extends.
fn federation(
    i: usize,
    members: Vec<RawMember>,
    upstreams: &[Upstream],
) -> Result<Vec<Member>, ConfigError> {
    let key = |m: usize, f: &str| format!("routes[{i}].federate[{m}].{f}");
    if members.is_empty() {
        return Err(invalid(
            format!("routes[{i}].federate"),
            "lists no upstream",
        ));
    }
    let mut out: Vec<Member> = Vec::new();
    for (m, raw) in members.into_iter().enumerate() {
        let upstream = upstream_named(upstreams, &raw.upstream, key(m, "upstream"))?;
        if out.iter().any(|x| x.upstream == upstream) {
            return Err(invalid(
                key(m, "upstream"),
                format!("`{}` is listed twice", raw.upstream),
            ));
        }
        let prefix = raw.prefix.unwrap_or_else(|| format!("{}_", raw.upstream));
        if !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b))
        {
            return Err(invalid(
                key(m, "prefix"),
                format!("`{prefix}`: only ASCII letters, digits and _-./ may appear in tool names"),
            ));
        }
        if let Some(other) = out.iter().find(|x| {
            (x.prefix.is_empty() && prefix.is_empty())
                || (!x.prefix.is_empty()
                    && !prefix.is_empty()
                    && (x.prefix.starts_with(&prefix) || prefix.starts_with(&x.prefix)))
        }) {
            return Err(invalid(
                key(m, "prefix"),
                format!(
                    "`{prefix}` is ambiguous beside `{}` of `{}`",
                    other.prefix, upstreams[other.upstream].name
                ),
            ));
        }
        out.push(Member { upstream, prefix });
    }
    Ok(out)
}
