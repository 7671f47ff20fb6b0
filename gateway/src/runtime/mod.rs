//! Thread-per-core data plane: one monoio worker per core, pinned, each with its own
//! `SO_REUSEPORT` listener; io_uring when the kernel offers it, epoll otherwise. Workers own
//! their state, take no locks and make no bpf syscalls.
//!
//! Each accepted connection is attributed to a tenant (its count feeds the kernel's connection
//! caps) and served by [`crate::mcp::proxy`].

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd as _,
    rc::Rc,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use crate::{host::is_out_of_descriptors, shared::Shared};
use monoio::{io::AsyncWriteRentExt, net::TcpStream};

use crate::mcp::{self, worker::WorkerCtx};
use tokio::sync::watch;

/// Which I/O driver the workers use.
pub fn driver_name() -> &'static str {
    if monoio::utils::detect_uring() {
        "io_uring"
    } else {
        "epoll"
    }
}

/// Binds `count` sockets with `SO_REUSEPORT` on `addr`, one per worker; the kernel spreads
/// incoming connections across them. Refused if another process already listens there:
/// `SO_REUSEPORT` would otherwise let a second gateway (of the same user) join the group
/// silently and take a share of the traffic under its own policy.
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> std::io::Result<Vec<TcpListener>> {
    ensure_unclaimed(addr)?;
    reuseport_group(addr, count)
}

/// Fails with `AddrInUse`, naming the holder where /proc tells it, if anything is bound to
/// `addr`: a socket bound without `SO_REUSEPORT` conflicts with every other one on the address.
fn ensure_unclaimed(addr: SocketAddr) -> std::io::Result<()> {
    let probe = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // Only SO_REUSEADDR, which lets a socket in TIME_WAIT (a gateway that just stopped) be
    // reused but never a live listener.
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let holder = holder_of(addr.port())
                .map(|h| format!(" (held by {h})"))
                .unwrap_or_default();
            Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{addr} is already in use{holder}: another process listens there; only this gateway's own workers may share its port"
                ),
            ))
        }
        // The port is privileged here and this user may not bind it: say what grants it.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
                .ok()
                .and_then(|s| s.trim().parse::<u16>().ok())
                .unwrap_or(1024);
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "binding {addr}: permission denied (uid {}): ports below {start} need CAP_NET_BIND_SERVICE \
                     (systemd: add it to AmbientCapabilities= and CapabilityBoundingSet= in a drop-in) or root",
                    nix::unistd::geteuid().as_raw()
                ),
            ))
        }
        Err(e) => Err(e),
    }
}

/// The process listening on `port`, as "pid N (comm)", from /proc (where permissions allow).
fn holder_of(port: u16) -> Option<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is "ADDR:PORT" in hex; state 0A is LISTEN; the inode is field 9.
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let listening_here = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port)
                && *state == "0A";
            if listening_here {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_dir
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                let comm =
                    std::fs::read_to_string(proc_dir.path().join("comm")).unwrap_or_default();
                return Some(format!("pid {pid} ({})", comm.trim()));
            }
        }
    }
    None
}

/// `count` sockets in one `SO_REUSEPORT` group on `addr`.
fn reuseport_group(addr: SocketAddr, count: usize) -> std::io::Result<Vec<TcpListener>> {
    (0..count)
        .map(|_| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nodelay(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.bind(&addr.into())?;
            socket.listen(4096)?;
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        })
        .collect()
}

/// Starts one worker thread per element of `listeners` (each holds that worker's sockets).
/// The threads end after `shutdown` turns true and their connections drained or `grace` passed.
pub fn spawn_workers(
    shared: Arc<Shared>,
    listeners: Vec<Vec<TcpListener>>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
    pin: bool,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let cores = allowed_cpus();
    // The coarse clock's mapping waits for a tick: taken here, not by a worker's first request.
    crate::clock::start();
    let learned = Arc::new(mcp::Learned::default());
    listeners
        .into_iter()
        .enumerate()
        .map(|(index, sockets)| {
            let shared = Arc::clone(&shared);
            let learned = Arc::clone(&learned);
            let shutdown = shutdown.clone();
            let core = cores[index % cores.len()];
            std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    block_process_signals();
                    if pin && let Err(e) = monoio::utils::bind_to_cpu_set([core]) {
                        tracing::warn!(worker = index, core, error = ?e, "could not pin worker to its core");
                    }
                    supervise(index, sockets, &shared, &learned, &shutdown, grace);
                })
        })
        .collect()
}

