//! The state store end to end on loopback: a real gateway process between the Python SDK's
//! server and raw MCP clients, stopped by `kill -9` and by SIGTERM and started again on the same
//! store; budgets spent, pinned tool definitions and approvals come back. A store that cannot be
//! read stops the start with the file named and exit status 65, and the documented recovery
//! (`gateway state check|reset`) works.

use std::{path::PathBuf, process::Command, time::Duration};

use serde_json::{Value, json};

use integration_tests::{
    daemon::{Daemon, gateway_bin},
    peers::{PyServer, free_port, post, raw},
    unique,
};

/// Removes the test's state folder (or file) even when the test fails.
struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A gateway with tool pinning and a budget of 5 calls for the anonymous tenant, in a window
/// long enough (about 31 years) that the test never crosses its end.
fn config(
    instance: &str,
    port: u16,
    admin: u16,
    up_port: u16,
    state: &Folder,
    flush_ms: u64,
) -> String {
    format!(
        r#"[gateway]
instance = "{instance}"
workers = 2
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[policy]
pin_tools = true
budget = {{ window_s = 1000000000, tenant = 5 }}
[[upstreams]]
name = "u0"
url = "http://127.0.0.1:{up_port}/mcp"
[[routes]]
path = "/mcp"
upstream = "u0"
[state]
path = "{state}"
flush_interval_ms = {flush_ms}
"#,
        state = state.0.display(),
    )
}

fn meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}
    })
}

/// A stateless `tools/call`, over a new connection: its status and JSON-RPC error code.
fn call(port: u16, tool: &str, args: Value) -> (u16, Option<i64>) {
    let body = json!({
        "jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": tool, "arguments": args, "_meta": meta()},
    })
    .to_string();
    let headers = format!(
        "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: {tool}\r\n"
    );
    let r = raw(port, &post("/mcp", &body, &headers)).0;
    (r.status, r.json()["error"]["code"].as_i64())
}

/// A stateless `tools/list`: whether `echo` is shown.
fn echo_listed(port: u16) -> bool {
    let body =
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"_meta": meta()}})
            .to_string();
    let r = raw(
        port,
        &post(
            "/mcp",
            &body,
            "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\n",
        ),
    )
    .0;
    assert_eq!(r.status, 200, "{r:?}");
    let tools = r.json()["result"]["tools"].clone();
    let names: Vec<&str> = tools
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(names.contains(&"add"), "{names:?}");
    names.contains(&"echo")
}

fn metric(admin: u16, name: &str) -> f64 {
    let (r, _) = raw(admin, b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Waits until two more flushes have run than now (so one began after every change so far).
fn wait_for_flushes(admin: u16) {
    let before = metric(admin, "mcp_gateway_state_flushes_total");
    for _ in 0..200 {
        if metric(admin, "mcp_gateway_state_flushes_total") >= before + 2.0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the state store was not flushed within 10 s");
}

/// Waits (bounded) until nothing holds `port` any more: the connections a killed process
/// leaves behind in the kernel end within seconds.
fn wait_port_free(port: u16) {
    for _ in 0..1200 {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("127.0.0.1:{port} still held 120 s after the gateway was killed");
}

fn approve(admin: u16) {
    let r = integration_tests::peers::approve_pin(admin, "u0", "echo");
    assert_eq!(r.status, 200, "{r:?}");
}

const BUDGET_EXHAUSTED: i64 = -32043;

#[test]
fn budgets_pins_and_approvals_survive_kill_9_and_a_clean_stop() {
    let up_port = free_port();
    let upstream = PyServer::start_on(up_port, &[]);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwstate");
    let state = Folder(std::env::temp_dir().join(format!("{instance}-kept")));
    let mut d = Daemon::start_local(
        &instance,
        &config(&instance, port, admin, up_port, &state, 200),
    );

    // First sight pins `echo`; three calls spend 3 of the tenant's 5.
    assert!(echo_listed(port));
    for _ in 0..3 {
        assert_eq!(call(port, "echo", json!({"text": "hi"})), (200, None));
    }
    // The upstream changes `echo`: held until an operator approves it.
    drop(upstream);
    let upstream = PyServer::start_on(up_port, &["--changed-echo"]);
    assert!(!echo_listed(port), "changed: hidden");
    wait_for_flushes(admin);
    assert!(metric(admin, "mcp_gateway_state_store_bytes") > 0.0);
    assert_eq!(metric(admin, "mcp_gateway_state_flush_failures_total"), 0.0);

    // A crash after a flush loses nothing that was flushed.
    d.crash();
    wait_port_free(port);
    // The next run flushes only at shutdown (the interval is longer than the test): what it
    // spends and approves comes back only through the clean stop's flush.
    let config_path = std::env::temp_dir().join(format!("{instance}.toml"));
    std::fs::write(
        &config_path,
        config(&instance, port, admin, up_port, &state, 60_000),
    )
    .unwrap();
    let copies = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&state.0)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".before-repair"))
            .collect()
    };
    assert!(copies().is_empty(), "no copy before a repair");
    let left = std::fs::read(state.0.join("state.redb")).unwrap();
    let mut d = Daemon::restart_local(&instance, &mut d);
    d.wait_for_log("state store loaded", Duration::from_secs(5));
    // The file kill -9 left unclosed is repaired in place: copied aside first, as it was.
    d.wait_for_log("copied aside before it is repaired", Duration::from_secs(1));
    let made = copies();
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(std::fs::read(&made[0]).unwrap(), left, "the file as it was");
    assert!(
        !echo_listed(port),
        "the changed definition is still held after kill -9 (not trusted on first sight again)"
    );
    assert_eq!(call(port, "echo", json!({"text": "hi"})).0, 403);
    // 2 of 5 left: one call now.
    assert_eq!(call(port, "add", json!({"a": 1, "b": 2})), (200, None));
    approve(admin);
    assert!(echo_listed(port), "approved: shown");
    d.stop();

    let mut d = Daemon::restart_local(&instance, &mut d);
    d.wait_for_log("state store loaded", Duration::from_secs(5));
    assert!(echo_listed(port), "the approval survived the clean stop");
    assert_eq!(
        call(port, "echo", json!({"text": "hi"})),
        (200, None),
        "the 5th of 5"
    );
    assert_eq!(
        call(port, "echo", json!({"text": "hi"})),
        (429, Some(BUDGET_EXHAUSTED)),
        "the spend of every run counts: the budget is exhausted"
    );
    d.stop();
    drop(upstream);
}

