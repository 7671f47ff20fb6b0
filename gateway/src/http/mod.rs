//! HTTP/1.1 on monoio: request framing for the server side, response framing for the upstream
//! side, and writing responses. Framing is strict, because a proxy that frames differently from
//! the servers behind it invites request smuggling: Content-Length together with
//! Transfer-Encoding, conflicting Content-Lengths, an unknown transfer coding or any malformed
//! line is an error that closes the connection.

mod body;
mod head;
mod io;

use std::time::Duration;

pub use body::{BodyKind, ChunkedDecoder};
pub use head::HeadEnd;
pub use io::Io;

/// Limits of the server side, each with the status it answers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line plus headers: 431 over it.
    pub max_head: usize,
    /// Request body: 413 over it.
    pub max_body: usize,
    /// A started request must be complete within this: 408.
    pub request_timeout: Duration,
    /// An idle keep-alive connection is closed after this (silently).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head: 16 * 1024,
            max_body: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a request could not be read. Each knows its status; all but `Closed` are answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("connection closed")]
    Closed,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("request headers larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("request not completed in time")]
    Timeout,
    #[error("transfer coding not supported")]
    UnsupportedCoding,
}

impl HttpError {
    pub const fn status(&self) -> u16 {
        match self {
            HttpError::Closed => 0,
            HttpError::BadRequest(_) => 400,
            HttpError::HeadTooLarge(_) => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::Timeout => 408,
            HttpError::UnsupportedCoding => 501,
        }
    }
}

/// A request head and its whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
}

impl Request {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header(&self.headers, name)
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

pub fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Framing of a message body from its headers (RFC 9112 section 6), shared by requests and
/// responses. `Ok(None)` means no framing headers.
pub fn framing(headers: &[(String, Vec<u8>)], max: usize) -> Result<Option<BodyKind>, HttpError> {
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or(HttpError::BadRequest("invalid Content-Length"))?;
            if length.is_some_and(|l| l != v) {
                return Err(HttpError::BadRequest("conflicting Content-Length headers"));
            }
            length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only `chunked`, once, as the final coding.
            if chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(HttpError::UnsupportedCoding);
            }
            chunked = true;
        }
    }
    match (length, chunked) {
        (Some(_), true) => Err(HttpError::BadRequest(
            "both Content-Length and Transfer-Encoding",
        )),
        (Some(l), false) if l > max => Err(HttpError::BodyTooLarge(max)),
        (Some(l), false) => Ok(Some(BodyKind::Length(l))),
        (None, true) => Ok(Some(BodyKind::Chunked)),
        (None, false) => Ok(None),
    }
}

/// Reads one request (head and whole body) from `io`.
pub async fn read_request(io: &mut Io, limits: &Limits) -> Result<Request, HttpError> {
    // Wait for the first byte with the idle timeout; from then on, the request timeout.
    if io.pending().is_empty() && io.fill(limits.idle_timeout).await? == 0 {
        return Err(HttpError::Closed);
    }
    let deadline = monoio::time::Instant::now() + limits.request_timeout;
    let mut end = HeadEnd::default();
    let (head_len, mut req) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        let status = if end.may_be_complete(io.pending()) {
            parsed.parse(io.pending())
        } else {
            Ok(httparse::Status::Partial)
        };
        match status {
            Ok(httparse::Status::Complete(n)) => {
                let req = Request {
                    method: parsed.method.unwrap_or_default().to_owned(),
                    target: parsed.path.unwrap_or_default().to_owned(),
                    minor: parsed.version.unwrap_or(1),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), h.value.to_vec()))
                        .collect(),
                    body: Vec::new(),
                    keep_alive: true,
                };
                break (n, req);
            }
            Ok(httparse::Status::Partial) => {
                if io.pending().len() > limits.max_head {
                    return Err(HttpError::HeadTooLarge(limits.max_head));
                }
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(HttpError::HeadTooLarge(limits.max_head));
            }
            Err(_) => return Err(HttpError::BadRequest("malformed request line or header")),
        }
        if io.fill_until(deadline).await? == 0 {
            return Err(HttpError::BadRequest("connection closed mid-request"));
        }
    };
    if head_len > limits.max_head {
        return Err(HttpError::HeadTooLarge(limits.max_head));
    }
    io.consume(head_len);
    if req.minor == 1 && req.header("host").is_none() {
        return Err(HttpError::BadRequest("HTTP/1.1 request without Host"));
    }
    let connection = req
        .header("connection")
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    req.keep_alive = if req.minor == 0 {
        has_token(&connection, "keep-alive")
    } else {
        !has_token(&connection, "close")
    };
    let kind = framing(&req.headers, limits.max_body)?;
    if kind.is_some()
        && req
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"))
    {
        io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec())
            .await
            .map_err(|_| HttpError::Closed)?;
    }
    req.body = match kind {
        None => Vec::new(),
        Some(kind) => io.read_body(kind, limits.max_body, deadline).await?,
    };
    Ok(req)
}

/// Reason phrase of the statuses the gateway itself produces.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// A complete response with a body (Content-Length framing).
pub fn response(status: u16, headers: &[(&str, &str)], body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    for (n, v) in headers {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
