//! The request head: fed in arbitrary pieces it is decided exactly as fed at once (same request,
//! same framing, or an error either way), and nothing panics. A head read differently depending
//! on how the bytes arrive is a smuggling gap.
#![no_main]

use gateway::http::{FieldName, HeadEnd, Limits, Noted, parse_head};
use libfuzzer_sys::fuzz_target;

fn limits() -> Limits {
    Limits {
        max_head: 2048,
        max_body: 1 << 20,
        ..Limits::default()
    }
}

/// What the head says, fed `input` in pieces ending at `cuts` (then the rest).
fn decide(input: &[u8], cuts: &[usize]) -> Option<Result<String, String>> {
    let mut end = HeadEnd::default();
    let limits = limits();
    for &at in cuts.iter().chain(std::iter::once(&input.len())) {
        let at = at.min(input.len());
        match parse_head(&input[..at], &mut end, &limits) {
            Ok(None) => {}
            Ok(Some((len, req, kind))) => {
                // A noted name's fields are those a scan of the head finds.
                for n in Noted::all() {
                    let text = n.text();
                    assert_eq!(req.headers.get(n), req.headers.get(text), "{text}");
                    assert!(req.headers.all(n).eq(req.headers.all(text)), "{text}");
                    assert_eq!(req.headers.repeated(n), req.headers.all(text).count() > 1);
                    assert_eq!(
                        req.headers.get_str(n),
                        req.headers.get(text).and_then(|v| std::str::from_utf8(v).ok())
                    );
                }
                return Some(Ok(format!(
                    "{len} {} {} 1.{} keep={} {:?} {:?}",
                    req.method, req.target, req.minor, req.keep_alive, req.headers, kind
                )));
            }
            Err(e) => return Some(Err(e.to_string())),
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let pieces = usize::from(n % 16) + 1;
    let mut cuts: Vec<usize> = (1..pieces).map(|i| i * rest.len() / pieces).collect();
    cuts.dedup();
    let whole = decide(rest, &[]);
    let trickled = decide(rest, &cuts);
    match (&whole, &trickled) {
        (Some(Ok(a)), Some(Ok(b))) => assert_eq!(a, b, "the same head, however it arrives"),
        (Some(Ok(a)), other) => panic!("at once {a}, in pieces {other:?}"),
        (other, Some(Ok(b))) => panic!("at once {other:?}, in pieces {b}"),
        _ => {}
    }
});
