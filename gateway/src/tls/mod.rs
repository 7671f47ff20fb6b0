//! TLS termination on the listeners (and the admin listener): building each listener's
//! `rustls::ServerConfig` from PEM files, choosing a certificate by SNI, running the server
//! handshake on a worker's connection, and counting what happens.
//!
//! The control thread owns the files: it builds the configurations at start and on every
//! reload (SIGHUP, `POST /reload`, a certificate file changing) and publishes them through
//! `ArcSwap`s that workers read without a lock, once per connection. A new file that does not
//! load (unparseable, a key that does not match its certificate, an expired certificate) is
//! refused whole and the running configuration stays. Workers never read a file.
//!
//! Sessions resume within one listener and one client-certificate setting ([`Resumption`]): a
//! ticket key set (rotated by rustls) and a session cache per listener and per `client_ca` and
//! `client_auth`, kept across reloads that leave those alone, so a client resumes whichever
//! worker or reload it meets. rustls resumes any session its ticketer or cache gives back, with
//! the client certificate it was made with and without asking whether this configuration would
//! have accepted it: one store for every listener let a session made without a certificate, or
//! with one from another listener's CA, resume where a certificate of this CA is required, and
//! a CA taken out by a reload stayed trusted for as long as its sessions lived. A resumed
//! session's certificate is also verified again ([`accept`]): one that expired since is refused.

pub mod admin;

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::UnixTime,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier, danger::ClientCertVerifier},
    sign::CertifiedKey,
};

use crate::{
    config::{ClientAuth, Config, Tls, UnknownSni},
    http::{HandshakeError, Io},
};

/// What one TLS listener serves now.
pub struct Listening {
    pub server: Arc<ServerConfig>,
    pub handshake_timeout: Duration,
    resolver: Arc<SniResolver>,
    /// The client-certificate verifier (none without `client_ca`): run again on a resumed
    /// session's certificate, and on an open connection's after a reload ([`vouches`]).
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// This configuration's number, unique in the process: a connection whose certificate was
    /// verified under another is verified again ([`vouches`]).
    pub serial: u64,
}

impl std::fmt::Debug for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listening")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// Why a handshake failed, as counted in `mcp_gateway_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not finished within the handshake timeout (a silent or slow client).
    Timeout,
    /// The client closed (or the socket failed) first.
    Closed,
    /// The first bytes were not a TLS record (plaintext HTTP to a TLS port, say).
    NotTls,
    /// The client named a server (SNI) no certificate covers, and `unknown_sni = "refuse"`.
    UnknownSni,
    /// No client certificate where `client_auth = "required"`.
    NoClientCertificate,
    /// A client certificate that does not verify (expired, another CA, wrong usage).
    BadCertificate,
    /// Nothing in common: protocol version, cipher suite, key exchange or ALPN protocol.
    Incompatible,
    /// Anything else the client got wrong.
    Protocol,
}

impl Failure {
    pub const ALL: [Self; 8] = [
        Self::Timeout,
        Self::Closed,
        Self::NotTls,
        Self::UnknownSni,
        Self::NoClientCertificate,
        Self::BadCertificate,
        Self::Incompatible,
        Self::Protocol,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::NotTls => "not_tls",
            Self::UnknownSni => "unknown_sni",
            Self::NoClientCertificate => "no_client_certificate",
            Self::BadCertificate => "bad_certificate",
            Self::Incompatible => "incompatible",
            Self::Protocol => "protocol",
        }
    }
}

