//! Operating the gateway as a host service: what protects an operator from their own mistakes.

use std::{process::Command, time::Duration};

use integration_tests::{
    RemoveOnDrop,
    daemon::{Daemon, gateway_bin},
    peers::{demo_upstream, free_port},
    unique,
};

fn config(instance: &str, port: u16, admin: u16, up_port: u16) -> String {
    format!(
        r#"
[gateway]
instance = "{instance}"
workers = 2
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
[[upstreams]]
name = "demo"
url = "http://127.0.0.1:{up_port}/mcp"
[[routes]]
path = "/mcp"
upstream = "demo"
"#
    )
}

/// A second gateway started by mistake on a live listener address is refused at start, with
/// the address and the holder named; without the check `SO_REUSEPORT` let it join the first
/// one's group and take a share of the connections under its own policy.
#[test]
fn a_second_gateway_on_a_live_port_is_refused_naming_the_holder() {
    let up_port = free_port();
    let _up = demo_upstream(up_port);
    let port = free_port();
    let first = unique("gwfirst");
    let d = Daemon::start_local(&first, &config(&first, port, free_port(), up_port));

    let second = unique("gwsecond");
    let path = std::env::temp_dir().join(format!("{second}.toml"));
    std::fs::write(&path, config(&second, port, free_port(), up_port)).expect("write config");
    let mut child = Command::new(gateway_bin())
        .args(["run", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the second gateway");
    // Bounded wait: it must exit on its own, at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = std::fs::remove_file(&path);
            panic!("the second gateway kept running on a port the first one serves");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    let _ = std::fs::remove_file(&path);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!status.success(), "the second gateway must fail: {text}");
    assert!(
        text.contains(&format!("127.0.0.1:{port} is already in use")),
        "the error names the address: {text}"
    );
    assert!(
        text.contains(&format!("pid {}", d.pid())),
        "the error names the holder: {text}"
    );
    // The first one still serves.
    assert!(d.log().contains("data plane running"));
}

/// The soft open-file limit a service starts with (1,024 is common) is raised to the hard
/// limit at start, and the figure in force is exported.
#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit_and_exported() {
    let up_port = free_port();
    let _up = demo_upstream(up_port);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwnofile");
    let d = Daemon::start_local_with_open_files(
        &instance,
        &config(&instance, port, admin, up_port),
        (256, 4096),
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        (fields[3], fields[4]),
        ("4096", "4096"),
        "soft raised to hard: {line}"
    );
    let req = "GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n";
    let (r, _) = integration_tests::peers::raw(admin, req.as_bytes());
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.lines()
            .any(|l| l == "mcp_gateway_open_files_limit 4096"),
        "{text}"
    );
}

/// A gateway started on a subset of the host's CPUs (`taskset -c`, systemd's `CPUAffinity=`)
/// pins its workers within that subset. Worker *i* used to be pinned to CPU *i*: started on the
/// last CPU only, its first worker moved to CPU 0, beside what the operator had kept it from.
#[test]
fn workers_are_pinned_within_the_cpus_the_gateway_was_given() {
    let host: Vec<usize> = {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
        (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect()
    };
    if host.len() < 2 {
        // With one CPU every worker is on it, pinned right or not: nothing to tell apart.
        eprintln!("skipped: one CPU ({host:?})");
        return;
    }
    let last = *host.last().expect("a CPU");
    let up_port = free_port();
    let _up = demo_upstream(up_port);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwcpus");
    // `config` asks for 2 workers with the default `pin_workers = true`.
    let d =
        Daemon::start_local_on_cpus(&instance, &config(&instance, port, admin, up_port), &[last]);
    calls(port, 4);
    let mut workers = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", d.pid())).expect("tasks") {
        let task = task.expect("task").path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !comm.starts_with("worker-") {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default();
        workers.push((comm.trim().to_owned(), allowed));
    }
    workers.sort();
    assert_eq!(
        workers,
        vec![
            ("worker-0".to_owned(), last.to_string()),
            ("worker-1".to_owned(), last.to_string()),
        ],
        "each worker pinned to CPU {last}, the only one the gateway was given"
    );
}

fn logged_config(
    instance: &str,
    port: u16,
    admin: u16,
    up_url: &str,
    audit: &str,
    hist: &str,
) -> String {
    format!(
        r#"
[gateway]
instance = "{instance}"
workers = 2
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
[telemetry]
histogram_log = "{hist}"
[audit]
path = "{audit}"
[[upstreams]]
name = "u0"
url = "{up_url}"
[[routes]]
path = "/mcp"
upstream = "u0"
"#
    )
}

/// `n` JSON-RPC calls, each on its own connection, each answered 200.
fn calls(port: u16, n: usize) {
    for i in 0..n {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"ping"}}"#);
        let (r, _) = integration_tests::peers::raw(
            port,
            &integration_tests::peers::post("/mcp", &body, "connection: close\r\n"),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .count()
}

/// The descriptors process `pid` holds.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|r| r.count())
        .unwrap_or(0)
}

