//! Shared helpers: assemble GNU as source with the system `as`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh scratch directory under the target dir (kept for inspection after a failure).
pub fn scratch(name: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("previrt-rewriter-tests"));
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = base.join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tool(name: &str) -> String {
    let ok = Command::new(name).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "`{name}` (GNU binutils) is missing: run scripts/install-deps.sh (it installs binutils)");
    name.to_string()
}

/// Assemble `src` with `as` and `extra` flags (e.g. `--64`, `--32`); returns the object path.
pub fn assemble(dir: &Path, stem: &str, src: &str, extra: &[&str]) -> PathBuf {
    let s = dir.join(format!("{stem}.s"));
    let o = dir.join(format!("{stem}.o"));
    std::fs::write(&s, src).unwrap();
    let out = Command::new(tool("as")).args(extra).arg("-o").arg(&o).arg(&s).output().unwrap();
    assert!(out.status.success(), "as failed on {}:\n{}", s.display(), String::from_utf8_lossy(&out.stderr));
    o
}

/// Link objects into a static ET_EXEC with `ld`.
pub fn link(dir: &Path, stem: &str, objs: &[&Path], extra: &[&str]) -> PathBuf {
    let out_path = dir.join(stem);
    let out = Command::new(tool("ld")).args(extra).arg("-o").arg(&out_path).args(objs).output().unwrap();
    assert!(out.status.success(), "ld failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out_path
}
