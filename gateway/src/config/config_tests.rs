use super::*;

const MINIMAL: &str = r#"
[gateway]
instance = "t"
[[listeners]]
address = "127.0.0.1:18080"
[admin]
address = "127.0.0.1:19090"
[kernel]
enabled = false
"#;

fn err(text: &str) -> String {
    Config::from_toml(text)
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn embedded_default_is_valid() {
    let c = Config::embedded_default();
    assert_eq!(c.instance, "mcp-gateway");
    assert_eq!(c.ports().into_iter().collect::<Vec<_>>(), vec![8080]);
    assert_eq!(c.default_tenant, 0);
    assert_eq!(c.tenant(2).map(|t| t.name.as_str()), Some("demo"));
    assert!(c.workers >= 1);
    assert_eq!(c.routes[0].path, "/mcp");
    assert_eq!(
        c.upstreams[match c.routes[0].target {
            Target::Passthrough(u) => u,
            _ => panic!("the default route is a passthrough"),
        }]
        .url,
        "http://127.0.0.1:9100/mcp"
    );
}

#[test]
fn minimal_config_has_no_tenants() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert!(c.tenants.is_empty());
    assert!(!c.kernel.enabled);
}

#[test]
fn unknown_key_is_named() {
    let e = err(&format!(
        "{MINIMAL}\n[[tenants]]\nname='a'\nid=0\nmax_conections=3\n"
    ));
    assert!(e.contains("max_conections"), "{e}");
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        (
            "tenants[0].sources[0]",
            "[[tenants]]\nname='a'\nid=0\nsources=['10.0.0.1/8']\n",
        ),
        ("tenants[0].id", "[[tenants]]\nname='a'\nid=5000\n"),
        (
            "auto_ban.ipv6_widen_at",
            "[auto_ban]\nmax_refusals=3\nwindow_s=60\nban_s=60\nipv6_widen_at=1\n",
        ),
        // Joined into the names of shared counts: `team@corp` with tool `t` would be
        // `corp`'s tool `t@team`; `a/b` with agent `c` would be `a`'s agent `b/c`.
        ("tenants[0].name", "[[tenants]]\nname='team@corp'\nid=1\n"),
        ("tenants[0].name", "[[tenants]]\nname='a/b'\nid=1\n"),
        ("tenants[0].name", "[[tenants]]\nname='a b'\nid=1\n"),
        (
            "tenants[1].id",
            "[[tenants]]\nname='a'\nid=1\n[[tenants]]\nname='b'\nid=1\n",
        ),
        (
            "tenants[1].sources[0]",
            "[[tenants]]\nname='a'\nid=1\nsources=['10.0.0.0/8']\n[[tenants]]\nname='b'\nid=2\nsources=['10.0.0.0/8']\n",
        ),
        (
            "tenants[0].new_connections_burst",
            "[[tenants]]\nname='a'\nid=0\nnew_connections_burst=5\n",
        ),
        (
            "tenants[0].max_connections",
            "[[tenants]]\nname='a'\nid=0\nmax_connections=0\n",
        ),
    ];
    for (key, extra) in cases {
        let e = err(&format!("{MINIMAL}{extra}"));
        assert!(e.contains(key), "expected `{key}` in: {e}");
    }
}

#[test]
fn tenants_need_a_default_and_it_must_exist() {
    let with_tenant = format!("{MINIMAL}[[tenants]]\nname='a'\nid=3\n");
    assert!(err(&with_tenant).contains("kernel.default_tenant"));
    let named = with_tenant.replace("enabled = false", "enabled = false\ndefault_tenant = 'zz'");
    assert!(err(&named).contains("no tenant is named `zz`"));
    let ok = with_tenant.replace("enabled = false", "enabled = false\ndefault_tenant = 'a'");
    assert_eq!(Config::from_toml(&ok).unwrap().default_tenant, 3);
}

#[test]
fn listener_rules() {
    assert!(err(&MINIMAL.replace("18080", "0")).contains("listeners[0].address"));
    assert!(err(&MINIMAL.replace("19090", "18080")).contains("admin.address"));
    assert!(err(&MINIMAL.replace("127.0.0.1:18080", "nowhere")).contains("listeners[0].address"));
}

