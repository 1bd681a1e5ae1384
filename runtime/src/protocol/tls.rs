//! TLS for the native protocol over TCP (rustls with the `ring` provider), shared by the page
//! server and its clients: configurations built from PEM files, and the errors that name them.
//!
//! The TLS session wraps the whole native session: the client's `ClientHello` is the first
//! byte on the connection, and the native hello (token included) travels inside TLS. A server
//! with TLS answers a plaintext native hello with a plaintext refusal ("this server requires
//! TLS") and closes. Mutual authentication: the server may require a client certificate
//! signed by a CA file (`client_ca`), in addition to (not instead of) the token.
//!
//! Unix sockets stay plaintext (local peers; the server logs their pid). CRIU's page-server
//! protocol has no TLS: a `HELLO_CRIU` session cannot be handed to `criu lazy-pages` as a raw
//! socket when it is encrypted, so [`crate::remote::open_criu_session`] refuses TLS endpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Errors building a TLS configuration; each names the file or value concerned.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable of the kind expected.
    #[error("{}: no {what} found ({message})", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// The parser's explanation.
        message: String,
    },
    /// rustls refused the material (e.g. a key that does not match its certificate).
    #[error("tls {what}")]
    Rustls {
        /// The step.
        what: &'static str,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier cannot be built from the CA file.
    #[error("{}: cannot verify client certificates with it: {message}", path.display())]
    ClientCa {
        /// The CA file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Not a DNS name or IP address.
    #[error("invalid tls server name {name:?}")]
    ServerName {
        /// The name.
        name: String,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let pem = |message: String| TlsError::Pem {
        path: path.to_path_buf(),
        what: "certificate",
        message,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: "private key",
        message: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(path)? {
        store.add(c).map_err(|source| TlsError::Rustls {
            what: "CA certificate",
            source,
        })?;
    }
    Ok(store)
}

/// A server configuration: certificate chain and key files, and optionally a CA file whose
/// certificates clients must present (mutual TLS).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let b = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "protocol versions",
            source,
        })?;
    let b = match client_ca {
        Some(ca) => {
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::ClientCa {
                path: ca.to_path_buf(),
                message: e.to_string(),
            })?;
            b.with_client_cert_verifier(v)
        }
        None => b.with_no_client_auth(),
    };
    let cfg = b
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|source| TlsError::Rustls {
            what: "server certificate and key",
            source,
        })?;
    Ok(Arc::new(cfg))
}

/// What a client needs to open TLS sessions: the configuration and the name the server's
/// certificate must carry.
#[derive(Debug, Clone)]
pub struct TlsClient {
    /// rustls client configuration (trusted CAs, optional client certificate).
    pub config: Arc<ClientConfig>,
    /// The name checked against the server certificate.
    pub server_name: ServerName<'static>,
}

impl TlsClient {
    /// Trusts the CAs of `ca`, expects `server_name` (a DNS name or an IP address) in the
    /// server's certificate and, with `client_cert` (certificate and key files), authenticates
    /// the client to servers that require it.
    pub fn new(
        ca: &Path,
        server_name: &str,
        client_cert: Option<(&Path, &Path)>,
    ) -> Result<TlsClient, TlsError> {
        let name =
            ServerName::try_from(server_name.to_string()).map_err(|_| TlsError::ServerName {
                name: server_name.to_string(),
            })?;
        let b = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                what: "protocol versions",
                source,
            })?
            .with_root_certificates(roots(ca)?);
        let cfg = match client_cert {
            Some((c, k)) => b
                .with_client_auth_cert(load_certs(c)?, load_key(k)?)
                .map_err(|source| TlsError::Rustls {
                    what: "client certificate and key",
                    source,
                })?,
            None => b.with_no_client_auth(),
        };
        Ok(TlsClient {
            config: Arc::new(cfg),
            server_name: name,
        })
    }
}

/// Whether the first byte of a connection is a TLS handshake record (what a TLS client sends).
pub fn looks_like_tls(first: u8) -> bool {
    first == 0x16
}
