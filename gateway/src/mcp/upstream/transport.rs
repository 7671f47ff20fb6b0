//! Opening a connection to an upstream: TCP, with the connect timeout.

use monoio::net::TcpStream;

use super::UpstreamFailure;
use crate::{config::Upstream, http::Io};

pub async fn connect(up: &Upstream) -> Result<Io, UpstreamFailure> {
    match monoio::time::timeout(up.connect_timeout, TcpStream::connect(up.addr)).await {
        Err(_) => Err(UpstreamFailure::Connect(format!(
            "connecting to {} timed out",
            up.name
        ))),
        Ok(Err(e)) => Err(UpstreamFailure::Connect(format!(
            "connecting to {}: {e}",
            up.name
        ))),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(Io::new(s, up.response_timeout))
        }
    }
}