fn admin_get(admin: u16, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    let (r, _) = integration_tests::peers::raw(admin, req.as_bytes());
    String::from_utf8_lossy(&r.body).into_owned()
}

/// logrotate's default `create` mode: the file is moved, then the gateway is signalled. After
/// SIGUSR1, and again after SIGHUP, new records go to a new file at the configured path (mode
/// 0640) and none is lost: the moved files and the new one hold every record between them.
/// Without the reopen the gateway kept writing to the moved file.
#[test]
fn audit_and_histogram_logs_are_reopened_on_sigusr1_and_sighup() {
    use std::os::unix::fs::PermissionsExt as _;
    let fake =
        integration_tests::peers::FakeUpstream::start(integration_tests::peers::Misbehave::Answer);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwrotate");
    let dir = std::env::temp_dir();
    let audit = dir.join(format!("{instance}-audit.jsonl"));
    let hist = dir.join(format!("{instance}.hlog"));
    let moved = |p: &std::path::Path, n: u32| p.with_extension(format!("{n}"));
    let _files = RemoveOnDrop(vec![
        audit.clone(),
        hist.clone(),
        moved(&audit, 1),
        moved(&audit, 2),
        moved(&hist, 1),
        moved(&hist, 2),
    ]);
    let mut d = Daemon::start_local(
        &instance,
        &logged_config(
            &instance,
            port,
            admin,
            &fake.url(),
            &audit.display().to_string(),
            &hist.display().to_string(),
        ),
    );
    let mode = std::fs::metadata(&audit)
        .expect("audit log")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        mode & !0o640,
        0,
        "audit log mode {mode:o}: not more than 0640"
    );
    let mode = std::fs::metadata(&hist)
        .expect("histogram log")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        mode & !0o640,
        0,
        "histogram log mode {mode:o}: not more than 0640"
    );

    let mut total = 0;
    for (round, signal, needle_count) in [
        (1, nix::sys::signal::Signal::SIGUSR1, 1),
        (2, nix::sys::signal::Signal::SIGHUP, 2),
    ] {
        calls(port, 10);
        std::fs::rename(&audit, moved(&audit, round)).expect("move the audit log");
        std::fs::rename(&hist, moved(&hist, round)).expect("move the histogram log");
        // Written after the move, before the signal: these belong to the moved file.
        calls(port, 10);
        d.signal(signal);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while d.log().matches("log files reopened").count() < needle_count {
            assert!(
                std::time::Instant::now() < deadline,
                "no reopen; log:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        calls(port, 10);
        total += 30;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let old: usize = (1..=round).map(|n| lines(&moved(&audit, n))).sum();
            let new = lines(&audit);
            if old + new == total && new >= 10 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round} ({signal}): {old} records in the moved files, {new} in the new one, {total} sent"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mode = std::fs::metadata(&audit)
            .expect("new audit log")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode & !0o640, 0, "new audit log mode {mode:o}");
        // The histogram log starts again with its header, then the next intervals.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&hist).unwrap_or_default();
            if text.starts_with("#[Histogram log") && text.contains("\nTag=") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the new histogram log has no interval:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    d.stop();
}

