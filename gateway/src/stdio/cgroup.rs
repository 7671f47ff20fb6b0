//! A cgroup per stdio child: what the child starts, threads included, counts against its own
//! `max_processes` (`pids.max`), not against one count per user that every child of every
//! upstream shares (`RLIMIT_NPROC`: a tenant whose tool starts threads up to it kept every
//! other child from starting); and the end of a child ends every process in its cgroup, one
//! that left the child's process group and session (`setsid`) too, which before outlived the
//! child and the gateway.
//!
//! Where, found once per process ([`Tree`]); each child's is
//! `<pid namespace>-<gateway pid>-<gateway start>-<n>`:
//! - cgroup v2: in `<top>/mcp-gateway-stdio/`. `<top>` is the gateway's own cgroup, or its
//!   parent when that is named `mcp-gateway` (where a gateway moved itself, or systemd's
//!   `DelegateSubgroup=mcp-gateway` put it; the packaged unit does not set that, which systemd
//!   252 does not know). With the `pids` controller there, cgroup v2 allows no process in
//!   `<top>` itself once its children have one, so a gateway still in `<top>` first moves
//!   itself into `<top>/mcp-gateway`. The gateway must be able to write `<top>`: root, or
//!   systemd's `Delegate=`. A stop writes `cgroup.kill`.
//! - A hybrid host (the controllers on cgroup v1, the v2 tree without them): the v2 cgroup
//!   above for the stop, and one in the v1 `pids` hierarchy's `<the gateway's>/
//!   mcp-gateway-stdio/` for the limit. A v1-only host: that alone, and a stop kills what its
//!   `cgroup.procs` lists until nothing is left.
//! - Neither writable: no cgroup (logged once); `max_processes` is `RLIMIT_NPROC` and a stop
//!   reaches the child's process group only, as before.
//!
//! The child joins its cgroups between fork and exec, before it runs anything of its own, by
//! writing to `cgroup.procs` files the gateway opened (the kernel checks the opener's rights,
//! so the child, by then of its unprivileged user, may). A cgroup is removed when its child
//! ends; those of a gateway that died (no process of its pid and start in its pid namespace)
//! are ended and removed by the next gateway's start.

use std::{
    fs,
    io::Write as _,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// The folder of the children's cgroups in each hierarchy.
const TREE: &str = "mcp-gateway-stdio";
/// The gateway's own cgroup under `<top>` on cgroup v2 (and systemd's `DelegateSubgroup=`).
const LEAF: &str = "mcp-gateway";

/// One hierarchy's folder of the children's cgroups.
#[derive(Debug, Clone, PartialEq)]
struct Tree {
    dir: PathBuf,
    /// cgroup v2: `cgroup.kill` ends the whole cgroup.
    v2: bool,
    /// The `pids` controller is there: `pids.max` holds.
    pids: bool,
    /// The `memory` controller is there (cgroup v2): `memory.max` holds.
    memory: bool,
}

/// Where the children's cgroups go, found at the first child of this process.
fn trees() -> &'static [Tree] {
    static TREES: OnceLock<Vec<Tree>> = OnceLock::new();
    TREES.get_or_init(|| {
        let (trees, notes) = find();
        for t in &trees {
            sweep(t);
        }
        if trees.iter().any(|t| t.pids) {
            tracing::info!(
                cgroups = ?trees.iter().map(|t| t.dir.display().to_string()).collect::<Vec<_>>(),
                memory = trees.iter().any(|t| t.memory),
                "each stdio child gets a cgroup of its own: max_processes is its pids.max, \
                 max_memory_mb its memory.max where the memory controller is there, and its end \
                 ends every process in it"
            );
        } else {
            tracing::warn!(
                cgroups = ?trees.iter().map(|t| t.dir.display().to_string()).collect::<Vec<_>>(),
                why = %notes.join("; "),
                "stdio children get no pids limit of their own: max_processes is RLIMIT_NPROC, \
                 counted per user across every child{}",
                if trees.is_empty() {
                    ", and a process a child starts in a session of its own outlives it"
                } else {
                    ""
                }
            );
        }
        trees
    })
}

