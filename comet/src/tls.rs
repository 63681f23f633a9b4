//! The WSS certificate: loaded once at start (a bad pair stops the comet
//! there), then re-read every `--tls-reload-ms` so a renewed certificate is
//! served without a restart.
//!
//! cert-manager renews by rewriting the Secret, and the kubelet swaps the
//! mounted files by repointing a `..data` symlink: the files' own mtimes do
//! not change and their paths stay the same. So each poll reads both files
//! and compares their *contents* with what it last read. A changed pair that
//! parses replaces the served one for new handshakes (existing connections
//! keep their session); one that does not parse, or that cannot be read, is
//! logged and counted once and the pair in use stays. Both outcomes are
//! counted in `herald_comet_tls_reloads_total{result}`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

/// Why a certificate/key pair could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read TLS file {path:?}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A file is not the PEM it should be.
    #[error("cannot parse TLS file {path:?}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("no certificate in {path:?}")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the key, or the key does not match the certificate.
    #[error("TLS certificate/key pair rejected")]
    Rejected(#[source] rustls::Error),
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The certificate and key files, as configured.
#[derive(Debug, Clone)]
pub(crate) struct Files {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// What the files held at the last read; a reload happens only when this
/// changes, so a broken pair is logged and counted once, not every poll.
#[derive(Debug, PartialEq, Eq)]
enum Snapshot {
    Read { cert: Vec<u8>, key: Vec<u8> },
    Unreadable(String),
}

/// The pair served to new handshakes. A `RwLock` rather than a lock-free
/// swap: a handshake holds the read lock for one `Arc` clone and the writer
/// comes once per renewal, so it is never contended in practice.
#[derive(Debug)]
pub(crate) struct Certificate {
    current: RwLock<Arc<CertifiedKey>>,
    files: Files,
    provider: Arc<CryptoProvider>,
    last: std::sync::Mutex<Snapshot>,
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// What one poll did.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Reload {
    /// The files are as last read.
    Unchanged,
    /// A new pair is served.
    Ok,
    /// The files changed but are unusable; the previous pair is kept.
    Error,
}

impl Certificate {
    /// Loads the pair from `files`.
    ///
    /// # Errors
    /// [`Error`] when a file cannot be read or parsed, or the key does not
    /// match the certificate.
    pub(crate) fn load(files: Files) -> Result<Certificate> {
        // An explicit provider: the process may not have installed a default one.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert, key) = read(&files)?;
        let current = parse(&files, &cert, &key, &provider)?;
        Ok(Certificate {
            current: RwLock::new(Arc::new(current)),
            files,
            provider,
            last: std::sync::Mutex::new(Snapshot::Read { cert, key }),
        })
    }

    /// The pair currently served.
    pub(crate) fn get(&self) -> Arc<CertifiedKey> {
        // A poisoned lock still holds a complete `Arc`: keep serving it.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the files and serves the pair they hold if it changed and
    /// is valid.
    pub(crate) fn reload(&self) -> Reload {
        let snapshot = match read(&self.files) {
            Ok((cert, key)) => Snapshot::Read { cert, key },
            Err(err) => Snapshot::Unreadable(error_chain(&err)),
        };
        // Only the reload task takes this lock.
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if *last == snapshot {
            return Reload::Unchanged;
        }
        let outcome = match &snapshot {
            Snapshot::Unreadable(cause) => {
                warn!(%cause, "TLS files unreadable; keeping the certificate in use");
                Reload::Error
            }
            Snapshot::Read { cert, key } => match parse(&self.files, cert, key, &self.provider) {
                Ok(pair) => {
                    *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(pair);
                    info!(cert = ?self.files.cert, "TLS certificate reloaded");
                    Reload::Ok
                }
                Err(err) => {
                    warn!(cause = %error_chain(&err),
                              "new TLS files rejected; keeping the certificate in use");
                    Reload::Error
                }
            },
        };
        *last = snapshot;
        outcome
    }
}

/// The acceptor for WSS: every handshake asks `certificate` for the pair.
///
/// # Errors
/// [`Error::Rejected`] if rustls has no safe protocol version for the provider.
pub(crate) fn acceptor(certificate: Arc<Certificate>) -> Result<tokio_rustls::TlsAcceptor> {
    let config = rustls::ServerConfig::builder_with_provider(certificate.provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(Error::Rejected)?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Polls the files every `period` until `stop`; `counted` sees every
/// outcome other than [`Reload::Unchanged`].
pub(crate) async fn reload_loop(
    certificate: Arc<Certificate>,
    period: Duration,
    counted: impl Fn(Reload),
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        // Two small files: reading them on the runtime thread costs less
        // than a blocking-pool hop.
        let outcome = certificate.reload();
        if outcome != Reload::Unchanged {
            counted(outcome);
        }
    }
}

fn read(files: &Files) -> Result<(Vec<u8>, Vec<u8>)> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })
    };
    Ok((read(&files.cert)?, read(&files.key)?))
}

fn parse(
    files: &Files,
    cert: &[u8],
    key: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey> {
    let pem = |path: &PathBuf| {
        let path = path.clone();
        move |source| Error::Pem { path, source }
    };
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(&files.cert))?;
    if chain.is_empty() {
        return Err(Error::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(pem(&files.key))?;
    // Checks that the key belongs to the certificate: a half-renewed pair
    // (new certificate, old key) is refused here rather than at handshakes.
    CertifiedKey::from_der(chain, key, provider).map_err(Error::Rejected)
}

/// An error with its sources, for one log field.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
