//! Zero-downtime binary upgrade: the running gateway starts the binary at its own path again
//! (a package upgrade may have replaced it) and hands the new process its listening sockets,
//! admin socket, instance lock and session key over a socket pair (`SCM_RIGHTS`); the new
//! process attaches its XDP program through the pinned links (`bpf_link_update`: never a moment
//! without a program), takes the state store once the old one closed it, serves, and the old one
//! drains and exits. The same sockets change hands, so a connection waiting in an accept queue
//! is served by the new process, never refused.
//!
//! An upgrade is asked for by SIGUSR2 or `gateway upgrade` over a unix socket in the runtime
//! directory (mode 0600, and the peer must be this process's user or root). Nothing here hands a
//! socket to anything but the gateway's own child, on a socket pair only the two share; nothing
//! here runs on a worker.

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, setsockopt, socketpair, sockopt,
};
use serde::{Deserialize, Serialize};

/// The environment variable naming the descriptor of the handover socket in a new process.
pub const HANDOVER_ENV: &str = "MCP_GATEWAY_HANDOVER_FD";
/// The descriptor number the handover socket gets in the new process.
const CHILD_FD: RawFd = 3;
/// Descriptors per message, below the kernel's `SCM_MAX_FD` (253).
const FDS_PER_MESSAGE: usize = 200;
/// Bytes of late counts per message, as JSON: within the 64 KiB a step is read into (a count's
/// name holds an agent's, which a token's claim may make long; one longer than this alone is
/// not sent).
const LATE_BYTES_PER_MESSAGE: usize = 48 * 1024;
/// How long one side waits for the other's next step: the new process loads and verifies its
/// XDP program and reads its configuration, certificates and state store before answering.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the running gateway hands over (its descriptors follow, in this order: the sockets of
/// each listener, the admin socket, the instance lock if any).
#[derive(Debug, Serialize, Deserialize)]
pub struct Offer {
    /// The process handing over.
    pub pid: u32,
    /// One entry per listener: its address and how many `SO_REUSEPORT` sockets (one per worker).
    pub listeners: Vec<(SocketAddr, usize)>,
    pub admin: SocketAddr,
    pub lock: bool,
    /// The key that seals federated session ids: sessions opened before the upgrade stay valid.
    pub session_key: [u8; 32],
    /// What the fleet agreed for that key (its salt with a secret), proposed again by the new
    /// process: a Redis that lost it since gets it back instead of a new one, which ended every
    /// session opened before the upgrade (an operator's review). Absent from older gateways.
    #[serde(default)]
    pub fleet_agreed: Option<String>,
    /// The secret the policy's keyed hashes are made with (the owners of held sessions and of
    /// stdio children are keyed with it).
    pub hash_seed: u64,
    /// XDP attachments: interface and mode (`native`, `generic`).
    pub attachments: Vec<(String, String)>,
}

/// The steps of a handover, in order: `Offer` (old), `Prepared` (new: configuration, TLS and
/// kernel program loaded), `Released` (old: stopped accepting, state store closed), `Ready`
/// (new: serving). `Failed` from the new process at any step ends it; the old one serves on.
#[derive(Debug, Serialize, Deserialize)]
enum Step {
    Offer(Offer),
    Fds,
    Prepared,
    /// Passthrough sessions and their owners, sent by gateways that kept them in a table (their
    /// ids are signed now): read and ignored.
    Owners(Vec<(u64, u64, u64)>),
    /// The gateway's own sessions its clients ended ([`crate::session::Ended`]: the
    /// session key's [`crate::session::ended_key`], when), sent before `Released` when
    /// there are any. (A process older than those keys sent its own hashes here: taken, they
    /// match no session, and what it had ended is not remembered across that one upgrade.)
    Ended(Vec<(u64, u64)>),
    Released,
    Ready {
        pid: u32,
    },
    /// What the old process counted while it drained, after it closed the state store (the
    /// calls on connections it still served): added to the new process's counts, which the
    /// store and the fleet then carry. Each count's `used` is what was added since the close.
    Late(
        Vec<(
            crate::policy::limits::Counted,
            crate::policy::limits::WindowCount,
        )>,
    ),
    Failed {
        reason: String,
    },
}

/// The handed-over descriptors, sorted.
pub struct Handed {
    pub offer: Offer,
    /// Per entry of `offer.listeners`: its sockets.
    pub listeners: Vec<(SocketAddr, Vec<std::net::TcpListener>)>,
    pub admin: Option<std::net::TcpListener>,
    pub lock: Option<std::fs::File>,
}

/// One end of the handover socket pair (`SOCK_SEQPACKET`: one message per step).
pub struct Channel(OwnedFd);

