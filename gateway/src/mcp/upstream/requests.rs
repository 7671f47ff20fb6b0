//! What the upstream side reads of a request it forwards (as the gateway wrote it): whether a
//! failure answering it counts against a replica's health, and its `Mcp-Session-Id`, which a
//! replicated upstream's own id replaces.

/// Whether a failure answering `request` (a timeout, a close, a bad answer, a 502–504) counts
/// against the replica's health. Not for a request whose content the client chose (a
/// `tools/call`, a `resources/read`, a batch, anything not known): a slow or crashing tool is
/// the tool's fault, and a client could otherwise eject healthy replicas for everybody by
/// calling one. A replica that cannot even initialize, answer a ping or list, or open a
/// stream is failing. (Not connecting at all always counts.) The method is read as the
/// gateway's own parser read it: a body with the key twice is nobody's. Those requests are
/// small; a larger body is not read again.
pub fn says_of_replica(request: &crate::http::Outgoing) -> bool {
    if !request.head.starts_with(b"POST ") {
        return true;
    }
    if request.body.len() > 16 * 1024 {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Method<'a> {
        method: Option<&'a str>,
    }
    match serde_json::from_slice::<Method<'_>>(&request.body) {
        Ok(Method { method: Some(m) }) => {
            matches!(
                m,
                "initialize"
                    | "ping"
                    | "server/discover"
                    | "tools/list"
                    | "resources/list"
                    | "resources/templates/list"
                    | "prompts/list"
            ) || m.starts_with("notifications/")
        }
        _ => false,
    }
}

/// Where a request head (as the gateway wrote it) ends: its blank line.
fn head_end(request: &[u8]) -> Option<usize> {
    request.windows(4).position(|w| w == b"\r\n\r\n")
}

/// The `Mcp-Session-Id` of a request head as the gateway wrote it.
pub fn session_of(request: &[u8]) -> Option<&[u8]> {
    session_span(request).map(|r| &request[r])
}

/// Sets the value of the request's `Mcp-Session-Id` (which it has).
pub fn set_session(request: &mut Vec<u8>, value: &[u8]) {
    if let Some(r) = session_span(request) {
        request.splice(r, value.iter().copied());
    }
}

/// Where the value of the `Mcp-Session-Id` line of a request's head is.
fn session_span(request: &[u8]) -> Option<std::ops::Range<usize>> {
    const NAME: &[u8] = b"mcp-session-id:";
    let end = head_end(request)?;
    let mut at = 0;
    for line in request[..end].split(|b| *b == b'\n') {
        let start = at;
        at += line.len() + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if start == 0
            || !line
                .get(..NAME.len())
                .is_some_and(|h| h.eq_ignore_ascii_case(NAME))
        {
            continue;
        }
        let value = &line[NAME.len()..];
        let lead = value.len() - value.trim_ascii_start().len();
        let trimmed = value.trim_ascii();
        let from = start + NAME.len() + lead;
        return Some(from..from + trimmed.len());
    }
    None
}

#[cfg(test)]
#[path = "requests_tests.rs"]
mod tests;
