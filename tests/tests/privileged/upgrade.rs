//! Zero-downtime binary upgrade, end to end: a real gateway between raw HTTP clients and the
//! Python SDK's MCP server, under continuous load from keep-alive clients and clients that open
//! a connection per request, takes 20 configuration reloads (SIGHUP, `systemctl reload`) and one
//! `gateway upgrade`: no request fails, the new process serves, the old one drains and exits, the
//! XDP program (on a veth interface) stays attached throughout, replaced by the new process's,
//! and the pinned maps keep their state. An upgrade whose configuration is invalid leaves the
//! running gateway serving, and says why.

use std::{
    io::Write as _,
    net::TcpStream,
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{Daemon, alive, gateway_bin},
    peers::{PyServer, free_port, post, raw, read_response},
    require_root, unique,
};

/// A veth interface for the XDP program (generic mode; no traffic needs to cross it), removed
/// with its peer on drop.
struct Dummy(String);

impl Dummy {
    fn new(name: &str) -> Self {
        let peer = format!("p{}", &name[1..]);
        let ok = Command::new("ip")
            .args(["link", "add", name, "type", "veth", "peer", "name", &peer])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip link add {name} type veth");
        let _ = Command::new("ip")
            .args(["link", "set", name, "up"])
            .status();
        Dummy(name.into())
    }

    /// The id of the XDP program attached, if any (`ip -d link show`: `prog/xdp id N`).
    fn xdp_prog(&self) -> Option<u32> {
        let out = Command::new("ip")
            .args(["-d", "link", "show", "dev", &self.0])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let rest = text.split("prog/xdp id ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// The process that took over (not our child until its parent exits: this test process is
/// made a subreaper so it can reap it), killed and reaped on drop; and the runtime folder.
struct Successor {
    pid: Option<i32>,
    runtime: PathBuf,
}

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            for _ in 0..200 {
                match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                    Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    _ => break,
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.runtime);
    }
}

/// A gateway of two workers in front of `up` at `/mcp` (the kernel program on `kernel`, if
/// given), with `more` at its end.
fn config_with(
    instance: &str,
    port: u16,
    admin: u16,
    up: u16,
    kernel: Option<&str>,
    more: &str,
) -> String {
    let kernel = match kernel {
        Some(iface) => format!("interfaces = [\"{iface}\"]\nmode = \"generic\""),
        None => "enabled = false".into(),
    };
    format!(
        r#"[gateway]
instance = "{instance}"
workers = 2
shutdown_grace_ms = 5000
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
{kernel}
default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[upstreams]]
name = "u0"
url = "http://127.0.0.1:{up}/mcp"
[[routes]]
path = "/mcp"
upstream = "u0"
{more}
"#
    )
}

/// Opens a session-era session through the gateway (initialize, then initialized); returns
/// its id.
fn open_session(port: u16) -> String {
    open_session_on(port, "/mcp")
}

fn open_session_on(port: u16, path: &str) -> String {
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"upgrade-test","version":"1"}}}"#;
    let (r, _) = integration_tests::peers::raw(port, &post(path, init, "connection: close\r\n"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let sid = r
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("mcp-session-id"))
        .map(|(_, v)| v.clone())
        .expect("a session id");
    let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let extra = format!(
        "mcp-session-id: {sid}\r\nmcp-protocol-version: 2025-11-25\r\nconnection: close\r\n"
    );
    let (r, _) = integration_tests::peers::raw(port, &post(path, note, &extra));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    sid
}

/// The status of a `tools/list` in session `sid`.
fn session_list(port: u16, sid: &str) -> u16 {
    session_list_on(port, "/mcp", sid)
}

fn session_list_on(port: u16, path: &str, sid: &str) -> u16 {
    let body = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let extra = format!(
        "mcp-session-id: {sid}\r\nmcp-protocol-version: 2025-11-25\r\nconnection: close\r\n"
    );
    integration_tests::peers::raw(port, &post(path, body, &extra))
        .0
        .status
}

/// A stateless `tools/list`, as raw bytes.
/// A gateway (as root, with a runtime folder of its own) in front of the Python SDK's server,
/// ready for an upgrade: the process that takes over is `successor`'s to kill and reap (this
/// test process is made a subreaper).
struct Upgradable {
    d: Daemon,
    successor: Successor,
    upstream: PyServer,
    instance: String,
    runtime: PathBuf,
    port: u16,
    admin: u16,
}

impl Upgradable {
    fn start(name: &str) -> Self {
        Self::start_with(name, "")
    }

