//! Federation's rewrites of what members send: tagging ids round-trips, and rewriting a
//! member's SSE events never panics, whatever the member sent.
#![no_main]

use gateway::mcp::messages::{rewrite_events, tag, untag};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let _ = rewrite_events("u0", data, None);
    let _ = rewrite_events("u0", data, Some(&json!(1)));
    if let Ok(text) = std::str::from_utf8(data) {
        for id in [json!(text), json!(text.len())] {
            let tagged = tag("u0", &id).expect("strings and numbers are tagged");
            let Value::String(tagged) = tagged else {
                panic!("a tag is a string")
            };
            assert_eq!(untag(&tagged), Some(("u0", id)), "untag(tag(id)) == id");
        }
        let _ = untag(text);
    }
});
