use super::*;

const BASE: &str = r#"
[gateway]
instance = "t"

[admin]
address = "127.0.0.1:19090"

[[listeners]]
address = "127.0.0.1:8080"

[kernel]
enabled = false
default_tenant = "acme"

[[upstreams]]
name = "a"
url = "http://127.0.0.1:9001/mcp"

[[upstreams]]
name = "b"
url = "http://127.0.0.1:9002/mcp"

[[routes]]
path = "/mcp"
upstream = "a"

[[routes]]
path = "/b"
upstream = "b"

[[tenants]]
name = "acme"
id = 1
sources = ["10.0.0.0/8"]
"#;

fn config(text: &str) -> Config {
    Config::from_toml(text).unwrap()
}

#[test]
fn the_same_configuration_is_no_change() {
    let d = ConfigDiff::new(&config(BASE), &config(BASE));
    assert!(d.is_empty());
    assert_eq!(d.to_string(), "no change");
}

#[test]
fn added_removed_and_changed_are_named() {
    let new = BASE
        .replace("http://127.0.0.1:9002/mcp", "http://127.0.0.1:9003/mcp")
        .replace("path = \"/b\"", "path = \"/c\"")
        .replace("name = \"acme\"", "name = \"globex\"")
        .replace("default_tenant = \"acme\"", "default_tenant = \"globex\"")
        + "\n[policy]\nrequests_per_sec = 100\nburst = 100\n";
    let d = ConfigDiff::new(&config(BASE), &config(&new));
    assert_eq!(d.routes.added, ["/c"]);
    assert_eq!(d.routes.removed, ["/b"]);
    assert_eq!(d.upstreams.changed, ["b"]);
    assert_eq!(d.tenants.added, ["globex"]);
    assert_eq!(d.tenants.removed, ["acme"]);
    assert_eq!(d.sections, ["policy"]);
    assert_eq!(
        d.to_string(),
        "routes +/c -/b; upstreams ~b; tenants +globex -acme; changed policy"
    );
}

#[test]
fn log_paths_are_checked_without_creating_anything() {
    let dir = std::env::temp_dir().join(format!("gw-logcheck-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let audit = dir.join("audit.jsonl");
    let text = format!("{BASE}\n[audit]\npath = \"{}\"\n", audit.display());
    let e = Config::from_toml(&text).unwrap_err().to_string();
    assert!(
        e.contains("audit.path") && e.contains("does not exist"),
        "{e}"
    );
    std::fs::create_dir(&dir).unwrap();
    Config::from_toml(&text).unwrap();
    assert!(!audit.exists(), "validation created the audit log");
    let hist = format!(
        "{BASE}\n[telemetry]\nhistogram_log = \"{}/no/such/dir/h.hlog\"\n",
        dir.display()
    );
    let e = Config::from_toml(&hist).unwrap_err().to_string();
    assert!(e.contains("telemetry.histogram_log"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
