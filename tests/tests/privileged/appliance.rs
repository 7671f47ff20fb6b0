//! Operating the gateway as a host service: what protects an operator from their own mistakes.

use std::{process::Command, time::Duration};

use integration_tests::{
    daemon::{Daemon, gateway_bin},
    peers::{demo_upstream, free_port},
    unique,
};

fn config(instance: &str, port: u16, admin: u16, up_port: u16) -> String {
    format!(
        r#"
[gateway]
instance = "{instance}"
workers = 2
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
[[upstreams]]
name = "demo"
url = "http://127.0.0.1:{up_port}/mcp"
[[routes]]
path = "/mcp"
upstream = "demo"
"#
    )
}

/// A second gateway started by mistake on a live listener address is refused at start, with
/// the address and the holder named; without the check `SO_REUSEPORT` let it join the first
/// one's group and take a share of the connections under its own policy.
#[test]
fn a_second_gateway_on_a_live_port_is_refused_naming_the_holder() {
    let up_port = free_port();
    let _up = demo_upstream(up_port);
    let port = free_port();
    let first = unique("gwfirst");
    let d = Daemon::start_local(&first, &config(&first, port, free_port(), up_port));

    let second = unique("gwsecond");
    let path = std::env::temp_dir().join(format!("{second}.toml"));
    std::fs::write(&path, config(&second, port, free_port(), up_port)).expect("write config");
    let mut child = Command::new(gateway_bin())
        .args(["run", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the second gateway");
    // Bounded wait: it must exit on its own, at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = std::fs::remove_file(&path);
            panic!("the second gateway kept running on a port the first one serves");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    let _ = std::fs::remove_file(&path);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!status.success(), "the second gateway must fail: {text}");
    assert!(
        text.contains(&format!("127.0.0.1:{port} is already in use")),
        "the error names the address: {text}"
    );
    assert!(
        text.contains(&format!("pid {}", d.pid())),
        "the error names the holder: {text}"
    );
    // The first one still serves.
    assert!(d.log().contains("data plane running"));
}

/// The soft open-file limit a service starts with (1,024 is common) is raised to the hard
/// limit at start, and the figure in force is exported.
#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit_and_exported() {
    let up_port = free_port();
    let _up = demo_upstream(up_port);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwnofile");
    let d = Daemon::start_local_with_open_files(
        &instance,
        &config(&instance, port, admin, up_port),
        (256, 4096),
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        (fields[3], fields[4]),
        ("4096", "4096"),
        "soft raised to hard: {line}"
    );
    let req = "GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n";
    let (r, _) = integration_tests::peers::raw(admin, req.as_bytes());
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.lines()
            .any(|l| l == "mcp_gateway_open_files_limit 4096"),
        "{text}"
    );
}
