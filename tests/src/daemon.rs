//! The real `gateway` binary, run inside a network namespace, with its log kept for
//! the failure message. Dropping it kills the process and removes its pins.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// What a daemon is started with, as a service manager would set it up before the exec.
#[derive(Default)]
struct Before {
    /// Open-file limits `(soft, hard)`.
    open_files: Option<(u64, u64)>,
    /// The only CPUs it may run on.
    cpus: Option<Vec<usize>>,
}

pub struct Daemon {
    child: Option<Child>,
    pub pin_dir: PathBuf,
    log: PathBuf,
    config: PathBuf,
    /// The state store's folder the test harness gave this run (kept across restarts,
    /// removed on drop).
    state: PathBuf,
}

/// The head of a test configuration: the instance, `workers` workers, a listener on
/// `127.0.0.1:{port}`, the admin API on `127.0.0.1:{admin}`, and no kernel program (its
/// `[kernel]` table is last, so more of its keys may follow).
pub fn local_header(instance: &str, workers: usize, port: u16, admin: u16) -> String {
    format!(
        "[gateway]\ninstance = \"{instance}\"\nworkers = {workers}\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\
         [admin]\naddress = \"127.0.0.1:{admin}\"\n[kernel]\nenabled = false\n"
    )
}

/// What a started gateway logs once its data plane runs: [`Daemon`]'s starts wait for it.
const RUNNING: &str = "data plane running";

/// The state store's folder of a test instance: a fresh one in the temporary folder, so that no
/// run inherits another's budgets and pins (a configuration with its own `[state]` keeps it).
pub fn state_dir(instance: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{instance}.state"))
}

/// `config` with the harness's `[state]` section (unless it has its own): what a test writes
/// for a reload must name the same state folder, which cannot change without a restart.
pub fn with_state(instance: &str, config: &str) -> String {
    if config.lines().any(|l| l.trim() == "[state]") {
        config.to_owned()
    } else {
        format!(
            "{config}\n[state]\npath = \"{}\"\n",
            state_dir(instance).display()
        )
    }
}