#[test]
fn kernel_needs_an_interface() {
    let e = err(&MINIMAL.replace("enabled = false", "enabled = true"));
    assert!(e.contains("kernel.interfaces"), "{e}");
}

#[test]
fn bare_addresses_are_host_prefixes() {
    let c = Config::from_toml(&MINIMAL.replace(
        "enabled = false",
        "enabled = false\ndeny = ['192.0.2.7', '2001:db8::/32']",
    ))
    .unwrap();
    assert_eq!(c.kernel.deny[0].to_string(), "192.0.2.7/32");
    assert_eq!(c.kernel.deny[1].to_string(), "2001:db8::/32");
}

#[test]
fn upstreams_and_routes() {
    let base = format!(
        "{MINIMAL}[[upstreams]]\nname='u'\nurl='http://127.0.0.1:9100/mcp'\n[[routes]]\npath='/mcp'\nupstream='u'\n"
    );
    let c = Config::from_toml(&base).unwrap();
    assert_eq!(c.upstreams[0].path, "/mcp");
    assert_eq!(c.upstreams[0].authority, "127.0.0.1:9100");
    assert_eq!(c.routes[0].target, Target::Passthrough(0));
    assert!(err(&base.replace("upstream='u'", "upstream='v'")).contains("routes[0].upstream"));
    assert!(err(&base.replace("http://127", "ftp://127")).contains("upstreams[0].url"));
    assert!(err(&base.replace("http://127.0.0.1:9100", "http://127.0.0.1:0")).contains("port"));
    // A query of its own marks the route (its requests take none); what a request line
    // cannot carry is refused.
    assert!(!c.routes[0].upstream_query);
    let q = Config::from_toml(&base.replacen("/mcp'", "/mcp?key=k'", 1)).unwrap();
    assert_eq!(q.upstreams[0].path, "/mcp?key=k");
    assert!(q.routes[0].upstream_query);
    for bad in ["/mcp#top'", "/m cp'", "/mcp\t'"] {
        assert!(
            err(&base.replacen("/mcp'", bad, 1)).contains("upstreams[0].url"),
            "{bad}"
        );
    }
    // https: TLS settings only there, each file read and checked at load.
    let tls = |extra: &str| {
        base.replace("http://127", "https://127")
            .replace("url=", &format!("{extra}\nurl="))
    };
    assert!(err(&base.replace("url=", "ca_file='/x'\nurl=")).contains("upstreams[0].ca_file"));
    assert!(err(&tls("ca_file='/surely/missing.pem'")).contains("upstreams[0].ca_file"));
    assert!(err(&tls("client_cert='/surely/missing.pem'")).contains("client_key"));
    let c = Config::from_toml(&tls("server_name='mcp.internal'")).unwrap();
    assert_eq!(c.upstreams[0].authority, "mcp.internal:9100");
    let c = Config::from_toml(&tls("").replace(":9100", "")).unwrap();
    assert_eq!(c.upstreams[0].replicas.first().port(), 443);
    assert!(c.upstreams[0].tls.is_some());
    assert!(err(&base.replace("path='/mcp'", "path='mcp'")).contains("routes[0].path"));
    let env = base.replace("url=", "bearer_token_env='GW_TEST_SURELY_UNSET'\nurl=");
    assert!(err(&env).contains("GW_TEST_SURELY_UNSET"));
}

