//! The load generator's accounting against a real HTTP server on loopback that leaves one
//! connection waiting: a closed loop must show that connection (unanswered, its request missed)
//! instead of reporting the latencies of the others as if every connection had been served.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use super::{LoadSpec, Mix, run};

/// Reads one request (head and Content-Length body) from `s`; false at its end.
fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= head + 4 + len {
                buf.drain(..head + 4 + len);
                return true;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Answers every request of every connection, except that the first connection accepted gets
/// only its first answer and then waits (until the client leaves).
fn serve(listener: TcpListener) {
    static ACCEPTED: AtomicUsize = AtomicUsize::new(0);
    for s in listener.incoming() {
        let Ok(mut s) = s else { return };
        let starved = ACCEPTED.fetch_add(1, Ordering::Relaxed) == 0;
        std::thread::spawn(move || {
            let body = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let mut buf = Vec::new();
            let mut answered = 0;
            while read_request(&mut s, &mut buf) {
                if starved && answered == 1 {
                    // Left waiting: read on, answer nothing.
                    continue;
                }
                if s.write_all(answer.as_bytes()).is_err() {
                    return;
                }
                answered += 1;
            }
        });
    }
}

#[test]
fn a_closed_loop_shows_a_connection_left_waiting() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = listener.local_addr().expect("addr");
    std::thread::spawn(move || serve(listener));
    let r = run(&LoadSpec {
        target,
        path: "/mcp".into(),
        connections: 4,
        threads: 1,
        duration: Duration::from_millis(300),
        warmup: Duration::from_millis(100),
        rate: None,
        tool: "add".into(),
        headers: String::new(),
        legacy: false,
        mix: Mix::default(),
        connect: super::Connect::default(),
    });
    let fair = r.fairness();
    assert_eq!(fair.connections, 4, "{fair}");
    assert_eq!(fair.unanswered, 1, "{fair}");
    assert!(fair.median > 10, "the others were served: {fair}");
    // Its request waited through the measured time and had no answer by 1 s after it.
    assert_eq!(r.missed, 1, "{r:?}");
    assert_eq!(r.errors, 0, "{r:?}");
}
