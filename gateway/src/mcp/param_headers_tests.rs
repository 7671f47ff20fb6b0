use serde_json::json;

use super::*;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "count": {"type": "integer", "x-mcp-header": "Count"},
            "dry": {"type": "boolean", "x-mcp-header": "Dry-Run"},
            "target": {"type": "object", "properties": {
                "host": {"type": "string", "x-mcp-header": "Host"}
            }},
            "query": {"type": "string"}
        }
    })
}

fn declared() -> Declared {
    declarations(&schema())
}

#[test]
fn declarations_follow_properties_alone() {
    let mut d = declared().unwrap();
    d.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<(&str, String)> = d
        .iter()
        .map(|d| (d.name.as_str(), d.path.join(".")))
        .collect();
    assert_eq!(
        names,
        [
            ("Count", "count".to_owned()),
            ("Dry-Run", "dry".to_owned()),
            ("Host", "target.host".to_owned()),
            ("Region", "region".to_owned())
        ]
    );
    assert_eq!(declarations(&json!({"type": "object"})), Ok(vec![]));
    assert_eq!(declarations(&Value::Null), Ok(vec![]));
    // Instance data is not a schema: an annotation-looking default counts for nothing.
    assert_eq!(
        declarations(
            &json!({"properties": {"a": {"type": "string", "default": {"x-mcp-header": "A"}}}})
        ),
        Ok(vec![])
    );
    for (bad, why) in [
        (
            json!({"x-mcp-header": "Root", "type": "string"}),
            "on the root",
        ),
        (
            json!({"properties": {"a": {"type": "array", "items": {"type": "string", "x-mcp-header": "A"}}}}),
            "under items",
        ),
        (
            json!({"anyOf": [{"properties": {"a": {"type": "string", "x-mcp-header": "A"}}}]}),
            "under anyOf",
        ),
        (
            json!({"$defs": {"a": {"type": "string", "x-mcp-header": "A"}}}),
            "under $defs",
        ),
        (
            json!({"properties": {"a": {"type": "string", "x-mcp-header": "A B"}}}),
            "not a token",
        ),
        (
            json!({"properties": {"a": {"type": "string", "x-mcp-header": ""}}}),
            "empty",
        ),
        (
            json!({"properties": {"a": {"type": "string", "x-mcp-header": 7}}}),
            "not a string",
        ),
        (
            json!({"properties": {"a": {"type": "object", "x-mcp-header": "A"}}}),
            "an object",
        ),
        (
            json!({"properties": {"a": {"x-mcp-header": "A"}}}),
            "no type",
        ),
        (
            json!({"properties": {"a": {"type": "string", "x-mcp-header": "A"}, "b": {"type": "string", "x-mcp-header": "a"}}}),
            "twice, ignoring case",
        ),
    ] {
        assert!(declarations(&bad).is_err(), "{why}: {bad}");
    }
}

#[test]
fn headers_and_arguments_agree_or_the_call_is_refused() {
    let d = declared();
    let args = json!({"region": "eu-west", "count": 42, "dry": true, "target": {"host": "héllo"}, "query": "x"});
    let all = [
        ("Region", "eu-west"),
        ("count", "42"),
        ("DRY-RUN", "true"),
        ("Host", "=?base64?aMOpbGxv?="),
    ];
    assert_eq!(check("t", &all, Some(&d), Some(&args)), Ok(()));
    // Numbers by value, written plainly.
    let mut h = all.to_vec();
    h[1] = ("Count", "42.0");
    assert_eq!(check("t", &h, Some(&d), Some(&args)), Ok(()));
    let float =
        json!({"region": "eu-west", "count": 42.0, "dry": true, "target": {"host": "héllo"}});
    assert_eq!(check("t", &all, Some(&d), Some(&float)), Ok(()));
    for (i, value, why) in [
        (0, "us-east", "another value"),
        (0, "eu-west\u{a0}", "another value by a no-break space"),
        (0, "EU-WEST", "case"),
        (1, "4.2e1", "a number not written plainly"),
        (1, "42.5", "another number"),
        (1, "+42", "a sign JSON does not write"),
        (2, "True", "a boolean's case"),
        (2, "1", "a boolean as a number"),
        (3, "héllo-not", "another host"),
        (3, "=?base64?aMOpbGxv", "an unterminated base64 form"),
        (3, "=?base64?aMOpbGxv=?=", "a malformed base64 form"),
    ] {
        let mut h = all.to_vec();
        h[i].1 = value;
        let err = check("t", &h, Some(&d), Some(&args)).unwrap_err();
        assert!(
            err.contains(&format!(
                "Mcp-Param-{}",
                ["Region", "Count", "Dry-Run", "Host"][i]
            )),
            "{why}: {err}"
        );
    }
    // A header without its argument, an argument without its header (null is absent).
    let mut h = all.to_vec();
    h.remove(0);
    assert!(
        check("t", &h, Some(&d), Some(&args))
            .unwrap_err()
            .contains("missing")
    );
    let no_region = json!({"region": null, "count": 42, "dry": true, "target": {"host": "héllo"}});
    assert!(
        check("t", &all, Some(&d), Some(&no_region))
            .unwrap_err()
            .contains("present but")
    );
    assert_eq!(check("t", &h, Some(&d), Some(&no_region)), Ok(()));
    // A value of another kind than the header can carry never agrees.
    let object = json!({"region": {"a": 1}, "count": 42, "dry": true, "target": {"host": "héllo"}});
    assert!(check("t", &all, Some(&d), Some(&object)).is_err());
    // A header the tool does not declare.
    let mut h = all.to_vec();
    h.push(("Query", "x"));
    assert!(
        check("t", &h, Some(&d), Some(&args))
            .unwrap_err()
            .contains("not declared")
    );
}

