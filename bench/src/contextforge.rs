//! IBM ContextForge (`mcp-contextforge-gateway` from PyPI, installed by `cargo xtask setup` in
//! `.tools/cf-venv`) as the MCP-aware peer: started on loopback with a SQLite database of its
//! own, the benchmark's upstream registered through its admin API, and a virtual server made of
//! that upstream's tools, whose MCP endpoint the load calls.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use integration_tests::peers::{KillOnDrop, free_port, wait_port};
use serde_json::{Value, json};

use crate::proxy::Proc;

pub struct ContextForge {
    pub proc: Proc,
    pub port: u16,
    /// The virtual server's MCP endpoint.
    pub path: String,
    /// `add` as ContextForge names it.
    pub tool: String,
    pub token: String,
    dir: PathBuf,
}

impl Drop for ContextForge {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const SECRET: &str = "bench-contextforge-secret-0123456789abcdef";

fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/cf-venv/bin")
}

/// Starts ContextForge in front of the MCP server at `up_port`.
pub fn start(up_port: u16) -> anyhow::Result<ContextForge> {
    let bin = venv().join("mcpgateway");
    if !bin.exists() {
        bail!(
            "{} is missing: `cargo xtask setup` installs it (pip, mcp-contextforge-gateway)",
            bin.display()
        );
    }
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("bench-contextforge-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let child = Command::new(&bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .current_dir(&dir)
        .env("MCPGATEWAY_UI_ENABLED", "false")
        .env("MCPGATEWAY_ADMIN_API_ENABLED", "true")
        .env("PLATFORM_ADMIN_EMAIL", "admin@example.com")
        .env("PLATFORM_ADMIN_PASSWORD", "bench-Passw0rd!")
        .env("JWT_SECRET_KEY", SECRET)
        .env(
            "DATABASE_URL",
            format!("sqlite:///{}/mcp.db", dir.display()),
        )
        // The upstream is on loopback.
        .env("SSRF_PROTECTION_ENABLED", "false")
        // Its own rate limits (100 tool calls a minute by default) would measure themselves.
        .env("RATE_LIMITING_ENABLED", "false")
        .env("RATE_LIMIT_MEDIUM_RPM", "100000000")
        .env("RATE_LIMIT_MEDIUM_BURST", "100000000")
        .env("TOOL_RATE_LIMIT", "100000000")
        .env("LOG_LEVEL", "ERROR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ContextForge")?;
    let proc = Proc(KillOnDrop(child));
    wait_port(port, Duration::from_secs(60));
    let token = String::from_utf8(
        Command::new(venv().join("python"))
            .args([
                "-m",
                "mcpgateway.utils.create_jwt_token",
                "--username",
                "admin@example.com",
                "--exp",
                "120",
                "--secret",
                SECRET,
            ])
            .env("JWT_SECRET_KEY", SECRET)
            .output()
            .context("minting a ContextForge token")?
            .stdout,
    )?
    .lines()
    .last()
    .unwrap_or_default()
    .trim()
    .to_owned();
    let base = format!("http://127.0.0.1:{port}");
    let auth = format!("Bearer {token}");
    let call = |method: &str, path: &str, body: Option<Value>| -> anyhow::Result<Value> {
        let url = format!("{base}{path}");
        let mut resp = match body {
            Some(b) => ureq::post(&url).header("authorization", &auth).send_json(b),
            None if method == "GET" => ureq::get(&url).header("authorization", &auth).call(),
            None => bail!("unsupported"),
        }
        .with_context(|| format!("ContextForge {method} {path}"))?;
        Ok(resp.body_mut().read_json::<Value>()?)
    };
    call(
        "POST",
        "/gateways",
        Some(
            json!({"name": "bench", "url": format!("http://127.0.0.1:{up_port}/mcp"), "transport": "STREAMABLEHTTP"}),
        ),
    )?;
    let tools = call("GET", "/tools", None)?;
    let tools = tools.as_array().context("ContextForge lists no tools")?;
    let ids: Vec<Value> = tools.iter().map(|t| t["id"].clone()).collect();
    let server = call(
        "POST",
        "/servers",
        Some(json!({"server": {"name": "bench", "associated_tools": ids}})),
    )?;
    let id = server["id"]
        .as_str()
        .context("ContextForge made no server")?
        .to_owned();
    let tool = server["associatedTools"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .find(|n| n.ends_with("-add") || n.ends_with("_add"))
        })
        .context("ContextForge's server has no `add`")?
        .to_owned();
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!(
            "contextforge: port {port} path /servers/{id}/mcp tool {tool} token {}…",
            &token[..token.len().min(12)]
        );
    }
    Ok(ContextForge {
        proc,
        port,
        path: format!("/servers/{id}/mcp"),
        tool,
        token,
        dir,
    })
}
