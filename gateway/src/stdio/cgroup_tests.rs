//! Which cgroups the start's sweep takes for those of a gateway that is gone, against real
//! processes and cgroups (as root).

use std::time::{Duration, SystemTime};

use super::{made_by_a_live_gateway, pid_namespace, sweep, trees};

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
fn a_gateways_pid_is_its_only_while_that_process_runs_and_started_before_the_cgroup() {
    let before = sleep();
    std::thread::sleep(Duration::from_millis(1100));
    let made = SystemTime::now();
    std::thread::sleep(Duration::from_millis(1100));
    let after = sleep();
    assert!(made_by_a_live_gateway(before.id(), made));
    assert!(
        !made_by_a_live_gateway(after.id(), made),
        "a pid taken since (the gateway that made it crashed)"
    );
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        // SAFETY: gettid(2) cannot fail.
        tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
        let _ = stop_rx.recv();
    });
    let tid = tid_rx.recv().unwrap();
    assert!(
        !made_by_a_live_gateway(tid, SystemTime::now() + Duration::from_secs(5)),
        "a thread's id"
    );
    stop_tx.send(()).unwrap();
    thread.join().unwrap();
    for mut c in [before, after] {
        let pid = c.id();
        let _ = c.kill();
        let _ = c.wait();
        assert!(!made_by_a_live_gateway(pid, made), "a pid gone");
    }
}

#[test]
fn the_sweep_ends_and_removes_a_gone_gateways_cgroup_and_leaves_a_live_ones() {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 || trees().is_empty() {
        eprintln!("making cgroups needs root: skipped");
        return;
    }
    let tree = &trees()[0];
    let mut gone = sleep();
    let gone_pid = gone.id();
    let _ = gone.kill();
    let _ = gone.wait();
    let live = sleep();
    std::thread::sleep(Duration::from_millis(1100));
    let plant = |pid: u32| {
        let dir = tree.dir.join(format!("{}-{pid}-0", pid_namespace()));
        std::fs::create_dir(&dir).unwrap();
        let inside = sleep();
        std::fs::write(dir.join("cgroup.procs"), inside.id().to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        (dir, inside)
    };
    let (gone_dir, mut left) = plant(gone_pid);
    let (live_dir, mut kept) = plant(live.id());
    sweep(tree);
    let _ = left.wait();
    assert!(!gone_dir.exists(), "{} kept", gone_dir.display());
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