impl Channel {
    fn send(&self, step: &Step, fds: &[RawFd]) -> io::Result<()> {
        let bytes = serde_json::to_vec(step)?;
        let iov = [IoSlice::new(&bytes)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(
            self.0.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(())
    }

    /// The next message and the descriptors it carried; `UnexpectedEof` when the other process
    /// closed its end (exited), `TimedOut` after `timeout`.
    fn recv(&self, timeout: Duration) -> io::Result<(Step, Vec<OwnedFd>)> {
        setsockopt(
            &self.0,
            sockopt::ReceiveTimeout,
            // Zero would mean no timeout at all.
            &nix::sys::time::TimeVal::new(
                timeout.as_secs() as _,
                timeout.subsec_micros().max(1) as _,
            ),
        )?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            self.0.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {} s", timeout.as_secs()),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(rights) = c {
                // SAFETY: the kernel just installed these descriptors in this process.
                fds.extend(
                    rights
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other process closed the handover (exited)",
            ));
        }
        let step = serde_json::from_slice(&buf[..n]).map_err(io::Error::other)?;
        Ok((step, fds))
    }
}

/// The handover socket this process was started with by a gateway being upgraded, if any (the
/// environment variable is removed and the descriptor made close-on-exec, so that no child of
/// ours inherits either). Call first thing in `main`, before any thread starts.
pub fn take_handover() -> Option<Successor> {
    let fd: RawFd = std::env::var(HANDOVER_ENV).ok()?.parse().ok()?;
    // SAFETY: called before any other thread exists (documented above).
    unsafe { std::env::remove_var(HANDOVER_ENV) };
    // SAFETY: the parent put the socket at this number for us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Some(Successor(Channel(fd)))
}

/// The new process's side of a handover.
pub struct Successor(Channel);

impl Successor {
    /// Receives the offer and its descriptors.
    pub fn receive(&self) -> io::Result<Handed> {
        let (step, _) = self.0.recv(STEP_TIMEOUT)?;
        let Step::Offer(offer) = step else {
            return Err(io::Error::other(format!(
                "expected the handover offer, got {step:?}"
            )));
        };
        let want =
            offer.listeners.iter().map(|(_, n)| n).sum::<usize>() + 1 + usize::from(offer.lock);
        let mut fds = Vec::with_capacity(want);
        while fds.len() < want {
            let (step, got) = self.0.recv(STEP_TIMEOUT)?;
            if !matches!(step, Step::Fds) || got.is_empty() {
                return Err(io::Error::other(format!(
                    "expected descriptors, got {step:?}"
                )));
            }
            fds.extend(got);
        }
        if fds.len() != want {
            return Err(io::Error::other(format!(
                "expected {want} descriptors, got {}",
                fds.len()
            )));
        }
        let mut fds = fds.into_iter();
        let mut listeners = Vec::new();
        for (addr, n) in &offer.listeners {
            let sockets: Vec<std::net::TcpListener> = fds
                .by_ref()
                .take(*n)
                .map(std::net::TcpListener::from)
                .collect();
            listeners.push((*addr, sockets));
        }
        let admin = fds.next().map(std::net::TcpListener::from);
        let lock = fds.next().map(std::fs::File::from);
        Ok(Handed {
            offer,
            listeners,
            admin,
            lock,
        })
    }

    /// Tells the old process everything is loaded, and waits until it has stopped accepting
    /// and closed the state store.
    /// Returns the sessions the old process's clients ended.
    pub fn prepared(&self) -> io::Result<Vec<(u64, u64)>> {
        self.0.send(&Step::Prepared, &[])?;
        let mut ended = Vec::new();
        loop {
            match self.0.recv(STEP_TIMEOUT)?.0 {
                Step::Owners(_) => {}
                Step::Ended(e) => ended.extend(e),
                Step::Released => return Ok(ended),
                other => {
                    return Err(io::Error::other(format!("expected release, got {other:?}")));
                }
            }
        }
    }

    /// Tells the old process (and systemd, as the service's new main process) this one serves.
    pub fn ready(&self) -> io::Result<()> {
        let pid = std::process::id();
        self.0.send(&Step::Ready { pid }, &[])?;
        // MAINPID first: the old process exits soon, and systemd must not take that for the
        // service's end (the unit needs `NotifyAccess=all`: this is not the main process yet).
        if let Err(e) = sd_notify::notify(&[
            sd_notify::NotifyState::MainPid(pid),
            sd_notify::NotifyState::Ready,
        ]) {
            tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
        }
        Ok(())
    }

