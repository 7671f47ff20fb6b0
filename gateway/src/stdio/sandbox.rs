//! What a child process may do: set up between fork and exec, so it holds from the child's
//! first instruction.
//!
//! - The environment is cleared: only the configured variables pass, plus `PATH`, `HOME`,
//!   `TMPDIR` and `LANG` the gateway sets; the gateway's own secrets (token variables, keys)
//!   never reach a child.
//! - `no_new_privs`: no setuid binary or file capability gives the child more than it has.
//! - An unprivileged user when the gateway runs as root (`nobody` unless configured).
//! - rlimits: address space, open files, processes.
//! - Landlock, where the kernel has it: the filesystem is limited to the configured paths
//!   (read-only ones and writable ones) plus what a program needs to start.
//! - Its own process group and session, and `SIGKILL` when the gateway's thread that started
//!   it dies, so no child outlives the gateway; the group is what a stop signals.
//!
//! Only async-signal-safe calls happen after the fork: everything that allocates (the Landlock
//! ruleset, the user lookup) is prepared before it.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
};

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible as _, PathBeneath, PathFd, Ruleset,
    RulesetAttr as _, RulesetCreated, RulesetCreatedAttr as _,
};

/// The sandbox of one upstream's children, from configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxSpec {
    /// Run as this user and group (numeric), else `nobody` when the gateway is root.
    pub user: Option<(u32, u32)>,
    /// RLIMIT_AS in bytes (0: unlimited).
    pub max_memory_bytes: u64,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
    /// RLIMIT_NPROC (counted per user).
    pub max_processes: u64,
    /// Landlock: paths the child may read (and execute) and paths it may also write. `None`:
    /// the whole filesystem may be read, and only the child's own home folder written.
    pub landlock: Option<FsAccess>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct FsAccess {
    pub read: Vec<PathBuf>,
    pub write: Vec<PathBuf>,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        Self {
            user: None,
            max_memory_bytes: 4 << 30,
            max_open_files: 1024,
            max_processes: 256,
            landlock: None,
        }
    }
}

/// What every program needs to start (the loader, libraries, locale, certificates, devices).
const SYSTEM_READ: &[&str] = &[
    "/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/dev", "/sys",
];

/// The user `nobody` (65534 on Debian and most distributions).
const NOBODY: (u32, u32) = (65534, 65534);

/// Where the children's home folders are made: `mcp-gateway-stdio-<pid>-<n>-<upstream>`.
const HOME_PREFIX: &str = "mcp-gateway-stdio-";

/// A child's home folder (its `HOME` and `TMPDIR`, the one place it may write when Landlock
/// confines it): made new for each supervisor, never one that was there before, and removed
/// with everything in it when dropped (the supervisor ends: its upstream was removed, its
/// caller's child retired, or the gateway stopped). Each child of a per-caller upstream has
/// its own, so one caller's child never sees another's files.
#[derive(Debug)]
pub struct Home(PathBuf);

