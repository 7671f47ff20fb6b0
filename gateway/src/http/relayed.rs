//! Which of an upstream's response headers reach the client. An answer's head is kept by a
//! list, not dropped by one: what a client of MCP needs of it (its type, the session, the
//! version, when to retry), and what the operator names for the upstream
//! (`relay_response_headers`). Everything else stays with the upstream: a list of what to drop
//! always missed some header that acts beyond the one answer (`Cache-Control: public` kept one
//! caller's answer in a shared cache for the next; `Content-Security-Policy`,
//! `Service-Worker-Allowed` and `Content-Disposition` act in a browser; an attacker's review).
//! What the upstream keeps to itself ([`is_private`]) is never relayed, whatever is named.

use super::{Names, is_token};

/// Relayed from every upstream: what an MCP client reads of an answer's head.
const ALWAYS: Names<4> = Names::new([
    "content-type",
    "mcp-session-id",
    "mcp-protocol-version",
    "retry-after",
]);

/// An upstream's `relay_response_headers`: further names to relay, each exact or a prefix
/// ending in `*` (`x-ratelimit-*`); `*` alone relays every header but [`is_private`] ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relayed {
    exact: Vec<Box<str>>,
    prefixes: Vec<Box<str>>,
}

impl Relayed {
    /// The configured list, each entry checked: a field name, or one followed by `*`, that is
    /// not a name the gateway never relays.
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let mut out = Self::default();
        for entry in list {
            let lower = entry.to_ascii_lowercase();
            let (text, prefix) = match lower.strip_suffix('*') {
                Some(start) => (start, true),
                None => (lower.as_str(), false),
            };
            // `*` is a byte of a field name, but no header is named with one: it is a pattern's.
            let well_formed =
                (text.is_empty() && prefix) || (is_token(text.as_bytes()) && !text.contains('*'));
            if !well_formed {
                return Err(format!(
                    "{entry:?} is not a field name, nor the start of one followed by `*`"
                ));
            }
            // A prefix of private names only (`x-accel-*`, `set-cookie*`) would relay nothing
            // it names: refused as the names are.
            if prefix && !is_private(text) {
                out.prefixes.push(text.into());
            } else if prefix || is_private(text) || super::NOT_FORWARDED.contains(text) {
                return Err(format!(
                    "{entry:?} is never relayed: it is the upstream's own or the connection's"
                ));
            } else {
                out.exact.push(text.into());
            }
        }
        Ok(out)
    }

    /// Whether the operator named `name` (before [`is_private`] is asked).
    fn names(&self, name: &str) -> bool {
        self.exact.iter().any(|e| e.eq_ignore_ascii_case(name))
            || self.prefixes.iter().any(|p| {
                name.get(..p.len())
                    .is_some_and(|start| start.eq_ignore_ascii_case(p))
            })
    }
}

/// Whether the response header `name` goes to the client (hop-by-hop headers are asked apart:
/// they depend on the head's `Connection`).
pub fn relayed(name: &str, named: &Relayed) -> bool {
    ALWAYS.contains(name) || (named.names(name) && !is_private(name))
}