/// The CPUs this process may run on (`taskset`, systemd's `CPUAffinity=`, a cpuset), in order:
/// worker *i* is pinned to the *i*-th of them. Pinning worker *i* to CPU *i* instead put a gateway
/// started with `taskset -c 1` on CPU 0, beside whatever the operator had kept it away from.
fn allowed_cpus() -> Vec<usize> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0));
    let cpus: Vec<usize> = set
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect()
        })
        .unwrap_or_default();
    if cpus.is_empty() {
        let n = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        (0..n).collect()
    } else {
        cpus
    }
}

/// Runs worker `index` on this thread until shutdown, starting its runtime again whenever it
/// panics: a connection task's panic is contained in [`serve_contained`], so reaching this means
/// the worker's own loop failed. A dead monoio runtime cannot be cleaned up: its pending tasks
/// and their io_uring operations are leaked, and a leaked accept would go on taking connections
/// that nobody serves. So the dead incarnation's listening sockets and connections are shut
/// down (the peers see them close; the descriptors stay with the leaked tasks), and the next
/// incarnation listens on new sockets bound to the same addresses. `/readyz` reports the worker
/// down until it serves again.
fn supervise(
    index: usize,
    mut sockets: Vec<TcpListener>,
    shared: &Arc<Shared>,
    learned: &Arc<mcp::Learned>,
    shutdown: &watch::Receiver<bool>,
    grace: Duration,
) {
    let up = &shared.workers_up[index];
    loop {
        let runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .uring_builder(uring_builder())
            .enable_timer()
            .build();
        let incarnation: std::io::Result<Vec<TcpListener>> =
            sockets.iter().map(TcpListener::try_clone).collect();
        let (mut rt, incarnation) = match (runtime, incarnation) {
            (Ok(rt), Ok(s)) => (rt, s),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(worker = index, error = %e, "worker runtime failed to start");
                return;
            }
        };
        let open = OpenConns::default();
        up.store(true, Ordering::Relaxed);
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(worker(
                index,
                incarnation,
                Arc::clone(shared),
                Arc::clone(learned),
                shutdown.clone(),
                grace,
                Rc::clone(&open),
            ));
        }));
        up.store(false, Ordering::Relaxed);
        if run.is_ok() || *shutdown.borrow() {
            if run.is_ok() {
                // The tasks only the deadline table still holds are dropped within the
                // runtime, while the thread's locals live (see `deadline::drop_all`).
                rt.block_on(async { crate::http::deadline::drop_all() });
            } else {
                // A runtime that panicked as it stopped: its tasks are leaked, not dropped
                // as the thread ends.
                crate::http::deadline::forget_all();
            }
            return;
        }
        shared.worker_restarts.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            worker = index,
            connections = open.len(),
            "worker panicked; closing its connections and starting it again"
        );
        // The descriptors stay open, owned by the leaked tasks.
        open.shut_all();
        drop(rt);
        // The dead runtime's idle connections stay registered with their wakers: forgotten.
        crate::http::deadline::forget_all();
        // After the runtime is gone: a connection task it dropped has given its count back
        // already, one it leaked never will.
        shared.conns.reset(index);
        sockets = match rebind(&sockets) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(worker = index, error = %e, "cannot listen again; worker stays down");
                return;
            }
        };
        // No tight loop if it fails at once again.
        std::thread::sleep(restart_pause());
    }
}

