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
    monotonic_after, monotonic_ns, net_key,
};

use crate::config::AttachMode;

/// The compiled XDP object, built by `build.rs` from `gateway-ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "loading the XDP program needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (running as uid {uid}, \
         missing from the effective set: {missing}); run as root, grant them (systemd: AmbientCapabilities=), \
         or set kernel.enabled = false"
    )]
    Permission { uid: u32, missing: String },
    #[error("{what} {path}: permission denied for uid {uid} ({detail}); {fix}")]
    Access {
        what: &'static str,
        path: String,
        uid: u32,
        detail: String,
        fix: &'static str,
    },
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
    #[error(
        "map {map} is full ({max} prefixes): new prefixes are written before the ones they \
         replace are removed (so that traffic is never judged against half a configuration), so \
         the running and the new prefixes must fit together; go through a configuration with \
         fewer of them first"
    )]
    Full { map: &'static str, max: u32 },
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
    /// The mode named by [`AttachedMode::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "native" => Some(Self::Native),
            "generic" => Some(Self::Generic),
            _ => None,
        }
    }

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
    /// The mode asked for, for an attachment made again ([`Kernel::check_attachments`]).
    requested: AttachMode,
    /// The interface's index when the program was attached to it (0 once it is gone): an
    /// interface made again under the same name has another, and no program.
    ifindex: u32,
    pin: PathBuf,
    /// Taken over from the gateway being upgraded: an error exit before serving leaves it to
    /// that one (which puts its program back), rather than detaching.
    taken_over: bool,
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
    let missing = missing_bpf_caps();
    if !missing.is_empty() {
        return Err(permission(&missing));
    }
    Ok(())
}

fn permission(missing: &[&str]) -> KernelError {
    KernelError::Permission {
        uid: nix::unistd::geteuid().as_raw(),
        missing: if missing.is_empty() {
            "none, yet the kernel refused".into()
        } else {
            missing.join(", ")
        },
    }
}

/// The capabilities loading and attaching need that the effective set lacks (root has them
/// all unless a bounding set took them away, so the set is read for root too).
pub fn missing_bpf_caps() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    [(39, "CAP_BPF"), (12, "CAP_NET_ADMIN"), (38, "CAP_PERFMON")]
        .into_iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, name)| name)
        .collect()
}

/// Turns a permission failure on `path` into an error naming the user, the path's owner and
/// mode, and the fix; other failures keep their context.
fn access_error(
    what: &'static str,
    path: &Path,
    fix: &'static str,
) -> impl FnOnce(io::Error) -> KernelError {
    move |source| {
        if source.kind() != io::ErrorKind::PermissionDenied {
            return KernelError::Io {
                context: format!("{what} {}", path.display()),
                source,
            };
        }
        // The nearest existing ancestor is the one whose permissions refused.
        let detail = path
            .ancestors()
            .find_map(|p| std::fs::metadata(p).ok().map(|m| (p, m)))
            .map(|(p, m)| {
                use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
                format!(
                    "{} is owned by uid {} gid {}, mode {:o}",
                    p.display(),
                    m.uid(),
                    m.gid(),
                    m.permissions().mode() & 0o7777
                )
            })
            .unwrap_or_default();
        KernelError::Access {
            what,
            path: path.display().to_string(),
            uid: nix::unistd::geteuid().as_raw(),
            detail,
            fix,
        }
    }
}

const PIN_DIR_FIX: &str = "the pin directory's parent must be writable by the gateway's user: \
     the package's tmpfiles.d entry makes /sys/fs/bpf/mcp-gateway for the mcp-gateway user; else, as root, \
     `install -d -o USER -g USER -m 0750 DIR`; pins an earlier root run left need `gateway kernel reset` as root";

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
        // 1755 (bpffs keeps the sticky bit), not the new filesystem's own 1777: no other user
        // makes names beside the pins.
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0755"),
        )
        .map_err(|e| KernelError::Bpffs {
            path: root.display().to_string(),
            problem: format!("not a bpf filesystem and mounting one failed: {e}"),
        })?;
    }
    std::fs::create_dir_all(dir).map_err(access_error("creating", dir, PIN_DIR_FIX))
}

/// Unpins the global counters an earlier version pinned with fewer entries than this program
/// counts (aya reuses a pinned map as it is): the program's new counters would count nowhere.
/// They start again from 0; nothing else is kept in them.
fn drop_outgrown_counters(pin_dir: &Path) {
    let pin = pin_dir.join(gateway_common::map_names::GLOBAL);
    let Ok(info) = aya::maps::MapInfo::from_pin(&pin) else {
        return;
    };
    if info.max_entries() != gateway_common::GLOBAL_COUNTER_COUNT {
        tracing::info!(pin = %pin.display(), entries = info.max_entries(), "the pinned global counters are of an earlier version: made again");
        if let Err(e) = std::fs::remove_file(&pin) {
            tracing::warn!(pin = %pin.display(), error = %e, "could not unpin the earlier global counters");
        }
    }
}

