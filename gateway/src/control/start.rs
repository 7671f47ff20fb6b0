//! The control thread's start and stop, in the order they run: what `run_async` does before
//! its loop (signals, the kernel program, sockets, the shared state, what was kept) and after
//! it (draining the workers, releasing or detaching the program).

use super::*;

/// The signals the control thread answers, installed first: a SIGTERM during the start (a
/// service manager's stop, a test's) waits in its stream for the loop and ends the run
/// cleanly, instead of killing the process by the signal's default action.
pub(super) struct Signals {
    pub hup: tokio::signal::unix::Signal,
    pub usr1: tokio::signal::unix::Signal,
    pub usr2: tokio::signal::unix::Signal,
    pub term: tokio::signal::unix::Signal,
    pub int: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn install() -> std::io::Result<Self> {
        Ok(Self {
            hup: tokio::signal::unix::signal(SignalKind::hangup())?,
            usr1: tokio::signal::unix::signal(SignalKind::user_defined1())?,
            usr2: tokio::signal::unix::signal(SignalKind::user_defined2())?,
            term: tokio::signal::unix::signal(SignalKind::terminate())?,
            int: tokio::signal::unix::signal(SignalKind::interrupt())?,
        })
    }
}

/// The kernel program as the start leaves it.
pub(super) struct KernelStart {
    pub kernel: Option<Kernel>,
    /// The one handle the control thread writes the maps through (it mirrors what it wrote).
    pub maps: Option<KernelMaps>,
    /// Attachments of the running gateway this one takes over once it releases (its program
    /// keeps enforcing until then).
    pub taken_over: Vec<(String, kernel::AttachedMode)>,
}

/// Loads the kernel program (under the running gateway's lock, when taking over), syncs its
/// maps with `config` at this host's share of the fleet, and attaches it to each interface
/// the running gateway has not attached.
pub(super) fn start_kernel(
    config: &Config,
    handed: &mut Option<upgrade::Handed>,
    kernel_hosts: u64,
) -> anyhow::Result<KernelStart> {
    let mut taken_over = Vec::new();
    let mut maps = None;
    let kernel = if config.kernel.enabled {
        let lock = handed.as_mut().and_then(|h| h.lock.take());
        let mut k = kernel::load_as(&config.instance, &config.kernel.pin_dir, lock)?;
        let report = maps
            .insert(k.maps()?)
            .sync(&KernelState::shared_by(config, kernel_hosts))
            .context("syncing the kernel maps")?;
        tracing::debug!(?report, "kernel maps synced");
        for iface in &config.kernel.interfaces {
            if let Some((_, mode)) = handed
                .as_ref()
                .and_then(|h| h.offer.attachments.iter().find(|(i, _)| i == iface))
            {
                let mode =
                    kernel::AttachedMode::parse(mode).unwrap_or(kernel::AttachedMode::Generic);
                taken_over.push((iface.clone(), mode));
                continue;
            }
            let mode = k.attach(iface, config.kernel.mode)?;
            tracing::info!(interface = %iface, mode = mode.as_str(), "XDP program attached");
        }
        Some(k)
    } else {
        tracing::warn!("kernel.enabled = false: no XDP fast path");
        None
    };
    Ok(KernelStart {
        kernel,
        maps,
        taken_over,
    })
}

/// Each worker's listening socket for every listener: the running gateway's when taking over
/// (the same sockets, so what waits in their accept queues is served, not refused), bound
/// with `SO_REUSEPORT` otherwise.
pub(super) fn bind_listeners(
    config: &Config,
    handed: &mut Option<upgrade::Handed>,
) -> anyhow::Result<Vec<Vec<TcpListener>>> {
    let workers = config.workers;
    let mut per_worker: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut offered = handed
        .as_mut()
        .map(|h| std::mem::take(&mut h.listeners))
        .unwrap_or_default();
    for addr in config.listeners.iter().map(|l| l.address) {
        let sockets = match offered.iter().position(|(a, _)| *a == addr) {
            Some(i) => {
                let (_, sockets) = offered.swap_remove(i);
                if sockets.len() != workers {
                    bail!(
                        "`gateway.workers` changed ({} to {workers}): an upgrade takes over one listening socket per worker; restart to change the worker count",
                        sockets.len()
                    );
                }
                sockets
            }
            None => {
                runtime::bind_reuseport(addr, workers).with_context(|| format!("binding {addr}"))?
            }
        };
        for (i, s) in sockets.into_iter().enumerate() {
            per_worker[i].push(s);
        }
    }
    // Listeners the new configuration no longer has: closed here; the old process closes its
    // copies when it exits.
    drop(offered);
    Ok(per_worker)
}

