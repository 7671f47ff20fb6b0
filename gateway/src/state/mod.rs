//! The state store: policy state that outlives the process, in one transactional file
//! (`state.redb`, [redb]) under `[state] path`. It keeps the pins and approvals, the spend of
//! budgets in windows not yet ended, the refusal counts that feed auto-ban, and a mirror of the
//! bans (the kernel's pinned ban map stays the record for packets; the mirror restores it after
//! a reboot and is the only record when the kernel program is off).
//!
//! The request path never reads or writes it: workers count in their lock-free cells
//! ([`crate::policy::limits::State`], [`crate::policy::pins::Pins`]); the control thread loads
//! the store before the workers start and writes what changed every flush interval and at
//! shutdown, in one transaction (all or nothing), so a crash loses at most the changes of one
//! interval. A file that cannot be read is an error that names it and stops the start; it is
//! never replaced silently (`gateway state check|export|reset`).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};

use crate::policy::{
    limits::{Counted, State, WindowCount},
    pins::{Pin, Pins},
};

/// The layout this gateway writes; a store of a higher one is refused. 2: the agent budget of
/// a caller with no agent is counted under the scope `address` (schema 1 kept it under `agent`,
/// named by the address, where a named agent of that name now counts; read as `address`).
pub const SCHEMA: u64 = 2;
/// The store's file inside `[state] path`.
pub const FILE: &str = "state.redb";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `<upstream>/<tool>` → the pin as JSON.
const PINS: TableDefinition<&str, &[u8]> = TableDefinition::new("pins");
/// A [`Counted`] as JSON → its [`WindowCount`] as JSON.
const WINDOWS: TableDefinition<&str, &[u8]> = TableDefinition::new("windows");
/// An address → when its ban ends, in ms since the Unix epoch.
const BANS: TableDefinition<&str, u64> = TableDefinition::new("bans");
/// Which of [`BANS`] are auto-bans the gateway made (an IPv6 client's /64, or a prefix one was
/// widened to), keyed the same, with the end they were made with: only they count towards a
/// widening and are lifted by one. A store written before this table has none, and an earlier
/// gateway ignores it (its bans are then all taken as the operator's, as they were).
const AUTO_BANS: TableDefinition<&str, u64> = TableDefinition::new("auto_bans");

/// What to do about a store that cannot be used (said in every such error).
pub const RECOVERY: &str = "the gateway does not start on state it cannot read; see what is wrong with `gateway state check --config <file>`, save what can be read with `gateway state export --config <file>`, then `gateway state reset --config <file>` moves the file aside and the next start begins with empty state (budgets spent, pins and approvals are forgotten)";

/// Why the store cannot be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path} cannot be read: {problem}; {RECOVERY}")]
    Unreadable { path: PathBuf, problem: String },
    #[error(
        "state store {path} was written by a newer gateway (schema {found}; this one reads up to {SCHEMA}): run that version, or {RECOVERY}"
    )]
    Newer { path: PathBuf, found: u64 },
    #[error(
        "state store {path} is open in another process (another gateway with the same instance name or `[state] path`?)"
    )]
    InUse { path: PathBuf },
    #[error("state store {path}: writing failed: {problem}")]
    Write { path: PathBuf, problem: String },
}

/// Counters for `/metrics` (written by the control thread).
#[derive(Debug, Default)]
pub struct Stats {
    pub enabled: std::sync::atomic::AtomicBool,
    pub flushes: AtomicU64,
    pub failures: AtomicU64,
    /// Sum and last of the flushes' durations, in µs.
    pub flush_us_total: AtomicU64,
    pub last_flush_us: AtomicU64,
    pub bytes: AtomicU64,
    /// Unix seconds of the last flush that wrote (or found nothing to write); 0: none yet.
    pub last_good_unix_s: AtomicU64,
    /// Whether the last flush failed (what changed since `last_good_unix_s` is in memory only).
    pub failing: std::sync::atomic::AtomicBool,
}

