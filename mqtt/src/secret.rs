//! Secret files (an MQTT password today): the one rule for reading them. The file is
//! read whole, one trailing line break (`\n` or `\r\n`) is dropped and nothing else, so a
//! password may begin or end with spaces. A missing or unreadable file is an error, and
//! so is an empty secret: neither may quietly become an empty password. Errors name the
//! file, never its content.

use std::path::{Path, PathBuf};

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the {what} {}: {source}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {} is not UTF-8", path.display())]
    NotUtf8 { what: &'static str, path: PathBuf },
    #[error("the {what} {} is empty", path.display())]
    Empty { what: &'static str, path: PathBuf },
}

impl SecretError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            SecretError::Unreadable { path, .. }
            | SecretError::NotUtf8 { path, .. }
            | SecretError::Empty { path, .. } => path,
        }
    }
}

/// Reads the secret in `path`; `what` names it in errors (`"password file"`).
pub fn read_secret(what: &'static str, path: &Path) -> Result<String, SecretError> {
    let bytes = std::fs::read(path).map_err(|source| SecretError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| SecretError::NotUtf8 {
        what,
        path: path.to_path_buf(),
    })?;
    let secret = trim_line_break(text);
    if secret.is_empty() {
        return Err(SecretError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(secret)
}

/// `text` without one trailing `\n` or `\r\n`.
fn trim_line_break(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_line_break_goes() {
        assert_eq!(trim_line_break("s3cret \r\n".into()), "s3cret ");
        assert_eq!(trim_line_break("s3cret\n\n".into()), "s3cret\n");
        assert_eq!(trim_line_break(" s3cret".into()), " s3cret");
    }

    #[test]
    fn files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret \r\n").unwrap();
        assert_eq!(read_secret("password file", &p).unwrap(), "s3cret ");
        std::fs::write(&p, "s3cret").unwrap();
        assert_eq!(read_secret("password file", &p).unwrap(), "s3cret");

        std::fs::write(&p, [0xff, 0xfe, b's']).unwrap();
        let e = read_secret("password file", &p).unwrap_err().to_string();
        assert!(
            e.contains("not UTF-8") && e.contains("password file"),
            "{e}"
        );

        for empty in ["", "\n", "\r\n"] {
            std::fs::write(&p, empty).unwrap();
            let e = read_secret("password file", &p).unwrap_err();
            assert!(matches!(e, SecretError::Empty { .. }), "{empty:?}: {e}");
            assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        }

        let missing = dir.path().join("missing");
        let e = read_secret("password file", &missing).unwrap_err();
        assert!(matches!(e, SecretError::Unreadable { .. }), "{e}");
        assert_eq!(e.path(), missing);
        let text = e.to_string();
        assert!(text.contains("cannot read the password file"), "{text}");
        assert!(text.contains(&missing.display().to_string()), "{text}");

        // A directory is not a readable file either.
        let e = read_secret("password file", dir.path()).unwrap_err();
        assert!(matches!(e, SecretError::Unreadable { .. }), "{e}");
    }

    #[test]
    fn the_content_never_appears_in_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, [b's', b'3', 0xff, b'x']).unwrap();
        let e = read_secret("password file", &p).unwrap_err().to_string();
        assert!(!e.contains("s3"), "{e}");
    }
}
