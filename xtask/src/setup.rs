//! Installs, only where missing, what building the kernel program needs, saying what it does:
//! LLVM 22 from Debian (for bpf-linker), the nightly toolchain's rust-src (for
//! `-Z build-std=core`), bpf-linker 0.13 built against LLVM 22, and iproute2 for the tests.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Builds and runs the fuzz targets in `fuzz/` (libFuzzer, on the nightly toolchain).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The benchmark's peer: nginx as a plain reverse proxy (run with its own configuration; the
/// package's service is not used).
const BENCH_PACKAGES: &[&str] = &["nginx-light"];

/// What building and running need; with `test_peers`, also the real MCP peers the tests use;
/// with `bench_peers`, what the benchmark compares against.
pub fn ensure(test_peers: bool, bench_peers: bool) -> anyhow::Result<()> {
    apt(APT_PACKAGES)?;
    if bench_peers {
        apt(BENCH_PACKAGES)?;
        contextforge()?;
    }
    nightly()?;
    bpf_linker()?;
    if test_peers {
        // `gateway top` is tested in a real terminal; the TLS edge with the curl and openssl
        // command-line clients.
        apt(&["tmux", "curl", "openssl"])?;
        // The observability stack is tested against a real Prometheus (and its promtool).
        apt(&["prometheus"])?;
        // The fleet tests share state through a real Redis (started by the test on loopback;
        // the package's service is not used).
        apt(&["redis-server"])?;
        python_peers()?;
        node_peers()?;
        cargo_fuzz()?;
    }
    Ok(())
}

