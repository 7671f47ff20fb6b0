//! `gateway`: the daemon and its operator commands.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gateway::{
    config::{Config, LoadOptions},
    kernel, telemetry,
};
use ipnet::IpNet;

// Each request allocates and frees dozens of small buffers on one worker thread; glibc's malloc
// spent a quarter of the worker's time on them (perf, realistic policy, 2026-11-25). mimalloc's
// thread-local free lists make that a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process before its first allocation (mimalloc
/// does the same when `MIMALLOC_ALLOW_THP=0`; any value of it the operator set is left to
/// mimalloc). mimalloc advises them on its 1 GiB arena, and the kernel then backs each 2 MiB
/// range touched with a whole huge page: a purge of the pages freed after connections close
/// splits them, and khugepaged fills the holes again (it collapses a range with a single page
/// in use), so RSS given back came back over the next minutes. Runs as a constructor, after
/// mimalloc's own (which reserves nothing yet) and before Rust's runtime allocates: from
/// `main`, the first 4 MiB were already huge pages and stayed. Children (stdio upstreams) get
/// the setting back (`stdio::sandbox`).
#[used]
#[unsafe(link_section = ".init_array")]
static NO_TRANSPARENT_HUGE_PAGES: extern "C" fn() = no_transparent_huge_pages;

