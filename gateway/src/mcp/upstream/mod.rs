//! The upstream side of forwarding: one seam, [`open`], that sends a request to an upstream
//! whatever carries it (today HTTP/1.1 over TCP or TLS, [`transport`]) and gives back the
//! connection with the response head, plus the per-worker pool of idle connections beside it
//! ([`pool`]). The TLS client configuration and the addresses ([`crate::endpoints`]) are made
//! on the control thread; workers only read them. What the client sees of an answer
//! (relaying, rewriting, errors) is the caller's business; nothing here writes to a client
//! connection.

mod pool;
mod requests;
pub mod resolve;
mod transport;

pub use pool::Pool;

use std::{future::Future, net::SocketAddr};

use crate::{
    config::Upstream,
    http::{self, BodyKind, HttpError, Io, Outgoing},
};

/// A connection to an upstream, with the address it went to (so that the pool can retire it
/// once the upstream's address changes). Reads and writes go through its [`Io`].
pub struct Conn {
    io: Io,
    addr: SocketAddr,
    /// Whose requests it carries: it goes back to that tenant's idle connections only.
    tenant: u64,
    /// Counted in use (for the pool's size) while this lives.
    _lease: pool::Lease,
}

impl std::ops::Deref for Conn {
    type Target = Io;
    fn deref(&self) -> &Io {
        &self.io
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Io {
        &mut self.io
    }
}

pub struct ResponseHead {
    pub status: u16,
    pub headers: http::Fields,
}

impl ResponseHead {
    /// The media type is `text/event-stream` (its parameters aside).
    pub fn is_sse(&self) -> bool {
        self.headers
            .get(crate::http::name::CONTENT_TYPE)
            .is_some_and(|ct| http::media_type(ct).eq_ignore_ascii_case(b"text/event-stream"))
    }

    /// Why the client could read this head otherwise than the gateway does, if it could:
    /// - a redirect (3xx but 304) would send the client elsewhere than its route;
    /// - 401 and 403 are about the gateway's own credential for the upstream; relayed, the
    ///   upstream's `WWW-Authenticate` would send the client to authorize at a server of the
    ///   upstream's choosing;
    /// - two `Content-Type` lines, or one naming `text/event-stream` other than as its media
    ///   type: clients that look for the string anywhere (the TypeScript SDK) would read as
    ///   an event stream what the gateway relays, unread, as JSON.
    fn ambiguity(&self) -> Option<UpstreamFailure> {
        // A status line of another length than three digits: relayed, the client (and the
        // gateway's own reading of what it wrote) would find its status elsewhere.
        if !(200..=599).contains(&self.status) {
            return Some(UpstreamFailure::Bad(format!(
                "answered with status {}, outside 100-599",
                self.status
            )));
        }
        // Asked for `identity`: an answer in another coding is not what the gateway reads (a
        // tool list it filters, a task it binds, an error it counts) and relays as it came.
        if self
            .headers
            .all(crate::http::name::CONTENT_ENCODING)
            .any(|c| !c.trim_ascii().eq_ignore_ascii_case(b"identity"))
        {
            return Some(UpstreamFailure::Bad(
                "answered in a Content-Encoding the gateway did not ask for".into(),
            ));
        }
        if (300..400).contains(&self.status) && self.status != 304 {
            // A redirect: relayed, it sent the client (its call, with its credentials) where
            // the upstream chose, past the route and the rules it was checked for: the Python
            // SDK's client follows one on the same origin, to another route of this gateway.
            // The gateway follows none either: the operator names where the upstream is. The
            // call's own failure (the client's query can draw one), not the upstream's.
            return Some(UpstreamFailure::Unrelayable(format!(
                "answered HTTP {}, a redirect: the gateway neither follows nor relays redirects (set the upstream's URL to where it points)",
                self.status
            )));
        }
        if matches!(self.status, 401 | 403) {
            // Not held against the endpoint: a request can draw a 403 (an origin, a scope).
            return Some(UpstreamFailure::Denied(format!(
                "answered HTTP {}: it refused the gateway's credential or the request (the upstream's `bearer_token_env`)",
                self.status
            )));
        }
        // Two session ids: the gateway would decide on the first (and sign both), a client
        // may keep either (a reviewer's finding).
        if self.headers.repeated(crate::http::name::MCP_SESSION_ID) {
            return Some(UpstreamFailure::Bad(
                "answered with two Mcp-Session-Id lines".into(),
            ));
        }
        let mut types = self.headers.all(crate::http::name::CONTENT_TYPE);
        let first = types.next();
        if types.next().is_some() {
            return Some(UpstreamFailure::Bad(
                "answered with two Content-Type lines".into(),
            ));
        }
        // A charset but UTF-8: the client decodes the body in it (httpx does, for an event
        // stream too), the gateway reads it as UTF-8. In UTF-7 `+AGk-d` is `id`: a response
        // the gateway read as answering nothing answered the client's pending `tools/list`
        // (an attacker's review). Not relayed, as a request in another charset is not taken.
        if let Some(ct) = first {
            let Ok(ct) = std::str::from_utf8(ct) else {
                return Some(UpstreamFailure::Bad(
                    "answered with a Content-Type that is not text".into(),
                ));
            };
            // Named in any form a client decodes: RFC 2231's `charset*=''utf-7` and
            // `charset*0=utf-;charset*1=7` are UTF-7 to Python's `email` (httpx; a review).
            let charset_like = |n: &str| {
                n.get(..7)
                    .is_some_and(|c| c.eq_ignore_ascii_case("charset"))
            };
            if let Some((_, charset)) = http::media_params(ct).find(|(n, v)| {
                charset_like(n) && !(n.eq_ignore_ascii_case("charset") && http::is_utf8(v))
            }) {
                return Some(UpstreamFailure::Bad(format!(
                    "answered in charset `{}`: answers are read, and relayed, as UTF-8",
                    charset.escape_default()
                )));
            }
        }
        let names_sse = first.is_some_and(|ct| {
            ct.windows(17)
                .any(|w| w.eq_ignore_ascii_case(b"text/event-stream"))
        });
        (names_sse && !self.is_sse()).then(|| {
            UpstreamFailure::Bad(
                "answered with a Content-Type that names text/event-stream without being it".into(),
            )
        })
    }

