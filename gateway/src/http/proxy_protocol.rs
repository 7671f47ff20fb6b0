//! The PROXY protocol (HAProxy's v1 text and v2 binary headers) on a listener behind a load
//! balancer: the balancer opens the connection and, before anything else, names the client it
//! stands for. From then on that client's address is the connection's peer for everything:
//! identity and `address` auth, tenant classification, per-source policy and rate limits, the
//! audit log, auto-ban, the tenant's connection count and cap, and bans (which the XDP program
//! cannot apply here: every packet it sees comes from the balancer).
//!
//! A header is believed only from the listener's trusted prefixes: a connection from anywhere
//! else is closed before a byte is read. From a trusted source the header is required: a
//! missing, malformed, truncated or late one closes the connection. This never falls back to
//! the socket's address (a balancer that lost its header setting would otherwise turn every
//! client into the balancer, one tenant with one rate limit), except for a v2 `LOCAL` header,
//! by which the balancer says the connection is its own (a health check): that one is served as
//! the balancer's. A v1 `UNKNOWN` and a v2 `PROXY` of another family than TCP over IPv4 or
//! IPv6 name no client and are refused. v2 TLVs are checked for shape and otherwise ignored.
//!
//! Parsing is the `ppp` crate's; the reading loop is here: the header may come in pieces, must
//! be whole within the listener's `header_timeout_ms`, is at most 107 bytes (v1) or 16 +
//! [`MAX_V2_PAYLOAD`] (v2), and whatever follows it stays pending in the [`Io`]: the first
//! HTTP bytes, or the first TLS records (which `Io::handshake` takes from there).
//!
//! Nothing is ever written to a refused connection: the peer is a balancer, and what it
//! relays is not known yet (HTTP or TLS). Each refusal is counted by reason.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use ppp::v2::{Addresses, Command, Protocol};

use super::{HttpError, Io};

/// PROXY protocol versions a listener accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header only.
    V1,
    /// The binary header only.
    V2,
    /// Either.
    #[default]
    Any,
}

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v2 header's fixed part: the signature, version and command, family and protocol, length.
const V2_FIXED: usize = 16;
/// The most address and TLV bytes a v2 header may carry here. Balancers send tens to a few
/// hundred (AWS's VPC endpoint id, a unique id, TLS details); the protocol allows 65,535.
pub const MAX_V2_PAYLOAD: usize = 4096;
/// What every v1 header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;

/// Whom a header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The client the balancer relays (its address and port as the balancer saw them).
    Client(SocketAddr),
    /// v2 `LOCAL`: the balancer's own connection (a health check); served as the socket peer.
    Local,
}

/// What the bytes received so far make of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A header may still be coming: read more.
    Incomplete,
    /// A whole header of `len` bytes (what follows is not part of it).
    Header { len: usize, header: Header },
    /// Not an acceptable header, whatever follows.
    Refused(Reason),
}

/// Why a connection on a PROXY protocol listener was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its source is not one of the listener's trusted prefixes.
    UntrustedSource,
    /// Closed before sending a byte (a balancer's plain TCP health check does this).
    Empty,
    /// What came is not a PROXY header (none at all, or a broken one).
    Malformed,
    /// Closed in the middle of the header.
    Truncated,
    /// The header was not whole within the listener's `header_timeout_ms`.
    Timeout,
    /// A valid header this listener does not take: another version than configured, v1
    /// `UNKNOWN`, v2 `UNSPEC`, UDP or UNIX addresses, more than [`MAX_V2_PAYLOAD`] bytes.
    Unsupported,
    /// The client it names is banned (the kernel's ban map, auto-ban, the admin API).
    Banned,
    /// The client it names is in `kernel.deny`.
    Denied,
    /// The client's tenant is at its connection cap.
    TenantAtCap,
    /// The client's source holds its tenant's `max_connections_per_source`.
    SourceAtCap,
}

impl Reason {
    pub const ALL: [Self; 10] = [
        Self::UntrustedSource,
        Self::Empty,
        Self::Malformed,
        Self::Truncated,
        Self::Timeout,
        Self::Unsupported,
        Self::Banned,
        Self::Denied,
        Self::TenantAtCap,
        Self::SourceAtCap,
    ];

    /// Its label in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Self::UntrustedSource => "untrusted_source",
            Self::Empty => "empty",
            Self::Malformed => "malformed",
            Self::Truncated => "truncated",
            Self::Timeout => "timeout",
            Self::Unsupported => "unsupported",
            Self::Banned => "banned",
            Self::Denied => "denied",
            Self::TenantAtCap => "tenant_at_cap",
            Self::SourceAtCap => "source_at_cap",
        }
    }
}

/// Headers accepted and connections refused, over all workers (relaxed atomics).
#[derive(Debug, Default)]
pub struct Counters {
    refused: [AtomicU64; Reason::ALL.len()],
    clients: AtomicU64,
    local: AtomicU64,
}

impl Counters {
    pub fn refused(&self, reason: Reason) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }

    pub fn refuse(&self, reason: Reason) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a header accepted.
    pub fn accept(&self, header: &Header) {
        match header {
            Header::Client(_) => &self.clients,
            Header::Local => &self.local,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text of these counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP mcp_gateway_proxy_protocol_accepted_total PROXY protocol headers accepted: `proxy` names a client, `local` is the balancer's own connection (v2 LOCAL).\n# TYPE mcp_gateway_proxy_protocol_accepted_total counter\nmcp_gateway_proxy_protocol_accepted_total{{command=\"proxy\"}} {}\nmcp_gateway_proxy_protocol_accepted_total{{command=\"local\"}} {}",
            self.clients.load(Ordering::Relaxed),
            self.local.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP mcp_gateway_proxy_protocol_refused_total Connections on PROXY protocol listeners closed before HTTP, by reason.\n# TYPE mcp_gateway_proxy_protocol_refused_total counter"
        );
        for r in Reason::ALL {
            let _ = writeln!(
                out,
                "mcp_gateway_proxy_protocol_refused_total{{reason=\"{}\"}} {}",
                r.name(),
                self.refused(r)
            );
        }
    }
}

