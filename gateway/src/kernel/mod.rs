//! The kernel side, as seen from the control thread: load the embedded XDP object, pin its maps
//! under `/sys/fs/bpf/<instance>/`, attach to interfaces (native, else generic), keep the maps in
//! step with the configuration, detach on shutdown. Workers never make bpf syscalls.

mod maps;

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, Xdp,
        links::{FdLink, PinnedLink},
        xdp::XdpMode,
    },
};
pub use maps::{
    Ban, KernelMaps, KernelState, NetBan, SyncReport, TenantTotals, addr_key, key_addr,
    monotonic_ns, net_key,
};

use crate::config::AttachMode;

/// The compiled XDP object, built by `build.rs` from `gateway-ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "loading the XDP program needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (running as uid {uid}); \
         run as root or set kernel.enabled = false"
    )]
    Permission { uid: u32 },
    #[error(
        "kernel {release} is too old or lacks BTF: the gateway needs Linux >= 5.15 with /sys/kernel/btf/vmlinux"
    )]
    KernelTooOld { release: String },
    #[error("interface `{0}` does not exist (see `ip link`)")]
    NoInterface(String),
    #[error("the kernel's verifier rejected the XDP program ({source}); verifier log:\n{log}")]
    Verifier { source: io::Error, log: String },
    #[error("attaching XDP to `{interface}` in {mode} mode failed: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        source: ProgramError,
    },
    #[error("another gateway with instance name `{instance}` is running (it holds {lock})")]
    AlreadyRunning { instance: String, lock: String },
    #[error("bpffs at {path}: {problem}")]
    Bpffs { path: String, problem: String },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{context}: {source}")]
    Ebpf {
        context: &'static str,
        source: aya::EbpfError,
    },
    #[error("{context}: {source}")]
    Program {
        context: String,
        source: ProgramError,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

impl KernelError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The attach mode in force on one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        }
    }
}

/// One attachment: the link is pinned, so a crash leaves the program enforcing and the next
/// start finds and replaces it (see [`Kernel::attach`]).
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub mode: AttachedMode,
    pin: PathBuf,
}

/// The loaded program and its attachments. Owned by the control thread.
pub struct Kernel {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attachments: Vec<Attachment>,
    _lock: File,
}

/// Checks what loading needs and says plainly what is missing.
pub fn preflight() -> Result<(), KernelError> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse::<u32>().ok());
    let (major, minor) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    if (major, minor) < (5, 15) || !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(KernelError::KernelTooOld { release });
    }
    let uid = nix::unistd::geteuid();
    if !uid.is_root() && !has_bpf_caps() {
        return Err(KernelError::Permission { uid: uid.as_raw() });
    }
    Ok(())
}

fn has_bpf_caps() -> bool {
    // CapEff in /proc/self/status: CAP_NET_ADMIN = 12, CAP_PERFMON = 38, CAP_BPF = 39.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    [12, 38, 39].iter().all(|bit| eff & (1 << bit) != 0)
}

/// Makes sure `root` is a mounted bpffs (mounting it if needed) and `dir` exists inside it.
fn prepare_pin_dir(dir: &Path) -> Result<(), KernelError> {
    let root = dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
    };
    if !is_bpffs(root) {
        std::fs::create_dir_all(root)
            .map_err(KernelError::io(format!("creating {}", root.display())))?;
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| KernelError::Bpffs {
            path: root.display().to_string(),
            problem: format!("not a bpf filesystem and mounting one failed: {e}"),
        })?;
    }
    std::fs::create_dir_all(dir).map_err(KernelError::io(format!("creating {}", dir.display())))
}

/// One process per instance: an exclusive lock under /run, released by the kernel on exit.
fn lock_instance(instance: &str) -> Result<File, KernelError> {
    let dir = Path::new("/run/mcp-gateway");
    std::fs::create_dir_all(dir).map_err(KernelError::io(format!("creating {}", dir.display())))?;
    let path = dir.join(format!("{instance}.lock"));
    let file =
        File::create(&path).map_err(KernelError::io(format!("creating {}", path.display())))?;
    // SAFETY: flock on a valid descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(KernelError::AlreadyRunning {
            instance: instance.into(),
            lock: path.display().to_string(),
        });
    }
    Ok(file)
}

