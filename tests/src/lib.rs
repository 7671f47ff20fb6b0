//! Helpers for the privileged tests: crafted frames, a loaded-but-unattached program for
//! `BPF_PROG_TEST_RUN`, network namespaces joined by veth, and the daemon run inside one.
//! Every helper that creates kernel state removes it on drop, also when a test fails.
//! They panic with a message instead of returning errors (they are only used by tests).

pub mod daemon;
pub mod frames;
pub mod netns;
pub mod peers;
pub mod pki;

use std::{path::PathBuf, sync::atomic::AtomicU32};

use aya::programs::{TestRun as _, TestRunOptions, TestRunResult, Xdp};
use gateway::kernel::{self, Kernel, KernelMaps, KernelState};

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call, for namespaces, links and instances.
pub fn unique(prefix: &str) -> String {
    let n = UNIQUE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Files a test made, removed even when it fails.
pub struct RemoveOnDrop(pub Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A directory of a test's own under the system's temporary one (named by [`unique`]), made
/// at once and removed with what it holds even when the test fails.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Panics unless root: these tests load kernel programs and create namespaces.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("privileged test: needs root (run `sudo -E cargo xtask test`)");
    }
}

/// The program loaded (not attached) with its maps pinned under a private instance directory.
pub struct TestKernel {
    pub kernel: Kernel,
    pin_dir: PathBuf,
}

impl TestKernel {
    pub fn load(state: &KernelState) -> Self {
        require_root();
        let instance = unique("gwtest");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&instance);
        let kernel = kernel::load(&instance, &pin_dir)
            .unwrap_or_else(|e| panic!("loading the XDP program: {e}"));
        let me = Self { kernel, pin_dir };
        me.maps().sync(state).expect("sync");
        me
    }

    pub fn maps(&self) -> KernelMaps {
        self.kernel.maps().expect("open pinned maps")
    }

    /// Runs the program once on `frame`; returns the XDP action.
    pub fn run(&mut self, frame: &[u8]) -> u32 {
        test_run(self.kernel.program().expect("program"), frame, 1).return_value
    }

    /// Average cost of one run over `repeat` runs, in ns.
    pub fn cost_ns(&mut self, frame: &[u8], repeat: u32) -> u128 {
        test_run(self.kernel.program().expect("program"), frame, repeat)
            .duration
            .as_nanos()
    }
}

/// `BPF_PROG_TEST_RUN` of `program` on `frame`, `repeat` times (the kernel reports the mean).
/// Takes `&Xdp` so that several threads can run the same program at once.
pub fn test_run(program: &Xdp, frame: &[u8], repeat: u32) -> TestRunResult {
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    };
    program.test_run(opts).expect("BPF_PROG_TEST_RUN")
}

impl Drop for TestKernel {
    fn drop(&mut self) {
        let _ = kernel::remove_pins(&self.pin_dir);
    }
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