/// Every configuration change is logged with its source and what changed, and counted by
/// source and result with the time of the last one. Without it a reload through the admin API
/// left no log line.
#[test]
fn configuration_changes_are_logged_with_source_and_diff_and_counted() {
    let fake =
        integration_tests::peers::FakeUpstream::start(integration_tests::peers::Misbehave::Answer);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwreload");
    let dir = std::env::temp_dir();
    let audit = dir.join(format!("{instance}-audit.jsonl"));
    let hist = dir.join(format!("{instance}.hlog"));
    let _files = RemoveOnDrop(vec![audit.clone(), hist.clone()]);
    let base = logged_config(
        &instance,
        port,
        admin,
        &fake.url(),
        &audit.display().to_string(),
        &hist.display().to_string(),
    );
    let mut d = Daemon::start_local(&instance, &base);
    let config_path = dir.join(format!("{instance}.toml"));

    // Through the admin API: a route added.
    let extra = format!("{base}\n[[routes]]\npath = \"/extra\"\nupstream = \"u0\"\n");
    let (status, body) = reload_file_as(&instance, admin, &extra);
    assert_eq!(status, 200, "{body}");
    d.wait_for_log("routes +/extra", Duration::from_secs(5));
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("routes +/extra"))
        .map(str::to_owned)
        .expect("checked above");
    assert!(line.contains(r#""source":"admin_api""#), "{line}");

    // By signal: the route removed again, and an upstream added.
    let signal = format!(
        "{base}\n[[upstreams]]\nname = \"u1\"\nurl = \"{}\"\n",
        fake.url()
    );
    std::fs::write(
        &config_path,
        integration_tests::daemon::with_state(&instance, &signal),
    )
    .expect("write config");
    d.hangup();
    d.wait_for_log("routes -/extra; upstreams +u1", Duration::from_secs(5));
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("routes -/extra; upstreams +u1"))
        .map(str::to_owned)
        .expect("checked above");
    assert!(line.contains(r#""source":"signal""#), "{line}");

    // A refused change is logged with its source and counted as a failure.
    std::fs::write(&config_path, "not toml [").expect("write config");
    d.hangup();
    d.wait_for_log("reload refused", Duration::from_secs(5));

    let metrics = admin_get(admin, "/metrics");
    for want in [
        r#"mcp_gateway_config_reloads_total{source="admin_api",result="success"} 1"#,
        r#"mcp_gateway_config_reloads_total{source="signal",result="success"} 1"#,
        r#"mcp_gateway_config_reloads_total{source="signal",result="failure"} 1"#,
        // No TLS listener: no certificate set was loaded (each reload counted one before).
        "mcp_gateway_tls_reloads_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == want),
            "no `{want}` in:\n{metrics}"
        );
    }
    for result in ["success", "failure"] {
        let prefix =
            format!(r#"mcp_gateway_config_last_reload_timestamp_seconds{{result="{result}"}} "#);
        let at: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
            .parse()
            .expect("a number");
        assert!(at > 1.7e9, "{at}");
    }
    d.stop();
}

/// `[audit]` and `[telemetry.access_log]` are taken by a reload: started, moved, and stopped,
/// and one that cannot be opened refuses the reload (the running logs go on). Before, a reload
/// that changed them said "changed audit" and left them as they were (an operator's review).
#[test]
fn audit_and_access_logs_are_started_moved_and_stopped_by_a_reload() {
    let fake =
        integration_tests::peers::FakeUpstream::start(integration_tests::peers::Misbehave::Answer);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwlogreload");
    let dir = std::env::temp_dir();
    let file = |name: &str| dir.join(format!("{instance}-{name}.jsonl"));
    let (audit1, access1, audit2, access2) = (
        file("audit1"),
        file("access1"),
        file("audit2"),
        file("access2"),
    );
    let _files = RemoveOnDrop(vec![
        audit1.clone(),
        access1.clone(),
        audit2.clone(),
        access2.clone(),
    ]);
    let base = format!(
        r#"
[gateway]
instance = "{instance}"
workers = 2
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
[[upstreams]]
name = "u0"
url = "{up}"
[[routes]]
path = "/mcp"
upstream = "u0"
"#,
        up = fake.url()
    );
    let logged = |audit: &std::path::Path, access: &std::path::Path| {
        format!(
            "{base}[audit]\npath = \"{}\"\n[telemetry.access_log]\npath = \"{}\"\n",
            audit.display(),
            access.display()
        )
    };
    let mut d = Daemon::start_local(&instance, &base);
    let reload = |config: &str| reload_file_as(&instance, admin, config);
    // Each log is flushed within about 50 ms of a line.
    let settle = || std::thread::sleep(Duration::from_millis(300));

    // Started.
    let (status, body) = reload(&logged(&audit1, &access1));
    assert_eq!(status, 200, "{body}");
    calls(port, 3);
    settle();
    assert_eq!((lines(&audit1), lines(&access1)), (3, 3));

    // Moved: the new files get the lines, the old ones no more.
    let (status, body) = reload(&logged(&audit2, &access2));
    assert_eq!(status, 200, "{body}");
    calls(port, 2);
    settle();
    assert_eq!((lines(&audit2), lines(&access2)), (2, 2));
    assert_eq!((lines(&audit1), lines(&access1)), (3, 3));

    // One that cannot be opened: refused, and the running logs go on.
    let nowhere = dir.join(format!("{instance}-none")).join("audit.jsonl");
    let (status, body) = reload(&logged(&nowhere, &access2));
    assert_ne!(status, 200, "{body}");
    calls(port, 1);
    settle();
    assert_eq!((lines(&audit2), lines(&access2)), (3, 3));

    // Stopped.
    let (status, body) = reload(&base);
    assert_eq!(status, 200, "{body}");
    calls(port, 2);
    settle();
    assert_eq!((lines(&audit2), lines(&access2)), (3, 3));
    d.stop();
}

/// `gateway check` reads and validates; it creates no file (no audit log, no histogram log).
#[test]
fn gateway_check_creates_nothing() {
    let instance = unique("gwcheck");
    let dir = std::env::temp_dir();
    let audit = dir.join(format!("{instance}-audit.jsonl"));
    let hist = dir.join(format!("{instance}.hlog"));
    let path = dir.join(format!("{instance}.toml"));
    let _files = RemoveOnDrop(vec![audit.clone(), hist.clone(), path.clone()]);
    std::fs::write(
        &path,
        logged_config(
            &instance,
            free_port(),
            free_port(),
            "http://127.0.0.1:9/mcp",
            &audit.display().to_string(),
            &hist.display().to_string(),
        ),
    )
    .expect("write config");
    let out = Command::new(gateway_bin())
        .arg("check")
        .arg(&path)
        .output()
        .expect("run gateway check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!audit.exists(), "check created the audit log");
    assert!(!hist.exists(), "check created the histogram log");
}

/// The gateway out of file descriptors says so: a call that needs a new upstream connection
/// gets 503 with the gateway's own JSON-RPC error (`reason: out_of_descriptors`), not a 502
/// that blames the upstream; the upstream's breaker and failure count are untouched; the WARN
/// lines are rate limited; accepting backs off and resumes once descriptors are free again.
#[test]
fn out_of_descriptors_is_a_503_of_the_gateway_not_an_upstream_failure() {
    use integration_tests::peers::{FakeUpstream, Misbehave, post, read_response};
    use std::io::Write;

    let up = FakeUpstream::start(Misbehave::Answer);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwemfile");
    const LIMIT: u64 = 96;
    let mut d = Daemon::start_local_with_open_files(
        &instance,
        &config(&instance, port, admin, up.port),
        (LIMIT, LIMIT),
    );
    let base = fds(d.pid());
    assert!(
        (base as u64) < LIMIT - 8,
        "the test needs room above the {base} descriptors the gateway holds at start"
    );

    // A connection accepted while descriptors are free; the call on it comes later.
    let mut held = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fds(d.pid()) <= base && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }

    // Then a flood that takes every descriptor left (the kernel completes the handshakes; the
    // gateway accepts until it runs out, and the rest wait in the queue).
    let flood: Vec<std::net::TcpStream> = (0..2 * LIMIT)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (fds(d.pid()) as u64) < LIMIT && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // (The count may pass the limit by one: a descriptor the kernel gives the process without
    // a new number checked against it.)
    assert!(
        fds(d.pid()) as u64 >= LIMIT,
        "the flood took every descriptor"
    );

    const CALLS: usize = 20;
    for i in 0..CALLS {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"add","arguments":{{}}}}}}"#
        );
        held.write_all(&post("/mcp", &body, "")).expect("send");
        let r = read_response(&mut held).expect("an answer, not a hang or a close");
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 503, "{text}");
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON-RPC error");
        assert_eq!(v["id"], i, "{text}");
        assert_eq!(v["error"]["data"]["reason"], "out_of_descriptors", "{text}");
        assert!(
            !text.contains("upstream `"),
            "the upstream is not blamed: {text}"
        );
    }
    drop(flood);

    // Descriptors free again: new connections are accepted and served.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let served = loop {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{}}}"#;
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            if s.write_all(&post("/mcp", body, "connection: close\r\n"))
                .is_ok()
                && let Some(r) = read_response(&mut s)
                && r.status == 200
            {
                break true;
            }
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(served, "accepting resumed once descriptors were free");

    let metrics = admin_get(admin, "/metrics");
    let counted = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        counted("mcp_gateway_out_of_descriptors_total") >= CALLS as f64,
        "every refusal counted: {metrics}"
    );
    assert_eq!(
        counted("mcp_gateway_upstream_failures_total{upstream=\"demo\"}"),
        0.0,
        "nothing held against the upstream"
    );
    d.stop();
    let warned = d
        .log()
        .lines()
        .filter(|l| l.contains("out of file descriptors"))
        .count();
    assert!(
        (1..=8).contains(&warned),
        "{warned} WARN lines for {CALLS} refused calls and the refused accepts: rate limited, \
         with a count of what was suppressed"
    );
}

