//! The floor: the least a forwarder can do. Accepts a connection, opens one to the upstream,
//! and copies bytes both ways until either side closes: no parsing, no policy, no pooling, one
//! monoio thread on io_uring (the gateway's runtime, its ring set up as a worker's) with 64 KiB
//! buffers. Every proxy row of the `headline` scenario is reported as its distance from this
//! one, measured in the same run.
//!
//! It runs as its own process (`bench --floor-listen A --floor-upstream B`), so that its CPU
//! time is read from /proc like the gateway's and nginx's. Never part of the gateway.

use std::net::SocketAddr;

use monoio::{
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable},
    net::{TcpListener, TcpStream},
};

const BUF: usize = 64 * 1024;

pub fn serve(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .uring_builder(gateway::runtime::uring_builder())
        .enable_timer()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen)?;
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            monoio::spawn(relay(client, upstream));
        }
    })
}

async fn relay(client: TcpStream, upstream: SocketAddr) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = up.into_split();
    // Each direction ends when its reader sees the end; the other then ends with its peer.
    let to_up = monoio::spawn(copy(cr, uw));
    copy(ur, cw).await;
    to_up.await;
}

async fn copy(mut from: impl AsyncReadRent, mut to: impl AsyncWriteRent) {
    let mut buf = Vec::with_capacity(BUF);
    loop {
        let (res, b) = from.read(buf).await;
        match res {
            Ok(n) if n > 0 => {}
            _ => break,
        }
        let (res, mut b) = to.write_all(b).await;
        if res.is_err() {
            break;
        }
        b.clear();
        buf = b;
    }
    let _ = to.shutdown().await;
}
