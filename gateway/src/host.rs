//! What the gateway takes from its host: the runtime directory (instance locks, the upgrade
//! socket, the stdio children's homes), how its log files are made, and what running out of
//! file descriptors looks like.

use std::path::PathBuf;

/// The runtime directory (instance locks, the upgrade socket): systemd's `RuntimeDirectory=` (`$RUNTIME_DIRECTORY`, its
/// first entry) when set, else `/run/mcp-gateway`.
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/run/mcp-gateway"))
}

/// Opens one of the gateway's own log files (audit, histogram), creating it with mode 0640: the
/// owner is the user the gateway runs as (the service user), its group may read, others not.
/// `append` keeps what is there; otherwise the file starts empty.
pub fn open_log_file(path: &std::path::Path, append: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).mode(0o640);
    if append {
        options.append(true);
    } else {
        options.write(true).truncate(true);
    }
    options.open(path)
}

/// Whether an error is the process (EMFILE) or the system (ENFILE) out of file descriptors.
pub fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}
