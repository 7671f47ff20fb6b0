//! Configuration that helps (issue 15): the shipped examples start and serve, the embedded
//! default's governed route shows the policy at work, `gateway check` reports problems once and
//! works without secrets or network, and `gateway kernel` finds an instance by name or file,
//! names tenants, and bans prefixes in the kernel.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use gateway_common::Verdict;
use integration_tests::{
    TestKernel, XDP_DROP, XDP_PASS,
    daemon::{Daemon, connect_from, gateway_bin, state_dir},
    frames::{self, Flags},
    netns::{GW_ADDR, Topology, in_netns},
    peers::{demo_upstream, free_port, post, raw},
    pki::{KeyKind, Pki},
    unique,
};
use serde_json::{Value, json};

fn example(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/{name}.toml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` with each `(from, to)` replaced; each `from` must be there (an example that drifts
/// from what this test rewrites fails here, not later).
fn rewrite(text: &str, pairs: &[(&str, String)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in pairs {
        assert!(out.contains(from), "`{from}` not in the configuration");
        out = out.replace(from, to);
    }
    out
}

fn sha256_hex(s: &str) -> String {
    gateway::policy::sha256_hex(s)
}

fn gateway(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(gateway_bin())
        .args(args)
        .output()
        .expect("run gateway");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn the_single_host_tls_example_serves_a_client_with_its_key() {
    let instance = unique("gwexample");
    let (port, admin, up) = (free_port(), free_port(), free_port());
    let _upstream = demo_upstream(up);
    let pki = Pki::new("example");
    let cert = pki.server("gateway", &["127.0.0.1"], KeyKind::EcdsaP256);
    let key = "example-test-key-0123456789";
    let audit = std::env::temp_dir().join(format!("{instance}.audit.jsonl"));
    let upstream_url = format!("http://127.0.0.1:{up}/mcp");
    // Only addresses, files and the key's digest change; the policy is the example's own.
    let config = rewrite(
        &example("single-host-tls"),
        &[
            (
                "instance = \"mcp-gateway\"",
                format!("instance = \"{instance}\""),
            ),
            ("0.0.0.0:443", format!("127.0.0.1:{port}")),
            ("127.0.0.1:9181", format!("127.0.0.1:{admin}")),
            (
                "/etc/mcp-gateway/tls/gateway.pem",
                cert.cert.display().to_string(),
            ),
            (
                "/etc/mcp-gateway/tls/gateway.key",
                cert.key.display().to_string(),
            ),
            ("[kernel]\n", "[kernel]\nenabled = false\n".into()),
            ("http://10.0.1.20:9100/mcp", upstream_url.clone()),
            ("https://api.githubcopilot.com/mcp/", upstream_url),
            (
                "4f3c2b8e1a1f0b9e5d4c3b2a19f8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7c",
                sha256_hex(key),
            ),
            (
                "/var/log/mcp-gateway/audit.jsonl",
                audit.display().to_string(),
            ),
            (
                "/var/lib/mcp-gateway/mcp-gateway",
                state_dir(&instance).display().to_string(),
            ),
        ],
    );
    let mut daemon =
        Daemon::start_local_with_env(&instance, &config, &[("GITHUB_MCP_TOKEN", "t0ken")]);
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"curl","version":"1"}}}"#;
    let url = format!("https://127.0.0.1:{port}/mcp/github");
    let ca = pki.dir().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let common = [
        "--cacert",
        ca,
        "-H",
        "content-type: application/json",
        "-H",
        "accept: application/json, text/event-stream",
        "--data",
        init,
    ];
    let (status, body) = curl(&[&common[..], &[url.as_str()]].concat());
    assert_eq!(status, 401, "no key: {body}\n{}", daemon.log());
    let bearer = format!("authorization: Bearer {key}");
    let (status, body) = curl(&[&common[..], &["-H", &bearer, url.as_str()]].concat());
    assert_eq!(status, 200, "{body}\n{}", daemon.log());
    assert!(body.contains("serverInfo"), "{body}");
    daemon.stop();
    let _ = std::fs::remove_file(&audit);
}

/// A 2026-07-28 (stateless) `tools/call` on `path` of `port`.
fn call(port: u16, path: &str, key: Option<&str>, tool: &str, args: &Value) -> (u16, Value) {
    let body = json!({
        "jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": tool, "arguments": args, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}},
    })
    .to_string();
    let headers = format!(
        "{}mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: {tool}\r\n",
        key.map(|k| format!("authorization: Bearer {k}\r\n"))
            .unwrap_or_default()
    );
    let (r, _) = raw(port, &post(path, &body, &headers));
    let json = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, json)
}

#[test]
fn the_default_configuration_governs_its_second_route() {
    let instance = unique("gwdefault");
    let (port, admin, up) = (free_port(), free_port(), free_port());
    let _upstream = demo_upstream(up);
    let (ok, default, err) = gateway(&["default-config"]);
    assert!(ok, "{err}");
    let config = rewrite(
        &default,
        &[
            (
                "instance = \"mcp-gateway\"",
                format!("instance = \"{instance}\""),
            ),
            ("127.0.0.1:8080", format!("127.0.0.1:{port}")),
            ("127.0.0.1:9181", format!("127.0.0.1:{admin}")),
            ("127.0.0.1:9100", format!("127.0.0.1:{up}")),
            ("enabled = true", "enabled = false".into()),
        ],
    );
    let mut daemon = Daemon::start_local(&instance, &config);
    let key = gateway::config::DEMO_API_KEY;
    assert!(
        daemon.log().contains(key),
        "the demo key is printed at start: {}",
        daemon.log()
    );
    let echo = json!({"text": "hi"});
    // The open route: anyone on loopback, every tool.
    let (status, body) = call(port, "/mcp", None, "word_count", &json!({"text": "a b"}));
    assert_eq!(status, 200, "{body}");
    assert!(body.get("result").is_some(), "{body}");
    // The governed route: a key, no word_count, a budget.
    let (status, _) = call(port, "/mcp/governed", None, "echo", &echo);
    assert_eq!(status, 401, "no key");
    let (status, body) = call(
        port,
        "/mcp/governed",
        Some(key),
        "word_count",
        &json!({"text": "a b"}),
    );
    assert!(
        body.get("error").is_some(),
        "word_count is denied: {status} {body}"
    );
    // 20 calls a minute: one window holds at most 20 (a minute may turn during the loop,
    // which gives at most 20 more).
    let mut served = 0;
    let refused = loop {
        let (status, body) = call(port, "/mcp/governed", Some(key), "echo", &echo);
        if body.get("error").is_some() || status != 200 {
            break body;
        }
        served += 1;
        assert!(served <= 40, "no budget: {served} calls served");
    };
    assert!(served >= 19, "{served} served before {refused}");
    assert!(
        refused.to_string().to_lowercase().contains("budget"),
        "{refused}"
    );
    daemon.stop();
}

#[test]
fn check_works_without_secrets_or_network_and_says_each_error_once() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let path = path.to_str().unwrap();
        let (ok, out, err) = gateway(&["check", "--no-env", "--offline", "--no-host", path]);
        assert!(ok, "{path}: {out}{err}");
        assert!(out.contains("valid"), "{out}");
        n += 1;
    }
    assert!(n >= 4, "{n} examples");

    let (ok, _, err) = gateway(&["check", "/nonexistent/gateway.toml"]);
    assert!(!ok);
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause once: {err}"
    );
    assert_eq!(
        err.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{err}"
    );

    // What only the host can say: a missing interface and a missing log directory.
    let file = std::env::temp_dir().join(format!("{}.toml", unique("gwcheck")));
    let write = |text: &str| std::fs::write(&file, text).unwrap();
    let base = "[gateway]\ninstance = \"c\"\n[[listeners]]\naddress = \"127.0.0.1:18080\"\n[admin]\naddress = \"127.0.0.1:19090\"\n";
    write(&format!("{base}[kernel]\ninterfaces = [\"nosuch0\"]\n"));
    let (ok, _, err) = gateway(&["check", file.to_str().unwrap()]);
    assert!(
        !ok && err.contains("kernel.interfaces[0]") && err.contains("nosuch0"),
        "{err}"
    );
    write(&format!(
        "{base}[kernel]\nenabled = false\n[audit]\npath = \"/nonexistent-gw-logs/audit.jsonl\"\n"
    ));
    let (ok, _, err) = gateway(&["check", file.to_str().unwrap()]);
    assert!(
        !ok && err.contains("audit.path") && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        !std::path::Path::new("/nonexistent-gw-logs").exists(),
        "check creates nothing"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn version_names_the_commit() {
    let (ok, out, _) = gateway(&["--version"]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        format!(
            "gateway {} (commit {})",
            env!("CARGO_PKG_VERSION"),
            gateway::standard_metrics::COMMIT
        )
    );
}

#[test]
fn a_banned_prefix_drops_its_sources_until_it_expires_or_is_lifted() {
    let mut k = TestKernel::load(&gateway::kernel::KernelState {
        ports: [8080].into(),
        ..Default::default()
    });
    let mut maps = k.maps();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    maps.ban_net("198.51.100.0/24".parse().unwrap(), Duration::from_secs(60))
        .unwrap();
    maps.ban_net(
        "2001:db8:b::/48".parse().unwrap(),
        Duration::from_millis(200),
    )
    .unwrap();
    for src in ["198.51.100.1", "198.51.100.254", "2001:db8:b::7"] {
        assert_eq!(
            k.run(&frames::tcp(ip(src), 8080, Flags::Ack)),
            XDP_DROP,
            "{src}"
        );
    }
    for src in ["198.51.101.1", "2001:db8:c::7"] {
        assert_eq!(
            k.run(&frames::tcp(ip(src), 8080, Flags::Syn)),
            XDP_PASS,
            "{src}"
        );
    }
    let listed = maps.net_bans().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(
        k.run(&frames::tcp(ip("2001:db8:b::7"), 8080, Flags::Syn)),
        XDP_PASS,
        "an expired prefix ban lifts"
    );
    assert_eq!(maps.sweep_bans().unwrap(), 1, "the expired prefix is swept");
    assert!(maps.unban_net("198.51.100.0/24".parse().unwrap()).unwrap());
    assert_eq!(
        k.run(&frames::tcp(ip("198.51.100.1"), 8080, Flags::Ack)),
        XDP_PASS
    );
    assert_eq!(maps.tenant_counters(0).unwrap().packets(Verdict::Banned), 3);
}

const PORT: u16 = 18080;
const NEAR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const FAR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 66);

#[test]
fn the_kernel_command_finds_an_instance_by_file_or_name_and_bans_a_prefix() {
    let topo = Topology::new(&[NEAR, FAR]);
    let instance = unique("gwkcli");
    let admin_port = free_port();
    let config = format!(
        r#"
[gateway]
instance = "{instance}"
workers = 1
shutdown_grace_ms = 1000
[[listeners]]
address = "{GW_ADDR}:{PORT}"
[admin]
address = "127.0.0.1:{admin_port}"
[kernel]
interfaces = ["{iface}"]
default_tenant = "outside"
[[tenants]]
name = "outside"
id = 0
[[tenants]]
name = "lab"
id = 4
sources = ["198.18.0.0/26"]
"#,
        iface = topo.gw_if
    );
    let mut daemon = Daemon::start(&topo.gw, &instance, &config);
    let file = std::env::temp_dir().join(format!("{instance}.toml"));
    let file = file.to_str().unwrap();
    let dst = SocketAddr::new(IpAddr::V4(GW_ADDR), PORT);
    let connects = |src: Ipv4Addr| {
        in_netns(&topo.client, || {
            connect_from(IpAddr::V4(src), dst, Duration::from_millis(300)).is_some()
        })
    };
    assert!(connects(NEAR) && connects(FAR));

    let (ok, _, err) = gateway(&[
        "kernel",
        "--config",
        file,
        "ban",
        "198.18.0.0/26",
        "--seconds",
        "10m",
    ]);
    assert!(ok, "{err}");
    assert!(!connects(NEAR), "inside the banned prefix");
    assert!(connects(FAR), "outside it");
    let (ok, out, err) = gateway(&["kernel", "--instance", &instance, "bans"]);
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("198.18.0.0/26 "))
        .unwrap_or_else(|| panic!("{out}"));
    let left: u64 = line
        .split(' ')
        .nth(1)
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!((590..=600).contains(&left), "10m: {line}");
    let (ok, out, err) = gateway(&["kernel", "--config", file, "stats"]);
    assert!(ok, "{err}");
    let lab = out
        .lines()
        .find(|l| l.starts_with("tenant lab (4): "))
        .unwrap_or_else(|| panic!("tenant names: {out}"));
    assert!(!lab.contains(" banned=0 "), "{lab}");
    let (ok, _, err) = gateway(&["kernel", "--instance", &instance, "unban", "198.18.0.0/26"]);
    assert!(ok, "{err}");
    assert!(connects(NEAR), "lifted");

    // The same through the admin API, which also keeps the prefix in the workers' copy and
    // the state store.
    let admin = |method: &str, path: &str, body: &str| {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
             connection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        in_netns(&topo.gw, || {
            let (r, _) = raw(admin_port, req.as_bytes());
            (
                r.status,
                serde_json::from_slice::<Value>(&r.body).unwrap_or(Value::Null),
            )
        })
    };
    let (status, v) = admin(
        "POST",
        "/bans",
        r#"{"address":"198.18.0.7/26","seconds":600}"#,
    );
    assert_eq!(
        (status, &v["banned"]),
        (200, &json!("198.18.0.0/26")),
        "{v}"
    );
    assert!(!connects(NEAR), "inside the banned prefix");
    assert!(connects(FAR), "outside it");
    let (status, v) = admin("GET", "/bans", "");
    assert_eq!(status, 200);
    let listed = v
        .as_array()
        .and_then(|a| a.iter().find(|b| b["address"] == "198.18.0.0/26"))
        .unwrap_or_else(|| panic!("{v}"));
    assert!(listed["remaining_seconds"].as_u64().unwrap() > 590, "{v}");
    for bad in [
        r#"{"address":"198.18.0.0/33","seconds":60}"#,
        r#"{"address":"lab","seconds":60}"#,
        r#"{"address":"198.18.0.0/26","seconds":0}"#,
    ] {
        let (status, v) = admin("POST", "/bans", bad);
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    assert!(!connects(NEAR), "a refused request changes nothing");
    let (status, v) = admin("DELETE", "/bans/198.18.0.0%2F26", "");
    assert_eq!(
        (status, &v["unbanned"]),
        (200, &json!("198.18.0.0/26")),
        "{v}"
    );
    assert!(connects(NEAR), "lifted through the admin API");
    assert_eq!(
        admin("DELETE", "/bans/198.18.0.0/26", "").0,
        404,
        "already lifted"
    );
    daemon.stop();
}
