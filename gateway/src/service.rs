//! Talking to systemd when it runs the gateway as a `Type=notify` service: `READY=1` once the
//! listeners are bound and the XDP program attached, `WATCHDOG=1` from the control thread while
//! every worker serves, `STOPPING=1` when draining starts. Each is a no-op without
//! `NOTIFY_SOCKET` (not under systemd). Never called from a worker.

use std::time::Duration;

/// Tells the service manager the gateway serves (`READY=1`, with a status line).
pub fn ready(status: &str) {
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Tells the service manager the gateway is draining (`STOPPING=1`).
pub fn stopping() {
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
}

/// How often to ping the watchdog: half of `WatchdogSec=` (`$WATCHDOG_USEC`, when
/// `$WATCHDOG_PID` is unset or names this process), as sd_watchdog_enabled(3) advises; `None`
/// without a watchdog.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| (d / 2).max(Duration::from_millis(10)))
}

/// One watchdog ping (`WATCHDOG=1`). The caller pings only while the gateway is healthy, so a
/// stuck control thread or a dead worker lets systemd restart it.
pub fn watchdog() {
    notify(&[sd_notify::NotifyState::Watchdog]);
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
    }
}
