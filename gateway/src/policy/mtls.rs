//! Client certificates as a credential (the `mtls` route auth method): the names a verified
//! leaf certificate carries (SAN URIs such as SPIFFE ids, SAN DNS names, the subject CN) and
//! the `[[auth.mtls]]` table that maps them to a tenant and agent.
//!
//! The chain was verified by rustls against the listener's `client_ca` during the handshake;
//! this module reads names from a certificate that passed, never accepts one that maps to two
//! different callers, and, for an entry that names its `ca`, verifies the chain again against
//! that CA alone: a name is only as good as the CA that vouched for it, and a listener may
//! trust several (each listener's CA vouched for the mapping's names before, so a partner CA
//! trusted on one listener could issue `CN=alice` and be alice).

use std::{collections::HashMap, sync::Arc};

use rustls::{pki_types::CertificateDer, server::danger::ClientCertVerifier};

use crate::config::{Config, ConfigError};

/// The names of a verified client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCert {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    /// Every common name of the subject: a certificate may carry several, and software that
    /// reads the last would name another caller than one that reads the first.
    pub cns: Vec<String>,
    /// The chain as presented (leaf first), for entries that name their CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// When the first certificate of the chain to expire does (Unix seconds), if known: a
    /// connection is served no request after it, as a new handshake would be refused.
    pub expires: Option<i64>,
}

impl PeerCert {
    /// The names in a DER certificate (none if it does not parse: such a certificate maps to
    /// no caller).
    pub fn from_der(der: &[u8]) -> Self {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return Self::default();
        };
        let mut out = Self {
            cns: cert
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_owned)
                .collect(),
            ..Self::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::URI(u) => out.uris.push((*u).to_owned()),
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        out.dns.push(d.to_ascii_lowercase());
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// The leaf certificate a TLS client presented, if any.
    pub fn of(conn: &rustls::Connection) -> Option<Self> {
        let chain = conn.peer_certificates()?;
        let mut cert = Self::from_der(chain.first()?);
        cert.chain = chain.to_vec();
        Some(cert)
    }

    /// [`PeerCert::of`], with when its chain expires: what a connection keeps of it (once, at
    /// its handshake).
    pub fn kept_of(conn: &rustls::Connection) -> Option<Self> {
        let mut cert = Self::of(conn)?;
        cert.expires = cert
            .chain
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .min();
        Some(cert)
    }

    /// Whether a certificate of its chain has expired (by the clock now).
    pub fn expired(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.expires.is_some_and(|t| t < now)
    }

    /// For messages: the names, shortest form.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.uris.iter().map(|u| format!("uri {u}")).collect();
        parts.extend(self.dns.iter().map(|d| format!("dns {d}")));
        parts.extend(self.cns.iter().map(|c| format!("cn {c}")));
        if parts.is_empty() {
            "no names".into()
        } else {
            parts.join(", ")
        }
    }
}

/// What the connection offers as a client certificate.
#[derive(Debug, Clone, Copy)]
pub enum ClientCert<'a> {
    /// The connection is plaintext: no certificate can be presented.
    Plaintext,
    /// TLS, and the client presented no certificate.
    Absent,
    /// TLS, with this verified certificate.
    Present(&'a PeerCert),
}

/// Whom a certificate names.
#[derive(Debug, PartialEq, Eq)]
pub enum Mapped {
    /// None of its names is mapped.
    Nobody,
    /// (tenant index, agent, and with no agent the names it was mapped by: see
    /// [`super::Identity::own`]).
    Caller(usize, Option<String>, String),
    /// Its names map to different callers.
    Ambiguous,
}

/// One `[[auth.mtls]]` entry: the caller (tenant index, agent), and the CA that must have
/// issued the certificate (an index into [`Mapping::cas`]), if the entry names one.
type Entry = ((usize, Option<String>), Option<usize>);

/// `[[auth.mtls]]`, compiled: names → entries.
#[derive(Debug, Default)]
pub struct Mapping {
    uris: HashMap<String, Entry>,
    dns: HashMap<String, Entry>,
    cns: HashMap<String, Entry>,
    /// The CAs entries name, each as a verifier that trusts it alone.
    cas: Vec<Arc<dyn ClientCertVerifier>>,
}

/// A verifier of client certificates issued by the CA(s) in `path` alone.
fn verifier_of(path: &str) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in crate::tls::read_certs(std::path::Path::new(path))? {
        roots
            .add(ca)
            .map_err(|e| format!("`{path}`: not a CA certificate: {e}"))?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()
    .map_err(|e| format!("`{path}`: {e}"))
}

