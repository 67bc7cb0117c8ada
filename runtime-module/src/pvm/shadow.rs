//! Shadow page tables for KVM-PVM's native mode: copies of the kernel's tables with U=1 at
//! every level, rooted at a page whose GPA has bit 12 set (docs/pvm.md). A [`Cache`] keeps
//! one copy per kernel root in its own pool ([`SLOTS`]): loading a root the cache holds
//! brings that copy in line entry by entry (only entries that differ are written, so the
//! host's own shadow of an unchanged table stays valid), a new root is built whole in a pool
//! that is not live. The tables the CPU walks are edited only as a kernel edits its own live
//! tables: one entry at a time, a new subtree complete before it is linked.
//!
//! The kernel's tables are read at their physical addresses (identity-mapped kernels, as
//! `hw::map_runtime` assumes); large pages are copied as leaves. Accessed/dirty bits are set
//! in the copy only (the example kernel never reads them).

use crate::guest::arena::{self, Table};
use crate::guest::{gpa, link_value, Global};
use core::cell::UnsafeCell;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const HUGE: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
/// CR3 bit the mode requires (root table at an odd 4 KiB page).
pub const ROOT_BIT: u64 = 1 << 12;

/// The copy of a present leaf entry: U=1, and A/D set up front. The kernel never sees the
/// copy's A/D bits (its own tables are not written); a host that shadows the copy maps a
/// page with A/D clear read-only first, to set D on the first write: one fault more per page
/// written after a remap (measured: docs/pvm.md).
fn leaf(e: u64) -> u64 {
    e | USER | ACCESSED | DIRTY
}

/// Tables per pool: the example kernel's busiest address space uses about a dozen; one
/// extra page so that a root with [`ROOT_BIT`] always fits; the rest absorbs subtrees
/// replaced in place until the copy is rebuilt. (Every pool page is runtime bss, which in a
/// Linux vmlinux must fit `.text`'s int3 padding: keep the arena small.)
const POOL_PAGES: usize = 32;
/// Address spaces cached (the example kernel switches between three).
pub const SLOTS: usize = 4;

/// The pools: the backends' shared arena as `SLOTS` pools of `POOL_PAGES`.
fn pools() -> *mut [[Table; POOL_PAGES]; SLOTS] {
    arena::pages::<{ POOL_PAGES * SLOTS }>().cast()
}
/// The kernel table each pool page copies.
static SOURCES: Global<[[u64; POOL_PAGES]; SLOTS]> = Global(UnsafeCell::new([[0; POOL_PAGES]; SLOTS]));

/// A pool being filled: its tables, the root's index, the next free one, and whether an
/// entry the CPU may hold a translation through was changed ([`Change::Replaced`]).
struct Fill {
    tables: &'static mut [[u64; 512]; POOL_PAGES],
    sources: &'static mut [u64; POOL_PAGES],
    root: usize,
    used: usize,
    replaced: bool,
}

/// What bringing an entry of a copy in line with the kernel's did. x86 caches no
/// translation through a not-present entry (SDM 4.10.2.3 / 4.10.3.1), so only a present
/// entry that changed can leave something stale in the TLB.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Change {
    /// Already current.
    None,
    /// Was not present in the copy: nothing to flush.
    Filled,
    /// A present entry changed: the caller must flush.
    Replaced,
    /// A present intermediate entry changed (another kernel table below it, or other
    /// flags): translations of every address under it may be stale, so the caller must flush
    /// them all (the kernel's own `invlpg`s of those addresses find the copy current).
    ReplacedTable,
}

impl Change {
    /// The change from copy entry `live` to `v` (A/D bits the CPU set in the copy are no
    /// change of the kernel's).
    fn of(live: u64, v: u64) -> Change {
        match (live & PRESENT != 0, (live ^ v) & !(ACCESSED | DIRTY) != 0) {
            (_, false) => Change::None,
            (false, true) => Change::Filled,
            (true, true) => Change::Replaced,
        }
    }
}

impl Fill {
    fn alloc(&mut self) -> Option<usize> {
        self.used += usize::from(self.used == self.root);
        let i = self.used;
        self.used += 1;
        (i < POOL_PAGES).then_some(i)
    }

    /// Copy the kernel's table at physical `src` (level 4 = root) into table `dst`.
    fn copy(&mut self, src: u64, dst: usize, level: u32) -> Option<()> {
        self.sources[dst] = src & ADDR;
        for i in 0..512 {
            // SAFETY: `src` is a page-table page the kernel built (identity-mapped).
            let e = unsafe { ((src & ADDR) as *const u64).add(i).read_volatile() };
            let v = if e & PRESENT == 0 {
                0
            } else if level == 1 || e & HUGE != 0 {
                leaf(e)
            } else {
                let child = self.alloc()?;
                self.copy(e & ADDR, child, level - 1)?;
                self.link(e, child)
            };
            self.tables[dst][i] = v;
        }
        Some(())
    }
}

