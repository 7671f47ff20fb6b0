//! A test PKI made fresh in each test (rcgen): a CA, server certificates for names, client
//! certificates for identities, and the bad ones (expired, from another CA), written as PEM
//! files into a temporary folder the `Pki` removes when dropped.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Which key a certificate gets.
#[derive(Clone, Copy, Debug)]
pub enum KeyKind {
    EcdsaP256,
    Rsa2048,
}

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and the folder its files live in.
pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate (PEM): what clients, or a listener checking client certificates,
    /// trust.
    pub ca: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn key(kind: KeyKind) -> KeyPair {
    match kind {
        KeyKind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyKind::Rsa2048 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        }
    }
    .expect("generate a key")
}

impl Pki {
    /// A new CA named `name`, its files in a new temporary folder.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(crate::unique(&format!("pki-{name}")));
        std::fs::create_dir_all(&dir).expect("create the PKI folder");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} test CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = key(KeyKind::EcdsaP256);
        let ca_cert = params.self_signed(&ca_key).expect("self-sign the CA");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_cert.pem()).expect("write the CA");
        Self {
            dir,
            issuer: Issuer::new(params, ca_key),
            ca,
        }
    }

    /// The folder the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn issue(&self, file: &str, mut params: CertificateParams, kind: KeyKind) -> Issued {
        let key = key(kind);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let out = Issued {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&out.cert, cert.pem()).expect("write a certificate");
        std::fs::write(&out.key, key.serialize_pem()).expect("write a key");
        out
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid now.
    pub fn server(&self, file: &str, names: &[&str], kind: KeyKind) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("server names");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file, params, kind)
    }

    /// A server certificate for `names` that expired in 2021.
    pub fn expired_server(&self, file: &str, names: &[&str]) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("server names");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        expire(&mut params);
        self.issue(file, params, KeyKind::EcdsaP256)
    }

    /// A client certificate with common name `cn` and the SAN URI `uri` (a SPIFFE id, say),
    /// if any.
    pub fn client(&self, file: &str, cn: &str, uri: Option<&str>) -> Issued {
        self.issue(file, client_params(cn, uri), KeyKind::EcdsaP256)
    }

    /// A client certificate like [`Pki::client`] that expires `seconds` from now.
    pub fn client_expiring(&self, file: &str, cn: &str, seconds: i64) -> Issued {
        let mut params = client_params(cn, None);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
        self.issue(file, params, KeyKind::EcdsaP256)
    }

    /// A client certificate like [`Pki::client`] that expired in 2021.
    pub fn expired_client(&self, file: &str, cn: &str, uri: Option<&str>) -> Issued {
        let mut params = client_params(cn, uri);
        expire(&mut params);
        self.issue(file, params, KeyKind::EcdsaP256)
    }
}

fn client_params(cn: &str, uri: Option<&str>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    if let Some(uri) = uri {
        params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("a SAN URI"))];
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

fn expire(params: &mut CertificateParams) {
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
}
