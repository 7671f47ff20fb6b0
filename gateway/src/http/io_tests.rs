//! The TLS seam of `Io`, over a real loopback socket with real rustls sessions on both ends.

use std::{sync::Arc, time::Duration};

use monoio::net::{TcpListener, TcpStream};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{HandshakeError, Io};
use crate::http::HttpError;

struct Pair {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn configs() -> Pair {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("self-signed");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).expect("root");
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Pair {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

fn soon() -> monoio::time::Instant {
    monoio::time::Instant::now() + Duration::from_secs(5)
}

fn client_conn(p: &Pair) -> rustls::Connection {
    let name = "localhost".try_into().expect("name");
    rustls::Connection::Client(
        rustls::ClientConnection::new(Arc::clone(&p.client), name).expect("client"),
    )
}

fn server_conn(p: &Pair) -> rustls::Connection {
    rustls::Connection::Server(
        rustls::ServerConnection::new(Arc::clone(&p.server)).expect("server"),
    )
}

/// The next connection to `listener`, its writes timing out after 5 s.
async fn accepted(listener: &TcpListener) -> Io {
    let (s, _) = listener.accept().await.expect("accept");
    Io::new(s, Duration::from_secs(5))
}

/// A connection to `addr`, its writes timing out after 5 s.
async fn connected(addr: std::net::SocketAddr) -> Io {
    Io::new(
        TcpStream::connect(addr).await.expect("connect"),
        Duration::from_secs(5),
    )
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime")
        .block_on(f);
}

/// Requests and answers of several sizes cross in both directions, on one connection, and the
/// connection is then idle and open (the pool's test) on both ends.
#[test]
fn exchanges_cross_a_tls_connection_and_leave_it_idle() {
    run(async {
        let p = configs();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_side = server_conn(&p);
        let server = monoio::spawn(async move {
            let mut io = accepted(&listener).await;
            io.handshake(server_side, soon())
                .await
                .expect("server handshake");
            for size in [1usize, 5_000, 100_000] {
                let mut got = 0;
                while got < size {
                    let n = io.fill(Duration::from_secs(5)).await.expect("server read");
                    assert!(n > 0, "closed early");
                    got = io.pending().len();
                }
                let req = io.take(size);
                assert!(req.iter().all(|b| *b == b'q'));
                io.write_all(vec![b'a'; size * 2])
                    .await
                    .expect("server write");
            }
            assert_eq!(io.fill(Duration::from_secs(5)).await.expect("eof"), 0);
        });
        let mut io = connected(addr).await;
        io.handshake(client_conn(&p), soon())
            .await
            .expect("client handshake");
        for size in [1usize, 5_000, 100_000] {
            io.write_all(vec![b'q'; size]).await.expect("client write");
            while io.pending().len() < size * 2 {
                let n = io.fill(Duration::from_secs(5)).await.expect("client read");
                assert!(n > 0, "closed early");
            }
            assert_eq!(io.take(size * 2), vec![b'a'; size * 2]);
            // The session tickets the server sent after the handshake were taken with the
            // answer: nothing is left to make the connection look used.
            monoio::time::sleep(Duration::from_millis(20)).await;
            assert!(io.idle_and_open(), "idle after an exchange of {size}");
        }
        drop(io);
        server.await;
    });
}

/// Session tickets a server sends on an idle connection are taken (a TLS 1.3 server's usual
/// two), but only up to a bound: a server that keeps sending records holds the worker in the
/// pool's look at the connection, so one past the bound makes it not idle (dropped), where it
/// was taken whole however long it went on.
#[test]
fn an_idle_connection_takes_a_few_tickets_and_no_flood_of_them() {
    // 400 tickets are about 40 KB (rustls refuses far more on its own: its buffer fills).
    for (tickets, idle) in [(2usize, true), (400, false)] {
        run(async move {
            let p = configs();
            let mut server_config = (*p.server).clone();
            server_config.send_tls13_tickets = tickets;
            let server_config = Arc::new(server_config);
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = monoio::spawn(async move {
                let mut io = accepted(&listener).await;
                let conn = rustls::ServerConnection::new(server_config).expect("server");
                io.handshake(rustls::Connection::Server(conn), soon())
                    .await
                    .expect("server handshake");
                // The tickets went out once the client's Finished was read: wait for its end.
                assert_eq!(io.fill(Duration::from_secs(5)).await.expect("eof"), 0);
            });
            let mut io = connected(addr).await;
            io.handshake(client_conn(&p), soon())
                .await
                .expect("client handshake");
            // Nothing read since the handshake: the tickets wait on the idle socket.
            monoio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(io.idle_and_open(), idle, "{tickets} tickets");
            drop(io);
            server.await;
        });
    }
}

/// Plaintext sent to a TLS server ends the handshake with a protocol error, not a wait.
#[test]
fn plaintext_to_a_tls_server_fails_the_handshake() {
    run(async {
        let p = configs();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_side = server_conn(&p);
        let server = monoio::spawn(async move {
            let mut io = accepted(&listener).await;
            io.handshake(server_side, soon()).await
        });
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let (r, _) = monoio::io::AsyncWriteRentExt::write_all(
            &mut s,
            b"POST /mcp HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        )
        .await;
        r.expect("write");
        assert!(matches!(server.await, Err(HandshakeError::Tls(_))));
    });
}

/// A peer that opens the connection and sends nothing is cut off at the deadline.
#[test]
fn a_silent_peer_times_the_handshake_out() {
    run(async {
        let p = configs();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_side = server_conn(&p);
        let server = monoio::spawn(async move {
            let mut io = accepted(&listener).await;
            let deadline = monoio::time::Instant::now() + Duration::from_millis(200);
            io.handshake(server_side, deadline).await
        });
        let _s = TcpStream::connect(addr).await.expect("connect");
        assert!(matches!(server.await, Err(HandshakeError::Timeout)));
    });
}

/// A peer that closes without close_notify in the middle of a body: the reader sees a failure,
/// not a clean end (a truncated message is never taken for a whole one).
#[test]
fn a_cut_without_close_notify_is_not_a_clean_end() {
    run(async {
        let p = configs();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_side = server_conn(&p);
        let server = monoio::spawn(async move {
            let mut io = accepted(&listener).await;
            io.handshake(server_side, soon()).await.expect("handshake");
            loop {
                match io.fill(Duration::from_secs(5)).await {
                    Ok(0) => return Ok(io.pending().len()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        });
        let mut io = connected(addr).await;
        io.handshake(client_conn(&p), soon())
            .await
            .expect("handshake");
        io.write_all(b"half a body".to_vec()).await.expect("write");
        // Skip close_notify: shut the socket down under the session.
        io.write_lost = true;
        io.shutdown(libc::SHUT_RDWR);
        assert!(matches!(server.await, Err(HttpError::Closed)));
    });
}

/// A plaintext connection waiting for its next request past the grace read (it then holds no
/// buffer, and its idle timeout is an entry in the worker's shared table): bytes that come
/// then are read whole, and silence is closed at the idle timeout (not before it, not long
/// after), with its read side shut down. On io_uring where the kernel has it.
#[test]
fn an_idle_wait_past_the_grace_read_gets_its_bytes_or_times_out() {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime")
        .block_on(async {
            use monoio::io::AsyncWriteRentExt as _;
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let idle = Duration::from_millis(1200);
            let server = monoio::spawn(async move {
                let mut outcomes = Vec::new();
                for _ in 0..2 {
                    let mut io = accepted(&listener).await;
                    let start = std::time::Instant::now();
                    let r = io.fill_idle(idle).await;
                    outcomes.push((r, start.elapsed(), io.take(usize::MAX)));
                }
                outcomes
            });
            // The first client speaks after the grace read gave its buffer back.
            let mut a = TcpStream::connect(addr).await.expect("connect");
            monoio::time::sleep(Duration::from_millis(800)).await;
            let (w, _) = a.write_all(b"after the grace".to_vec()).await;
            w.expect("write");
            // The second one never speaks.
            let b = TcpStream::connect(addr).await.expect("connect");
            let outcomes = server.await;
            let (r, took, bytes) = &outcomes[0];
            assert!(matches!(r, Ok(n) if *n > 0), "{r:?}");
            assert!(*took >= Duration::from_millis(700), "{took:?}");
            assert_eq!(bytes, b"after the grace");
            let (r, took, _) = &outcomes[1];
            assert!(matches!(r, Err(HttpError::Timeout)), "{r:?}");
            // Not before its time, but for a coarse-clock tick that came late (2 ms once, on a
            // loaded host: `clock::deadline`).
            assert!(
                *took + Duration::from_millis(20) >= idle,
                "timed out after {took:?}"
            );
            assert!(
                *took < idle + Duration::from_millis(600),
                "timed out after {took:?}"
            );
            drop((a, b));
        });
}

/// A message given to `send` (a head and a shared body, one vectored write) arrives whole and
/// in order, also when the socket takes it in many writes (a small send buffer, a reader that
/// starts late), over plaintext and over TLS (records across rustls's buffer limit); the
/// message comes back for a retry. So does a chunk written by `write_chunk_back` after it.
#[test]
fn send_delivers_head_and_body_whole_across_partial_writes() {
    for tls in [false, true] {
        run(async move {
            let p = configs();
            let head = vec![b'h'; 300];
            let body: bytes::Bytes = (0..600_000u32).map(|i| (i % 251) as u8).collect();
            let mut expected = head.clone();
            expected.extend_from_slice(&body);
            // Then a chunk (`write_chunk_back`: its size line, the data, the line end).
            let data: Vec<u8> = (0..600_001u32).map(|i| (i % 241) as u8).collect();
            expected.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            expected.extend_from_slice(&data);
            expected.extend_from_slice(b"\r\n");
            let total = expected.len();
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server_side = server_conn(&p);
            let server = monoio::spawn(async move {
                let mut io = accepted(&listener).await;
                if tls {
                    io.handshake(server_side, soon())
                        .await
                        .expect("server handshake");
                }
                monoio::time::sleep(Duration::from_millis(50)).await;
                while io.pending().len() < total {
                    let n = io.fill(Duration::from_secs(5)).await.expect("server read");
                    assert!(n > 0, "closed early at {}", io.pending().len());
                }
                assert!(io.take(total) == expected, "tls {tls}: the bytes differ");
            });
            let s = TcpStream::connect(addr).await.expect("connect");
            let small: libc::c_int = 4096;
            // SAFETY: a valid socket and option value of the right size.
            let set = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&raw const small).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(set, 0, "SO_SNDBUF");
            let mut io = Io::new(s, Duration::from_secs(5));
            if tls {
                io.handshake(client_conn(&p), soon())
                    .await
                    .expect("client handshake");
            }
            let out = super::Outgoing { head, body };
            let (sent, back) = io.send(out).await;
            sent.expect("sent");
            assert_eq!(
                back.map(|b| b.len()),
                Some(300 + 600_000),
                "given back whole"
            );
            let (sent, back) = io.write_chunk_back(data).await;
            sent.expect("chunk sent");
            assert_eq!(back.len(), 600_001, "the chunk's data given back");
            server.await;
        });
    }
}

/// A handshake message declared 64 KiB long (`0xffff`, the most rustls holds) and sent in full:
/// 4 bytes of header more than rustls buffers, so it can never be taken whole. `typ` is the
/// message's type.
fn oversized_handshake_message(typ: u8) -> Vec<u8> {
    let mut m = vec![typ, 0x00, 0xff, 0xff];
    m.resize(4 + 0xffff, 0);
    m
}

/// A ClientHello declared 64 KiB long, in plaintext records, fails the handshake at once: it
/// kept the worker spinning until the handshake's deadline (rustls refuses to hold more, and
/// the bytes it left were fed to it again and again; an attacker's review, with no credential).
#[test]
fn a_handshake_message_larger_than_rustls_holds_fails_the_handshake() {
    run(async {
        let p = configs();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_side = server_conn(&p);
        let server = monoio::spawn(async move {
            let mut io = accepted(&listener).await;
            let deadline = monoio::time::Instant::now() + Duration::from_secs(3);
            io.handshake(server_side, deadline).await
        });
        let mut records = Vec::new();
        for chunk in oversized_handshake_message(1).chunks(16_384) {
            records.extend_from_slice(&[22, 3, 1]);
            records.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            records.extend_from_slice(chunk);
        }
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let (r, _) = monoio::io::AsyncWriteRentExt::write_all(&mut s, records).await;
        r.expect("write");
        // Refused for what it is, not cut at the deadline.
        let r = server.await;
        assert!(matches!(r, Err(HandshakeError::Tls(_))), "{r:?}");
    });
}

/// After the handshake, a peer's encrypted records carrying a handshake message declared 64
/// KiB long (a KeyUpdate) end the connection: they kept the worker spinning for good, every
/// connection on it stopped, and it never stopped at shutdown (an attacker's review, from a
/// client or from an https upstream's answer). The reader runs on a thread of its own, so
/// that a regression fails here rather than hanging the tests.
#[test]
fn an_oversized_handshake_message_after_the_handshake_ends_the_connection() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let p = Arc::new(configs());
    let server_p = Arc::clone(&p);
    std::thread::spawn(move || {
        run(async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            addr_tx
                .send(listener.local_addr().expect("addr"))
                .expect("send");
            let mut io = accepted(&listener).await;
            io.handshake(server_conn(&server_p), soon())
                .await
                .expect("server handshake");
            let r = io.fill(Duration::from_secs(5)).await;
            let _ = done_tx.send(r);
        });
    });
    let addr = addr_rx.recv().expect("address");
    run(async move {
        let mut client = (*p.client).clone();
        client.enable_secret_extraction = true;
        let name = "localhost".try_into().expect("name");
        let conn = rustls::ClientConnection::new(Arc::new(client), name).expect("client");
        let mut io = connected(addr).await;
        io.handshake(rustls::Connection::Client(conn), soon())
            .await
            .expect("client handshake");
        let Some(rustls::Connection::Client(conn)) = io.tls.take().map(|b| *b) else {
            panic!("a client session");
        };
        let Some(rustls::SupportedCipherSuite::Tls13(suite)) = conn.negotiated_cipher_suite()
        else {
            panic!("TLS 1.3");
        };
        let (seq, secrets) = conn.dangerous_extract_secrets().expect("secrets").tx;
        let (key, iv) = match secrets {
            rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
            _ => panic!("an AEAD suite"),
        };
        let mut encrypter = suite.aead_alg.encrypter(key, iv);
        let mut records = Vec::new();
        for (i, chunk) in oversized_handshake_message(24).chunks(16_000).enumerate() {
            let plain = rustls::crypto::cipher::OutboundPlainMessage {
                typ: rustls::ContentType::Handshake,
                version: rustls::ProtocolVersion::TLSv1_2,
                payload: rustls::crypto::cipher::OutboundChunks::Single(chunk),
            };
            let sealed = encrypter.encrypt(plain, seq + i as u64).expect("encrypt");
            records.extend_from_slice(&sealed.encode());
        }
        let (r, _) = monoio::io::AsyncWriteRentExt::write_all(&mut io.stream, records).await;
        r.expect("write");
        let r = done_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the reader returned (it spun before)");
        assert!(matches!(r, Err(HttpError::Closed)), "{r:?}");
    });
}
