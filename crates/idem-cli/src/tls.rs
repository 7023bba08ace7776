//! TLS to the upstream and to Redis: which certificate authorities to trust and which
//! certificate, if any, to present. One [`TlsFiles`] turns into one rustls client, always on
//! the `ring` provider, named rather than taken from rustls' process-wide default (several
//! libraries in this binary link rustls; a default would be ambiguous).
//!
//! Postgres is not here: sqlx reads libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`
//! from the store URL itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ConfigBuilder, RootCertStore, WantsVerifier};
use serde::Deserialize;

/// PEM files for a TLS client; every field is optional.
///
/// - `ca_file`: the certificate authorities to trust, **instead of** the system's. Without
///   it the system's trust store is used.
/// - `cert_file` and `key_file`: a client certificate (its chain, leaf first) and its
///   private key, for servers that authenticate clients by certificate. Both or neither.
///
/// ```
/// use idem_cli::tls::TlsFiles;
///
/// let files: TlsFiles = toml::from_str(r#"ca_file = "/etc/idem/ca.pem""#).unwrap();
/// assert_eq!(files.ca_file.as_deref(), Some(std::path::Path::new("/etc/idem/ca.pem")));
/// // Reading happens when the client is made, and names the file at fault:
/// let error = files.client_config().unwrap_err();
/// assert!(error.to_string().contains("/etc/idem/ca.pem"), "{error}");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificates of the authorities to trust, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

/// Why a TLS client could not be made; each names the setting and file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("`{field}`: cannot read {}: {source}", path.display())]
    Read {
        /// The [`TlsFiles`] field.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's complaint.
        #[source]
        source: std::io::Error,
    },
    /// A file holds nothing usable of what it should.
    #[error("`{field}`: {} {problem}", path.display())]
    Content {
        /// The [`TlsFiles`] field.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Only one of `cert_file` and `key_file` is set.
    #[error("`cert_file` and `key_file` go together: set both or neither")]
    HalfPair,
    /// No `ca_file`, and the system's trust store has no usable certificate.
    #[error(
        "no `ca_file` is set and the system's certificate authorities cannot be used \
         ({0}): install them (e.g. the ca-certificates package) or set `ca_file`"
    )]
    NoSystemRoots(String),
    /// rustls refused the combination (a key that does not match its certificate, say).
    #[error("the TLS settings are refused: {0}")]
    Rejected(#[source] rustls::Error),
}

impl TlsFiles {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Reads the files into a rustls client: the trusted authorities and, if set, the
    /// client certificate. Errors name the field and file at fault.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let roots = match &self.ca_file {
            Some(path) => file_roots(path)?,
            None => system_roots()?,
        };
        let builder = ring_builder()?.with_root_certificates(roots);
        match (&self.cert_file, &self.key_file) {
            (None, None) => Ok(builder.with_no_client_auth()),
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(certificates("cert_file", cert)?, private_key(key)?)
                .map_err(TlsError::Rejected),
            _ => Err(TlsError::HalfPair),
        }
    }
}

/// A client that trusts no authority and presents no certificate: for connectors that need a
/// TLS client but are never meant to use one.
pub(crate) fn trusting_nothing() -> Result<ClientConfig, TlsError> {
    Ok(ring_builder()?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth())
}

fn ring_builder() -> Result<ConfigBuilder<ClientConfig, WantsVerifier>, TlsError> {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rejected)
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_owned(),
        source,
    })
}

fn content(field: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::Content {
        field,
        path: path.to_owned(),
        problem: problem.into(),
    }
}

fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(field, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| content(field, path, format!("is not valid PEM: {error}")))?;
    if certificates.is_empty() {
        return Err(content(field, path, "holds no PEM certificate"));
    }
    Ok(certificates)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key_file", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| {
        content(
            "key_file",
            path,
            format!("holds no usable private key: {error}"),
        )
    })
}

fn file_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates("ca_file", path)? {
        roots.add(certificate).map_err(|error| {
            content(
                "ca_file",
                path,
                format!("holds a certificate rustls refuses: {error}"),
            )
        })?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none were found".to_owned(), ToString::to_string);
        return Err(TlsError::NoSystemRoots(why));
    }
    Ok(roots)
}
