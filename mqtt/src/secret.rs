//! Secret files (MQTT passwords, tokens, private keys): the one rule for reading them.
//!
//! On Unix a secret file that grants any permission to group or others is refused
//! ([`check_private`]), naming the file, its mode and the fix (`chmod 600`): a secret
//! anyone on the box can read is no secret. [`read_private`] reads a file under that rule
//! (private keys); [`read_secret`] also makes text of it: the file is read whole, one
//! trailing line break (`\n` or `\r\n`) is dropped and nothing else, so a password may
//! begin or end with spaces. A missing or unreadable file is an error, and so is an empty
//! secret: neither may quietly become an empty password. Errors name the file, never its
//! content.

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
    #[error(
        "the {what} {path} is open to group or others (mode {mode:04o}); \
         make it private to its owner: chmod 600 {path}",
        path = path.display()
    )]
    OpenToOthers {
        what: &'static str,
        path: PathBuf,
        /// The permission bits (`0o644`).
        mode: u32,
    },
}

impl SecretError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            SecretError::Unreadable { path, .. }
            | SecretError::NotUtf8 { path, .. }
            | SecretError::Empty { path, .. }
            | SecretError::OpenToOthers { path, .. } => path,
        }
    }
}

/// Refuses `path` unless only its owner may read or write it (Unix; elsewhere there is
/// no mode to check). `what` names the file in errors (`"client key"`).
///
/// A file owned by another user than the process is accepted when its mode is private:
/// the process can then read it only as root, and root reading a service's file (an
/// operator's `sudo tend-gateway check`) is normal. Nobody but the owner and root can
/// have read it either way, so comparing owners would refuse nothing that matters.
pub fn check_private(what: &'static str, path: &Path) -> Result<(), SecretError> {
    let meta = std::fs::metadata(path).map_err(|source| SecretError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    check_mode(what, path, &meta)
}

#[cfg(unix)]
fn check_mode(
    what: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), SecretError> {
    use std::os::unix::fs::PermissionsExt;
    /// Permission bits that give group or others any access.
    const OPEN_TO_OTHERS: u32 = 0o077;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & OPEN_TO_OTHERS != 0 {
        return Err(SecretError::OpenToOthers {
            what,
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_: &'static str, _: &Path, _: &std::fs::Metadata) -> Result<(), SecretError> {
    Ok(())
}

/// Reads the whole secret file `path` (a private key) if only its owner may read it.
/// The mode is taken from the opened file, so the file checked is the file read.
pub fn read_private(what: &'static str, path: &Path) -> Result<Vec<u8>, SecretError> {
    use std::io::Read;
    let unreadable = |source| SecretError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    // Read before checking the mode, so a directory is still "cannot read".
    file.read_to_end(&mut bytes).map_err(unreadable)?;
    check_mode(what, path, &file.metadata().map_err(unreadable)?)?;
    Ok(bytes)
}

/// Reads the secret in `path` under [`read_private`]'s rule; `what` names it in errors
/// (`"password file"`).
pub fn read_secret(what: &'static str, path: &Path) -> Result<String, SecretError> {
    let bytes = read_private(what, path)?;
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

    /// Writes `bytes` to `p` readable by its owner only, whatever the umask.
    fn write_private(p: &Path, bytes: impl AsRef<[u8]>) {
        std::fs::write(p, bytes).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }

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
        write_private(&p, "s3cret \r\n");
        assert_eq!(read_secret("password file", &p).unwrap(), "s3cret ");
        write_private(&p, "s3cret");
        assert_eq!(read_secret("password file", &p).unwrap(), "s3cret");

        write_private(&p, [0xff, 0xfe, b's']);
        let e = read_secret("password file", &p).unwrap_err().to_string();
        assert!(
            e.contains("not UTF-8") && e.contains("password file"),
            "{e}"
        );

        for empty in ["", "\n", "\r\n"] {
            write_private(&p, empty);
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
        write_private(&p, [b's', b'3', 0xff, b'x']);
        let e = read_secret("password file", &p).unwrap_err().to_string();
        assert!(!e.contains("s3"), "{e}");
    }
}

#[cfg(all(test, unix))]
mod mode_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file_with_mode(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join(format!("secret-{mode:o}"));
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn owner_only_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400] {
            let p = file_with_mode(dir.path(), mode);
            assert_eq!(read_secret("password file", &p).unwrap(), "s3cret");
            assert_eq!(read_private("client key", &p).unwrap(), b"s3cret\n");
            check_private("client key", &p).unwrap();
        }
    }

    #[test]
    fn group_or_others_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o644, 0o604, 0o660, 0o666, 0o610] {
            let p = file_with_mode(dir.path(), mode);
            let shown = p.display().to_string();
            for e in [
                read_secret("password file", &p).unwrap_err(),
                read_private("password file", &p).unwrap_err(),
                check_private("password file", &p).unwrap_err(),
            ] {
                assert!(
                    matches!(e, SecretError::OpenToOthers { mode: m, .. } if m == mode),
                    "{mode:o}: {e}"
                );
                assert_eq!(e.path(), p);
                let text = e.to_string();
                assert!(text.contains("the password file"), "{text}");
                assert!(text.contains(&format!("mode 0{mode:o}")), "{text}");
                assert!(text.contains(&format!("chmod 600 {shown}")), "{text}");
                assert!(!text.contains("s3cret"), "{text}");
            }
        }
    }

    #[test]
    fn a_missing_file_is_still_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        for e in [
            read_secret("password file", &missing).unwrap_err(),
            read_private("password file", &missing).unwrap_err(),
            check_private("password file", &missing).unwrap_err(),
        ] {
            assert!(matches!(e, SecretError::Unreadable { .. }), "{e}");
            assert!(
                e.to_string().contains("cannot read the password file"),
                "{e}"
            );
        }
    }
}