    pub fn closes(&self) -> bool {
        http::has_connection_option(&self.headers, "close")
    }
}

pub enum UpstreamFailure {
    Connect(String),
    /// It answered 401 or 403: not relayed (its `WWW-Authenticate` is about the gateway's
    /// credential), and not held against the endpoint's health.
    Denied(String),
    Timeout,
    /// The request could not be written: certainly not processed, so on a reused connection
    /// worth one retry.
    Unsent(String),
    /// The request was written, then the connection failed before any response byte: the
    /// upstream may have executed it, so it is retried only if it is idempotent.
    NoResponse(String),
    Bad(String),
    /// An exchange the gateway makes for the call (a held session's `initialize`, a bridged
    /// `server/discover`) was answered 502–504: a proxy in front of a dead server, or of a
    /// slow one. Either's, as such an answer to the call itself is (`proxy::Blame::Unclear`).
    Unavailable(String),
    /// The TLS handshake failed (a certificate that does not verify, say): `reason` is the
    /// label counted in `/metrics` and named to the client.
    Tls {
        reason: &'static str,
        detail: String,
    },
    /// The client left while waiting (not an upstream failure).
    ClientGone,
    /// The gateway itself is out of file descriptors (EMFILE, ENFILE): not the upstream's
    /// fault, so the client gets 503 and the breakers are not told.
    OutOfDescriptors,
    /// The request's upstream session lives on a replica that is ejected or gone: nothing was
    /// sent; the client is told the session is lost (404) and initializes again.
    SessionLost,
    /// The call's answer is larger than the gateway takes, or asks what the gateway cannot
    /// pass on: the call's own failure (a tool asked for a large file), not the upstream's.
    Unrelayable(String),
}

impl UpstreamFailure {
    /// An exchange the gateway made for a call (a held session's `initialize`, a bridged
    /// `server/discover`) answered `status` without the result it needed (`why`): a 502–504
    /// is either's ([`Self::Unavailable`]), another 5xx but 500 the upstream's, and anything
    /// else, which what the caller sent can draw (a 4xx, an error, a 500), the call's own
    /// ([`Self::Unrelayable`]), as each is on passthrough.
    pub fn of_exchange(status: u16, why: String) -> Self {
        match status {
            502..=504 => Self::Unavailable(why),
            501.. => Self::Bad(why),
            _ => Self::Unrelayable(why),
        }
    }

