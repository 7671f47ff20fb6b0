//! `cargo xtask <verb>`: everything a newcomer types. Each verb first runs `setup`, which installs
//! only what is missing, so a second run is a fast no-op.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark the MCP gateway")]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Install what the build and the tests need (LLVM 22, nightly rust-src, bpf-linker,
    /// nginx, the Python MCP SDK, Node 22 and the conformance suite); idempotent.
    Setup,
    /// Build the gateway (kernel program included) in release mode.
    Build,
    /// Build and run the gateway; arguments after `--` go to `gateway run`.
    Run {
        /// Run what the last build made, without building (the test of this command).
        #[arg(long)]
        no_build: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Every check and test: fmt, clippy (user and kernel crates), unit tests and the
    /// privileged kernel and network-namespace tests (root needed).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Fuzz the parsers (cargo-fuzz, libFuzzer, nightly): one target or all of them in turn,
    /// each for `--seconds`; new inputs go to fuzz/corpus/<target>, crashes to fuzz/artifacts.
    Fuzz {
        /// One of the targets in fuzz/Cargo.toml; all of them when absent.
        target: Option<String>,
        /// How long each target runs.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// Build the Debian package (cargo-deb): the binary with its kernel program, the systemd
    /// units, the configuration, completions, man pages, dashboard and alert rules; checked by
    /// lintian. Prints the .deb's path.
    Package,
    /// Benchmarks; results go to bench/results/. Exits with 3 when a row's failed requests
    /// exceed the threshold.
    Bench {
        /// A short sanity run (under 2 minutes; the full run takes under 25).
        #[arg(long)]
        quick: bool,
        /// Every row as one JSON document on stdout (the Markdown goes to stderr).
        #[arg(long)]
        json: bool,
        /// The largest share of failed requests a row may have, in percent (default 1).
        #[arg(long)]
        max_error_percent: Option<f64>,
        /// Only these scenarios (xdp, headline, proxy, policy, flood, tls, otlp, stdio, fleet,
        /// config; `idle` only when named).
        scenarios: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    let test_peers = matches!(
        cli.verb,
        Verb::Setup | Verb::Test { .. } | Verb::Fuzz { .. }
    );
    let bench_peers = matches!(cli.verb, Verb::Setup | Verb::Bench { .. });
    setup::ensure(test_peers, bench_peers).context("setup failed")?;
    if matches!(cli.verb, Verb::Setup | Verb::Package | Verb::Test { .. }) {
        setup::packaging().context("setup failed")?;
    }
    match cli.verb {
        Verb::Setup => Ok(()),
        Verb::Build => build_release(),
        Verb::Run { no_build, args } => {
            if !no_build {
                build_release()?;
            }
            require_root("cargo xtask run (loading XDP)")?;
            // Stopping `cargo xtask run` stops what it started: this process goes when cargo
            // goes (a SIGTERM to cargo is not passed on), and the gateway and the demo upstream
            // get SIGTERM when this process goes, however it goes (Ctrl-C, SIGTERM, a panic).
            die_with_parent();
            // The embedded default configuration routes /mcp to the demo upstream on :9100.
            let mut upstream = with_parent(Command::new(root.join("target/release/mcp-upstream")))
                .args(["--listen", "127.0.0.1:9100", "--workers", "1"])
                .spawn()
                .context("starting the demo upstream")?;
            // Without a configuration of the user's, the embedded default runs with its state
            // store under target/ rather than /var/lib.
            let mut args = args;
            if !args
                .iter()
                .any(|a| a == "--config" || a == "-c" || a.starts_with("--config="))
            {
                let out = Command::new(root.join("target/release/gateway"))
                    .arg("default-config")
                    .output()
                    .context("reading the default configuration")?;
                let dir = root.join("target/xtask-run");
                std::fs::create_dir_all(&dir)?;
                let config = dir.join("gateway.toml");
                let mut text = String::from_utf8(out.stdout)?;
                text.push_str(&format!(
                    "\n[state]\npath = \"{}\"\n",
                    dir.join("state").display()
                ));
                std::fs::write(&config, text)?;
                args.extend(["--config".to_owned(), config.display().to_string()]);
            }
            let status = with_parent(Command::new(root.join("target/release/gateway")))
                .arg("run")
                .args(args)
                .status();
            let _ = upstream.kill();
            let _ = upstream.wait();
            let status = status.context("starting the gateway")?;
            if !status.success() {
                bail!("the gateway exited with {status}");
            }
            Ok(())
        }
        Verb::Test { filter, no_lint } => test(filter, no_lint),
        Verb::Package => {
            let deb = package()?;
            println!("{}", deb.display());
            Ok(())
        }
        Verb::Fuzz { target, seconds } => {
            let targets = match target {
                Some(t) => vec![t],
                None => fuzz_targets()?,
            };
            for t in &targets {
                fuzz(t, seconds, &[])?;
            }
            Ok(())
        }
        Verb::Bench {
            quick,
            json,
            max_error_percent,
            scenarios,
        } => {
            let started = std::time::Instant::now();
            build_release()?;
            require_root("cargo xtask bench (BPF_PROG_TEST_RUN)")?;
            let mut cmd = cargo();
            cmd.args(["run", "--release", "-p", "bench", "--bin", "bench", "--"]);
            if quick {
                cmd.arg("--quick");
            }
            if json {
                cmd.arg("--json");
            }
            if let Some(p) = max_error_percent {
                cmd.arg(format!("--max-error-percent={p}"));
            }
            cmd.args(&scenarios);
            let status = cmd.status().context("starting the benchmarks")?;
            if !status.success() {
                // The bench's own code (3: errors over the threshold) is the answer.
                std::process::exit(status.code().unwrap_or(1));
            }
            if !scenarios.is_empty() {
                return Ok(());
            }
            // Micro-benchmarks of the request path's pieces (divan), saved beside the reports.
            let out = cargo()
                .args(["bench", "-p", "bench", "--bench", "hot_path"])
                .output()
                .context("running the micro-benchmarks")?;
            if !out.status.success() {
                bail!(
                    "micro-benchmarks failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let text = String::from_utf8_lossy(&out.stdout);
            if json {
                // stdout carries the JSON document alone.
                eprint!("{text}");
            } else {
                print!("{text}");
            }
            let date =
                String::from_utf8_lossy(&Command::new("date").arg("+%Y-%m-%d").output()?.stdout)
                    .trim()
                    .to_owned();
            let suffix = if quick { "-quick" } else { "" };
            let path = root.join(format!("bench/results/{date}-hot-path{suffix}.txt"));
            std::fs::write(&path, text.as_bytes())?;
            eprintln!("written: {}", path.display());
            let took = started.elapsed().as_secs();
            eprintln!(
                "cargo xtask bench took {}:{:02} (build, scenarios and micro-benchmarks)",
                took / 60,
                took % 60
            );
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The daemon and the bench binaries (`mcp-upstream` is the demo upstream of `run` and the
/// upstream of several tests).
fn build_release() -> anyhow::Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "gateway",
        "-p",
        "bench",
        "--bins",
    ]))
}

/// Builds the gateway, generates what the package ships beside the binary (completions and man
/// pages, from the binary's own command line), runs cargo-deb and lintian; returns the .deb.
fn package() -> anyhow::Result<PathBuf> {
    // The same build as every other verb's: `-p gateway` alone unifies other features than
    // `build_release`'s `-p gateway -p bench`, so it compiled the gateway a second time (about
    // 5 minutes here) in every `cargo xtask test`, and the bench or `run` after it a third.
    build_release()?;
    let root = workspace_root();
    let gateway = root.join("target/release/gateway");
    // Generated assets live under target/release/, where cargo-deb's asset paths expect build
    // output (gateway/Cargo.toml, [package.metadata.deb]).
    let out = root.join("target/release/package");
    let _ = std::fs::remove_dir_all(&out);
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [
        ("bash", "mcp-gateway.bash"),
        ("zsh", "_mcp-gateway"),
        ("fish", "mcp-gateway.fish"),
    ] {
        let o = Command::new(&gateway)
            .args(["completions", shell, "--name", "mcp-gateway"])
            .output()
            .context("generating completions")?;
        if !o.status.success() {
            bail!(
                "gateway completions {shell}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::fs::write(completions.join(file), o.stdout)?;
    }
    let man = out.join("man");
    run(Command::new(&gateway)
        .args(["man", "--name", "mcp-gateway"])
        .arg(&man))?;
    // Debian ships man pages compressed, without a time stamp (-n) so that builds repeat.
    for page in std::fs::read_dir(&man)? {
        run(Command::new("gzip").args(["-9nf"]).arg(page?.path()))?;
    }
    let deb_dir = root.join("target/debian");
    let _ = std::fs::remove_dir_all(&deb_dir);
    std::fs::create_dir_all(&deb_dir)?;
    run(cargo()
        .args(["deb", "-p", "gateway", "--no-build", "--output"])
        .arg(&deb_dir))?;
    let deb = std::fs::read_dir(&deb_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("cargo deb wrote no .deb")?;
    // Clean: every tag lintian would show is fixed or overridden with a reason
    // (packaging/lintian-overrides).
    run(Command::new("lintian")
        .args([
            "--fail-on",
            "error,warning,info,pedantic",
            "-I",
            "--pedantic",
        ])
        .arg(&deb))
    .context("lintian found problems in the package")?;
    Ok(deb)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|v| v.split_whitespace().nth(1) == Some("0"))
            })
        })
        .unwrap_or(false)
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what} needs root (or CAP_BPF + CAP_NET_ADMIN): run it with sudo -E");
    }
    Ok(())
}

