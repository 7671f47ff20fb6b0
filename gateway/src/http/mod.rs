//! HTTP/1.1 on monoio: request framing for the server side, response framing for the upstream
//! side, and writing responses. Framing is strict, because a proxy that frames differently from
//! the servers behind it invites request smuggling: Content-Length together with
//! Transfer-Encoding, conflicting Content-Lengths, an unknown transfer coding or any malformed
//! line is an error that closes the connection. So is a head whose meaning could differ between
//! the gateway and an upstream: a second Host or MCP routing field, an invalid Host, HTTP/1.0
//! with Transfer-Encoding. Heads the gateway writes go through [`head`].
// The request path: input from clients and upstreams must never panic here (a panic that
// still happens is contained per request in `conn::serve`, but it is a defect).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

mod body;
pub mod budget;
pub mod cors;
pub mod deadline;
mod fields;
mod head;
mod head_end;
mod io;
mod outgoing;
pub mod proxy_protocol;
pub mod relayed;

use std::time::Duration;

pub use body::{BodyKind, ChunkedDecoder};
pub use fields::{FieldName, Fields, Names, Noted, name};
pub use head::{
    UnsafeField, is_clean_value, is_token, push_content_length, push_field, push_request_line,
    push_status_line,
};
pub use head_end::HeadEnd;
pub use io::{HandshakeError, Io, take_idle_releases};
pub use outgoing::Outgoing;

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
    #[error("more than one `{0}` header")]
    DuplicateField(String),
    /// A credential in the request target: refused (400), and never counted towards a ban, a
    /// web page's `<img>` sends one for its visitors.
    #[error(
        "malformed request: access_token in the query string: send the token in the Authorization header"
    )]
    TokenInQuery,
}

impl HttpError {
    pub const fn status(&self) -> u16 {
        match self {
            HttpError::Closed => 0,
            HttpError::BadRequest(_) | HttpError::DuplicateField(_) | HttpError::TokenInQuery => {
                400
            }
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
    pub headers: Fields,
    /// Shared, so that forwarding it sends these bytes without a copy.
    pub body: bytes::Bytes,
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
}

impl Request {
    /// The first value of header `name` (case-insensitive).
    pub fn header<'n>(&self, name: impl FieldName<'n>) -> Option<&[u8]> {
        self.headers.get(name)
    }

    pub fn header_str<'n>(&self, name: impl FieldName<'n>) -> Option<&str> {
        self.headers.get_str(name).map(ows)
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        // By bytes (`?` is ASCII): asked by most stages, and `split` searched as chars.
        match self.target.bytes().position(|b| b == b'?') {
            Some(i) => &self.target[..i],
            None => &self.target,
        }
    }

    /// Whether a response body of unknown length may be sent chunked: HTTP/1.0 knows no
    /// chunked coding, so such a body is delimited by closing the connection instead.
    pub fn accepts_chunked(&self) -> bool {
        self.minor >= 1
    }
}

/// Whether `option` is named by any `Connection` line of `headers` (the lines form one list,
/// RFC 9110 §5.3): a header named only in a second line is hop-by-hop all the same.
pub fn has_connection_option(headers: &Fields, option: &str) -> bool {
    ConnectionOptions::of(headers).names(option)
}

/// The options named by a head's `Connection` lines, looked at once for a head whose every
/// field is asked about (none: no allocation).
pub struct ConnectionOptions<'a>(Vec<&'a [u8]>);

impl<'a> ConnectionOptions<'a> {
    pub fn of(headers: &'a Fields) -> Self {
        Self(
            headers
                .all(crate::http::name::CONNECTION)
                .flat_map(|v| v.split(|b| *b == b','))
                .map(<[u8]>::trim_ascii)
                .collect(),
        )
    }

    pub fn names(&self, option: &str) -> bool {
        self.0
            .iter()
            .any(|t| t.eq_ignore_ascii_case(option.as_bytes()))
    }
}

