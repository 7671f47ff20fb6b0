//! TLS to an https upstream: the client configuration, built once per upstream when the
//! configuration is loaded (on the control thread: it reads files) and shared by every worker
//! through the snapshot, and the names given to the ways a handshake fails.
//!
//! Trust is the upstream's `ca_file` when given (only those CAs), else the system trust store
//! (`rustls-native-certs`: `SSL_CERT_FILE`/`SSL_CERT_DIR` or the distribution's bundle), else,
//! when that store is empty or missing, the Mozilla roots compiled in (`webpki-roots`). There is
//! never a way to turn verification off, and an https upstream is never spoken to in plaintext.
//!
//! Session resumption: the configuration's session store (rustls' in-memory cache, 256
//! sessions) is shared by all workers, so a ticket one worker got resumes on another. It takes
//! a lock once per new handshake (to take or store a ticket), never per request.

use std::{hash::Hasher as _, sync::Arc};

use rustls::{
    CertificateError, ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};

/// What the workers need to open TLS to one upstream.
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    /// Sent as SNI and verified against the certificate: the URL's host or `server_name`.
    pub server_name: ServerName<'static>,
    /// Where the trust came from, for the log.
    pub trust: &'static str,
    /// A digest of everything that defines this TLS (name, CA and client certificate files'
    /// contents): equal configurations may share pooled connections, different ones never.
    pub fingerprint: u64,
    /// The settings it was built from, to build it again when its files change.
    settings: Settings<String>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

/// The TLS settings of one upstream, as configured.
#[derive(Clone)]
pub struct Settings<S> {
    pub server_name: S,
    pub ca_file: Option<S>,
    pub client_cert: Option<S>,
    pub client_key: Option<S>,
}

impl UpstreamTls {
    /// The files it was built from (`ca_file`, `client_cert`, `client_key`).
    pub fn files(&self) -> impl Iterator<Item = &str> {
        let s = &self.settings;
        [&s.ca_file, &s.client_cert, &s.client_key]
            .into_iter()
            .filter_map(|f| f.as_deref())
    }

    /// Built again from its settings, the files read anew (a rotated client certificate, a
    /// CA replaced in place).
    pub fn reloaded(&self) -> Result<UpstreamTls, (&'static str, String)> {
        let s = &self.settings;
        build(&Settings {
            server_name: s.server_name.as_str(),
            ca_file: s.ca_file.as_deref(),
            client_cert: s.client_cert.as_deref(),
            client_key: s.client_key.as_deref(),
        })
    }
}

/// Each part of the digest with what it is and its length: a CA file holding a certificate and
/// a key is not the same TLS as that certificate and key.
fn digest_part(digest: &mut std::hash::DefaultHasher, what: u8, bytes: &[u8]) {
    digest.write_u8(what);
    digest.write_usize(bytes.len());
    digest.write(bytes);
}

/// Builds the client configuration; the error says which setting is wrong and why.
pub fn build(s: &Settings<&str>) -> Result<UpstreamTls, (&'static str, String)> {
    let mut digest = std::hash::DefaultHasher::new();
    digest_part(&mut digest, b'n', s.server_name.as_bytes());
    let server_name = ServerName::try_from(s.server_name.to_owned())
        .map_err(|e| ("server_name", format!("`{}`: {e}", s.server_name)))?;
    let mut roots = RootCertStore::empty();
    let trust = match s.ca_file {
        Some(path) => {
            let pem = read("ca_file", path)?;
            digest_part(&mut digest, b'a', &pem);
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| ("ca_file", format!("`{path}`: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| ("ca_file", format!("`{path}`: {e}")))?;
            }
            if roots.is_empty() {
                return Err(("ca_file", format!("`{path}` holds no certificate")));
            }
            "ca_file"
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added > 0 {
                "system trust store"
            } else {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                "webpki roots (the system trust store is empty)"
            }
        }
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("url", format!("TLS: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (s.client_cert, s.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let cert_pem = read("client_cert", cert)?;
            let key_pem = read("client_key", key)?;
            digest_part(&mut digest, b'c', &cert_pem);
            digest_part(&mut digest, b'k', &key_pem);
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ("client_cert", format!("`{cert}`: {e}")))?;
            if chain.is_empty() {
                return Err(("client_cert", format!("`{cert}` holds no certificate")));
            }
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| ("client_key", format!("`{key}`: {e}")))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ("client_key", format!("`{key}` does not fit `{cert}`: {e}")))?
        }
        _ => {
            return Err((
                "client_cert",
                "give both `client_cert` and `client_key`, or neither".into(),
            ));
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(UpstreamTls {
        config: Arc::new(config),
        server_name,
        trust,
        fingerprint: digest.finish(),
        settings: Settings {
            server_name: s.server_name.to_owned(),
            ca_file: s.ca_file.map(str::to_owned),
            client_cert: s.client_cert.map(str::to_owned),
            client_key: s.client_key.map(str::to_owned),
        },
    })
}

fn read(key: &'static str, path: &str) -> Result<Vec<u8>, (&'static str, String)> {
    std::fs::read(path).map_err(|e| (key, format!("cannot read `{path}`: {e}")))
}

/// The reason label of a handshake that failed: what `/metrics` counts and the client's error
/// names.
pub fn reason(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::InvalidCertificate(c) => {
            match c {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "not_yet_valid"
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => "wrong_name",
                CertificateError::UnknownIssuer => "unknown_issuer",
                CertificateError::Revoked => "revoked",
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => "wrong_purpose",
                _ => "bad_certificate",
            }
        }
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::NoApplicationProtocol => "alpn",
        _ => "protocol",
    }
}
