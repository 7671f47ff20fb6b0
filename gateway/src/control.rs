//! The control thread: a single-threaded tokio runtime that owns the configuration, the kernel
//! program and its maps, the admin API, and the closed loop that turns user space's connection
//! counts into the kernel's per-tenant at-cap flags. Nothing here runs on the request path.

use std::{
    net::TcpListener,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{signal::unix::SignalKind, sync::watch};

use crate::{
    config::Config,
    kernel::{self, Kernel, KernelMaps, KernelState},
    runtime::{self, Shared, Snapshot},
    telemetry,
};

/// What the admin API and the control loop share (on the control thread only).
struct Control {
    shared: Arc<Shared>,
    maps: Option<KernelMaps>,
    config_path: Option<PathBuf>,
}

impl Control {
    /// Re-reads the configuration file, validates it and applies it. On any error the running
    /// configuration stays as it was.
    fn reload(&mut self) -> anyhow::Result<String> {
        let Some(path) = &self.config_path else {
            bail!("running on the embedded default configuration: there is no file to reload");
        };
        let new = Config::from_file(path).with_context(|| format!("{} refused", path.display()))?;
        let old = &self.shared.snapshot.load().config;
        for (what, changed) in [
            ("gateway.instance", new.instance != old.instance),
            ("gateway.workers", new.workers != old.workers),
            ("gateway.pin_workers", new.pin_workers != old.pin_workers),
            ("listeners", new.listeners != old.listeners),
            ("admin.address", new.admin != old.admin),
            ("kernel.enabled", new.kernel.enabled != old.kernel.enabled),
            (
                "kernel.interfaces",
                new.kernel.interfaces != old.kernel.interfaces,
            ),
            ("kernel.mode", new.kernel.mode != old.kernel.mode),
        ] {
            if changed {
                bail!("`{what}` changed: that needs a restart; the running configuration is kept");
            }
        }
        if let Some(maps) = &mut self.maps {
            maps.sync(&KernelState::from_config(&new))
                .context("syncing the kernel maps")?;
        }
        self.shared.snapshot.store(Arc::new(Snapshot::new(new)));
        Ok(format!("reloaded {}", path.display()))
    }

    /// Raises or lowers each capped tenant's flag from the workers' connection counts.
    fn update_caps(&mut self) {
        let snap = self.shared.snapshot.load();
        for t in &snap.config.tenants {
            let Some(cap) = t.max_connections else {
                continue;
            };
            let at_cap = self.shared.conns.total(t.id) >= cap;
            if at_cap == self.shared.at_cap(t.id) {
                continue;
            }
            if let Some(maps) = &mut self.maps
                && let Err(e) = maps.set_over_cap(t.id, at_cap)
            {
                tracing::error!(tenant = %t.name, error = %e, "cannot write the at-cap flag");
                continue;
            }
            self.shared.set_at_cap(t.id, at_cap);
            tracing::info!(tenant = %t.name, cap, at_cap, "tenant connection cap");
        }
    }
}

/// Runs the gateway until SIGINT or SIGTERM.
pub fn run(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("control")
        .build()
        .context("starting the control runtime")?
        .block_on(run_async(config, config_path))
}

async fn run_async(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let mut kernel = if config.kernel.enabled {
        let mut k = kernel::load(&config.instance, &config.kernel.pin_dir)?;
        let report = k
            .maps()?
            .sync(&KernelState::from_config(&config))
            .context("syncing the kernel maps")?;
        tracing::debug!(?report, "kernel maps synced");
        for iface in &config.kernel.interfaces {
            let mode = k.attach(iface, config.kernel.mode)?;
            tracing::info!(interface = %iface, mode = mode.as_str(), "XDP program attached");
        }
        Some(k)
    } else {
        tracing::warn!("kernel.enabled = false: no XDP fast path");
        None
    };

    let workers = config.workers;
    let mut per_worker: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    for addr in &config.listeners {
        let sockets =
            runtime::bind_reuseport(*addr, workers).with_context(|| format!("binding {addr}"))?;
        for (i, s) in sockets.into_iter().enumerate() {
            per_worker[i].push(s);
        }
    }
    let admin_listener = tokio::net::TcpListener::bind(config.admin)
        .await
        .with_context(|| format!("binding the admin listener {}", config.admin))?;

    let grace = config.shutdown_grace;
    let pin = config.pin_workers;
    let cap_poll = config.kernel.cap_poll;
    let listeners = config.listeners.clone();
    let admin_addr = config.admin;
    let shared = Arc::new(Shared::new(config));
    // Duplicates of the workers' listening sockets: at shutdown the control thread stops them
    // listening itself, at once, whatever the workers are doing.
    let listening: Vec<TcpListener> = per_worker
        .iter()
        .flatten()
        .map(TcpListener::try_clone)
        .collect::<Result<_, _>>()
        .context("duplicating the listening sockets")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let threads = runtime::spawn_workers(Arc::clone(&shared), per_worker, stop_rx, grace, pin)
        .context("starting workers")?;

    let maps = kernel.as_ref().map(Kernel::maps).transpose()?;
    let control = Arc::new(Mutex::new(Control {
        shared: Arc::clone(&shared),
        maps,
        config_path,
    }));
    let admin = tokio::spawn(serve_admin(admin_listener, Arc::clone(&control)));

    tracing::info!(
        workers,
        driver = runtime::driver_name(),
        "data plane running"
    );
    for l in &listeners {
        tracing::info!("MCP endpoint: http://{l}/mcp");
    }
    tracing::info!("metrics: http://{admin_addr}/metrics  health: http://{admin_addr}/healthz");

    let mut hup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut caps = tokio::time::interval(cap_poll);
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = caps.tick() => lock(&control).update_caps(),
            _ = sweep.tick() => {
                if let Some(maps) = &mut lock(&control).maps
                    && let Err(e) = maps.sweep_bans()
                {
                    tracing::warn!(error = %e, "sweeping expired bans failed");
                }
            }
            _ = hup.recv() => match lock(&control).reload() {
                Ok(msg) => tracing::info!("{msg}"),
                Err(e) => tracing::error!("reload refused: {e:#}"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: no new connections, draining"
    );
    let _ = stop_tx.send(true);
    for l in &listening {
        // SAFETY: shutdown(2) on a socket this thread holds a duplicate of.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(l), libc::SHUT_RDWR) };
    }
    drop(listening);
    admin.abort();
    let joined = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    if tokio::time::timeout(grace + Duration::from_secs(1), joined)
        .await
        .is_err()
    {
        tracing::warn!("workers did not stop in time");
    }
    if let Some(k) = &mut kernel {
        k.detach_all()?;
        tracing::info!(
            "XDP program detached; maps stay pinned under {}",
            k.pin_dir().display()
        );
    }
    Ok(())
}

fn lock(c: &Mutex<Control>) -> std::sync::MutexGuard<'_, Control> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn serve_admin(listener: tokio::net::TcpListener, control: Arc<Mutex<Control>>) {
    use axum::{
        Router,
        http::StatusCode,
        routing::{get, post},
    };
    let metrics = {
        let control = Arc::clone(&control);
        move || {
            let c = lock(&control);
            let body = telemetry::render_metrics(&c.shared, c.maps.as_ref());
            async move { ([("content-type", "text/plain; version=0.0.4")], body) }
        }
    };
    let reload = {
        let control = Arc::clone(&control);
        move || {
            let result = lock(&control).reload();
            async move {
                match result {
                    Ok(msg) => (StatusCode::OK, msg),
                    Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")),
                }
            }
        }
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/reload", post(reload));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin listener failed");
    }
}
