//! Thread-per-core data plane: one monoio worker per core, pinned, each with its own
//! `SO_REUSEPORT` listener; io_uring when the kernel offers it, epoll otherwise. Workers own
//! their state, take no locks and make no bpf syscalls.
//!
//! Until the MCP data plane lands, each connection is served a placeholder: every HTTP request
//! gets a JSON-RPC error saying so. Connection accounting per tenant is real: it feeds the
//! kernel's per-tenant connection caps.

pub mod shared;

use std::{
    cell::Cell,
    net::{SocketAddr, TcpListener},
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use monoio::{
    io::{AsyncReadRent, AsyncWriteRentExt},
    net::TcpStream,
};
pub use shared::{Classifier, ConnTable, Shared, Snapshot};
use tokio::sync::watch;

/// Which I/O driver the workers use.
pub fn driver_name() -> &'static str {
    if monoio::utils::detect_uring() {
        "io_uring"
    } else {
        "epoll"
    }
}

/// Binds `count` sockets with `SO_REUSEPORT` on `addr`, one per worker; the kernel spreads
/// incoming connections across them.
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> std::io::Result<Vec<TcpListener>> {
    (0..count)
        .map(|_| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nodelay(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.bind(&addr.into())?;
            socket.listen(4096)?;
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        })
        .collect()
}

/// Starts one worker thread per element of `listeners` (each holds that worker's sockets).
/// The threads end after `shutdown` turns true and their connections drained or `grace` passed.
pub fn spawn_workers(
    shared: Arc<Shared>,
    listeners: Vec<Vec<TcpListener>>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    listeners
        .into_iter()
        .enumerate()
        .map(|(index, sockets)| {
            let shared = Arc::clone(&shared);
            let shutdown = shutdown.clone();
            std::thread::Builder::new().name(format!("worker-{index}")).spawn(move || {
                if let Err(e) = monoio::utils::bind_to_cpu_set([index % cores]) {
                    tracing::warn!(worker = index, error = ?e, "could not pin worker to its core");
                }
                let runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build();
                match runtime {
                    Ok(mut rt) => rt.block_on(worker(index, sockets, shared, shutdown, grace)),
                    Err(e) => tracing::error!(worker = index, error = %e, "worker runtime failed to start"),
                }
            })
        })
        .collect()
}

async fn worker(
    index: usize,
    sockets: Vec<TcpListener>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let active = Rc::new(Cell::new(0usize));
    for socket in sockets {
        let listener = match monoio::net::TcpListener::from_std(socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(worker = index, error = %e, "cannot adopt listener");
                continue;
            }
        };
        monoio::spawn(accept_loop(
            index,
            listener,
            Arc::clone(&shared),
            shutdown.clone(),
            Rc::clone(&active),
        ));
    }
    let _ = shutdown.wait_for(|stop| *stop).await;
    let deadline = monoio::time::Instant::now() + grace;
    while active.get() > 0 && monoio::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    if active.get() > 0 {
        tracing::warn!(
            worker = index,
            open = active.get(),
            "grace period over; closing connections"
        );
    }
}

async fn accept_loop(
    worker: usize,
    listener: monoio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    active: Rc<Cell<usize>>,
) {
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(worker, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let tenant = shared.snapshot.load().classifier.tenant_of(peer.ip());
        // The kernel drops SYNs once the control thread raises the flag; until then (and for
        // connections already in the accept queue) the worker refuses them itself.
        if shared.at_cap(tenant) {
            monoio::spawn(refuse_at_cap(stream));
            continue;
        }
        shared.conns.opened(worker, tenant);
        active.set(active.get() + 1);
        let shared = Arc::clone(&shared);
        let active = Rc::clone(&active);
        let shutdown = shutdown.clone();
        monoio::spawn(async move {
            serve_placeholder(stream, shutdown).await;
            shared.conns.closed(worker, tenant);
            active.set(active.get() - 1);
        });
    }
}