/// The hierarchies this process can make its children's cgroups in, and why others could not
/// be used.
fn find() -> (Vec<Tree>, Vec<String>) {
    let (v2, v1_pids, v1_memory) = match procfs::process::Process::myself()
        .map_err(|e| e.to_string())
        .and_then(|me| folders_of(&me))
    {
        Ok(found) => found,
        Err(e) => return (Vec::new(), vec![e]),
    };
    let mut notes = Vec::new();
    let mut trees = Vec::new();
    match v2.map(|dir| v2_tree(&dir).and_then(usable)) {
        Some(Ok(t)) => trees.push(t),
        Some(Err(e)) => notes.push(format!("cgroup v2: {e}")),
        None => notes.push("no cgroup v2 hierarchy".into()),
    }
    if !trees.iter().any(|t| t.pids) {
        match v1_pids.map(|dir| v1_tree(&dir, "pids").and_then(usable)) {
            Some(Ok(t)) => trees.push(t),
            Some(Err(e)) => notes.push(format!("cgroup v1 pids: {e}")),
            None => notes.push("no pids controller on cgroup v1".into()),
        }
    }
    if !trees.iter().any(|t| t.memory) {
        match v1_memory.map(|dir| v1_tree(&dir, "memory").and_then(usable)) {
            Some(Ok(t)) => trees.push(t),
            Some(Err(e)) => notes.push(format!("cgroup v1 memory: {e}")),
            None => notes.push("no memory controller on cgroup v1".into()),
        }
    }
    (trees, notes)
}

/// The folders of `process`'s cgroups: its cgroup v2 one and its cgroup v1 `pids` and
/// `memory` ones, each where that hierarchy is mounted (in this process's view).
#[expect(
    clippy::type_complexity,
    reason = "three folders, named where they are taken"
)]
fn folders_of(
    process: &procfs::process::Process,
) -> Result<(Option<PathBuf>, Option<PathBuf>, Option<PathBuf>), String> {
    let mounts = procfs::process::Process::myself()
        .and_then(|me| me.mountinfo())
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let groups = process
        .cgroups()
        .map_err(|e| format!("/proc/{}/cgroup: {e}", process.pid))?;
    // `None`: the v2 hierarchy; else the v1 one of that controller.
    let folder = |v1: Option<&str>| {
        let group = groups.0.iter().find(|g| match v1 {
            None => g.hierarchy == 0 && g.controllers.is_empty(),
            Some(c) => g.hierarchy != 0 && g.controllers.iter().any(|x| x == c),
        })?;
        let mount = mounts.0.iter().find(|m| match v1 {
            None => m.fs_type == "cgroup2",
            Some(c) => m.fs_type == "cgroup" && m.super_options.contains_key(c),
        })?;
        // The cgroup's path is from the hierarchy's root; the mount may show a part of it.
        let rel = Path::new(&group.pathname)
            .strip_prefix(&mount.root)
            .ok()?
            .to_owned();
        Some(mount.mount_point.join(rel))
    };
    Ok((folder(None), folder(Some("pids")), folder(Some("memory"))))
}

/// The folders of the children's cgroups `pid` is in.
#[cfg(test)]
pub(super) fn childs_folders(pid: i32) -> Vec<PathBuf> {
    let Ok((v2, v1_pids, v1_memory)) = procfs::process::Process::new(pid)
        .map_err(|e| e.to_string())
        .and_then(|p| folders_of(&p))
    else {
        return Vec::new();
    };
    [v2, v1_pids, v1_memory]
        .into_iter()
        .flatten()
        .filter(|d| {
            d.parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n == TREE)
        })
        .collect()
}

