//! Scenario `stdio`: one stdio MCP server (server-everything's stdio mode, from npm) served over
//! Streamable HTTP by the gateway and by `supergateway` (npm; the stdio-to-HTTP bridge users run
//! today), in the same run, rounds interleaved: peak rate and p99 of `tools/call get-sum`,
//! closed loop over keep-alive connections.
//!
//! Each bridge is driven the way it must be: the gateway holds the child's one session, so its
//! clients send session-era requests without a session; supergateway `--stateful` needs each
//! client to `initialize` (one child per session), and without `--stateful` it answers each
//! request on its own (a child per request).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::peers::{KillOnDrop, free_port, node_path, wait_port};

use crate::{
    load::{self, LoadSpec, Mix},
    proxy::{Proc, bin},
};

pub struct Row {
    pub peer: &'static str,
    /// Requests per second: the median round, and the range.
    pub rps: f64,
    pub rps_range: (f64, f64),
    /// p99 of the median round, µs.
    pub p99_us: f64,
    pub ok: u64,
    pub errors: u64,
}

pub struct Report {
    pub connections: usize,
    pub rounds: usize,
    pub seconds: f64,
    pub rows: Vec<Row>,
}

fn everything() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/node/node_modules/.bin/mcp-server-everything")
}

fn supergateway(stateful: bool) -> (u16, Proc) {
    let port = free_port();
    let mut cmd = Command::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../.tools/node/node_modules/.bin/supergateway"),
    );
    cmd.args(["--stdio", &format!("{} stdio", everything().display())])
        .args(["--outputTransport", "streamableHttp", "--logLevel", "none"])
        .args(["--port", &port.to_string()])
        .env("PATH", node_path());
    if stateful {
        cmd.arg("--stateful");
    }
    let p = Proc(KillOnDrop(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start supergateway (cargo xtask setup installs it)"),
    ));
    wait_port(port, Duration::from_secs(30));
    (port, p)
}

fn gateway() -> (u16, Proc, PathBuf) {
    let port = free_port();
    let config = std::env::temp_dir().join(format!("bench-gw-stdio-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "[gateway]\ninstance = \"bench-stdio\"\nworkers = 1\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\
             [admin]\naddress = \"127.0.0.1:{}\"\n[kernel]\nenabled = false\n\
             [[upstreams]]\nname = \"everything\"\ncommand = [\"{}\", \"stdio\"]\n\
             [[routes]]\npath = \"/mcp\"\nupstream = \"everything\"\n",
            free_port(),
            everything().display(),
        ),
    )
    .expect("write config");
    let p = Proc(KillOnDrop(
        Command::new(bin("gateway"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "error")
            .stderr(Stdio::null())
            .spawn()
            .expect("start gateway"),
    ));
    wait_port(port, Duration::from_secs(5));
    (port, p, config)
}

pub fn run(quick: bool) -> Report {
    let connections = 32;
    let seconds = if quick { 2.0 } else { 3.0 };
    let rounds = if quick { 1 } else { 3 };
    let (gw_port, _gw, config) = gateway();
    let (sf_port, _sf) = supergateway(true);
    let (sl_port, _sl) = supergateway(false);
    let spec = |port: u16, sessions: bool| LoadSpec {
        target: ([127, 0, 0, 1], port).into(),
        path: "/mcp".into(),
        tool: "get-sum".into(),
        headers: String::new(),
        legacy: true,
        connections,
        threads: 1,
        duration: Duration::from_secs_f64(seconds),
        warmup: Duration::from_millis(500),
        rate: None,
        mix: Mix {
            sessions_every: usize::from(sessions),
            ..Mix::default()
        },
        connect: load::Connect::default(),
    };
    let peers: [(&'static str, u16, bool); 3] = [
        ("mcp-gateway (one shared child)", gw_port, false),
        (
            "supergateway --stateful (a child per session)",
            sf_port,
            true,
        ),
        (
            "supergateway, stateless (a child per request)",
            sl_port,
            false,
        ),
    ];
    let mut runs: Vec<Vec<(f64, f64, u64, u64)>> = vec![Vec::new(); peers.len()];
    for _ in 0..rounds {
        for (i, (_, port, sessions)) in peers.iter().enumerate() {
            let r = load::run(&spec(*port, *sessions));
            let p99 = r
                .latency
                .as_ref()
                .map_or(0.0, |h| h.value_at_quantile(0.99) as f64);
            runs[i].push((r.rps(), p99, r.ok, r.errors));
        }
    }
    let _ = std::fs::remove_file(config);
    let rows = peers
        .iter()
        .zip(runs)
        .map(|((peer, _, _), mut r)| {
            r.sort_by(|a, b| a.0.total_cmp(&b.0));
            let range = (r[0].0, r[r.len() - 1].0);
            let (rps, p99_us, ok, errors) = r[r.len() / 2];
            Row {
                peer,
                rps,
                rps_range: range,
                p99_us,
                ok,
                errors,
            }
        })
        .collect();
    Report {
        connections,
        rounds,
        seconds,
        rows,
    }
}