/// New listening sockets on the addresses of `old`, which stop listening (taking them out of
/// the `SO_REUSEPORT` group, so that no new connection waits on a dead worker's socket).
fn rebind(old: &[TcpListener]) -> std::io::Result<Vec<TcpListener>> {
    let addrs: Vec<SocketAddr> = old
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<_, _>>()?;
    // The new sockets listen before the old ones stop, so there is no moment with nobody
    // listening (a client would be refused); only connections already queued on the old
    // sockets are reset.
    // The old ones stop whether or not new ones could be made: left listening, the dead
    // incarnation's accept would take connections that nobody serves.
    let new = addrs
        .into_iter()
        .map(|a| reuseport_group(a, 1).map(|mut v| v.remove(0)))
        .collect::<std::io::Result<Vec<_>>>();
    for l in old {
        // SAFETY: shutdown(2) on a socket this thread holds.
        unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
    }
    new
}

/// At most one log line a second for a repeated event on the request path; the lines not
/// written are counted and reported with the next one.
#[derive(Default)]
pub struct Throttle {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(suppressed since the last line)` when a line may be written now.
    pub fn allow(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A WARN on the request path, at most once a second per call site and worker thread, with
/// the count of the lines suppressed since the last one (`suppressed`): a failure repeated for
/// every request must not flood the log. Takes `tracing::warn!`'s arguments.
#[macro_export]
macro_rules! throttled_warn {
    ($($arg:tt)+) => {{
        ::std::thread_local! {
            static THROTTLE: ::std::cell::RefCell<$crate::runtime::Throttle> =
                ::std::cell::RefCell::new($crate::runtime::Throttle::default());
        }
        if let Some(suppressed) = THROTTLE.with(|t| t.borrow_mut().allow()) {
            ::tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

/// Raises the open-file soft limit to the hard limit (a gateway holds two descriptors per
/// proxied request; 1,024 is the common default) and returns the limit in force.
pub fn raise_open_files_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 0;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l.rlim_cur = l.rlim_max;
            }
        }
    }
    l.rlim_cur
}

/// A worker's open client connections (their count is its load).
type OpenConns = Rc<mcp::worker::OpenConns>;

/// io_uring settings of a worker. With `COOP_TASKRUN` (Linux 5.19) a completion does not
/// interrupt the worker to run its task work; that waits until the worker next enters the kernel,
/// which a busy worker does all the time and an idle one does to wait. A/B on 2026-11-25 (same
/// build, realistic policy, 3 runs each): 40.7k vs 35.1k rps, 20 vs 25 µs of CPU per request.
/// Where the kernel lacks it, the defaults (monoio falls back to epoll only if io_uring itself is
/// missing).
pub fn uring_builder() -> io_uring::Builder {
    static COOP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let coop = *COOP.get_or_init(|| {
        io_uring::IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
            .setup_coop_taskrun()
            .build(8)
            .is_ok()
    });
    let mut b = io_uring::IoUring::builder();
    if coop {
        b.setup_coop_taskrun();
    }
    b
}

async fn worker(
    index: usize,
    sockets: Vec<TcpListener>,
    shared: Arc<Shared>,
    learned: Arc<mcp::Learned>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    active: OpenConns,
) {
    let ctx = WorkerCtx::new(Arc::clone(&shared), learned, index, Rc::clone(&active));
    monoio::spawn(ship_stats(Rc::clone(&ctx), shared.stats_tx.clone()));
    monoio::spawn(cut_refused(Rc::clone(&ctx)));
    monoio::spawn(sweep_pool(Rc::clone(&ctx)));
    monoio::spawn(Rc::clone(&ctx).end_evicted_sessions());
    monoio::spawn(purge_after_closes(Rc::clone(&active)));
    // The sockets come in the order of `Config::listeners`: the index names the listener.
    for (listener_index, socket) in sockets.into_iter().enumerate() {
        let listener = match monoio::net::TcpListener::from_std(socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(worker = index, error = %e, "cannot adopt listener");
                continue;
            }
        };
        monoio::spawn(accept_loop(
            index,
            listener_index,
            listener,
            Rc::clone(&ctx),
            shutdown.clone(),
            Rc::clone(&active),
        ));
    }
    stopped(&mut shutdown).await;
    // Connections waiting idle close now (or linger through a handover).
    crate::http::deadline::stop_all();
    // Past the grace, a worker that handed over drains on only while calls are in flight (an
    // idle event stream held the old process for the longest response timeout at every
    // upgrade: a review); their clients resume on the new process.
    let begun = monoio::time::Instant::now();
    let (grace_end, drain_end) = (begun + grace, begun + shared.drain_for(grace));
    while !active.is_empty() {
        let now = monoio::time::Instant::now();
        if now >= drain_end || (now >= grace_end && ctx.calls.get() == 0) {
            break;
        }
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    // No request runs on them any more (or none will be answered): ended upstream.
    ctx.end_held_sessions().await;
    if let Some(last) = ctx.recorder.borrow_mut().take() {
        let _ = shared.stats_tx.send(last);
    }
    if !active.is_empty() {
        tracing::warn!(
            worker = index,
            open = active.len(),
            "grace period over; closing connections"
        );
    }
}

async fn accept_loop(
    worker: usize,
    listener_index: usize,
    listener: monoio::net::TcpListener,
    ctx: Rc<WorkerCtx>,
    mut shutdown: watch::Receiver<bool>,
    active: OpenConns,
) {
    let mut accept_warnings = Throttle::default();
    loop {
        if !ctx.shared.accepting.load(Ordering::Relaxed) {
            // A binary upgrade holds the socket: the new process accepts from it now. It stays
            // listening (no shutdown: that would stop it for the new process too).
            if resumed_or_stopped(&ctx.shared, &mut shutdown).await {
                return;
            }
            continue;
        }
        // Cancelable, so that a pause for an upgrade can take back the accept in flight
        // without losing a connection it completed meanwhile (io_uring).
        let canceller = monoio::io::Canceller::new();
        let accept = listener.cancelable_accept(canceller.handle());
        let mut accept = std::pin::pin!(accept);
        let first = monoio::select! {
            r = &mut accept => Ok(r),
            i = interrupted(&ctx.shared, &mut shutdown) => Err(i),
        };
        let accepted = match first {
            Ok(r) => Some(r),
            Err(Interrupt::Stop) => None,
            Err(Interrupt::Pause) => {
                canceller.cancel();
                Some(accept.await)
            }
        };
        let accepted = match accepted {
            // Taken back for a pause: nothing was accepted.
            Some(Err(_)) if !ctx.shared.accepting.load(Ordering::Relaxed) => continue,
            Some(r) => r,
            None if ctx.shared.handing_over.load(Ordering::Relaxed) => return,
            None => {
                // Stop listening now. Dropping the listener is not enough with io_uring: the
                // kernel keeps the socket listening until the cancelled accept completes, and
                // meanwhile still completes handshakes that will never be served.
                // SAFETY: shutdown on a descriptor this listener owns.
                unsafe {
                    libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&listener), libc::SHUT_RDWR)
                };
                return;
            }
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            // The control thread shut the listener down: stop.
            Err(_) if *shutdown.borrow() => return,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, and say so once a second
                // at most (with how many were not said).
                if is_out_of_descriptors(&e) {
                    ctx.shared
                        .out_of_descriptors
                        .fetch_add(1, Ordering::Relaxed);
                }
                if let Some(suppressed) = accept_warnings.allow() {
                    tracing::warn!(worker, error = %e, suppressed, "accept failed; backing off");
                }
                monoio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // monoio's io_uring accept asks for no SOCK_CLOEXEC: without it every process the
        // gateway starts would hold this connection open (a stdio child, the new binary of an
        // upgrade). Children also get nothing but their pipes (`host::close_on_exec_from`), for
        // a fork between this accept and here.
        crate::host::set_close_on_exec(stream.as_raw_fd());
        take_connection(
            stream,
            peer,
            worker,
            listener_index,
            &ctx,
            &shutdown,
            &active,
        );
        // One accept completion can stand for many waiting connections: take the rest of the
        // queue now, without waiting, so that none waits behind this worker's other work for
        // its loop to come round again (with one accept in flight per turn, a busy worker
        // drained a queue of 246 at ~70 a second: seconds of latency at 2,048 connections).
        // Bounded per turn so that a flood cannot starve the connections already served.
        for _ in 0..ACCEPT_BATCH {
            match accept_now(&listener) {
                Ok(Some((stream, peer))) => {
                    take_connection(
                        stream,
                        peer,
                        worker,
                        listener_index,
                        &ctx,
                        &shutdown,
                        &active,
                    );
                }
                Ok(None) => break,
                Err(_) if *shutdown.borrow() => break,
                Err(e) => {
                    if is_out_of_descriptors(&e) {
                        ctx.shared
                            .out_of_descriptors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(suppressed) = accept_warnings.allow() {
                        tracing::warn!(worker, error = %e, suppressed, "accept failed; backing off");
                    }
                    break;
                }
            }
        }
    }
}

/// Connections taken from the accept queue without waiting after each accept completion, at most.
const ACCEPT_BATCH: usize = 256;

/// A connection waiting in `listener`'s accept queue, taken without waiting: `None` when the
/// queue is empty. The socket is close-on-exec (accept4's `SOCK_CLOEXEC`, which monoio's
/// io_uring accept does not ask for), and blocking on io_uring (the ring waits for it) but
/// non-blocking on epoll.
fn accept_now(
    listener: &monoio::net::TcpListener,
) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
    static URING: std::sync::LazyLock<bool> = std::sync::LazyLock::new(monoio::utils::detect_uring);
    // SAFETY: the descriptor stays open while `listener` is borrowed.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    let sock = socket2::SockRef::from(&fd);
    // The listening socket is non-blocking: an empty queue answers WouldBlock at once.
    let (conn, addr) = match sock.accept() {
        Ok(x) => x,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(None),
        // A connection reset while queued is gone; the next one may be fine.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(peer) = addr.as_socket() else {
        return Ok(None);
    };
    conn.set_nonblocking(!*URING)?;
    let stream = TcpStream::from_std(std::net::TcpStream::from(conn))?;
    Ok(Some((stream, peer)))
}

/// Attributes an accepted connection to its tenant (or refuses it at the tenant's cap) and
/// spawns its task.
fn take_connection(
    stream: TcpStream,
    peer: SocketAddr,
    worker: usize,
    listener_index: usize,
    ctx: &Rc<WorkerCtx>,
    shutdown: &watch::Receiver<bool>,
    active: &OpenConns,
) {
    let shared = &ctx.shared;
    let snapshot = shared.snapshot.load();
    // Behind a load balancer (PROXY protocol) the peer is the balancer: the connection is
    // attributed to the client's tenant, and counted, once the header has named the client
    // (`mcp::conn::admit`, told what was decided here: a reload may change the listener's
    // PROXY protocol in between).
    let proxied = snapshot
        .config
        .listeners
        .get(listener_index)
        .is_some_and(|l| l.proxy_protocol.is_some());
    let tenant = if proxied {
        None
    } else {
        if let Some(why) = shared.source_refusal(&snapshot, peer.ip()) {
            shared.refused_conns.source(why);
            tracing::debug!(peer = %peer, reason = ?why, "connection closed as it was accepted");
            // Reset, not closed: no answer, and no TIME_WAIT here for a source that retries.
            crate::host::reset_on_close(stream.as_raw_fd());
            return;
        }
        // As the kernel program decides a SYN: the tenant's at-cap flag, then the rates (which
        // it holds SYNs to, here for connections of no SYN it counted: a SYN cookie's ACK,
        // again and again; no program here), then the count against the cap.
        let tenant = snapshot.classifier.tenant_of(peer.ip());
        if shared.at_cap(tenant) {
            shared.refused_conns.at_cap();
            monoio::spawn(refuse_at_cap(stream, AtCap::Tenant));
            return;
        }
        if let Err(why) = shared.admit_new_conn(&snapshot, tenant, peer.ip()) {
            shared.refused_conns.rate(why);
            tracing::debug!(peer = %peer, reason = ?why, "connection over its rate closed as it was accepted");
            crate::host::reset_on_close(stream.as_raw_fd());
            return;
        }
        // The kernel drops SYNs once the control thread raises the flag; until then (and
        // for connections already in the accept queue) the worker refuses them itself.
        if !shared.enter_conn(&snapshot, worker, tenant) {
            shared.refused_conns.at_cap();
            monoio::spawn(refuse_at_cap(stream, AtCap::Tenant));
            return;
        }
        let Ok(source_counted) = shared.enter_source(&snapshot, tenant, peer.ip()) else {
            shared.conns.closed(worker, tenant);
            shared.refused_conns.source_at_cap();
            monoio::spawn(refuse_at_cap(stream, AtCap::Source));
            return;
        };
        Some((tenant, source_counted))
    };
    drop(snapshot);
    let fd = stream.as_raw_fd();
    // Behind a balancer the client is known once its header is read (`mcp::conn::admit`).
    active.opened(
        fd,
        (!proxied).then(|| peer.ip()),
        tenant.is_some_and(|(_, counted)| counted),
    );
    let _ = stream.set_nodelay(true);
    let open = OpenConn {
        ctx: Rc::clone(ctx),
        worker,
        tenant: tenant.map(|(t, _)| t),
        active: Rc::clone(active),
        fd,
    };
    monoio::spawn(serve_contained(
        stream,
        peer,
        listener_index,
        proxied,
        Rc::clone(ctx),
        shutdown.clone(),
        open,
    ));
}

/// A connection counted for its tenant and in its worker's open set, until dropped.
struct OpenConn {
    ctx: Rc<WorkerCtx>,
    worker: usize,
    tenant: Option<u32>,
    active: OpenConns,
    fd: std::os::fd::RawFd,
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        if let Some(t) = self.tenant {
            self.ctx.shared.conns.closed(self.worker, t);
        }
        self.active.closed(self.fd, &self.ctx.shared.source_conns);
    }
}

/// Serves a connection. A panic while a request is read or answered is contained (and
/// answered 500) in [`mcp::conn::serve`]; this is the backstop for one anywhere else in the
/// connection's task: the connection is closed as the unwinding drops it, the panic is counted,
/// and the worker goes on.
///
/// The task is this future, allocated whole at its largest state for the connection's life: so
/// it is built of combinators around [`mcp::conn::serve`], whose own future is built in place,
/// rather than async blocks, which would keep a copy of what they capture beside the future
/// they move it into (1,272 bytes a connection then, 2026-11-29).
fn serve_contained(
    stream: TcpStream,
    peer: SocketAddr,
    listener: usize,
    proxied: bool,
    ctx: Rc<WorkerCtx>,
    shutdown: watch::Receiver<bool>,
    open: OpenConn,
) -> impl std::future::Future<Output = ()> + 'static {
    use futures_util::FutureExt as _;
    std::panic::AssertUnwindSafe(mcp::conn::serve(
        stream, peer, listener, proxied, ctx, shutdown,
    ))
    .catch_unwind()
    .map(move |served| {
        if served.is_err() {
            open.ctx.shared.panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%peer, "a connection task panicked; closed");
        }
        drop(open);
    })
}

/// Sends what the worker recorded to the control thread once a second (off the request path;
/// recording itself takes no lock).
async fn ship_stats(ctx: Rc<WorkerCtx>, tx: std::sync::mpsc::Sender<crate::stats::Interval>) {
    loop {
        ctx.shared.worker_beat(ctx.worker);
        monoio::time::sleep(Duration::from_secs(1)).await;
        let interval = ctx.recorder.borrow_mut().take();
        if let Some(i) = interval
            && tx.send(i).is_err()
        {
            return;
        }
    }
}

/// Cuts the open connections of clients banned or denied since, and of callers a reload
/// revoked (see [`mcp::worker::OpenConns::cut_refused`]), within a quarter of a second of the
/// control thread's publishing it: a banned client's or a revoked key's event stream or call
/// in progress is not left to run until it ends. Looks only when the bans or the
/// configuration changed, or a request was admitted under a configuration replaced by then.
async fn cut_refused(ctx: Rc<WorkerCtx>) {
    let changes = &ctx.shared.sources_changed;
    let mut seen = changes.load(Ordering::Acquire);
    loop {
        monoio::time::sleep(CUT_REFUSED_EVERY).await;
        let now = changes.load(Ordering::Acquire);
        if now == seen && !ctx.open.take_stale() {
            continue;
        }
        seen = now;
        let cut = ctx.open.cut_refused(&ctx.shared);
        if cut > 0 {
            tracing::info!(
                worker = ctx.worker,
                cut,
                "connections of banned, denied or revoked clients closed"
            );
        }
    }
}

/// How often a worker looks whether bans or the deny list changed.
const CUT_REFUSED_EVERY: Duration = Duration::from_millis(250);

/// Closes, once a second, the idle upstream connections their upstream closed and those past
/// what the pool keeps now (`Pool::sweep`); and gives back the concurrency slots of tasks held
/// past their time (`mcp::tasks`).
async fn sweep_pool(ctx: Rc<WorkerCtx>) {
    loop {
        monoio::time::sleep(Duration::from_secs(1)).await;
        ctx.sweep_pool();
        ctx.release_expired_tasks();
    }
}

/// Gives the memory of closed and idle connections back to the system: once a second, if at
/// least half of this worker's connections (and at least [`PURGE_AFTER`]) closed since the
/// last look, or at least [`PURGE_AFTER`] went idle and freed their read buffers (or
/// [`PURGE_AFTER_QUIET`], once no more follow), the allocator's free pages on this thread are
/// purged. mimalloc keeps freed pages for reuse and purges them lazily, on later allocations;
/// a worker whose 10,000 connections closed (or went quiet) allocates little, so without this
/// the gateway stayed at ~10x its idle RSS after they closed, and 1,000 idle connections kept
/// ~16 KiB each of freed buffers resident. Runs on the
/// worker because mimalloc's heaps are per thread; it takes a few ms at most, at most once a
/// second, and only after many connections closed or went idle (a busy connection does not).
async fn purge_after_closes(active: OpenConns) {
    let (mut peak, mut released) = (0, 0);
    loop {
        monoio::time::sleep(Duration::from_secs(1)).await;
        let now = active.len();
        peak = peak.max(now);
        let fresh = crate::http::take_idle_releases();
        released += fresh;
        // Many buffers freed, or a few once connections stopped going idle (the last of a
        // wave: nothing else would purge them).
        let idle = released >= PURGE_AFTER || (fresh == 0 && released >= PURGE_AFTER_QUIET);
        if (peak - now >= PURGE_AFTER && now <= peak / 2) || idle {
            // SAFETY: mi_collect has no preconditions; it only walks this thread's heap.
            unsafe { libmimalloc_sys::mi_collect(true) };
            (peak, released) = (now, 0);
        }
    }
}

/// Connections that must have closed (and half of the worker's), or gone idle, before its
/// memory is purged.
const PURGE_AFTER: usize = 256;

/// Connections gone idle (their read buffers freed) that are purged once no more follow
/// within a second.
const PURGE_AFTER_QUIET: usize = 16;

/// Keeps the process's signals (SIGTERM, SIGHUP, ...) away from a worker thread: they are the
/// control thread's to handle, and a worker's io_uring wait should not be interrupted by them.
fn block_process_signals() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    if let Err(e) = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        tracing::warn!(error = %e, "could not block signals on a worker thread");
    }
}

/// What interrupts an accept.
enum Interrupt {
    Stop,
    Pause,
}

/// Resolves once `shutdown` is true (`Stop`) or accepting is paused for a binary upgrade
/// (`Pause`); checked like [`stopped`].
async fn interrupted(shared: &Shared, shutdown: &mut watch::Receiver<bool>) -> Interrupt {
    loop {
        if *shutdown.borrow_and_update() {
            return Interrupt::Stop;
        }
        if !shared.accepting.load(Ordering::Relaxed) {
            return Interrupt::Pause;
        }
        monoio::select! {
            _ = shutdown.changed() => {}
            _ = monoio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Waits while accepting is paused: `true` when the worker stops meanwhile, `false` when
/// accepting resumes (an upgrade that failed).
async fn resumed_or_stopped(shared: &Shared, shutdown: &mut watch::Receiver<bool>) -> bool {
    loop {
        if *shutdown.borrow_and_update() {
            return true;
        }
        if shared.accepting.load(Ordering::Relaxed) {
            return false;
        }
        monoio::select! {
            _ = shutdown.changed() => {}
            _ = monoio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Resolves once `shutdown` is true. The flag is also checked every 50 ms in case a wake-up
/// from the control thread (another runtime) does not arrive; the listening sockets themselves
/// are shut down by the control thread (see `control.rs`).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        monoio::select! {
            _ = shutdown.changed() => {}
            _ = monoio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Which connection cap a new connection is over.
#[derive(Clone, Copy)]
enum AtCap {
    /// Its tenant's `max_connections`.
    Tenant,
    /// Its tenant's `max_connections_per_source`, for its source.
    Source,
}

async fn refuse_at_cap(mut stream: TcpStream, cap: AtCap) {
    let body = match cap {
        AtCap::Tenant => {
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"tenant is at its connection cap"}}"#
        }
        AtCap::Source => {
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"too many connections from this source"}}"#
        }
    };
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // Bounded like every write: a client that does not read is not waited for. The dropped
    // write is cancelled in the ring (monoio `async-cancel`), so the socket closes with it.
    let _ =
        monoio::time::timeout(Duration::from_secs(1), stream.write_all(resp.into_bytes())).await;
}

/// How long a panicked worker stays down before it is started again: 100 ms, enough that a
/// worker failing at once again does not spin. Under fault injection, 1 s, so that a test on a
/// loaded machine sees `/readyz` report the gap (a 100 ms window can fall between two polls).
fn restart_pause() -> Duration {
    if crate::mcp::conn::fault_injection() {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's task is allocated once, at the size of its largest state, and an idle
    /// connection holds all of it: the request's state (parsing, policy, the upstream
    /// exchange), the PROXY header and the TLS handshake are boxed so that what stays is the
    /// connection and its wait for the next request, which holds no timer (its idle timeout is
    /// an entry in the worker's table, `http::idle`; a timer entry is 640 bytes aligned to 128).
    /// Growing past these bounds means something large went inline into the connection's wait
    /// again (every idle connection pays it).
    #[test]
    fn an_idle_connections_task_stays_small() {
        let task = {
            fn size<F, R>(_: F) -> usize
            where
                F: FnOnce(
                    TcpStream,
                    SocketAddr,
                    usize,
                    bool,
                    Rc<WorkerCtx>,
                    watch::Receiver<bool>,
                    OpenConn,
                ) -> R,
            {
                std::mem::size_of::<R>()
            }
            size(serve_contained)
        };
        let fill = {
            fn size<'a, F, R>(_: F) -> usize
            where
                F: FnOnce(&'a mut crate::http::Io, Duration) -> R,
            {
                std::mem::size_of::<R>()
            }
            size(crate::http::Io::fill_idle)
        };
        // 824 and 232 bytes (2026-11-29): the task with monoio's 48-byte header in mimalloc's
        // 896-byte class. 1,224 (1,280 allocated) with the arguments of the async fns kept
        // beside their locals and the shutdown watch's wait; 3,200 with the timers inline.
        assert!(task + 48 <= 896, "a connection's task is {task} bytes");
        assert!(fill <= 256, "the wait for the next request is {fill} bytes");
    }
}