    /// Whether the request was written and no answer came (it timed out, or the connection
    /// failed first): the upstream may have acted on it.
    pub fn sent_unanswered(&self) -> bool {
        matches!(self, Self::Timeout | Self::NoResponse(_))
    }

    /// Whether the failure speaks against the endpoint (and counts towards its ejection).
    fn counts_against_endpoint(&self) -> bool {
        matches!(
            self,
            Self::Connect(_)
                | Self::Tls { .. }
                | Self::Timeout
                | Self::NoResponse(_)
                | Self::Bad(_)
                | Self::Unavailable(_)
                | Self::Unsent(_)
        )
    }
}

/// Endpoints one request may try when connecting fails (nothing was sent to the others).
const MAX_ENDPOINTS_TRIED: usize = 3;

/// Sends the request and reads the response head.
async fn exchange(
    conn: &mut Io,
    request: Outgoing,
    up: &Upstream,
    keep: bool,
) -> (Result<ResponseHead, UpstreamFailure>, Option<Outgoing>) {
    let (written, request) = conn.send(request).await;
    if let Err(e) = written {
        return (Err(UpstreamFailure::Unsent(e.to_string())), request);
    }
    // Kept for a retry only where one is possible.
    let request = request.filter(|_| keep);
    (read_head(conn, up).await, request)
}

/// Reads the head of the answer to a request just sent (interim 1xx heads skipped).
async fn read_head(conn: &mut Io, up: &Upstream) -> Result<ResponseHead, UpstreamFailure> {
    let deadline = crate::clock::deadline(up.response_timeout);
    let mut end = http::HeadEnd::default();
    loop {
        if let Some(head) = parse_response_head(conn, &mut end)? {
            return Ok(head);
        }
        let had_bytes = !conn.pending().is_empty();
        match conn.fill_until(deadline).await {
            Ok(0) if had_bytes => {
                return Err(UpstreamFailure::Bad(
                    "closed inside the response head".into(),
                ));
            }
            Ok(0) => {
                return Err(UpstreamFailure::NoResponse(
                    "closed without a response".into(),
                ));
            }
            Ok(_) => {}
            Err(HttpError::Timeout) => return Err(UpstreamFailure::Timeout),
            Err(e) => return Err(UpstreamFailure::NoResponse(e.to_string())),
        }
    }
}

/// Longest response head accepted from an upstream, in bytes.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The response head at the start of what `conn` holds, if it is all there (interim 1xx heads
/// before it are consumed). Not part of [`read_head`]'s future: httparse's table of 64 fields
/// (2 KiB) would be kept in it across every read.
fn parse_response_head(
    conn: &mut Io,
    end: &mut http::HeadEnd,
) -> Result<Option<ResponseHead>, UpstreamFailure> {
    loop {
        // Uninitialised: filled only as far as the head has fields.
        let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 64];
        let mut resp = httparse::Response::new(&mut []);
        let status = if end.may_be_complete(conn.pending()) {
            httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut resp,
                conn.pending(),
                &mut headers,
            )
        } else {
            Ok(httparse::Status::Partial)
        };
        return match status {
            // Refused whole as in part: what an upstream's head is does not depend on how its
            // bytes arrive.
            Ok(httparse::Status::Complete(n)) if n > MAX_RESPONSE_HEAD => {
                Err(UpstreamFailure::Bad("response head too large".into()))
            }
            Ok(httparse::Status::Complete(n)) => {
                let mut head = ResponseHead {
                    status: resp.code.unwrap_or(502),
                    headers: http::Fields::from_parsed(resp.headers),
                };
                let http10 = resp.version == Some(0);
                conn.consume(n);
                if head.status == 101 {
                    // Asked for no upgrade: what follows is not HTTP the gateway can read (it
                    // was read as the next head after an interim one).
                    return Err(UpstreamFailure::Bad(
                        "answered 101 Switching Protocols to a request that asked for no upgrade"
                            .into(),
                    ));
                }
                if http10 {
                    // HTTP/1.0 has no chunked coding (RFC 9112 §6.1: faulty framing), and its
                    // connection closes after the answer unless it says `keep-alive`: one kept
                    // in the pool was used again as the server closed it.
                    if head
                        .headers
                        .get(crate::http::name::TRANSFER_ENCODING)
                        .is_some()
                    {
                        return Err(UpstreamFailure::Bad(
                            "answered HTTP/1.0 with Transfer-Encoding".into(),
                        ));
                    }
                    if !http::has_connection_option(&head.headers, "keep-alive") {
                        // Read by `closes` (never relayed: a connection option).
                        head.headers.push("connection", b"close");
                    }
                }
                if (100..200).contains(&head.status) {
                    // 100 Continue and other interim responses; the next head starts here.
                    *end = http::HeadEnd::default();
                    continue;
                }
                if let Some(f) = head.ambiguity() {
                    return Err(f);
                }
                Ok(Some(head))
            }
            Ok(httparse::Status::Partial) if conn.pending().len() > MAX_RESPONSE_HEAD => {
                Err(UpstreamFailure::Bad("response head too large".into()))
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(e) => Err(UpstreamFailure::Bad(format!("malformed response: {e}"))),
        };
    }
}

