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

impl Profile {
    pub fn read(path: &Path) -> Result<Profile> {
        let text = std::fs::read(path).with_context(|| format!("cannot read profile {}", path.display()))?;
        let p: Profile =
            serde_json::from_slice(&text).with_context(|| format!("{}: not a previrt profile", path.display()))?;
        if p.format != FORMAT {
            bail!("{}: profile format {:?}, expected {FORMAT:?}", path.display(), p.format);
        }
        Ok(p)
    }

    /// Whether `text` is a profile (rather than an annotations file).
    pub fn is_profile(text: &[u8]) -> bool {
        #[derive(Deserialize)]
        struct Head {
            format: String,
        }
        serde_json::from_slice::<Head>(text).is_ok_and(|h| h.format == FORMAT)
    }

    /// How often each RIP executed.
    pub fn executed(&self) -> HashMap<u64, u64> {
        self.executed.iter().map(|&[rip, n]| (rip, n)).collect()
    }
}
