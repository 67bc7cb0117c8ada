//! Direct page tables: for a kernel whose page-table accesses are sites (`pt_write`/`pt_read`,
//! from annotations: docs/annotations.md), its own tables become Xen's tables. The kernel keeps
//! seeing pseudo-physical frames; what is in memory is what Xen validates:
//!
//! - `pt_write` into a page Xen holds as a table: the entry is translated (pfn → mfn; a leaf
//!   that maps one of the kernel's table pages or the runtime's pool and GDT frames loses RW,
//!   one that maps the LAPIC model page
//!   loses PWT/PCD; both are remembered in available bits, [`MOVED`]) and
//!   written with `mmu_update`. A non-leaf entry naming a page that is not a table yet first
//!   *adopts* that page and everything below it (see below).
//! - `pt_write` into any other page (a table being built, not yet reachable from a loaded root)
//!   is a plain store of the kernel's value; such a page is translated when it is adopted.
//! - `pt_read` from a table: mfn → pfn through Xen's machine-to-phys table, RW restored; a
//!   frame that is not the kernel's (Xen's own L4 slots) reads as an empty entry.
//! - A CR3 load of a new root adopts it (level 4), adds the runtime's own mappings where the
//!   kernel has none (from the shadow pool's pages), pins it and switches; the first one also
//!   unpins Xen's boot tables. Later loads of a pinned root only switch (same root: TLB flush).
//! - `invlpg` is `MMUEXT_INVLPG_LOCAL`: the entry is in Xen's tables already.
//!
//! Adopting a page at a level: collect the pages it reaches that are not tables yet (with
//! their levels), translate their entries in place with plain stores (still writable), then
//! take every writable mapping of them away: in Xen's boot tables before the first switch
//! (`update_va_mapping`), in the loaded roots' identity mapping afterwards (`mmu_update`).
//!
//! Limits: identity-mapped page-table pages (the only alias searched is virtual = pseudo-
//! physical; another writable alias makes Xen refuse, which stops the domain with the
//! hypercall's error); 4 KiB pages; tables are never freed; bits 9–11 of a leaf are the runtime's;
//! at most `tables::CAPACITY` table pages (`xen::tables`: adoption order plus a hash index).

use super::abi::{self, Hypercall, MmuUpdate};
use super::mmu::{self, Mmu, MmuError, ADDR, HUGE, MAX_ROOTS, MAX_TABLES, PRESENT, R, TABLE_FLAGS, WRITABLE};

const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
/// Leaf bits the kernel asked for that Xen must not see, and the available bit (9–11) that
/// keeps each for `pt_read`: RW on a page Xen holds as a table (Xen requires read-only), and
/// the cache attributes of the LAPIC mapping (it is the runtime's RAM page; Xen refuses cache
/// attributes from a domain without I/O memory).
const MOVED: [(u64, u64); 3] = [(WRITABLE, 1 << 11), (PWT, 1 << 9), (PCD, 1 << 10)];

/// `v` with the kernel's bits `hide` (a subset of MOVED's first column) moved to their
/// available bits.
fn hide(v: u64, hide: u64) -> u64 {
    MOVED.iter().filter(|(bit, _)| hide & v & bit != 0).fold(v, |v, (bit, soft)| (v & !bit) | soft)
}
/// Xen's read-only machine-to-phys table for 64-bit PV guests (RO_MPT_VIRT_START).
const M2P: u64 = 0xffff_8000_0000_0000;
const LAPIC_PFN: u64 = super::devices::LAPIC_BASE >> 12;

/// L4 slots Xen fills in every root it validates (its own mappings, the linear map): the
/// kernel never wrote them, so they read as empty and are never adopted.
fn xen_slot(level: u8, i: u64) -> bool {
    level == 4 && (256..272).contains(&i)
}

fn index(va: u64, level: u8) -> u64 {
    (va >> (12 + 9 * (level as u32 - 1))) & 511
}

fn entry_at(table: u64, i: u64) -> *mut u64 {
    (table + i * 8) as *mut u64
}

fn read(table: u64, i: u64) -> u64 {
    // SAFETY: page-table pages are identity-mapped, readable in every address space the
    // runtime runs on (docs/xen-pv.md).
    unsafe { entry_at(table, i).read_volatile() }
}

impl Mmu {
    fn level_of(&self, pfn: u64) -> Option<u8> {
        self.tables.find(pfn).map(|(_, l)| l)
    }

    /// One of the runtime's pages Xen may not see mapped writable (pool, GDT frames).
    fn is_pool(pfn: u64) -> bool {
        let (a, b) = Self::read_only_range();
        (a..b).contains(&(pfn << 12))
    }

    /// Pseudo-physical frame of machine frame `mfn`, if it is one of the domain's.
    fn pfn(&self, mfn: u64) -> Option<u64> {
        if Some(mfn) == self.mfn(self.lapic_page >> 12) {
            return Some(LAPIC_PFN);
        }
        // SAFETY: Xen maps the machine-to-phys table read-only in every PV address space.
        let pfn = unsafe { ((M2P + mfn * 8) as *const u64).read_volatile() };
        (self.mfn(pfn) == Some(mfn)).then_some(pfn)
    }