/// Sends `request` to `up` over a pooled connection of `tenant`'s (an [`Obs::tenant_key`]) or
/// a new one (one retry when a pooled connection turns out to be closed) and reads the
/// response head. With a client to `watch`, gives up (closing the upstream connection) if that
/// client leaves first (unless the call runs on without it: see [`Watch`]).
///
/// With several endpoints ([`crate::endpoints::Replicas`]): the session id of an answer is handed on signed with
/// its endpoint; a request carrying one goes to that endpoint with the endpoint's own id (or
/// fails with [`UpstreamFailure::SessionLost`]); any other goes to
/// the balancer's choice, and to another endpoint when connecting fails (nothing was sent).
/// Every outcome is reported to the endpoint's health.
pub async fn open(
    pool: &Pool,
    up: &Upstream,
    tenant: u64,
    mut first: Outgoing,
    watch: Option<Watch<'_>>,
) -> Result<(Conn, ResponseHead), UpstreamFailure> {
    let idempotent = idempotent(&first.head);
    let replicas = &up.replicas;
    let key = &pool.session_key;
    // Whether this request's failure says anything of the replica (only worth knowing when
    // there are replicas to eject).
    let of_replica = replicas.endpoints().len() > 1 && requests::says_of_replica(&first);
    // Only replicas pin sessions: a lone endpoint's requests are not searched for one.
    let session = replicas
        .pins_sessions()
        .then(|| requests::session_of(&first.head))
        .flatten();
    let pinned = match replicas.open_session(key, &up.name, session) {
        crate::endpoints::Sticky::Any => None,
        crate::endpoints::Sticky::Pinned(e, own) => {
            // The endpoint gets its own id back.
            requests::set_session(&mut first.head, &own);
            Some(e)
        }
        crate::endpoints::Sticky::Lost => return Err(UpstreamFailure::SessionLost),
    };
    let endpoints = replicas.endpoints();
    let mut tried: Vec<std::net::SocketAddr> = Vec::new();
    let choose = |tried: &[std::net::SocketAddr]| {
        crate::endpoints::Choice {
            endpoints: &endpoints,
            avoid: tried,
        }
        .pick(
            crate::endpoints::now_ms(),
            &replicas.ejection,
            &mut || pool.random(),
            &|addr| pool.in_flight(up, addr),
        )
    };
    // Every attempt of this request goes to one endpoint, unless connecting to it fails.
    let mut endpoint = match pinned.clone() {
        Some(e) => e,
        None => choose(&tried).unwrap_or_else(|| {
            std::sync::Arc::new(crate::endpoints::Endpoint::new(replicas.first()))
        }),
    };
    let mut addr = endpoint.addr;
    let mut lease = pool.lease(up, addr);
    let mut attempt = 0;
    // Given back by a write for a retry; `None` once it cannot be sent again.
    let mut request = Some(first);
    loop {
        attempt += 1;
        // The retry goes over a new connection: the pool's others went idle as long ago.
        let pooled = if attempt == 1 {
            pool.checkout(up, addr, tenant)
        } else {
            None
        };
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(c) => c,
            // Boxed: a new connection is rare beside a pooled one, and its state (KiBs) would
            // otherwise be part of every request's.
            None => match Box::pin(transport::connect(up, addr, &pool.stats)).await {
                Ok(c) => c,
                Err(f) => {
                    if f.counts_against_endpoint() {
                        report_failure(up, &endpoint);
                    }
                    let unreachable =
                        matches!(f, UpstreamFailure::Connect(_) | UpstreamFailure::Tls { .. });
                    // The replica that holds the session cannot be reached: the session is
                    // lost for the client (never sent to a replica that does not know it).
                    if unreachable && pinned.is_some() && endpoints.len() > 1 {
                        return Err(UpstreamFailure::SessionLost);
                    }
                    tried.push(addr);
                    // Not connected, nothing sent: another endpoint may take it.
                    if unreachable
                        && pinned.is_none()
                        && tried.len() < MAX_ENDPOINTS_TRIED
                        && let Some(next) = choose(&tried)
                    {
                        endpoint = next;
                        addr = endpoint.addr;
                        lease = pool.lease(up, addr);
                        attempt = 0;
                        continue;
                    }
                    return Err(f);
                }
            },
        };
        // The request comes back for a retry only where one is possible (a pooled connection,
        // first attempt): written from its own buffer, never copied.
        let retry = reused && attempt == 1;
        // A retry is only made with the request given back.
        let Some(bytes) = request.take() else {
            return Err(UpstreamFailure::Unsent("nothing left to send".into()));
        };
        let exchanged = match watch {
            Some(watch) => unless_client_leaves(watch, exchange(&mut conn, bytes, up, retry)).await,
            None => Some(exchange(&mut conn, bytes, up, retry).await),
        };
        let Some((exchanged, back)) = exchanged else {
            // Dropping `conn` closes it, which cancels there.
            return Err(UpstreamFailure::ClientGone);
        };
        // None when the write was abandoned (timed out) or no retry is possible.
        request = back;
        match exchanged {
            Ok(mut head) => {
                // A replica that cannot serve (a proxy in front of a dead one, overload); a
                // 500 may be one request's bug, which a client could repeat at will.
                if matches!(head.status, 502..=504) {
                    if of_replica {
                        report_failure(up, &endpoint);
                    }
                } else if endpoint.succeeded(crate::endpoints::now_ms()) {
                    tracing::info!(upstream = %up.name, endpoint = %addr, "endpoint passed its trial: back in rotation");
                }
                // A session id goes on signed with the endpoint that has it.
                if replicas.pins_sessions() {
                    head.headers.replace_values("mcp-session-id", |id| {
                        replicas.sign_session(key, &up.name, &endpoint, id)
                    });
                }
                let conn = Conn {
                    io: conn,
                    addr,
                    tenant,
                    _lease: lease,
                };
                return Ok((conn, head));
            }
            // The upstream closed an idle pooled connection as we reused it: try a fresh one,
            // but only where a second execution cannot happen (RFC 9110 section 9.2.2).
            Err(UpstreamFailure::Unsent(_)) if retry && request.is_some() => continue,
            Err(UpstreamFailure::NoResponse(_)) if retry && idempotent && request.is_some() => {
                continue;
            }
            Err(f) => {
                if f.counts_against_endpoint() && of_replica {
                    report_failure(up, &endpoint);
                }
                return Err(f);
            }
        }
    }
}

