//! The admin API's connections (control thread, tokio), served by hyper with bounds a listener
//! open to a network needs: at most [`MAX_CONNECTIONS`] at once (one more is closed as it is
//! accepted, so idle connections cannot take the process's file descriptors, which the data
//! plane shares), a request head within [`HEAD_TIMEOUT`] (the wait for the next request on a
//! kept-alive connection counts: an idle connection is closed after it) and a body within
//! [`BODY_TIMEOUT`] (see `control::admin`). axum's own `serve` has neither bound.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};

/// Admin connections open at once.
pub const MAX_CONNECTIONS: usize = 128;
/// From the connection's start, or the end of its last answer, to the end of a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// From the request head to the end of its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of an admin connection, and on which address it arrived (what the
/// token-less admin API asks of the socket table).
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub client: SocketAddr,
    pub local: Option<SocketAddr>,
}

/// An accepted connection's stream and its [`Peer`].
pub trait Accept {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = (Self::Io, Peer)> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&mut self) -> (Self::Io, Peer) {
        loop {
            match tokio::net::TcpListener::accept(self).await {
                Ok((stream, client)) => {
                    let local = stream.local_addr().ok();
                    return (stream, Peer { client, local });
                }
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    // Out of descriptors, say: the next try comes a little later.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Serves `app` on what `listener` accepts until `stop` turns true; then accepts no more and
/// lets each open connection finish the request it is on.
pub async fn serve(mut listener: impl Accept, app: axum::Router, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refused = 0u64;
    loop {
        let (io, peer) = tokio::select! {
            () = stopped(&mut stop) => return,
            accepted = listener.accept() => accepted,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Counted, and said once per 1,000, so that a flood is not also a flood of lines.
            if refused.is_multiple_of(1000) {
                tracing::warn!(
                    client = %peer.client,
                    "admin API: {MAX_CONNECTIONS} connections are open, a new one is closed ({} so far)",
                    refused + 1
                );
            }
            refused += 1;
            continue;
        };
        let app = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(
                    TokioIo::new(io),
                    hyper_util::service::TowerToHyperService::new(app),
                );
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// Once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
