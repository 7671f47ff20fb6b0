use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::*;
use crate::{config::Config, shared::Shared};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A resolver that answers from a script, one answer per call (the last repeats).
#[derive(Clone)]
struct Scripted(
    Arc<Mutex<Vec<std::io::Result<Vec<SocketAddr>>>>>,
    Arc<Mutex<Vec<String>>>,
);

impl Lookup for Scripted {
    fn lookup(
        &self,
        host: String,
        _port: u16,
    ) -> impl Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'static {
        self.1.lock().unwrap().push(host);
        let mut script = self.0.lock().unwrap();
        let answer = if script.len() > 1 {
            script.remove(0)
        } else {
            match &script[0] {
                Ok(v) => Ok(v.clone()),
                Err(e) => Err(e.kind().into()),
            }
        };
        async move { answer }
    }
}

#[tokio::test]
async fn the_loop_re_resolves_the_current_configurations_hosts() {
    let config = Config::from_toml(
        r#"
[gateway]
instance = "t"
[[listeners]]
address = "127.0.0.1:1"
[admin]
address = "127.0.0.1:2"
[kernel]
enabled = false
[[upstreams]]
name = "u"
url = "http://localhost:9/mcp"
resolve_every_ms = 200
[[upstreams]]
name = "fixed"
url = "http://127.0.0.1:9/mcp"
"#,
    )
    .unwrap();
    let shared = Arc::new(Shared::new(config));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let lookup = Scripted(
        Arc::new(Mutex::new(vec![
            Ok(vec![addr("192.0.2.7:9"), addr("192.0.2.8:9")]),
            Err(std::io::ErrorKind::NotFound.into()),
        ])),
        Arc::clone(&asked),
    );
    let task = tokio::spawn(run(Arc::clone(&shared), lookup));
    let up = || Arc::clone(&shared.snapshot.load().config.upstreams[0].replicas);
    assert_eq!(up().first().ip(), std::net::Ipv4Addr::LOCALHOST);
    // The first look-up is due at 200 ms: waited for up to 3 s (a loaded host is late).
    for _ in 0..150 {
        if up().first().ip() != std::net::Ipv4Addr::LOCALHOST {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        up().first(),
        addr("192.0.2.7:9"),
        "the new address is published"
    );
    let endpoints = |u: &crate::endpoints::Replicas| -> Vec<SocketAddr> {
        u.endpoints().iter().map(|e| e.addr).collect()
    };
    assert_eq!(
        endpoints(&up()),
        [addr("192.0.2.7:9"), addr("192.0.2.8:9")],
        "every address found is an endpoint"
    );
    // Failures every 200 ms: three of them waited for up to 5 s.
    let stats = &shared.upstream_stats;
    for _ in 0..250 {
        if stats.get("u", "resolve", "failed") >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        up().first(),
        addr("192.0.2.7:9"),
        "failures keep the last good one"
    );
    assert_eq!(endpoints(&up()).len(), 2, "and the last good set");
    assert_eq!(stats.get("u", "resolve", "ok"), 1);
    assert!(
        stats.get("u", "resolve", "failed") >= 3,
        "retried every interval"
    );
    assert!(
        asked.lock().unwrap().iter().all(|h| h == "localhost"),
        "an address literal is never looked up"
    );
    task.abort();
}
