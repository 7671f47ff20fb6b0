//! What the gateway takes from its host: the runtime directory (instance locks, the upgrade
//! socket, the stdio children's homes), how its log files are made, what running out of
//! file descriptors looks like, which of them a process it starts gets, and its network
//! interfaces' indexes.

use std::path::PathBuf;

/// The index of the network interface named `name`; 0 if this host has none.
pub fn interface_index(name: &str) -> u32 {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: a NUL-terminated string that lives across the call.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) }
}

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

/// Between fork and exec: every descriptor from `first` on is made close-on-exec, so that the
/// program about to run gets none the gateway did not hand it on purpose: a client's
/// connection (io_uring's accept does not make it close-on-exec; a stdio child of one tenant
/// read another tenant's requests on one, and answered them), a descriptor the gateway itself
/// inherited. Only async-signal-safe calls: `close_range(2)` (Linux 5.11), else `fcntl(2)` on
/// each descriptor up to the open-file limit.
///
/// # Safety
/// Call only in a child between fork and exec (`pre_exec`).
pub unsafe fn close_on_exec_from(first: u32) {
    // SAFETY: system calls on this process's own descriptor table.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return;
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let last = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur.min(1 << 20)
        } else {
            1 << 16
        };
        for fd in u64::from(first)..last {
            libc::fcntl(fd as i32, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// A connection that, once closed, is reset rather than shut down (`SO_LINGER` of 0): the
/// peer gets an RST and this side keeps no TIME_WAIT.
pub fn reset_on_close(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on a socket the caller owns, with a value of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// A descriptor made close-on-exec (after an accept that could not ask for it).
pub fn set_close_on_exec(fd: std::os::fd::RawFd) {
    // SAFETY: fcntl(2) on a descriptor the caller owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}
