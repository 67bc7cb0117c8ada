//! Every previrt tool writes its outputs the same way: to a temporary file in the output's
//! directory, then renamed over the output, so a reader never sees a half-written file and a
//! failure leaves the old file (and nothing else) behind. An existing output that is not a
//! regular file (`/dev/null`, a FIFO, a terminal) is written in place instead: renaming over
//! it would replace the device node with a plain file (as root, a `/dev/null` that keeps data).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// How to write. `Default` is a plain data file.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Unix permission bits for the result (e.g. `0o755` for a kernel or a tool); `None` keeps
    /// the process's default.
    pub mode: Option<u32>,
    /// fsync the data before the rename, for outputs that must survive a crash (snapshots).
    pub sync: bool,
}

/// Write `data` to `path` atomically with default [`Options`].
pub fn write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_with(path, data, Options::default())
}

/// Write `data` to `path` atomically; the temporary file is removed if anything fails.
pub fn write_with(path: &Path, data: &[u8], opts: Options) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        return std::fs::OpenOptions::new().write(true).open(path)?.write_all(data);
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other(format!("{}: not a file name", path.display())))?;
    let tmp = dir.join(format!(".{}.previrt-tmp.{}", name.to_string_lossy(), std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        if let Some(mode) = opts.mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        if opts.sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_sets_the_mode_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("previrt-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out.bin");
        std::fs::write(&out, b"old").unwrap();
        write_with(&out, b"new", Options { mode: Some(0o750), sync: true }).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o750);
        // A failing rename (the target is a non-empty directory) keeps no temporary behind.
        let blocked = dir.join("blocked");
        std::fs::create_dir_all(blocked.join("x")).unwrap();
        assert!(write(&blocked, b"data").is_err());
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_device_output_is_written_not_replaced() {
        use std::os::unix::fs::FileTypeExt;
        write(Path::new("/dev/null"), b"discarded").unwrap();
        let meta = std::fs::metadata("/dev/null").unwrap();
        assert!(meta.file_type().is_char_device(), "/dev/null was replaced: {meta:?}");
        assert!(std::fs::read("/dev/null").unwrap().is_empty());
    }
}