    /// [`Upgradable::start`] with `more` at the end of its configuration.
    fn start_with(name: &str, more: &str) -> Self {
        require_root();
        // SAFETY: prctl(2) on this process only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let instance = unique(name);
        let runtime = std::env::temp_dir().join(format!("{instance}.run"));
        let successor = Successor {
            pid: None,
            runtime: runtime.clone(),
        };
        let upstream = PyServer::start(true);
        let (port, admin) = (free_port(), free_port());
        let text = config_with(&instance, port, admin, upstream.port, None, more);
        let d = Daemon::start_local_with_env(
            &instance,
            &text,
            &[("RUNTIME_DIRECTORY", runtime.to_str().expect("utf-8"))],
        );
        Self {
            d,
            successor,
            upstream,
            instance,
            runtime,
            port,
            admin,
        }
    }
}

fn list_request() -> Vec<u8> {
    let body = r#"{"jsonrpc":"2.0","id":3,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    post(
        "/mcp",
        body,
        "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\n",
    )
}

/// Requests answered (200 with the upstream's tools) and failed, with a few failures described.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    closes: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < 10 {
            s.push(what);
        }
    }
}

/// One request on `stream`: whether the connection may carry another.
fn exchange(stream: &mut TcpStream, tally: &Tally) -> bool {
    if let Err(e) = stream.write_all(&list_request()) {
        tally.fail(format!("write: {e}"));
        return false;
    }
    match read_response(stream) {
        Some(r) if r.status == 200 && String::from_utf8_lossy(&r.body).contains("\"tools\"") => {
            tally.ok.fetch_add(1, Ordering::Relaxed);
            let close = r
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            if close {
                tally.closes.fetch_add(1, Ordering::Relaxed);
            }
            !close
        }
        Some(r) => {
            tally.fail(format!(
                "{}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
            false
        }
        None => {
            tally.fail("no response (connection closed or reset)".into());
            false
        }
    }
}

/// Clients until `stop`: `keep_alive` of them keep their connection for as long as the gateway
/// does (a new one after `connection: close`), `fresh` open one per request.
fn load(
    port: u16,
    keep_alive: usize,
    fresh: usize,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    for i in 0..keep_alive + fresh {
        let stop = Arc::clone(stop);
        let tally = Arc::clone(tally);
        threads.push(std::thread::spawn(move || {
            let mut conn: Option<TcpStream> = None;
            while !stop.load(Ordering::Relaxed) {
                let mut s = match conn.take() {
                    Some(s) => s,
                    None => match TcpStream::connect(("127.0.0.1", port)) {
                        Ok(s) => s,
                        Err(e) => {
                            tally.fail(format!("connect: {e}"));
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    },
                };
                if exchange(&mut s, &tally) && i < keep_alive {
                    conn = Some(s);
                }
            }
        }));
    }
    threads
}

fn upgrade(instance: &str, runtime: &PathBuf) -> std::process::Output {
    Command::new(gateway_bin())
        .args(["upgrade", "--instance", instance])
        .env("RUNTIME_DIRECTORY", runtime)
        .output()
        .expect("run gateway upgrade")
}

fn new_pid(out: &std::process::Output) -> i32 {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gateway upgrade failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.split("pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {text:?}"))
}

fn ready(admin: u16) -> bool {
    let (r, _) = raw(admin, b"GET /readyz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    r.status == 200
}

fn gateway_kernel(pin_dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(gateway_bin())
        .arg("kernel")
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(args)
        .output()
        .expect("gateway kernel");
    assert!(
        out.status.success(),
        "gateway kernel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// SIGHUP to `pid`, and a wait until it is applied (the `n`th reload in the log) before the
/// next: signals sent close together coalesce.
fn hup(d: &Daemon, pid: i32, n: usize) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.log().matches("reloaded ").count() < n {
        assert!(
            Instant::now() < deadline,
            "reload {n} not applied within 10 s; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_upgrade_and_20_reloads_under_load_fail_no_request() {
    require_root();
    // The new process is the old one's child; once that exits, ours, to reap.
    // SAFETY: prctl(2) on this process only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let instance = unique("upg");
    let dummy = Dummy::new(&format!(
        "u{}",
        &instance[instance.len().saturating_sub(10)..]
    ));
    let runtime = std::env::temp_dir().join(format!("{instance}.run"));
    let mut successor = Successor {
        pid: None,
        runtime: runtime.clone(),
    };
    let upstream = PyServer::start(true);
    // A server of the 2026-07-28 era only, behind two endpoints (a replicated upstream): its
    // session-era clients are bridged, in sessions of the gateway's own.
    let modern = PyServer::start_with(&["--stateless-only"]);
    let bridged = format!(
        "[[upstreams]]\nname = \"modern\"\nendpoints = [\"http://127.0.0.1:{0}/mcp\", \"http://localhost:{0}/mcp\"]\n[[routes]]\npath = \"/bridge\"\nupstream = \"modern\"\n",
        modern.port
    );
    let (port, admin) = (free_port(), free_port());
    let mut d = Daemon::start_local_with_env(
        &instance,
        &config_with(
            &instance,
            port,
            admin,
            upstream.port,
            Some(&dummy.0),
            &bridged,
        ),
        &[("RUNTIME_DIRECTORY", runtime.to_str().expect("utf-8"))],
    );
    let old_pid = d.pid() as i32;
    let before = dummy.xdp_prog().expect("XDP attached at start");
    // State in the pinned maps: a ban.
    gateway_kernel(&d.pin_dir, &["ban", "198.18.99.7", "--seconds", "600"]);
    // State in the old process: a passthrough session and who opened it.
    let sid = open_session(port);
    assert_eq!(session_list(port, &sid), 200);
    let bridged_sid = open_session_on(port, "/bridge");
    assert_eq!(session_list_on(port, "/bridge", &bridged_sid), 200);
    // And one its client ended: the upstream holds nothing, the gateway remembers the end.
    let ended_sid = open_session_on(port, "/bridge");
    let delete = format!(
        "DELETE /bridge HTTP/1.1\r\nhost: gw\r\nmcp-session-id: {ended_sid}\r\nmcp-protocol-version: 2025-11-25\r\nconnection: close\r\n\r\n"
    );
    assert_eq!(raw(port, delete.as_bytes()).0.status, 200);
    assert_eq!(session_list_on(port, "/bridge", &ended_sid), 404);

    // The XDP program, looked at every 5 ms throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let gaps = Arc::new(AtomicU64::new(0));
    let looks = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, gaps, looks) = (Arc::clone(&stop), Arc::clone(&gaps), Arc::clone(&looks));
        let dummy = Dummy(dummy.0.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                looks.fetch_add(1, Ordering::Relaxed);
                if dummy.xdp_prog().is_none() {
                    gaps.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            // Not ours to remove.
            std::mem::forget(dummy);
        })
    };
    let tally = Arc::new(Tally::default());
    let clients = load(port, 4, 2, &stop, &tally);
    std::thread::sleep(Duration::from_millis(500));

    // 10 reloads on the old process, the upgrade, 10 on the new one.
    let mut reloads = 0;
    for _ in 0..10 {
        reloads += 1;
        hup(&d, old_pid, reloads);
    }
    let out = upgrade(&instance, &runtime);
    let pid = new_pid(&out);
    successor.pid = Some(pid);
    assert_ne!(pid, old_pid);
    let status = d
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the old gateway did not exit; log:\n{}", d.log()));
    assert!(status.success(), "old gateway: {status}; log:\n{}", d.log());
    let served_by_old = tally.ok.load(Ordering::Relaxed);
    for _ in 0..10 {
        reloads += 1;
        hup(&d, pid, reloads);
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    watcher.join().expect("watcher");

    let log = d.log();
    let (ok, failed) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed: {:?}; log:\n{log}",
        ok + failed,
        tally.samples.lock().unwrap_or_else(|e| e.into_inner())
    );
    assert!(
        ok > served_by_old,
        "the new process answered nothing ({ok} in all); log:\n{log}"
    );
    assert!(
        tally.closes.load(Ordering::Relaxed) > 0,
        "no keep-alive client was told `connection: close`"
    );
    assert!(
        u32::try_from(pid).is_ok_and(alive),
        "the new gateway is not running; log:\n{log}"
    );
    assert!(ready(admin), "the new gateway is not ready");
    // Every reload applied: 10 by each process.
    assert_eq!(
        log.matches("reloaded ").count(),
        20,
        "expected 20 applied reloads; log:\n{log}"
    );
    // The XDP program: attached at every look, now the new process's.
    assert_eq!(
        gaps.load(Ordering::Relaxed),
        0,
        "the interface was without an XDP program in {} of {} looks",
        gaps.load(Ordering::Relaxed),
        looks.load(Ordering::Relaxed)
    );
    let after = dummy.xdp_prog().expect("XDP attached after the upgrade");
    assert_ne!(
        after, before,
        "the new process's program replaces the old one's"
    );
    // The pinned state is kept.
    let bans = gateway_kernel(&d.pin_dir, &["bans"]);
    assert!(bans.contains("198.18.99.7"), "ban lost: {bans}");
    // So is the session: its client goes on without initializing again (a 404 without the
    // handover of the sessions' owners and the hash seed).
    assert_eq!(
        session_list(port, &sid),
        200,
        "the session was lost in the upgrade"
    );
    // A bridged one too, though the new process has not yet learnt that the upstream speaks
    // only the stateless era: the session says so.
    assert_eq!(
        session_list_on(port, "/bridge", &bridged_sid),
        200,
        "the bridged session was lost in the upgrade"
    );
    assert_eq!(
        session_list_on(port, "/bridge", &ended_sid),
        404,
        "a session ended before the upgrade is valid again after it"
    );
    drop(successor);
    drop(upstream);
}

#[test]
fn an_upgrade_with_an_invalid_configuration_leaves_the_running_gateway_serving() {
    let Upgradable {
        mut d,
        mut successor,
        upstream: _upstream,
        instance,
        runtime,
        port,
        admin,
    } = Upgradable::start("upgbad");
    let path = std::env::temp_dir().join(format!("{instance}.toml"));
    let good = std::fs::read_to_string(&path).expect("the harness's config");
    std::fs::write(&path, format!("{good}\n[surprise]\nfield = 1\n")).expect("write");

    let out = upgrade(&instance, &runtime);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the upgrade succeeded on a bad config"
    );
    assert!(
        stderr.contains("serves on") && stderr.contains("surprise"),
        "the reason is not given: {stderr}"
    );
    // The running gateway serves on: new connections, readiness, and a good upgrade after.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients = load(port, 1, 1, &stop, &tally);
    std::thread::sleep(Duration::from_millis(300));
    assert!(ready(admin), "not ready after the failed upgrade");
    std::fs::write(&path, &good).expect("write");
    let pid = new_pid(&upgrade(&instance, &runtime));
    successor.pid = Some(pid);
    let exited = d.wait_exit(Duration::from_secs(15));
    assert!(
        exited.is_some(),
        "the old gateway did not exit; log:\n{}",
        d.log()
    );
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    assert_eq!(
        tally.failed.load(Ordering::Relaxed),
        0,
        "{:?}; log:\n{}",
        tally.samples.lock().unwrap_or_else(|e| e.into_inner()),
        d.log()
    );
    assert!(tally.ok.load(Ordering::Relaxed) > 0);
    drop(successor);
}

/// A call in flight at an upgrade is answered, however long past `shutdown_grace_ms` (5 s
/// here), within its upstream's `response_timeout_ms` (30 s by default): the old process drains
/// that long after a handover (the new one serves meanwhile). Before, it drained for the grace
/// alone, and a call of 6.5 s was cut at every upgrade with no answer (an operator's review).
/// But only while calls are in flight: once the call is answered, an idle GET event stream
/// keeps the old process no longer (a review saw one hold it for the whole response timeout).
#[test]
fn an_upgrade_cuts_no_call_its_timeouts_allow() {
    let slow = integration_tests::peers::FakeUpstream::start(
        integration_tests::peers::Misbehave::DelayFromBody,
    );
    let more = format!(
        "[[upstreams]]\nname = \"slow\"\nurl = \"http://127.0.0.1:{}/mcp\"\n[[routes]]\npath = \"/slow\"\nupstream = \"slow\"\n",
        slow.port
    );
    let Upgradable {
        mut d,
        mut successor,
        upstream: _upstream,
        instance,
        runtime,
        port,
        admin: _,
    } = Upgradable::start_with("upgslow", &more);
    // A session's standalone event stream, open through the upgrade.
    let sid = open_session(port);
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .write_all(
            format!(
                "GET /mcp HTTP/1.1\r\nhost: gw\r\naccept: text/event-stream\r\nmcp-session-id: {sid}\r\nmcp-protocol-version: 2025-11-25\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("send");
    let mut head = [0u8; 12];
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    std::io::Read::read_exact(&mut stream, &mut head).expect("the stream's head");
    assert_eq!(&head, b"HTTP/1.1 200", "the event stream opened");
    let call = std::thread::spawn(move || {
        let request = integration_tests::peers::post_call_2026(
            "/slow",
            9,
            "sleep",
            &serde_json::json!({"delay_ms": 6500}),
            "",
        );
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(&request).expect("send");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        read_response(&mut s).map(|r| (r.status, r.json()["id"].clone()))
    });
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let pid = new_pid(&upgrade(&instance, &runtime));
    successor.pid = Some(pid);
    let answered = call.join().expect("the client thread");
    assert_eq!(
        answered,
        Some((200, serde_json::json!(9))),
        "the call in flight at the upgrade; log:\n{}",
        d.log()
    );
    assert!(
        started.elapsed() > Duration::from_secs(5),
        "the call ran past the grace"
    );
    // The call answered, the open event stream does not keep the old process.
    let exited = d.wait_exit(Duration::from_secs(3));
    assert!(
        exited.is_some(),
        "the old gateway did not exit with only an event stream open; log:\n{}",
        d.log()
    );
    drop((stream, successor));
}

/// What the old process counts while it drains after a handover (the calls on connections it
/// still serves, each answered `connection: close`) reaches the new process: before, it had
/// closed the state store and stopped its fleet agent, and every upgrade gave each open
/// connection a free call (an operator's review).
#[test]
fn what_the_old_process_spends_while_draining_counts_in_the_new_one() {
    const BUDGET: usize = 30;
    let more = format!("[policy]\nbudget = {{ window_s = 1000000000, tenant = {BUDGET} }}\n");
    let Upgradable {
        mut d,
        mut successor,
        upstream: _upstream,
        instance,
        runtime,
        port,
        admin: _,
    } = Upgradable::start_with("upglate", &more);
    let call = |id: u64| {
        integration_tests::peers::post_call_2026(
            "/mcp",
            id,
            "echo",
            &serde_json::json!({"text": "hi"}),
            "",
        )
    };
    // Ten keep-alive connections, a call each.
    let mut conns: Vec<TcpStream> = (0..10)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&call(i)).expect("send");
            let r = read_response(&mut s).expect("an answer");
            assert_eq!(r.status, 200, "{r:?}");
            s
        })
        .collect();
    let pid = new_pid(&upgrade(&instance, &runtime));
    successor.pid = Some(pid);
    // A call on each at once: the old process answers those that come within its linger.
    let mut drained = 0;
    for (i, s) in (100..).zip(conns.iter_mut()) {
        if s.write_all(&call(i)).is_ok() && read_response(s).is_some_and(|r| r.status == 200) {
            drained += 1;
        }
    }
    assert!(drained > 0, "no call reached the draining process");
    assert!(
        d.wait_exit(Duration::from_secs(10)).is_some(),
        "the old gateway did not exit; log:\n{}",
        d.log()
    );
    // The new process knows all 10 + `drained` spent: the rest of the budget, and no more.
    let mut admitted = 0;
    for i in 0..BUDGET as u64 {
        let (r, _) = raw(port, &call(1000 + i));
        match r.status {
            200 => admitted += 1,
            429 => break,
            other => panic!("call {i}: {other} {r:?}"),
        }
    }
    assert_eq!(
        admitted,
        BUDGET - 10 - drained,
        "{drained} calls served while draining; log:\n{}",
        d.log()
    );
    drop(successor);
}

/// The gateway's socket of the connection from local port `peer` to `port` (its inode, from
/// /proc/net/tcp).
fn server_socket(port: u16, peer: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port_of = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && port_of(f[1]) == Some(port) && port_of(f[2]) == Some(peer))
            .then(|| format!("socket:[{}]", f[9]))
    })
}

