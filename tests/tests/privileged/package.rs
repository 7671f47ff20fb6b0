//! The Debian package as an operator meets it: lintian clean, its units pass `systemd-analyze
//! verify`, `dpkg -i` makes the service user and the bpffs folder, the unit's exact command line
//! run as that user with exactly the unit's capabilities (as systemd would: `setpriv`, the
//! unit's directories in the environment, a notify socket) tells readiness once it listens and
//! the XDP program is attached, pings the watchdog and serves the Python SDK's client; without
//! one of the capabilities it names that one; `dpkg --purge` leaves no user, folder or unit.
//! systemd is not PID 1 in the test container, so the unit itself is not started.
//!
//! The .deb: `MCP_GATEWAY_DEB` (set by `cargo xtask test`), else the one `cargo xtask package`
//! left in target/debian/.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    os::unix::{fs::MetadataExt as _, net::UnixDatagram, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::connect_from,
    netns::{GW_ADDR, Topology, enter_before_exec, in_netns},
    peers::{KillOnDrop, PyServer, free_port, py_client},
    require_root, unique,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const UNIT: &str = "/usr/lib/systemd/system/mcp-gateway.service";
const TEMPLATE: &str = "/usr/lib/systemd/system/mcp-gateway@.service";
const CONFIG: &str = "/etc/mcp-gateway/gateway.toml";

fn deb() -> PathBuf {
    if let Some(p) = std::env::var_os("MCP_GATEWAY_DEB") {
        return p.into();
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    std::fs::read_dir(&dir)
        .ok()
        .and_then(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
        })
        .unwrap_or_else(|| {
            panic!(
                "no .deb in {}: run `cargo xtask package` (or set MCP_GATEWAY_DEB)",
                dir.display()
            )
        })
}

/// The package installed; purged on drop, also when the test fails.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "mcp-gateway"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{text}",
        out.status
    );
    text
}

/// The values of `key` in the unit's `[Service]` section, each split on whitespace.
fn service_values(unit: &str, key: &str) -> Vec<String> {
    let mut in_service = false;
    let mut values = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            values.extend(v.split_whitespace().map(str::to_owned));
        }
    }
    values
}

fn id_of(db: &str, name: &str) -> Option<u32> {
    let out = Command::new("getent").args([db, name]).output().ok()?;
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split(':').nth(2)?.parse().ok()
}