#[test]
fn replica_endpoints() {
    let with = |endpoints: &str, extra: &str| {
        format!(
            "{MINIMAL}[[upstreams]]\nname='u'\nendpoints=[{endpoints}]\n{extra}\n[[routes]]\npath='/mcp'\nupstream='u'\n"
        )
    };
    let two = "'http://127.0.0.1:9001/mcp','http://127.0.0.1:9002/mcp'";
    let c = Config::from_toml(&with(two, "")).unwrap();
    let up = &c.upstreams[0];
    let addrs: Vec<_> = up
        .replicas
        .endpoints()
        .iter()
        .map(|e| e.addr.port())
        .collect();
    assert_eq!(addrs, [9001, 9002]);
    assert_eq!(up.authority, "127.0.0.1:9001", "Host: the first one's");
    assert!(up.replicas.pins_sessions());
    assert_eq!(up.replicas.ejection.after_failures, 5);
    assert!(err(&with("", "")).contains("upstreams[0].endpoints"));
    let both = with(two, "url='http://127.0.0.1:9001/mcp'");
    assert!(err(&both).contains("exactly one of"));
    assert!(err(&with("'ftp://127.0.0.1:9001/mcp'", "")).contains("upstreams[0].endpoints[0]"));
    let other_path = "'http://127.0.0.1:9001/mcp','http://127.0.0.1:9002/other'";
    assert!(err(&with(other_path, "")).contains("endpoints[1]"));
    let twice = "'http://127.0.0.1:9001/mcp','http://127.0.0.1:9001/mcp'";
    assert!(err(&with(twice, "")).contains("listed twice"));
    let many = (0..65)
        .map(|i| format!("'http://127.0.0.1:{}/mcp'", 9000 + i))
        .collect::<Vec<_>>()
        .join(",");
    assert!(err(&with(&many, "")).contains("at most 64"));
    let tls_hosts = "'https://127.0.0.1:9001/mcp','https://127.0.0.2:9002/mcp'";
    assert!(err(&with(tls_hosts, "")).contains("server_name"));
    assert!(err(&with(two, "eject_base_ms=0")).contains("eject_base_ms"));
    assert!(err(&with(two, "eject_base_ms=5000\neject_max_ms=1000")).contains("eject_base_ms"));
    // One address literal: nothing to balance, no session to pin, nothing to eject.
    let one = Config::from_toml(&with("'http://127.0.0.1:9001/mcp'", "")).unwrap();
    assert!(!one.upstreams[0].replicas.pins_sessions());
    for setting in [
        "eject_after_failures=2",
        "eject_base_ms=100",
        "eject_max_ms=100000",
    ] {
        let e = err(&with("'http://127.0.0.1:9001/mcp'", setting));
        assert!(e.contains("nothing to eject"), "{setting}: {e}");
    }
    let stdio = format!(
        "{MINIMAL}[[upstreams]]\nname='s'\ncommand=['srv']\neject_after_failures=2\n[[routes]]\npath='/mcp'\nupstream='s'\n"
    );
    assert!(
        err(&stdio).contains("upstreams[0].eject_after_failures"),
        "{}",
        err(&stdio)
    );
    assert!(Config::from_toml(&with(two, "eject_after_failures=2")).is_ok());
}

#[test]
fn federated_routes() {
    let ups = "[[upstreams]]\nname='a'\nurl='http://127.0.0.1:9100/mcp'\n[[upstreams]]\nname='b'\nurl='http://127.0.0.1:9101/mcp'\n";
    let route =
        |members: &str| format!("{MINIMAL}{ups}[[routes]]\npath='/all'\nfederate=[{members}]\n");
    let c = Config::from_toml(&route("{upstream='a'},{upstream='b',prefix=''}")).unwrap();
    assert_eq!(
        c.routes[0].target,
        Target::Federation(vec![
            Member {
                upstream: 0,
                prefix: "a_".into()
            },
            Member {
                upstream: 1,
                prefix: String::new()
            },
        ])
    );
    for (members, key) in [
        ("", "routes[0].federate"),
        ("{upstream='c'}", "routes[0].federate[0].upstream"),
        (
            "{upstream='a'},{upstream='a'}",
            "routes[0].federate[1].upstream",
        ),
        (
            "{upstream='a',prefix='x'},{upstream='b',prefix='xy'}",
            "routes[0].federate[1].prefix",
        ),
        (
            "{upstream='a',prefix=''},{upstream='b',prefix=''}",
            "routes[0].federate[1].prefix",
        ),
        (
            "{upstream='a',prefix='a b'}",
            "routes[0].federate[0].prefix",
        ),
    ] {
        assert!(
            err(&route(members)).contains(key),
            "{members}: {}",
            err(&route(members))
        );
    }
    let both = format!(
        "{MINIMAL}{ups}[[routes]]\npath='/all'\nupstream='a'\nfederate=[{{upstream='b'}}]\n"
    );
    assert!(err(&both).contains("exactly one of"));
    let bad_name = format!("{MINIMAL}[[upstreams]]\nname='a b'\nurl='http://127.0.0.1:9100/mcp'\n");
    assert!(err(&bad_name).contains("upstreams[0].name"));
}