/// cargo-fuzz, pinned: `cargo xtask test` runs every fuzz target over its corpus, and
/// `cargo xtask fuzz` runs them for longer.
pub fn cargo_fuzz() -> anyhow::Result<()> {
    let have = output(crate::cargo().args(["fuzz", "--version"])).unwrap_or_default();
    if have.contains(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    crate::run(crate::cargo().args([
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context("cargo install cargo-fuzz")
}

/// Node 22 (the conformance suite needs it; the machine's Node may be older), the MCP
/// conformance suite, the reference `server-everything` and `supergateway`, pinned, in
/// `.tools/node`.
const NPM_PACKAGES: &[&str] = &[
    "node@22.23.3",
    "@modelcontextprotocol/conformance@0.1.16",
    "@modelcontextprotocol/server-everything@2026.8.31",
    // A real filesystem server, confined by Landlock in a test.
    "@modelcontextprotocol/server-filesystem@2026.8.31",
    // The stdio-to-HTTP bridge the `stdio` benchmark compares with.
    "supergateway@4.0.0",
    // A server built as the TypeScript SDK documents it (tests/fixtures/express_server.cjs),
    // which loads these by name: installed in their own right, not only as others' dependencies.
    "@modelcontextprotocol/sdk@1.32.2",
    "express@5.3.0",
    "zod@4.6.7",
];

fn node_peers() -> anyhow::Result<()> {
    let prefix = std::path::Path::new(".tools/node");
    let installed = |pkg: &str| {
        let (name, version) = pkg.rsplit_once('@').expect("name@version");
        std::fs::read_to_string(prefix.join("node_modules").join(name).join("package.json"))
            .is_ok_and(|j| j.contains(&format!("\"version\": \"{version}\"")))
    };
    if NPM_PACKAGES.iter().all(|p| installed(p)) {
        return Ok(());
    }
    eprintln!(
        "setup: installing {} into .tools/node",
        NPM_PACKAGES.join(" ")
    );
    std::fs::create_dir_all(prefix)?;
    crate::run(
        Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--save-exact",
                "--prefix",
            ])
            .arg(prefix)
            .args(NPM_PACKAGES),
    )
    .context("npm install of the MCP conformance suite")
}

/// The Python MCP SDK (a real client and server for the end-to-end tests) and Prometheus's
/// Python client (its text-format parser checks `/metrics`), pinned, in a venv inside the
/// project: `.tools/venv`. HdrHistogram's Python port reads the gateway's histogram log in a
/// test (the format's own reader).
const PY_PACKAGES: &[&str] = &[
    "mcp==2.3.0",
    "prometheus_client==0.26.0",
    // The OTLP receiver fixture (tests/fixtures/otlp_receiver.py) decodes spans with it.
    "opentelemetry-proto==1.45.2",
    "hdrhistogram==0.10.8",
];

fn python_peers() -> anyhow::Result<()> {
    let venv = std::path::Path::new(".tools/venv");
    let python = venv.join("bin/python");
    let have = output(Command::new(&python).args(["-m", "pip", "freeze"])).unwrap_or_default();
    if PY_PACKAGES
        .iter()
        .all(|p| have.lines().any(|l| l.eq_ignore_ascii_case(p)))
    {
        return Ok(());
    }
    if !python.exists() {
        eprintln!("setup: creating the Python venv .tools/venv (real MCP peers for tests)");
        python_peers_venv(venv)?;
    }
    eprintln!(
        "setup: installing {} into .tools/venv",
        PY_PACKAGES.join(" ")
    );
    crate::run(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(PY_PACKAGES),
    )
    .context("pip install of the test peers")
}

/// The MCP-aware peer of the benchmark: IBM ContextForge from PyPI, pinned, in a venv of its own
/// (its dependencies would clash with the test peers'): `.tools/cf-venv`.
const CONTEXTFORGE: &str = "mcp-contextforge-gateway==1.0.7.post20260921";

fn contextforge() -> anyhow::Result<()> {
    let venv = std::path::Path::new(".tools/cf-venv");
    let python = venv.join("bin/python");
    let have = output(Command::new(&python).args(["-m", "pip", "freeze"])).unwrap_or_default();
    if have.lines().any(|l| l.eq_ignore_ascii_case(CONTEXTFORGE)) {
        return Ok(());
    }
    if !python.exists() {
        python_peers_venv(venv)?;
    }
    eprintln!("setup: installing {CONTEXTFORGE} into .tools/cf-venv (benchmark peer)");
    crate::run(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .arg(CONTEXTFORGE),
    )
    .context("pip install of ContextForge")
}

/// Creates a venv at `venv`, installing python3-venv first if the machine lacks it.
fn python_peers_venv(venv: &std::path::Path) -> anyhow::Result<()> {
    if !quiet(Command::new("python3").args(["-m", "venv"]).arg(venv)) {
        eprintln!("setup: installing python3-venv");
        let mut apt = Command::new("apt-get");
        apt.args(["install", "-y", "-qq", "python3-venv"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        crate::run(&mut apt)?;
        crate::run(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    }
    Ok(())
}

/// Builds the Debian package (`cargo xtask package`) and checks it (the package test): cargo-deb,
/// pinned, lintian and logrotate.
const CARGO_DEB_VERSION: &str = "3.8.0";

pub fn packaging() -> anyhow::Result<()> {
    // logrotate: the package test rotates the audit log with the shipped snippet.
    apt(&["lintian", "logrotate"])?;
    let have = output(crate::cargo().args(["deb", "--version"])).unwrap_or_default();
    if have.contains(CARGO_DEB_VERSION) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-deb {CARGO_DEB_VERSION} (about a minute)");
    crate::run(crate::cargo().args([
        "install",
        "--locked",
        "cargo-deb",
        "--version",
        CARGO_DEB_VERSION,
    ]))
    .context("cargo install cargo-deb")
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    cmd.stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    let sudo = !crate::is_root();
    let apt = |args: &[&str]| {
        let mut c = if sudo {
            Command::new("sudo")
        } else {
            Command::new("apt-get")
        };
        if sudo {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    crate::run(&mut apt(&["update", "-qq"])).context("apt-get update")?;
    let mut install = apt(&["install", "-y", "-qq"]);
    install.args(&missing);
    crate::run(&mut install).with_context(|| format!("installing {}", missing.join(" ")))
}

fn nightly() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain (builds the kernel program)");
        crate::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src,clippy",
        ]))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    for comp in ["rust-src", "clippy"] {
        if !comps.lines().any(|l| l.starts_with(comp)) {
            eprintln!("setup: adding {comp} to the nightly toolchain");
            crate::run(Command::new("rustup").args([
                "component",
                "add",
                comp,
                "--toolchain",
                "nightly",
            ]))?;
        }
    }
    for comp in ["clippy", "rustfmt"] {
        if !quiet(Command::new("cargo").args([comp_cmd(comp), "--version"])) {
            eprintln!("setup: adding {comp} to the stable toolchain");
            crate::run(Command::new("rustup").args(["component", "add", comp]))?;
        }
    }
    Ok(())
}

fn comp_cmd(comp: &str) -> &'static str {
    if comp == "clippy" { "clippy" } else { "fmt" }
}

fn bpf_linker() -> anyhow::Result<()> {
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    if !have.is_empty() {
        eprintln!(
            "setup: replacing {} with bpf-linker {BPF_LINKER_VERSION}",
            have.trim()
        );
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)");
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    crate::run(
        crate::cargo()
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path),
    )
    .context("cargo install bpf-linker")?;
    if output(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}