/// `s` without the optional white space around a field value: spaces and tabs (RFC 9110
/// §5.6.3), not Unicode's (a `U+00A0` after a value is part of it to the upstream too).
pub fn ows(s: &str) -> &str {
    // By bytes (both are ASCII, so every cut is at a character's boundary): every header read
    // goes through here, and a pattern of chars was searched as UTF-8.
    let b = s.as_bytes();
    let blank = |c: &u8| *c == b' ' || *c == b'\t';
    let start = b.iter().position(|c| !blank(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !blank(c)).map_or(start, |i| i + 1);
    &s[start..end]
}

/// The media type of a `Content-Type` value, its parameters and the spaces around it left out
/// (compared by the caller, ignoring case).
pub fn media_type(value: &[u8]) -> &[u8] {
    value
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

/// The parameters of a `Content-Type` value, each as `(name, value)`: spaces around either left
/// out, a quoted value unquoted; empty ones (`;;`) skipped. Split at every `;`, so a quoted
/// value holding one reads as more parameters, none of which a caller that wants only some
/// will take.
pub fn media_params(value: &str) -> impl Iterator<Item = (&str, &str)> {
    value.split(';').skip(1).filter_map(|p| {
        let (name, value) = p.split_once('=').unwrap_or((p, ""));
        let (name, value) = (ows(name), ows(value));
        if name.is_empty() && value.is_empty() {
            return None;
        }
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        Some((name, value))
    })
}

/// Whether a charset names UTF-8.
pub fn is_utf8(charset: &str) -> bool {
    charset.eq_ignore_ascii_case("utf-8") || charset.eq_ignore_ascii_case("utf8")
}

/// Fields the gateway decides on by their one value. A second line could mean something else
/// to the upstream (which may take the last, or join them), so a request with two is refused.
/// Every `Mcp-*` field counts as one of them (`Mcp-Session-Id`, `Mcp-Protocol-Version`,
/// `Mcp-Method`, `Mcp-Name`, `Mcp-Run-Id`).
const SINGLE: Names<9> = Names::new(SINGLE_NAMES);

const SINGLE_NAMES: [&str; 9] = [
    "host",
    "content-type",
    "content-encoding",
    "authorization",
    "x-api-key",
    "origin",
    "traceparent",
    "last-event-id",
    "expect",
];

/// Fields a client sends that never reach the upstream: hop-by-hop ones, framing and `Host`
/// (the gateway writes its own), credentials (the upstream gets its own), what says where
/// the request came from other than `X-Forwarded-For` (which the gateway appends to): an
/// upstream that reads `X-Real-IP`, `Forwarded` or a CDN's client address (Node's
/// `request-ip` reads `CF-Connecting-IP`, `Fastly-Client-IP`, `X-Forwarded`) would take the
/// client's word for its address; what says which host, path or method the request was
/// for (a framework's method override would run as `DELETE` a `POST` policy checked), what
/// says which client certificate the connection had (Envoy's `X-Forwarded-Client-Cert`, RFC
/// 9440's `Client-Cert`: an identity the upstream would take from the client's word), and
/// `Proxy` (a CGI upstream reads it as its `HTTP_PROXY`: "httpoxy").
pub const NOT_FORWARDED: Names<64> = Names::new(NOT_FORWARDED_NAMES);

const NOT_FORWARDED_NAMES: [&str; 64] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    "expect",
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "cookie",
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-original-forwarded-for",
    "client-ip",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "cf-connecting-ipv6",
    "fastly-client-ip",
    "x-originating-ip",
    "x-forwarded",
    "forwarded-for",
    "x-envoy-external-address",
    "x-remote-addr",
    "x-remote-ip",
    "x-proxyuser-ip",
    "x-forwarded-server",
    "x-host",
    "x-original-host",
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-uri",
    "x-envoy-original-path",
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
    "proxy",
    "x-azure-clientip",
    "x-appengine-user-ip",
    "akamai-client-ip",
    "fly-client-ip",
    "x-vercel-forwarded-for",
    "x-real-client-ip",
    "x-forwarded-client-cert",
    "client-cert",
    "client-cert-chain",
    "x-client-cert",
    "x-ssl-client-cert",
    "ssl-client-cert",
    "x-ssl-cert",
    "x-ssl-client-dn",
    "x-ssl-client-verify",
    "x-client-verify",
];

fn is_single(name: &str) -> bool {
    SINGLE.contains(name) || is_mcp(name)
}

/// Whether `name` starts with `Mcp-` (any case): each such field is single.
fn is_mcp(name: &str) -> bool {
    name.get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("mcp-"))
}

