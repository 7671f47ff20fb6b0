//! Federation's rewrites of what members send: tagging ids round-trips, and rewriting a
//! member's SSE events never panics, whatever the member sent. An upstream's events without
//! the responses a stream does not answer: never a panic, nothing dropped when nothing is
//! judged, and what is kept is kept again.
#![no_main]

use gateway::mcp::messages::{Answers, rewrite_events, tag, untag, without_strays};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let one = Answers::to(Some(&json!(1)));
    for answers in [Answers::Nothing, one, Answers::Any] {
        let _ = rewrite_events("u0", data, answers);
    }
    assert_eq!(without_strays(data.to_vec(), Answers::Any), data);
    for answers in [Answers::Nothing, one] {
        let kept = without_strays(data.to_vec(), answers);
        assert_eq!(without_strays(kept.clone(), answers), kept, "kept again");
    }
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