const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 4 * 1024 * 1024;

async fn refuse_at_cap(mut stream: TcpStream) {
    let body = r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"tenant is at its connection cap"}}"#;
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.into_bytes()).await;
}

/// Answers each request on a keep-alive connection with a JSON-RPC error that says the MCP data
/// plane is not there yet, with correct HTTP framing.
async fn serve_placeholder(mut stream: TcpStream, mut shutdown: watch::Receiver<bool>) {
    let mut pending: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 8192];
    loop {
        let (status, body_len, close) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&pending) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let mut len = 0usize;
                    let mut bad = false;
                    let mut close = req.version == Some(0);
                    for h in req.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            match std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok())
                            {
                                Some(v) => len = v,
                                None => bad = true,
                            }
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            // Chunked bodies arrive with the data plane; refuse rather than misframe.
                            bad = true;
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            close |= h.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    if bad {
                        break (400, 0, true);
                    }
                    if len > MAX_BODY {
                        break (413, 0, true);
                    }
                    pending.drain(..head_len);
                    break (501, len, close);
                }
                Ok(httparse::Status::Partial) if pending.len() > MAX_HEAD => break (431, 0, true),
                Ok(httparse::Status::Partial) => {}
                Err(_) => break (400, 0, true),
            }
            match read_some(&mut stream, &mut pending, &mut chunk, &mut shutdown).await {
                ReadOutcome::Data => {}
                ReadOutcome::Closed => return,
                ReadOutcome::TimedOut => {
                    if !pending.is_empty() {
                        respond(&mut stream, 408, true).await;
                    }
                    return;
                }
            }
        };
        // Skip the body.
        while pending.len() < body_len {
            match read_some(&mut stream, &mut pending, &mut chunk, &mut shutdown).await {
                ReadOutcome::Data => {}
                _ => return,
            }
        }
        pending.drain(..body_len.min(pending.len()));
        let close = close || *shutdown.borrow();
        if !respond(&mut stream, status, close).await || close {
            return;
        }
    }
}

enum ReadOutcome {
    Data,
    Closed,
    TimedOut,
}

async fn read_some(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    chunk: &mut Vec<u8>,
    shutdown: &mut watch::Receiver<bool>,
) -> ReadOutcome {
    let buf = std::mem::take(chunk);
    let read = monoio::select! {
        r = monoio::time::timeout(IDLE_TIMEOUT, stream.read(buf)) => r,
        // An idle keep-alive connection closes at shutdown; a request in progress finishes.
        _ = shutdown.wait_for(|stop| *stop), if pending.is_empty() => return ReadOutcome::Closed,
    };
    match read {
        Err(_elapsed) => {
            *chunk = vec![0u8; 8192];
            ReadOutcome::TimedOut
        }
        Ok((Ok(0), buf)) | Ok((Err(_), buf)) => {
            *chunk = buf;
            ReadOutcome::Closed
        }
        Ok((Ok(n), buf)) => {
            pending.extend_from_slice(&buf[..n]);
            *chunk = buf;
            ReadOutcome::Data
        }
    }
}

async fn respond(stream: &mut TcpStream, status: u16, close: bool) -> bool {
    let (reason, code, message) = match status {
        501 => (
            "Not Implemented",
            -32601,
            "this gateway build has no MCP data plane yet (kernel fast path only)",
        ),
        400 => ("Bad Request", -32600, "malformed HTTP request"),
        408 => ("Request Timeout", -32600, "request not completed in time"),
        413 => ("Payload Too Large", -32600, "request body too large"),
        _ => (
            "Request Header Fields Too Large",
            -32600,
            "request headers too large",
        ),
    };
    let body =
        format!(r#"{{"jsonrpc":"2.0","id":null,"error":{{"code":{code},"message":"{message}"}}}}"#);
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n{body}",
        body.len(),
        if close { "close" } else { "keep-alive" },
    );
    stream.write_all(resp.into_bytes()).await.0.is_ok()
}