impl Home {
    /// A new folder for a child of `upstream`, only the gateway's user's (0700) until
    /// [`apply`] hands it to the child's user. The first one of a process first removes what
    /// earlier gateways left behind (killed before they could).
    pub fn make(upstream: &str) -> std::io::Result<Self> {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir();
        SWEPT.call_once(|| sweep(&dir));
        // Upstream names are config names (letters, digits, `-`, `_`); nothing else reaches
        // the path.
        let upstream: String = upstream
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        for _ in 0..64 {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = dir.join(format!(
                "{HOME_PREFIX}{}-{n}-{upstream}",
                std::process::id()
            ));
            match std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                .create(&path)
            {
                Ok(()) => return Ok(Self(path)),
                // Someone made it first (or a gateway killed with this pid left it): another.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("no new home folder could be made in {}", dir.display()),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // Not following links: what the child linked to from its home stays.
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(home = %self.0.display(), error = %e, "a stdio child's home folder was not removed");
        }
    }
}

/// Removes the home folders of gateways that are gone (their pid is not running, or is this
/// process, which has made none yet): folders of the gateway's user or of `nobody` only, not
/// following links.
pub(super) fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    // SAFETY: geteuid(2) cannot fail.
    let euid = unsafe { libc::geteuid() };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(HOME_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        let owner = std::os::unix::fs::MetadataExt::uid(&meta);
        if !meta.file_type().is_dir() || (owner != euid && owner != NOBODY.0) {
            continue;
        }
        let gone = pid == me
            || i32::try_from(pid).is_ok_and(|p| {
                // SAFETY: kill(2) with signal 0 only checks that the process exists.
                let r = unsafe { libc::kill(p, 0) };
                r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
            });
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether Landlock restricted the child, as far as the parent can tell before the fork.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confinement {
    Landlock,
    /// The kernel lacks Landlock: the rest of the sandbox still holds.
    NoLandlock,
}

/// Applies `spec` to `cmd`, whose child will live in `home` (a [`Home`], handed to the child's
/// user). Returns whether Landlock will confine it.
pub fn apply(
    cmd: &mut tokio::process::Command,
    spec: &SandboxSpec,
    home: &Path,
) -> std::io::Result<Confinement> {
    // SAFETY: geteuid(2) cannot fail.
    let euid = unsafe { libc::geteuid() };
    // The home is in the shared temporary folder: one that someone else made first (a symlink
    // there would have the chown below hand any file to the child's user) is refused.
    let made = std::fs::symlink_metadata(home)?;
    let (uid_now, gid_now) = (
        std::os::unix::fs::MetadataExt::uid(&made),
        std::os::unix::fs::MetadataExt::gid(&made),
    );
    let user = spec.user.or((euid == 0).then_some(NOBODY));
    let ours = uid_now == euid || user.is_some_and(|(u, g)| (u, g) == (uid_now, gid_now));
    if !made.file_type().is_dir() || !ours {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} exists and is not the gateway's own folder",
                home.display()
            ),
        ));
    }
    if let Some((uid, gid)) = user {
        std::os::unix::fs::lchown(home, Some(uid), Some(gid))?;
        cmd.uid(uid).gid(gid);
    }
    cmd.env("HOME", home).env("TMPDIR", home);

    let mut ruleset = landlock_ruleset(spec, home)?;
    let confinement = if ruleset.is_some() {
        Confinement::Landlock
    } else {
        Confinement::NoLandlock
    };
    let limits = [
        (libc::RLIMIT_AS, spec.max_memory_bytes),
        (libc::RLIMIT_NOFILE, spec.max_open_files),
        (libc::RLIMIT_NPROC, spec.max_processes),
    ];
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe system calls (setsid, prctl, setrlimit, landlock_restrict_self); the
    // ruleset was built before the fork.
    unsafe {
        cmd.as_std_mut().pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (resource, value) in limits {
                if value > 0 {
                    let l = libc::rlimit {
                        rlim_cur: value,
                        rlim_max: value,
                    };
                    if libc::setrlimit(resource, &l) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(r) = ruleset.take() {
                r.restrict_self()
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::PermissionDenied))?;
            }
            Ok(())
        });
    }
    Ok(confinement)
}

/// The Landlock ruleset for `spec`, or `None` where the kernel has no Landlock.
fn landlock_ruleset(spec: &SandboxSpec, home: &Path) -> std::io::Result<Option<RulesetCreated>> {
    let abi = ABI::V3;
    let read = AccessFs::from_read(abi);
    let all = AccessFs::from_all(abi);
    let (read_paths, write_paths): (Vec<PathBuf>, Vec<PathBuf>) = match &spec.landlock {
        None => (vec![PathBuf::from("/")], vec![home.to_path_buf()]),
        Some(fs) => {
            let mut r: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
            r.extend(fs.read.iter().cloned());
            let mut w = fs.write.clone();
            w.push(home.to_path_buf());
            (r, w)
        }
    };
    let other = |e: landlock::RulesetError| std::io::Error::other(e.to_string());
    let created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(other)?
        .create()
        .map_err(other)?;
    let mut created = created;
    for (paths, access) in [(&read_paths, read), (&write_paths, all)] {
        for p in paths {
            // A path that does not exist on this host is skipped (the system list is generic).
            let Ok(fd) = PathFd::new(p) else { continue };
            created = created
                .add_rule(PathBeneath::new(fd, access))
                .map_err(other)?;
        }
    }
    if landlock_available() {
        Ok(Some(created))
    } else {
        Ok(None)
    }
}

/// Whether this kernel enforces Landlock (its ABI version is known).
pub fn landlock_available() -> bool {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only reports
    // the ABI version.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    };
    v > 0
}
