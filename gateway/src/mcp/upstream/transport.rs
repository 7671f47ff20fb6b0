//! Opening a connection to an upstream: TCP to its current address, then, for an https
//! upstream, the TLS handshake, all within the connect timeout. A connection whose handshake
//! did not complete is never used: there is no fallback to plaintext.

use monoio::net::TcpStream;

use super::UpstreamFailure;
use crate::endpoints::{Stats, tls};
use crate::{config::Upstream, http::Io};

pub async fn connect(
    up: &Upstream,
    addr: std::net::SocketAddr,
    stats: &Stats,
) -> Result<Io, UpstreamFailure> {
    let deadline = monoio::time::Instant::now() + up.connect_timeout;
    let mut io = match monoio::time::timeout(up.connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(UpstreamFailure::Connect(format!(
                "connecting to {} timed out",
                up.name
            )));
        }
        Ok(Err(e)) if crate::host::is_out_of_descriptors(&e) => {
            stats
                .out_of_descriptors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(UpstreamFailure::OutOfDescriptors);
        }
        Ok(Err(e)) => {
            return Err(UpstreamFailure::Connect(format!(
                "connecting to {}: {e}",
                up.name
            )));
        }
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Io::new(s, up.response_timeout)
        }
    };
    let Some(t) = &up.tls else {
        stats.bump(&up.name, "connect", "none");
        return Ok(io);
    };
    let failed = |reason: &'static str, detail: String| {
        stats.bump(&up.name, "tls_failure", reason);
        UpstreamFailure::Tls { reason, detail }
    };
    let session =
        rustls::ClientConnection::new(std::sync::Arc::clone(&t.config), t.server_name.clone())
            .map_err(|e| failed(tls::reason(&e), format!("TLS to {}: {e}", up.name)))?;
    match io
        .handshake(rustls::Connection::Client(session), deadline)
        .await
    {
        Ok(()) => {
            let resumed =
                io.tls().and_then(|c| c.handshake_kind()) == Some(rustls::HandshakeKind::Resumed);
            stats.bump(
                &up.name,
                "connect",
                if resumed { "resumed" } else { "full" },
            );
            Ok(io)
        }
        Err(crate::http::HandshakeError::Tls(e)) => {
            let reason = tls::reason(&e);
            Err(failed(
                reason,
                format!("TLS handshake with {} failed ({reason}): {e}", up.name),
            ))
        }
        Err(crate::http::HandshakeError::Timeout) => Err(failed(
            "timeout",
            format!("TLS handshake with {} timed out", up.name),
        )),
        Err(crate::http::HandshakeError::Closed) => Err(failed(
            "closed",
            format!("{} closed the connection during the TLS handshake", up.name),
        )),
    }
}