/// The kernel crate's binary only builds for the BPF target: keep it out of host-wide commands.
const HOST_ONLY: [&str; 2] = ["--exclude", "gateway-ebpf"];

fn test(filter: Option<String>, no_lint: bool) -> anyhow::Result<()> {
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        run(cargo()
            .args(["clippy", "--workspace", "--all-targets"])
            .args(HOST_ONLY)
            .args(["--", "-D", "warnings"]))?;
        // The kernel crate only builds for the BPF target, with the nightly toolchain.
        run(Command::new("rustup").args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-p",
            "gateway-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // Unit tests of every user-space crate (no privileges needed).
    let mut unit = cargo();
    unit.args(["test", "--workspace", "--exclude", "integration-tests"])
        .args(HOST_ONLY);
    if let Some(f) = &filter {
        unit.arg("--").arg(f);
    }
    run(&mut unit)?;

    // Every fuzz target over its committed corpus, briefly: a regression of a fixed input
    // (or one close to it) fails here; long runs are `cargo xtask fuzz`.
    if filter.is_none() {
        // New inputs go to a scratch folder: a test run leaves the committed corpora as they are.
        let scratch = std::env::temp_dir().join("gateway-fuzz-scratch");
        for t in fuzz_targets()? {
            let dir = scratch.join(&t);
            std::fs::create_dir_all(&dir)?;
            let corpus = workspace_root().join("fuzz/corpus").join(&t);
            fuzz(&t, 15, &[&dir, &corpus])?;
        }
    }

    // Privileged tests: a real kernel program through BPF_PROG_TEST_RUN and in network
    // namespaces. They need the release daemon binary and root.
    build_release()?;
    let in_ci = std::env::var_os("CI").is_some();
    if !is_root() {
        if in_ci {
            bail!(
                "the privileged tests need root and this CI run is not root: failing rather than skipping"
            );
        }
        bail!(
            "the privileged tests need root: run `sudo -E cargo xtask test` (nothing was skipped silently)"
        );
    }
    // The package test installs this .deb (tests/tests/privileged/package.rs).
    let deb = package()?;
    let mut it = cargo();
    it.args([
        "test",
        "--release",
        "-p",
        "integration-tests",
        "--",
        "--test-threads=1",
    ])
    .env(
        "GATEWAY_BIN",
        workspace_root().join("target/release/gateway"),
    )
    .env("MCP_GATEWAY_DEB", deb)
    // The test of `cargo xtask run` runs this very program (tests/tests/privileged/xtask_run.rs).
    .env("XTASK_BIN", std::env::current_exe()?);
    if let Some(f) = &filter {
        it.arg(f);
    }
    run_summarized(&mut it)
}

/// Runs a libtest command, its output passed through as it comes; when it fails, each failed
/// test's message is printed again at the very end, without its backtrace: a CI log kept only
/// by its head and tail still says what failed, and why.
fn run_summarized(cmd: &mut Command) -> anyhow::Result<()> {
    use std::io::{BufRead as _, Write as _};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let out = child.stdout.take().context("the tests' output")?;
    let mut summary = FailureSummary::default();
    let mut stdout = std::io::stdout();
    for line in std::io::BufReader::new(out).split(b'\n') {
        let line = line.context("reading the tests' output")?;
        stdout.write_all(&line)?;
        stdout.write_all(b"\n")?;
        stdout.flush()?;
        summary.take(&String::from_utf8_lossy(&line));
    }
    let status = child.wait()?;
    if !status.success() {
        let text = summary.text();
        if !text.is_empty() {
            println!("\n==== the failures again, without their backtraces ====\n{text}");
        }
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The failed tests' messages in libtest's output: each `---- <test> stdout ----` block up to
/// its backtrace, at most [`FailureSummary::LINES`] lines of [`FailureSummary::WIDTH`] bytes.
#[derive(Default)]
struct FailureSummary {
    blocks: Vec<Vec<String>>,
    /// Whether lines go to the last block (cleared at its backtrace or the final list).
    open: bool,
}

impl FailureSummary {
    const LINES: usize = 40;
    const WIDTH: usize = 400;

    fn take(&mut self, line: &str) {
        if line.starts_with("---- ") && line.ends_with(" ----") {
            self.blocks.push(vec![line.to_owned()]);
            self.open = true;
        } else if line.starts_with("stack backtrace:") || line == "failures:" {
            self.open = false;
        } else if self.open
            && let Some(block) = self.blocks.last_mut()
            && block.len() < Self::LINES
        {
            let mut end = line.len().min(Self::WIDTH);
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            block.push(line[..end].to_owned());
        }
    }

    fn text(&self) -> String {
        self.blocks
            .iter()
            .map(|b| b.join("\n"))
            .collect::<Vec<_>>()
            .join("\n\n")
    }
}

/// The fuzz targets: the `[[bin]]` names of fuzz/Cargo.toml.
fn fuzz_targets() -> anyhow::Result<Vec<String>> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "list"])
        .output()
        .context("cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Runs fuzz target `target` for `seconds` over its corpus (fuzz/corpus/<target>); a crash
/// fails, with the input left in fuzz/artifacts/<target>.
/// `corpora` overrides the default corpus folder: new inputs go to the first one.
fn fuzz(target: &str, seconds: u64, corpora: &[&Path]) -> anyhow::Result<()> {
    eprintln!("fuzz: {target} for {seconds} s");
    run(Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "run", target])
        .args(corpora)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1"))
    .with_context(|| format!("fuzz target {target} failed: see fuzz/artifacts/{target}"))
}

/// SIGTERM to this process when its parent exits.
fn die_with_parent() {
    // SAFETY: prctl(2) with PR_SET_PDEATHSIG and a signal number changes only this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
}

/// `cmd`, whose process gets SIGTERM when this one exits.
fn with_parent(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl(2),
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::FailureSummary;

    #[test]
    fn the_summary_keeps_each_failures_message_and_drops_its_backtrace() {
        let out = "test a::one ... FAILED\ntest a::two ... ok\n\nfailures:\n\n---- a::one stdout ----\n\
                   log line\n\nthread 'main' panicked at tests/x.rs:1:5:\nassertion `left == right` failed\n  left: 1\n right: 2\n\
                   stack backtrace:\n   0: std::panicking\n\n---- a::three stdout ----\nthread 'main' panicked at y.rs:2:1:\nboom\n\n\
                   failures:\n    a::one\n    a::three\n\ntest result: FAILED. 1 passed; 2 failed";
        let mut s = FailureSummary::default();
        for line in out.lines() {
            s.take(line);
        }
        assert_eq!(
            s.text(),
            "---- a::one stdout ----\nlog line\n\nthread 'main' panicked at tests/x.rs:1:5:\n\
             assertion `left == right` failed\n  left: 1\n right: 2\n\n\
             ---- a::three stdout ----\nthread 'main' panicked at y.rs:2:1:\nboom\n"
        );
        let mut long = FailureSummary::default();
        long.take("---- b stdout ----");
        for _ in 0..100 {
            long.take(&"é".repeat(300));
        }
        let text = long.text();
        assert_eq!(text.lines().count(), FailureSummary::LINES);
        assert!(text.lines().all(|l| l.len() <= FailureSummary::WIDTH));
    }
}
