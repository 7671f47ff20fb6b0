//! Writing message heads. Every field the gateway writes into a head it sends, to an upstream or
//! to a client, goes through [`push_field`], and every request line through [`push_request_line`].
//! A control character in a value (CR, LF, NUL, any other but HTAB) would end the field or the
//! whole head early and let whoever chose the value add fields or a second message of their own
//! (request smuggling on a pooled upstream connection, response splitting towards a client).
//! Such a value is refused, never trimmed or escaped: the message it belongs to is not sent, and
//! the request that asked for it is answered with an error.

/// A field that cannot be written: its name is not a token or its value holds a control
/// character.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the `{name}` header would carry a control character or is not a valid field")]
pub struct UnsafeField {
    pub name: String,
}

/// Whether `value` may be a field value (RFC 9110 §5.5): visible ASCII, SP, HTAB and obs-text;
/// no other control character.
pub fn is_clean_value(value: &[u8]) -> bool {
    // Without an early exit, so that the loop is vectorized: every field value of every message
    // goes through here twice (checked, then written out).
    !value.iter().fold(false, |bad, &b| {
        bad | (b != b'\t' && (b < 0x20 || b == 0x7f))
    })
}

/// Whether `name` is a field name (RFC 9110 §5.1: a token). Asked of every field twice a
/// request (checked, then written out): a table, not a chain of comparisons.
pub fn is_token(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| TOKEN[usize::from(b)])
}

/// The bytes of a token: letters, digits and ``!#$%&'*+-.^_`|~``.
const TOKEN: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        i += 1;
    }
    table
};

/// Appends `name: value\r\n` to `out`, or refuses (leaving `out` as it was).
pub fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) -> Result<(), UnsafeField> {
    if !is_token(name.as_bytes()) || !is_clean_value(value) {
        return Err(UnsafeField {
            name: name.to_owned(),
        });
    }
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Appends `HTTP/1.1 <status> <reason>\r\n` to `out`.
pub fn push_status_line(out: &mut Vec<u8>, status: u16) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(super::reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `content-length: <n>\r\n` to `out` (written into every head: without the
/// formatting machinery).
pub fn push_content_length(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `METHOD target HTTP/1.1\r\n` to `out`: the method a token, the target visible
/// characters only (no space, no control character).
pub fn push_request_line(out: &mut Vec<u8>, method: &str, target: &str) -> Result<(), UnsafeField> {
    let target_ok =
        !target.is_empty() && is_clean_value(target.as_bytes()) && !target.contains([' ', '\t']);
    if !is_token(method.as_bytes()) || !target_ok {
        return Err(UnsafeField {
            name: "request line".to_owned(),
        });
    }
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_token;

    /// The table says what RFC 9110 §5.6.2 says of every byte, and of names as a whole.
    #[test]
    fn token_bytes_are_the_rfcs() {
        const TCHAR: &[u8] =
            b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        for b in 0..=255u8 {
            assert_eq!(is_token(&[b]), TCHAR.contains(&b), "byte {b:#04x}");
        }
        assert!(is_token(b"Mcp-Session-Id"));
        assert!(!is_token(b""));
        assert!(!is_token(b"x a"));
        assert!(!is_token(b"x:"));
        assert!(!is_token("caf\u{e9}".as_bytes()));
    }
}