    /// The kernel's entry `e` (in a table at `level`, at address `at`) as Xen must see it.
    fn to_machine(&self, e: u64, level: u8, at: u64) -> R<u64> {
        if e & PRESENT == 0 {
            return Ok(e);
        }
        let pfn = (e & ADDR) >> 12;
        if level > 1 && e & HUGE != 0 {
            return Err(MmuError::Huge { va: at });
        }
        let lapic = level == 1 && pfn == LAPIC_PFN;
        let mfn =
            self.mfn(if lapic { self.lapic_page >> 12 } else { pfn }).ok_or(MmuError::Frame { entry: at, pfn })?;
        let v = (e & !ADDR) | mfn << 12;
        Ok(match (level, lapic, self.level_of(pfn).is_some()) {
            (1, true, _) => hide(v, PWT | PCD),
            (1, _, table) if table || Self::is_pool(pfn) => hide(v, WRITABLE),
            _ => v,
        })
    }

    /// `pt_read` of entry `e` at kernel address `at`: as the kernel wrote it.
    pub fn read_entry(&mut self, at: u64, e: u64) -> u64 {
        let Some(level) = self.level_of(at >> 12) else { return e };
        if xen_slot(level, (at & 0xfff) / 8) {
            return 0;
        }
        if e & PRESENT == 0 {
            return e;
        }
        self.stats.pt_read_translated += 1;
        let Some(pfn) = self.pfn((e & ADDR) >> 12) else { return 0 };
        let v = (e & !ADDR) | pfn << 12;
        MOVED.iter().filter(|(_, soft)| v & soft != 0).fold(v, |v, (bit, soft)| (v & !soft) | bit)
    }

    fn update(&mut self, at: u64, v: u64) -> R<()> {
        let maddr = self.mfn(at >> 12).ok_or(MmuError::Frame { entry: at, pfn: at >> 12 })? << 12 | (at & 0xff8);
        let u = MmuUpdate { ptr: maddr, val: v };
        mmu::hypercall(Hypercall::MmuUpdate, [&u as *const _ as u64, 1, 0, abi::DOMID_SELF, 0])
    }

    /// `pt_write` of the kernel's entry `e` at address `at`.
    pub fn write_entry(&mut self, at: u64, e: u64) -> R<()> {
        let Some(level) = self.level_of(at >> 12) else {
            self.stats.pt_store += 1;
            // SAFETY: not a table: an ordinary writable page of the kernel's (identity-mapped).
            unsafe { (at as *mut u64).write_volatile(e) };
            return Ok(());
        };
        if level > 1 && e & PRESENT != 0 && e & HUGE == 0 {
            self.adopt((e & ADDR) >> 12, level - 1, None)?;
        }
        let v = self.to_machine(e, level, at)?;
        self.stats.pt_update += 1;
        self.update(at, v)
    }

    /// Record the pages reachable from `pfn` (a table at `level`) that are not tables yet.
    fn collect(&mut self, pfn: u64, level: u8) -> R<()> {
        match self.level_of(pfn) {
            Some(l) if l == level => return Ok(()),
            Some(was) => return Err(MmuError::Level { pfn, level, was }),
            None => {}
        }
        self.tables.push(pfn, level).map_err(|_| MmuError::Tables)?;
        if level > 1 {
            for i in (0..512).filter(|&i| !xen_slot(level, i)) {
                let e = read(pfn << 12, i);
                if e & PRESENT != 0 && e & HUGE == 0 {
                    self.collect((e & ADDR) >> 12, level - 1)?;
                }
            }
        }
        Ok(())
    }

    /// Make the page `pfn` and the pages it reaches Xen's tables (see the module comment);
    /// `root` is a new root being loaded, searched for writable aliases with the pinned ones
    /// and given the runtime's mappings.
    fn adopt(&mut self, pfn: u64, level: u8, root: Option<u64>) -> R<()> {
        let first = self.tables.len();
        self.collect(pfn, level)?;
        for t in first..self.tables.len() {
            let (p, l) = self.tables.at(t);
            for i in (0..512).filter(|&i| !xen_slot(l, i)) {
                let at = (p << 12) + i * 8;
                let v = self.to_machine(read(p << 12, i), l, at)?;
                // SAFETY: a page of the kernel's not yet Xen's table: still writable.
                unsafe { (at as *mut u64).write_volatile(v) };
            }
        }
        if let Some(root) = root {
            self.map_runtime(root, first)?;
        }
        for t in first..self.tables.len() {
            self.write_protect(self.tables.at(t).0, root)?;
        }
        self.stats.adopted += (self.tables.len() - first) as u32;
        if self.boot_root == 0 {
            mmu::mmuext(abi::MMUEXT_TLB_FLUSH_LOCAL, 0)?;
        }
        Ok(())
    }

