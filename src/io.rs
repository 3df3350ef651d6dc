//! File output that never leaves a half-written file behind.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed
/// and synced, then renamed over the target. A writer never replaces what is not a file
/// of its own kind: a symbolic link is written through (its target is replaced, the link
/// kept), a character device or FIFO (`/dev/null`, `/dev/stdout`, a named pipe) is written
/// into directly, and a directory or other special file is refused.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| {
        f.write_all(bytes).with_context(|| format!("{}: write failed (disk full?)", path.display()))
    })
}

/// `write_atomic` of what `fill` writes into the file (for outputs too large to hold).
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(link) = std::fs::symlink_metadata(path) {
        if link.file_type().is_symlink() {
            let target = std::fs::canonicalize(path).with_context(|| {
                format!("{}: a symbolic link whose target cannot be resolved; give another output", path.display())
            })?;
            return write_atomic_with(&target, fill);
        }
        let ft = link.file_type();
        if ft.is_char_device() || ft.is_fifo() {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("{}: cannot open for writing", path.display()))?;
            return fill(&mut f);
        }
        if ft.is_dir() {
            anyhow::bail!("{}: is a directory; give a file name", path.display());
        }
        if !ft.is_file() {
            anyhow::bail!("{}: not a regular file (a socket or block device?); it is left alone", path.display());
        }
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !dir.is_dir() {
        anyhow::bail!("{}: the output directory {} does not exist", path.display(), dir.display());
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("{}: cannot write here (permissions or a read-only disk?)", path.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        fill(&mut w)?;
        let f =
            w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("{}: write failed", path.display()))?;
        f.sync_all().with_context(|| format!("{}: sync failed", path.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("{}: cannot move the finished file into place", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_and_links_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file is replaced atomically.
        let f = dir.path().join("a.bin");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        // A symlink stays a symlink; its target gets the bytes.
        let link = dir.path().join("link.bin");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        write_atomic(&link, b"three").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&f).unwrap(), b"three");
        // /dev/null stays a character device.
        write_atomic(Path::new("/dev/null"), b"discarded").unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
        // A FIFO is written into (a reader on the other end gets the bytes).
        let fifo = dir.path().join("pipe");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(&fifo).unwrap())
        };
        write_atomic(&fifo, b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        // A directory is refused.
        assert!(write_atomic(dir.path(), b"x").is_err());
    }
}

/// `s` with control characters (C0, DEL, C1) and bidirectional overrides shown as
/// `\u{..}`: text from files and flags (descriptions, labels, names) cannot then move the
/// cursor, recolour or reorder a terminal, nor make an SVG invalid XML.
pub fn printable(s: &str) -> String {
    let hidden = |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(hidden) {
        return s.to_string();
    }
    s.chars().map(|c| if hidden(c) { format!("\\u{{{:x}}}", c as u32) } else { c.to_string() }).collect()
}

#[cfg(test)]
mod printable_tests {
    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(super::printable("rock\x1b[2Jsong\n"), "rock\\u{1b}[2Jsong\\u{a}");
        assert_eq!(super::printable("a\u{202e}b\u{85}"), "a\\u{202e}b\\u{85}");
        assert_eq!(super::printable("Café — ok"), "Café — ok");
    }
}