#[test]
fn the_json_schema_in_docs_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.schema.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == json_schema(),
        "{} is out of date: run `cargo run -p gateway -- config-schema > docs/config.schema.json`",
        path.display()
    );
    assert!(committed.contains("\"tenants\"") && committed.contains("\"upstreams\""));
}

#[test]
fn proxy_protocol_listeners() {
    let base = r#"
[gateway]
instance = "t"
[admin]
address = "127.0.0.1:19090"
[kernel]
enabled = false
[[listeners]]
address = "127.0.0.1:18080"
"#;
    let c = Config::from_toml(&format!(
        "{base}[listeners.proxy_protocol]\ntrusted = ['10.0.0.0/8', '127.0.0.1', '2001:db8::/32']\n"
    ))
    .unwrap();
    let pp = c.listeners[0].proxy_protocol.as_ref().unwrap();
    assert_eq!(pp.version, ProxyVersion::Any);
    assert_eq!(pp.header_timeout, Duration::from_secs(3));
    assert_eq!(
        pp.trusted,
        ["10.0.0.0/8", "127.0.0.1/32", "2001:db8::/32"].map(|n| n.parse::<IpNet>().unwrap())
    );
    let c = Config::from_toml(&format!(
        "{base}[listeners.proxy_protocol]\ntrusted = ['10.0.0.0/8']\nversion = 'v2'\nheader_timeout_ms = 500\n"
    ))
    .unwrap();
    let pp = c.listeners[0].proxy_protocol.as_ref().unwrap();
    assert_eq!(
        (pp.version, pp.header_timeout),
        (ProxyVersion::V2, Duration::from_millis(500))
    );
    assert!(
        Config::from_toml(base).unwrap().listeners[0]
            .proxy_protocol
            .is_none()
    );
    for (text, key) in [
        ("trusted = []", "listeners[0].proxy_protocol.trusted"),
        (
            "trusted = ['10.0.0.1/8']",
            "listeners[0].proxy_protocol.trusted[0]",
        ),
        (
            "trusted = ['10.0.0.0/8']\nheader_timeout_ms = 0",
            "listeners[0].proxy_protocol.header_timeout_ms",
        ),
    ] {
        let e = err(&format!("{base}[listeners.proxy_protocol]\n{text}\n"));
        assert!(e.contains(key), "{e}");
    }
    let e = err(&format!(
        "{base}[listeners.proxy_protocol]\ntrusted = ['10.0.0.0/8']\nversion = 'v3'\n"
    ));
    assert!(e.contains("v3"), "{e}");
}