/// Loads the program with every map pinned under `pin_dir`, reusing maps already pinned there
/// (so bans, buckets and counters survive a restart). Does not attach.
pub fn load(instance: &str, pin_dir: &Path) -> Result<Kernel, KernelError> {
    preflight()?;
    let lock = lock_instance(instance)?;
    prepare_pin_dir(pin_dir)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(EBPF_OBJECT)
        .map_err(|source| match source {
            aya::EbpfError::MapError(aya::maps::MapError::SyscallError(ref s))
                if s.io_error.raw_os_error() == Some(libc::EPERM) =>
            {
                KernelError::Permission {
                    uid: nix::unistd::geteuid().as_raw(),
                }
            }
            source => KernelError::Ebpf {
                context: "loading the eBPF object",
                source,
            },
        })?;
    let program = xdp_program(&mut ebpf)?;
    program.load().map_err(|e| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => KernelError::Verifier {
            source: io_error,
            log: verifier_log.to_string(),
        },
        source => KernelError::Program {
            context: "loading the XDP program".into(),
            source,
        },
    })?;
    Ok(Kernel {
        ebpf,
        pin_dir: pin_dir.to_owned(),
        attachments: Vec::new(),
        _lock: lock,
    })
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, KernelError> {
    let name = gateway_common::XDP_PROGRAM;
    ebpf.program_mut(name)
        .ok_or_else(|| KernelError::Program {
            context: format!("program `{name}` missing from the object"),
            source: ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| KernelError::Program {
            context: format!("`{name}` is not XDP"),
            source,
        })
}

impl Kernel {
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Opens typed handles on this instance's maps.
    pub fn maps(&self) -> Result<KernelMaps, KernelError> {
        KernelMaps::open(&self.pin_dir)
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The in-kernel program, for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    pub fn program(&mut self) -> Result<&mut Xdp, KernelError> {
        xdp_program(&mut self.ebpf)
    }

    /// Attaches to `interface`. A link pinned there by an earlier run that did not shut down
    /// cleanly is detached first. `Auto` tries native mode and falls back to generic.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<AttachedMode, KernelError> {
        let c_name = std::ffi::CString::new(interface)
            .map_err(|_| KernelError::NoInterface(interface.into()))?;
        // SAFETY: valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            return Err(KernelError::NoInterface(interface.into()));
        }
        let pin = self.pin_dir.join(format!("link_{interface}"));
        if remove_stale_link(&pin)? {
            tracing::warn!(interface, pin = %pin.display(), "detached a stale XDP attachment left by an earlier run");
        }
        let program = self.program()?;
        let tries: &[(XdpMode, AttachedMode)] = match mode {
            AttachMode::Native => &[(XdpMode::Driver, AttachedMode::Native)],
            AttachMode::Generic => &[(XdpMode::Skb, AttachedMode::Generic)],
            AttachMode::Auto => &[
                (XdpMode::Driver, AttachedMode::Native),
                (XdpMode::Skb, AttachedMode::Generic),
            ],
        };
        let mut last_err = None;
        for (xdp_mode, attached) in tries {
            match program.attach(interface, *xdp_mode) {
                Ok(id) => {
                    let link = program
                        .take_link(id)
                        .map_err(|source| KernelError::Program {
                            context: "taking the XDP link".into(),
                            source,
                        })?;
                    let fd_link: FdLink = link.try_into().map_err(|e| KernelError::Program {
                        context: format!("XDP on `{interface}` is not a bpf_link ({e}); Linux >= 5.15 is required"),
                        source: ProgramError::NotAttached,
                    })?;
                    fd_link.pin(&pin).map_err(|e| KernelError::Io {
                        context: format!("pinning the XDP link at {}", pin.display()),
                        source: io::Error::other(e.to_string()),
                    })?;
                    if last_err.is_some() {
                        tracing::warn!(
                            interface,
                            "native XDP is not supported here; attached in generic mode (slower, still before the TCP stack)"
                        );
                    }
                    self.attachments.push(Attachment {
                        interface: interface.into(),
                        mode: *attached,
                        pin,
                    });
                    return Ok(*attached);
                }
                Err(source) => {
                    last_err = Some(KernelError::Attach {
                        interface: interface.into(),
                        mode: attached.as_str(),
                        source,
                    })
                }
            }
        }
        Err(last_err.expect("at least one attach mode was tried"))
    }

    /// Detaches from every interface and removes the link pins. Maps stay pinned.
    pub fn detach_all(&mut self) -> Result<(), KernelError> {
        for a in self.attachments.drain(..) {
            remove_stale_link(&a.pin)?;
        }
        Ok(())
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        if let Err(e) = self.detach_all() {
            tracing::error!(error = %e, "detaching the XDP program failed");
        }
    }
}

/// Unpins and closes a pinned link, which detaches its program. Returns whether one was there.
fn remove_stale_link(pin: &Path) -> Result<bool, KernelError> {
    if !pin.exists() {
        return Ok(false);
    }
    match PinnedLink::from_pin(pin) {
        Ok(link) => {
            let fd_link = link
                .unpin()
                .map_err(KernelError::io(format!("unpinning {}", pin.display())))?;
            drop(fd_link);
        }
        // Not a link (or unreadable): remove the file so a fresh pin can take its place.
        Err(_) => std::fs::remove_file(pin)
            .map_err(KernelError::io(format!("removing {}", pin.display())))?,
    }
    Ok(true)
}

/// Removes every pin of an instance (maps and links), as `gateway reset-kernel-state` does.
pub fn remove_pins(pin_dir: &Path) -> Result<(), KernelError> {
    if !pin_dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(pin_dir)
        .map_err(KernelError::io(format!("reading {}", pin_dir.display())))?
    {
        let path = entry.map_err(KernelError::io("reading a pin"))?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
        {
            remove_stale_link(&path)?;
        } else {
            std::fs::remove_file(&path)
                .map_err(KernelError::io(format!("removing {}", path.display())))?;
        }
    }
    std::fs::remove_dir(pin_dir).map_err(KernelError::io(format!("removing {}", pin_dir.display())))
}
