//! The chunked decoder fed in arbitrary pieces decodes exactly what it decodes fed at once, or
//! fails either way; it never panics.
#![no_main]

use gateway::http::ChunkedDecoder;
use libfuzzer_sys::fuzz_target;

/// Feeds `input` split at `cuts`, presenting unused bytes again with the next piece, as the
/// connection does.
fn decode(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool), ()> {
    let mut dec = ChunkedDecoder::default();
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&input.len())) {
        let end = end.clamp(start, input.len());
        pending.extend_from_slice(&input[start..end]);
        start = end;
        let (used, done) = dec.decode(&pending, &mut out).map_err(|_| ())?;
        assert!(used <= pending.len(), "used more than it was given");
        pending.drain(..used);
        if done {
            return Ok((out, true));
        }
    }
    Ok((out, false))
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    // The first byte picks where to cut the rest.
    let cuts: Vec<usize> = (1..=usize::from(n % 8))
        .map(|i| i * rest.len() / (usize::from(n % 8) + 1))
        .collect();
    let whole = decode(rest, &[]);
    let pieces = decode(rest, &cuts);
    match (&whole, &pieces) {
        (Ok((a, true)), Ok((b, true))) => assert_eq!(a, b, "same body, however it arrives"),
        (Ok((_, true)), other) => panic!("complete at once, but in pieces: {other:?}"),
        (Err(()), Ok((_, true))) => panic!("refused at once, accepted in pieces"),
        _ => {}
    }
});