impl Fill {
    /// Bring table `dst`, a copy of the kernel's table `src`, in line with it: an entry is
    /// written only where it differs (A/D bits the CPU set aside), a child whose kernel table
    /// is another one is copied afresh before it is linked (the old one stays unused until
    /// the copy is rebuilt). None when the pool is full.
    fn refresh(&mut self, src: u64, dst: usize, level: u32) -> Option<()> {
        for i in 0..512 {
            // SAFETY: as in `copy`.
            let e = unsafe { ((src & ADDR) as *const u64).add(i).read_volatile() };
            let live = self.tables[dst][i];
            let v = if e & PRESENT == 0 {
                0
            } else if level == 1 || e & HUGE != 0 {
                leaf(e)
            } else {
                let child = match self.copy_of(live, e) {
                    Some(c) => {
                        self.refresh(e & ADDR, c, level - 1)?;
                        c
                    }
                    None => {
                        let c = self.alloc()?;
                        self.copy(e & ADDR, c, level - 1)?;
                        c
                    }
                };
                self.link(e, child)
            };
            match Change::of(live, v) {
                Change::None => {}
                c => {
                    self.replaced |= c == Change::Replaced;
                    self.tables[dst][i] = v;
                }
            }
        }
        Some(())
    }

    /// The pool page at guest-physical `table`.
    fn index(&self, table: u64) -> Option<usize> {
        self.tables.iter().position(|t| gpa(t.as_ptr() as u64) == table)
    }

    /// The copy of the kernel's intermediate entry `e`: its flags and U, linking pool page
    /// `child`.
    fn link(&self, e: u64, child: usize) -> u64 {
        (e & !ADDR) | gpa(self.tables[child].as_ptr() as u64) | USER
    }

    /// The pool page the copy's intermediate entry `live` links, when it copies the table the
    /// kernel's entry `e` points at.
    fn copy_of(&self, live: u64, e: u64) -> Option<usize> {
        (live & (PRESENT | HUGE) == PRESENT)
            .then(|| self.index(live & ADDR))
            .flatten()
            .filter(|&c| self.sources[c] == e & ADDR)
    }
}

/// A built copy: the CR3 value to load (root GPA with [`ROOT_BIT`], the kernel's low flag
/// bits), its root's index and the pool pages in use.
#[derive(Clone, Copy)]
pub struct Live {
    pub cr3: u64,
    root: usize,
    used: usize,
}

impl Live {
    /// No copy yet.
    pub const NONE: Live = Live { cr3: 0, root: 0, used: 0 };
}

/// The pool of slot `slot`, positioned at copy `c`.
fn fill(slot: usize, c: &Live) -> Fill {
    // SAFETY: single vCPU, no events in the runtime; callers edit a pool not live, or the
    // live one entry by entry.
    let (tables, sources) = unsafe { (&mut (*pools())[slot], &mut SOURCES.get()[slot]) };
    Fill { tables, sources, root: c.root, used: c.used, replaced: false }
}

/// Build the copy of the address space rooted at `kernel_cr3` in slot `slot` (not live);
/// None when the pool is too small.
fn build(slot: usize, kernel_cr3: u64) -> Option<Live> {
    let mut f = fill(slot, &Live::NONE);
    // The root is whichever of the first two pages has bit 12 set.
    f.root = usize::from(gpa(f.tables[0].as_ptr() as u64) & ROOT_BIT == 0);
    f.copy(kernel_cr3, f.root, 4)?;
    Some(Live { cr3: gpa(f.tables[f.root].as_ptr() as u64) | (kernel_cr3 & 0x18), root: f.root, used: f.used })
}

/// One copy per kernel root, least recently loaded replaced first.
pub struct Cache {
    /// Kernel root (0: empty), its copy and when it was last loaded.
    slots: [(u64, Live, u64); SLOTS],
    live: usize,
    clock: u64,
}

impl Cache {
    pub const NEW: Cache = Cache { slots: [(0, Live::NONE, 0); SLOTS], live: 0, clock: 0 };

    /// The live copy's CR3 value.
    pub fn cr3(&self) -> u64 {
        self.slots[self.live].1.cr3
    }

    /// The copy of `kernel_cr3`'s address space, up to date, made the live one. None when
    /// the kernel's tables do not fit a pool.
    pub fn load(&mut self, kernel_cr3: u64) -> Option<Loaded> {
        let root = kernel_cr3 & ADDR;
        let before = self.cr3();
        self.clock += 1;
        let hit = self.slots.iter().position(|s| s.0 == root && s.1.cr3 != 0);
        let mut replaced = false;
        let refreshed = hit.filter(|&i| {
            let c = &mut self.slots[i].1;
            let mut f = fill(i, c);
            let ok = f.refresh(root, c.root, 4).is_some();
            c.used = f.used;
            replaced = f.replaced;
            if !ok {
                // Full of replaced subtrees: rebuilt elsewhere, this one goes first next.
                self.slots[i].0 = 0;
                self.slots[i].2 = 0;
            }
            ok
        });
        let i = match refreshed {
            Some(i) => i,
            None => {
                // A slot not live: the CPU never walks a copy being built.
                let i = (0..SLOTS).filter(|&i| i != self.live).min_by_key(|&i| self.slots[i].2)?;
                self.slots[i] = (0, Live::NONE, 0);
                self.slots[i] = (root, build(i, kernel_cr3)?, 0);
                i
            }
        };
        let c = &mut self.slots[i].1;
        c.cr3 = (c.cr3 & ADDR) | (kernel_cr3 & 0x18);
        self.slots[i].2 = self.clock;
        self.live = i;
        Some(Loaded { cr3: c.cr3, built: refreshed.is_none(), replaced, switched: c.cr3 != before })
    }
}