/// A memory figure of process `pid` from `/proc/<pid>/status`, in KiB: `VmRSS` (now) or
/// `VmHWM` (its peak).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Whether process `pid` runs: a zombie (exited, not yet reaped by whoever inherited it) does
/// not.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Path of the daemon under test: `GATEWAY_BIN` (set by `cargo xtask test`), else the release build.
pub fn gateway_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GATEWAY_BIN") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/gateway");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask test`",
        p.display()
    );
    p
}

impl Daemon {
    /// Starts the gateway in `ns` with `config` (TOML) and waits until it serves.
    pub fn start(ns: &str, instance: &str, config: &str) -> Self {
        Self::start_with_env(ns, instance, config, &[])
    }

    /// As [`Daemon::start`], with extra environment variables for the daemon.
    pub fn start_with_env(ns: &str, instance: &str, config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_in(Some(ns), instance, config, env)
    }

    /// Starts the gateway in this process's namespace (loopback tests; `kernel.enabled = false`
    /// in `config` needs no privileges).
    pub fn start_local(instance: &str, config: &str) -> Self {
        Self::start_in(None, instance, config, &[])
    }

    /// Like [`Daemon::start_local`], with extra environment variables.
    pub fn start_local_with_env(instance: &str, config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_in(None, instance, config, env)
    }

    /// Like [`Daemon::start_local`], started with the open-file limits `(soft, hard)`, as a
    /// service manager or a shell's `ulimit -n` would.
    pub fn start_local_with_open_files(instance: &str, config: &str, limits: (u64, u64)) -> Self {
        let (config_path, log) = Self::files(instance, config);
        let before = Before {
            open_files: Some(limits),
            ..Before::default()
        };
        Self::spawn(None, instance, config_path, log, &[], &before, RUNNING)
    }

    /// Like [`Daemon::start_local`], started allowed to run only on `cpus`, as `taskset -c` or
    /// systemd's `CPUAffinity=` would start it.
    pub fn start_local_on_cpus(instance: &str, config: &str, cpus: &[usize]) -> Self {
        let (config_path, log) = Self::files(instance, config);
        let before = Before {
            cpus: Some(cpus.to_vec()),
            ..Before::default()
        };
        Self::spawn(None, instance, config_path, log, &[], &before, RUNNING)
    }

    fn files(instance: &str, config: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir();
        let config_path = dir.join(format!("{instance}.toml"));
        let _ = std::fs::remove_dir_all(state_dir(instance));
        std::fs::write(&config_path, with_state(instance, config)).expect("write config");
        let log = dir.join(format!("{instance}.log"));
        let _ = std::fs::remove_file(&log);
        (config_path, log)
    }

    /// Like [`Daemon::start_local`], returning as soon as `needle` is in the log (which may
    /// be before the data plane runs).
    pub fn start_local_until(instance: &str, config: &str, needle: &str) -> Self {
        let (config_path, log) = Self::files(instance, config);
        Self::spawn(
            None,
            instance,
            config_path,
            log,
            &[],
            &Before::default(),
            needle,
        )
    }

    fn start_in(ns: Option<&str>, instance: &str, config: &str, env: &[(&str, &str)]) -> Self {
        let (config_path, log) = Self::files(instance, config);
        Self::spawn(
            ns,
            instance,
            config_path,
            log,
            env,
            &Before::default(),
            RUNNING,
        )
    }

    /// Starts the daemon and waits for `needle` in its log ([`RUNNING`] for a started one).
    fn spawn(
        ns: Option<&str>,
        instance: &str,
        config: PathBuf,
        log: PathBuf,
        env: &[(&str, &str)],
        before: &Before,
        needle: &str,
    ) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut cmd = Command::new(gateway_bin());
        if let Some(ns) = ns {
            crate::netns::enter_before_exec(&mut cmd, ns);
        }
        if let Some(cpus) = &before.cpus {
            use std::os::unix::process::CommandExt as _;
            let mut set = nix::sched::CpuSet::new();
            for &c in cpus {
                set.set(c).expect("a CPU number within the set's size");
            }
            // SAFETY: sched_setaffinity(2) only, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                        .map_err(std::io::Error::from)
                });
            }
        }
        if let Some((soft, hard)) = before.open_files {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit(2) only, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(["--log-json", "run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn gateway");
        let mut d = Daemon {
            child: Some(child),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(instance),
            log,
            config,
            state: state_dir(instance),
        };
        d.wait_for_log(needle, Duration::from_secs(20));
        d
    }

    /// Starts the same instance again (after a crash or stop).
    pub fn restart(ns: &str, instance: &str, prev: &mut Daemon) -> Self {
        Self::restart_in(Some(ns), instance, prev, &[])
    }

    fn restart_in(
        ns: Option<&str>,
        instance: &str,
        prev: &mut Daemon,
        env: &[(&str, &str)],
    ) -> Self {
        // The previous run keeps its config file; this run logs to a file of its own.
        let config = std::mem::take(&mut prev.config);
        // The state store too: the previous run's drop leaves it.
        prev.state = PathBuf::new();
        let log = prev.log.with_extension("restart.log");
        let _ = std::fs::remove_file(&log);
        Self::spawn(ns, instance, config, log, env, &Before::default(), RUNNING)
    }

    /// As [`Daemon::restart`], in this process's namespace (loopback tests).
    pub fn restart_local(instance: &str, prev: &mut Daemon) -> Self {
        Self::restart_in(None, instance, prev, &[])
    }

    /// As [`Daemon::restart_local`], with more environment variables.
    pub fn restart_local_with_env(instance: &str, prev: &mut Daemon, env: &[(&str, &str)]) -> Self {
        Self::restart_in(None, instance, prev, env)
    }

    /// The exit status of a run that ended by itself (waits at most `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().ok().flatten() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `needle` to appear in this run's log.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "gateway exited ({status}) before `{needle}`; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.terminate();
        let mut child = self.child.take().expect("checked above");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "gateway exited with {status}; log:\n{}",
                    self.log()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "gateway did not stop within 15 s of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the running daemon without waiting.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
            .expect("kill(2)");
    }

    /// SIGTERM without waiting; [`Daemon::stop`] (or drop) waits.
    pub fn terminate(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// SIGHUP: reload the configuration file.
    pub fn hangup(&self) {
        self.signal(nix::sys::signal::Signal::SIGHUP);
    }

    /// The running daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.crash();
        let _ = gateway::kernel::remove_pins(&self.pin_dir);
        let _ = std::fs::remove_file(&self.config);
        // A failing test's log stays for whoever reads the failure; a passing one's goes (a
        // run of the suite left some 300 behind in the temporary directory).
        if std::thread::panicking() {
            eprintln!("the gateway's log is kept: {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
        if !self.state.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.state);
        }
    }
}

/// Tries to connect from `src` to `dst` within `timeout` (a dropped SYN shows as a timeout).
/// The source port is chosen at connect, for this destination (`IP_BIND_ADDRESS_NO_PORT`):
/// a port chosen at bind is one no socket of `src` holds, so thousands of connections in
/// `TIME_WAIT` made each bind search longer, then fail.
pub fn connect_from(src: IpAddr, dst: SocketAddr, timeout: Duration) -> Option<TcpStream> {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .expect("IP_BIND_ADDRESS_NO_PORT");
    socket
        .bind(&SocketAddr::new(src, 0).into())
        .expect("bind source");
    socket.connect_timeout(&dst.into(), timeout).ok()?;
    Some(socket.into())
}

/// [`connect_from`] the loopback address `src` (an `127.x.y.z`, as text) to the gateway's
/// `port` on 127.0.0.1, within 2 s.
pub fn loopback_from(src: &str, port: u16) -> Option<TcpStream> {
    connect_from(
        src.parse().expect("a source address"),
        ([127, 0, 0, 1], port).into(),
        Duration::from_secs(2),
    )
}

/// Sends one HTTP request on `stream` and returns the status code of the answer.
pub fn http_status(stream: &mut TcpStream) -> u16 {
    http_status_of(
        stream,
        b"POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{}",
    )
}

/// The HTTP status of the answer to `request` on `stream`.
pub fn http_status_of(stream: &mut TcpStream, request: &[u8]) -> u16 {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(request).expect("write");
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).expect("read answer");
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {text}"))
}
