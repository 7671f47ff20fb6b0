//! The load generator's connections: plain TCP or TLS (rustls, client side) over a monoio
//! socket. The TLS records are moved by hand (`read_tls`/`write_tls` against buffers the
//! socket reads and writes), so the bench shares no TLS code with the gateway it measures.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    sync::Arc,
};

use monoio::{
    buf::IoBufMut,
    io::{AsyncReadRent, AsyncWriteRentExt},
    net::TcpStream,
};
use rustls::{ClientConfig, ClientConnection, pki_types::ServerName};

/// How a load connection is made.
#[derive(Debug, Clone, Default)]
pub struct Connect {
    /// TLS on every connection, if set.
    pub tls: Option<TlsClient>,
    /// A new connection (and, with TLS, a new handshake) for every request, closed after its
    /// answer; otherwise one keep-alive connection for as long as the server keeps it.
    pub per_request: bool,
}

/// A client TLS configuration and the name it asks for (SNI and certificate check).
#[derive(Debug, Clone)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

pub struct TlsConn {
    tcp: TcpStream,
    tls: ClientConnection,
    /// The socket's read buffer, lent to each read.
    chunk: Option<Vec<u8>>,
    /// The server sent close_notify.
    closed: bool,
}

const CHUNK: usize = 16 * 1024;

/// A connection to `target`, TLS handshake done if `connect` asks for TLS. Errors are the load's
/// error kinds: `connect failed` or `handshake failed`.
pub async fn connect(target: SocketAddr, connect: &Connect) -> Result<Conn, &'static str> {
    let tcp = TcpStream::connect(target)
        .await
        .map_err(|_| "connect failed")?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &connect.tls else {
        return Ok(Conn::Plain(tcp));
    };
    let session = ClientConnection::new(tls.config.clone(), tls.server_name.clone())
        .map_err(|_| "handshake failed")?;
    let mut conn = TlsConn {
        tcp,
        tls: session,
        chunk: Some(vec![0; CHUNK]),
        closed: false,
    };
    conn.handshake().await.map_err(|_| "handshake failed")?;
    Ok(Conn::Tls(Box::new(conn)))
}

impl Conn {
    pub async fn write_all(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        match self {
            Conn::Plain(tcp) => tcp.write_all(bytes).await.0.map(drop),
            Conn::Tls(t) => {
                t.tls.writer().write_all(&bytes)?;
                t.flush().await
            }
        }
    }

    /// Appends what arrives next to `buf`; false when the connection is closed or failed.
    pub async fn read_more(&mut self, buf: &mut Vec<u8>) -> bool {
        match self {
            Conn::Plain(tcp) => {
                // Into the buffer's free room: no chunk zeroed, filled and copied per read.
                if buf.capacity() - buf.len() < CHUNK / 2 {
                    buf.reserve(CHUNK);
                }
                let owned = std::mem::take(buf);
                let (len, cap) = (owned.len(), owned.capacity());
                let (r, slice) = tcp.read(owned.slice_mut(len..cap)).await;
                *buf = slice.into_inner();
                matches!(r, Ok(n) if n > 0)
            }
            Conn::Tls(t) => t.read_more(buf).await,
        }
    }

    /// Closes the connection as a client done with it does (TLS: close_notify first).
    pub async fn close(self) {
        if let Conn::Tls(mut t) = self {
            t.tls.send_close_notify();
            let _ = t.flush().await;
        }
    }
}

impl TlsConn {
    /// Writes every TLS record rustls has ready.
    async fn flush(&mut self) -> std::io::Result<()> {
        while self.tls.wants_write() {
            let mut out = Vec::with_capacity(CHUNK);
            while self.tls.wants_write() {
                self.tls.write_tls(&mut out)?;
            }
            self.tcp.write_all(out).await.0?;
        }
        Ok(())
    }

    /// Reads from the socket once and hands the records to rustls, plaintext to `out`; false at
    /// the end of the stream.
    async fn read_records(&mut self, out: &mut Vec<u8>) -> std::io::Result<bool> {
        let chunk = self.chunk.take().unwrap_or_else(|| vec![0; CHUNK]);
        let (r, chunk) = self.tcp.read(chunk).await;
        let n = r?;
        let mut records = &chunk[..n];
        while !records.is_empty() {
            self.tls.read_tls(&mut records)?;
            let state = self
                .tls
                .process_new_packets()
                .map_err(std::io::Error::other)?;
            let plain = state.plaintext_bytes_to_read();
            if plain > 0 {
                let start = out.len();
                out.resize(start + plain, 0);
                self.tls.reader().read_exact(&mut out[start..])?;
            }
            self.closed |= state.peer_has_closed();
        }
        self.chunk = Some(chunk);
        Ok(n > 0)
    }

    async fn handshake(&mut self) -> std::io::Result<()> {
        let mut early = Vec::new();
        while self.tls.is_handshaking() {
            self.flush().await?;
            if !self.tls.is_handshaking() {
                break;
            }
            if !self.read_records(&mut early).await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        // The client's Finished.
        self.flush().await
    }

    async fn read_more(&mut self, buf: &mut Vec<u8>) -> bool {
        let before = buf.len();
        loop {
            if self.closed {
                return buf.len() > before;
            }
            match self.read_records(buf).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return buf.len() > before,
            }
            if self.tls.wants_write() && self.flush().await.is_err() {
                return false;
            }
            if buf.len() > before {
                return true;
            }
        }
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
