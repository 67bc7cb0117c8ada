//! The kernel's page tables under Xen, in one of two modes chosen at boot:
//! - direct (`super::direct`), for a kernel whose page-table accesses are sites: its tables
//!   become Xen's tables, written with `mmu_update`;
//! - shadow (this file), for any other kernel: its own 4-level tables (pseudo-physical frame
//!   numbers, written with plain stores) are translated into Xen-validated tables (machine
//!   frames) that the runtime owns and updates only through `mmu_update`.
//!
//! Shadow mode:
//! - A shadow table mirrors one guest table: key (level, guest table address, virtual base),
//!   so tables the kernel shares between address spaces are shared in the shadows too.
//! - A CR3 load resyncs the whole lower half of the new address space (only entries that
//!   differ are written), pins a new root and switches with `MMUEXT_NEW_BASEPTR` (or flushes
//!   the TLB when the root is the current one); `invlpg` resyncs one page and issues
//!   `MMUEXT_INVLPG_LOCAL` (with the changed entries, one multicall); a page fault on a page the guest maps but the shadow does not
//!   (a mapping added without `invlpg`, allowed on hardware) resyncs it and retries.
//! - Every shadow also maps the runtime itself and the p2m list (Xen's identity layout), the
//!   shadow tables read-only, and the pages Xen shares (shared_info, a domU's console ring).
//! - Guest pages naming frame 0xfee00 (the local APIC) map the runtime's LAPIC model page.
//! - Global, huge (2 MiB/1 GiB) guest pages and accessed/dirty write-back are not supported.

use super::abi::{self, Hypercall, MmuUpdate, MmuextOp, MulticallEntry};

pub const PRESENT: u64 = 1;
pub const WRITABLE: u64 = 1 << 1;
pub const USER: u64 = 1 << 2;
pub const ACCESSED: u64 = 1 << 5;
pub const DIRTY: u64 = 1 << 6;
pub const HUGE: u64 = 1 << 7;
pub(super) const ADDR: u64 = 0x000f_ffff_ffff_f000;
/// Guest leaf flags carried into the shadow (not G: every CR3 load flushes everything).
const LEAF_FLAGS: u64 = PRESENT | WRITABLE | USER | (1 << 3) | (1 << 4) | ACCESSED | DIRTY | (1 << 63);
pub(super) const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER | ACCESSED;
/// Lower half of the address space: Xen owns L4 slots 256–271 and the kernel lives below.
const LOWER_HALF: u64 = 1 << 47;
const NO_GUEST: u64 = u64::MAX;

pub const POOL_PAGES: usize = 64;
/// The frames of the runtime's copy of the kernel's GDT (xen/gdt.rs), after the pool.
pub const GDT_PAGES: usize = super::gdt::FRAMES;
use crate::guest::arena::{self, Table};

/// The shadow table pool (the first pages of the backends' shared arena); read-only in every
/// mapping once boot has remapped it.
pub fn pool() -> *mut [Table; POOL_PAGES] {
    arena::pages::<POOL_PAGES>()
}

/// The GDT frames: the arena's pages after the pool, read-only in every mapping like the pool
/// (Xen holds them as descriptor pages; they are written with `update_descriptor`).
pub fn gdt_frames() -> *mut [Table; GDT_PAGES] {
    // SAFETY: the arena has room for both (checked by `pages`); an address computation only.
    unsafe { (arena::pages::<{ POOL_PAGES + GDT_PAGES }>() as *mut Table).add(POOL_PAGES).cast() }
}

/// Most page-table pages direct mode tracks (the kernel's and the runtime's together).
pub(super) const MAX_TABLES: usize = super::tables::CAPACITY;
/// Most address spaces (root tables) direct mode keeps pinned.
pub(super) const MAX_ROOTS: usize = 8;

#[derive(Clone, Copy)]
struct Shadow {
    level: u8,
    guest: u64,
    base: u64,
    mfn: u64,
}

const QUEUE: usize = 64;

