//! Who is on the other end: the role and name carried by a verified certificate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::QuicError;
use super::certs::{CA_CERT_FILE, cert_paths, read_text};
use crate::proto::Role;

/// The identity a certificate carries: its holder's name and role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.name)
    }
}

impl PeerIdentity {
    /// Read role (subject OU) and name (subject CN) from a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, QuicError> {
        let bad = |reason: String| QuicError::BadIdentity { reason };
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| bad("no common name".into()))?
            .to_string();
        let role = subject
            .iter_organizational_unit()
            .next()
            .and_then(|ou| ou.as_str().ok())
            .ok_or_else(|| bad("no organizational unit (role)".into()))?
            .parse::<Role>()
            .map_err(|e| bad(e.to_string()))?;
        Ok(PeerIdentity { role, name })
    }
}

/// This process's own TLS material: the cluster CA, its certificate and key.
pub struct TlsIdentity {
    pub(crate) ca: CertificateDer<'static>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    me: PeerIdentity,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            me: self.me.clone(),
        }
    }
}

impl TlsIdentity {
    /// Build from PEM text; `origin` names the source in errors.
    pub fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        origin: &Path,
    ) -> Result<Self, QuicError> {
        let pem_err = |what: &str, e: rustls::pki_types::pem::Error| QuicError::Pem {
            path: origin.to_path_buf(),
            reason: format!("{what}: {e}"),
        };
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| pem_err("CA", e))?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err("certificate", e))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| pem_err("key", e))?;
        let leaf = chain.first().ok_or_else(|| QuicError::Pem {
            path: origin.to_path_buf(),
            reason: "no certificate".into(),
        })?;
        let me = PeerIdentity::from_der(leaf)?;
        Ok(TlsIdentity { ca, chain, key, me })
    }

    /// Load `ca.crt`, `NAME.crt` and `NAME.key` from a cluster directory.
    pub fn load_dir(dir: &Path, name: &str) -> Result<Self, QuicError> {
        let (cert, key) = cert_paths(dir, name);
        Self::load(&dir.join(CA_CERT_FILE), &cert, &key)
    }

    /// Load from three PEM files, and check what a handshake would only
    /// find out later: that the key belongs to the certificate, and that
    /// the cluster CA vouches for the certificate now.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, QuicError> {
        let identity = Self::from_pem(&read_text(ca)?, &read_text(cert)?, &read_text(key)?, cert)?;
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(identity.key.clone_key())
            .map_err(|e| QuicError::Pem {
                path: key.to_path_buf(),
                reason: e.to_string(),
            })?;
        let certified = rustls::sign::CertifiedKey::new(identity.chain.clone(), signing);
        if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
            certified.keys_match()
        {
            return Err(QuicError::KeyMismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            });
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(identity.ca.clone())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(provider),
        )
        .build()?;
        let (leaf, intermediates) = identity.chain.split_first().ok_or_else(|| QuicError::Pem {
            path: cert.to_path_buf(),
            reason: "no certificate".into(),
        })?;
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| QuicError::UntrustedCertificate {
                cert: cert.to_path_buf(),
                ca: ca.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(identity)
    }

    /// The cluster's identity: SHA-256 of the CA certificate. Storage servers
    /// record it on disk so that a data file of another cluster is refused.
    pub fn cluster_id(&self) -> [u8; 32] {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.ca);
        let mut id = [0u8; 32];
        id.copy_from_slice(digest.as_ref());
        id
    }

    /// The identity this process presents to its peers.
    pub fn me(&self) -> &PeerIdentity {
        &self.me
    }
}

/// Where a process finds its TLS material; part of every server's config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsPaths {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This process's certificate.
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
}

impl TlsPaths {
    /// The files `tessera cert issue` writes for `name` into a cluster directory.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        let (cert, key) = cert_paths(dir, name);
        TlsPaths {
            ca: dir.join(CA_CERT_FILE),
            cert,
            key,
        }
    }

    pub fn load(&self) -> Result<TlsIdentity, QuicError> {
        TlsIdentity::load(&self.ca, &self.cert, &self.key)
    }
}
