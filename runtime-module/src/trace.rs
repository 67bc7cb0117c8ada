//! Trace counters: per kind and per site, and the summary line printed at exit.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use previrt_site_abi::KINDS;

/// Kind numbers are below this (the ABI's numbers are u16 but all assigned ones are < 256).
pub const KIND_SLOTS: usize = 256;

/// Execution counters. Atomic so that an interrupt arriving inside a counted site does not
/// lose counts.
pub struct Counters<const SITES: usize> {
    pub kinds: [AtomicU64; KIND_SLOTS],
    pub sites: [AtomicU32; SITES],
}

impl<const SITES: usize> Counters<SITES> {
    #[allow(clippy::declare_interior_mutable_const)]
    const ZERO64: AtomicU64 = AtomicU64::new(0);
    #[allow(clippy::declare_interior_mutable_const)]
    const ZERO32: AtomicU32 = AtomicU32::new(0);

    pub const fn new() -> Self {
        Counters { kinds: [Self::ZERO64; KIND_SLOTS], sites: [Self::ZERO32; SITES] }
    }

    /// Count one execution of site number `site` (index position) of kind `kind`.
    pub fn hit(&self, kind: u16, site: usize) {
        if let Some(k) = self.kinds.get(kind as usize) {
            k.fetch_add(1, Relaxed);
        }
        if let Some(s) = self.sites.get(site) {
            s.fetch_add(1, Relaxed);
        }
    }

    /// `previrt-trace: cli=123 sti=45 … sites-executed=K/N` (kinds never executed omitted).
    pub fn summary(&self, total_sites: usize, out: &mut dyn Write) -> fmt::Result {
        out.write_str("previrt-trace:")?;
        for k in KINDS {
            let n = self.kinds[k.kind as usize].load(Relaxed);
            if n != 0 {
                write!(out, " {}={}", k.name, n)?;
            }
        }
        let executed = self.sites[..total_sites.min(SITES)].iter().filter(|s| s.load(Relaxed) != 0).count();
        writeln!(out, " sites-executed={executed}/{total_sites}")
    }

    /// The site-execution profile: `previrt-trace-site: ADDRESS KIND COUNT` for every executed
    /// site, given each indexed site's address and kind number in index order.
    pub fn profile(&self, sites: impl Iterator<Item = (u64, u16)>, out: &mut dyn Write) -> fmt::Result {
        for ((addr, kind), n) in sites.zip(&self.sites) {
            let n = n.load(Relaxed);
            if n != 0 {
                let name = previrt_site_abi::Kind::from_u16(kind).map_or("unknown", |k| k.name());
                writeln!(out, "previrt-trace-site: {addr:#x} {name} {n}")?;
            }
        }
        Ok(())
    }
}

impl<const SITES: usize> Default for Counters<SITES> {
    fn default() -> Self {
        Self::new()
    }
}