pub struct Mmu {
    shadows: [Shadow; POOL_PAGES],
    /// Pool pages in use (shadow tables, or direct mode's tables for the runtime's mappings).
    pub(super) used: usize,
    queue: [MmuUpdate; QUEUE],
    queued: usize,
    /// The guest CR3 loaded last (None: still on Xen's boot tables) and its root shadow.
    pub guest_cr3: Option<u64>,
    root: usize,
    /// Layout facts from boot.
    pub p2m: u64,
    pub nr_pages: u64,
    pub runtime: (u64, u64),
    pub p2m_range: (u64, u64),
    /// Pages Xen shares with the domain (shared_info, the console ring), mapped writable at
    /// runtime addresses in every shadow: (virtual address, machine address); 0 = unused.
    pub shared: [(u64, u64); 2],
    pub lapic_page: u64,
    /// Direct mode (chosen at boot) and its state: page-table pages Xen holds as tables
    /// (pseudo-physical frame, level), pinned roots, Xen's boot root (unpinned at the first
    /// switch; 0 after).
    pub direct: bool,
    pub(super) tables: super::tables::Tables,
    pub(super) roots: [u64; MAX_ROOTS],
    pub(super) nroots: usize,
    pub boot_root: u64,
    /// What the exit summary reports: shadow resyncs (CR3 loads, single pages), or direct
    /// mode's page-table writes by route and tables adopted.
    pub stats: Stats,
}

#[derive(Default, Clone, Copy)]
pub struct Stats {
    pub resync_cr3: u32,
    pub resync_page: u32,
    /// Shadow entries written (`mmu_update` entries of shadow mode).
    pub written: u32,
    pub pt_update: u32,
    pub pt_store: u32,
    pub pt_read_translated: u32,
    pub adopted: u32,
}

/// What went wrong, for the fatal-error message.
pub enum MmuError {
    Hypercall(Hypercall, [u64; 5], i64),
    PoolFull,
    Huge {
        va: u64,
    },
    NotRam {
        va: u64,
        pfn: u64,
    },
    /// Direct mode: an entry (at kernel address `entry`) names a frame that is not the kernel's.
    Frame {
        entry: u64,
        pfn: u64,
    },
    /// Direct mode: one page used as page tables at two levels.
    Level {
        pfn: u64,
        level: u8,
        was: u8,
    },
    /// Direct mode: more page-table pages or address spaces than it tracks.
    Tables,
}

pub(super) type R<T> = Result<T, MmuError>;

/// Xen's `_PAGE_GUEST_KERNEL` (a software bit): a 64-bit PV guest's leaf without USER is
/// stored with USER and this bit (Xen runs the guest kernel in ring 3 and keeps kernel-only
/// mappings out of user mode by switching tables).
const GUEST_KERNEL: u64 = 1 << 52;

/// Entry `v`, written at `level`, as Xen stores it and as it reads back apart from accessed
/// and dirty, which the CPU sets in the entries it uses (never written back to the kernel's,
/// docs/xen-pv.md): an entry that reads back as this is current, no `mmu_update` needed.
fn as_xen_keeps(v: u64, level: u8) -> u64 {
    let v = v & !(ACCESSED | DIRTY);
    if level == 1 && v & PRESENT != 0 && v & USER == 0 {
        v | USER | GUEST_KERNEL
    } else {
        v
    }
}

fn span(level: u8) -> u64 {
    1u64 << (12 + 9 * (level as u32 - 1))
}

pub(super) fn hypercall(h: Hypercall, a: [u64; 5]) -> R<()> {
    // SAFETY: callers pass pointers to live, correctly laid out structures.
    let rc = unsafe { abi::call(h, a) };
    if rc < 0 {
        return Err(MmuError::Hypercall(h, a, rc));
    }
    Ok(())
}

pub fn mmuext(cmd: u32, arg1: u64) -> R<()> {
    let op = MmuextOp { cmd, arg1, arg2: 0 };
    hypercall(Hypercall::MmuextOp, [&op as *const _ as u64, 1, 0, abi::DOMID_SELF, 0])
}

impl Mmu {
    pub const fn new() -> Mmu {
        Mmu {
            shadows: [Shadow { level: 0, guest: 0, base: 0, mfn: 0 }; POOL_PAGES],
            used: 0,
            queue: [MmuUpdate { ptr: 0, val: 0 }; QUEUE],
            queued: 0,
            guest_cr3: None,
            root: 0,
            p2m: 0,
            nr_pages: 0,
            runtime: (0, 0),
            p2m_range: (0, 0),
            shared: [(0, 0); 2],
            lapic_page: 0,
            direct: false,
            tables: super::tables::Tables::new(),
            roots: [0; MAX_ROOTS],
            nroots: 0,
            boot_root: 0,
            stats: Stats {
                resync_cr3: 0,
                resync_page: 0,
                written: 0,
                pt_update: 0,
                pt_store: 0,
                pt_read_translated: 0,
                adopted: 0,
            },
        }
    }