    /// Takes (in a thread of its own) what the old process counts while it drains, in
    /// pieces, until it exits; `apply` takes each piece.
    pub fn take_late(
        &self,
        mut apply: impl FnMut(
            Vec<(
                crate::policy::limits::Counted,
                crate::policy::limits::WindowCount,
            )>,
        ) + Send
        + 'static,
    ) -> io::Result<()> {
        let channel = Channel(self.0.0.try_clone()?);
        std::thread::Builder::new()
            .name("handover-late".into())
            .spawn(move || {
                // The old process drains for its grace, or its longest response timeout.
                loop {
                    match channel.recv(Duration::from_secs(3600)) {
                        Ok((Step::Late(counts), _)) => apply(counts),
                        Ok(_) => {}
                        // A piece that does not read: the others still count.
                        Err(e) if e.kind() == io::ErrorKind::Other => {
                            tracing::warn!("a piece of the late counts was not read: {e}");
                        }
                        // The old process exited (or never sent in an hour).
                        Err(_) => return,
                    }
                }
            })?;
        Ok(())
    }

    /// Tells the old process why this one cannot take over (it serves on).
    pub fn fail(&self, reason: &str) {
        let _ = self.0.send(
            &Step::Failed {
                reason: reason.to_owned(),
            },
            &[],
        );
        // What the old process sent and this one did not read (an offer, when the
        // configuration failed first) is read now: closing a socket with unread data resets
        // it, and the reset would discard the reason on its way.
        while self.0.recv(Duration::from_millis(1)).is_ok() {}
    }
}

/// The binary and arguments this process was started with, recorded at start: an upgrade runs
/// the binary at the same path (a package upgrade puts the new one there; `/proc/self/exe`
/// would name the old, deleted file).
pub struct Origin {
    exe: PathBuf,
    args: Vec<std::ffi::OsString>,
}