extern "C" fn no_transparent_huge_pages() {
    // SAFETY: getenv with a NUL-terminated name, before any thread; prctl(PR_SET_THP_DISABLE)
    // only sets a flag of this process.
    unsafe {
        if libc::getenv(c"MIMALLOC_ALLOW_THP".as_ptr()).is_null() {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}

/// `--version`: the package version and the commit it was built from (gateway/build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("GATEWAY_GIT_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(version = VERSION, about = "eBPF-accelerated gateway for MCP traffic")]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default command).
    Run {
        /// Configuration file; the embedded default when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and what a start would need of this host (files it reads,
    /// log directories, interfaces), then exit. Creates nothing.
    Check {
        config: PathBuf,
        /// Do not read the environment variables the file names (tokens, credentials): check
        /// without the production secrets.
        #[arg(long)]
        no_env: bool,
        /// Do not resolve upstream host names (no network needed).
        #[arg(long)]
        offline: bool,
        /// The file is for another host: do not look at the files, directories and interfaces
        /// it names here.
        #[arg(long)]
        no_host: bool,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Print the JSON schema of the configuration file.
    ConfigSchema,
    /// Live view of a running gateway: rates, errors and latency per tool and tenant, kernel
    /// drops, from its admin API.
    Top {
        /// Admin listener of the gateway.
        #[arg(long, default_value = "127.0.0.1:9181")]
        admin: String,
        /// Environment variable holding the admin token, if the gateway has one.
        #[arg(long)]
        token_env: Option<String>,
        /// Window of the figures: 10s, 1m, 5m or all.
        #[arg(long, default_value = "10s")]
        window: String,
        /// Refresh interval in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Print the figures once as plain text and exit (for scripts and ssh; also what
        /// happens when stdout is not a terminal).
        #[arg(long)]
        once: bool,
    },
    /// The state store of an instance (budgets spent, pins and approvals, bans): check it,
    /// export it, or move it aside.
    State {
        #[command(subcommand)]
        action: StateAction,
    },
    /// Upgrade the running gateway of an instance to the binary now at its path, without
    /// dropping a connection: a new process takes over its sockets and the old one drains and
    /// exits. If the new process cannot start (its configuration invalid, say), the running one
    /// serves on and this says why. (SIGUSR2 to the gateway does the same.)
    Upgrade {
        /// Instance name of the gateway (`gateway.instance`).
        #[arg(long, conflicts_with = "config")]
        instance: Option<String>,
        /// Configuration file of the instance (names the instance).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Kernel state of an instance, read from its pinned maps.
    Kernel {
        #[command(flatten)]
        which: KernelInstance,
        #[command(subcommand)]
        action: KernelAction,
    },
    /// Print the completion script of a shell (bash, zsh, fish, elvish, powershell), for
    /// packaging.
    #[command(hide = true)]
    Completions {
        shell: clap_complete::Shell,
        /// The command's name as installed.
        #[arg(long, default_value = "gateway")]
        name: String,
    },
    /// Write the man pages (one per command) into a directory, for packaging.
    #[command(hide = true)]
    Man {
        dir: PathBuf,
        /// The command's name as installed.
        #[arg(long, default_value = "gateway")]
        name: String,
    },
}

/// Exit status of a start refused because the state store cannot be used (sysexits' EX_DATAERR).
const EXIT_STATE: i32 = 65;

#[derive(clap::Args)]
struct StateArgs {
    /// Configuration file of the instance (names the store's folder).
    #[arg(long, short)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum StateAction {
    /// Check every page and record of the store (the gateway must not be running).
    Check(StateArgs),
    /// Print everything the store holds as JSON.
    Export(StateArgs),
    /// Move the store's file aside (never deleted); the next start begins with empty state.
    Reset(StateArgs),
}

/// Which instance `gateway kernel` talks to: the default instance `mcp-gateway` unless one of
/// these says otherwise.
#[derive(clap::Args)]
#[group(multiple = false)]
struct KernelInstance {
    /// Configuration file of the instance: its pin directory, and its tenants' names in the
    /// output. Read without the environment or network (as `check --no-env --offline`).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Instance name (`[gateway] instance`), pinned under /sys/fs/bpf/<instance>.
    #[arg(long, global = true)]
    instance: Option<String>,
    /// Pin directory of the instance.
    #[arg(long, global = true)]
    pin_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KernelAction {
    /// Counters per tenant and verdict, and packets passed as not ours.
    Stats,
    /// List bans (addresses and prefixes).
    Bans,
    /// Ban an address or a prefix (CIDR, e.g. 198.51.100.0/24).
    Ban {
        #[arg(value_parser = parse_target)]
        target: IpNet,
        /// How long: seconds (`300`) or a duration (`10m`, `2h 30m`, `1d`).
        #[arg(long, default_value = "300", value_parser = parse_duration)]
        seconds: Duration,
    },
    /// Lift a ban (of exactly that address or prefix).
    Unban {
        #[arg(value_parser = parse_target)]
        target: IpNet,
    },
    /// Detach and remove every pin of the instance (maps included: bans and counters are lost).
    Reset,
}

/// An address or a prefix: `198.51.100.7`, `198.51.100.0/24`, `2001:db8::/48`. Host bits
/// below the prefix are refused (they would hide a typo).
fn parse_target(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text
        .parse()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{text}` is not an address or a CIDR prefix"))?;
    if net.trunc() != net {
        return Err(format!(
            "`{text}` has host bits set; did you mean `{}`?",
            net.trunc()
        ));
    }
    if let Some(problem) = gateway::config::covers_ipv4(&net) {
        return Err(format!("`{text}` {problem}"));
    }
    Ok(net)
}

/// Seconds as a bare number, or a humantime duration (`10m`, `1h 30m`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = match text.parse::<u64>() {
        Ok(s) => Duration::from_secs(s),
        Err(_) => humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e}"))?,
    };
    if d.is_zero() {
        return Err("a ban of no time bans nothing".into());
    }
    Ok(d)
}

/// An error as one line: its causes appended once each. thiserror messages often repeat their
/// source (`cannot read x: No such file`), which anyhow's report would print again below.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn main() -> ExitCode {
    // First, before any thread: a gateway being upgraded started this process to take over.
    let handover = gateway::upgrade::take_handover();
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_json);
    match run(cli, handover) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, handover: Option<gateway::upgrade::Successor>) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::Run { config } => {
            let run = || {
                let cfg = match &config {
                    Some(path) => Config::from_file(path)?,
                    None => Config::embedded_default(),
                };
                gateway::config::warn_demo_key(&cfg);
                gateway::control::run(cfg, config.clone(), handover.as_ref())
            };
            let r = run();
            if let (Err(e), Some(h)) = (&r, &handover) {
                // The running gateway serves on, and says why.
                h.fail(&format!("{e:#}"));
            }
            if let Err(e) = &r
                && let Some(e) = e.downcast_ref::<gateway::state::StoreError>()
            {
                tracing::error!("{e}");
                std::process::exit(EXIT_STATE);
            }
            r
        }
        Command::State { action } => state_command(action),
        Command::Check {
            config,
            no_env,
            offline,
            no_host,
        } => {
            let c = Config::from_file_with(
                &config,
                LoadOptions {
                    no_env,
                    offline,
                    no_host,
                },
            )?;
            if !no_host {
                c.check_host()?;
                // The certificate, key and CA files are read as a start would read them.
                gateway::tls::Edge::new(c.listeners.len())
                    .prepare(&c)
                    .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
            }
            println!(
                "{}: valid ({} listeners, {} tenants)",
                config.display(),
                c.listeners.len(),
                c.tenants.len()
            );
            Ok(())
        }
        Command::DefaultConfig => {
            print!("{}", gateway::config::DEFAULT_CONFIG);
            Ok(())
        }
        Command::ConfigSchema => {
            print!("{}", gateway::config::json_schema());
            Ok(())
        }
        Command::Kernel { which, action } => kernel_command(which, action),
        Command::Completions { shell, name } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir, name } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            // clap names commands with `&'static str`; this command runs once and exits.
            let name: &'static str = Box::leak(name.into_boxed_str());
            let cmd = <Cli as clap::CommandFactory>::command()
                .name(name)
                .bin_name(name);
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))
        }
        Command::Upgrade { instance, config } => {
            let instance = match (instance, config) {
                (Some(i), _) => i,
                (None, Some(path)) => Config::from_file(&path)?.instance,
                (None, None) => Config::embedded_default().instance,
            };
            let pid = gateway::upgrade::request(&instance)?;
            println!(
                "upgraded: the new gateway process (pid {pid}) serves; the old one drains and exits"
            );
            Ok(())
        }
        Command::Top {
            admin,
            token_env,
            window,
            interval_ms,
            once,
        } => {
            let token = match token_env {
                Some(var) => Some(
                    std::env::var(&var)
                        .with_context(|| format!("environment variable `{var}` is not set"))?,
                ),
                None => None,
            };
            gateway::top::run(gateway::top::Options {
                admin,
                token,
                window,
                interval: Duration::from_millis(interval_ms.max(100)),
                once,
            })
        }
    }
}

fn state_command(action: StateAction) -> anyhow::Result<()> {
    use gateway::state::Store;
    let (StateAction::Check(a) | StateAction::Export(a) | StateAction::Reset(a)) = &action;
    let config = a.config.as_path();
    let c = Config::from_file(config)?;
    let Some(dir) = c.state.dir else {
        anyhow::bail!("{}: `[state] disabled = true`: no store", config.display());
    };
    match action {
        StateAction::Check(_) => {
            let mut store = Store::open(&dir)?;
            store.check()?;
            println!(
                "{}: readable ({} bytes)",
                store.path().display(),
                store.bytes()
            );
        }
        StateAction::Export(_) => {
            let store = Store::open(&dir)?;
            println!("{}", serde_json::to_string_pretty(&store.export()?)?);
        }
        StateAction::Reset(_) => match Store::reset(&dir)
            .with_context(|| format!("moving {} aside", Store::file(&dir).display()))?
        {
            Some(aside) => println!(
                "{} moved to {}; the next start begins with empty state",
                Store::file(&dir).display(),
                aside.display()
            ),
            None => println!("{}: no store", Store::file(&dir).display()),
        },
    }
    Ok(())
}

fn kernel_command(which: KernelInstance, action: KernelAction) -> anyhow::Result<()> {
    let (pin_dir, config) = match (which.config, which.instance, which.pin_dir) {
        (Some(path), _, _) => {
            let c = Config::from_file_with(
                &path,
                LoadOptions {
                    no_env: true,
                    offline: true,
                    no_host: true,
                },
            )?;
            (c.kernel.pin_dir.clone(), Some(c))
        }
        (None, Some(instance), _) => (PathBuf::from("/sys/fs/bpf").join(instance), None),
        (None, None, Some(dir)) => (dir, None),
        (None, None, None) => (PathBuf::from("/sys/fs/bpf/mcp-gateway"), None),
    };
    let pin_dir = pin_dir.as_path();
    if let KernelAction::Reset = action {
        return Ok(kernel::remove_pins(pin_dir)?);
    }
    let mut maps = kernel::KernelMaps::open(pin_dir)
        .with_context(|| format!("no gateway maps pinned under {}", pin_dir.display()))?;
    let tenant_name = |id: u32| {
        config.as_ref().and_then(|c| c.tenant(id)).map_or_else(
            || format!("tenant {id}"),
            |t| format!("tenant {} ({id})", t.name),
        )
    };
    match action {
        KernelAction::Stats => {
            for (tenant, c) in maps.all_counters()? {
                let parts: Vec<String> = gateway_common::Verdict::ALL
                    .iter()
                    .map(|v| format!("{}={}", v.name(), c.packets(*v)))
                    .collect();
                println!("{}: {}", tenant_name(tenant), parts.join(" "));
            }
            let other: Vec<String> = maps
                .global_counters()?
                .iter()
                .map(|(c, v)| format!("{}={v}", c.name()))
                .collect();
            println!("all packets: {}", other.join(" "));
        }
        KernelAction::Bans => {
            for b in maps.bans()? {
                println!("{} {}s", b.addr, b.remaining.as_secs());
            }
            for b in maps.net_bans()? {
                println!("{} {}s", b.net, b.remaining.as_secs());
            }
        }
        KernelAction::Ban { target, seconds } => maps.ban_net(target, seconds)?,
        KernelAction::Unban { target } => {
            if !maps.unban_net(target)? {
                println!("{target} was not banned");
            }
        }
        KernelAction::Reset => unreachable!("handled above"),
    }
    Ok(())
}