/// What a load put back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub pins: usize,
    /// Counts of windows not yet ended (ended ones are dropped at the next flush).
    pub windows: usize,
    /// Bans not yet ended (addresses as one-address prefixes), with the time each has left.
    pub bans: Vec<(IpNet, Duration)>,
    /// Those of `bans` that were auto-bans, with the time they were made to last: a ban of
    /// the same net in force now that ends within a second or two of it is that auto-ban
    /// (one made again since, by the operator's `gateway kernel ban` while the gateway was
    /// down, ends elsewhere).
    pub auto_bans: Vec<(IpNet, Duration)>,
}

/// A ban in force as the store mirrors it: its net, the time it has left, and whether it is
/// an auto-ban.
pub type MirroredBan = (IpNet, Duration, bool);

/// What a flush wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    pub written: usize,
    pub deleted: usize,
}

/// The open store and what it holds now (so that a flush writes only what changed).
pub struct Store {
    db: Db,
    path: PathBuf,
    pins: HashMap<String, Arc<Pin>>,
    windows: HashMap<String, WindowCount>,
    bans: BTreeMap<String, u64>,
    auto_bans: BTreeMap<String, u64>,
}

/// The key of a window's count: what it counts, as JSON, and the window's length. Counts of
/// one subject in windows of two lengths (a reload changed `window_s`; the other's window has
/// not ended) are two records: keyed by what they count alone, one was written over the
/// other, and a restart lost the tenant's spend (an operator's review).
fn window_key(what: &Counted, len_s: u64) -> serde_json::Result<String> {
    let mut key = serde_json::to_string(what)?;
    key.push('#');
    key.push_str(itoa::Buffer::new().format(len_s));
    Ok(key)
}

/// The JSON of what a window's key counts: the key without its length (a store written
/// before has none; the length is in the count too).
fn window_key_counted(key: &str) -> &str {
    match key.rsplit_once('#') {
        Some((json, len)) if json.ends_with('}') && len.bytes().all(|b| b.is_ascii_digit()) => json,
        _ => key,
    }
}

/// What a panic of redb's said, as the problem with the file.
fn damaged(panic: &(dyn std::any::Any + Send)) -> String {
    let why = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("the storage library gave up on it");
    format!("damaged ({why})")
}

/// The database, closed without unwinding: redb panics in its drop on some damage, and a
/// start whose load failed ended in that panic instead of the error naming the file.
struct Db(Option<Database>);

impl Db {
    fn close(&mut self) {
        if let Some(db) = self.0.take()
            && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(db))).is_err()
        {
            tracing::warn!("the state store's file was closed with an error (damaged?)");
        }
    }
}

impl std::ops::Deref for Db {
    type Target = Database;
    fn deref(&self) -> &Database {
        match &self.0 {
            Some(db) => db,
            // Closed only after a failed write, and opened again before the next
            // (`Store::flush`), or by the drop.
            None => unreachable!("the state store is used after it was closed"),
        }
    }
}

