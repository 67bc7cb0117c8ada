//! MMIO sites under the `hv` backend: the local APIC registers whose value the kernel only
//! stores and reads back are served from an in-guest copy, so those accesses never leave the
//! guest; every register with an effect reaches the (in-kernel) LAPIC through the original
//! instruction.
//!
//! Which registers, and why (docs/annotations.md, "Runtime routing"):
//! - ID and version: constant for the VM's life. The first read goes to the LAPIC, later ones
//!   come from the copy; a write (the ID is writable on some parts) goes to the LAPIC.
//! - TPR: kept in the copy only. The `hv` event vector is injected by the VMM directly (not
//!   through the LAPIC's IRR/ISR), so the LAPIC's own TPR never gated it; nothing else is
//!   delivered through the LAPIC under this backend.
//! - Everything else — EOI, ICR, the timer (LVT, initial/current count, divide), SVR, LDR/DFR,
//!   ESR, ISR/TMR/IRR — keeps the original instruction: each has an effect or a value the
//!   LAPIC changes by itself.
//!
//! The copy is found by guest-physical address: the site's virtual address is translated
//! through the current page tables, which the runtime can read only in kernels whose tables
//! sit at their physical addresses (identity-mapped kernels); elsewhere every MMIO site keeps
//! its original instruction.

use crate::devices::LAPIC_BASE;
use crate::guest::{link_value, Global};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};
use previrt_site_abi::Kind;

/// How a modelled register is served.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Serve {
    /// Read from the LAPIC once, then from the copy; writes go to the LAPIC.
    Constant,
    /// Reads and writes stay in the copy (seeded from the LAPIC at the first access).
    Copy,
}

/// The registers served in the guest: offset in the LAPIC page and how.
const REGS: &[(u64, Serve)] = &[(0x20, Serve::Constant), (0x30, Serve::Constant), (0x80, Serve::Copy)];

/// The in-guest copy of the registers in [`REGS`] (None until first touched); single vCPU,
/// touched only inside the site stub (interrupts off).
static COPY: Global<[Option<u32>; REGS.len()]> = Global(UnsafeCell::new([None; REGS.len()]));
/// Accesses served from the copy without touching the LAPIC (the exit summary prints them).
static SERVED: AtomicU64 = AtomicU64::new(0);

/// A memory-access site's load (`store` None) or store at virtual `addr`: the value
/// ([`crate::emulate::Machine::memory`]), or None to run the original instruction.
pub(crate) fn access(kind: Kind, addr: u64, width: u8, store: Option<u64>) -> Option<u64> {
    if !matches!(kind, Kind::MmioRead | Kind::MmioWrite) || width != 4 {
        return None;
    }
    let pa = physical(addr)?;
    let i = REGS.iter().position(|(off, _)| pa == LAPIC_BASE + off)?;
    // SAFETY: see COPY.
    let copy = unsafe { COPY.get() };
    let v = match (store, REGS[i].1, copy[i]) {
        (None, _, Some(v)) => v as u64,
        (Some(v), Serve::Copy, _) => {
            copy[i] = Some(v as u32);
            0
        }
        // The first read seeds the copy from the LAPIC (through the kernel's own mapping);
        // it reaches the device, so it is not counted as served.
        // SAFETY: the kernel's mapping of the register, live in this address space.
        (None, _, None) => return Some(*copy[i].insert(unsafe { (addr as *const u32).read_volatile() }) as u64),
        (Some(_), Serve::Constant, _) => return None,
    };
    SERVED.fetch_add(1, Ordering::Relaxed);
    Some(v)
}

/// Accesses served in the guest so far.
pub(crate) fn served() -> u64 {
    SERVED.load(Ordering::Relaxed)
}

const PRESENT: u64 = 1;
const HUGE: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Guest-physical address of `va` in the current address space, when the page tables are
/// reachable at their physical addresses (identity-mapped kernels).
fn physical(va: u64) -> Option<u64> {
    if link_value!("__previrt_virt_delta") != 0 {
        return None;
    }
    let cr3: u64;
    // SAFETY: reading CR3 has no effect (the runtime runs at CPL 0).
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
    let mut table = cr3 & ADDR;
    for shift in [39u32, 30, 21, 12] {
        // SAFETY: an entry of a present table, identity-mapped (checked above).
        let e = unsafe { ((table + ((va >> shift) & 511) * 8) as *const u64).read_volatile() };
        if e & PRESENT == 0 {
            return None;
        }
        if shift == 12 || (shift != 39 && e & HUGE != 0) {
            let size = 1u64 << shift;
            return Some((e & ADDR & !(size - 1)) | (va & (size - 1)));
        }
        table = e & ADDR;
    }
    None
}