/// The admin listener (the running gateway's when taking over at the same address), and a
/// duplicate kept to hand over in an upgrade, and to serve again if one fails.
pub(super) async fn bind_admin(
    config: &Config,
    handed: &mut Option<upgrade::Handed>,
) -> anyhow::Result<(tokio::net::TcpListener, TcpListener)> {
    let admin_std = match handed
        .as_mut()
        .filter(|h| h.offer.admin == config.admin)
        .and_then(|h| h.admin.take())
    {
        Some(admin) => admin,
        None => tokio::net::TcpListener::bind(config.admin)
            .await
            .and_then(tokio::net::TcpListener::into_std)
            .with_context(|| format!("binding the admin listener {}", config.admin))?,
    };
    admin_std.set_nonblocking(true)?;
    let admin_keep = admin_std
        .try_clone()
        .context("duplicating the admin socket")?;
    let admin_listener = tokio::net::TcpListener::from_std(admin_std)?;
    Ok((admin_listener, admin_keep))
}

/// The state every thread shares, made from `config`: sealing session ids with the fleet's key
/// (or the running gateway's, when taking over), and keeping the running gateway's hash seed
/// and ended sessions.
pub(super) fn share(
    config: Config,
    handed: Option<&upgrade::Handed>,
    ended_sessions: Vec<(u64, u64)>,
    fleet_start: Option<&crate::fleet::Start>,
) -> Arc<Shared> {
    let fleet_key = fleet_start.and_then(|s| s.session_key);
    let mut shared = Shared::new(config);
    if let Some(key) = fleet_key {
        shared.session_key = key;
    } else if let Some(h) = handed {
        // Sessions opened before the upgrade stay valid.
        shared.session_key = h.offer.session_key;
    }
    if let Some(h) = handed {
        // Keyed hashes mean what they meant in the old process (the owners of held sessions
        // and stdio children).
        shared.limits = Arc::new(crate::policy::limits::State::with_seed(h.offer.hash_seed));
        // Sessions its clients ended stay ended.
        for (session, when) in ended_sessions {
            shared.ended_sessions.absorb(session, when);
        }
    }
    let shared = Arc::new(shared);
    if let Some(start) = fleet_start {
        if let Some(agreed) = &start.agreed {
            let _ = shared.fleet.session_agreed.set(agreed.clone());
        }
        // Until the agent's first round: rates at this host's share of the live hosts.
        shared.fleet.hosts.store(start.hosts, Relaxed);
        shared
            .limits
            .set_fleet(crate::policy::limits::FLEET_LEASED, start.hosts);
    }
    shared
}

/// The state store opened and what it kept loaded into `shared` (pins, approvals, budget
/// windows); the bans it kept, in force at once in user space when there is no kernel program
/// (the control thread restores them into the kernel's maps otherwise).
pub(super) fn restore_state(
    shared: &Shared,
    state: &crate::config::StateConfig,
) -> anyhow::Result<Kept> {
    let (store, kept_bans, auto_bans) = match &state.dir {
        Some(dir) => {
            let mut store = crate::state::Store::open(dir)?;
            let loaded = store.load(&shared.pins, &shared.limits)?;
            tracing::info!(
                file = %store.path().display(),
                pins = loaded.pins,
                windows = loaded.windows,
                bans = loaded.bans.len(),
                "state store loaded"
            );
            shared.state.enabled.store(true, Relaxed);
            shared.state.bytes.store(store.bytes(), Relaxed);
            (Some(store), loaded.bans, loaded.auto_bans)
        }
        None => {
            tracing::warn!("state.disabled: budgets, pins and approvals start afresh on every run");
            (None, Vec::new(), Vec::new())
        }
    };
    if !kept_bans.is_empty() && !config_kernel_enabled(shared) {
        shared
            .bans
            .store(Arc::new(BanSet::new(kept_bans.iter().map(|(ip, left)| {
                (*ip, kernel::monotonic_after(kernel::monotonic_ns(), *left))
            }))));
    }
    Ok(Kept {
        store,
        bans: kept_bans,
        auto_bans,
    })
}

/// What the state store kept from an earlier run.
pub(super) struct Kept {
    /// The store (none when `[state] disabled`).
    pub store: Option<crate::state::Store>,
    /// Bans not yet ended, with the time each has left.
    pub bans: Vec<(IpNet, Duration)>,
    /// Those that were auto-bans, with the time they were made to last.
    pub auto_bans: Vec<(IpNet, Duration)>,
}