/// Tells an endpoint's health of a failure; logs an ejection. The last endpoint in rotation is
/// never ejected: failures of every replica at once (or a flood that provokes them) leave one
/// serving rather than none.
fn report_failure(up: &Upstream, endpoint: &crate::endpoints::Endpoint) {
    let others_serve = up
        .replicas
        .endpoints()
        .iter()
        .any(|e| e.addr != endpoint.addr && !e.ejected());
    if endpoint.failed(
        crate::endpoints::now_ms(),
        &up.replicas.ejection,
        others_serve,
    ) {
        tracing::warn!(
            upstream = %up.name,
            endpoint = %endpoint.addr,
            "endpoint ejected after repeated failures"
        );
    }
}

/// Whether the request whose head is `request` may be sent twice: an idempotent
/// method (RFC 9110 section 9.2.2). A POST (every JSON-RPC request: a `tools/call` above all)
/// is not.
fn idempotent(request: &[u8]) -> bool {
    [&b"GET "[..], b"HEAD ", b"OPTIONS ", b"DELETE "]
        .iter()
        .any(|m| request.starts_with(m))
}

/// Sends `request` to `up` and reads the whole response (at most `max` bytes of body); the
/// connection goes back to the pool.
pub async fn call(
    pool: &Pool,
    up: &Upstream,
    tenant: u64,
    request: Outgoing,
    max: usize,
) -> Result<(ResponseHead, Vec<u8>), UpstreamFailure> {
    let (mut conn, head) = match open(pool, up, tenant, request, None).await {
        Ok(opened) => opened,
        // What the replica would have said had it been asked: a held session opens a new one.
        Err(UpstreamFailure::SessionLost) => {
            return Ok((
                ResponseHead {
                    status: 404,
                    headers: http::Fields::default(),
                },
                Vec::new(),
            ));
        }
        Err(f) => return Err(f),
    };
    let kind = if head.status == 204 || head.status == 304 {
        BodyKind::Length(0)
    } else {
        match http::framing(&head.headers, max) {
            Ok(Some(k)) => k,
            Ok(None) => BodyKind::UntilClose,
            Err(e) => return Err(UpstreamFailure::Bad(format!("unframeable response: {e}"))),
        }
    };
    let deadline = crate::clock::deadline(up.response_timeout);
    // A large answer waits for room in the worker's budget (see `http::budget`).
    let body = match conn
        .read_body_within(kind, max, deadline, Some((&pool.whole, &up.name)))
        .await
    {
        Ok(b) => b,
        Err(HttpError::Timeout) => return Err(UpstreamFailure::Timeout),
        Err(HttpError::BodyTooLarge(n)) => {
            return Err(UpstreamFailure::Unrelayable(format!(
                "its answer is larger than the {n} bytes the gateway takes"
            )));
        }
        Err(e) => return Err(UpstreamFailure::Bad(e.to_string())),
    };
    if kind != BodyKind::UntilClose && !head.closes() {
        pool.checkin(up, conn);
    }
    // Read whole to be parsed whole: bounded in what it takes parsed too.
    crate::values::within(&body)
        .map_err(|why| UpstreamFailure::Bad(format!("its answer: {why}")))?;
    Ok((head, body))
}

