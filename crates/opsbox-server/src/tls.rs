//! TLS for `https://` listeners: rustls with TLS 1.2 and 1.3 (jujuclient speaks only
//! 1.2), from PEM files or from a self-signed certificate generated on first start and
//! kept in `<data>/tls/` so clients can pin it across restarts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsSource;
use crate::ServerError;

/// Builds the rustls configuration every TLS listener shares.
pub fn server_config(
    source: &TlsSource,
    data: &Path,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let (cert_path, key_path) = match source {
        TlsSource::Files { cert, key } => (cert.clone(), key.clone()),
        TlsSource::SelfSigned => self_signed(data)?,
    };
    let tls_error = |what: String| ServerError::Tls(what);
    let cert_pem = std::fs::read(&cert_path)
        .map_err(|e| tls_error(format!("cannot read {}: {e}", cert_path.display())))?;
    let key_pem = std::fs::read(&key_path)
        .map_err(|e| tls_error(format!("cannot read {}: {e}", key_path.display())))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error(format!("bad certificate {}: {e}", cert_path.display())))?;
    if certs.is_empty() {
        return Err(tls_error(format!(
            "no certificate in {}",
            cert_path.display()
        )));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| tls_error(format!("bad key {}: {e}", key_path.display())))?
        .ok_or_else(|| tls_error(format!("no private key in {}", key_path.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_error(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_error(format!("certificate and key do not match: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The paths of the self-signed pair, generated if missing.
fn self_signed(data: &Path) -> Result<(PathBuf, PathBuf), ServerError> {
    let dir = data.join("tls");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_owned());
        }
    }
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| ServerError::Tls(format!("cannot generate a certificate: {e}")))?;
    std::fs::create_dir_all(&dir)
        .map_err(|e| ServerError::Tls(format!("cannot create {}: {e}", dir.display())))?;
    std::fs::write(&cert, generated.cert.pem())
        .map_err(|e| ServerError::Tls(format!("cannot write {}: {e}", cert.display())))?;
    write_private(&key, generated.key_pair.serialize_pem().as_bytes())
        .map_err(|e| ServerError::Tls(format!("cannot write {}: {e}", key.display())))?;
    tracing::info!(cert = %cert.display(), "generated a self-signed TLS certificate");
    Ok((cert, key))
}

/// Writes a file readable by its owner only (keys, files holding passwords).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// The PEM certificate the https:// listeners present (for clients that pin it, such as
/// a Juju jenv file); `None` when it cannot be read.
pub fn certificate_pem(config: &crate::ServerConfig) -> Option<String> {
    let path = match &config.tls {
        TlsSource::Files { cert, .. } => cert.clone(),
        TlsSource::SelfSigned => config.data.join("tls").join("cert.pem"),
    };
    std::fs::read_to_string(path).ok()
}
