//! What a patch did, per file and summed over many files (`--json` serializes these).

use crate::image::Image;
use crate::plan::Plan;
use previrt_site_abi::{flags, Kind};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, Serialize)]
pub struct KindCount {
    /// Moved into a trampoline.
    pub trampoline: usize,
    /// Left in place with a `TRAP` site.
    pub trap: usize,
    /// Already ≥ 5 bytes, patched in place (paravirt call sites).
    pub in_place: usize,
}

/// One instruction that got a trap-based site, and why.
#[derive(Debug, Clone, Serialize)]
pub struct FallbackOut {
    pub section: String,
    /// Section offset (objects) or virtual address (linked images).
    pub address: u64,
    pub kind: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FileReport {
    pub file: String,
    pub output: Option<String>,
    /// Sensitive instructions found (time class only with `--time`).
    pub sensitive: usize,
    /// `.parainstructions` entries.
    pub pv_sites: usize,
    /// Site records written.
    pub sites: usize,
    pub trampolines: usize,
    pub traps: usize,
    /// Sensitive instructions and pv sites with a site record, in percent.
    pub coverage: f64,
    pub by_kind: BTreeMap<&'static str, KindCount>,
    pub fallbacks: Vec<FallbackOut>,
    /// A module signature was removed: any edit invalidates it (re-sign with sign-file).
    pub signature_stripped: bool,
    /// Bytes of trampolines written.
    pub trampoline_bytes: u64,
    pub error: Option<String>,
}

impl FileReport {
    pub fn new(img: &Image, plan: &Plan, signature_stripped: bool) -> FileReport {
        let mut r = FileReport {
            sensitive: plan.sensitive,
            pv_sites: plan.pv_sites,
            sites: plan.sites.len(),
            signature_stripped,
            ..Default::default()
        };
        for s in &plan.sites {
            let name = Kind::from_u16(s.rec.kind).map_or("unknown", Kind::name);
            let c = r.by_kind.entry(name).or_default();
            if s.rec.has(flags::TRAP) {
                c.trap += 1;
                r.traps += 1;
            } else if s.rec.has(flags::TRAMPOLINE) {
                c.trampoline += 1;
                r.trampolines += 1;
            } else {
                c.in_place += 1;
            }
        }
        let found = plan.sensitive + plan.pv_sites;
        r.coverage = if found == 0 { 100.0 } else { 100.0 * plan.sites.len().min(found) as f64 / found as f64 };
        r.trampoline_bytes = plan.trampoline_bytes;
        r.fallbacks = plan
            .fallbacks
            .iter()
            .map(|f| {
                let c = &img.code[img.code_index(f.loc.sec).unwrap()];
                FallbackOut {
                    section: c.name.clone(),
                    address: c.base + f.loc.off,
                    kind: f.kind.name(),
                    reason: f.reason.text(),
                }
            })
            .collect();
        r
    }
}
