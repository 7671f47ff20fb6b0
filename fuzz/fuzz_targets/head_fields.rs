//! Every field the gateway writes goes through `push_field` / `push_request_line`: whatever
//! names and values they accept, the head they build is one message with exactly those fields
//! to a strict parser: no control character gets out, no field or message can be added.
#![no_main]

use gateway::http::{push_field, push_request_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Parts separated by 0xff: target, then name/value pairs.
    let mut parts = data.split(|b| *b == 0xff);
    let target = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let mut head = Vec::new();
    if push_request_line(&mut head, "POST", &target).is_err() {
        return;
    }
    let mut written = Vec::new();
    while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let before = head.len();
        match push_field(&mut head, &name, value) {
            Ok(()) => written.push((name, value.to_vec())),
            Err(_) => assert_eq!(head.len(), before, "a refused field writes nothing"),
        }
    }
    head.extend_from_slice(b"\r\n");
    for w in head.windows(2) {
        assert!(w[0] != b'\r' || w[1] == b'\n', "a lone CR");
    }
    assert_eq!(
        head.iter().filter(|b| **b == b'\n').count(),
        written.len() + 2,
        "one line per field, no more"
    );
    let mut fields = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut fields);
    if let Ok(httparse::Status::Complete(n)) = req.parse(&head) {
        assert_eq!(n, head.len(), "one message");
        assert_eq!(req.path, Some(target.as_str()));
        assert_eq!(req.headers.len(), written.len());
        for (h, (name, _)) in req.headers.iter().zip(&written) {
            assert_eq!(h.name, name);
        }
    }
});