/// The admin API cannot be made to take the process's file descriptors, which the data plane
/// shares: it holds at most 128 connections (one more is closed as it is accepted), closes one
/// that sends no request head within 10 s (idle keep-alive included), and answers 408 to a
/// body that does not arrive within 10 s. Before, every connection was kept for as long as its
/// client liked: idle ones to the admin port took every descriptor and the MCP listener could
/// accept nothing. Nor can one address hold all 128: it keeps 16, and the others are still
/// served (before, one client's idle connections kept every scrape and health check out).
#[test]
fn idle_admin_connections_cannot_take_the_data_planes_descriptors() {
    use integration_tests::peers::{FakeUpstream, Misbehave, post, read_response};
    use std::io::{Read, Write};

    let up = FakeUpstream::start(Misbehave::Answer);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwadmincap");
    const LIMIT: u64 = 256;
    const CAP: usize = 128;
    let mut d = Daemon::start_local_with_open_files(
        &instance,
        &config(&instance, port, admin, up.port),
        (LIMIT, LIMIT),
    );
    let base = fds(d.pid());
    assert!(
        (base + CAP) as u64 + 16 < LIMIT,
        "the test needs room for the admin API's {CAP} connections above the {base} descriptors \
         the gateway holds at start"
    );
    let call = |extra: &str| -> Option<u16> {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{}}}"#;
        let mut s = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(2),
        )
        .ok()?;
        s.write_all(&post("/mcp", body, extra)).ok()?;
        read_response(&mut s).map(|r| r.status)
    };
    assert_eq!(call("connection: close\r\n"), Some(200));

    let admin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    // A connection to the admin port from 127.0.0.`last`.
    let connect_from = |last: u8| {
        integration_tests::daemon::connect_from(
            std::net::Ipv4Addr::new(127, 0, 0, last).into(),
            admin_addr,
            Duration::from_secs(1),
        )
    };
    // Whether the gateway ended `s` (within `wait`), rather than keeping it open.
    let closed = |s: &mut std::net::TcpStream, wait: Duration| -> bool {
        s.set_read_timeout(Some(wait)).ok();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(_n) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };

    // One address: 16 connections kept (a new one takes the place of its address's idle
    // longest, so that idle connections cannot keep its next client out); another address
    // served.
    const PER_ADDRESS: usize = 16;
    let mut one: Vec<_> = (0..PER_ADDRESS + 4)
        .map(|_| connect_from(2).expect("connect from 127.0.0.2"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let shut = one
        .iter_mut()
        .map(|s| closed(s, Duration::from_millis(300)))
        .filter(|c| *c)
        .count();
    assert_eq!(
        shut,
        4,
        "of {} idle connections from one address, all but {PER_ADDRESS} closed",
        PER_ADDRESS + 4
    );
    assert!(
        admin_get(admin, "/healthz").starts_with("ok"),
        "another address is served while one holds its {PER_ADDRESS}"
    );
    drop(one);
    std::thread::sleep(Duration::from_millis(200));

    // A request whose body never comes, then far more idle connections than the cap, from
    // more addresses than it takes to fill it.
    let mut slow = std::net::TcpStream::connect(admin_addr).expect("connect");
    let slow_at = std::time::Instant::now();
    slow.write_all(
        b"POST /reload HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{",
    )
    .expect("send");
    let mut idle = Vec::new();
    for i in 0..2 * LIMIT {
        match connect_from(10 + (i / PER_ADDRESS as u64) as u8) {
            Some(s) => idle.push(s),
            // The accept queue full: the gateway took no more (as it did before).
            None => break,
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let held = fds(d.pid());
    assert!(
        held <= base + CAP + 8,
        "{held} descriptors held with {} admin connections open ({base} at start, at most {CAP} \
         admin connections kept)",
        idle.len()
    );
    for _ in 0..5 {
        assert_eq!(
            call("connection: close\r\n"),
            Some(200),
            "the MCP listener still accepts and serves"
        );
    }
    // With every place held by idle connections, a health check is served at once: the
    // connection idle longest makes room for it (before, it was closed for the next 10 s).
    for _ in 0..3 {
        assert!(
            admin_get(admin, "/healthz").starts_with("ok"),
            "a health check while idle connections hold every place"
        );
    }

    // The body's wait ends in a 408 (its connection holds one of the slots).
    let r = read_response(&mut slow).expect("an answer to the slow body");
    assert_eq!(r.status, 408, "{}", String::from_utf8_lossy(&r.body));
    let waited = slow_at.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(20),
        "after about 10 s: {waited:?}"
    );

    // Every idle connection ends: closed as it came, or after 10 s without a request head.
    for s in &mut idle {
        assert!(
            closed(s, Duration::from_secs(15)),
            "an idle admin connection was kept open"
        );
    }
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fds(d.pid()) > base + 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        admin_get(admin, "/healthz").starts_with("ok"),
        "the admin API serves again"
    );
    let log = d.log();
    assert!(
        log.contains("128 connections are open; the one idle longest is closed for a new one")
            && log.contains("are open from one address (admin.max_connections_per_address)"),
        "making room and refusing by address are both said"
    );
    d.stop();
}

/// An admin client that pipelines requests and never reads the answers is cut off once an
/// answer has waited 10 s for room: before, hyper read no next request while an answer waited
/// to be written, so no timeout ran and the connection stayed for as long as its client liked
/// (a review held all 128 places so, without a token, from 8 addresses).
#[test]
fn an_admin_client_that_never_reads_its_answers_is_cut_off() {
    use integration_tests::peers::FakeUpstream;
    use std::io::{Read, Write};

    let up = FakeUpstream::start(integration_tests::peers::Misbehave::Answer);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwadminread");
    let mut d = Daemon::start_local(&instance, &config(&instance, port, admin, up.port));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .connect(&std::net::SocketAddr::from(([127, 0, 0, 1], admin)).into())
        .unwrap();
    let mut s: std::net::TcpStream = socket.into();
    // Far more answers than the socket buffers hold (each /metrics answer is kilobytes).
    const SENT: usize = 2_000;
    let request = b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".repeat(SENT);
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&request);
    // Not read for 15 s; then everything the connection still gives.
    std::thread::sleep(Duration::from_secs(15));
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection was neither closed nor finished: {e}"),
        }
    }
    let answers = memchr_count(&got, b"HTTP/1.1 200");
    assert!(
        answers < SENT,
        "the connection was cut off: {answers} of {SENT} answers were written"
    );
    assert!(admin_get(admin, "/healthz").starts_with("ok"));
    d.stop();
}

