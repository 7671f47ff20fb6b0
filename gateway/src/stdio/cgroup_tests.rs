//! Which cgroups the start's sweep takes for those of a gateway that is gone, against real
//! processes and cgroups (as root).

use std::time::Duration;

use super::{pid_namespace, prefix, start_of, sweep, trees};

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn sleep() -> std::process::Child {
    std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap()
}

#[test]
fn a_cgroup_names_the_process_that_made_it_by_pid_and_start() {
    let me = std::process::id();
    assert_eq!(
        prefix(),
        format!("{}-{me}-{}-", pid_namespace(), start_of(me).unwrap())
    );
    // A process started later has another start, and a thread its own (a crashed gateway's
    // pid taken since, or a thread's id, is not the gateway that made the cgroup).
    std::thread::sleep(Duration::from_millis(30));
    let mut later = sleep();
    assert_ne!(start_of(later.id()), start_of(me));
    let pid = later.id();
    let _ = later.kill();
    let _ = later.wait();
    assert_eq!(start_of(pid), None, "a pid gone");
}

#[test]
fn the_sweep_ends_and_removes_a_gone_gateways_cgroup_and_leaves_a_live_ones() {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 || trees().is_empty() {
        eprintln!("making cgroups needs root: skipped");
        return;
    }
    let tree = &trees()[0];
    let live = sleep();
    let live_start = start_of(live.id()).unwrap();
    let plant = |name: String| {
        let dir = tree.dir.join(name);
        std::fs::create_dir(&dir).unwrap();
        let inside = sleep();
        std::fs::write(dir.join("cgroup.procs"), inside.id().to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        (dir, inside)
    };
    let ns = pid_namespace();
    // The live process's pid with another start (the pid taken since), and with its own.
    let (taken_dir, mut left) = plant(format!("{ns}-{}-{}-0", live.id(), live_start + 1));
    let (live_dir, mut kept) = plant(format!("{ns}-{}-{live_start}-0", live.id()));
    sweep(tree);
    let _ = left.wait();
    assert!(!taken_dir.exists(), "{} kept", taken_dir.display());
    assert!(
        live_dir.exists() && running(kept.id()),
        "a live gateway's is kept"
    );
    let _ = kept.kill();
    let _ = kept.wait();
    std::thread::sleep(Duration::from_millis(50));
    std::fs::remove_dir(&live_dir).unwrap();
    let mut live = live;
    let _ = live.kill();
    let _ = live.wait();
}
