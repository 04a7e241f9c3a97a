//! `tend-agent profile check|list`: what a field engineer or a profile author runs before
//! trusting a profile.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tend_profiles::{load_file, ProfileError, ProfileSet};

/// Exit code for invalid input (profiles, configs).
pub const EXIT_INVALID: u8 = 2;

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for e in entries {
            if e.is_dir() || e.extension().is_some_and(|x| x == "toml") {
                collect(&e, out)?;
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Checks every profile under `paths` (the built-in ones when empty). Prints one line per
/// valid profile to `out` and one located error per invalid one to `err`.
pub fn check(paths: &[PathBuf], out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    let mut failures = 0;
    let mut results: Vec<Result<tend_profiles::Profile, ProfileError>> = Vec::new();
    if paths.is_empty() {
        for (name, src) in tend_profiles::load::BUILTIN {
            results.push(tend_profiles::parse_profile(
                &format!("builtin:{name}"),
                src,
            ));
        }
    } else {
        let mut files = Vec::new();
        for p in paths {
            if let Err(e) = collect(p, &mut files) {
                failures += 1;
                let _ = writeln!(err, "error: {}: cannot read: {e}", p.display());
            }
        }
        if files.is_empty() && failures == 0 {
            let _ = writeln!(err, "error: no profile files found under the given paths");
            return ExitCode::from(EXIT_INVALID);
        }
        results.extend(files.iter().map(|f| load_file(f)));
    }
    // Checked as one set too: two files for one firmware family, or siblings that read
    // the firmware differently, are errors.
    let mut set = ProfileSet::default();
    for r in results {
        let checked = r.and_then(|p| {
            let line = format!(
                "ok  {}  {} {} firmware {}  ({} points, {} rules, {} golden vectors)",
                p.source,
                p.doc.device.vendor,
                p.doc.device.model,
                p.doc.device.firmware,
                p.doc.points.len(),
                p.doc.rules.len(),
                p.doc.golden.len()
            );
            set.add(p).map(|_| line)
        });
        match checked {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
            }
            Err(e) => {
                failures += 1;
                let _ = writeln!(err, "error: {e}");
            }
        }
    }
    if failures > 0 {
        let _ = writeln!(err, "{failures} profile(s) invalid");
        ExitCode::from(EXIT_INVALID)
    } else {
        ExitCode::SUCCESS
    }
}

/// Lists the built-in profiles.
pub fn list(out: &mut dyn Write) -> ExitCode {
    match ProfileSet::builtin() {
        Ok(set) => {
            for p in set.iter() {
                let d = &p.doc.device;
                let _ = writeln!(
                    out,
                    "{:<16} {:<4} {:<22} {:<10} {}",
                    d.id,
                    d.firmware,
                    format!("{} {}", d.vendor, d.model),
                    format!("{:?}", p.doc.transport.kind).to_lowercase(),
                    d.manual
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}
