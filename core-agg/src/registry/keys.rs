//! The registry's key files.
//!
//! Both files are text: 64 lowercase hexadecimal digits and a newline (surrounding
//! whitespace is ignored on reading, case too).
//!
//! - `registry.key` holds the 32-byte ed25519 secret seed. Only core reads it; it is
//!   written with mode `0600` and must never leave the core host.
//! - `registry.pub` holds the 32-byte ed25519 public key (the compressed Edwards point).
//!   Stores and PoPs are given it to verify manifests with
//!   [`verify_manifest`](super::verify_manifest).
//!
//! `core-agg registry keygen --out DIR` writes both with [`generate`].

use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};

/// File name of the secret key in a key directory.
pub const SECRET_FILE: &str = "registry.key";
/// File name of the public key in a key directory.
pub const PUBLIC_FILE: &str = "registry.pub";

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The content is not 32 bytes of hex.
    #[error("key file {path} must hold 64 hex digits (32 bytes): {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The public key is not a valid ed25519 point.
    #[error("key file {path} does not hold a valid ed25519 public key")]
    InvalidPoint {
        /// The file.
        path: PathBuf,
    },
    /// `generate` refuses to replace an existing key: that would orphan every signed
    /// version.
    #[error("key file {0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
}

/// Reads a `registry.key` file.
///
/// # Errors
///
/// [`KeyFileError::Io`] or [`KeyFileError::Format`].
pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    Ok(SigningKey::from_bytes(&read_32(path)?))
}

/// Reads a `registry.pub` file.
///
/// # Errors
///
/// [`KeyFileError::Io`], [`KeyFileError::Format`] or [`KeyFileError::InvalidPoint`].
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, KeyFileError> {
    VerifyingKey::from_bytes(&read_32(path)?).map_err(|_| KeyFileError::InvalidPoint {
        path: path.to_owned(),
    })
}

/// Writes a fresh key pair as `dir/registry.key` (mode `0600`) and `dir/registry.pub`,
/// creating `dir` if needed; returns the two paths. Neither file may exist already.
///
/// # Errors
///
/// [`KeyFileError::Exists`] or [`KeyFileError::Io`].
pub fn generate(dir: &Path) -> Result<(PathBuf, PathBuf), KeyFileError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| KeyFileError::Io { path, source }
    };
    let secret_path = dir.join(SECRET_FILE);
    let public_path = dir.join(PUBLIC_FILE);
    for path in [&secret_path, &public_path] {
        if path.exists() {
            return Err(KeyFileError::Exists(path.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;

    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let secret = format!("{}\n", hex::encode(key.to_bytes()));
    let public = format!("{}\n", hex::encode(key.verifying_key().to_bytes()));
    write_new(&secret_path, secret.as_bytes(), 0o600).map_err(io(&secret_path))?;
    write_new(&public_path, public.as_bytes(), 0o644).map_err(io(&public_path))?;
    Ok((secret_path, public_path))
}

fn read_32(path: &Path) -> Result<[u8; 32], KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let format = |reason: String| KeyFileError::Format {
        path: path.to_owned(),
        reason,
    };
    let bytes = hex::decode(text.trim()).map_err(|e| format(e.to_string()))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format(format!("found {} bytes", bytes.len())))
}

/// Creates `path` (failing if it exists) with `mode` on Unix, writes and syncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;

    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
