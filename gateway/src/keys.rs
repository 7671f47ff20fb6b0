//! How other parsers read a JSON object's key: the one folding of key characters that the
//! request parse ([`crate::mcp::jsonrpc`]), the answers' checks and argument rules
//! ([`crate::policy`]) all compare keys by, so that what one refuses as two names for one
//! field, the others read as one too.

/// A character as Go's `encoding/json` matches an object's key to a struct's field (simple
/// case folding): an ASCII letter by its upper case, any other character by its case mappings,
/// which make `\u{17f}` (long s) an `S` and the Kelvin sign a `K`; a character whose case maps
/// to several (`ß`) is itself. Dotless and dotted i are made an `I` too, which Go does not do:
/// refusing a little more than Go reads is the safe side.
pub fn fold(c: char) -> char {
    fn single(mut it: impl Iterator<Item = char>) -> Option<char> {
        let c = it.next()?;
        it.next().is_none().then_some(c)
    }
    if c.is_ascii() {
        return c.to_ascii_uppercase();
    }
    match c {
        '\u{17f}' => 'S',
        '\u{212a}' => 'K',
        '\u{130}' | '\u{131}' => 'I',
        _ => {
            let lower = single(c.to_lowercase()).unwrap_or(c);
            single(lower.to_uppercase()).unwrap_or(lower)
        }
    }
}

/// `key` folded by [`fold`].
pub fn folded(key: &str) -> String {
    key.chars().map(fold).collect()
}

/// Whether Go's `encoding/json` reads the keys `a` and `b` as one field of a struct (mcp-go
/// decodes every message into structs so, and a Go SDK before 1.3.1 did): a message that holds
/// both has two meanings, and one that holds `b` where the gateway reads `a` has another
/// meaning there than here.
pub fn go_same_key(a: &str, b: &str) -> bool {
    if a.len() == b.len() && a.eq_ignore_ascii_case(b) {
        return true;
    }
    if a.is_ascii() && b.is_ascii() {
        return false;
    }
    a.chars().map(fold).eq(b.chars().map(fold))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_go_reads_as_one_fold_alike() {
        for (a, b) in [
            ("name", "NAME"),
            ("params", "param\u{17f}"),
            ("task", "tas\u{212a}"),
            ("id", "\u{131}d"),
            ("id", "\u{130}D"),
        ] {
            assert!(go_same_key(a, b), "{a} {b}");
            assert_eq!(folded(a), folded(b), "{a} {b}");
        }
        for (a, b) in [("name", "names"), ("ss", "\u{df}"), ("id", "i d")] {
            assert!(!go_same_key(a, b), "{a} {b}");
        }
    }
}