impl Origin {
    pub fn record() -> io::Result<Self> {
        let exe = std::env::current_exe()?;
        Ok(Self {
            exe,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// The old process's side of a handover in progress.
pub struct Predecessor {
    channel: Channel,
    child: std::process::Child,
}

impl Predecessor {
    /// Starts the new process with its end of a fresh socket pair at descriptor 3, and sends it
    /// the offer and the descriptors.
    pub fn start(origin: &Origin, offer: Offer, fds: &[BorrowedFd<'_>]) -> io::Result<Self> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let theirs_raw = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(&origin.exe);
        cmd.args(&origin.args)
            .env(HANDOVER_ENV, CHILD_FD.to_string())
            // systemd's watchdog names the old main process; the new one pings as the service's
            // main process once it told systemd `MAINPID=` (sd_watchdog_enabled(3)).
            .env_remove("WATCHDOG_PID")
            .stdin(std::process::Stdio::null());
        use std::os::unix::process::CommandExt as _;
        // SAFETY: close_range/dup2/fcntl only, between fork and exec. Every descriptor but
        // stdin, stdout and stderr is made close-on-exec (a client's connection would stay
        // open in the new binary after the old one closed it); then the copy at CHILD_FD is not
        // close-on-exec; the original is, so no other descriptor of it reaches the new binary.
        unsafe {
            cmd.pre_exec(move || {
                crate::host::close_on_exec_from(3);
                if theirs_raw == CHILD_FD {
                    if libc::fcntl(CHILD_FD, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(theirs_raw, CHILD_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            io::Error::new(e.kind(), format!("starting {}: {e}", origin.exe.display()))
        })?;
        drop(theirs);
        let p = Self {
            channel: Channel(ours),
            child,
        };
        p.channel.send(&Step::Offer(offer), &[])?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
        for chunk in raw.chunks(FDS_PER_MESSAGE) {
            p.channel.send(&Step::Fds, chunk)?;
        }
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the new process has loaded everything (or says why it cannot).
    pub fn wait_prepared(&self) -> Result<(), String> {
        self.expect(|s| matches!(s, Step::Prepared).then_some(()))
    }

    /// Tells the new process accepting stopped and the state store is closed (and which
    /// sessions were `ended`); waits until it serves. Returns its pid.
    pub fn release(&self, ended: Vec<(u64, u64)>) -> Result<u32, String> {
        if !ended.is_empty() {
            self.channel
                .send(&Step::Ended(ended), &[])
                .map_err(|e| format!("the new process is gone: {e}"))?;
        }
        self.channel
            .send(&Step::Released, &[])
            .map_err(|e| format!("the new process is gone: {e}"))?;
        self.expect(|s| match s {
            Step::Ready { pid } => Some(*pid),
            _ => None,
        })
    }

    /// Sends the new process what this one counted while it drained (see [`Step::Late`]), in
    /// pieces small enough for one message each.
    pub fn send_late(
        &self,
        counts: Vec<(
            crate::policy::limits::Counted,
            crate::policy::limits::WindowCount,
        )>,
    ) -> io::Result<()> {
        let mut piece = Vec::new();
        let mut bytes = 0;
        for count in counts {
            let size = serde_json::to_vec(&count).map_or(usize::MAX, |b| b.len() + 1);
            if size > LATE_BYTES_PER_MESSAGE {
                tracing::warn!(size, "a late count too long to hand over is dropped");
                continue;
            }
            if bytes + size > LATE_BYTES_PER_MESSAGE {
                self.channel
                    .send(&Step::Late(std::mem::take(&mut piece)), &[])?;
                bytes = 0;
            }
            bytes += size;
            piece.push(count);
        }
        if !piece.is_empty() {
            self.channel.send(&Step::Late(piece), &[])?;
        }
        Ok(())
    }

    fn expect<T>(&self, want: impl FnOnce(&Step) -> Option<T>) -> Result<T, String> {
        match self.channel.recv(STEP_TIMEOUT) {
            Ok((step, _)) => match (want(&step), step) {
                (Some(v), _) => Ok(v),
                (None, Step::Failed { reason }) => Err(reason),
                (None, other) => Err(format!("unexpected handover step {other:?}")),
            },
            Err(e) => Err(format!(
                "the new process (pid {}) did not take over: {e}; see its log lines above",
                self.child.id()
            )),
        }
    }

    /// After a failure: makes sure the new process ends and is reaped.
    pub fn abandon(mut self) {
        let pid = self.child.id();
        drop(self.channel);
        // It exits on its own when it sees the closed channel; a bounded wait, then a kill.
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!(
            pid,
            "the new process did not exit after a failed upgrade; killed"
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The socket `gateway upgrade` talks to, for `instance`.
pub fn socket_path(instance: &str) -> PathBuf {
    crate::host::runtime_dir().join(format!("{instance}.upgrade.sock"))
}

/// Listens for upgrade requests at `path` (mode 0600). A socket file there that still answers
/// belongs to another live gateway of this instance name and is left alone, unless `replace`
/// (this process took over from that one).
pub fn listen(path: &Path, replace: bool) -> io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if !replace && std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is held by another running gateway", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Created with no permission for others at all: the mode is set before anyone could connect.
    // SAFETY: umask(2) only; the previous mask is restored at once.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = bound?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

/// Whether the peer of an upgrade request may ask for one: a process of this process's user,
/// or of root, that is no stdio server's. A stdio server is a program the gateway runs, as the
/// gateway's own user in the packaged service, or as root where configured: it may not restart
/// the gateway at will (Landlock's scopes keep it from signalling the gateway; a socket in a
/// folder is not in them). So the users stdio servers run as (`children`, root aside) are
/// refused, as on the token-less admin API (ask as root), and so is any process in a stdio
/// child's cgroup (a child run as root).
pub fn peer_allowed(stream: &tokio::net::UnixStream, children: &[u32]) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("the peer's credentials: {e}"))?;
    let uid = cred.uid();
    if uid != me && uid != 0 {
        return Err(format!("user {uid} is neither the gateway's nor root"));
    }
    if children.contains(&uid) {
        return Err(format!(
            "user {uid} is the user stdio servers run as (ask as root)"
        ));
    }
    if cred
        .pid()
        .is_none_or(|pid| crate::stdio::in_a_childs_cgroup(pid as u32))
    {
        return Err("a stdio server's process (or one not told apart from one)".into());
    }
    Ok(())
}

/// The answer to an upgrade request, one JSON line.
#[derive(Debug, Serialize, Deserialize)]
pub struct Outcome {
    /// The new process's pid when it took over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Why not, when it did not (the running gateway serves on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `gateway upgrade`: asks the running gateway of `instance` to upgrade, and waits for the
/// outcome.
pub fn request(instance: &str) -> anyhow::Result<u32> {
    use anyhow::Context as _;
    use std::io::{BufRead as _, Write as _};
    let path = socket_path(instance);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "no running gateway of instance `{instance}` answers at {}",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(STEP_TIMEOUT * 2 + Duration::from_secs(10)))?;
    stream.write_all(b"upgrade\n")?;
    let mut line = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut line)
        .context("waiting for the outcome")?;
    let outcome: Outcome =
        serde_json::from_str(&line).with_context(|| format!("unexpected answer {line:?}"))?;
    match (outcome.pid, outcome.error) {
        (Some(pid), None) => Ok(pid),
        (_, Some(e)) => anyhow::bail!("upgrade failed, the running gateway serves on: {e}"),
        (None, None) => anyhow::bail!("unexpected answer {line:?}"),
    }
}
