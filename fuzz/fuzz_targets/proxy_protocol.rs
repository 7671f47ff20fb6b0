//! The PROXY protocol header: nothing panics; fed in arbitrary pieces it is decided exactly as
//! fed at once (a header read differently depending on how the bytes arrive would let a client
//! choose its address); a header's decision depends on its own bytes only, not on what
//! follows it; and a whole header never claims more bytes than were read.
#![no_main]

use gateway::{
    config::ProxyVersion,
    http::proxy_protocol::{Parsed, parse},
};
use libfuzzer_sys::fuzz_target;

/// The decision on `input` fed in pieces ending at `cuts` (then the rest), as `read_header`
/// reads: the first decision that is not `Incomplete` stands.
fn decide(input: &[u8], cuts: &[usize], accept: ProxyVersion) -> Parsed {
    for &at in cuts.iter().chain(std::iter::once(&input.len())) {
        let got = parse(&input[..at.min(input.len())], accept);
        if got != Parsed::Incomplete {
            return got;
        }
    }
    Parsed::Incomplete
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let accept = match n % 3 {
        0 => ProxyVersion::Any,
        1 => ProxyVersion::V1,
        _ => ProxyVersion::V2,
    };
    let pieces = usize::from(n / 3 % 16) + 1;
    let mut cuts: Vec<usize> = (1..pieces).map(|i| i * rest.len() / pieces).collect();
    cuts.dedup();
    let whole = parse(rest, accept);
    assert_eq!(
        decide(rest, &cuts, accept),
        whole,
        "the same bytes, however they arrive"
    );
    if let Parsed::Header { len, .. } = whole {
        assert!(len > 0 && len <= rest.len(), "{len} of {}", rest.len());
        assert_eq!(
            parse(&rest[..len], accept),
            whole,
            "what follows changed it"
        );
    }
});
