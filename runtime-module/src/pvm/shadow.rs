//! Shadow page tables for KVM-PVM's native mode: copies of the kernel's tables with U=1 at
//! every level, rooted at a page whose GPA has bit 12 set (docs/pvm.md). Two pools: a sync
//! builds a complete copy in the pool that is not live, then the caller loads its root, so
//! the tables the CPU walks are never edited under it.
//!
//! The kernel's tables are read at their physical addresses (identity-mapped kernels, as
//! `hw::map_runtime` assumes); large pages are copied as leaves. Accessed/dirty bits are set
//! in the copy only (the example kernel never reads them).

use crate::guest::{link_value, Global};
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

/// Tables per pool: the example kernel's busiest address space uses about a dozen; one
/// extra page so that a root with [`ROOT_BIT`] always fits.
const POOL_PAGES: usize = 40;

#[repr(C, align(4096))]
struct Pools([[[u64; 512]; POOL_PAGES]; 2]);
static POOLS: Global<Pools> = Global(UnsafeCell::new(Pools([[[0; 512]; POOL_PAGES]; 2])));

fn gpa(va: u64) -> u64 {
    va.wrapping_sub(link_value!("__previrt_virt_delta"))
}

/// A pool being filled: its tables, the root's index and the next free one.
struct Fill {
    tables: &'static mut [[u64; 512]; POOL_PAGES],
    root: usize,
    used: usize,
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
        for i in 0..512 {
            // SAFETY: `src` is a page-table page the kernel built (identity-mapped).
            let e = unsafe { ((src & ADDR) as *const u64).add(i).read_volatile() };
            let v = if e & PRESENT == 0 {
                0
            } else if level == 1 || e & HUGE != 0 {
                e | USER
            } else {
                let child = self.alloc()?;
                self.copy(e & ADDR, child, level - 1)?;
                (e & !ADDR) | gpa(self.tables[child].as_ptr() as u64) | USER
            };
            self.tables[dst][i] = v;
        }
        Some(())
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

/// Build the copy of the address space rooted at `kernel_cr3` in pool `pool` (0 or 1, the
/// one not live); None when the pool is too small.
pub fn build(pool: usize, kernel_cr3: u64) -> Option<Live> {
    // SAFETY: the pool not live is only touched here (single vCPU, no events in the runtime).
    let tables = unsafe { &mut POOLS.get().0[pool & 1] };
    // The root is whichever of the first two pages has bit 12 set.
    let root = usize::from(gpa(tables[0].as_ptr() as u64) & ROOT_BIT == 0);
    let mut fill = Fill { tables, root, used: 0 };
    fill.copy(kernel_cr3, root, 4)?;
    Some(Live { cr3: gpa(fill.tables[root].as_ptr() as u64) | (kernel_cr3 & 0x18), root, used: fill.used })
}

/// After the kernel's `invlpg va`: bring the live copy `c` (in pool `pool`) in line with the
/// kernel's tables for `va`, in place, as a kernel edits its own live tables: the leaf entry
/// (or a large page) is rewritten, a level the copy lacks is copied whole. Intermediate
/// entries present in both are taken to point at the same kernel table (they change only
/// with a CR3 load, which rebuilds). Whether an entry changed (every change is flushed by the
/// caller, so an unchanged copy has nothing stale in the TLB: a kernel's repeated `invlpg`
/// of one page need not reach the hardware); None when the pool is full (the caller
/// rebuilds).
pub fn update(pool: usize, c: &mut Live, kernel_cr3: u64, va: u64) -> Option<bool> {
    // SAFETY: the live pool, edited entry by entry (single vCPU, no events in the runtime).
    let tables = unsafe { &mut POOLS.get().0[pool & 1] };
    let mut fill = Fill { tables, root: c.root, used: c.used };
    let (mut src, mut dst) = (kernel_cr3 & ADDR, c.root);
    for (level, shift) in [(4u32, 39u32), (3, 30), (2, 21), (1, 12)] {
        let i = ((va >> shift) & 511) as usize;
        // SAFETY: a page-table page the kernel built (identity-mapped).
        let e = unsafe { (src as *const u64).add(i).read_volatile() };
        let live = fill.tables[dst][i];
        if e & PRESENT == 0 || level == 1 || e & HUGE != 0 {
            let v = if e & PRESENT == 0 { 0 } else { e | USER };
            fill.tables[dst][i] = v;
            // A/D bits the CPU set in the copy are no change of the kernel's.
            return Some((live ^ v) & !(ACCESSED | DIRTY) != 0);
        }
        if live & PRESENT == 0 {
            let child = fill.alloc()?;
            fill.copy(e & ADDR, child, level - 1)?;
            fill.tables[dst][i] = (e & !ADDR) | gpa(fill.tables[child].as_ptr() as u64) | USER;
            c.used = fill.used;
            return Some(true);
        }
        let child_gpa = live & ADDR;
        dst = fill.tables.iter().position(|t| gpa(t.as_ptr() as u64) == child_gpa)?;
        src = e & ADDR;
    }
    Some(false)
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