/// [`SINGLE`], as noted names ([`Fields::repeated`] says whether one came twice).
const SINGLE_NOTED: [fields::Noted; SINGLE_NAMES.len()] = {
    let mut noted = [fields::Noted::of("host"); SINGLE_NAMES.len()];
    let mut i = 0;
    while i < SINGLE_NAMES.len() {
        noted[i] = fields::Noted::of(SINGLE_NAMES[i]);
        i += 1;
    }
    noted
};

/// Whether `v` is a valid `Host` value (RFC 9112 §3.2, RFC 3986 §3.2.2), strictly: a name of
/// letters, digits, `-`, `.`, `_` and `~`, an IPv4 address or a bracketed IPv6 address, and an
/// optional port. It is reflected into `WWW-Authenticate` and the RFC 9728 document, so nothing
/// that could end a quoted string or a URL authority passes.
pub fn is_valid_host(v: &[u8]) -> bool {
    let Ok(v) = std::str::from_utf8(v) else {
        return false;
    };
    let (host, port) = if let Some(rest) = v.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => (None, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (None, Some(p)),
                None => return false,
            },
        }
    } else {
        match v.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(v), None),
        }
    };
    let host_ok = host.is_none_or(|h| {
        !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    });
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok()
    });
    host_ok && port_ok
}

/// Whether the query of `target` has an `access_token` parameter (also percent-encoded): the
/// MCP authorization spec forbids tokens in the URI, where logs and the upstream would see it.
fn has_access_token(target: &str) -> bool {
    let Some((_, query)) = target.split_once('?') else {
        return false;
    };
    query.split(['&', ';']).any(|pair| {
        let name = pair.split('=').next().unwrap_or_default();
        is_access_token(&percent_decode(name.replace('+', " ").as_bytes()))
    })
}

/// Whether a decoded query name is `access_token` as PHP and `qs` read names: leading spaces
/// dropped, cut at a NUL, `access_token[...]` an array of it (an unclosed `[` reads as `_`),
/// and `.` and ` ` read as `_`.
fn is_access_token(name: &[u8]) -> bool {
    let name = name.trim_ascii_start();
    let name = name.split(|b| *b == 0).next().unwrap_or_default();
    let name = match name.iter().position(|b| *b == b'[') {
        Some(open) if name[open..].contains(&b']') => &name[..open],
        _ => name,
    };
    name.len() == b"access_token".len()
        && name.iter().zip(b"access_token").all(|(a, b)| {
            a.to_ascii_lowercase() == *b || (*b == b'_' && matches!(a, b'.' | b' ' | b'['))
        })
}

/// Percent-decodes `s`; a `%` not followed by two hex digits stays as it is.
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        let decoded = (b == b'%')
            .then(|| Some((hex(*s.get(i + 1)?)?, hex(*s.get(i + 2)?)?)))
            .flatten();
        match decoded {
            Some((hi, lo)) => {
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'%'));
                i += 3;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// A request's method as telemetry records it: one HTTP defines, or `_OTHER` (OpenTelemetry's
