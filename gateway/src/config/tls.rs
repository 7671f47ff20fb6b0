//! The TLS part of the configuration file: `[listeners.tls]` and `[admin.tls]` (one shape for
//! both) and the `[[auth.mtls]]` mapping of client certificates to callers. Only the shape is
//! checked here; the files are read and judged by `crate::tls` when the gateway starts or
//! reloads, so that a broken certificate refuses a reload without touching the running one.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chains (leaf first) and their PEM private keys (ECDSA, RSA or Ed25519).
    /// The certificate whose names (SAN DNS entries) match the client's SNI is served; the
    /// first one to clients that send no SNI.
    pub certificates: Vec<RawCertificate>,
    /// What a client naming a server (SNI) that no certificate covers gets: `refuse` (a fatal
    /// alert; the default) or `default` (the first certificate).
    #[serde(default)]
    pub unknown_sni: UnknownSni,
    /// A handshake not finished within this closes the connection (default: the HTTP request
    /// timeout).
    #[serde(default)]
    pub handshake_timeout_ms: Option<u64>,
    /// PEM bundle of the CAs whose client certificates are accepted (mTLS). Without it, no
    /// client certificate is asked for.
    #[serde(default)]
    pub client_ca: Option<String>,
    /// With `client_ca`: `required` (a handshake without a valid client certificate fails; the
    /// default) or `optional` (a certificate, when sent, must be valid).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    /// PEM file: the certificate, then its intermediates.
    pub cert: String,
    /// PEM file: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSni {
    #[default]
    Refuse,
    Default,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    Required,
    Optional,
}

/// A validated `tls` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Tls {
    pub certificates: Vec<CertificateFiles>,
    pub unknown_sni: UnknownSni,
    pub handshake_timeout: Duration,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    /// Every file the section names, for the reload watcher.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        self.certificates
            .iter()
            .flat_map(|c| [&c.cert, &c.key])
            .chain(self.client_ca.as_ref())
    }
}

impl RawTls {
    /// Checks the shape; `key` names the section (`listeners[0].tls`).
    pub fn validate(self, key: &str, request_timeout: Duration) -> Result<Tls, ConfigError> {
        if self.certificates.is_empty() {
            return Err(invalid(
                format!("{key}.certificates"),
                "name at least one { cert, key } pair",
            ));
        }
        if self.certificates.len() > 64 {
            return Err(invalid(format!("{key}.certificates"), "at most 64"));
        }
        let mut certificates = Vec::new();
        for (i, c) in self.certificates.into_iter().enumerate() {
            for (f, v) in [("cert", &c.cert), ("key", &c.key)] {
                if v.is_empty() {
                    return Err(invalid(
                        format!("{key}.certificates[{i}].{f}"),
                        "must name a PEM file",
                    ));
                }
            }
            certificates.push(CertificateFiles {
                cert: c.cert.into(),
                key: c.key.into(),
            });
        }
        if self.client_auth.is_some() && self.client_ca.is_none() {
            return Err(invalid(
                format!("{key}.client_auth"),
                "needs `client_ca` (the CAs whose client certificates are accepted)",
            ));
        }
        let handshake_timeout = match self.handshake_timeout_ms {
            None => request_timeout,
            Some(0) => {
                return Err(invalid(
                    format!("{key}.handshake_timeout_ms"),
                    "must be above 0",
                ));
            }
            Some(ms) => Duration::from_millis(ms),
        };
        Ok(Tls {
            certificates,
            unknown_sni: self.unknown_sni,
            handshake_timeout,
            client_ca: self.client_ca.map(PathBuf::from),
            client_auth: self.client_auth.unwrap_or_default(),
        })
    }
}

/// `[[auth.mtls]]`: a verified client certificate naming this (by SAN URI, SAN DNS name or
/// subject CN; exactly one of them) is this caller.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMtlsIdentity {
    /// A SAN URI, e.g. a SPIFFE id `spiffe://example.org/agent/a`.
    #[serde(default)]
    pub uri: Option<String>,
    /// A SAN DNS name.
    #[serde(default)]
    pub dns: Option<String>,
    /// The subject's common name.
    #[serde(default)]
    pub cn: Option<String>,
    /// The CA (a PEM file, one of those a listener's `client_ca` trusts) that must have issued
    /// the certificate for this entry to apply. Needed where listeners trust more than one CA
    /// (a partner's, say): without it, a certificate of any trusted CA that carries this name
    /// maps here.
    #[serde(default)]
    pub ca: Option<String>,
    pub tenant: String,
    #[serde(default)]
    pub agent: Option<String>,
}