impl std::ops::DerefMut for Db {
    fn deref_mut(&mut self) -> &mut Database {
        match &mut self.0 {
            Some(db) => db,
            None => unreachable!("the state store is used after it was closed"),
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        self.close();
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

/// Opens (or makes) the store's file. One that needs repair (the process before did not close
/// it: a crash, `kill -9`, a power cut; or damage) is copied aside first, to
/// `<file>.<unix s>.before-repair`, and then repaired: redb repairs in place, and what a repair
/// drops of a damaged file was gone with no copy to read it back from (a copy is a store:
/// renamed `state.redb` in a folder of its own, `gateway state export` reads it). Each copy is
/// a new file, made only where none is (never through a link someone put there: a review's
/// link at the copy's name had a file elsewhere overwritten), a few are kept (one name
/// replaced at each crash lost the copy from before the first repair to the next), and
/// none is made where the disk has no room for it (a copy that filled the disk left the
/// store's own writes failing). Kept: the oldest copy, the two newest and the one just made
/// ([`keep_copies`]). A copy that cannot be made is logged and the repair goes on:
/// the gateway starts with what the repair keeps.
fn open_copying_before_repair(path: &Path) -> Result<Database, redb::DatabaseError> {
    if !path.exists() {
        return Database::builder().create(path);
    }
    let mut first = Database::builder();
    first.set_repair_callback(redb::RepairSession::abort);
    match first.create(path) {
        Err(redb::DatabaseError::RepairAborted) => {}
        other => return other,
    }
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".{}.before-repair", unix_ms() / 1000));
    let aside = PathBuf::from(aside);
    let copied = copy_aside(path, &aside);
    match &copied {
        Ok(()) => tracing::warn!(
            file = %path.display(),
            copy = %aside.display(),
            "the state store was not closed cleanly (a crash, or damage): copied aside before it is repaired"
        ),
        Err(e) => tracing::error!(
            file = %path.display(),
            copy = %aside.display(),
            error = %e,
            "the state store needs repair and could not be copied aside first: repaired in place"
        ),
    }
    keep_copies(path, copied.is_ok().then_some(aside.as_path()));
    // The file was open (and locked) just now by the aborted attempt: a process forked by
    // another thread meanwhile holds that lock until it runs its program (the unit tests saw
    // "in use" so). A little while for it.
    for _ in 0..50 {
        match Database::builder().create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
    Database::builder().create(path)
}

/// Copies `from` to `to`, a new file (`O_EXCL`, no link followed), if the disk has room for it
/// and as much again; a copy that fails midway is removed.
fn copy_aside(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let len = std::fs::metadata(from)?.len();
    let dir = to.parent().unwrap_or(Path::new("."));
    let free = free_bytes(dir)?;
    if free < len.saturating_mul(2) {
        return Err(std::io::Error::other(format!(
            "{free} bytes free, the store is {len}"
        )));
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)?;
    let copied = std::fs::File::open(from)
        .and_then(|mut f| std::io::copy(&mut f, &mut out))
        .and_then(|_| out.sync_all());
    if copied.is_err() {
        let _ = std::fs::remove_file(to);
    }
    copied
}

/// Bytes an unprivileged writer may still use on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a statvfs is plain data, valid zeroed.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a statvfs for the call to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Removes the copies made before a repair of `path` but the oldest (what the store held
/// before the first of a run of crashes), the two newest and `made` (the one just made, kept
/// whatever the clock said: a host back from a power cut with its clock behind ranked it
/// oldest, and it was removed as it was made: a review).
fn keep_copies(path: &Path, made: Option<&Path>) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut copies: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name();
            let stamp = n
                .to_str()?
                .strip_prefix(name)?
                .strip_prefix('.')?
                .strip_suffix(".before-repair")?
                .parse()
                .ok()?;
            Some((stamp, e.path()))
        })
        .collect();
    copies.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
    let last = copies.len().saturating_sub(1);
    for (i, (_, old)) in copies.into_iter().enumerate() {
        if i >= 2 && i != last && Some(old.as_path()) != made {
            let _ = std::fs::remove_file(old);
        }
    }
}