/// What [`Cache::load`] did.
pub struct Loaded {
    /// The CR3 value of the copy.
    pub cr3: u64,
    /// Built whole (a miss), not brought up to date: translations the CPU holds for the
    /// slot's previous copy are stale.
    pub built: bool,
    /// Brought up to date replacing a present entry: translations the CPU holds for this
    /// copy may be stale.
    pub replaced: bool,
    /// Another copy than the one loaded before (or other CR3 flag bits).
    pub switched: bool,
}

impl Loaded {
    /// Whether the CPU holds translations of this copy that its load must drop (every
    /// replacement made through `invlpg` was flushed when made, fills need none).
    pub fn stale(&self) -> bool {
        self.built || self.replaced
    }
}

/// After the kernel's `invlpg va`: bring the live copy in line with the
/// kernel's tables for `va`, in place, as a kernel edits its own live tables: the leaf entry
/// (or a large page) is rewritten, a level the copy lacks is copied whole, and so is one
/// whose kernel entry now points at another table or has other flags (linked after it is
/// complete; the old subtree stays unused until the copy is rebuilt). What changed: only
/// [`Change::Replaced`] needs the hardware `invlpg` and [`Change::ReplacedTable`] a full
/// flush (every replacement is flushed by the caller when made, so nothing stale is in the
/// TLB otherwise: a kernel's repeated `invlpg` of one page, or one after a new mapping, need
/// not reach the hardware); None when the pool is full (the caller rebuilds).
pub fn update(cache: &mut Cache, kernel_cr3: u64, va: u64) -> Option<Change> {
    let slot = cache.live;
    let c = &mut cache.slots[slot].1;
    let mut fill = fill(slot, c);
    let (mut src, mut dst) = (kernel_cr3 & ADDR, c.root);
    for (level, shift) in [(4u32, 39u32), (3, 30), (2, 21), (1, 12)] {
        let i = ((va >> shift) & 511) as usize;
        // SAFETY: a page-table page the kernel built (identity-mapped).
        let e = unsafe { (src as *const u64).add(i).read_volatile() };
        let live = fill.tables[dst][i];
        if e & PRESENT == 0 || level == 1 || e & HUGE != 0 {
            let v = if e & PRESENT == 0 { 0 } else { leaf(e) };
            let change = Change::of(live, v);
            // Only a change is written: the host write-protects table pages it shadows, so
            // even rewriting the same value can trap.
            if change != Change::None {
                fill.tables[dst][i] = v;
            }
            return Some(change);
        }
        let current = fill.copy_of(live, e).filter(|_| (live ^ e) & !(ADDR | USER | ACCESSED | DIRTY) == 0);
        let Some(child) = current else {
            let child = fill.alloc()?;
            fill.copy(e & ADDR, child, level - 1)?;
            fill.tables[dst][i] = fill.link(e, child);
            c.used = fill.used;
            return Some(if live & PRESENT == 0 { Change::Filled } else { Change::ReplacedTable });
        };
        (src, dst) = (e & ADDR, child);
    }
    Some(Change::None)
}

/// What the kernel's tables say about `va`: the leaf entry, if every level is present and
/// (for a write) writable.
pub fn kernel_allows(kernel_cr3: u64, va: u64, write: bool) -> Option<u64> {
    walk(kernel_cr3, va, write, 0)
}

/// The same walk through the live copy (its table pointers are GPAs).
pub fn shadow_allows(cr3: u64, va: u64, write: bool) -> Option<u64> {
    walk(cr3, va, write, link_value!("__previrt_virt_delta"))
}

fn walk(cr3: u64, va: u64, write: bool, delta: u64) -> Option<u64> {
    let mut table = cr3 & ADDR;
    for shift in [39u32, 30, 21, 12] {
        // SAFETY: a page-table page of a live address space (identity-mapped, plus `delta`).
        let e =
            unsafe { ((table.wrapping_add(delta)) as *const u64).add(((va >> shift) & 511) as usize).read_volatile() };
        if e & PRESENT == 0 || (write && e & WRITABLE == 0) {
            return None;
        }
        if shift == 12 || e & HUGE != 0 {
            return Some(e & (ADDR | WRITABLE | PRESENT));
        }
        table = e & ADDR;
    }
    None
}