/// The v2 folder of children under `own` (the gateway's cgroup), with `pids` enabled for
/// them where the hierarchy has it.
fn v2_tree(own: &Path) -> std::io::Result<Tree> {
    let in_leaf = own.file_name().is_some_and(|n| n == LEAF);
    let top = if in_leaf {
        own.parent().unwrap_or(own).to_owned()
    } else {
        own.to_owned()
    };
    let offered = fs::read_to_string(top.join("cgroup.controllers")).unwrap_or_default();
    let mut pids = offered.split_whitespace().any(|c| c == "pids");
    let mut memory = offered.split_whitespace().any(|c| c == "memory");
    if (pids || memory) && !in_leaf && top.join("cgroup.type").exists() {
        // Not the root (which has no `cgroup.type`): the gateway leaves `<top>` for its leaf,
        // so that `<top>` may pass its controllers on.
        let leaf = top.join(LEAF);
        mkdir(&leaf)?;
        fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())?;
    }
    let dir = top.join(TREE);
    let pass_on = |on: &mut bool, controller: &str, made: bool| {
        let at = if made { &dir } else { &top };
        if *on && fs::write(at.join("cgroup.subtree_control"), format!("+{controller}")).is_err() {
            *on = false;
        }
    };
    pass_on(&mut pids, "pids", false);
    pass_on(&mut memory, "memory", false);
    mkdir(&dir)?;
    pass_on(&mut pids, "pids", true);
    pass_on(&mut memory, "memory", true);
    if pids {
        cap(&dir);
    }
    Ok(Tree {
        dir,
        v2: true,
        pids,
        memory,
    })
}

/// `tree` if a child's cgroup can be made in it: a folder another user made (a gateway run
/// as root before) is there but not this gateway's to write.
fn usable(tree: Tree) -> std::io::Result<Tree> {
    let probe = tree.dir.join(format!("{}probe", prefix()));
    fs::create_dir(&probe)?;
    fs::remove_dir(&probe)?;
    Ok(tree)
}

/// The v1 folder of children under `own`, in the hierarchy of `controller` (`pids` or
/// `memory`).
fn v1_tree(own: &Path, controller: &str) -> std::io::Result<Tree> {
    let dir = own.join(TREE);
    mkdir(&dir)?;
    let pids = controller == "pids";
    if pids {
        cap(&dir);
    }
    Ok(Tree {
        dir,
        v2: false,
        pids,
        memory: !pids,
    })
}

/// Every child together may have at most half of the host's processes and threads: a per-caller
/// upstream's children may each have `max_processes` (16 × 256 by default, and up to 1,024
/// children), which could otherwise take every pid the gateway and the host need.
fn cap(tree: &Path) {
    let read = |p: &str| {
        fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let Some(host) = [
        read("/proc/sys/kernel/pid_max"),
        read("/proc/sys/kernel/threads-max"),
    ]
    .into_iter()
    .flatten()
    .min() else {
        return;
    };
    if let Err(e) = fs::write(tree.join("pids.max"), (host / 2).to_string()) {
        tracing::warn!(cgroup = %tree.display(), error = %e, "no limit on every stdio child's processes together");
    }
}

fn mkdir(dir: &Path) -> std::io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// The prefix of this process's children's cgroups: `<pid namespace>-<pid>-<start>-`, `<start>`
/// the process's start in clock ticks since boot. A pid means something only in its namespace
/// (a gateway in another one, a container on a host whose cgroups it shares, sees none of this
/// one's processes and must leave its cgroups be), and only while the process that had it
/// runs: a process with that pid and another start (a crashed gateway's pid taken since, this
/// one included, or a thread's id) is not it. No wall clock is involved, so a clock stepped
/// meanwhile cannot make a live gateway's cgroups look stale.
fn prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let pid = std::process::id();
        format!(
            "{}-{pid}-{}-",
            pid_namespace(),
            start_of(pid).unwrap_or_default()
        )
    })
}

/// When the process (or thread) `pid` started, in clock ticks since boot.
fn start_of(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .ok()
        .map(|s| s.starttime)
}