/// Response headers that are the upstream's own business, never relayed even when named: its
/// credentials, what it runs on (`Server`, `X-Powered-By`: a map for an attacker), its CORS
/// policy (the gateway is the origin the browser talks to; an upstream's
/// `Access-Control-Allow-Origin: *` would open the gateway's routes to every page), its cookies
/// (`Set-Cookie`, the obsolete `Set-Cookie2`: the gateway never forwards a client's `Cookie`),
/// and `Alt-Svc` (it would send clients around the gateway to the upstream's own endpoint). Nor
/// what would act on the gateway's origin as a whole or send the client elsewhere:
/// `Clear-Site-Data` (a browser would wipe what every route of the gateway stored), `Refresh`,
/// `Location` and `Content-Location` (another address for the answer, the upstream's), `Link`
/// (a preload or preconnect to wherever the upstream says), and `WWW-Authenticate` (the gateway
/// never forwards a client's `Authorization`: the upstream's challenge is to the gateway's own
/// credentials, and a client that followed it would sign in wherever the upstream says), nor
/// `Proxy-Authenticate` and the `*-Authentication-Info` of either. Nor
/// any `Mcp-Gateway-*`: those names are the gateway's own (`Mcp-Gateway-Budget-Remaining`), and
/// an upstream's would read as the gateway's word. Nor what a proxy in front of the gateway
/// acts on: nginx's `X-Accel-*` (`X-Accel-Redirect` had nginx serve an internal location in
/// place of the answer, the gateway's admin API or a file, and re-send the client's request,
/// its API key too, to wherever the upstream named: an attacker's review), Apache's and
/// lighttpd's `X-Sendfile*` (`X-Sendfile-Temporary` deletes the file it sends), lighttpd's
/// `X-Lighttpd-*`, perlbal's `X-Reproxy-*`, LiteSpeed's `X-LiteSpeed-*` and Envoy's
/// `X-Envoy-*`. Nor what a browser or a CDN applies to the whole origin: `NEL`, `Report-To`
/// and `Reporting-Endpoints` (every request to the gateway reported, with its URL, to the
/// upstream's endpoint), `Accept-CH`, `Service-Worker-Allowed`, `Origin-Agent-Cluster`, and
/// `Surrogate-Control`, `CDN-Cache-Control` and `Edge-Control` (a cache in front keeping one
/// caller's answer).
pub fn is_private(name: &str) -> bool {
    // `X_Accel_Redirect`: a proxy that reads `_` as `-` (as CGI and some frameworks do) acts
    // on it as on the name it stands for.
    if name.contains('_') {
        return is_private(&name.replace('_', "-"));
    }
    const DROP: Names<27> = Names::new([
        "proxy-authenticate",
        "proxy-authentication-info",
        "authentication-info",
        "nel",
        "report-to",
        "reporting-endpoints",
        "accept-ch",
        "service-worker-allowed",
        "origin-agent-cluster",
        "surrogate-control",
        "cdn-cache-control",
        "edge-control",
        "authorization",
        "server",
        "x-powered-by",
        "x-aspnet-version",
        "x-aspnetmvc-version",
        "set-cookie",
        "set-cookie2",
        "alt-svc",
        "strict-transport-security",
        "clear-site-data",
        "refresh",
        "location",
        "content-location",
        "link",
        "www-authenticate",
    ]);
    let starts = |prefix: &str| {
        name.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    DROP.contains(name)
        || starts("access-control-")
        || starts("mcp-gateway-")
        || starts("x-accel-")
        || starts("x-sendfile")
        || starts("x-lighttpd-")
        || starts("x-reproxy-")
        || starts("x-litespeed-")
        || starts("x-envoy-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(list: &[&str]) -> Relayed {
        Relayed::parse(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    /// Without a list, only what an MCP client reads passes: what acts in a browser or a cache
    /// beyond the one answer (none of which the list of private names held) does not.
    #[test]
    fn only_what_a_client_reads_is_relayed_unless_named() {
        let none = Relayed::default();
        for name in [
            "Content-Type",
            "mcp-session-id",
            "MCP-Protocol-Version",
            "retry-after",
        ] {
            assert!(relayed(name, &none), "{name}");
        }
        for name in [
            "cache-control",
            "expires",
            "content-disposition",
            "content-security-policy",
            "content-security-policy-report-only",
            "service-worker-allowed",
            "speculation-rules",
            "x-request-id",
            "x-ratelimit-remaining",
            "etag",
            "vary",
            "x-accel-redirect",
            "mcp-gateway-budget-remaining",
        ] {
            assert!(!relayed(name, &none), "{name}");
        }
    }

    /// What the operator names passes, exactly or by prefix, but never a private name, not
    /// even through `*`.
    #[test]
    fn named_headers_pass_but_never_a_private_one() {
        let some = named(&["X-Request-Id", "x-ratelimit-*"]);
        assert!(relayed("x-request-id", &some));
        assert!(relayed("X-RateLimit-Remaining", &some));
        assert!(!relayed("x-request-idx", &some));
        assert!(!relayed("cache-control", &some));
        let all = named(&["*"]);
        assert!(relayed("cache-control", &all));
        assert!(relayed("x-anything", &all));
        for name in [
            "Set-Cookie",
            "access-control-allow-origin",
            "Mcp-Gateway-Budget-Remaining",
            "X-Accel-Redirect",
            "x-sendfile",
            "Service-Worker-Allowed",
            "NEL",
        ] {
            assert!(!relayed(name, &all), "{name}");
        }
        let prefix = named(&["x-a*", "mcp-*"]);
        assert!(!relayed("x-accel-redirect", &prefix));
        assert!(!relayed("mcp-gateway-x", &prefix));
        assert!(relayed("mcp-other", &prefix));
    }

    /// A list that names what is never relayed, or what is not a field name, is refused at
    /// load, with the entry.
    #[test]
    fn a_list_naming_what_is_never_relayed_is_refused() {
        for bad in [
            "set-cookie",
            "Location",
            "content-length",
            "transfer-encoding",
            "connection",
            "x-accel-redirect",
            "x request",
            "x-a*b",
            "**",
            "",
            "a\r\nb",
            "x-accel-*",
            "Set-Cookie*",
            "access-control-*",
            "mcp-gateway-*",
        ] {
            let err = Relayed::parse(&[bad.to_owned()]).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    /// Names an upstream keeps to itself are private whatever their case; names that only look
    /// like them are not.
    #[test]
    fn an_upstreams_own_and_origin_wide_headers_are_private() {
        for name in [
            "Mcp-Gateway-Budget-Remaining",
            "mcp-gateway-budget-remaining",
            "MCP-GATEWAY-anything",
            "Clear-Site-Data",
            "Refresh",
            "Location",
            "Content-Location",
            "Link",
            "WWW-Authenticate",
            "Set-Cookie",
            "Set-Cookie2",
            "Server",
            "Access-Control-Allow-Origin",
            "Alt-Svc",
            "X-Accel-Redirect",
            "x-accel-limit-rate",
            "X-Accel-Buffering",
            "X-Sendfile",
            "X-LIGHTTPD-send-file",
            "X-Lighttpd-Send-Tempfile",
            "X-Reproxy-URL",
            "X-LiteSpeed-Location",
            "x-envoy-immediate-health-check-fail",
            "X-Sendfile-Temporary",
            "X-Sendfile2",
            "X-Reproxy-File",
            "X-Reproxy-Service",
            "NEL",
            "Report-To",
            "Reporting-Endpoints",
            "Accept-CH",
            "Surrogate-Control",
            "CDN-Cache-Control",
            "Edge-Control",
            "Service-Worker-Allowed",
            "Proxy-Authenticate",
            "X_Accel_Redirect",
            "set_cookie",
        ] {
            assert!(is_private(name), "{name}");
        }
        for name in [
            "content-type",
            "mcp-session-id",
            "mcp-protocol-version",
            "retry-after",
            "cache-control",
            "mcp-gateway",
            "mcp-gatewa",
            "x-mcp-gateway-budget-remaining",
            "etag",
            "x-accel",
            "x-request-id",
        ] {
            assert!(!is_private(name), "{name}");
        }
    }
}