/// convention). A method is any token up to the head's limit, and every other is answered 405:
/// written as sent, a client's 16 KB method went into every access-log line and span.
pub fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "DELETE", "OPTIONS", "HEAD", "PUT", "PATCH", "CONNECT", "TRACE",
    ];
    KNOWN.into_iter().find(|m| *m == method).unwrap_or("_OTHER")
}

/// Checks what the parser leaves to the gateway in a request head and decides whether the
/// connection may carry another request.
pub fn check_head(req: &mut Request) -> Result<(), HttpError> {
    for (name, value) in &req.headers {
        // The parser refuses these already; the gateway relays these bytes, so it says so itself.
        if !head::is_token(name.as_bytes()) || !is_clean_value(value) {
            return Err(HttpError::BadRequest("invalid header field"));
        }
        // The others of [`SINGLE`] are noted: looked at once below.
        if is_mcp(name) && req.headers.all(name).nth(1).is_some() {
            return Err(HttpError::DuplicateField(name.to_ascii_lowercase()));
        }
        // `Mcp_Method` beside `Mcp-Method`: CGI-style servers (WSGI, PHP) read `_` and `-` as
        // one, so such a field would stand for one the gateway decides on, unchecked.
        if name.as_bytes().contains(&b'_') && {
            let dashed = name.replace('_', "-");
            is_single(&dashed)
                || NOT_FORWARDED.contains(&dashed)
                || dashed.eq_ignore_ascii_case("x-forwarded-for")
        } {
            return Err(HttpError::BadRequest(
                "a field name with `_` for `-` of a field the gateway decides on or drops",
            ));
        }
    }
    if let Some(twice) = SINGLE_NOTED.iter().find(|n| req.headers.repeated(**n)) {
        return Err(HttpError::DuplicateField(twice.text().to_owned()));
    }
    // RFC 9110 §7.6.1: a connection option never names a field meant for every recipient. One
    // of the fields the gateway decides on would be checked here and dropped before the upstream.
    let connection = ConnectionOptions::of(&req.headers);
    if connection
        .0
        .iter()
        .any(|o| std::str::from_utf8(o).is_ok_and(is_single))
    {
        return Err(HttpError::BadRequest(
            "Connection names a field that is meant for the upstream",
        ));
    }
    match req.header(crate::http::name::HOST) {
        None if req.minor == 1 => {
            return Err(HttpError::BadRequest("HTTP/1.1 request without Host"));
        }
        Some(host) if !is_valid_host(host) => {
            return Err(HttpError::BadRequest("invalid Host header"));
        }
        _ => {}
    }
    if req.minor == 0 && req.header(crate::http::name::TRANSFER_ENCODING).is_some() {
        // RFC 9112 §6.1: the framing of such a message is faulty.
        return Err(HttpError::BadRequest(
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    if req.target.contains('#') {
        // RFC 9112 §3.2: no request target has a fragment; a server may read the path or
        // query to its end or to the `#`.
        return Err(HttpError::BadRequest(
            "a fragment (#) in the request target",
        ));
    }
    if has_access_token(&req.target) {
        return Err(HttpError::TokenInQuery);
    }
    // An HTTP/1.0 connection closes after its answer, even one that asked to be kept: kept,
    // every answer would have to say `Connection: keep-alive` (a 1.0 client takes one that does
    // not as closing), and the gateway's answers do not.
    req.keep_alive = req.minor == 1 && !connection.names("close");
    Ok(())
}

/// Framing of a message body from its headers (RFC 9112 section 6), shared by requests and
/// responses. `Ok(None)` means no framing headers.
pub fn framing(headers: &Fields, max: usize) -> Result<Option<BodyKind>, HttpError> {
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for (is_te, value) in headers.either("content-length", "transfer-encoding") {
        if !is_te {
            // Digits only, with spaces or tabs around: `str::trim` would also drop a
            // no-break space (UTF-8 in a field value), a length a proxy in front refuses or
            // ignores.
            let v = value
                .trim_ascii()
                .iter()
                .try_fold(None::<usize>, |n, b| {
                    b.is_ascii_digit().then_some(())?;
                    n.unwrap_or(0)
                        .checked_mul(10)?
                        .checked_add(usize::from(b - b'0'))
                        .map(Some)
                })
                .flatten()
                .ok_or(HttpError::BadRequest("invalid Content-Length"))?;
            if length.is_some_and(|l| l != v) {
                return Err(HttpError::BadRequest("conflicting Content-Length headers"));
            }
            length = Some(v);
        } else {
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

/// A request head and its body's framing from the bytes that have arrived (`buf`, from the
/// head's first byte; it only grows between calls with the same `end`): `Ok(None)` until the
/// head is complete. Returns the head's length too. The head is checked whole here
/// ([`check_head`], [`framing`]), so what arrives in pieces is decided as if it came at once.
pub fn parse_head(
    buf: &[u8],
    end: &mut HeadEnd,
    limits: &Limits,
) -> Result<Option<(usize, Request, Option<BodyKind>)>, HttpError> {
    read_head(buf, end, limits).map_err(|u| u.error)
}

/// [`parse_head`], a head refused for its fields or its framing given back with the refusal.
fn read_head(
    buf: &[u8],
    end: &mut HeadEnd,
    limits: &Limits,
) -> Result<Option<(usize, Request, Option<BodyKind>)>, Unread> {
    let unread = |error| Unread { error, head: None };
    if !end.may_be_complete(buf) {
        return if buf.len() > limits.max_head {
            Err(unread(HttpError::HeadTooLarge(limits.max_head)))
        } else {
            Ok(None)
        };
    }
    // Uninitialised: filled only as far as the head has fields (not 2 KiB written first).
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 64];
    let mut parsed = httparse::Request::new(&mut []);
    let head_len = match parsed.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_head => {
            return Err(unread(HttpError::HeadTooLarge(limits.max_head)));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(unread(HttpError::HeadTooLarge(limits.max_head)));
        }
        Err(_) => {
            return Err(unread(HttpError::BadRequest(
                "malformed request line or header",
            )));
        }
    };
    if head_len > limits.max_head {
        return Err(unread(HttpError::HeadTooLarge(limits.max_head)));
    }
    if has_bare_lf(&buf[..head_len]) {
        return Err(unread(HttpError::BadRequest(
            "a line of the head ends in LF without CR",
        )));
    }
    let mut req = Request {
        method: parsed.method.unwrap_or_default().to_owned(),
        target: parsed.path.unwrap_or_default().to_owned(),
        minor: parsed.version.unwrap_or(1),
        headers: Fields::from_parsed(parsed.headers),
        body: bytes::Bytes::new(),
        keep_alive: true,
    };
    let kind = check_head(&mut req).and_then(|()| framing(&req.headers, limits.max_body));
    match kind {
        Ok(kind) => Ok(Some((head_len, req, kind))),
        Err(error) => Err(Unread {
            error,
            head: Some(Box::new(req)),
        }),
    }
}

/// Whether a line of `head` ends in a bare LF. The parser takes one as a line's end (RFC 9112
/// §2.2 allows it); a proxy in front that does not would read `X: a\nTransfer-Encoding: chunked`
/// as one field, where the gateway reads two: the two would frame the connection differently.
/// Refused, as strict servers do (the gateway writes its own heads with CRLF).
fn has_bare_lf(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r')
}

/// The length of the whole empty lines (`\r\n` or `\n`) `buf` starts with.
fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut n = 0;
    loop {
        match &buf[n..] {
            [b'\r', b'\n', ..] => n += 2,
            [b'\n', ..] => n += 1,
            _ => return n,
        }
    }
}

/// Reads one request (head and whole body) from `io`.
pub async fn read_request(io: &mut Io, limits: &Limits) -> Result<Request, Unread> {
    let unread = |error| Unread { error, head: None };
    // Wait for the first byte with the idle timeout; from then on, the request timeout.
    if io.pending().is_empty() && io.fill(limits.idle_timeout).await.map_err(unread)? == 0 {
        return Err(unread(HttpError::Closed));
    }
    let deadline = monoio::time::Instant::now() + limits.request_timeout;
    let mut end = HeadEnd::default();
    let mut blank = 0;
    let (mut req, kind) = loop {
        // Empty lines before the request line (RFC 9112 §2.2) are taken off as they come:
        // left in, each read would parse them all again (the parser skips them, then finds
        // the head incomplete), quadratic in their number. Counted against the head's limit.
        let lines = leading_empty_lines(io.pending());
        if lines > 0 {
            blank += lines;
            if blank > limits.max_head {
                return Err(unread(HttpError::HeadTooLarge(limits.max_head)));
            }
            io.consume(lines);
            end = HeadEnd::default();
        }
        if let Some((head_len, req, kind)) = read_head(io.pending(), &mut end, limits)? {
            io.consume(head_len);
            break (req, kind);
        }
        if io.fill_until(deadline).await.map_err(unread)? == 0 {
            return Err(unread(HttpError::BadRequest(
                "connection closed mid-request",
            )));
        }
    };
    // From here on, what is refused is refused with its head (for the record).
    let unread = |error, req| {
        Err(Unread {
            error,
            head: Some(Box::new(req)),
        })
    };
    // RFC 9110 §10.1.1: never an interim response to an HTTP/1.0 client.
    if kind.is_some()
        && req.minor >= 1
        && req
            .header(crate::http::name::EXPECT)
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"))
        && io
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec())
            .await
            .is_err()
    {
        return unread(HttpError::Closed, req);
    }
    req.body = match kind {
        None => bytes::Bytes::new(),
        Some(kind) => match io.read_body(kind, limits.max_body, deadline).await {
            Ok(body) => body.into(),
            Err(e) => return unread(e, req),
        },
    };
    Ok(req)
}

/// A request that was not read whole: why, and its head when that was read (a body too
/// large, cut short or too slow), so that the refusal is recorded with its route.
pub struct Unread {
    pub error: HttpError,
    pub head: Option<Box<Request>>,
}

/// The reason phrase of `status`: the registered one, or none (RFC 9112 §4 lets it be empty).
/// An upstream's status is relayed with it: a 409 went to clients as `409 Unknown`.
pub fn reason(status: u16) -> &'static str {
    ::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

/// A complete response with a body (Content-Length framing). A header value that cannot be
/// written (see [`head`]) turns it into a 500 that closes the connection: the gateway never
/// sends a head it did not mean.
/// `data` as one chunk of a chunked body (`data` must not be empty: an empty chunk ends it).
/// `data` as one chunk; nothing for no data (a chunk of size 0 would end the body).
pub fn chunk(data: &[u8]) -> Vec<u8> {
    if data.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(data.len() + 20);
    push_chunk(&mut out, data);
    out
}

/// Adds `data` to `out` as one chunk; nothing for no data.
pub fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    outgoing::push_chunk_line(out, data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(outgoing::CHUNK_END);
}

pub fn response(status: u16, headers: &[(&str, &str)], body: &[u8], keep_alive: bool) -> Vec<u8> {
    let build = || -> Result<Vec<u8>, UnsafeField> {
        let mut out = Vec::with_capacity(128 + body.len());
        push_status_line(&mut out, status);
        for (n, v) in headers {
            push_field(&mut out, n, v.as_bytes())?;
        }
        push_content_length(&mut out, body.len());
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        Ok(out)
    };
    build().unwrap_or_else(|e| {
        tracing::error!(status, "refused to write a response: {e}");
        let body = br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"the gateway refused to write an unsafe response header"}}"#;
        let mut out = format!(
            "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        out
    })
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