/// One process per instance: an exclusive lock under the runtime directory, released by the
/// kernel on exit.
fn lock_instance(instance: &str) -> Result<File, KernelError> {
    let dir = crate::host::runtime_dir();
    const LOCK_FIX: &str = "run under systemd with RuntimeDirectory=mcp-gateway (sets $RUNTIME_DIRECTORY), \
         or create the directory owned by this user";
    std::fs::create_dir_all(&dir).map_err(access_error("creating", &dir, LOCK_FIX))?;
    let path = dir.join(format!("{instance}.lock"));
    // Read-only: a lock file an earlier run under another user (root) left behind, mode 0644,
    // still serves; `flock` needs no write access.
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CREAT)
        .mode(0o644)
        .open(&path)
        .map_err(access_error("opening", &path, LOCK_FIX))?;
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
    load_as(instance, pin_dir, None)
}

/// [`load`], with the instance lock the running gateway handed over during a binary upgrade
/// (`lock`: the same open file, so the lock is held throughout) instead of taking it.
pub fn load_as(instance: &str, pin_dir: &Path, lock: Option<File>) -> Result<Kernel, KernelError> {
    preflight()?;
    let lock = match lock {
        Some(lock) => lock,
        None => lock_instance(instance)?,
    };
    prepare_pin_dir(pin_dir)?;
    drop_outgrown_counters(pin_dir);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(EBPF_OBJECT)
        .map_err(|source| match source {
            aya::EbpfError::MapError(aya::maps::MapError::SyscallError(ref s))
                if s.io_error.raw_os_error() == Some(libc::EPERM) =>
            {
                permission(&missing_bpf_caps())
            }
            // A pin made by another user (an earlier run as root) is not ours to open.
            aya::EbpfError::MapError(aya::maps::MapError::SyscallError(ref s))
                if s.io_error.raw_os_error() == Some(libc::EACCES) =>
            {
                access_error("opening the pinned maps in", pin_dir, PIN_DIR_FIX)(
                    io::Error::from_raw_os_error(libc::EACCES),
                )
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
        let (attached, ifindex, pin) = self.link(interface, mode)?;
        self.attachments.push(Attachment {
            interface: interface.into(),
            mode: attached,
            requested: mode,
            ifindex,
            pin,
            taken_over: false,
        });
        Ok(attached)
    }

    /// Attaches to `interface` with a link pinned in the instance's directory: the mode in
    /// force, the interface's index and the pin.
    fn link(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(AttachedMode, u32, PathBuf), KernelError> {
        let ifindex = crate::host::interface_index(interface);
        if ifindex == 0 {
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
                    return Ok((*attached, ifindex, pin));
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

    /// The instance lock, for handing over to the upgraded gateway.
    pub fn lock_file(&self) -> &File {
        &self._lock
    }

    /// Takes over the attachment to `interface` that the running gateway (the one being
    /// upgraded) pinned: its link is made to run this program instead (`bpf_link_update`), so
    /// the interface is never without a program. The link keeps its mode, `mode`.
    /// A link whose interface is gone (deleted, or deleted and made again) is not taken over
    /// (it cannot run a program again): the attachment is missing, and
    /// [`Kernel::check_attachments`] attaches it again once the interface is there (before, the
    /// upgrade failed on it, after the running gateway had given up its listeners).
    pub fn take_over(
        &mut self,
        interface: &str,
        mode: AttachedMode,
        requested: AttachMode,
    ) -> Result<(), KernelError> {
        let pin = self.pin_dir.join(format!("link_{interface}"));
        let now = crate::host::interface_index(interface);
        let live = now != 0 && xdp_link_ifindex(&pin) == Some(now);
        if live {
            self.replace_program(&pin)?;
        } else {
            tracing::warn!(
                interface,
                "the XDP link handed over is not attached (its interface is gone or was made again); attached again once the interface is there"
            );
        }
        self.attachments.push(Attachment {
            interface: interface.into(),
            mode,
            requested,
            ifindex: if live { now } else { 0 },
            pin,
            taken_over: live,
        });
        Ok(())
    }

    /// Whether each attachment is still in place, attaching again those that are not where
    /// their interface is back. An interface deleted and made again under its name (what
    /// `netplan apply` does to VLANs and bonds, a restarted container to its veth) loses its
    /// program without a word to anyone, and so does one whose link's pin was removed: the
    /// kernel program stopped judging its traffic while the gateway reported it attached.
    /// Checked by the interface's index (changed or gone) and by the pinned link's own (0 once
    /// its device went, or it was detached by hand, `bpftool link detach`): an interface made
    /// again under the same index has a link of index 0.
    pub fn check_attachments(&mut self) -> Vec<(String, Checked)> {
        let mut checked = Vec::with_capacity(self.attachments.len());
        for i in 0..self.attachments.len() {
            let a = &self.attachments[i];
            let interface = a.interface.clone();
            let now = crate::host::interface_index(&interface);
            if now != 0 && now == a.ifindex && xdp_link_ifindex(&a.pin) == Some(now) {
                checked.push((interface, Checked::Attached(a.mode)));
                continue;
            }
            if now == 0 {
                self.attachments[i].ifindex = 0;
                checked.push((interface, Checked::Missing("no such interface".into())));
                continue;
            }
            let requested = a.requested;
            // The old link (defunct, or unpinned): its pin goes, quietly (`link` would take it
            // for an earlier run's).
            let _ = remove_stale_link(&a.pin);
            match self.link(&interface, requested) {
                Ok((mode, ifindex, _)) => {
                    let a = &mut self.attachments[i];
                    a.mode = mode;
                    a.ifindex = ifindex;
                    a.taken_over = false;
                    checked.push((interface, Checked::Reattached(mode)));
                }
                Err(e) => {
                    self.attachments[i].ifindex = 0;
                    checked.push((interface, Checked::Missing(e.to_string())));
                }
            }
        }
        checked
    }

    /// Puts this program back on this process's links: an upgrade that failed after the new
    /// process had replaced it.
    pub fn reclaim(&mut self) -> Result<(), KernelError> {
        let pins: Vec<PathBuf> = self.attachments.iter().map(|a| a.pin.clone()).collect();
        for pin in pins {
            self.replace_program(&pin)?;
        }
        Ok(())
    }

    /// Forgets the attachments without detaching: the upgraded gateway owns the links now.
    pub fn release(&mut self) {
        self.attachments.clear();
    }

    /// Makes the link pinned at `pin` run this process's program, atomically; the pin stays.
    fn replace_program(&mut self, pin: &Path) -> Result<(), KernelError> {
        let context = |what: &str| format!("{what} the XDP link pinned at {}", pin.display());
        let link = PinnedLink::from_pin(pin).map_err(|e| KernelError::Io {
            context: context("opening"),
            source: io::Error::other(e.to_string()),
        })?;
        let link = aya::programs::xdp::XdpLink::try_from(FdLink::from(link)).map_err(|e| {
            KernelError::Io {
                context: context("reading"),
                source: io::Error::other(e.to_string()),
            }
        })?;
        let program = self.program()?;
        let id = program
            .attach_to_link(link)
            .map_err(|source| KernelError::Program {
                context: context("replacing the program of"),
                source,
            })?;
        // The pin holds the link; this process keeps no descriptor of it (as after `attach`).
        drop(
            program
                .take_link(id)
                .map_err(|source| KernelError::Program {
                    context: context("taking"),
                    source,
                })?,
        );
        Ok(())
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
        // Not a clean stop (that detaches first): links taken over in an upgrade that did
        // not finish belong to the gateway that is serving on.
        self.attachments.retain(|a| !a.taken_over);
        if let Err(e) = self.detach_all() {
            tracing::error!(error = %e, "detaching the XDP program failed");
        }
    }
}

/// What [`Kernel::check_attachments`] found of one attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// In place, in this mode.
    Attached(AttachedMode),
    /// It was not in place and is now attached again, in this mode.
    Reattached(AttachedMode),
    /// Not in place, and could not be attached again (why).
    Missing(String),
}

/// The index of the interface the XDP link pinned at `pin` is attached to: 0 once it is not
/// (its device went, or it was detached by hand); `None` when no XDP link is pinned there.
/// aya 0.14 reads a link's information without its XDP part, so it is asked for here:
/// `BPF_OBJ_GET` on the pin, then `BPF_OBJ_GET_INFO_BY_FD`.
fn xdp_link_ifindex(pin: &Path) -> Option<u32> {
    use std::os::{
        fd::{FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    /// `struct bpf_link_info`: `type`, `id`, `prog_id`, then a union (8-aligned, at byte 16)
    /// whose `xdp` member is the interface's index; zeroed past what the kernel writes.
    #[repr(C, align(8))]
    struct LinkInfo([u8; 64]);

    /// bpf(2) with command `cmd` and its attribute `attr` (given whole, at its size).
    ///
    /// # Safety
    /// Every pointer `attr` holds must be valid for what `cmd` does with it.
    unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
        // SAFETY: `attr` is valid for its size; the caller vouches for what it points to.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) }
    }

    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).ok()?;
    let mut get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: the path is NUL-terminated and outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut get) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor the kernel just returned, owned from here.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).ok()?) };
    let mut info = LinkInfo([0; 64]);
    let mut attr = InfoByFd {
        bpf_fd: u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).ok()?,
        info_len: size_of::<LinkInfo>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which lives across the
    // call.
    let r = unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) };
    let word = |at: usize| {
        u32::from_ne_bytes([info.0[at], info.0[at + 1], info.0[at + 2], info.0[at + 3]])
    };
    (r == 0 && word(0) == BPF_LINK_TYPE_XDP).then(|| word(16))
}

/// Unpins and closes a pinned link, which detaches its program. Returns whether one was there.
pub fn remove_stale_link(pin: &Path) -> Result<bool, KernelError> {
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
