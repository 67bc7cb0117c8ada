//! Pages for the active backend's own page tables: Xen PV's shadow or direct tables, pvm's
//! shadow copies. One backend is active at a time (a migration re-initialises the new one),
//! so they share one arena instead of each reserving its own: in a Linux vmlinux the whole
//! runtime, bss included, must fit the int3 padding of `.text` (docs/runtime-entry.md).

use super::Global;
use core::cell::UnsafeCell;

/// One page-table page.
pub type Table = [u64; 512];

/// Pages in the arena: the largest user's need (pvm: 4 cached copies of 32 pages; Xen PV
/// needs 64 + 14 for its GDT frames).
pub const PAGES: usize = 128;

#[repr(C, align(8192))]
pub struct Arena(pub [Table; PAGES]);

static ARENA: Global<Arena> = Global(UnsafeCell::new(Arena([[0; 512]; PAGES])));

/// The arena's first `N` pages as an array (a backend's pool). The caller is the active
/// backend: nothing else uses the pages while it runs.
pub fn pages<const N: usize>() -> *mut [Table; N] {
    const { assert!(N <= PAGES) };
    ARENA.0.get().cast()
}
