//! `cubegate gen-cert`: a self-signed certificate for development and tests (rcgen).
//!
//! An ECDSA P-256 key, the given names as subject alternative names (IP addresses become
//! IP SANs, the rest DNS names), valid from yesterday (clock skew) for `days`. The key file
//! is created 0600 and neither file is overwritten unless asked: an operator's real
//! certificate must not vanish because a command was run in the wrong directory.

use std::io::Write;
use std::path::{Path, PathBuf};

pub struct GenCert {
    pub out_dir: PathBuf,
    pub names: Vec<String>,
    pub days: u32,
    pub force: bool,
}

/// Writes `cert.pem` and `key.pem` into `out_dir`; returns their paths.
pub fn gen_cert(req: &GenCert) -> Result<(PathBuf, PathBuf), String> {
    if req.names.is_empty() {
        return Err("give at least one --name".into());
    }
    if req.days == 0 || req.days > 3650 {
        return Err("--days must be 1..=3650".into());
    }
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    for name in &req.names {
        let san = match name.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(
                name.clone()
                    .try_into()
                    .map_err(|e| format!("--name {name:?} is not a DNS name: {e}"))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, req.names[0].clone());
    dn.push(
        rcgen::DnType::OrganizationName,
        "cubegate development certificate",
    );
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(i64::from(req.days));
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;

    std::fs::create_dir_all(&req.out_dir)
        .map_err(|e| format!("cannot create {}: {e}", req.out_dir.display()))?;
    let cert_path = req.out_dir.join("cert.pem");
    let key_path = req.out_dir.join("key.pem");
    if !req.force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(format!(
                    "{} exists; pass --force to replace it",
                    p.display()
                ));
            }
        }
    }
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Writes through a temporary file and a rename, so a reader (a reloading gateway) sees
/// the old file or the new one, never half of one.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
