//! `cargo xtask run`, the newcomer's first command: stopping it stops everything it started
//! (the gateway, the demo upstream, the XDP program on `lo`), however it is stopped.

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::daemon::alive;
use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};

/// The xtask program: `XTASK_BIN` (set by `cargo xtask test`), else cargo's debug build.
fn xtask_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XTASK_BIN") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xtask");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask test`",
        p.display()
    );
    p
}

/// The processes `pid` started.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// The status of a GET to the admin listener, if it answers.
fn status(port: u16, path: &str) -> Option<u16> {
    use std::io::Write as _;
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    integration_tests::peers::read_response(&mut s).map(|r| r.status)
}

fn xdp_on_lo() -> bool {
    let out = Command::new("ip")
        .args(["-d", "link", "show", "dev", "lo"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

/// `cargo xtask run` (what it runs after building), in its own process group as a shell runs
/// a foreground job, with the gateway and the demo upstream serving. Killed on drop.
struct Run {
    child: Child,
    started: Vec<u32>,
}

impl Run {
    fn start() -> Self {
        for port in [8080, 9100, 9181] {
            assert!(
                !listening(port),
                "port {port} is taken: the test needs the defaults"
            );
        }
        let mut cmd = Command::new(xtask_bin());
        cmd.args(["run", "--no-build"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("start xtask run");
        let mut run = Run {
            child,
            started: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            run.started = children(run.child.id());
            let ready = status(9181, "/readyz") == Some(200);
            if ready && run.started.len() == 2 && listening(8080) && listening(9100) {
                break;
            }
            if let Ok(Some(s)) = run.child.try_wait() {
                panic!("xtask run exited at start: {s}");
            }
            assert!(Instant::now() < deadline, "xtask run did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(xdp_on_lo(), "the gateway attached its program to lo");
        run
    }

    /// Everything it started is gone: processes, listeners, the XDP program.
    fn assert_all_gone(&mut self, how: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.started.iter().any(|p| alive(*p)) || listening(8080) || listening(9100) {
            assert!(
                Instant::now() < deadline,
                "{how}: still running: {:?}",
                self.started
                    .iter()
                    .filter(|p| alive(**p))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!xdp_on_lo(), "{how}: the XDP program was left on lo");
        let _ = self.child.wait();
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let pgid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pgid, Signal::SIGKILL);
        for p in &self.started {
            let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
        }
        let _ = self.child.wait();
        // A killed gateway leaves its pinned link on lo, a stopped one its pinned maps: remove
        // the default instance's pins for whatever runs next.
        let _ = Command::new(integration_tests::daemon::gateway_bin())
            .args(["kernel", "--instance", "mcp-gateway", "reset"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Ctrl-C in the terminal (SIGINT to the whole foreground group), SIGTERM to xtask alone (a
/// `kill`, a supervisor), and xtask killed outright: each time the gateway drains and goes,
/// the demo upstream goes, and nothing is left listening or attached.
#[test]
fn stopping_xtask_run_stops_the_gateway_and_the_demo_upstream() {
    let mut run = Run::start();
    killpg(Pid::from_raw(run.child.id() as i32), Signal::SIGINT).expect("SIGINT");
    run.assert_all_gone("Ctrl-C");
    drop(run);

    let mut run = Run::start();
    kill(Pid::from_raw(run.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    run.assert_all_gone("SIGTERM to xtask");
    drop(run);

    let mut run = Run::start();
    kill(Pid::from_raw(run.child.id() as i32), Signal::SIGKILL).expect("SIGKILL");
    run.assert_all_gone("xtask killed");
}
