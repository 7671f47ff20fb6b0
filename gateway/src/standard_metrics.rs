//! The metrics every Prometheus target is expected to have, and the gateway's own state an
//! operator alerts on: `process_*` (read from `/proc/self`), `mcp_gateway_build_info`, the XDP
//! attach mode per interface and the expiry of each listener certificate. Rendered by the
//! control thread on a scrape; never called from the request path.

use std::{fmt::Write as _, time::SystemTime};

use crate::config::Config;

/// The commit the binary was built from (`build.rs`; "unknown" outside a git checkout).
pub const COMMIT: &str = env!("GATEWAY_GIT_COMMIT");

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What `/proc/self` says about this process (none of it on a non-Linux system).
#[derive(Debug, Default, PartialEq)]
pub struct Process {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub threads: u64,
}

/// Parses `/proc/self/stat` (fields after the command name, which may hold spaces and
/// parentheses, so the split is at its last `)`), with the clock tick, page size and boot time.
fn parse_stat(stat: &str, tick: f64, page: u64, boot_time: f64) -> Option<Process> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name: index i here is field i + 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    Some(Process {
        cpu_seconds: (num(14)? + num(15)?) as f64 / tick,
        threads: num(20)?,
        start_time_seconds: boot_time + num(22)? as f64 / tick,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)? * page,
        ..Process::default()
    })
}

fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// This process, now.
pub fn process() -> Option<Process> {
    // SAFETY: sysconf only reads a system constant.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let mut p = parse_stat(
        &stat,
        tick.max(1) as f64,
        u64::try_from(page).unwrap_or(4096),
        boot_time()?,
    )?;
    p.open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } == 0 {
        p.max_fds = limit.rlim_cur;
    }
    Some(p)
}

/// `process_*` in the names and units of the Prometheus client libraries.
pub fn render_process(out: &mut String) {
    let Some(p) = process() else { return };
    for (name, kind, help, value) in [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            p.cpu_seconds.to_string(),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.resident_bytes.to_string(),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            p.virtual_bytes.to_string(),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            format!("{:.2}", p.start_time_seconds),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            p.open_fds.to_string(),
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            p.max_fds.to_string(),
        ),
        (
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            p.threads.to_string(),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

/// `mcp_gateway_build_info{version,commit} 1`.
pub fn render_build_info(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_build_info The gateway's version and the commit it was built from (always 1).\n# TYPE mcp_gateway_build_info gauge\nmcp_gateway_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        label(COMMIT)
    );
}

/// `mcp_gateway_xdp_attached{interface,mode} 1` per interface the program is attached to now,
/// and how many attachments were made again since start.
pub fn render_xdp(out: &mut String, attached: &[(String, &'static str)], reattached: u64) {
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_xdp_reattached_total XDP attachments made again after the program was found missing from its interface (the interface deleted and made again, or the link's pin removed).\n# TYPE mcp_gateway_xdp_reattached_total counter\nmcp_gateway_xdp_reattached_total {reattached}"
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_xdp_attached XDP program attachments in place (checked every second): 1 per interface, labelled with the mode in force (native or generic). An interface of `kernel.interfaces` missing here has no program now (`/readyz` says which).\n# TYPE mcp_gateway_xdp_attached gauge"
    );
    for (interface, mode) in attached {
        let _ = writeln!(
            out,
            "mcp_gateway_xdp_attached{{interface=\"{}\",mode=\"{mode}\"}} 1",
            label(interface)
        );
    }
}

/// The leaf certificate's `notAfter` (unix seconds) of a PEM file.
pub fn not_after(path: &std::path::Path) -> Option<i64> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let leaf = CertificateDer::pem_file_iter(path).ok()?.next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// `mcp_gateway_tls_certificate_expiry_timestamp_seconds{listener,certificate}`: when each
/// configured listener certificate (and the admin's) stops being valid, read from its file
/// (the reload watcher loads a changed file, so the file is what is served).
pub fn render_certificates(out: &mut String, config: &Config) {
    let listeners = config
        .listeners
        .iter()
        .map(|l| (l.address.to_string(), l.tls.as_ref()))
        .chain(std::iter::once((
            format!("admin {}", config.admin),
            config.admin_tls.as_ref(),
        )));
    let mut lines = String::new();
    for (listener, tls) in listeners {
        for files in tls.into_iter().flat_map(|t| &t.certificates) {
            if let Some(t) = not_after(&files.cert) {
                let _ = writeln!(
                    lines,
                    "mcp_gateway_tls_certificate_expiry_timestamp_seconds{{listener=\"{}\",certificate=\"{}\"}} {t}",
                    label(&listener),
                    label(&files.cert.display().to_string())
                );
            }
        }
    }
    if lines.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_tls_certificate_expiry_timestamp_seconds When each listener certificate expires (notAfter, unix seconds); alert on it minus time().\n# TYPE mcp_gateway_tls_certificate_expiry_timestamp_seconds gauge"
    );
    out.push_str(&lines);
}

/// Seconds since the epoch, now.
pub fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_is_read_past_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (gw (x) y) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0";
        let p = parse_stat(stat, 100.0, 4096, 1_700_000_000.0).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.threads, 7);
        assert_eq!(p.start_time_seconds, 1_700_000_010.0);
        assert_eq!(p.virtual_bytes, 123_456_789);
        assert_eq!(p.resident_bytes, 300 * 4096);
    }

    #[test]
    fn this_process_is_measured() {
        let p = process().unwrap();
        assert!(p.open_fds >= 3 && p.max_fds >= p.open_fds, "{p:?}");
        assert!(p.resident_bytes > 0 && p.threads >= 1, "{p:?}");
        let age = now_seconds() - p.start_time_seconds;
        assert!((0.0..3600.0).contains(&age), "{p:?}");
        let mut out = String::new();
        render_build_info(&mut out);
        assert!(out.contains("mcp_gateway_build_info{version=\""), "{out}");
    }
}