/// Counters (workers and the control thread add, `/metrics` reads).
#[derive(Default)]
pub struct Stats {
    pub handshakes: AtomicU64,
    pub resumed: AtomicU64,
    failures: [AtomicU64; Failure::ALL.len()],
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl Stats {
    pub fn failed(&self, why: Failure) {
        self.failures[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn failures(&self, why: Failure) -> u64 {
        self.failures[why as usize].load(Ordering::Relaxed)
    }
}

/// The TLS state every worker and the control thread share.
pub struct Edge {
    /// Per listener (by index in `Config::listeners`): what it serves, none for plaintext.
    listeners: Box<[ArcSwapOption<Listening>]>,
    pub admin: ArcSwapOption<Listening>,
    /// Where sessions resume, by [`Resumption::key`]; only the control thread builds
    /// configurations, so the lock is never taken on a connection.
    resumption: std::sync::Mutex<std::collections::HashMap<[u8; 32], Resumption>>,
    pub stats: Stats,
}

/// The session store of one listener under one client-certificate setting: a session resumes
/// only where it was made and under the CA and mode that accepted its certificate.
#[derive(Clone)]
struct Resumption {
    /// TLS 1.3 (and 1.2) session tickets: one key set, rotated by rustls, for all workers and
    /// across reloads. None if the system's RNG failed (then only the cache resumes).
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    /// Session-id resumption (TLS 1.2 clients without tickets); rustls guards it with a mutex
    /// taken during handshakes only.
    cache: Arc<dyn rustls::server::StoresServerSessions>,
}

impl Resumption {
    fn new() -> Self {
        Self {
            ticketer: match rustls::crypto::aws_lc_rs::Ticketer::new() {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!("TLS session tickets are off: {e}");
                    None
                }
            },
            cache: rustls::server::ServerSessionMemoryCache::new(16 * 1024),
        }
    }

    /// The listener (its key in the configuration) and what its client certificates are
    /// checked against: the mode and every CA certificate, in the file's order.
    fn key(listener: &str, client_auth: Option<(ClientAuth, &[CertificateDer<'_>])>) -> [u8; 32] {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update((listener.len() as u64).to_le_bytes());
        h.update(listener.as_bytes());
        match client_auth {
            None => h.update(b"no client certificates"),
            Some((mode, cas)) => {
                h.update(match mode {
                    ClientAuth::Required => b"required",
                    ClientAuth::Optional => b"optional",
                });
                for ca in cas {
                    h.update((ca.len() as u64).to_le_bytes());
                    h.update(ca.as_ref());
                }
            }
        }
        h.finalize().into()
    }
}

/// Every TLS configuration of a gateway configuration, built and not yet published.
pub struct Prepared {
    listeners: Vec<Option<Arc<Listening>>>,
    admin: Option<Arc<Listening>>,
    /// The session stores these configurations use: published, the others are dropped.
    resumption: Vec<[u8; 32]>,
}

impl Edge {
    pub fn new(listeners: usize) -> Self {
        Self {
            listeners: (0..listeners).map(|_| ArcSwapOption::empty()).collect(),
            admin: ArcSwapOption::empty(),
            resumption: std::sync::Mutex::default(),
            stats: Stats::default(),
        }
    }

    /// What listener `index` serves now (none: plaintext).
    pub fn listener(&self, index: usize) -> Option<Arc<Listening>> {
        self.listeners.get(index).and_then(ArcSwapOption::load_full)
    }

    /// Whether listener `index` as it is now still accepts a client certificate `chain` its
    /// handshake verified under configuration `serial` (the listener's [`Listening::serial`]
    /// then): `Some(serial)` of the configuration that accepts it (verified again if it is
    /// another), `None` when it does not ([`vouches`]).
    pub fn still_vouches(
        &self,
        index: usize,
        serial: u64,
        chain: &[CertificateDer<'static>],
    ) -> Option<u64> {
        let slot = self.listeners.get(index)?;
        let now = slot.load();
        let listening = now.as_deref()?;
        (listening.serial == serial || vouches(chain, listening)).then_some(listening.serial)
    }

    /// Reads every certificate, key and CA file `config` names and builds its TLS
    /// configurations; the first problem refuses them all, naming the key and the file.
    pub fn prepare(&self, config: &Config) -> Result<Prepared, String> {
        let mut resumption = Vec::new();
        let mut listeners = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            listeners.push(
                l.tls
                    .as_ref()
                    .map(|t| self.build(t, &format!("listeners[{i}].tls"), &mut resumption))
                    .transpose()?,
            );
        }
        let admin = config
            .admin_tls
            .as_ref()
            .map(|t| self.build(t, "admin.tls", &mut resumption))
            .transpose()?;
        Ok(Prepared {
            listeners,
            admin,
            resumption,
        })
    }

    /// Makes `prepared` what new connections get; established connections keep theirs. The
    /// session stores no listener uses now are dropped: their sessions resume nowhere.
    pub fn publish(&self, prepared: Prepared) {
        for (slot, l) in self.listeners.iter().zip(prepared.listeners) {
            slot.store(l);
        }
        self.admin.store(prepared.admin);
        if let Ok(mut stores) = self.resumption.lock() {
            stores.retain(|key, _| prepared.resumption.contains(key));
        }
    }

    /// The session store for `listener` under `client_auth`: the one it had, or a new one.
    fn resumption(
        &self,
        listener: &str,
        client_auth: Option<(ClientAuth, &[CertificateDer<'_>])>,
        used: &mut Vec<[u8; 32]>,
    ) -> Resumption {
        let key = Resumption::key(listener, client_auth);
        used.push(key);
        match self.resumption.lock() {
            Ok(mut stores) => stores.entry(key).or_insert_with(Resumption::new).clone(),
            // Poisoned (a panic elsewhere): a store of its own, nothing shared.
            Err(_) => Resumption::new(),
        }
    }

    fn build(
        &self,
        tls: &Tls,
        key: &str,
        used: &mut Vec<[u8; 32]>,
    ) -> Result<Arc<Listening>, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut certs = Vec::new();
        for (i, files) in tls.certificates.iter().enumerate() {
            let cert = load_certified(&files.cert, &files.key, &provider)
                .map_err(|e| format!("{key}.certificates[{i}]: {e}"))?;
            certs.push(cert);
        }
        let resolver = Arc::new(SniResolver::new(certs, tls.unknown_sni));
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("{key}: {e}"))?;
        let mut verifier: Option<Arc<dyn ClientCertVerifier>> = None;
        let resumption;
        let builder = match &tls.client_ca {
            None => {
                resumption = self.resumption(key, None, used);
                builder.with_no_client_auth()
            }
            Some(path) => {
                let mut roots = RootCertStore::empty();
                let cas = read_certs(path).map_err(|e| format!("{key}.client_ca: {e}"))?;
                resumption = self.resumption(key, Some((tls.client_auth, &cas)), used);
                for ca in cas {
                    roots.add(ca).map_err(|e| {
                        format!(
                            "{key}.client_ca: `{}`: not a CA certificate: {e}",
                            path.display()
                        )
                    })?;
                }
                let client_verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                );
                let client_verifier = match tls.client_auth {
                    ClientAuth::Required => client_verifier,
                    ClientAuth::Optional => client_verifier.allow_unauthenticated(),
                };
                let built = client_verifier
                    .build()
                    .map_err(|e| format!("{key}.client_ca: {e}"))?;
                verifier = Some(Arc::clone(&built));
                builder.with_client_cert_verifier(built)
            }
        };
        let mut server = builder.with_cert_resolver(Arc::clone(&resolver) as _);
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        server.session_storage = resumption.cache;
        if let Some(t) = resumption.ticketer {
            server.ticketer = t;
        }
        static SERIAL: AtomicU64 = AtomicU64::new(1);
        Ok(Arc::new(Listening {
            server: Arc::new(server),
            handshake_timeout: tls.handshake_timeout,
            resolver,
            verifier,
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
        }))
    }
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("`{}`: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{}`: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("`{}` holds no certificate", path.display()));
    }
    Ok(certs)
}

/// One certificate chain with its key, checked: both parse, the key is the certificate's, and
/// the certificate is valid now.
fn load_certified(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, Vec<String>), String> {
    let chain = read_certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("`{}`: no private key: {e}", key.display()))?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("`{}`: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "`{}` is not the key of `{}`: {e}",
            key.display(),
            cert.display()
        )
    })?;
    let leaf = certified
        .cert
        .first()
        .ok_or_else(|| format!("`{}` holds no certificate", cert.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("`{}`: {e}", cert.display()))?;
    let validity = parsed.validity();
    if !validity.is_valid() {
        return Err(format!(
            "`{}` is not valid now (valid from {} to {})",
            cert.display(),
            validity.not_before,
            validity.not_after
        ));
    }
    let mut names: Vec<String> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        // A certificate without DNS names: its subject CN (what old clients matched).
        names.extend(
            parsed
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok((certified, names))
}

/// Chooses a certificate by the client's SNI: an exact name first, then a wildcard
/// (`*.example.com` covers one label); among certificates covering the name, the first whose
/// key can sign with a scheme the client offers (so an ECDSA and an RSA certificate for one
/// name serve both kinds of client). No SNI: the first certificate.
#[derive(Debug)]
struct SniResolver {
    certs: Vec<(Arc<CertifiedKey>, Vec<String>)>,
    unknown: UnknownSni,
}

impl SniResolver {
    fn new(certs: Vec<(CertifiedKey, Vec<String>)>, unknown: UnknownSni) -> Self {
        Self {
            certs: certs.into_iter().map(|(c, n)| (Arc::new(c), n)).collect(),
            unknown,
        }
    }

    fn covers(pattern: &str, name: &str) -> bool {
        match pattern.strip_prefix("*.") {
            Some(suffix) => name
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => pattern == name,
        }
    }

    /// Whether some certificate covers `name`.
    fn knows(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.certs
            .iter()
            .any(|(_, names)| names.iter().any(|p| Self::covers(p, &name)))
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let first = || self.certs.first().map(|(c, _)| Arc::clone(c));
        let Some(name) = hello.server_name() else {
            return first();
        };
        let name = name.to_ascii_lowercase();
        let schemes = hello.signature_schemes();
        let mut covering = Vec::new();
        for exact in [true, false] {
            for (c, names) in &self.certs {
                if names
                    .iter()
                    .any(|p| p.starts_with("*.") != exact && Self::covers(p, &name))
                {
                    covering.push(c);
                }
            }
            if !covering.is_empty() {
                break;
            }
        }
        if let Some(c) = covering
            .iter()
            .find(|c| c.key.choose_scheme(schemes).is_some())
            .or(covering.first())
        {
            return Some(Arc::clone(c));
        }
        match self.unknown {
            UnknownSni::Default => first(),
            // rustls answers with a fatal alert.
            UnknownSni::Refuse => None,
        }
    }
}

/// Runs the server handshake of `listening` on a fresh connection (after anything that must
/// come before it, such as a PROXY protocol header: bytes already read are taken as the
/// client's first records). Whether the connection can go on; a failure is counted by reason
/// and the connection is to be closed (the alert, if any, was sent).
pub async fn accept(io: &mut Io, listening: &Listening, stats: &Stats) -> bool {
    let deadline = monoio::time::Instant::now() + listening.handshake_timeout;
    let conn = match rustls::ServerConnection::new(Arc::clone(&listening.server)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot start a TLS session: {e}");
            stats.failed(Failure::Protocol);
            return false;
        }
    };
    match io
        .handshake(rustls::Connection::Server(conn), deadline)
        .await
    {
        Ok(()) => match io.tls() {
            Some(rustls::Connection::Server(s)) => finished(s, listening, stats),
            _ => true,
        },
        Err(e) => {
            let sni = match io.tls() {
                Some(rustls::Connection::Server(s)) => s.server_name(),
                _ => None,
            };
            let why = classify(&e, sni, &listening.resolver);
            tracing::debug!(reason = why.label(), "TLS handshake failed: {e}");
            stats.failed(why);
            false
        }
    }
}

/// Counts a completed handshake (and a resumed one), and says whether the connection may go
/// on: a resumed session's client certificate must still be accepted ([`still_accepted`]).
/// For the listeners and the admin listener alike.
pub(crate) fn finished(
    session: &rustls::ServerConnection,
    listening: &Listening,
    stats: &Stats,
) -> bool {
    stats.handshakes.fetch_add(1, Ordering::Relaxed);
    if !matches!(
        session.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    ) {
        return true;
    }
    stats.resumed.fetch_add(1, Ordering::Relaxed);
    match still_accepted(session.peer_certificates(), listening) {
        Ok(()) => true,
        Err(why) => {
            tracing::debug!(
                reason = why.label(),
                "a resumed TLS session's client certificate is no longer accepted"
            );
            stats.failed(why);
            false
        }
    }
}

/// Whether a resumed session's client certificate (`peer`, as the session kept it) would be
/// accepted by the listener now: verified again, at this time (it may have expired since the
/// session was made), and present where the listener requires one.
fn still_accepted(
    peer: Option<&[CertificateDer<'static>]>,
    listening: &Listening,
) -> Result<(), Failure> {
    let Some(verifier) = &listening.verifier else {
        return Ok(());
    };
    match peer {
        Some([end_entity, intermediates @ ..]) => verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|_| Failure::BadCertificate),
        _ if verifier.client_auth_mandatory() => Err(Failure::NoClientCertificate),
        _ => Ok(()),
    }
}

/// Whether `listening` accepts the client certificate `chain` an open connection's handshake
/// verified under an earlier configuration: a CA a reload took out of `client_ca` (or
/// `client_ca` itself gone) vouches for it no longer, and one expired since is refused, as a
/// new handshake's (an attacker's review: a keep-alive connection of a removed CA was served
/// for as long as it lasted).
pub fn vouches(chain: &[CertificateDer<'static>], listening: &Listening) -> bool {
    listening.verifier.is_some()
        && !chain.is_empty()
        && still_accepted(Some(chain), listening).is_ok()
}

fn classify(e: &HandshakeError, sni: Option<&str>, resolver: &SniResolver) -> Failure {
    use rustls::Error as E;
    match e {
        HandshakeError::Timeout => Failure::Timeout,
        HandshakeError::Closed => Failure::Closed,
        HandshakeError::Tls(e) => match e {
            E::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
                | rustls::InvalidMessage::UnknownProtocolVersion,
            ) => Failure::NotTls,
            E::NoCertificatesPresented => Failure::NoClientCertificate,
            E::InvalidCertificate(_) => Failure::BadCertificate,
            E::NoApplicationProtocol | E::PeerIncompatible(_) => Failure::Incompatible,
            E::General(_) if sni.is_some_and(|n| !resolver.knows(n)) => Failure::UnknownSni,
            _ => Failure::Protocol,
        },
    }
}

/// The `mcp_gateway_tls_*` series.
pub fn render_metrics(edge: &Edge, out: &mut String) {
    use std::fmt::Write as _;
    let s = &edge.stats;
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_tls_handshakes_total TLS handshakes completed on the listeners.\n# TYPE mcp_gateway_tls_handshakes_total counter\nmcp_gateway_tls_handshakes_total {}",
        s.handshakes.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_tls_resumed_total TLS handshakes that resumed a session (ticket or cache).\n# TYPE mcp_gateway_tls_resumed_total counter\nmcp_gateway_tls_resumed_total {}",
        s.resumed.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_tls_handshake_failures_total TLS handshakes that failed (the connection was closed), by reason.\n# TYPE mcp_gateway_tls_handshake_failures_total counter"
    );
    for why in Failure::ALL {
        let _ = writeln!(
            out,
            "mcp_gateway_tls_handshake_failures_total{{reason=\"{}\"}} {}",
            why.label(),
            s.failures(why)
        );
    }
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_tls_reloads_total Certificate sets loaded and published after start.\n# TYPE mcp_gateway_tls_reloads_total counter\nmcp_gateway_tls_reloads_total {}",
        s.reloads.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_tls_reload_failures_total Certificate reloads refused (the running certificates were kept).\n# TYPE mcp_gateway_tls_reload_failures_total counter\nmcp_gateway_tls_reload_failures_total {}",
        s.reload_failures.load(Ordering::Relaxed)
    );
}

/// One TLS file as the reload watcher saw it: its path, and its modification time, length and
/// inode (none if it could not be read).
pub type Stamp = (
    std::path::PathBuf,
    Option<(std::time::SystemTime, u64, u64)>,
);

/// What the reload watcher compares: each TLS file's modification time, length and inode.
pub fn stamps(config: &Config) -> Vec<Stamp> {
    config
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref())
        .chain(config.admin_tls.as_ref())
        .flat_map(Tls::files)
        .map(|p| stamp(p))
        .collect()
}

/// The same of the https upstreams' files (`ca_file`, `client_cert`, `client_key`).
pub fn upstream_stamps(config: &Config) -> Vec<Stamp> {
    config
        .upstreams
        .iter()
        .filter_map(|u| u.tls.as_deref())
        .flat_map(crate::endpoints::UpstreamTls::files)
        .map(|p| stamp(std::path::Path::new(p)))
        .collect()
}

fn stamp(path: &std::path::Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())));
    (path.to_owned(), meta)
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
