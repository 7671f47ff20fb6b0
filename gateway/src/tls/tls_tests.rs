use super::*;

#[test]
fn wildcards_cover_one_label() {
    assert!(SniResolver::covers("a.test", "a.test"));
    assert!(!SniResolver::covers("a.test", "b.a.test"));
    assert!(SniResolver::covers("*.a.test", "b.a.test"));
    assert!(!SniResolver::covers("*.a.test", "c.b.a.test"));
    assert!(!SniResolver::covers("*.a.test", "a.test"));
    assert!(!SniResolver::covers("*.a.test", ".a.test"));
}

fn config(tls: &str) -> Result<Config, crate::config::ConfigError> {
    Config::from_toml(&format!(
        "[gateway]\ninstance = \"t\"\n[[listeners]]\naddress = \"127.0.0.1:2\"\n[listeners.tls]\n{tls}\n[admin]\naddress = \"127.0.0.1:1\"\n[kernel]\nenabled = false\n[http]\nrequest_timeout_ms = 1234\n"
    ))
}

#[test]
fn the_tls_section_is_checked_and_defaults_to_the_request_timeout() {
    let c = config("certificates = [{ cert = \"c.pem\", key = \"k.pem\" }]").unwrap();
    let tls = c.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.handshake_timeout, Duration::from_millis(1234));
    assert_eq!(tls.unknown_sni, UnknownSni::Refuse);
    for (bad, key) in [
        ("certificates = []", "listeners[0].tls.certificates"),
        (
            "certificates = [{ cert = \"c\", key = \"k\" }]\nclient_auth = \"optional\"",
            "listeners[0].tls.client_auth",
        ),
        (
            "certificates = [{ cert = \"c\", key = \"k\" }]\nhandshake_timeout_ms = 0",
            "listeners[0].tls.handshake_timeout_ms",
        ),
    ] {
        let e = config(bad).unwrap_err().to_string();
        assert!(e.contains(key), "{bad}: {e}");
    }
}

#[test]
fn files_that_do_not_load_are_refused_naming_the_key_and_file() {
    let dir = std::env::temp_dir().join(format!("tls-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not PEM").unwrap();
    let c = config(&format!(
        "certificates = [{{ cert = \"{0}\", key = \"{0}\" }}]",
        garbage.display()
    ))
    .unwrap();
    let edge = Edge::new(1);
    let e = edge.prepare(&c).err().unwrap();
    assert!(
        e.contains("listeners[0].tls.certificates[0]") && e.contains("garbage.pem"),
        "{e}"
    );
    let e = edge
        .prepare(&config("certificates = [{ cert = \"/nonexistent.pem\", key = \"k\" }]").unwrap())
        .err()
        .unwrap();
    assert!(e.contains("/nonexistent.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