/// How long a wait on the upstream runs before the gateway also watches the client (up to the
/// worker's sweep of deadlines, 50 ms, later): answers quicker than that cost no extra system
/// call. At 20 ms a worker under load (2,048 connections on one core: every answer waits its
/// turn for tens of ms) watched the client of nearly every request, a poll and its
/// cancellation each: 6 % of its CPU per request, and p99 130 ms instead of 112. A tool call
/// worth cancelling runs for longer than this.
const WATCH_CLIENT_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// What a wait on the upstream watches of the client it is for.
#[derive(Clone, Copy)]
pub struct Watch<'a> {
    pub client: &'a Io,
    /// `Some`: the call runs on when its client leaves (nothing but its end stops it upstream:
    /// see `Obs::runs_on`).
    pub runs_on: Option<RunsOn<'a>>,
}

/// What a wait for a call that runs on without its client ([`Watch::runs_on`]) is told.
#[derive(Clone, Copy)]
pub struct RunsOn<'a> {
    /// Set when the client left.
    pub left: &'a std::cell::Cell<bool>,
    /// Whether the client was cut for a ban or deny: then the wait is given up (the call is
    /// closed, its slots held a while: see `tasks::Owners::hold_cut`).
    pub cut: &'a dyn Fn() -> bool,
}

impl<'a> Watch<'a> {
    /// The wait is given up when `client` leaves.
    pub fn leaves(client: &'a Io) -> Self {
        Self {
            client,
            runs_on: None,
        }
    }
}