#[test]
fn a_fleet_needs_a_redis_address_and_sane_settings() {
    let ok = Config::from_toml(&format!(
        "{MINIMAL}[state]\nredis = 'redis://127.0.0.1:6379/0'\nfleet = 'edge'\n"
    ))
    .unwrap();
    let f = ok.state.fleet.expect("a fleet");
    assert_eq!(
        (f.name.as_str(), f.round.as_millis(), f.fail_open),
        ("edge", 25, false)
    );
    let tls = Config::from_toml(&format!(
        "{MINIMAL}[state]\nredis = 'rediss://127.0.0.1:6380/0'\nredis_ca_file = '/etc/hostname'\n"
    ))
    .unwrap();
    let f = tls.state.fleet.expect("a fleet over TLS");
    assert_eq!(
        f.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/hostname"))
    );
    for (key, extra) in [
        ("state.redis", "redis = 'http://127.0.0.1/'"),
        ("state.redis", "redis = 'rediss://127.0.0.1/#insecure'"),
        (
            "state.redis_ca_file",
            "redis = 'redis://127.0.0.1/'\nredis_ca_file = '/etc/hostname'",
        ),
        (
            "state.redis_ca_file",
            "redis = 'rediss://127.0.0.1/'\nredis_ca_file = '/nonexistent/ca.pem'",
        ),
        (
            "state.redis_client_cert_file",
            "redis = 'rediss://127.0.0.1/'\nredis_client_cert_file = '/etc/hostname'",
        ),
        (
            "state.fleet_secret_env",
            "redis = 'redis://127.0.0.1/'\nfleet_secret_env = 'MCP_GATEWAY_TEST_UNSET_SECRET'",
        ),
        ("state.fleet", "redis = 'redis://127.0.0.1/'\nfleet = 'a b'"),
        (
            "state.fleet_round_ms",
            "redis = 'redis://127.0.0.1/'\nfleet_round_ms = 0",
        ),
        ("state.fleet", "fleet_fail_open = true"),
    ] {
        let e = err(&format!("{MINIMAL}[state]\n{extra}\n"));
        assert!(e.contains(key), "expected `{key}` in: {e}");
    }
}

#[test]
fn stdio_children_per_caller_are_bounded() {
    let base = format!(
        "{MINIMAL}[[upstreams]]\nname='s'\ncommand=['srv']\n[upstreams.stdio]\nchildren='caller'\nmax_children=3\n[[routes]]\npath='/mcp'\nupstream='s'\n"
    );
    let c = Config::from_toml(&base).unwrap();
    let spec = c.upstreams[0].stdio.as_ref().unwrap();
    assert_eq!(spec.per_caller, Some(3));
    assert!(err(&base.replace("max_children=3", "max_children=0")).contains("max_children"));
    let shared =
        Config::from_toml(&base.replace("children='caller'", "children='shared'")).unwrap();
    assert_eq!(shared.upstreams[0].stdio.as_ref().unwrap().per_caller, None);
    assert!(err(&base.replace("'caller'", "'session'")).contains("children"));
}

#[test]
fn a_stdio_child_may_not_be_given_the_cgroups_to_write() {
    let with = |paths: &str| {
        format!(
            "{MINIMAL}[[upstreams]]\nname='s'\ncommand=['srv']\n[upstreams.stdio]\nwrite_paths={paths}\n[[routes]]\npath='/mcp'\nupstream='s'\n"
        )
    };
    // Where its own cgroup, its limit and the gateway's cgroup are: above, at or inside.
    for paths in [
        "['/']",
        "['/sys']",
        "['/var/tmp', '/sys/fs']",
        "['/sys/fs/cgroup']",
        "['/sys/fs/cgroup/pids/x']",
        "['/sys/fs/cgroup/../cgroup']",
    ] {
        let e = err(&with(paths));
        assert!(
            e.contains("write_paths") && e.contains("cgroup"),
            "{paths}: {e}"
        );
    }
    Config::from_toml(&with("['/var/tmp', '/srv/data']")).unwrap();
}