/// Writes `config` as test instance `instance`'s configuration file and has the gateway's
/// admin API (`admin`) reload it: the answer's status and body.
fn reload_file_as(instance: &str, admin: u16, config: &str) -> (u16, String) {
    std::fs::write(
        std::env::temp_dir().join(format!("{instance}.toml")),
        integration_tests::daemon::with_state(instance, config),
    )
    .expect("write config");
    let (r, _) = integration_tests::peers::raw(
        admin,
        b"POST /reload HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    );
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// How many times `needle` occurs in `hay`.
fn memchr_count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// A reload that gives a kept tenant another id, or a tenant's id to another tenant, is
/// refused (the running configuration kept): open connections are counted under the id they
/// were taken with and given back under it. Before, a reload swapping two tenants' ids was
/// taken, and the connections one tenant held were charged to the other, locked out at its cap
/// while it held none (an operator's review). A tenant added with a new id is taken.
#[test]
fn a_reload_that_moves_a_tenants_id_is_refused() {
    let fake =
        integration_tests::peers::FakeUpstream::start(integration_tests::peers::Misbehave::Answer);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwtenantid");
    let config = |tenants: &[(&str, u32)]| {
        // Each tenant but the default has the loopback /24 of its id (127.0.<id>.0/24).
        let tables: String = tenants
            .iter()
            .map(|(name, id)| {
                let sources = if *name == "acme" {
                    String::new()
                } else {
                    format!("sources = [\"127.0.{id}.0/24\"]\n")
                };
                format!("[[tenants]]\nname = \"{name}\"\nid = {id}\n{sources}")
            })
            .collect();
        format!(
            "{}default_tenant = \"acme\"\n[[upstreams]]\nname = \"u0\"\nurl = \"{}\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"u0\"\n{tables}",
            integration_tests::daemon::local_header(&instance, 1, port, admin),
            fake.url()
        )
    };
    let mut d = Daemon::start_local(&instance, &config(&[("acme", 1), ("globex", 2)]));
    let reload = |tenants: &[(&str, u32)]| reload_file_as(&instance, admin, &config(tenants));
    for (tenants, says) in [
        (&[("acme", 2), ("globex", 1)][..], "changed its id from"),
        (
            &[("acme", 1), ("initech", 2)][..],
            "tenant id 2 was `globex`'s and is `initech`'s now",
        ),
    ] {
        let (status, body) = reload(tenants);
        assert_eq!(status, 422, "{tenants:?}: {body}");
        assert!(body.contains(says), "{tenants:?}: {body}");
    }
    let (status, body) = reload(&[("acme", 1), ("globex", 2), ("initech", 3)]);
    assert_eq!(status, 200, "{body}");
    // A client of globex's holds a connection; globex is removed (its client is acme's now),
    // and its id is not another's while that connection, counted under it, is open.
    let mut held = integration_tests::daemon::loopback_from("127.0.2.9", port).expect("connect");
    std::io::Write::write_all(&mut held, b"GET /nowhere HTTP/1.1\r\nhost: gw\r\n\r\n").unwrap();
    assert_eq!(
        integration_tests::peers::read_response(&mut held).map(|r| r.status),
        Some(404)
    );
    let (status, body) = reload(&[("acme", 1), ("initech", 3)]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = reload(&[("acme", 1), ("hooli", 2), ("initech", 3)]);
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("tenant `hooli` takes id 2 under which 1 connections"),
        "{body}"
    );
    // globex itself may come back (the connections are its own), and go again.
    let (status, body) = reload(&[("acme", 1), ("globex", 2), ("initech", 3)]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = reload(&[("acme", 1), ("initech", 3)]);
    assert_eq!(status, 200, "{body}");
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = reload(&[("acme", 1), ("hooli", 2), ("initech", 3)]);
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    d.stop();
}