impl Control {
    /// The control thread's state as it starts serving, with the bans kept in the pinned map
    /// by an earlier run in force for PROXY protocol clients too, and those the store kept.
    pub(super) fn start(
        shared: &Arc<Shared>,
        maps: Option<KernelMaps>,
        config_path: Option<PathBuf>,
        tls_stamps: Vec<crate::tls::Stamp>,
        kept: Kept,
        kernel: Option<&Kernel>,
        kernel_hosts: u64,
    ) -> anyhow::Result<Arc<Mutex<Control>>> {
        let xdp = kernel
            .map(|k| {
                k.attachments()
                    .iter()
                    .map(|a| (a.interface.clone(), a.mode.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        let log = match &shared.snapshot.load().config.telemetry.histogram_log {
            Some(path) => Some(
                HistogramLog::create(path)
                    .with_context(|| format!("creating the histogram log {}", path.display()))?,
            ),
            None => None,
        };
        let max_tools = shared.snapshot.load().config.telemetry.max_tools;
        let control = Arc::new(Mutex::new(Control {
            shared: Arc::clone(shared),
            maps,
            config_path,
            stats: Aggregator::new(max_tools, log),
            ready: true,
            tls_stamps,
            upstream_tls_stamps: crate::tls::upstream_stamps(&shared.snapshot.load().config),
            bans: std::collections::BTreeMap::new(),
            auto_bans: std::collections::BTreeMap::new(),
            store: kept.store,
            store_failing: false,
            successor: None,
            counts_at_close: std::collections::HashMap::new(),
            xdp,
            xdp_missing: Vec::new(),
            xdp_reattached: 0,
            reloads: Reloads::default(),
            kernel_hosts,
            caps_written: false,
            id_holders: std::collections::HashMap::new(),
        }));
        lock(&control).note_id_holders();
        // Bans kept in the pinned map by an earlier run hold for PROXY protocol clients too.
        lock(&control).refresh_bans();
        lock(&control).restore_bans(kept.bans);
        lock(&control).adopt_auto_bans(kept.auto_bans);
        Ok(control)
    }
}

/// What the workers need before they serve: the links taken over running this program, the
/// open-file limit raised, the stdio servers' supervisor and the listeners' certificates.
pub(super) fn prepare_serving(
    shared: &Arc<Shared>,
    kernel: &mut Option<Kernel>,
    taken_over: &[(String, kernel::AttachedMode)],
) -> anyhow::Result<()> {
    if let Some(k) = kernel.as_mut() {
        // Attached again, should it come to that, in the mode the configuration asks for.
        let requested = shared.snapshot.load().config.kernel.mode;
        for (iface, mode) in taken_over {
            k.take_over(iface, *mode, requested)?;
            tracing::info!(interface = %iface, mode = mode.as_str(), "XDP program replaced through the pinned link");
        }
    }
    let open_files = runtime::raise_open_files_limit();
    shared
        .open_files_limit
        .store(open_files, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(open_files, "open-file limit");
    shared
        .stdio
        .set_gate(Arc::new(StdioPins(Arc::downgrade(shared))));
    shared.stdio.sync(
        shared
            .snapshot
            .load()
            .config
            .upstreams
            .iter()
            .filter_map(|u| u.stdio.as_ref()),
    );
    {
        let config = &shared.snapshot.load().config;
        let tls = shared
            .tls
            .prepare(config)
            .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
        shared.tls.publish(tls);
    }
    Ok(())
}

/// Says where the gateway serves, gives back what the start freed, and tells systemd it is
/// ready (listeners bound and the XDP program attached: it may route traffic).
pub(super) fn announce(
    workers: usize,
    listeners: &[crate::config::Listener],
    admin_tls: bool,
    admin_addr: std::net::SocketAddr,
) {
    tracing::info!(
        workers,
        driver = runtime::driver_name(),
        "data plane running"
    );
    for l in listeners {
        let scheme = if l.tls.is_some() { "https" } else { "http" };
        tracing::info!("MCP endpoint: {scheme}://{}/mcp", l.address);
    }
    let scheme = if admin_tls { "https" } else { "http" };
    tracing::info!(
        "metrics: {scheme}://{admin_addr}/metrics  health: {scheme}://{admin_addr}/healthz"
    );
    // What the start freed (the eBPF object and the kernel's BTF parsed to load it, the
    // configuration's sources) goes back to the system now: this thread allocates little from
    // here on, and mimalloc purges freed pages only on later allocations.
    // SAFETY: mi_collect has no preconditions; it only walks this thread's heap.
    unsafe { libmimalloc_sys::mi_collect(true) };
    crate::service::ready(&format!(
        "serving: {} listeners, {workers} workers",
        listeners.len()
    ));
}

/// Tells the running gateway this one is ready, and detaches the program from the interfaces
/// the old configuration named and the new one does not.
pub(super) fn finish_takeover(
    s: &upgrade::Successor,
    h: &upgrade::Handed,
    kernel: Option<&Kernel>,
    shared: &Arc<Shared>,
) {
    if let Err(e) = s.ready() {
        tracing::warn!("the gateway handing over did not hear this one is ready: {e}");
    }
    // What the old process counts while it drains comes when it has drained.
    let limits = Arc::clone(&shared.limits);
    if let Err(e) = s.take_late(move |counts| {
        let n = counts
            .into_iter()
            .filter(|(what, count)| limits.add_late(what.clone(), *count))
            .count();
        tracing::info!(
            counts = n,
            "added what the gateway that handed over counted while it drained"
        );
    }) {
        tracing::warn!("cannot wait for what the gateway handing over counts while it drains: {e}");
    }
    // Interfaces the old configuration named and the new one does not: detached now.
    if let Some(k) = kernel {
        for (iface, _) in &h.offer.attachments {
            if !k.attachments().iter().any(|a| &a.interface == iface) {
                let pin = k.pin_dir().join(format!("link_{iface}"));
                match kernel::remove_stale_link(&pin) {
                    Ok(_) => {
                        tracing::info!(interface = %iface, "XDP program detached (no longer configured)")
                    }
                    Err(e) => {
                        tracing::error!(interface = %iface, "detaching the XDP program failed: {e}")
                    }
                }
            }
        }
    }
    tracing::info!(from = h.offer.pid, "took over from the running gateway");
}

/// What runs until the control thread stops: the workers, the duplicates of their listening
/// sockets, and the control thread's tasks.
pub(super) struct Serving {
    pub stop_tx: watch::Sender<bool>,
    pub threads: Vec<std::thread::JoinHandle<()>>,
    /// At shutdown the control thread stops them listening itself, at once, whatever the
    /// workers are doing.
    pub listening: Vec<TcpListener>,
    pub resolver: tokio::task::JoinHandle<()>,
    pub spans: tokio::task::JoinHandle<()>,
    pub fleet: Option<tokio::task::JoinHandle<()>>,
}

impl Serving {
    /// Drains: the workers stop accepting and finish what they serve within `grace`; then
    /// the state is flushed, stdio servers stopped, and the kernel program released to the
    /// upgraded gateway (`handed_to`) or detached.
    pub(super) async fn stop(
        self,
        admin: AdminServer,
        handed_to: Option<u32>,
        grace: Duration,
        control: &Arc<Mutex<Control>>,
        shared: &Shared,
        mut kernel: Option<Kernel>,
    ) -> anyhow::Result<()> {
        let Serving {
            stop_tx,
            threads,
            listening,
            resolver,
            spans,
            fleet,
        } = self;
        if let Some(pid) = handed_to {
            // The listening sockets are the new process's now: no shutdown(2) on them (that
            // would stop them for it too); the workers stopped accepting already.
            shared.handing_over.store(true, Relaxed);
            tracing::info!(
                new_pid = pid,
                grace_ms = shared.drain_for(grace).as_millis() as u64,
                "handed over to the upgraded gateway: draining"
            );
        } else {
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: no new connections, draining"
            );
        }
        lock(control).ready = false;
        if handed_to.is_none() {
            // After a handover the service goes on in the new process.
            crate::service::stopping();
        }
        let _ = stop_tx.send(true);
        if handed_to.is_none() {
            for l in &listening {
                // SAFETY: shutdown(2) on a socket this thread holds a duplicate of.
                unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(l), libc::SHUT_RDWR) };
            }
        }
        drop(listening);
        admin.abort();
        resolver.abort();
        spans.abort();
        if let Some(f) = &fleet {
            f.abort();
        }
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        if tokio::time::timeout(shared.drain_for(grace) + Duration::from_secs(1), joined)
            .await
            .is_err()
        {
            tracing::warn!("workers did not stop in time");
        }
        // After the workers: what they counted while draining is written too, or after a
        // handover, sent to the new process.
        lock(control).flush_last();
        lock(control).send_late();
        shared.stdio.stop_all().await;
        if let Some(k) = &mut kernel {
            if handed_to.is_some() {
                // The links run the new process's program now.
                k.release();
            } else {
                k.detach_all()?;
                tracing::info!(
                    "XDP program detached; maps stay pinned under {}",
                    k.pin_dir().display()
                );
            }
        }
        if handed_to.is_some() {
            tracing::info!("drained; exiting");
        }
        Ok(())
    }
}
