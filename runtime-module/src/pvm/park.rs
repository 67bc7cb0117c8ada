//! Where the CPU waits out a suspend when the kernel's root page table is at an odd page
//! (CR3 bit 12 set). With KVM-PVM's native mode on, such a CR3 runs guest code natively, and
//! the kernel's own tables (no U bits) fault at the first fetch: leaving the mode onto them,
//! or restoring a snapshot that holds them under `--backend native`, triple-faults
//! (docs/pvm.md, "Migration pvm <-> hv"). Parked, the CPU runs on a copy of the kernel's root
//! at an even page instead: the same address space (the lower levels are the kernel's own; U
//! bits do not matter on the ordinary path), never native. The kernel's CR3 stays in runtime
//! memory, which travels with the snapshot, and goes back into the CPU where that is safe: a
//! resume on a backend without the mode, a cancelled suspend; `pvm` syncs its shadow from it.
//!
//! Identity-mapped kernels only (the kernel's root is read at its physical address, as
//! `shadow` does); for others [`park`] loads the kernel's CR3 itself.

use super::shadow::ROOT_BIT;
use crate::emulate::Machine;
use crate::guest::arena::Table;
use crate::guest::{gpa, hw, link_value, Global};
use core::cell::UnsafeCell;

const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The copy of the kernel's root (8 KiB aligned: its GPA has bit 12 clear, the virtual
/// offset being 1 GiB aligned).
#[repr(C, align(8192))]
struct Root(Table);
static ROOT: Global<Root> = Global(UnsafeCell::new(Root([0; 512])));
/// The kernel's CR3 while the CPU is parked.
static KERNEL_CR3: Global<u64> = Global(UnsafeCell::new(0));

fn root() -> u64 {
    gpa(ROOT.0.get() as u64)
}

/// Onto the kernel's address space `cr3` for a suspend, off the mode: its own root when that
/// is at an even page, else parked on the copy.
pub(crate) fn park(cr3: u64) {
    let to = if cr3 & ROOT_BIT == 0 || link_value!("__previrt_virt_delta") != 0 {
        cr3
    } else {
        // SAFETY: at a safe point (single vCPU, no event in the runtime): the kernel's root
        // (identity-mapped) into the runtime's page, which the CPU is not on.
        unsafe {
            core::ptr::copy_nonoverlapping((cr3 & ADDR) as *const Table, &mut ROOT.get().0, 1);
            *KERNEL_CR3.get() = cr3;
        }
        root() | (cr3 & !ADDR)
    };
    if hw::Hardware.read_cr(3) != to {
        hw::Hardware.write_cr(3, to);
    }
}

/// The kernel's CR3 when the CPU is parked.
pub(crate) fn parked() -> Option<u64> {
    // SAFETY: written only by `park`, on this vCPU.
    (hw::Hardware.read_cr(3) & ADDR == root()).then(|| unsafe { *KERNEL_CR3.get() })
}

/// The kernel's CR3: the parked one, else the hardware's.
pub(crate) fn kernel_cr3() -> u64 {
    parked().unwrap_or_else(|| hw::Hardware.read_cr(3))
}

/// Off the mode for good (a backend without it, a cancelled suspend): the kernel's own CR3
/// back into the CPU if it was parked.
pub(crate) fn unpark() {
    if let Some(cr3) = parked() {
        hw::Hardware.write_cr(3, cr3);
    }
}