/// Bits of the named capabilities (`CAP_BPF` …), as in `/proc/<pid>/status`.
fn cap_mask(names: &[String]) -> u64 {
    names
        .iter()
        .map(|n| match n.as_str() {
            "CAP_NET_BIND_SERVICE" => 10,
            "CAP_NET_ADMIN" => 12,
            "CAP_SYS_RESOURCE" => 24,
            "CAP_PERFMON" => 38,
            "CAP_BPF" => 39,
            other => panic!("capability {other} not known to this test"),
        })
        .fold(0, |m, bit| m | (1 << bit))
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// The pid of `gateway`'s first child process (its stdio server), waited for.
fn stdio_child(gateway: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let children = std::fs::read_dir(format!("/proc/{gateway}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|c| {
                c.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .next();
        if let Some(child) = children {
            return child;
        }
        assert!(Instant::now() < deadline, "no stdio child of the gateway");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The unit's `ExecStart=` run as systemd would run it: as `User=`/`Group=` with exactly the
/// capability sets and `NoNewPrivileges=` the unit names (`setpriv`), `LimitNOFILE=`, a clean
/// environment with the directories' variables and a notify socket, in namespace `ns`.
fn as_the_unit(unit: &str, caps: &[String], ns: &str, notify: &Path, log: &Path) -> Command {
    let exec: Vec<String> = service_values(unit, "ExecStart");
    let user = service_values(unit, "User").concat();
    let group = service_values(unit, "Group").concat();
    let set = std::iter::once("-all".to_owned())
        .chain(
            caps.iter()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={user}"))
        .arg(format!("--regid={group}"))
        .arg("--init-groups")
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"));
    if service_values(unit, "NoNewPrivileges") == ["yes"] {
        cmd.arg("--no-new-privs");
    }
    cmd.arg("--").args(&exec);
    let dir = |key: &str, root: &str| format!("{root}/{}", service_values(unit, key).concat());
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("RUNTIME_DIRECTORY", dir("RuntimeDirectory", "/run"))
        .env("STATE_DIRECTORY", dir("StateDirectory", "/var/lib"))
        .env("LOGS_DIRECTORY", dir("LogsDirectory", "/var/log"))
        .env("NOTIFY_SOCKET", notify)
        // The unit's WatchdogSec= is 30 s; 2 s here, to see pings within the test.
        .env("WATCHDOG_USEC", "2000000");
    let unit_nofile: libc::rlim_t = service_values(unit, "LimitNOFILE")
        .concat()
        .parse()
        .expect("LimitNOFILE= is a number");
    // The test container may not raise its own hard limit (no CAP_SYS_RESOURCE here, unlike
    // systemd on a host): the unit's figure, or the most this machine allows.
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) };
    let nofile = unit_nofile.min(hard.rlim_max);
    // SAFETY: setrlimit is async-signal-safe; the closure calls nothing else.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    enter_before_exec(&mut cmd, ns);
    let log = std::fs::File::create(log).expect("log file");
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log);
    cmd
}

/// Reads notify messages until one has `line`; panics (with the log) if the gateway exits or
/// `timeout` passes.
fn wait_notify(
    socket: &UnixDatagram,
    seen: &mut Vec<String>,
    line: &str,
    gateway: &mut KillOnDrop,
    log: &Path,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while !seen.iter().any(|l| l == line) {
        if let Ok(Some(status)) = gateway.0.try_wait() {
            panic!(
                "the gateway exited ({status}) before {line}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {line} within {timeout:?} (got {seen:?}):\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        if let Ok(n) = socket.recv(&mut buf) {
            seen.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned),
            );
        }
    }
}

#[test]
fn package_installs_serves_as_the_service_user_and_purges() {
    require_root();
    let deb = deb();
    run(Command::new("lintian")
        .args([
            "--fail-on",
            "error,warning,info,pedantic",
            "-I",
            "--pedantic",
        ])
        .arg(&deb));

    // A package left by an interrupted run goes first.
    drop(Installed);
    let installed = Installed;
    run(Command::new("dpkg").arg("-i").arg(&deb));
    let uid = id_of("passwd", "mcp-gateway").expect("postinst made the mcp-gateway user");
    let gid = id_of("group", "mcp-gateway").expect("postinst made the mcp-gateway group");
    let passwd = run(Command::new("getent").args(["passwd", "mcp-gateway"]));
    assert!(passwd.trim_end().ends_with("/usr/sbin/nologin"), "{passwd}");
    assert!(uid < 1000, "a system user: {passwd}");
    let bpffs = std::fs::metadata("/sys/fs/bpf/mcp-gateway").expect("the bpffs folder exists");
    assert_eq!(
        (bpffs.uid(), bpffs.gid()),
        (uid, gid),
        "bpffs folder's owner"
    );
    let config = std::fs::metadata(CONFIG).expect("the configuration is installed");
    assert_eq!(
        (config.uid(), config.gid(), config.mode() & 0o777),
        (0, gid, 0o640)
    );
    assert!(
        run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "mcp-gateway"]))
            .contains(CONFIG),
        "the configuration is a conffile"
    );
    for path in [
        "/usr/share/mcp-gateway/grafana/mcp-gateway.json",
        "/usr/share/mcp-gateway/prometheus/alerts.yml",
        "/usr/share/man/man1/mcp-gateway.1.gz",
        "/usr/share/man/man1/mcp-gateway-run.1.gz",
        "/usr/share/bash-completion/completions/mcp-gateway",
        "/etc/logrotate.d/mcp-gateway",
        "/usr/lib/tmpfiles.d/mcp-gateway.conf",
    ] {
        assert!(Path::new(path).exists(), "{path} is installed");
    }
    // The shipped configuration is valid as it stands (as the service user: what it reads).
    run(Command::new("setpriv")
        .args([
            "--reuid=mcp-gateway",
            "--regid=mcp-gateway",
            "--init-groups",
        ])
        .args(["/usr/bin/mcp-gateway", "check", CONFIG]));

    for unit in ["mcp-gateway.service", "mcp-gateway@edge-1.service"] {
        let out = run(Command::new("systemd-analyze").args(["verify", unit]));
        assert!(
            !out.contains("mcp-gateway"),
            "systemd-analyze verify {unit}: {out}"
        );
    }
    let unit = std::fs::read_to_string(UNIT).expect("the unit is installed");
    let template = std::fs::read_to_string(TEMPLATE).expect("the template unit is installed");
    assert_eq!(service_values(&unit, "Type"), ["notify"]);
    assert_eq!(
        service_values(&template, "ExecStart"),
        [
            "/usr/bin/mcp-gateway",
            "run",
            "--config",
            "/etc/mcp-gateway/%i.toml"
        ]
    );
    let caps = service_values(&unit, "AmbientCapabilities");
    assert_eq!(
        caps.iter().collect::<BTreeSet<_>>(),
        service_values(&unit, "CapabilityBoundingSet")
            .iter()
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(
        service_values(&unit, "ExecStart"),
        ["/usr/bin/mcp-gateway", "run", "--config", CONFIG]
    );

    // The operator's edit of the shipped file: the interface clients arrive on, the listener's
    // address, the upstream. Everything else as shipped.
    let topo = Topology::new(&[CLIENT]);
    let server = in_netns(&topo.gw, || PyServer::start_on(free_port(), &[]));
    let port = in_netns(&topo.gw, free_port);
    let admin = in_netns(&topo.gw, free_port);
    let instance = unique("pkg");
    let shipped = std::fs::read_to_string(CONFIG).expect("read the configuration");
    let edited = shipped
        .replace("instance = \"main\"", &format!("instance = \"{instance}\""))
        .replace(
            "interfaces = [\"lo\"]",
            &format!("interfaces = [\"{}\"]", topo.gw_if),
        )
        .replace("127.0.0.1:8080", &format!("{GW_ADDR}:{port}"))
        .replace("127.0.0.1:9181", &format!("127.0.0.1:{admin}"))
        .replace("127.0.0.1:9100", &format!("127.0.0.1:{}", server.port));
    // And a stdio server beside it, as the shipped file's comment suggests (npm's reference
    // server, which the service user may run).
    let edited = format!(
        "{edited}\n[[upstreams]]\nname = \"child\"\ncommand = [\"/usr/bin/node\", \"{}/../.tools/node/node_modules/@modelcontextprotocol/server-everything/dist/index.js\", \"stdio\"]\n\
         [[routes]]\npath = \"/child\"\nupstream = \"child\"\n",
        env!("CARGO_MANIFEST_DIR"),
    );
    assert_ne!(edited, shipped);
    std::fs::write(CONFIG, edited).expect("write the configuration");

    // What systemd makes before it starts the unit: its RuntimeDirectory= (the others are made
    // by the postinst and checked above).
    std::fs::create_dir_all("/run/mcp-gateway").expect("runtime directory");
    std::os::unix::fs::chown("/run/mcp-gateway", Some(uid), Some(gid)).expect("chown");

    let scratch = std::env::temp_dir().join(unique("pkg-notify"));
    std::fs::create_dir_all(&scratch).expect("scratch folder");
    let notify_path = scratch.join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    std::fs::set_permissions(
        &scratch,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    std::fs::set_permissions(
        &notify_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let log = scratch.join("gateway.log");

    let mut gateway = KillOnDrop(
        as_the_unit(&unit, &caps, &topo.gw, &notify_path, &log)
            .spawn()
            .expect("start the unit's command"),
    );
    let pid = gateway.0.id();
    let mut seen = Vec::new();
    wait_notify(
        &notify,
        &mut seen,
        "READY=1",
        &mut gateway,
        &log,
        Duration::from_secs(60),
    );
    // Ready means listening with the program attached: neither is waited for here.
    assert!(
        topo.gw_link().contains("xdp"),
        "XDP attached at READY=1: {}",
        topo.gw_link()
    );
    let dst = SocketAddr::new(GW_ADDR.into(), port);
    assert!(
        in_netns(&topo.client, || connect_from(
            CLIENT.into(),
            dst,
            Duration::from_secs(2)
        ))
        .is_some(),
        "the listener accepts at READY=1"
    );
    // It runs as the service user with exactly the unit's capabilities, nothing more.
    assert_eq!(
        status_field(pid, "Uid:")
            .split_whitespace()
            .collect::<Vec<_>>(),
        vec![uid.to_string(); 4]
    );
    let eff = u64::from_str_radix(&status_field(pid, "CapEff:"), 16).expect("CapEff");
    assert_eq!(eff, cap_mask(&caps), "effective capabilities");
    assert_eq!(
        u64::from_str_radix(&status_field(pid, "CapBnd:"), 16).expect("CapBnd"),
        cap_mask(&caps),
        "bounding set"
    );

    // The watchdog: pings every WATCHDOG_USEC / 2 while every worker serves.
    let pings_before = seen.iter().filter(|l| *l == "WATCHDOG=1").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while seen.iter().filter(|l| *l == "WATCHDOG=1").count() < pings_before + 2 {
        assert!(Instant::now() < deadline, "watchdog pings: {seen:?}");
        if let Ok(n) = notify.recv(&mut buf) {
            seen.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned),
            );
        }
    }

    // A real MCP client through it, from the client namespace.
    let url = format!("http://{GW_ADDR}:{port}/mcp");
    let out = in_netns(&topo.client, || py_client(&url, "legacy"));
    assert_eq!(out["echo"], "héllo ✓", "{out}");
    assert_eq!(out["add"], "42", "{out}");
    // What it made is the service user's: the pins, the state store, the lock, the audit log.
    let pins = Path::new("/sys/fs/bpf/mcp-gateway").join(&instance);
    let state = Path::new("/var/lib/mcp-gateway").join(&instance);
    let lock = Path::new("/run/mcp-gateway").join(format!("{instance}.lock"));
    for path in [&pins, &state, &lock] {
        let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(m.uid(), uid, "{} owned by the service user", path.display());
    }
    let audit = std::fs::metadata("/var/log/mcp-gateway/audit.jsonl").expect("audit log");
    assert_eq!(
        (audit.uid(), audit.mode() & 0o777),
        (uid, 0o640),
        "audit log"
    );

    // logrotate with the shipped snippet, as cron would run it: the file moved, a new one made
    // as `create` says. Its postrotate (`systemctl kill -s USR1`) needs systemd: the signal is
    // sent here as it would send it. Lines after that go to the new file, none to the old.
    let current = Path::new("/var/log/mcp-gateway/audit.jsonl");
    let rotated = Path::new("/var/log/mcp-gateway/audit.jsonl.1");
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let before = len(current);
    assert!(before > 0, "the client's calls are in the audit log");
    run(Command::new("logrotate")
        .arg("-f")
        .arg("-s")
        .arg(scratch.join("logrotate.state"))
        .arg("/etc/logrotate.d/mcp-gateway"));
    assert_eq!(len(rotated), before, "moved aside");
    let adm = id_of("group", "adm").expect("the adm group");
    let fresh = std::fs::metadata(current).expect("logrotate created the new file");
    assert_eq!(
        (fresh.uid(), fresh.gid(), fresh.mode() & 0o777, fresh.len()),
        (uid, adm, 0o640, 0)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("SIGUSR1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("log files reopened")
    {
        assert!(Instant::now() < deadline, "no reopen after SIGUSR1");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = in_netns(&topo.client, || py_client(&url, "2026-07-28"));
    assert_eq!(out["add"], "42", "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while len(current) == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing written to the new audit log"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(len(rotated), before, "nothing more in the rotated file");

    // The stdio server serves it too, and runs with none of the gateway's capabilities:
    // ambient capabilities pass through execve to a child of the same user unless cleared.
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let listed = in_netns(&topo.client, || {
        let mut s = std::net::TcpStream::connect(dst).expect("connect");
        std::io::Write::write_all(
            &mut s,
            &integration_tests::peers::post(
                "/child",
                list,
                "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\n",
            ),
        )
        .expect("send");
        integration_tests::peers::read_response(&mut s).expect("an answer")
    });
    assert_eq!(
        listed.status,
        200,
        "{}",
        String::from_utf8_lossy(&listed.body)
    );
    assert!(
        listed.json()["result"]["tools"]
            .as_array()
            .is_some_and(|t| !t.is_empty()),
        "{}",
        String::from_utf8_lossy(&listed.body)
    );
    let child = stdio_child(pid);
    for field in ["CapAmb:", "CapPrm:", "CapEff:", "CapInh:"] {
        let set = u64::from_str_radix(&status_field(child, field), 16).expect(field);
        assert_eq!(set, 0, "the stdio child's {field} {set:x}");
    }

    // SIGTERM (systemctl stop): STOPPING=1, then a clean exit.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    wait_notify(
        &notify,
        &mut seen,
        "STOPPING=1",
        &mut gateway,
        &log,
        Duration::from_secs(20),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = gateway.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the gateway did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "clean stop: {status}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // Without CAP_PERFMON the start fails, and the error names exactly that one.
    let fewer: Vec<String> = caps
        .iter()
        .filter(|c| *c != "CAP_PERFMON")
        .cloned()
        .collect();
    let log2 = scratch.join("gateway-fewer.log");
    let mut short = KillOnDrop(
        as_the_unit(&unit, &fewer, &topo.gw, &notify_path, &log2)
            .spawn()
            .expect("start without CAP_PERFMON"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = short.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "a start without CAP_PERFMON did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("missing from the effective set: CAP_PERFMON)"),
        "the error names the missing capability: {text}"
    );

    drop(short);

    // A listener on a privileged port, which the unit grants no capability for: the error says
    // which one would.
    let shipped_edit = std::fs::read_to_string(CONFIG).expect("read the configuration");
    std::fs::write(
        CONFIG,
        shipped_edit.replace(&format!("{GW_ADDR}:{port}"), &format!("{GW_ADDR}:443")),
    )
    .expect("write the configuration");
    let log3 = scratch.join("gateway-443.log");
    let mut low = KillOnDrop(
        as_the_unit(&unit, &caps, &topo.gw, &notify_path, &log3)
            .spawn()
            .expect("start on :443"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = low.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "a start on :443 did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log3).unwrap_or_default();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("ports below 1024 need CAP_NET_BIND_SERVICE"),
        "the error names the capability a low port needs: {text}"
    );

    drop(low);
    drop(gateway);
    drop(server);
    drop(topo);
    let _ = std::fs::remove_dir_all(&scratch);

    // Purge: nothing of the package is left. (/run/mcp-gateway is removed too, but other
    // gateways run as root on this machine may make it again at any moment: not checked.)
    run(Command::new("dpkg").args(["--purge", "mcp-gateway"]));
    assert_eq!(id_of("passwd", "mcp-gateway"), None, "user removed");
    assert_eq!(id_of("group", "mcp-gateway"), None, "group removed");
    for path in [
        "/sys/fs/bpf/mcp-gateway",
        "/var/lib/mcp-gateway",
        "/var/log/mcp-gateway",
        "/etc/mcp-gateway",
        UNIT,
        TEMPLATE,
        "/usr/bin/mcp-gateway",
        "/etc/systemd/system/multi-user.target.wants/mcp-gateway.service",
    ] {
        assert!(
            std::fs::symlink_metadata(path).is_err(),
            "{path} is gone after purge"
        );
    }
    drop(installed);
}
