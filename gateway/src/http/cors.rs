//! The gateway's own CORS policy, for browser clients (the MCP Inspector, web agents). The
//! gateway is the origin a browser talks to: upstreams' `Access-Control-*` headers are never
//! relayed (`relayed::is_private`), and these are written instead. Only an `Origin`
//! in `http.allowed_origins` gets them (any other is refused with 403 before this), and the
//! origin echoed back is the configured string the request's matched, never `*`.
//! Every field goes through [`push_field`], so nothing here can break a head.

use std::time::Duration;

use super::{UnsafeField, push_field};

/// Request headers an MCP client sends, allowed in every preflight.
const MCP_REQUEST_HEADERS: &str = "accept, authorization, content-type, last-event-id, \
     mcp-method, mcp-name, mcp-protocol-version, mcp-session-id, traceparent, tracestate";
/// Response headers a browser client must be able to read.
const MCP_RESPONSE_HEADERS: &str =
    "mcp-session-id, mcp-protocol-version, www-authenticate, retry-after";

/// `[http.cors]`: what browsers are told beyond the MCP essentials.
#[derive(Debug, Clone, PartialEq)]
pub struct Cors {
    /// Extra request headers a page may send (e.g. an API key header).
    pub allow_headers: Vec<String>,
    /// Extra response headers a page may read.
    pub expose_headers: Vec<String>,
    /// How long a browser may cache a preflight's answer.
    pub max_age: Duration,
    /// `Access-Control-Allow-Credentials: true` (cookies and TLS client certificates).
    pub allow_credentials: bool,
}

impl Default for Cors {
    fn default() -> Self {
        Self {
            allow_headers: Vec::new(),
            expose_headers: Vec::new(),
            max_age: Duration::from_secs(600),
            allow_credentials: false,
        }
    }
}

impl Cors {
    /// The lines every answer to an allowed `origin` carries.
    pub fn response_lines(&self, origin: &str) -> Result<Vec<u8>, UnsafeField> {
        let mut out = Vec::with_capacity(160);
        push_field(&mut out, "access-control-allow-origin", origin.as_bytes())?;
        push_field(&mut out, "vary", b"origin")?;
        push_field(
            &mut out,
            "access-control-expose-headers",
            joined(MCP_RESPONSE_HEADERS, &self.expose_headers).as_bytes(),
        )?;
        if self.allow_credentials {
            push_field(&mut out, "access-control-allow-credentials", b"true")?;
        }
        Ok(out)
    }

    /// The answer to a preflight (`OPTIONS`) from an allowed origin, or with none. A preflight
    /// carries no credentials, so it is answered before identity; it tells nothing a page
    /// could not read from this policy.
    pub fn preflight(&self, origin: Option<&str>, keep_alive: bool) -> Vec<u8> {
        let lines = || -> Result<Vec<(&'static str, String)>, UnsafeField> {
            let mut h = vec![("allow", "GET, POST, DELETE, OPTIONS".to_owned())];
            if origin.is_some() {
                h.push(("access-control-allow-methods", "GET, POST, DELETE".into()));
                h.push((
                    "access-control-allow-headers",
                    joined(MCP_REQUEST_HEADERS, &self.allow_headers),
                ));
                h.push(("access-control-max-age", self.max_age.as_secs().to_string()));
            }
            Ok(h)
        };
        let extra = origin.map(|o| self.response_lines(o));
        let mut out = match lines() {
            Ok(h) => {
                let fields: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
                super::response(204, &fields, b"", keep_alive)
            }
            Err(_) => super::response(500, &[], b"", false),
        };
        if let Some(Ok(extra)) = extra {
            out = with_lines(out, &extra);
        }
        out
    }
}

fn joined(base: &str, extra: &[String]) -> String {
    let mut s = base.to_owned();
    for h in extra {
        s.push_str(", ");
        s.push_str(h);
    }
    s
}

/// `head` (a response head, possibly followed by its body) with `lines` added after its
/// status line.
pub fn with_lines(head: Vec<u8>, lines: &[u8]) -> Vec<u8> {
    let Some(end) = head.windows(2).position(|w| w == b"\r\n") else {
        return head;
    };
    let mut out = Vec::with_capacity(head.len() + lines.len());
    out.extend_from_slice(&head[..end + 2]);
    out.extend_from_slice(lines);
    out.extend_from_slice(&head[end + 2..]);
    out
}

#[cfg(test)]
#[path = "cors_tests.rs"]
mod tests;