/// The new binary of an upgrade holds no client connection of the old process's. io_uring's
/// accept made them without close-on-exec, so the new process held a copy of every connection
/// open at the upgrade, for as long as it ran (a review found the same descriptors in stdio
/// children, where another tenant's tool read and answered them).
#[test]
fn an_upgrade_hands_the_new_binary_no_client_connection() {
    let Upgradable {
        mut d,
        mut successor,
        upstream: _upstream,
        instance,
        runtime,
        port,
        admin: _,
    } = Upgradable::start("upgfd");
    let mut kept = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let tally = Tally::default();
    exchange(&mut kept, &tally);
    assert_eq!(tally.ok.load(Ordering::Relaxed), 1, "{:?}", tally.samples);
    let socket = server_socket(port, kept.local_addr().expect("address").port())
        .expect("the gateway's socket of the connection in /proc/net/tcp");

    let pid = new_pid(&upgrade(&instance, &runtime));
    successor.pid = Some(pid);
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the new process's descriptors")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.display().to_string())
        .collect();
    assert!(
        !held.contains(&socket),
        "the new binary holds the old process's client connection {socket}"
    );
    assert!(
        d.wait_exit(Duration::from_secs(15)).is_some(),
        "the old gateway did not exit; log:\n{}",
        d.log()
    );
    drop(kept);
}