#[test]
fn an_ipv4_mapped_prefix_is_refused_with_its_ipv4_form() {
    let e = err(&format!(
        "{MINIMAL}\n[[tenants]]\nname='a'\nid=1\nsources=['::ffff:198.18.0.0/112']\n"
    ));
    assert!(
        e.contains("tenants[0].sources") || e.contains("sources"),
        "{e}"
    );
    assert!(e.contains("write `198.18.0.0/16`"), "{e}");
    // Plain IPv6 and IPv4 prefixes stay.
    Config::from_toml(&format!(
        "{MINIMAL}default_tenant='a'\n[[tenants]]\nname='a'\nid=1\nsources=['2001:db8::/32', '198.18.0.0/16', '2000::/3', '0.0.0.0/0']\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The kernel's maps key IPv4 in its IPv4-mapped form, so `::/0` there is every IPv4 address
/// too, while the workers compare IPv4 clients with IPv4 prefixes only. An attacker's review
/// found a tenant with `::/0` took every IPv4 client's SYNs in the kernel (and its rate limit)
/// while user space put them in another tenant.
#[test]
fn an_ipv6_prefix_that_holds_every_ipv4_address_is_refused_where_the_kernel_takes_it() {
    for (where_, prefix) in [
        ("sources", "::/0"),
        ("sources", "::/64"),
        ("sources", "::fffe:0:0/95"),
        ("deny", "::/1"),
    ] {
        let text = if where_ == "sources" {
            format!("{MINIMAL}\n[[tenants]]\nname='a'\nid=1\nsources=['{prefix}']\n")
        } else {
            MINIMAL.replace("[kernel]\n", &format!("[kernel]\ndeny = ['{prefix}']\n"))
        };
        let e = err(&text);
        assert!(
            e.contains("::ffff:0:0/96") && e.contains(where_),
            "{prefix}: {e}"
        );
    }
    // Prefixes beside it are taken.
    Config::from_toml(&format!(
        "{MINIMAL}default_tenant='a'\n[[tenants]]\nname='a'\nid=1\nsources=['::1/128', '64:ff9b::/96', '::2:0:0/96']\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
}

/// A URL's password never shows in a configuration error, which goes to the log and to the
/// answer of `POST /reload`.
#[test]
fn a_password_in_a_url_is_masked_in_errors() {
    assert_eq!(
        super::redact_userinfo("redis = \"redis://:s3cret@10.0.0.5:6379/0\" oops"),
        "redis = \"redis://:***@10.0.0.5:6379/0\" oops"
    );
    assert_eq!(
        super::redact_userinfo("rediss://gw:s3cret@r:6380 and https://h/x?a=b@c"),
        "rediss://gw:***@r:6380 and https://***@c"
    );
    for password in ["se,cret", "se'cret", "se/cr@et", "se]cret"] {
        let masked = super::redact_userinfo(&format!("redis = \"redis://:{password}@h:6379\""));
        assert_eq!(masked, "redis = \"redis://:***@h:6379\"", "{password}");
    }
    assert_eq!(super::redact_userinfo("redis://s3cret@r"), "redis://***@r");
    assert_eq!(super::redact_userinfo("no url here"), "no url here");
    let text =
        "[gateway]\ninstance = \"x\"\n[state]\nredis = \"redis://:s3cret@10.0.0.5:6379/0\" junk\n";
    let e = Config::from_toml(text).expect_err("a syntax error");
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(!msg.contains("s3cret"), "{msg}");
    assert!(msg.contains("redis://:***@10.0.0.5"), "{msg}");
}

/// `relay_response_headers` names headers: one the gateway never relays, a malformed entry, or
/// any on a stdio upstream is refused with its key; names and prefixes are taken.
#[test]
fn relayed_response_headers_are_names_the_gateway_may_relay() {
    let upstream = |extra: &str| {
        format!(
            "{MINIMAL}\n[[upstreams]]\nname='u'\nurl='http://127.0.0.1:9/mcp'\n{extra}\n[[routes]]\npath='/mcp'\nupstream='u'\n"
        )
    };
    let c = Config::from_toml(&upstream(
        "relay_response_headers = ['X-Request-Id', 'x-ratelimit-*']",
    ))
    .unwrap();
    assert!(crate::http::relayed::relayed(
        "x-ratelimit-limit",
        &c.upstreams[0].relay_headers
    ));
    assert!(crate::http::relayed::relayed(
        "x-request-id",
        &c.upstreams[0].relay_headers
    ));
    for bad in [
        "'set-cookie'",
        "'Access-Control-Allow-Origin'",
        "'content-length'",
        "'x y'",
        "'a*b*'",
    ] {
        let e = err(&upstream(&format!("relay_response_headers = [{bad}]")));
        assert!(
            e.contains("upstreams[0].relay_response_headers"),
            "{bad}: {e}"
        );
    }
    let e = err(&format!(
        "{MINIMAL}\n[[upstreams]]\nname='u'\ncommand=['/bin/true']\nrelay_response_headers=['x-a']\n[[routes]]\npath='/mcp'\nupstream='u'\n"
    ));
    assert!(e.contains("upstreams[0].relay_response_headers"), "{e}");
}