impl Store {
    /// The store's file in `dir`.
    pub fn file(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    /// Opens (or makes) the store in `dir`. A file that is not a store, is damaged, or was
    /// written by a newer gateway is an error naming it; nothing is changed then.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = Self::file(dir);
        let unreadable = |problem: String| StoreError::Unreadable {
            path: path.clone(),
            problem,
        };
        use std::os::unix::fs::PermissionsExt as _;
        // Pins, approvals and the bans are the operator's business only: a folder made here is
        // the owner's alone, and so is the file (a folder that was there, shared perhaps, keeps
        // its permissions).
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| unreadable(format!("making the folder {}: {e}", dir.display())))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        // An empty file is no store: redb took it for a new one, and every pin, approval, ban
        // and spend was forgotten with no more than "loaded pins=0" (an operator's review).
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
            return Err(unreadable("the file is empty (it holds no store)".into()));
        }
        // redb asserts on some damage (a file cut short trips `raw_file_len >= layout len`)
        // instead of returning an error: caught, it is the error it should have been, so that
        // `gateway state export` can still be tried and the start fails with the store's name.
        let opened = std::panic::catch_unwind(|| -> Result<Self, StoreError> {
            let db = match open_copying_before_repair(&path) {
                Ok(db) => db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(StoreError::InUse { path: path.clone() });
                }
                Err(e) => return Err(unreadable(e.to_string())),
            };
            let store = Self {
                db: Db(Some(db)),
                path: path.clone(),
                pins: HashMap::new(),
                windows: HashMap::new(),
                bans: BTreeMap::new(),
                auto_bans: BTreeMap::new(),
            };
            store.check_schema()?;
            Ok(store)
        });
        let store = opened.unwrap_or_else(|panic| Err(unreadable(damaged(&*panic))))?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        Ok(store)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.unreadable(e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| self.unreadable(e))?;
            let found = meta
                .get("schema")
                .map_err(|e| self.unreadable(e))?
                .map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA => {
                    return Err(StoreError::Newer {
                        path: self.path.clone(),
                        found: v,
                    });
                }
                Some(SCHEMA) => {}
                Some(_) => {
                    let mut windows = tx.open_table(WINDOWS).map_err(|e| self.unreadable(e))?;
                    Self::migrate_from_1(&mut windows).map_err(|e| self.unreadable(e))?;
                    meta.insert("schema", SCHEMA)
                        .map_err(|e| self.unreadable(e))?;
                }
                None => {
                    meta.insert("schema", SCHEMA)
                        .map_err(|e| self.unreadable(e))?;
                }
            }
            tx.open_table(PINS).map_err(|e| self.unreadable(e))?;
            tx.open_table(WINDOWS).map_err(|e| self.unreadable(e))?;
            tx.open_table(BANS).map_err(|e| self.unreadable(e))?;
            tx.open_table(AUTO_BANS).map_err(|e| self.unreadable(e))?;
        }
        tx.commit().map_err(|e| self.unreadable(e))
    }

    /// Schema 1 to 2: an `agent` budget named by an address was a caller's with no agent
    /// (no configured or token agent was counted by one before schema 2 could tell them apart).
    fn migrate_from_1(
        windows: &mut redb::Table<'_, &str, &[u8]>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let mut moved = Vec::new();
        for row in windows.iter()? {
            let (k, v) = row?;
            if let Ok(Counted::Budget {
                scope,
                tenant,
                subject,
            }) = serde_json::from_str::<Counted>(k.value())
                && scope == "agent"
                && subject.parse::<std::net::IpAddr>().is_ok()
            {
                let now = Counted::Budget {
                    scope: "address".into(),
                    tenant,
                    subject,
                };
                moved.push((
                    k.value().to_owned(),
                    serde_json::to_string(&now)?,
                    v.value().to_vec(),
                ));
            }
        }
        for (old, new, value) in moved {
            windows.remove(old.as_str())?;
            windows.insert(new.as_str(), value.as_slice())?;
        }
        Ok(())
    }

    fn unreadable(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unreadable {
            path: self.path.clone(),
            problem: e.to_string(),
        }
    }

    fn write_error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Write {
            path: self.path.clone(),
            problem: e.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Everything in the store as JSON (`gateway state export`); a panic of redb's on damage
    /// is the file being unreadable.
    pub fn export(&self) -> Result<serde_json::Value, StoreError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.export_inner()))
            .unwrap_or_else(|panic| Err(self.unreadable(damaged(&*panic))))
    }

    fn export_inner(&self) -> Result<serde_json::Value, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.unreadable(e))?;
        let mut pins = serde_json::Map::new();
        for row in tx
            .open_table(PINS)
            .map_err(|e| self.unreadable(e))?
            .iter()
            .map_err(|e| self.unreadable(e))?
        {
            let (k, v) = row.map_err(|e| self.unreadable(e))?;
            let v: serde_json::Value =
                serde_json::from_slice(v.value()).unwrap_or(serde_json::Value::Null);
            pins.insert(k.value().to_owned(), v);
        }
        let mut windows = Vec::new();
        for row in tx
            .open_table(WINDOWS)
            .map_err(|e| self.unreadable(e))?
            .iter()
            .map_err(|e| self.unreadable(e))?
        {
            let (k, v) = row.map_err(|e| self.unreadable(e))?;
            windows.push(serde_json::json!({
                "counts": serde_json::from_str::<serde_json::Value>(window_key_counted(k.value())).unwrap_or(serde_json::Value::Null),
                "window": serde_json::from_slice::<serde_json::Value>(v.value()).unwrap_or(serde_json::Value::Null),
            }));
        }
        let auto = tx.open_table(AUTO_BANS).map_err(|e| self.unreadable(e))?;
        let mut bans = serde_json::Map::new();
        for row in tx
            .open_table(BANS)
            .map_err(|e| self.unreadable(e))?
            .iter()
            .map_err(|e| self.unreadable(e))?
        {
            let (k, v) = row.map_err(|e| self.unreadable(e))?;
            let is_auto = auto
                .get(k.value())
                .map_err(|e| self.unreadable(e))?
                .is_some();
            bans.insert(
                k.value().to_owned(),
                serde_json::json!({"until_unix_ms": v.value(), "auto": is_auto}),
            );
        }
        Ok(serde_json::json!({
            "file": self.path.display().to_string(),
            "schema": SCHEMA,
            "pins": pins,
            "windows": windows,
            "bans": bans,
        }))
    }

    /// Runs `f` on the store; a panic of redb's (it asserts on some damage instead of
    /// returning an error: a flipped byte in a table's page panicked the load) is the file
    /// being unreadable.
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let path = self.path.clone();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))).unwrap_or_else(|panic| {
            Err(StoreError::Unreadable {
                path,
                problem: damaged(&*panic),
            })
        })
    }

    /// Opens the file again after a write failed: redb refuses every later write once one
    /// failed (a disk that filled up once stopped every write until a restart, and the stop's
    /// last write failed too: an operator's review). What was written last stays the record.
    fn reopen(&mut self) -> Result<(), StoreError> {
        self.db.close();
        let opened = std::panic::catch_unwind(|| Database::builder().create(&self.path));
        match opened {
            Ok(Ok(db)) => {
                self.db = Db(Some(db));
                Ok(())
            }
            Ok(Err(e)) => Err(self.write_error(e)),
            Err(panic) => Err(self.write_error(damaged(&*panic))),
        }
    }

    /// Checks every page of the file (`gateway state check`).
    pub fn check(&mut self) -> Result<(), StoreError> {
        self.guarded(Self::check_inner)
    }

    fn check_inner(&mut self) -> Result<(), StoreError> {
        match self.db.check_integrity() {
            Ok(true) => {}
            Ok(false) => {
                return Err(self.unreadable("damaged pages were found (and repaired)"));
            }
            Err(e) => return Err(self.unreadable(e)),
        }
        // Every record must read as this gateway reads it at start.
        self.load(&Pins::default(), &State::default()).map(|_| ())
    }

    /// Puts the stored state into `pins` and `limits` (at start, before the workers serve); a
    /// record that does not read is an error naming it, not skipped.
    pub fn load(&mut self, pins: &Pins, limits: &State) -> Result<Loaded, StoreError> {
        self.guarded(|s| s.load_inner(pins, limits))
    }

    fn load_inner(&mut self, pins: &Pins, limits: &State) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.unreadable(e))?;
        let mut loaded = Loaded::default();
        for row in tx
            .open_table(PINS)
            .map_err(|e| self.unreadable(e))?
            .iter()
            .map_err(|e| self.unreadable(e))?
        {
            let (k, v) = row.map_err(|e| self.unreadable(e))?;
            let key = k.value().to_owned();
            let pin: Pin = serde_json::from_slice(v.value())
                .map_err(|e| self.unreadable(format!("pin `{key}`: {e}")))?;
            let pin = pins.restore(key.clone(), pin);
            self.pins.insert(key, pin);
            loaded.pins += 1;
        }
        for row in tx
            .open_table(WINDOWS)
            .map_err(|e| self.unreadable(e))?
            .iter()
            .map_err(|e| self.unreadable(e))?
        {
            let (k, v) = row.map_err(|e| self.unreadable(e))?;
            let key = k.value().to_owned();
            let what: Counted = serde_json::from_str(window_key_counted(&key))
                .map_err(|e| self.unreadable(format!("count `{key}`: {e}")))?;
            let count: WindowCount = serde_json::from_slice(v.value())
                .map_err(|e| self.unreadable(format!("count `{key}`: {e}")))?;
            if limits.restore(what, count) {
                loaded.windows += 1;
            }
            // An ended window stays recorded here, so that the next flush deletes it.
            self.windows.insert(key, count);
        }
        let now = unix_ms();
        for (key, net, until) in self.read_ends(&tx, BANS, "ban")? {
            if until > now {
                loaded.bans.push((net, Duration::from_millis(until - now)));
            }
            self.bans.insert(key, until);
        }
        for (key, net, until) in self.read_ends(&tx, AUTO_BANS, "auto-ban")? {
            if until > now && self.bans.contains_key(&key) {
                loaded
                    .auto_bans
                    .push((net, Duration::from_millis(until - now)));
            }
            // One whose ban is gone stays recorded here, so that the next flush deletes it.
            self.auto_bans.insert(key, until);
        }
        Ok(loaded)
    }

    /// The rows of a table of ban ends ([`BANS`], [`AUTO_BANS`]): key, net and end; a key that
    /// is no address or prefix is an error naming it (`what`: the row's kind).
    fn read_ends(
        &self,
        tx: &redb::ReadTransaction,
        table: TableDefinition<&str, u64>,
        what: &str,
    ) -> Result<Vec<(String, IpNet, u64)>, StoreError> {
        let mut rows = Vec::new();
        for row in tx
            .open_table(table)
            .map_err(|e| self.unreadable(e))?
            .iter()
            .map_err(|e| self.unreadable(e))?
        {
            let (k, v) = row.map_err(|e| self.unreadable(e))?;
            let key = k.value().to_owned();
            let net = ban_key_net(&key).ok_or_else(|| {
                self.unreadable(format!("{what} `{key}`: not an address or prefix"))
            })?;
            rows.push((key, net, v.value()));
        }
        Ok(rows)
    }

    /// Writes what changed since the last flush or load, in one transaction: pins, counts of
    /// windows not yet ended, and `bans` (each with the time it has left, and whether it is an
    /// auto-ban). Nothing is written (and no sync made) when nothing changed. On failure
    /// nothing is taken as written, so the next flush tries it all again.
    pub fn flush(
        &mut self,
        pins: &Pins,
        limits: &State,
        bans: impl IntoIterator<Item = MirroredBan>,
    ) -> Result<Flushed, StoreError> {
        if self.db.0.is_none() {
            self.reopen()?;
        }
        let flushed = self
            .guarded(|s| s.flush_inner(pins, limits, bans))
            .map_err(|e| match e {
                StoreError::Unreadable { path, problem } => StoreError::Write { path, problem },
                e => e,
            });
        if flushed.is_err() {
            // The next flush opens the file again (see `reopen`).
            self.db.close();
        }
        flushed
    }

    fn flush_inner(
        &mut self,
        pins: &Pins,
        limits: &State,
        bans_in_force: impl IntoIterator<Item = MirroredBan>,
    ) -> Result<Flushed, StoreError> {
        let mut pin_puts: Vec<(String, Arc<Pin>)> = Vec::new();
        for (k, p) in pins.snapshot() {
            if self.pins.get(&k).is_none_or(|w| !Arc::ptr_eq(w, &p)) {
                pin_puts.push((k, p));
            }
        }
        let mut live: HashMap<String, WindowCount> = HashMap::new();
        for (_, what, count) in limits.kept_counts() {
            let Ok(key) = window_key(&what, count.len_s) else {
                continue;
            };
            live.insert(key, count);
        }
        let window_puts: Vec<(&String, &WindowCount)> = live
            .iter()
            .filter(|(k, c)| self.windows.get(*k) != Some(*c))
            .collect();
        let window_dels: Vec<String> = self
            .windows
            .keys()
            .filter(|k| !live.contains_key(*k))
            .cloned()
            .collect();
        let now = unix_ms();
        let mut bans: BTreeMap<String, u64> = BTreeMap::new();
        let mut auto_bans: BTreeMap<String, u64> = BTreeMap::new();
        for (net, left, auto) in bans_in_force {
            let left = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            let (key, until) = (ban_key(net), now.saturating_add(left));
            if auto {
                auto_bans.insert(key.clone(), until);
            }
            bans.insert(key, until);
        }
        let ban_changes = Ends::changed(&self.bans, bans);
        let auto_changes = Ends::changed(&self.auto_bans, auto_bans);
        let written =
            pin_puts.len() + window_puts.len() + ban_changes.puts.len() + auto_changes.puts.len();
        let deleted = window_dels.len() + ban_changes.dels.len() + auto_changes.dels.len();
        if written + deleted == 0 {
            return Ok(Flushed::default());
        }
        let tx = self.db.begin_write().map_err(|e| self.write_error(e))?;
        {
            let mut t = tx.open_table(PINS).map_err(|e| self.write_error(e))?;
            for (k, p) in &pin_puts {
                let v = serde_json::to_vec(&**p).map_err(|e| self.write_error(e))?;
                t.insert(k.as_str(), v.as_slice())
                    .map_err(|e| self.write_error(e))?;
            }
            let mut t = tx.open_table(WINDOWS).map_err(|e| self.write_error(e))?;
            for (k, c) in &window_puts {
                let v = serde_json::to_vec(c).map_err(|e| self.write_error(e))?;
                t.insert(k.as_str(), v.as_slice())
                    .map_err(|e| self.write_error(e))?;
            }
            for k in &window_dels {
                t.remove(k.as_str()).map_err(|e| self.write_error(e))?;
            }
            for (table, changes) in [(BANS, &ban_changes), (AUTO_BANS, &auto_changes)] {
                let mut t = tx.open_table(table).map_err(|e| self.write_error(e))?;
                changes.write(&mut t).map_err(|e| self.write_error(e))?;
            }
        }
        tx.commit().map_err(|e| self.write_error(e))?;
        for (k, p) in pin_puts {
            self.pins.insert(k, p);
        }
        let window_puts: Vec<(String, WindowCount)> = window_puts
            .into_iter()
            .map(|(k, c)| (k.clone(), *c))
            .collect();
        for k in window_dels {
            self.windows.remove(&k);
        }
        self.windows.extend(window_puts);
        ban_changes.apply(&mut self.bans);
        auto_changes.apply(&mut self.auto_bans);
        Ok(Flushed { written, deleted })
    }

    /// Flushes and counts it in `stats`.
    pub fn flush_counted(
        &mut self,
        stats: &Stats,
        pins: &Pins,
        limits: &State,
        bans: impl IntoIterator<Item = MirroredBan>,
    ) -> Result<Flushed, StoreError> {
        let start = Instant::now();
        let r = self.flush(pins, limits, bans);
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        stats.flushes.fetch_add(1, Relaxed);
        stats.flush_us_total.fetch_add(us, Relaxed);
        stats.last_flush_us.store(us, Relaxed);
        if r.is_err() {
            stats.failures.fetch_add(1, Relaxed);
        } else {
            stats.last_good_unix_s.store(unix_ms() / 1000, Relaxed);
        }
        stats.failing.store(r.is_err(), Relaxed);
        stats.bytes.store(self.bytes(), Relaxed);
        r
    }

    /// Moves the file in `dir` aside (`state.redb.<unix s>.bad`) without reading it; returns
    /// where it went, or `None` when there was none.
    pub fn reset(dir: &Path) -> std::io::Result<Option<PathBuf>> {
        let path = Self::file(dir);
        if !path.exists() {
            return Ok(None);
        }
        let aside = dir.join(format!("{FILE}.{}.bad", unix_ms() / 1000));
        std::fs::rename(&path, &aside)?;
        Ok(Some(aside))
    }
}