impl Mapping {
    pub fn compile(c: &Config, by_name: &HashMap<String, usize>) -> Result<Self, ConfigError> {
        let mut m = Self::default();
        for (i, e) in c.auth.mtls.iter().enumerate() {
            let key = |f: &str| format!("auth.mtls[{i}].{f}");
            let invalid = |k: String, p: String| ConfigError::Invalid { key: k, problem: p };
            let Some(tenant) = by_name.get(&e.tenant) else {
                return Err(invalid(
                    key("tenant"),
                    format!("no tenant is named `{}`", e.tenant),
                ));
            };
            let ca = match &e.ca {
                None => None,
                Some(path) => {
                    let verifier = verifier_of(path).map_err(|p| invalid(key("ca"), p))?;
                    m.cas.push(verifier);
                    Some(m.cas.len() - 1)
                }
            };
            let (table, field, name) = match (&e.uri, &e.dns, &e.cn) {
                (Some(u), None, None) => (&mut m.uris, "uri", u.clone()),
                (None, Some(d), None) => (&mut m.dns, "dns", d.to_ascii_lowercase()),
                (None, None, Some(c)) => (&mut m.cns, "cn", c.clone()),
                _ => {
                    return Err(invalid(
                        format!("auth.mtls[{i}]"),
                        "give exactly one of `uri`, `dns` and `cn`".into(),
                    ));
                }
            };
            if name.is_empty() {
                return Err(invalid(key(field), "must not be empty".into()));
            }
            if table
                .insert(name, ((*tenant, e.agent.clone()), ca))
                .is_some()
            {
                return Err(invalid(key(field), "is mapped twice".into()));
            }
        }
        let cas = trusted_client_cas(c);
        let unbound = c.auth.mtls.iter().filter(|e| e.ca.is_none()).count();
        if cas > 1 && unbound > 0 {
            tracing::warn!(
                client_cas = cas,
                entries = unbound,
                "listeners trust {cas} client CAs, and {unbound} [[auth.mtls]] entries name no `ca`: a certificate of any of them that carries such an entry's name maps to its caller",
            );
        }
        Ok(m)
    }

    /// The caller `cert` names; names that map to different callers are never resolved to
    /// one of them.
    pub fn caller(&self, cert: &PeerCert) -> Mapped {
        let vouched = |ca: usize| match (self.cas.get(ca), cert.chain.split_first()) {
            (Some(v), Some((leaf, intermediates))) => v
                .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
                .is_ok(),
            _ => false,
        };
        // Each name that maps, with its kind (`uri`, `dns`, `cn`) and whom it maps to.
        type Found<'c> = (&'static str, &'c String, &'c (usize, Option<String>));
        let found: Vec<Found<'_>> = cert
            .uris
            .iter()
            .filter_map(|u| Some(("uri", u, self.uris.get(u)?)))
            .chain(
                cert.dns
                    .iter()
                    .filter_map(|d| Some(("dns", d, self.dns.get(d)?))),
            )
            .chain(
                cert.cns
                    .iter()
                    .filter_map(|c| Some(("cn", c, self.cns.get(c)?))),
            )
            // An entry that names its CA applies only to a certificate that CA issued.
            .filter(|(_, _, (_, ca))| ca.is_none_or(vouched))
            .map(|(kind, name, (caller, _))| (kind, name, caller))
            .collect();
        match found.split_first() {
            None => Mapped::Nobody,
            Some(((_, _, (tenant, agent)), rest))
                if rest.iter().all(|(_, _, o)| o.0 == *tenant && o.1 == *agent) =>
            {
                // With no agent, the names it was mapped by are the caller, in one order.
                let names = if agent.is_none() {
                    let mut names: Vec<String> = found
                        .iter()
                        .map(|(kind, name, _)| format!("{kind}:{name}"))
                        .collect();
                    names.sort_unstable();
                    names.dedup();
                    names.join("\0")
                } else {
                    String::new()
                };
                Mapped::Caller(*tenant, agent.clone(), names)
            }
            Some(_) => Mapped::Ambiguous,
        }
    }
}

/// How many CA certificates the listeners trust for client certificates: the certificates,
/// not the files (one bundle of two CAs trusts both; a count of files missed it: an attacker's
/// review). A file unreadable here counts as one (the listener's own check says why).
fn trusted_client_cas(c: &Config) -> usize {
    use rustls::pki_types::pem::PemObject as _;
    let cas: std::collections::BTreeSet<Vec<u8>> = c
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref()?.client_ca.as_ref())
        .flat_map(|path| {
            let certs: Vec<Vec<u8>> = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .map(|i| i.filter_map(Result::ok).map(|c| c.to_vec()).collect())
                .unwrap_or_default();
            if certs.is_empty() {
                vec![path.as_os_str().as_encoded_bytes().to_vec()]
            } else {
                certs
            }
        })
        .collect();
    cas.len()
}

#[cfg(test)]
#[path = "mtls_tests.rs"]
mod tests;
