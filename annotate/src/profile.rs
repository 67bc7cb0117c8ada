//! Source 3: the in-tree hypervisor's trace (`previrt run --profile FILE`, format
//! `previrt-profile/1`, written by `previrt-vmm`'s `profile` module).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT: &str = "previrt-profile/1";

/// One traced `(rip, page, direction, width)` with its count and first guest-physical address.
#[derive(Debug, Clone, Deserialize)]
pub struct Traced {
    pub rip: u64,
    pub gpa: u64,
    pub width: u8,
    pub write: bool,
    /// Executed as 64-bit code.
    pub code64: bool,
    pub kind: String,
    pub count: u64,
    /// `rip` is the address after the instruction (`previrt run --profile-writes` sees a
    /// store once it completed).
    #[serde(default)]
    pub after: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Profile {
    pub format: String,
    /// The traced kernel (absent in profiles written before it was recorded).
    #[serde(default)]
    pub image: Option<std::path::PathBuf>,
    pub steps: u64,
    pub pt_pages: u64,
    pub accesses: Vec<Traced>,
    /// `[rip, times about to execute]`.
    #[serde(default)]
    pub executed: Vec<[u64; 2]>,
}

/// What a file says about itself without building its tables: enough to tell a profile from
/// an annotations file and to name the traced image.
#[derive(Debug, Clone, Deserialize)]
pub struct Head {
    pub format: String,
    #[serde(default)]
    pub image: Option<std::path::PathBuf>,
}

impl Head {
    /// The head of `text` when it is a profile.
    pub fn of_profile(text: &[u8]) -> Option<Head> {
        serde_json::from_slice::<Head>(text).ok().filter(|h| h.format == FORMAT)
    }
}

impl Profile {
    pub fn read(path: &Path) -> Result<Profile> {
        let text = std::fs::read(path).with_context(|| format!("cannot read profile {}", path.display()))?;
        Profile::parse(&text, path)
    }

    /// A profile's `text`, already read from `path` (named in errors).
    pub fn parse(text: &[u8], path: &Path) -> Result<Profile> {
        let p: Profile =
            serde_json::from_slice(text).with_context(|| format!("{}: not a previrt profile", path.display()))?;
        if p.format != FORMAT {
            bail!("{}: profile format {:?}, expected {FORMAT:?}", path.display(), p.format);
        }
        Ok(p)
    }

    /// How often each RIP executed.
    pub fn executed(&self) -> HashMap<u64, u64> {
        self.executed.iter().map(|&[rip, n]| (rip, n)).collect()
    }
}
