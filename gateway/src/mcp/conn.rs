//! A client connection on a worker, from accept to close: the PROXY protocol header (behind a
//! load balancer), the TLS handshake (on a TLS listener), then one request after another, each
//! through the stages of [`super::stages`]. A panic while a request is served is contained
//! here: the client is answered 500 and the connection closed; the worker goes on.

use std::{net::SocketAddr, rc::Rc, time::Duration};

use monoio::net::TcpStream;
use tokio::sync::watch;

use super::{
    RpcError, error,
    proxy::{WorkerCtx, json_response},
};
use crate::{
    config::Config,
    http::{self, HttpError, Io, Limits},
    runtime::Snapshot,
};

fn limits(c: &Config) -> Limits {
    Limits {
        max_head: c.http.max_header_bytes,
        max_body: c.http.max_body_bytes,
        request_timeout: c.http.request_timeout,
        idle_timeout: c.http.idle_timeout,
    }
}

/// Serves one client connection until it closes, fails, or the worker shuts down.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener: usize,
    ctx: Rc<WorkerCtx>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut io = Io::new(stream, Duration::ZERO);
    // `listener` is the index of its entry in `Config::listeners`. Behind a load balancer the
    // PROXY protocol header names the client, which is the peer from here on; it comes before
    // the TLS handshake (the balancer writes it in the clear).
    let Some((peer, _counted)) =
        http::proxy_protocol::admit(&mut io, peer, listener, &ctx.shared, ctx.worker).await
    else {
        return;
    };
    if let Some(tls) = ctx.shared.tls.listener(listener)
        && !crate::tls::accept(&mut io, &tls, &ctx.shared.tls.stats).await
    {
        return;
    }
    loop {
        let snapshot = ctx.shared.snapshot.load_full();
        let limits = limits(&snapshot.config);
        // A client must take each write of an answer within the request timeout.
        io.set_send_timeout(limits.request_timeout);
        // Idle between requests: a shutdown closes the connection here, never mid-request.
        if io.pending().is_empty() {
            let first = monoio::select! {
                r = io.fill_idle(limits.idle_timeout) => r,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            if !matches!(first, Ok(n) if n > 0) {
                return;
            }
        }
        // A panic while reading or answering a request is contained here, where the
        // connection outlives it: the client is answered 500 (best effort: the answer may have
        // begun) and the connection closed; the worker goes on.
        // Boxed: the request's state (parsing, policy, the upstream exchange) is many KiB; held
        // inline it would be part of every idle connection's task, which is allocated once at
        // its largest. One allocation per request instead keeps idle connections small.
        let exchange = std::panic::AssertUnwindSafe(Box::pin(serve_one(
            &mut io, &limits, peer, &snapshot, &ctx,
        )));
        match futures_util::FutureExt::catch_unwind(exchange).await {
            Ok(true) if !*shutdown.borrow() => {}
            Ok(_) => return,
            Err(_) => {
                ctx.shared
                    .panics
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(%peer, "a request panicked; answered 500 and closed the connection");
                let err = RpcError::new(error::INTERNAL_ERROR, "internal error", 500);
                let _ = io.write_all(json_response(500, &err, false)).await;
                return;
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
) -> bool {
    let mut req = match http::read_request(io, limits).await {
        Ok(req) => req,
        Err(HttpError::Closed) => return false,
        Err(e) => {
            let err = RpcError::invalid_request(e.to_string());
            let _ = io.write_all(json_response(e.status(), &err, false)).await;
            return false;
        }
    };
    super::stages::handle(io, &mut req, peer, snapshot, ctx).await && req.keep_alive
}
