//! The load generator's TLS client against a real rustls server: a handshake, answers larger
//! than a TLS record and than the read buffer, two requests on one connection, and close_notify
//! on close.

use std::{
    io::{Read as _, Write as _},
    sync::Arc,
};

use integration_tests::pki::{KeyKind, Pki};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{Connect, connect};

/// Serves two requests on one TLS connection (answers of `size` bytes), then reads to the end;
/// whether the client closed with close_notify.
fn server(listener: std::net::TcpListener, pki: &Pki, size: usize) -> bool {
    let issued = pki.server("server", &["localhost"], KeyKind::EcdsaP256);
    let certs = CertificateDer::pem_file_iter(&issued.cert)
        .expect("cert file")
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(&issued.key).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let (tcp, _) = listener.accept().expect("accept");
    // Bounded: a client that never closes fails the test instead of hanging it.
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let conn = rustls::ServerConnection::new(Arc::new(config)).expect("server session");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    for _ in 0..2 {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tls.read_exact(&mut byte).expect("request");
            head.push(byte[0]);
        }
        let body = vec![b'x'; size];
        write!(tls, "HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n").expect("head");
        tls.write_all(&body).expect("body");
        tls.flush().expect("flush");
    }
    let mut rest = Vec::new();
    // rustls reads a close_notify as the end (Ok); a cut without one is an error.
    tls.read_to_end(&mut rest).is_ok() && rest.is_empty()
}

#[test]
fn tls_client_exchanges_and_closes_cleanly() {
    let pki = Pki::new("bench-conn");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    // Larger than a TLS record (16 kB) and than the client's 16 kB read buffer.
    let size = 100_000;
    let clean = std::thread::scope(|s| {
        let served = s.spawn(|| server(listener, &pki, size));
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let how = Connect {
                tls: Some(crate::tls::load_client("localhost")),
                per_request: false,
            };
            let mut conn = connect(addr, &how).await.expect("handshake");
            for _ in 0..2 {
                conn.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n".to_vec())
                    .await
                    .expect("write");
                let mut buf = Vec::new();
                let head = loop {
                    assert!(conn.read_more(&mut buf).await, "the answer ended early");
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                while buf.len() < head + size {
                    assert!(conn.read_more(&mut buf).await, "the body ended early");
                }
                assert_eq!(buf.len(), head + size, "exactly one answer");
                assert!(buf[head..].iter().all(|b| *b == b'x'));
            }
            conn.close().await;
        });
        // The runtime closes its sockets when dropped.
        drop(rt);
        served.join().expect("server thread")
    });
    assert!(clean, "the client closed without close_notify");
}