#[test]
fn a_damaged_store_stops_the_start_naming_the_file_and_state_reset_recovers() {
    let up_port = free_port();
    let _upstream = PyServer::start_on(up_port, &[]);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwbadstate");
    let state = Folder(std::env::temp_dir().join(format!("{instance}-kept")));
    std::fs::create_dir_all(&state.0).unwrap();
    let file = state.0.join("state.redb");
    let junk = vec![0x5a_u8; 64 * 1024];
    std::fs::write(&file, &junk).unwrap();
    let config_path = std::env::temp_dir().join(format!("{instance}-bad.toml"));
    let _config = Folder(config_path.clone());
    std::fs::write(
        &config_path,
        config(&instance, port, admin, up_port, &state, 200),
    )
    .unwrap();

    let mut child = Command::new(gateway_bin())
        .args(["run", "--config"])
        .arg(&config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the gateway");
    let mut status = None;
    for _ in 0..400 {
        if let Some(s) = child.try_wait().expect("wait") {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the gateway kept running on a damaged state store");
    };
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status.code(), Some(65), "{text}");
    assert!(
        text.contains(&file.display().to_string()),
        "names the file: {text}"
    );
    assert!(
        text.contains("gateway state reset"),
        "says how to recover: {text}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), junk, "never reset silently");

    let gw = |args: &[&str]| {
        let out = Command::new(gateway_bin())
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .output()
            .expect("run gateway");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = gw(&["state", "check"]);
    assert!(!ok && text.contains(&file.display().to_string()), "{text}");
    let (ok, text) = gw(&["state", "reset"]);
    assert!(ok, "{text}");
    assert!(!file.exists(), "moved aside");
    let aside: Vec<_> = std::fs::read_dir(&state.0)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".bad"))
        .collect();
    assert_eq!(aside.len(), 1, "kept for inspection");
    assert_eq!(std::fs::read(aside[0].path()).unwrap(), junk);

    // A start on the fresh store serves.
    let text = std::fs::read_to_string(&config_path).unwrap();
    let mut d = Daemon::start_local(&instance, &text);
    assert_eq!(call(port, "add", json!({"a": 1, "b": 2})), (200, None));
    d.stop();
    let (ok, text) = gw(&["state", "check"]);
    assert!(ok, "{text}");
    let (ok, text) = gw(&["state", "export"]);
    assert!(
        ok && text.contains("\"public\""),
        "the spend is exported: {text}"
    );
}

/// A tmpfs mounted for the test, unmounted (and its folder removed) even when the test fails.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs on {}", dir.display());
        Self(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A disk that filled up once does not stop the state store for good: once there is room
/// again the next flush writes, and a crash after it loses nothing. Before, redb refused every
/// write after the one that failed until a restart, and the stop's last write failed too,
/// silently: a restart forgot the spend (an operator's review).
#[test]
fn a_disk_that_filled_up_once_is_written_again_when_there_is_room() {
    let up_port = free_port();
    let _upstream = PyServer::start_on(up_port, &[]);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwfull");
    let disk = SmallDisk::mount(
        std::env::temp_dir().join(format!("{instance}-disk")),
        "1200k",
    );
    let state = Folder(disk.0.join("st"));
    let mut d = Daemon::start_local(
        &instance,
        &config(&instance, port, admin, up_port, &state, 200),
    );
    assert_eq!(call(port, "echo", json!({"text": "hi"})), (200, None));
    wait_for_flushes(admin);
    // Fill the disk, then spend: the flushes fail.
    let fill = disk.0.join("fill");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&fill).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    assert_eq!(call(port, "echo", json!({"text": "hi"})), (200, None));
    assert_eq!(call(port, "add", json!({"a": 1, "b": 2})), (200, None));
    let mut failing = false;
    for _ in 0..100 {
        if metric(admin, "mcp_gateway_state_store_failing") == 1.0 {
            failing = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(failing, "a full disk fails the flush");
    assert!(metric(admin, "mcp_gateway_state_flush_failures_total") >= 1.0);
    // Room again: the next flushes write.
    std::fs::remove_file(&fill).unwrap();
    d.wait_for_log("state store written again", Duration::from_secs(10));
    wait_for_flushes(admin);
    assert_eq!(metric(admin, "mcp_gateway_state_store_failing"), 0.0);
    // A crash now loses nothing: 3 of 5 spent, two calls left.
    d.crash();
    wait_port_free(port);
    let mut d = Daemon::restart_local(&instance, &mut d);
    d.wait_for_log("state store loaded", Duration::from_secs(5));
    for _ in 0..2 {
        assert_eq!(call(port, "echo", json!({"text": "hi"})), (200, None));
    }
    assert_eq!(
        call(port, "echo", json!({"text": "hi"})),
        (429, Some(BUDGET_EXHAUSTED)),
        "the spend made while the disk was full was written once there was room"
    );
    d.stop();
}
