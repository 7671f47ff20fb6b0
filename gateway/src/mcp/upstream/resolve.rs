//! The control thread's re-resolution of the upstreams' host names, every `resolve_every_ms`
//! each: the results go to their [`crate::endpoints::Addresses`] (a failure, or nothing found,
//! keeps the last good addresses, logged and counted here). Workers never resolve names.

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::shared::Shared;

/// How the loop resolves a name (a parameter so that tests can stand in for DNS).
pub trait Lookup: Clone + 'static {
    fn lookup(
        &self,
        host: String,
        port: u16,
    ) -> impl Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'static;
}

/// The system resolver (getaddrinfo on tokio's blocking pool), at most 5 s per name.
#[derive(Clone)]
pub struct System;

impl Lookup for System {
    #[expect(
        clippy::manual_async_fn,
        reason = "the future must not borrow the resolver: it runs on a task of its own"
    )]
    fn lookup(
        &self,
        host: String,
        port: u16,
    ) -> impl Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'static {
        async move {
            match tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::lookup_host((host.as_str(), port)),
            )
            .await
            {
                Ok(found) => Ok(found?.collect()),
                Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
            }
        }
    }
}

/// The control thread's loop: every 100 ms, starts a resolution for each upstream of the
/// current configuration whose interval has passed (each on its own task, so that one slow
/// name holds up no other).
pub async fn run(shared: Arc<Shared>, lookup: impl Lookup) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snapshot = shared.snapshot.load_full();
        let now = Instant::now();
        for up in &snapshot.config.upstreams {
            for addrs in &up.replicas.sources {
                if !addrs.start_if_due(now) {
                    continue;
                }
                let addrs = Arc::clone(addrs);
                let replicas = Arc::clone(&up.replicas);
                let name = up.name.clone();
                let stats = Arc::clone(&shared.upstream_stats);
                let (host, port) = addrs.host();
                let found = lookup.lookup(host.to_owned(), port);
                tokio::spawn(async move {
                    let resolved = addrs.apply(&name, found.await);
                    stats.bump(&name, "resolve", if resolved { "ok" } else { "failed" });
                    if resolved {
                        // Every address is an endpoint: the upstream's list follows.
                        replicas.refresh();
                    }
                });
            }
        }
    }
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