/// `/metrics` lines of the store.
pub fn render_metrics(stats: &Stats, out: &mut String) {
    use std::fmt::Write as _;
    if !stats.enabled.load(Relaxed) {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_state_flushes_total Flushes of the state store (writes of what changed since the last).\n# TYPE mcp_gateway_state_flushes_total counter\nmcp_gateway_state_flushes_total {}",
        stats.flushes.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_state_flush_failures_total Flushes of the state store that failed (tried again at the next interval).\n# TYPE mcp_gateway_state_flush_failures_total counter\nmcp_gateway_state_flush_failures_total {}",
        stats.failures.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_state_flush_seconds_total Time spent flushing the state store.\n# TYPE mcp_gateway_state_flush_seconds_total counter\nmcp_gateway_state_flush_seconds_total {:.6}",
        stats.flush_us_total.load(Relaxed) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_state_last_flush_seconds How long the last flush of the state store took.\n# TYPE mcp_gateway_state_last_flush_seconds gauge\nmcp_gateway_state_last_flush_seconds {:.6}",
        stats.last_flush_us.load(Relaxed) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_state_store_failing 1 while the state store's last flush failed: what changed since is in memory only.\n# TYPE mcp_gateway_state_store_failing gauge\nmcp_gateway_state_store_failing {}",
        u8::from(stats.failing.load(Relaxed))
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_state_store_bytes Size of the state store's file.\n# TYPE mcp_gateway_state_store_bytes gauge\nmcp_gateway_state_store_bytes {}",
        stats.bytes.load(Relaxed)
    );
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

/// What changed in a table of ban ends (key → end, unix ms) since it was last written.
struct Ends {
    /// New entries, and those whose end moved by more than a second (the kernel's clock and the
    /// wall clock drift apart by a few ms between flushes).
    puts: Vec<(String, u64)>,
    dels: Vec<String>,
}

impl Ends {
    /// Of `now` against `written`, the store's mirror of the table.
    fn changed(written: &BTreeMap<String, u64>, now: BTreeMap<String, u64>) -> Self {
        let dels = written
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        let puts = now
            .into_iter()
            .filter(|(k, until)| written.get(k).is_none_or(|w| w.abs_diff(*until) > 1000))
            .collect();
        Self { puts, dels }
    }

    fn write(&self, t: &mut redb::Table<'_, &str, u64>) -> Result<(), redb::StorageError> {
        for (k, until) in &self.puts {
            t.insert(k.as_str(), *until)?;
        }
        for k in &self.dels {
            t.remove(k.as_str())?;
        }
        Ok(())
    }

    /// Once written: the mirror as the table now is.
    fn apply(self, mirror: &mut BTreeMap<String, u64>) {
        for k in self.dels {
            mirror.remove(&k);
        }
        mirror.extend(self.puts);
    }
}

/// A ban's key in the store: the address alone for one address (as earlier versions wrote
/// it), the prefix in CIDR notation otherwise.
fn ban_key(net: IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_canonical().to_string()
    } else {
        net.trunc().to_string()
    }
}

/// Reads a key [`ban_key`] wrote.
fn ban_key_net(key: &str) -> Option<IpNet> {
    key.parse::<IpNet>().ok().or_else(|| {
        key.parse::<IpAddr>()
            .ok()
            .map(|ip| IpNet::from(ip.to_canonical()))
    })
}
