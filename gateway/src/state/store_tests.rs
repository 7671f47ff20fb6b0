use std::{net::IpAddr, time::Duration};

use serde_json::json;

use super::*;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gw-state-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tool(desc: &str) -> serde_json::Value {
    json!({"name": "echo", "description": desc, "inputSchema": {"type": "object"}})
}

fn budget(subject: &str) -> Counted {
    Counted::Budget {
        scope: "agent".into(),
        tenant: "acme".into(),
        subject: subject.into(),
    }
}

#[test]
fn pins_approvals_spend_refusals_and_bans_come_back_in_a_new_process_state() {
    let d = dir("roundtrip");
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let net: ipnet::IpNet = "198.18.4.0/24".parse().unwrap();
    // The prefix an auto-ban, the address the operator's.
    let bans = [
        (ipnet::IpNet::from(ip), Duration::from_secs(600), false),
        (net, Duration::from_secs(600), true),
    ];
    {
        let mut store = Store::open(&d).unwrap();
        let pins = Pins::default();
        let limits = State::default();
        assert!(pins.observe("u", &tool("first"), None));
        assert!(!pins.observe("u", &tool("changed"), None), "held");
        // A second tool, approved after a change.
        let other = json!({"name": "other", "description": "a"});
        assert!(pins.observe("u", &other, None));
        let other2 = json!({"name": "other", "description": "b"});
        assert!(!pins.observe("u", &other2, None));
        assert!(
            pins.approve("u", "other", &crate::policy::pins::digest(&other2))
                .is_ok()
        );
        let what = budget("bot");
        let key = what.key(&limits, 3600);
        let now = State::unix_s();
        limits
            .charge_kept(key, || what.clone(), now, 3600, 7, 10)
            .unwrap();
        let refusals = Counted::Refusals { source: ip };
        limits
            .charge_kept(
                refusals.key(&limits, 60),
                || refusals.clone(),
                now,
                60,
                2,
                5,
            )
            .unwrap();
        let f = store.flush(&pins, &limits, bans).unwrap();
        assert_eq!(f.written, 2 + 2 + 2 + 1);
        // Nothing changed: nothing written.
        assert_eq!(
            store.flush(&pins, &limits, bans).unwrap(),
            Flushed::default()
        );
    }
    // A new process: other hash seeds, empty cells.
    let mut store = Store::open(&d).unwrap();
    let pins = Pins::default();
    let limits = State::default();
    let loaded = store.load(&pins, &limits).unwrap();
    assert_eq!((loaded.pins, loaded.windows), (2, 2));
    // An address and a prefix (kept as `192.0.2.7` and `198.18.4.0/24`).
    let mut kept: Vec<_> = loaded.bans.iter().map(|(n, _)| *n).collect();
    kept.sort();
    assert_eq!(kept, vec![ipnet::IpNet::from(ip), net]);
    // Which was an auto-ban is kept with it (before, every ban read back was the operator's:
    // a widening neither counted nor lifted it).
    let auto: Vec<_> = loaded.auto_bans.iter().map(|(n, _)| *n).collect();
    assert_eq!(auto, vec![net]);
    assert!(loaded.auto_bans[0].1 > Duration::from_secs(590));
    assert!(
        loaded
            .bans
            .iter()
            .all(|(_, left)| *left > Duration::from_secs(590))
    );
    // The change is still held, the approval still stands.
    assert!(
        pins.callable("u", "echo", None, crate::policy::pins::Reaches::Upstream)
            .is_err()
    );
    assert!(!pins.observe("u", &tool("changed"), None));
    assert!(pins.observe("u", &tool("first"), None));
    assert!(pins.observe("u", &json!({"name": "other", "description": "b"}), None));
    // The spend is there: 3 of 10 left, so 4 is refused.
    let what = budget("bot");
    let key = limits.budget_key("agent", "acme", "bot", 3600);
    assert_eq!(what.key(&limits, 3600), key, "the request path's key");
    assert_eq!(limits.left(key, 3600, 10), 3);
    assert_eq!(
        limits.charge_kept(key, || what.clone(), State::unix_s(), 3600, 4, 10),
        Err(3)
    );
    let refusals = Counted::Refusals { source: ip };
    assert_eq!(limits.left(refusals.key(&limits, 60), 60, 5), 3);
    // The operator banned the prefix again: no longer an auto-ban, in the store either.
    let again = [
        (ipnet::IpNet::from(ip), Duration::from_secs(600), false),
        (net, Duration::from_secs(3600), false),
    ];
    let f = store.flush(&pins, &limits, again).unwrap();
    assert_eq!((f.written, f.deleted), (1, 1));
    drop(store);
    let mut store = Store::open(&d).unwrap();
    let loaded = store.load(&Pins::default(), &State::default()).unwrap();
    assert_eq!(loaded.bans.len(), 2);
    assert!(loaded.auto_bans.is_empty());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn ended_windows_are_not_restored_and_are_deleted() {
    let d = dir("ended");
    {
        let store = Store::open(&d).unwrap();
        let tx = store.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(WINDOWS).unwrap();
            let k = serde_json::to_string(&budget("old")).unwrap();
            let v = serde_json::to_vec(&WindowCount {
                len_s: 60,
                window: 1,
                used: 5,
            })
            .unwrap();
            t.insert(k.as_str(), v.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    let mut store = Store::open(&d).unwrap();
    let limits = State::default();
    let pins = Pins::default();
    assert_eq!(store.load(&pins, &limits).unwrap().windows, 0);
    assert_eq!(limits.kept_counts().len(), 0);
    assert_eq!(store.flush(&pins, &limits, []).unwrap().deleted, 1);
    assert_eq!(store.export().unwrap()["windows"], json!([]));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_damaged_file_is_an_error_naming_it_and_is_left_alone() {
    let d = dir("damaged");
    std::fs::create_dir_all(&d).unwrap();
    let file = Store::file(&d);
    let junk = vec![0x5a_u8; 64 * 1024];
    std::fs::write(&file, &junk).unwrap();
    let e = Store::open(&d).err().expect("refused");
    let msg = e.to_string();
    assert!(matches!(e, StoreError::Unreadable { .. }), "{msg}");
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    assert!(msg.contains("gateway state reset"), "{msg}");
    assert_eq!(std::fs::read(&file).unwrap(), junk, "never reset silently");
    // The recovery path: moved aside, then a fresh store.
    let aside = Store::reset(&d).unwrap().unwrap();
    assert_eq!(std::fs::read(&aside).unwrap(), junk);
    Store::open(&d).unwrap();
    let _ = std::fs::remove_dir_all(&d);
}

/// An empty file where the store should be is an error naming it, not a new store.
#[test]
fn an_empty_file_is_an_error_not_a_new_store() {
    let d = dir("empty");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(Store::file(&d), b"").unwrap();
    let e = Store::open(&d).err().expect("refused");
    assert!(matches!(e, StoreError::Unreadable { .. }), "{e}");
    assert!(
        e.to_string().contains("empty") && e.to_string().contains("gateway state reset"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(Store::file(&d)).unwrap(),
        b"",
        "left as it was"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// A store cut short (a full disk, a copy interrupted) is an error naming it, as damage is:
/// redb asserts on it, and the start, `state check` and `state export` ended in a panic.
#[test]
fn a_file_cut_short_is_an_error_not_a_panic() {
    let d = dir("cut");
    {
        let mut store = Store::open(&d).unwrap();
        let pins = Pins::default();
        for i in 0..50 {
            pins.observe(
                "u",
                &json!({"name": format!("t{i}"), "description": "x".repeat(500)}),
                None,
            );
        }
        store.flush(&pins, &State::default(), []).unwrap();
    }
    let file = Store::file(&d);
    let whole = std::fs::read(&file).unwrap();
    for keep in [whole.len() / 2, 4096, 600, 100] {
        std::fs::write(&file, &whole[..keep.min(whole.len())]).unwrap();
        let e = Store::open(&d).err().expect("refused");
        assert!(matches!(e, StoreError::Unreadable { .. }), "{keep}: {e}");
        assert!(e.to_string().contains("gateway state reset"), "{keep}: {e}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A folder the store makes is its owner's alone, and so is the file; a folder that was there
/// keeps its permissions.
#[test]
fn the_store_is_its_owners_alone_and_a_shared_folder_is_left_as_it_was() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let d = dir("perms");
    drop(Store::open(&d).unwrap());
    assert_eq!(mode(&d), 0o700);
    assert_eq!(mode(&Store::file(&d)), 0o600);
    let _ = std::fs::remove_dir_all(&d);
    let shared = dir("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(Store::open(&shared).unwrap());
    assert_eq!(mode(&shared), 0o755);
    assert_eq!(mode(&Store::file(&shared)), 0o600);
    let _ = std::fs::remove_dir_all(&shared);
}

#[test]
fn a_record_that_does_not_read_stops_the_load() {
    let d = dir("record");
    {
        let store = Store::open(&d).unwrap();
        let tx = store.db.begin_write().unwrap();
        tx.open_table(PINS)
            .unwrap()
            .insert("u/echo", b"{not json".as_slice())
            .unwrap();
        tx.commit().unwrap();
    }
    let mut store = Store::open(&d).unwrap();
    let e = store
        .load(&Pins::default(), &State::default())
        .expect_err("refused");
    assert!(e.to_string().contains("pin `u/echo`"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_store_of_a_newer_schema_is_refused() {
    let d = dir("newer");
    {
        let store = Store::open(&d).unwrap();
        let tx = store.db.begin_write().unwrap();
        tx.open_table(META)
            .unwrap()
            .insert("schema", SCHEMA + 1)
            .unwrap();
        tx.commit().unwrap();
    }
    let e = Store::open(&d).err().expect("refused");
    assert!(
        matches!(e, StoreError::Newer { found, .. } if found == SCHEMA + 1),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// A store of schema 1 kept the agent budget of a caller with no agent under `agent`, named by
/// its address: read as such a caller's (`address`), not as a named agent's of that name, which
/// would have started every such caller afresh, shared its spend with the fleet, and left it
/// out of the bound of callers known by address.
#[test]
fn a_schema_1_store_gives_callers_with_no_agent_their_own_scope() {
    let d = dir("schema1");
    let now = State::unix_s();
    let count = WindowCount {
        len_s: 3600,
        window: now / 3600,
        used: 7,
    };
    {
        let store = Store::open(&d).unwrap();
        let tx = store.db.begin_write().unwrap();
        tx.open_table(META).unwrap().insert("schema", 1).unwrap();
        {
            let mut windows = tx.open_table(WINDOWS).unwrap();
            let value = serde_json::to_vec(&count).unwrap();
            for what in [budget("198.51.100.9"), budget("bot")] {
                let key = serde_json::to_string(&what).unwrap();
                windows.insert(key.as_str(), value.as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let mut store = Store::open(&d).unwrap();
    let limits = State::default();
    store.load(&Pins::default(), &limits).unwrap();
    let address = Counted::Budget {
        scope: "address".into(),
        tenant: "acme".into(),
        subject: "198.51.100.9".into(),
    };
    assert_eq!(limits.left(address.key(&limits, 3600), 3600, 10), 3);
    let named = budget("198.51.100.9");
    assert_eq!(
        limits.left(named.key(&limits, 3600), 3600, 10),
        10,
        "a named agent of that name has spent nothing"
    );
    assert_eq!(limits.left(budget("bot").key(&limits, 3600), 3600, 10), 3);
    drop(store);
    let store = Store::open(&d).unwrap();
    let tx = store.db.begin_read().unwrap();
    let schema = tx
        .open_table(META)
        .unwrap()
        .get("schema")
        .unwrap()
        .map(|v| v.value());
    assert_eq!(schema, Some(SCHEMA));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_second_process_on_the_same_store_is_refused() {
    let d = dir("twice");
    let _first = Store::open(&d).unwrap();
    let e = Store::open(&d).err().expect("refused");
    assert!(matches!(e, StoreError::InUse { .. }), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_pin_from_a_changed_configuration_replaces_a_kept_one() {
    let pins = Pins::default();
    let old = tool("old");
    let new = tool("new");
    assert!(pins.observe("u", &old, Some(&crate::policy::pins::digest(&old))));
    // The operator pins the new definition: it is shown, the old one is not.
    assert!(pins.observe("u", &new, Some(&crate::policy::pins::digest(&new))));
    assert!(!pins.observe("u", &old, Some(&crate::policy::pins::digest(&new))));
    // The pin is dropped from the configuration: the last one stays.
    assert!(pins.observe("u", &new, None));
    assert!(!pins.observe("u", &old, None));
}

#[test]
fn counts_of_one_subject_in_windows_of_two_lengths_are_both_kept() {
    // A reload changed `window_s` from 3600 to 600: the tenant's count of the hour goes on
    // beside the new one until its window ends (a reload back to 3600 reads it again). Keyed
    // by what they count alone, one record was written over the other (an operator's review).
    let d = dir("two-lengths");
    let now = State::unix_s();
    {
        let mut store = Store::open(&d).unwrap();
        let limits = State::default();
        let what = budget("bot");
        for (len, cost) in [(3600, 23), (600, 3)] {
            limits
                .charge_kept(what.key(&limits, len), || what.clone(), now, len, cost, 100)
                .unwrap();
        }
        assert_eq!(
            store.flush(&Pins::default(), &limits, []).unwrap().written,
            2
        );
    }
    let mut store = Store::open(&d).unwrap();
    let limits = State::default();
    assert_eq!(store.load(&Pins::default(), &limits).unwrap().windows, 2);
    let what = budget("bot");
    assert_eq!(limits.left(what.key(&limits, 3600), 3600, 100), 77);
    assert_eq!(limits.left(what.key(&limits, 600), 600, 100), 97);
    // A record of a store written before (keyed without the length) reads, and the next
    // flush writes it under the new key.
    drop(store);
    {
        let store = Store::open(&d).unwrap();
        let tx = store.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(WINDOWS).unwrap();
            let k = serde_json::to_string(&budget("old")).unwrap();
            let v = serde_json::to_vec(&WindowCount {
                len_s: 3600,
                window: now / 3600,
                used: 5,
            })
            .unwrap();
            t.insert(k.as_str(), v.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    let mut store = Store::open(&d).unwrap();
    let limits = State::default();
    assert_eq!(store.load(&Pins::default(), &limits).unwrap().windows, 3);
    let old = budget("old");
    assert_eq!(limits.left(old.key(&limits, 3600), 3600, 10), 5);
    let f = store.flush(&Pins::default(), &limits, []).unwrap();
    assert_eq!(
        (f.written, f.deleted),
        (1, 1),
        "rewritten under its new key"
    );
    let exported = store.export().unwrap();
    let windows = exported["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 3);
    assert!(
        windows.iter().all(|w| w["counts"]["tenant"] == "acme"),
        "{exported}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// Damage anywhere in the file is an error naming it (or, where redb repairs it, a store that
/// loads), never a panic: redb panicked while the store was dropped after a load that failed,
/// and the start ended with a backtrace instead of the error and the way to recover (an
/// operator's review).
#[test]
fn damage_anywhere_is_an_error_not_a_panic() {
    let d = dir("flipped");
    {
        let mut store = Store::open(&d).unwrap();
        let pins = Pins::default();
        let limits = State::default();
        for i in 0..40 {
            pins.observe(
                "u",
                &json!({"name": format!("t{i}"), "description": "x".repeat(300)}),
                None,
            );
            let what = budget(&format!("bot{i}"));
            limits
                .charge_kept(
                    what.key(&limits, 3600),
                    || what.clone(),
                    State::unix_s(),
                    3600,
                    1,
                    9,
                )
                .unwrap();
        }
        store.flush(&pins, &limits, []).unwrap();
    }
    let whole = std::fs::read(Store::file(&d)).unwrap();
    for offset in (0..whole.len()).step_by(4096).flat_map(|o| [o, o + 2048]) {
        let mut damaged = whole.clone();
        for b in damaged.iter_mut().skip(offset).take(64) {
            *b ^= 0x5a;
        }
        // Each in a folder of its own: a process another test forks holds the lock of a file
        // open at that moment until it runs its program, and the next open of that name was
        // refused as in use (1 run in 3 of the unit tests, never this test alone).
        let d = dir(&format!("flipped-{offset}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(Store::file(&d), &damaged).unwrap();
        let opened = std::panic::catch_unwind(|| {
            let mut store = Store::open(&d)?;
            store.load(&Pins::default(), &State::default())?;
            Ok::<_, StoreError>(())
        });
        let _ = std::fs::remove_dir_all(&d);
        match opened {
            Ok(Ok(())) => {}
            Ok(Err(e)) => assert!(
                e.to_string().contains("gateway state reset"),
                "{offset}: {e}"
            ),
            Err(_) => panic!("damage at {offset}: a panic"),
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A store the process before did not close (a crash, `kill -9`) is copied aside before redb
/// repairs it in place, and then loads: what a repair drops of a damaged file was gone with no
/// copy to read it from. A store closed cleanly is not copied. A copy is a new file, never
/// made through a link at its name (a review had a file elsewhere overwritten so); kept are
/// the oldest, the two newest and the one just made (whatever the clock says).
#[test]
fn a_store_not_closed_cleanly_is_copied_aside_before_it_is_repaired() {
    let d = dir("unclean");
    let file = Store::file(&d);
    let copies = || -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".before-repair"))
            .collect();
        found.sort();
        found
    };
    let as_a_crash_left_it = {
        let mut store = Store::open(&d).unwrap();
        assert!(copies().is_empty(), "a new store copies nothing");
        let pins = Pins::default();
        assert!(pins.observe("u", &tool("kept"), None));
        store.flush(&pins, &State::default(), []).unwrap();
        // The file as it is while the store is open: not closed.
        std::fs::read(&file).unwrap()
    };
    assert!(copies().is_empty(), "a clean close copies nothing");
    // Links at every name a copy could take now: none is followed.
    let elsewhere = d.with_extension("elsewhere");
    std::fs::write(&elsewhere, b"kept").unwrap();
    let now = State::unix_s();
    for s in 0..4 {
        std::os::unix::fs::symlink(
            &elsewhere,
            d.join(format!("state.redb.{}.before-repair", now + s)),
        )
        .unwrap();
    }
    std::fs::write(&file, &as_a_crash_left_it).unwrap();
    Store::open(&d).unwrap();
    assert_eq!(
        std::fs::read(&elsewhere).unwrap(),
        b"kept",
        "written through a link"
    );
    for link in copies() {
        std::fs::remove_file(link).unwrap();
    }
    std::fs::write(&file, &as_a_crash_left_it).unwrap();
    {
        let mut store = Store::open(&d).unwrap();
        let loaded = store.load(&Pins::default(), &State::default()).unwrap();
        assert_eq!(loaded.pins, 1);
    }
    let made = copies();
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(
        std::fs::read(&made[0]).unwrap(),
        as_a_crash_left_it,
        "copied as it was before the repair"
    );
    Store::open(&d).unwrap();
    assert_eq!(copies(), made, "closed cleanly after the repair: no copy");
    // Kept: the oldest, the two newest, and the one just made, even when the clock puts it
    // before them (copies stamped in the far future: a clock behind after a power cut).
    for f in copies() {
        std::fs::remove_file(f).unwrap();
    }
    for stamp in [5u64, 6, 7, 9_999_999_997, 9_999_999_998, 9_999_999_999] {
        std::fs::write(d.join(format!("state.redb.{stamp}.before-repair")), b"x").unwrap();
    }
    std::fs::write(&file, &as_a_crash_left_it).unwrap();
    Store::open(&d).unwrap();
    let kept: Vec<String> = copies()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let name = |stamp: u64| format!("state.redb.{stamp}.before-repair");
    assert_eq!(kept.len(), 4, "{kept:?}");
    for stamp in [5, 9_999_999_998, 9_999_999_999] {
        assert!(kept.contains(&name(stamp)), "{stamp}: {kept:?}");
    }
    assert!(
        kept.iter()
            .any(|k| k.starts_with(&format!("state.redb.{}", State::unix_s() / 100_000))),
        "the copy just made: {kept:?}"
    );
    let _ = std::fs::remove_file(&elsewhere);
    let _ = std::fs::remove_dir_all(&d);
}