/// Whether `input` is a beginning of `signature`, or starts with all of it.
fn starts_like(input: &[u8], signature: &[u8]) -> bool {
    let n = input.len().min(signature.len());
    input[..n] == signature[..n]
}

/// Decides what `input` (the bytes received so far, from the connection's first) makes of a
/// header. Reading more never changes a decision other than [`Parsed::Incomplete`]: a header
/// is decided on its own bytes only (the `fuzz/proxy_protocol` target checks this).
pub fn parse(input: &[u8], accept: ProxyVersion) -> Parsed {
    if input.is_empty() {
        return Parsed::Incomplete;
    }
    let v2 = starts_like(input, V2_SIGNATURE);
    let v1 = starts_like(input, V1_PREFIX);
    match (v1, v2, accept) {
        (false, false, _) => Parsed::Refused(Reason::Malformed),
        // The other version than the listener takes: known once its whole signature is here
        // (until then the bytes may still turn out to be no header at all).
        (true, _, ProxyVersion::V2) if input.len() >= V1_PREFIX.len() => {
            Parsed::Refused(Reason::Unsupported)
        }
        (_, true, ProxyVersion::V1) if input.len() >= V2_SIGNATURE.len() => {
            Parsed::Refused(Reason::Unsupported)
        }
        (true, _, ProxyVersion::V2) | (_, true, ProxyVersion::V1) => Parsed::Incomplete,
        (true, _, _) => parse_v1(input),
        (_, true, _) => parse_v2(input),
    }
}

fn parse_v1(input: &[u8]) -> Parsed {
    let window = &input[..input.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|b| *b == b'\r') else {
        return if input.len() >= V1_MAX {
            Parsed::Refused(Reason::Malformed)
        } else {
            Parsed::Incomplete
        };
    };
    // The header ends at its first CR, which must be followed by LF.
    let len = cr + 2;
    let Some(bytes) = input.get(..len) else {
        return Parsed::Incomplete;
    };
    let header = match ppp::v1::Header::try_from(bytes) {
        Ok(h) => h,
        Err(_) => return Parsed::Refused(Reason::Malformed),
    };
    let client = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => SocketAddr::new(a.source_address.into(), a.source_port),
        ppp::v1::Addresses::Tcp6(a) => SocketAddr::new(a.source_address.into(), a.source_port),
        ppp::v1::Addresses::Unknown => return Parsed::Refused(Reason::Unsupported),
    };
    Parsed::Header {
        len,
        header: Header::Client(canonical(client)),
    }
}

fn parse_v2(input: &[u8]) -> Parsed {
    let Some(&[hi, lo]) = input.get(V2_FIXED - 2..V2_FIXED) else {
        return Parsed::Incomplete;
    };
    let payload = usize::from(u16::from_be_bytes([hi, lo]));
    if payload > MAX_V2_PAYLOAD {
        return Parsed::Refused(Reason::Unsupported);
    }
    let len = V2_FIXED + payload;
    // Version, command, family and protocol are judged as soon as they are here; the rest once
    // all of it is.
    let header = match ppp::v2::Header::try_from(&input[..input.len().min(len)]) {
        Ok(h) => h,
        Err(ppp::v2::ParseError::Incomplete(_) | ppp::v2::ParseError::Partial(..)) => {
            return Parsed::Incomplete;
        }
        Err(_) => return Parsed::Refused(Reason::Malformed),
    };
    if header.command == Command::Local {
        // The balancer's own connection: what else it carries is to be ignored.
        return Parsed::Header {
            len,
            header: Header::Local,
        };
    }
    if header.tlvs().any(|tlv| tlv.is_err()) {
        return Parsed::Refused(Reason::Malformed);
    }
    let client = match (header.protocol, header.addresses) {
        (Protocol::Stream, Addresses::IPv4(a)) => {
            SocketAddr::new(a.source_address.into(), a.source_port)
        }
        (Protocol::Stream, Addresses::IPv6(a)) => {
            SocketAddr::new(a.source_address.into(), a.source_port)
        }
        _ => return Parsed::Refused(Reason::Unsupported),
    };
    Parsed::Header {
        len,
        header: Header::Client(canonical(client)),
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (as the kernel's maps and the
/// classifier see it).
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Reads a header from `io` within `timeout`, leaving what follows it pending.
pub async fn read_header(
    io: &mut Io,
    accept: ProxyVersion,
    timeout: Duration,
) -> Result<Header, Reason> {
    let deadline = monoio::time::Instant::now() + timeout;
    loop {
        match parse(io.pending(), accept) {
            Parsed::Header { len, header } => {
                io.consume(len);
                return Ok(header);
            }
            Parsed::Refused(reason) => return Err(reason),
            Parsed::Incomplete => {}
        }
        match io.fill_until(deadline).await {
            Ok(n) if n > 0 => {}
            Err(HttpError::Timeout) => return Err(Reason::Timeout),
            Ok(_) | Err(_) if io.pending().is_empty() => return Err(Reason::Empty),
            Ok(_) | Err(_) => return Err(Reason::Truncated),
        }
    }
}

#[cfg(test)]
#[path = "proxy_protocol_tests.rs"]
mod tests;
