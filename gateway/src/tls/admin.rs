//! TLS on the admin listener (control thread, tokio): connections are accepted and their
//! handshakes run in tasks of their own, so one slow client cannot hold the others' accepts;
//! finished ones are handed to the admin server (`admin_server`), at most as many at once as
//! it holds connections. The configuration is the published `Edge::admin`, read
//! per connection, so a reload changes what new connections get.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpStream, sync::mpsc};
use tokio_rustls::server::TlsStream;

use super::Edge;

pub struct Listener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Accepts on `tcp` and runs each handshake with what `edge.admin` holds at that moment.
pub fn listen(
    tcp: tokio::net::TcpListener,
    edge: Arc<Edge>,
    per_address: crate::admin_server::PerAddress,
) -> std::io::Result<Listener> {
    let (tx, ready) = mpsc::channel(64);
    // Handshakes at once: as many as connections may be open, in all and from one address
    // (each ends within the handshake timeout). Past them, the handshake waiting longest is
    // given up for the new one (connections that never began theirs, reopened as they were
    // closed, kept every health check and scrape out); from an address over its count, a
    // connection is closed as it comes.
    let handshakes = crate::admin_server::Slots::new(
        crate::admin_server::MAX_CONNECTIONS,
        crate::admin_server::LOOPBACK_RESERVED,
        per_address,
    );
    let mut refused = [0u64; 2];
    let accepting = tokio::spawn(async move {
        loop {
            let (stream, peer) = match tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(listening) = edge.admin.load_full() else {
                continue;
            };
            let slot = match handshakes.take(peer.ip()) {
                Ok((slot, given_up_by)) => {
                    if given_up_by.is_some() {
                        edge.stats.failed(super::Failure::Closed);
                    }
                    slot
                }
                Err(why) => {
                    crate::admin_server::say_refused(why, peer, &mut refused);
                    edge.stats.failed(super::Failure::Closed);
                    continue;
                }
            };
            let tx = tx.clone();
            let edge = Arc::clone(&edge);
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&listening.server));
                let handshake =
                    tokio::time::timeout(listening.handshake_timeout, acceptor.accept(stream));
                let done = tokio::select! {
                    done = handshake => done,
                    // Its place given up for a newer connection: this one is closed.
                    () = slot.given_up() => return,
                };
                match done {
                    Err(_) => edge.stats.failed(super::Failure::Timeout),
                    Ok(Err(e)) => {
                        let why = match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
                        {
                            Some(e) => super::classify(
                                &crate::http::HandshakeError::Tls(e.clone()),
                                None,
                                &listening.resolver,
                            ),
                            None => super::Failure::Closed,
                        };
                        tracing::debug!(%peer, reason = why.label(), "admin TLS handshake failed: {e}");
                        edge.stats.failed(why);
                    }
                    Ok(Ok(tls)) => {
                        if !super::finished(tls.get_ref().1, &listening, &edge.stats) {
                            return;
                        }
                        let _ = tx.send((tls, peer)).await;
                    }
                }
            });
        }
    });
    Ok(Listener { ready, accepting })
}

impl crate::admin_server::Accept for Listener {
    type Io = TlsStream<TcpStream>;

    async fn accept(&mut self) -> (Self::Io, crate::admin_server::Peer) {
        match self.ready.recv().await {
            Some((tls, client)) => {
                let local = tls.get_ref().0.local_addr().ok();
                (tls, crate::admin_server::Peer::new(client, local))
            }
            // The accepting task ended (only when aborted): nothing more comes.
            None => std::future::pending().await,
        }
    }
}