    /// Machine frame of pseudo-physical frame `pfn` (Xen's p2m list, identity-mapped).
    pub fn mfn(&self, pfn: u64) -> Option<u64> {
        // SAFETY: the p2m list has nr_pages entries and every shadow maps it.
        (pfn < self.nr_pages).then(|| unsafe { ((self.p2m + pfn * 8) as *const u64).read_volatile() })
    }

    /// The runtime's pages Xen must see mapped read-only only: the pool and the GDT frames.
    pub(super) fn read_only_range() -> (u64, u64) {
        let start = pool() as u64;
        (start, start + ((POOL_PAGES + GDT_PAGES) * 4096) as u64)
    }

    /// Boot: make the pool and the GDT frames read-only in Xen's boot tables, so its pages can
    /// become tables and descriptor pages.
    pub fn protect_pool(&self) -> R<()> {
        let (start, end) = Self::read_only_range();
        for va in (start..end).step_by(4096) {
            let mfn = self.mfn(va >> 12).unwrap_or(0);
            hypercall(Hypercall::UpdateVaMapping, [va, mfn << 12 | PRESENT | ACCESSED, abi::UVMF_INVLPG, 0, 0])?;
        }
        Ok(())
    }

    /// The runtime's own mapping of `va`, if it is in a range every shadow maps.
    pub(super) fn extra(&self, va: u64) -> Option<u64> {
        let inside = |(a, b): (u64, u64)| va >= a && va < b;
        if let Some((_, maddr)) = self.shared.iter().find(|(v, m)| *v == va && *m != 0) {
            return Some(maddr | PRESENT | WRITABLE | ACCESSED | DIRTY);
        }
        if !inside(self.runtime) && !inside(self.p2m_range) {
            return None;
        }
        let mfn = self.mfn(va >> 12)?;
        let rw = if inside(Self::read_only_range()) { 0 } else { WRITABLE | DIRTY };
        Some(mfn << 12 | PRESENT | ACCESSED | rw)
    }

    fn extras_meet(&self, lo: u64, hi: u64) -> bool {
        let meets = |(a, b): (u64, u64)| a < hi && lo < b;
        meets(self.runtime) || meets(self.p2m_range)
    }

    /// The shadow leaf for guest entry `g` (present or None) at `va`.
    fn leaf(&self, g: Option<u64>, va: u64) -> R<u64> {
        if let Some(e) = self.extra(va) {
            return Ok(e);
        }
        let Some(g) = g else { return Ok(0) };
        let pfn = (g & ADDR) >> 12;
        if pfn == super::devices::LAPIC_BASE >> 12 {
            let mfn = self.mfn(self.lapic_page >> 12).unwrap_or(0);
            return Ok(mfn << 12 | (g & (PRESENT | WRITABLE | USER | ACCESSED | DIRTY)));
        }
        let mfn = self.mfn(pfn).ok_or(MmuError::NotRam { va, pfn })?;
        Ok(mfn << 12 | (g & LEAF_FLAGS))
    }

    fn shadow(&mut self, level: u8, guest: u64, base: u64) -> R<usize> {
        if let Some(i) =
            self.shadows[..self.used].iter().position(|s| s.level == level && s.guest == guest && s.base == base)
        {
            return Ok(i);
        }
        if self.used == POOL_PAGES {
            return Err(MmuError::PoolFull);
        }
        let i = self.used;
        // SAFETY: taking the address of a pool page.
        let va = unsafe { core::ptr::addr_of!((*pool())[i]) } as u64;
        self.shadows[i] = Shadow { level, guest, base, mfn: self.mfn(va >> 12).unwrap_or(0) };
        self.used += 1;
        Ok(i)
    }

    fn set(&mut self, s: usize, i: usize, v: u64) -> R<()> {
        // SAFETY: reading a pool page (mapped read-only); Xen writes it behind our back.
        let cur = unsafe { core::ptr::addr_of!((*pool())[s][i]).read_volatile() };
        if as_xen_keeps(v, self.shadows[s].level) == cur & !(ACCESSED | DIRTY) {
            return Ok(());
        }
        if self.queued == QUEUE {
            self.flush()?;
        }
        self.queue[self.queued] = MmuUpdate { ptr: self.shadows[s].mfn << 12 | (i as u64 * 8), val: v };
        self.queued += 1;
        Ok(())
    }

    /// Write the queued entries, in order (children before the parents that point at them).
    pub fn flush(&mut self) -> R<()> {
        if self.queued == 0 {
            return Ok(());
        }
        let n = self.queued as u64;
        self.stats.written += n as u32;
        self.queued = 0;
        hypercall(Hypercall::MmuUpdate, [self.queue.as_ptr() as u64, n, 0, abi::DOMID_SELF, 0])
    }

