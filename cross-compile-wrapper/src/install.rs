//! `previrt toolchain install --prefix DIR`: lay out `DIR/bin/x86_64-previrt-linux-gnu-*` and
//! `DIR/libexec/previrt/as`, each a symlink to (or a copy of) the running `previrt` binary.

use crate::{AS_DIR, TOOLS, TRIPLE};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// What `install` created.
#[derive(Debug, serde::Serialize)]
pub struct Installed {
    pub prefix: PathBuf,
    /// The `CROSS_COMPILE=` value to give make.
    pub cross_compile: String,
    pub tools: Vec<PathBuf>,
    pub binary: PathBuf,
    pub copied: bool,
}

/// Install the toolchain under `prefix`. Idempotent: existing entries are replaced atomically.
pub fn install(prefix: &Path, copy: bool) -> Result<Installed> {
    let binary = std::env::current_exe().context("cannot locate the previrt binary")?;
    let prefix = std::path::absolute(prefix).with_context(|| format!("{}: bad prefix", prefix.display()))?;
    let bin = prefix.join("bin");
    let as_dir = prefix.join(AS_DIR);
    for d in [&bin, &as_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("{}: cannot create", d.display()))?;
    }
    // With --copy the tools link to one private copy, so a later rebuild of previrt does not
    // change an installed toolchain.
    let target = if copy {
        let private = as_dir.join("previrt");
        let tmp = as_dir.join(".previrt.tmp");
        std::fs::copy(&binary, &tmp).with_context(|| format!("{}: cannot copy", tmp.display()))?;
        std::fs::rename(&tmp, &private)?;
        private
    } else {
        binary.clone()
    };
    let mut tools: Vec<PathBuf> = TOOLS.iter().map(|(name, _)| bin.join(format!("{TRIPLE}-{name}"))).collect();
    tools.push(as_dir.join("as"));
    for t in &tools {
        let tmp = t.with_file_name(format!(".{}.tmp", t.file_name().unwrap_or_default().to_string_lossy()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp).with_context(|| format!("{}: cannot link", tmp.display()))?;
        std::fs::rename(&tmp, t).with_context(|| format!("{}: cannot install", t.display()))?;
    }
    Ok(Installed { cross_compile: format!("{}/{TRIPLE}-", bin.display()), prefix, tools, binary: target, copied: copy })
}
