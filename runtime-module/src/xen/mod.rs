//! The Xen PV backend (docs/xen-pv.md): the runtime's Xen entry builds the environment the
//! native kernel expects and maps the kernel's sensitive operations onto Xen.
//!
//! - `abi`: hypercall numbers, shared structures, the hypercall itself.
//! - [`console`]: the console ring of non-initial domains (`xencons_interface`), producer and
//!   consumer sides; shared with other Xen backends and back ends.
//! - [`devices`]: the shared in-guest UART, PIC, PIT, LAPIC-page and MSR models
//!   ([`crate::devices`], also used by the `hv` backend).
//! - `mmu`: the kernel's page tables under Xen: shadow tables (the kernel's tables →
//!   Xen-validated tables), or `direct`: the kernel's own tables are Xen's, written with
//!   `mmu_update` from its `pt_write` sites (annotated kernels).
//! - [`gdt`]: the kernel's GDT as Xen accepts it (`lgdt` → `set_gdt` of frames the runtime
//!   owns).
//! - [`tables`]: the page-table pages direct mode holds, with a hash index by frame.
//! - `entry`: the assembly entry points (domain entry, site stub, upcall, traps).
//! - `pv`: the start of day, the site dispatcher, the upcall and the Xen `Machine`.
//!
//! Sites are routed to `pv::previrt_xen_dispatch`, which runs the shared per-kind handlers of
//! [`crate::emulate`] over `pv::Xen` (the `Machine`) plus the Xen-only ones (segment
//! selectors). Anything Xen refuses, or that the backend does not model, stops the domain with
//! a message naming it (`pv::fatal`), never a silent hang. Only [`devices`], [`console`],
//! [`gdt`] and [`tables`] are built for the host too (tested there).

/// The address of an assembly symbol, RIP-relative (the runtime runs where it was linked,
/// at low identity-mapped addresses, so no absolute 32-bit relocation).
#[cfg(feature = "guest")]
macro_rules! addr_of_sym {
    ($sym:literal) => {{
        let a: u64;
        // SAFETY: computes an address, no memory access.
        unsafe { core::arch::asm!(concat!("lea {}, [rip + ", $sym, "]"), out(reg) a, options(nomem, nostack, preserves_flags)) };
        a
    }};
}

#[cfg(feature = "guest")]
pub(crate) mod abi;
pub mod console;
pub use crate::devices;
#[cfg(feature = "guest")]
mod direct;
#[cfg(feature = "guest")]
mod entry;
pub mod gdt;
#[cfg(feature = "guest")]
mod mmu;
#[cfg(feature = "guest")]
mod pv;
pub mod tables;
#[cfg(feature = "guest")]
pub(crate) use pv::lean;
