//! previrt's guest runtime: linked into a pre-virtualized kernel by `previrt link`, it gets
//! control before the kernel's first site runs, detects the platform, patches every site of
//! `.previrt.sites` for the chosen backend and enters the kernel (docs/runtime-entry.md).
//!
//! - [`patch`]: table walk, saving originals, per-site encoding, the sorted site index.
//! - [`backend`]: which sites each backend routes through the runtime (the backend seam).
//! - [`emulate`]: per-kind handlers over a register file and a [`emulate::Machine`].
//! - [`trace`]: per-kind and per-site execution counters.
//! - [`platform`]: start-of-day detection, command-line parsing.
//! - `guest` (feature `guest`): boot entry, trace stub, the hardware machine, COM1 output.
//! - [`devices`]: in-guest device models (UART, PIC, PIT, LAPIC page, MSRs) shared by the
//!   paravirtual backends; built for the host too (tested there).
//! - [`xen`]: the Xen PV backend (feature `guest`).
//! - `xen_hvm` (feature `guest`): the Xen HVM/PVH backend (Xen's side of `guest::paravirt`).
//! - [`hv`]: the in-tree hypervisor's backend (previrt-hv-abi; its kernel half needs `guest`).
//!
//! Built for kernels with no SSE/x87, no red zone, kernel code model (see previrt-link); the
//! host-only parts are ordinary no_std code so the tests and the benchmark use them too.

#![no_std]

pub mod backend;
pub mod devices;
pub mod emulate;
pub mod hv;
pub mod patch;
pub mod platform;
pub mod pvm;
pub mod trace;

#[cfg(feature = "guest")]
mod guest;
pub mod xen;
#[cfg(feature = "guest")]
mod xen_hvm;
