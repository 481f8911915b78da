//! The cluster CA and the certificates it issues.
//!
//! Every certificate names its holder (subject CN and DNS SAN, so that a server
//! name is also what clients verify) and its [`Role`] (subject OU). Keys are
//! written with mode 0600 and never overwritten.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use super::QuicError;
use crate::proto::Role;

/// File names inside a cluster directory.
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
const ORGANIZATION: &str = "Tessera";

/// Check that `name` can serve as a certificate subject and TLS server name:
/// a DNS label of lowercase letters, digits and inner hyphens.
pub fn validate_name(name: &str) -> Result<(), QuicError> {
    let invalid = |reason| QuicError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.len() > 63 {
        return Err(invalid("must be 1 to 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            "only lowercase letters, digits and '-' are allowed",
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(invalid("must not start or end with '-'"));
    }
    Ok(())
}

/// Paths of a certificate and its key inside a cluster directory.
pub fn cert_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// The cluster's certificate authority.
pub struct ClusterCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Make a new CA for the cluster `cluster` valid for `days`.
    pub fn generate(cluster: &str, days: u32) -> Result<Self, QuicError> {
        validate_name(cluster)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{cluster} cluster CA"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        set_validity(&mut params, days);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Load the CA certificate and key from a cluster directory.
    pub fn load(dir: &Path) -> Result<Self, QuicError> {
        let cert_pem = read_text(&dir.join(CA_CERT_FILE))?;
        let key_path = dir.join(CA_KEY_FILE);
        let key = KeyPair::from_pem(&read_text(&key_path)?).map_err(|e| QuicError::Pem {
            path: key_path,
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(ClusterCa { cert_pem, issuer })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Write `ca.crt` and `ca.key` into `dir`, refusing to overwrite either.
    pub fn save(&self, dir: &Path) -> Result<(), QuicError> {
        fs::create_dir_all(dir).map_err(|source| QuicError::File {
            action: "create directory",
            path: dir.to_path_buf(),
            source,
        })?;
        write_new(
            &dir.join(CA_KEY_FILE),
            &self.issuer.key().serialize_pem(),
            0o600,
        )?;
        write_new(&dir.join(CA_CERT_FILE), &self.cert_pem, 0o644)
    }

    /// Issue a certificate for `name` in `role`, valid for `days`.
    pub fn issue(&self, role: Role, name: &str, days: u32) -> Result<IssuedCert, QuicError> {
        validate_name(name)?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every holder is both: servers also dial each other as clients.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl IssuedCert {
    /// Write `NAME.crt` and `NAME.key` (mode 0600) into `dir`; returns their paths.
    pub fn save(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), QuicError> {
        let (cert_path, key_path) = cert_paths(dir, name);
        write_new(&key_path, &self.key_pem, 0o600)?;
        write_new(&cert_path, &self.cert_pem, 0o644)?;
        Ok((cert_path, key_path))
    }
}

fn set_validity(params: &mut CertificateParams, days: u32) {
    // Back-date a little so that clocks slightly behind still accept the certificate.
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
}

pub(crate) fn read_text(path: &Path) -> Result<String, QuicError> {
    fs::read_to_string(path).map_err(|source| QuicError::File {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), QuicError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                QuicError::AlreadyExists {
                    path: path.to_path_buf(),
                }
            } else {
                QuicError::File {
                    action: "create",
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| QuicError::File {
            action: "write",
            path: path.to_path_buf(),
            source,
        })
}
