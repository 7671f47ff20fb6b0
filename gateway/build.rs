//! Builds the kernel program (`gateway-ebpf`) for the BPF target with the pinned nightly and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! `cargo xtask setup` installs what this needs.
use anyhow::{Context as _, anyhow};

/// The commit being built, for `mcp_gateway_build_info` and `--version`: `MCP_GATEWAY_COMMIT`
/// when set (packaging sets it), else what git says when this script runs ("unknown" outside a
/// checkout). The script is not rerun when HEAD moves: that would rebuild the kernel program
/// and the gateway on every commit; a development build may name the commit of its last full
/// build.
fn git_commit() {
    println!("cargo:rerun-if-env-changed=MCP_GATEWAY_COMMIT");
    let commit = std::env::var("MCP_GATEWAY_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=GATEWAY_GIT_COMMIT={commit}");
}

fn main() -> anyhow::Result<()> {
    git_commit();
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "gateway-ebpf")
        .ok_or_else(|| anyhow!("gateway-ebpf package not found in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("gateway-ebpf manifest has no parent directory"))?;
    // aya_build relays every line the nested cargo prints as a `cargo:warning`, so a plain
    // build showed its progress as a dozen warnings. Quiet, it prints only what matters: the
    // kernel crate's own compiler warnings and errors (relayed from its JSON messages).
    // SAFETY: the build script is single-threaded here; no other thread reads the environment.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF program; run `cargo xtask setup` to install its toolchain")
}