#[test]
fn a_tool_not_listed_or_invalid_takes_no_header() {
    let args = json!({"region": "eu"});
    assert_eq!(check("t", &[], None, Some(&args)), Ok(()));
    assert!(
        check("t", &[("Region", "eu")], None, Some(&args))
            .unwrap_err()
            .contains("has not been listed")
    );
    let invalid: Declared = Err("twice".into());
    assert_eq!(check("t", &[], Some(&invalid), Some(&args)), Ok(()));
    assert!(
        check("t", &[("Region", "eu")], Some(&invalid), Some(&args))
            .unwrap_err()
            .contains("invalid")
    );
    // A tool that declares nothing takes none either; with no headers and no declarations,
    // nothing is asked of the arguments.
    let none: Declared = Ok(vec![]);
    assert_eq!(check("t", &[], Some(&none), None), Ok(()));
    assert!(check("t", &[("Region", "eu")], Some(&none), Some(&args)).is_err());
}

#[test]
fn declarations_are_kept_per_upstream_and_tool_and_replaced_when_they_change() {
    let store = Declarations::default();
    assert!(store.get("u", "t").is_none());
    store.observe("u", &json!({"name": "t", "inputSchema": schema()}));
    assert_eq!(store.get("u", "t").as_deref(), Some(&declared()));
    assert!(store.get("v", "t").is_none());
    store.observe(
        "u",
        &json!({"name": "t", "inputSchema": {"type": "object"}}),
    );
    assert_eq!(store.get("u", "t").as_deref(), Some(&Ok(vec![])));
}

#[test]
fn an_upstream_fills_only_its_own_share_of_the_store() {
    let store = Declarations::default();
    for i in 0..MAX_PER_UPSTREAM + 5 {
        store.observe(
            "noisy",
            &json!({"name": format!("t{i}"), "inputSchema": {}}),
        );
    }
    assert!(store.get("noisy", "t0").is_some());
    assert!(
        store
            .get("noisy", &format!("t{}", MAX_PER_UPSTREAM))
            .is_none(),
        "past its share"
    );
    store.observe("quiet", &json!({"name": "t", "inputSchema": schema()}));
    assert!(
        store.get("quiet", "t").is_some(),
        "another upstream still learns"
    );
}

#[test]
fn an_upstream_holds_a_bounded_number_of_bytes_and_no_name_a_call_cannot_have() {
    // An upstream listed a new tool with a 15 MB name at each listing: each stayed for good
    // (an attacker's review).
    let store = Declarations::default();
    let long = "n".repeat(MAX_NAME_CHARS + 1);
    store.observe("evil", &json!({"name": long, "inputSchema": schema()}));
    assert!(
        store.get("evil", &long).is_none(),
        "never callable: not kept"
    );
    assert_eq!(store.held("evil"), (0, 0));
    // Declarations as large as a listing may carry: the upstream's bytes stay within its share,
    // whether tools are added or one is replaced with larger ones.
    let big_schema = |i: usize| {
        let properties: serde_json::Map<String, Value> = (0..200)
            .map(|p| {
                (
                    format!("{}{p}-{i}", "p".repeat(1000)),
                    json!({"type": "string", "x-mcp-header": format!("H{p}")}),
                )
            })
            .collect();
        json!({"type": "object", "properties": properties})
    };
    for i in 0..100 {
        store.observe(
            "evil",
            &json!({"name": format!("t{i}"), "inputSchema": big_schema(i)}),
        );
        store.observe(
            "evil",
            &json!({"name": "same", "inputSchema": big_schema(i)}),
        );
    }
    let (tools, bytes) = store.held("evil");
    assert!(bytes <= MAX_BYTES_PER_UPSTREAM, "{bytes}");
    assert!(tools > 5 && tools < 100, "{tools}");
    store.observe("quiet", &json!({"name": "t", "inputSchema": schema()}));
    assert!(
        store.get("quiet", "t").is_some(),
        "another upstream still learns"
    );
}

#[test]
fn a_name_unsafe_in_a_head_goes_base64() {
    assert_eq!(header_text("echo"), "echo");
    assert_eq!(header_text("a b"), "=?base64?YSBi?=");
    assert_eq!(header_text("x\r\ny"), "=?base64?eA0KeQ==?=");
    assert_eq!(
        header_text("=?base64?eA==?="),
        "=?base64?PT9iYXNlNjQ/ZUE9PT89?="
    );
}

/// The fields a bridged call carries are the declared arguments present, as a client writes
/// them, and they pass the gateway's own check of a 2026-07-28 call.
#[test]
fn the_fields_written_for_a_call_pass_its_check() {
    let schema = json!({"type": "object", "properties": {
        "region": {"type": "string", "x-mcp-header": "Region"},
        "dry_run": {"type": "boolean", "x-mcp-header": "Dry-Run"},
        "count": {"type": "integer", "x-mcp-header": "Count"},
        "note": {"type": "string"}}});
    let declared = declarations(&schema);
    let d = declared.as_ref().unwrap();
    for args in [
        json!({"region": "eu west", "dry_run": true, "count": 3, "note": "x"}),
        json!({"region": "eu"}),
        json!({}),
    ] {
        let fields = fields(d, Some(&args));
        let headers: Vec<(&str, &str)> = fields
            .iter()
            .map(|(n, v)| (name_part(n).unwrap(), v.as_str()))
            .collect();
        assert_eq!(
            check("deploy", &headers, Some(&declared), Some(&args)),
            Ok(()),
            "{args} {fields:?}"
        );
    }
}
