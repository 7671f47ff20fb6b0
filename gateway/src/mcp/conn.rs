//! A client connection on a worker, from accept to close: the PROXY protocol header (behind a
//! load balancer), the TLS handshake (on a TLS listener), then one request after another, each
//! through the stages of [`super::stages`]. A panic while a request is served is contained
//! here: the client is answered 500 and the connection closed; the worker goes on.

use std::{net::SocketAddr, rc::Rc, time::Duration};

use monoio::net::TcpStream;
use tokio::sync::watch;

use super::{RpcError, error, proxy::json_response, worker::WorkerCtx};
use crate::{
    config::Config,
    http::{
        self, HttpError, Io, Limits,
        proxy_protocol::{Header, Reason, read_header},
    },
    shared::{Counted, Shared, Snapshot, SourceRefusal},
};

fn limits(c: &Config) -> Limits {
    Limits {
        max_head: c.http.max_header_bytes,
        max_body: c.http.max_body_bytes,
        request_timeout: c.http.request_timeout,
        idle_timeout: c.http.idle_timeout,
    }
}

/// How long a connection idle between requests is kept open after a binary upgrade handed the
/// listeners over, for a next request already on its way.
const HANDOVER_LINGER: Duration = Duration::from_secs(1);

/// Serves one client connection until it closes, fails, or the worker shuts down.
///
/// Not an `async fn`: an async fn's arguments stay in its future for its whole life beside the
/// locals they are moved into (rust-lang/rust#62958), 144 bytes of every idle connection's task
/// here. The `Io` is made first and the block uses what it captures in place.
pub fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener: usize,
    proxied: bool,
    ctx: Rc<WorkerCtx>,
    shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let mut io = Io::new(stream, Duration::ZERO);
    async move {
        // `listener` is the index of its entry in `Config::listeners`. Behind a load balancer the
        // PROXY protocol header names the client, which is the peer from here on; it comes before
        // the TLS handshake (the balancer writes it in the clear).
        // The PROXY header and the TLS handshake are boxed: done once, their state (a rustls
        // session under construction, KiBs) would otherwise be part of the connection's task for
        // its whole life, which is allocated at its largest.
        let Some((peer, _counted, source_counted)) = Box::pin(admit(
            &mut io,
            peer,
            listener,
            proxied,
            &ctx.shared,
            ctx.worker,
        ))
        .await
        else {
            return;
        };
        if proxied {
            // The client, for a ban or deny of it from now on (`OpenConns::cut_refused`), and
            // the source to give back as it closes.
            ctx.open.named(fd, peer.ip(), source_counted);
        }
        if let Some(tls) = ctx.shared.tls.listener(listener) {
            if !Box::pin(crate::tls::accept(&mut io, &tls, &ctx.shared.tls.stats)).await {
                return;
            }
            // The client certificate the handshake verified, judged again against the
            // listener's `client_ca` when a reload changes it (`OpenConns::cut_refused`).
            if let Some(cert) = io.tls().and_then(crate::policy::mtls::PeerCert::kept_of) {
                ctx.open.certified(fd, listener, tls.serial, cert);
            }
        }
        loop {
            // Idle between requests: a shutdown closes the connection here, never mid-request.
            // The configuration is taken again once the next request came (an idle connection
            // holds none: a reload's old one is not kept by connections gone quiet).
            if io.pending().is_empty() {
                let (idle_timeout, request_timeout) = {
                    let snapshot = ctx.shared.snapshot.load();
                    let http = &snapshot.config.http;
                    (http.idle_timeout, http.request_timeout)
                };
                // A client must take each write (TLS records while waiting too) within the request
                // timeout.
                io.set_send_timeout(request_timeout);
                let handing_over = &ctx.shared.handing_over;
                let mut fill = std::pin::pin!(io.fill_idle(idle_timeout));
                let interrupted = monoio::select! {
                    r = &mut fill => Ok(r),
                    // The worker's stop (the shutdown), without a watch of its own (its wait
                    // was 144 bytes of every idle connection's task).
                    () = http::deadline::Stop::default() => Err(()),
                };
                let first = match interrupted {
                    Ok(r) => r,
                    // After a binary upgrade handed the listeners over, a client between two
                    // requests gets a moment to send its next one, answered with
                    // `connection: close` (it goes to the new process after that): closing at once
                    // could race a request already on its way. The same read goes on, so that no
                    // byte it took is lost.
                    Err(()) if handing_over.load(std::sync::atomic::Ordering::Relaxed) => {
                        // Boxed: its timer would widen every idle connection's task.
                        match Box::pin(monoio::time::timeout(HANDOVER_LINGER, &mut fill)).await {
                            Ok(r) => r,
                            Err(_) => return,
                        }
                    }
                    Err(()) => return,
                };
                if !matches!(first, Ok(n) if n > 0) {
                    return;
                }
            }
            let snapshot = ctx.shared.snapshot.load_full();
            if !still_served(&ctx, &snapshot, peer, fd) {
                return;
            }
            let limits = limits(&snapshot.config);
            io.set_send_timeout(limits.request_timeout);
            // A panic while reading or answering a request is contained here, where the
            // connection outlives it: the client is answered 500 (best effort: the answer may have
            // begun) and the connection closed; the worker goes on.
            // Boxed: the request's state (parsing, policy, the upstream exchange) is many KiB; held
            // inline it would be part of every idle connection's task, which is allocated once at
            // its largest. One allocation per request instead keeps idle connections small.
            // Read after a shutdown began: answered with `connection: close`, the last on this
            // connection.
            let last = *shutdown.borrow();
            let exchange = std::panic::AssertUnwindSafe(Box::pin(serve_one(
                &mut io, &limits, peer, &snapshot, &ctx, last,
            )));
            match futures_util::FutureExt::catch_unwind(exchange).await {
                Ok(true) if !*shutdown.borrow() => {}
                // Answered as keep-alive before the handover began: the next request (if it comes
                // soon) is answered with `connection: close`.
                Ok(true)
                    if ctx
                        .shared
                        .handing_over
                        .load(std::sync::atomic::Ordering::Relaxed) => {}
                Ok(_) => return,
                Err(_) => {
                    ctx.shared
                        .panics
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(%peer, "a request panicked; answered 500 and closed the connection");
                    let err = RpcError::new(error::INTERNAL_ERROR, "internal error", 500);
                    let _ = Box::pin(io.write_all(json_response(500, &err, false))).await;
                    return;
                }
            }
        }
    }
}