/// Runs `fut`; `None` if the client closes its connection first (and `watch` does not say
/// that the call runs on without it).
pub(crate) fn unless_client_leaves<F: Future>(
    watch: Watch<'_>,
    fut: F,
) -> UnlessClientLeaves<'_, F> {
    UnlessClientLeaves {
        fut,
        watch,
        left: false,
        // On the worker's table of deadlines, not a timer of its own (a timer wheel entry and
        // 640 bytes in the future of every wait on an upstream).
        watch_from: crate::http::deadline::Deadline::new(
            monoio::time::Instant::now() + WATCH_CLIENT_AFTER,
        ),
        watching: None,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`unless_client_leaves`]: written out rather than an async fn, which would
    /// keep `fut` twice (as its argument and pinned in its body, rust-lang/rust#62958), and the
    /// watch of the client, taken only by a slow answer, boxed.
    pub(crate) struct UnlessClientLeaves<'a, F> {
        #[pin]
        fut: F,
        watch: Watch<'a>,
        // The client left, and the call runs on without it.
        left: bool,
        watch_from: crate::http::deadline::Deadline,
        watching: Option<std::pin::Pin<Box<dyn Future<Output = ()> + 'a>>>,
    }
}

impl<F: Future> Future for UnlessClientLeaves<'_, F> {
    type Output = Option<F::Output>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.project();
        if let Poll::Ready(r) = this.fut.poll(cx) {
            return Poll::Ready(Some(r));
        }
        if *this.left {
            return Poll::Pending;
        }
        if this.watching.is_none() {
            if std::pin::Pin::new(this.watch_from).poll(cx).is_pending() {
                return Poll::Pending;
            }
            tracing::debug!("watching the client");
            *this.watching = Some(Box::pin(this.watch.client.peer_gone()));
        }
        match this.watching.as_mut().map(|w| w.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => match this.watch.runs_on {
                // `fut`, polled above, wakes this.
                Some(runs_on) if !(runs_on.cut)() => {
                    runs_on.left.set(true);
                    *this.left = true;
                    *this.watching = None;
                    Poll::Pending
                }
                _ => Poll::Ready(None),
            },
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ResponseHead, UpstreamFailure};

    /// An answer in a charset but UTF-8 is not relayed: the client decodes it in that charset
    /// (httpx, for an event stream too) and the gateway reads UTF-8. An attacker's review: in
    /// UTF-7 `+AGk-d` is `id`, and a response the gateway read as answering nothing answered
    /// the client's pending `tools/list`.
    #[test]
    fn an_answer_in_a_charset_but_utf8_is_not_relayed() {
        let head = |ct: &str| ResponseHead {
            status: 200,
            headers: [("Content-Type", ct)].into_iter().collect(),
        };
        for ct in [
            "text/event-stream; charset=utf-7",
            "text/event-stream;Charset=\"UTF-7\"",
            "text/event-stream; charset = utf7",
            "application/json; charset=utf-16le",
            "text/event-stream; charset=utf-8; charset=utf-7",
        ] {
            assert!(
                matches!(head(ct).ambiguity(), Some(UpstreamFailure::Bad(_))),
                "{ct}"
            );
        }
        for ct in [
            "text/event-stream",
            "text/event-stream; charset=utf-8",
            "application/json; charset=\"UTF8\"",
            "application/json;;",
            "text/event-stream; foo=bar",
        ] {
            assert!(head(ct).ambiguity().is_none(), "{ct}");
        }
    }

    /// An answer naming two sessions is not relayed: the gateway read (and bound the client
    /// to) the first, a client may keep the second.
    #[test]
    fn an_answer_with_two_session_ids_is_not_relayed() {
        let head = |ids: &[&str]| ResponseHead {
            status: 200,
            headers: std::iter::once(("Content-Type", "application/json"))
                .chain(ids.iter().map(|id| ("MCP-Session-Id", *id)))
                .collect(),
        };
        assert!(head(&["a"]).ambiguity().is_none());
        assert!(matches!(
            head(&["a", "b"]).ambiguity(),
            Some(UpstreamFailure::Bad(_))
        ));
    }
}
