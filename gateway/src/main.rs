//! `gateway`: the daemon and its operator commands.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gateway::{config::Config, kernel, telemetry};

// Each request allocates and frees dozens of small buffers on one worker thread; glibc's malloc
// spent a quarter of the worker's time on them (perf, realistic policy, 2026-11-25). mimalloc's
// thread-local free lists make that a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "eBPF-accelerated gateway for MCP traffic")]
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
    /// Validate a configuration file and exit.
    Check { config: PathBuf },
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
        /// Pin directory of the instance.
        #[arg(long, default_value = "/sys/fs/bpf/mcp-gateway")]
        pin_dir: PathBuf,
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

#[derive(Subcommand)]
enum KernelAction {
    /// Counters per tenant and verdict, and packets passed as not ours.
    Stats,
    /// List bans.
    Bans,
    /// Ban an address for a number of seconds.
    Ban {
        addr: IpAddr,
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
    /// Lift a ban.
    Unban { addr: IpAddr },
    /// Detach and remove every pin of the instance (maps included: bans and counters are lost).
    Reset,
}

fn main() -> anyhow::Result<()> {
    // First, before any thread: a gateway being upgraded started this process to take over.
    let handover = gateway::upgrade::take_handover();
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_json);
    match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::Run { config } => {
            let run = || {
                let cfg = match &config {
                    Some(path) => Config::from_file(path)?,
                    None => Config::embedded_default(),
                };
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
        Command::Check { config } => {
            let c = Config::from_file(&config)?;
            // The certificate, key and CA files are read as a start would read them.
            gateway::tls::Edge::new(c.listeners.len())
                .prepare(&c)
                .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
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
        Command::Kernel { pin_dir, action } => kernel_command(&pin_dir, action),
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

fn kernel_command(pin_dir: &std::path::Path, action: KernelAction) -> anyhow::Result<()> {
    if let KernelAction::Reset = action {
        return Ok(kernel::remove_pins(pin_dir)?);
    }
    let mut maps = kernel::KernelMaps::open(pin_dir)
        .with_context(|| format!("no gateway maps pinned under {}", pin_dir.display()))?;
    match action {
        KernelAction::Stats => {
            for (tenant, c) in maps.all_counters()? {
                let parts: Vec<String> = gateway_common::Verdict::ALL
                    .iter()
                    .map(|v| format!("{}={}", v.name(), c.packets(*v)))
                    .collect();
                println!("tenant {tenant}: {}", parts.join(" "));
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
        }
        KernelAction::Ban { addr, seconds } => maps.ban(addr, Duration::from_secs(seconds))?,
        KernelAction::Unban { addr } => {
            if !maps.unban(addr)? {
                println!("{addr} was not banned");
            }
        }
        KernelAction::Reset => unreachable!("handled above"),
    }
    Ok(())
}