/// Reads one request and answers it; returns whether the connection can carry another.
async fn serve_one(
    io: &mut Io,
    limits: &Limits,
    peer: SocketAddr,
    snapshot: &Snapshot,
    ctx: &WorkerCtx,
    last: bool,
) -> bool {
    let mut req = match http::read_request(io, limits).await {
        Ok(req) if last => http::Request {
            keep_alive: false,
            ..req
        },
        Ok(req) => req,
        Err(http::Unread {
            error: HttpError::Closed,
            ..
        }) => return false,
        Err(unread) => {
            super::stages::unread(io, unread, peer, snapshot, ctx).await;
            return false;
        }
    };
    inject_fault(&req);
    // Read under the configuration in force when its first bytes came; judged by the one in
    // force once it is read. A reload in between applies to it: a request begun before a
    // reload that revoked its API key, sent on to its end up to the request timeout later, was
    // served under the old configuration (a review of the revocation).
    let current;
    let snapshot = if ctx.shared.snapshot.load().serial == snapshot.serial {
        snapshot
    } else {
        current = ctx.shared.snapshot.load_full();
        if !still_served(ctx, &current, peer, std::os::fd::AsRawFd::as_raw_fd(&*io)) {
            return false;
        }
        &*current
    };
    super::stages::handle(io, &mut req, peer, snapshot, ctx).await && req.keep_alive
}

/// Whether connection `fd`'s client is still served under `snapshot`; if not, the caller
/// closes it. A client banned (auto-ban, `/bans`, the fleet) or denied (a reload) since its
/// connection was taken is served nothing more on it: the kernel program drops a direct
/// client's packets from then on, but not those of a client behind a balancer, nor of one it
/// does not see. Nor is one whose client certificate its listener no longer accepts (a reload
/// took its CA out of `client_ca`, or it expired): a new handshake would be refused.
fn still_served(
    ctx: &WorkerCtx,
    snapshot: &Snapshot,
    peer: SocketAddr,
    fd: std::os::fd::RawFd,
) -> bool {
    if let Some(why) = ctx.shared.source_refusal(snapshot, peer.ip()) {
        ctx.open.refused(fd, why, &ctx.shared);
        tracing::debug!(%peer, reason = ?why, "connection closed before its next request");
        return false;
    }
    if !ctx.open.certificate_holds(fd, &ctx.shared) {
        tracing::debug!(%peer, "connection closed before its next request: its client certificate is no longer accepted");
        return false;
    }
    true
}