/// This process's pid namespace (its inode number; 0 if unreadable).
fn pid_namespace() -> u64 {
    fs::metadata("/proc/self/ns/pid").map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Ends and removes the cgroups a gateway of this pid namespace that is gone left.
fn sweep(tree: &Tree) {
    let Ok(entries) = fs::read_dir(&tree.dir) else {
        return;
    };
    let ns = pid_namespace();
    for e in entries.flatten() {
        let name = e.file_name();
        let mut parts = name.to_str().unwrap_or_default().split('-');
        let (Some(Ok(of)), Some(Ok(pid)), Some(Ok(start))) = (
            parts.next().map(str::parse::<u64>),
            parts.next().map(str::parse::<u32>),
            parts.next().map(str::parse::<u64>),
        ) else {
            continue;
        };
        if of != ns || start_of(pid) == Some(start) {
            continue;
        }
        let dir = e.path();
        tracing::info!(cgroup = %dir.display(), "ending the cgroup of a stdio child of a gateway that is gone");
        end_all(vec![(dir, tree.v2)], Duration::from_secs(2));
    }
}

/// Finds where children's cgroups go (once per process) and ends what a gateway that is gone
/// left there.
pub(super) fn prepare() {
    trees();
}

/// The number of this process's next child cgroup.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// One child's cgroups, one per hierarchy in use.
#[derive(Debug)]
pub(super) struct Cgroup {
    dirs: Vec<(PathBuf, bool)>,
    /// Their `cgroup.procs`, open until the child has joined them.
    join: Vec<OwnedFd>,
    limits_processes: bool,
}

impl Cgroup {
    /// A new cgroup for a child that may have `max_processes` processes and threads and
    /// `max_memory` bytes of memory (0: no limit), or `None` where none can be made (logged).
    /// The memory is its cgroup's `memory.max` where the `memory` controller is there (cgroup
    /// v2; the packaged unit delegates it): what `RLIMIT_DATA` does not count does count there
    /// (shared mappings, `memfd`, the files it writes to a tmpfs such as its home under
    /// `/run`: a review took 2 GiB of shared memory past a bound of 256 MiB), and no swap.
    pub(super) fn make(upstream: &str, max_processes: u64, max_memory: u64) -> Option<Self> {
        let trees = trees();
        if trees.is_empty() {
            return None;
        }
        let mut made = Self {
            dirs: Vec::new(),
            join: Vec::new(),
            limits_processes: false,
        };
        for t in trees {
            // A name taken (a gateway gone with this pid left it and it could not be ended):
            // the next one.
            let mut tries = 0;
            let step = |dir: &Path| -> std::io::Result<OwnedFd> {
                fs::create_dir(dir)?;
                if t.pids && max_processes > 0 {
                    fs::write(dir.join("pids.max"), max_processes.to_string())?;
                }
                if t.memory && max_memory > 0 {
                    let (bound, with_swap) = if t.v2 {
                        ("memory.max", "memory.swap.max")
                    } else {
                        ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
                    };
                    fs::write(dir.join(bound), max_memory.to_string())?;
                    // Absent where the kernel has no swap accounting.
                    let swap = if t.v2 { 0 } else { max_memory };
                    let _ = fs::write(dir.join(with_swap), swap.to_string());
                }
                let procs = fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))?;
                Ok(procs.into())
            };
            loop {
                let dir = t.dir.join(format!(
                    "{}{}",
                    prefix(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                match step(&dir) {
                    Ok(fd) => {
                        made.dirs.push((dir, t.v2));
                        made.join.push(fd);
                        made.limits_processes |= t.pids && max_processes > 0;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 16 => {
                        tries += 1;
                    }
                    Err(e) => {
                        if e.kind() != std::io::ErrorKind::AlreadyExists {
                            let _ = fs::remove_dir(&dir);
                        }
                        tracing::warn!(upstream, cgroup = %dir.display(), error = %e, "no cgroup for a stdio child");
                        return None;
                    }
                }
            }
        }
        Some(made)
    }

    /// The descriptors the child writes `0` (itself) to between fork and exec.
    pub(super) fn join_fds(&self) -> Vec<i32> {
        self.join.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Whether `pids.max` bounds the child (so no `RLIMIT_NPROC` is needed).
    /// The processes in it now (of every hierarchy it is in).
    pub(super) fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self.dirs.iter().flat_map(|(dir, _)| procs(dir)).collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    pub(super) fn limits_processes(&self) -> bool {
        self.limits_processes
    }

    /// The child has started: the descriptors are closed.
    pub(super) fn joined(&mut self) {
        self.join.clear();
    }

    /// Ends every process in it and removes it, waiting up to `within` for them to go.
    pub(super) async fn end(mut self, within: Duration) {
        let dirs = std::mem::take(&mut self.dirs);
        // Off the control thread: the kill loop over cgroup v1's list and the wait for the
        // processes to go both sleep.
        let _ = tokio::task::spawn_blocking(move || end_all(dirs, within)).await;
    }
}

impl Drop for Cgroup {
    /// A child dropped without [`Cgroup::end`] (a supervisor that ended abruptly): its
    /// processes are killed and the cgroups removed from a thread of their own.
    fn drop(&mut self) {
        if self.dirs.is_empty() {
            return;
        }
        let dirs = std::mem::take(&mut self.dirs);
        let _ = std::thread::Builder::new()
            .name("cgroup-end".into())
            .spawn(move || end_all(dirs, Duration::from_secs(2)));
    }
}

/// Ends every process of one child's cgroups (`cgroup.kill` on v2 ends them all: they are the
/// same processes in each hierarchy; else [`kill_listed`] on each) and removes the cgroups,
/// trying for up to `within`; one still there then is left for the next start (logged).
fn end_all(dirs: Vec<(PathBuf, bool)>, within: Duration) {
    if !dirs.iter().any(|(d, v2)| *v2 && kill_v2(d)) {
        for (d, _) in &dirs {
            kill_listed(d);
        }
    }
    let deadline = std::time::Instant::now() + within;
    let mut left: Vec<PathBuf> = dirs.into_iter().map(|(d, _)| d).collect();
    loop {
        left.retain(|d| !removed(d));
        if left.is_empty() || std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for d in &left {
        tracing::warn!(cgroup = %d.display(), "a stdio child's cgroup is not empty after its end; left for the next start");
    }
}

/// `cgroup.kill` (Linux 5.14): whether it was written.
fn kill_v2(dir: &Path) -> bool {
    fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut f| f.write_all(b"1"))
        .is_ok()
}

/// The pids `cgroup.procs` lists.
fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `SIGKILL` to every process `cgroup.procs` lists, again until it is empty (a process forked
/// meanwhile is in the next list): where there is no `cgroup.kill`.
fn kill_listed(dir: &Path) {
    for _ in 0..100 {
        let pids = procs(dir);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            if pid > 1 {
                // SAFETY: kill(2) of a process in the child's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether the cgroup is gone (removed now or before).
fn removed(dir: &Path) -> bool {
    match fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Whether the process `pid` is in a stdio child's cgroup (of any gateway), or cannot be told.
pub fn in_a_childs_cgroup(pid: u32) -> bool {
    let tree = format!("/{TREE}/");
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_or(true, |groups| groups.lines().any(|l| l.contains(&tree)))
}

/// The cgroup hierarchy `path` would let a child write (it is one, or inside or above one):
/// there a child could leave its cgroup, raise its limit, or end the gateway's processes.
pub fn cgroups_under(path: &Path) -> Option<PathBuf> {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mut mounts = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(m) = procfs::process::Process::myself().and_then(|me| me.mountinfo()) {
        mounts.extend(
            m.0.into_iter()
                .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
                .map(|m| m.mount_point),
        );
    }
    mounts
        .into_iter()
        .find(|m| m.starts_with(&path) || path.starts_with(m))
}

#[cfg(test)]
#[path = "cgroup_tests.rs"]
mod tests;