    /// Take the writable mappings of page `pfn` away: Xen's boot tables while they are
    /// pinned, else the identity mapping in the loaded roots (and `root`, being loaded).
    fn write_protect(&mut self, pfn: u64, root: Option<u64>) -> R<()> {
        let va = pfn << 12;
        if self.boot_root != 0 {
            let mfn = self.mfn(pfn).ok_or(MmuError::Frame { entry: va, pfn })?;
            let pte = mfn << 12 | PRESENT | mmu::ACCESSED;
            return mmu::hypercall(Hypercall::UpdateVaMapping, [va, pte, abi::UVMF_INVLPG, 0, 0]);
        }
        let roots = self.roots;
        for r in roots[..self.nroots].iter().copied().chain(root) {
            if let Some(at) = self.leaf_entry(r, va) {
                let e = read(at & !0xfff, (at & 0xfff) / 8);
                if e & PRESENT != 0 && e & WRITABLE != 0 {
                    self.update(at, hide(e, WRITABLE))?;
                }
            }
        }
        Ok(())
    }

    /// Address of the leaf entry for `va` under root `root` (all levels Xen's tables already).
    fn leaf_entry(&self, root: u64, va: u64) -> Option<u64> {
        let mut table = root << 12;
        for level in (2..=4).rev() {
            let e = read(table, index(va, level));
            if e & PRESENT == 0 || e & HUGE != 0 {
                return None;
            }
            table = self.pfn((e & ADDR) >> 12)? << 12;
        }
        Some(table + index(va, 1) * 8)
    }

    /// Add the runtime's pages (itself, the p2m list, the pages Xen shares) where root `root`
    /// maps nothing, creating tables from the pool; pages from `first` on are still writable.
    fn map_runtime(&mut self, root: u64, first: usize) -> R<()> {
        let (rt, p2m) = (self.runtime, self.p2m_range);
        for va in (rt.0..rt.1).chain(p2m.0..p2m.1).step_by(4096) {
            let mut table = root;
            for level in (1..=4).rev() {
                let i = index(va, level);
                let e = read(table << 12, i);
                if level == 1 {
                    if e & PRESENT == 0 {
                        let v = self.extra(va).unwrap_or(0);
                        self.put(table, i, v, first)?;
                    }
                    break;
                }
                table = if e & PRESENT != 0 {
                    self.pfn((e & ADDR) >> 12).ok_or(MmuError::Frame { entry: va, pfn: e >> 12 })?
                } else {
                    let t = self.pool_table(level - 1)?;
                    let mfn = self.mfn(t).unwrap_or(0);
                    self.put(table, i, mfn << 12 | TABLE_FLAGS, first)?;
                    t
                };
            }
        }
        Ok(())
    }

    /// Write entry `i` of table `pfn`: a plain store into a kernel page adopted in this round
    /// (index >= `first`, still writable), `mmu_update` anywhere else.
    fn put(&mut self, pfn: u64, i: u64, v: u64, first: usize) -> R<()> {
        let fresh = self.tables.find(pfn).is_some_and(|(i, _)| i >= first) && !Self::is_pool(pfn);
        if fresh {
            // SAFETY: as in `adopt`.
            unsafe { entry_at(pfn << 12, i).write_volatile(v) };
            return Ok(());
        }
        self.update((pfn << 12) + i * 8, v)
    }

    /// A zeroed pool page for a table of the runtime's own mappings (read-only everywhere).
    fn pool_table(&mut self, level: u8) -> R<u64> {
        if self.used == mmu::POOL_PAGES || self.tables.len() == MAX_TABLES {
            return Err(MmuError::PoolFull);
        }
        // SAFETY: taking the address of a pool page.
        let pfn = unsafe { core::ptr::addr_of!((*mmu::pool())[self.used]) } as u64 >> 12;
        self.used += 1;
        self.tables.push(pfn, level).map_err(|_| MmuError::PoolFull)?;
        Ok(pfn)
    }

    /// A CR3 load in direct mode.
    pub(super) fn direct_load_cr3(&mut self, cr3: u64) -> R<()> {
        let pfn = cr3 >> 12;
        let pinned = self.roots[..self.nroots].contains(&pfn);
        if !pinned {
            if self.nroots == MAX_ROOTS {
                return Err(MmuError::Tables);
            }
            self.adopt(pfn, 4, Some(pfn))?;
            let mfn = self.mfn(pfn).ok_or(MmuError::Frame { entry: cr3, pfn })?;
            mmu::mmuext(abi::MMUEXT_PIN_L4_TABLE, mfn)?;
            self.roots[self.nroots] = pfn;
            self.nroots += 1;
        }
        if self.guest_cr3 == Some(cr3) {
            mmu::mmuext(abi::MMUEXT_TLB_FLUSH_LOCAL, 0)?;
        } else {
            mmu::mmuext(abi::MMUEXT_NEW_BASEPTR, self.mfn(pfn).unwrap_or(0))?;
        }
        if self.boot_root != 0 {
            // Xen's boot tables map every page writable: unpinned, they no longer count.
            mmu::mmuext(abi::MMUEXT_UNPIN_TABLE, core::mem::take(&mut self.boot_root))?;
        }
        self.guest_cr3 = Some(cr3);
        Ok(())
    }
}