    /// Bring the shadow of guest table `guest` (level 4..1, covering from `base`) in line with
    /// the guest for the addresses in [lo, hi); returns the shadow's index.
    fn sync(&mut self, level: u8, guest: u64, base: u64, lo: u64, hi: u64) -> R<usize> {
        let s = self.shadow(level, guest, base)?;
        let step = span(level);
        let first = (lo.max(base) - base) / step;
        let end = if level == 4 { LOWER_HALF } else { base + 512 * step };
        let mut i = first;
        while i < 512 && base + i * step < hi.min(end) {
            let va = base + i * step;
            let g = (guest != NO_GUEST)
                // SAFETY: guest tables are identity-mapped kernel memory (docs/xen-pv.md).
                .then(|| unsafe { ((guest + i * 8) as *const u64).read_volatile() })
                .filter(|e| e & PRESENT != 0);
            let want = if level == 1 {
                self.leaf(g, va)?
            } else if g.is_some_and(|e| e & HUGE != 0) {
                return Err(MmuError::Huge { va });
            } else if g.is_some() || self.extras_meet(va, va + step) {
                let child = g.map_or(NO_GUEST, |e| e & ADDR);
                let c = self.sync(level - 1, child, va, lo, hi)?;
                self.shadows[c].mfn << 12 | TABLE_FLAGS
            } else {
                0
            };
            self.set(s, i as usize, want)?;
            i += 1;
        }
        Ok(s)
    }

    /// A CR3 load of guest table `cr3`.
    pub fn load_cr3(&mut self, cr3: u64) -> R<()> {
        let cr3 = cr3 & ADDR;
        if self.direct {
            return self.direct_load_cr3(cr3);
        }
        self.stats.resync_cr3 += 1;
        let fresh = !self.shadows[..self.used].iter().any(|s| s.level == 4 && s.guest == cr3);
        let root = self.sync(4, cr3, 0, 0, LOWER_HALF)?;
        self.flush()?;
        let mfn = self.shadows[root].mfn;
        if fresh {
            mmuext(abi::MMUEXT_PIN_L4_TABLE, mfn)?;
        }
        if self.guest_cr3.is_some() && root == self.root {
            mmuext(abi::MMUEXT_TLB_FLUSH_LOCAL, 0)?;
        } else {
            mmuext(abi::MMUEXT_NEW_BASEPTR, mfn)?;
        }
        self.root = root;
        self.guest_cr3 = Some(cr3);
        Ok(())
    }

    /// Resync the page at `va` in the current address space and, if its shadow changed, write
    /// the entries and flush the page from the TLB in one transition to Xen (a multicall of
    /// `mmu_update` and `MMUEXT_INVLPG_LOCAL`); true if it changed.
    pub fn resync_page(&mut self, va: u64) -> R<bool> {
        let Some(cr3) = self.guest_cr3.filter(|_| !self.direct) else { return Ok(false) };
        self.stats.resync_page += 1;
        self.flush()?;
        self.sync(4, cr3, 0, va, va + 1)?;
        if self.queued == 0 {
            return Ok(false);
        }
        let n = core::mem::take(&mut self.queued) as u64;
        self.stats.written += n as u32;
        let op = MmuextOp { cmd: abi::MMUEXT_INVLPG_LOCAL, arg1: va, arg2: 0 };
        let ops = [
            (Hypercall::MmuUpdate, [self.queue.as_ptr() as u64, n, 0, abi::DOMID_SELF, 0]),
            (Hypercall::MmuextOp, [&op as *const _ as u64, 1, 0, abi::DOMID_SELF, 0]),
        ];
        let mut calls =
            ops.map(|(h, a)| MulticallEntry { op: h as u64, result: 0, args: [a[0], a[1], a[2], a[3], a[4], 0] });
        hypercall(Hypercall::Multicall, [calls.as_mut_ptr() as u64, calls.len() as u64, 0, 0, 0])?;
        match calls.iter().zip(ops).find(|(c, _)| (c.result as i64) < 0) {
            Some((c, (h, a))) => Err(MmuError::Hypercall(h, a, c.result as i64)),
            None => Ok(true),
        }
    }

    /// `invlpg`: resync one page and flush it from the TLB. Direct mode: the entry was written
    /// to Xen's tables already; only the TLB is stale.
    pub fn invlpg(&mut self, va: u64) -> R<()> {
        if !self.resync_page(va)? {
            mmuext(abi::MMUEXT_INVLPG_LOCAL, va)?;
        }
        Ok(())
    }
}