/// The first step on every client connection. On a listener without the PROXY protocol when
/// the connection was accepted (`proxied` false) it changes nothing: the socket's peer is the
/// client, already counted for its tenant then. On one with it: an untrusted source is closed
/// at once; otherwise the header is read, and the client it names must not be banned or
/// denied and its tenant not at its cap. Returns the client (the peer for everything after)
/// and the connection's count for the client's tenant, held until the connection ends; `None`
/// when the connection is refused (and counted): the caller closes it.
async fn admit<'s>(
    io: &mut Io,
    peer: SocketAddr,
    listener: usize,
    proxied: bool,
    shared: &'s Shared,
    worker: usize,
) -> Option<Admitted<'s>> {
    if !proxied {
        return Some((peer, None, false));
    }
    let (accept, timeout) = {
        let snapshot = shared.snapshot.load();
        let Some(pp) = snapshot
            .config
            .listeners
            .get(listener)
            .and_then(|l| l.proxy_protocol.as_ref())
        else {
            // A reload took the PROXY protocol off the listener since: the peer is the
            // client, counted as one accepted now would be (it was counted for no tenant).
            return admit_client(shared, worker, peer, None);
        };
        let source = peer.ip().to_canonical();
        if !pp.trusted.iter().any(|net| net.contains(&source)) {
            return refuse(shared, peer, Reason::UntrustedSource);
        }
        (pp.version, pp.header_timeout)
    };
    let header = match read_header(io, accept, timeout).await {
        Ok(h) => h,
        Err(reason) => return refuse(shared, peer, reason),
    };
    let client = match header {
        Header::Client(client) => {
            let refusal = shared.source_refusal(&shared.snapshot.load(), client.ip());
            match refusal {
                Some(SourceRefusal::Banned) => return refuse(shared, client, Reason::Banned),
                Some(SourceRefusal::Denied) => return refuse(shared, client, Reason::Denied),
                None => client,
            }
        }
        Header::Local => peer,
    };
    admit_client(shared, worker, client, Some(&header))
}

/// A connection taken: its client, counted for its tenant until dropped (behind a balancer),
/// and whether it was counted for its source.
type Admitted<'s> = (SocketAddr, Option<Counted<'s>>, bool);

/// Counts `client`'s connection for its tenant, unless the tenant is at its cap or the
/// client's source at the tenant's cap per source.
fn admit_client<'s>(
    shared: &'s Shared,
    worker: usize,
    client: SocketAddr,
    header: Option<&Header>,
) -> Option<Admitted<'s>> {
    let snapshot = shared.snapshot.load();
    let tenant = snapshot.classifier.tenant_of(client.ip());
    if !shared.enter_conn(&snapshot, worker, tenant) {
        return refuse(shared, client, Reason::TenantAtCap);
    }
    let counted = shared.conns.counted(worker, tenant);
    let Ok(source_counted) = shared.enter_source(&snapshot, tenant, client.ip()) else {
        return refuse(shared, client, Reason::SourceAtCap);
    };
    if let Some(header) = header {
        shared.proxy_protocol.accept(header);
    }
    Some((client, Some(counted), source_counted))
}

fn refuse<T>(shared: &Shared, who: SocketAddr, reason: Reason) -> Option<T> {
    shared.proxy_protocol.refuse(reason);
    tracing::debug!(peer = %who, reason = reason.name(), "PROXY protocol: connection refused");
    None
}

pub(crate) fn fault_injection() -> bool {
    static ENABLED: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        std::env::var_os("MCP_GATEWAY_FAULT_INJECTION").is_some_and(|v| v == "1")
    });
    *ENABLED
}

/// Test-only fault injection, off unless the process was started with
/// `MCP_GATEWAY_FAULT_INJECTION=1` (the containment tests use it; nothing else should): a
/// request carrying `x-fault-inject: panic-connection` panics its connection task, one carrying
/// `panic-worker` panics the worker's runtime.
#[cfg_attr(
    not(test),
    expect(
        clippy::panic,
        reason = "the panics the containment tests ask for, and only those"
    )
)]
fn inject_fault(req: &crate::http::Request) {
    if !fault_injection() {
        return;
    }
    match req.header_str("x-fault-inject") {
        Some("panic-connection") => panic!("fault injection: a connection task panics"),
        Some("panic-worker") => {
            // A task of its own, outside any connection's containment: the runtime dies.
            monoio::spawn(async { panic!("fault injection: a worker panics") });
        }
        _ => {}
    }
}
