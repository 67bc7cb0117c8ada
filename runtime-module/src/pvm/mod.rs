//! The `pvm` backend: the in-tree hypervisor's ABI (the [`crate::hv`] machine: device models,
//! console ring, timer, events) with the kernel running natively in this host's KVM-PVM mode
//! (docs/pvm.md). The mode runs guest code natively only while the guest keeps its rules; the
//! kernel knows none of them, so this backend keeps them on its behalf and keeps the kernel's
//! view unchanged:
//!
//! - Detection: the VMM advertises the mode in the ABI's CPUID leaf
//!   (`features::PVM_NATIVE`, set only after it probed the host and switched the mode on);
//!   the runtime never writes or assumes the mode.
//! - Page tables: shadowed. A CR3 load builds a copy of the kernel's tables with U=1 at
//!   every level, rooted at a page whose GPA has bit 12 set, and loads that; `mov from cr3`
//!   returns the kernel's value. The kernel's own tables are never written, so its reads see
//!   exactly what it wrote. `invlpg`, a CR3 load and a #PF the kernel's tables would not
//!   have raised (a mapping made after the last sync) bring the copy up to date, one entry
//!   at a time as a kernel edits its live tables (`shadow`); only a replaced present entry
//!   reaches the hardware's `invlpg`, and a #PF's address is decoded from the faulting
//!   instruction where it can be (`fault`), each host trap being ~5 µs here.
//! - IDT: `lidt` records the kernel's table and loads a substitute whose gates use the
//!   mode's DPL3 code segment 0x33 and go through one trampoline per vector, which reads the
//!   kernel's gate in its table at each delivery (gates written after `lidt` count) and goes
//!   to its handler, or for #PF to the runtime's fault check first: exceptions through trap
//!   gates (the mode's interrupt flag stays open), other vectors through interrupt gates (the
//!   entry notes that the delivery masked it); the kernel sees its own gate's frame and IF
//!   on `vif`. A gate that is not present raises the #NP (beyond the limit: #GP) the CPU
//!   would. `sidt` returns the kernel's table.
//! - GDT: a kernel's table without the mode's user segments (0x2b/0x33) is replaced by a
//!   substitute with its descriptors plus those two; `sgdt` returns the kernel's table.
//! - Selectors: native code runs on the host's user selectors (0x33/0x2b) while frames the
//!   host pushes show the kernel's (0x10/0x18); handlers see the kernel's, and every return
//!   (the stub's own, an emulated `iretq`) goes out with the hardware's.
//! - Interrupt flag: the kernel's IF is the shared `vif` (hardware IF reads 1 in the mode);
//!   the stub clears `vif` for its dispatch, so no event arrives inside the runtime, and
//!   stores the kernel's IF back just before its `iretq`. A trapping `sti` re-opens the
//!   mode's own flag after a delivery closed it. While the CPU runs natively, `cli`, `sti`,
//!   `pushf` and `popf` sites call lean entries instead, which only touch `vif` (and the
//!   stack, as the instruction would) and take the stub when IF comes on with work due.
//! - Everything else is the `hv` backend's: port I/O to the models, `hlt` as `HALT`, ticks.

#[cfg(feature = "guest")]
mod fault;
#[cfg(feature = "guest")]
mod machine;
#[cfg(feature = "guest")]
mod park;
#[cfg(feature = "guest")]
mod shadow;
#[cfg(feature = "guest")]
pub(crate) use machine::{adopt, init, lean, offered, stub, suspend};
#[cfg(feature = "guest")]
pub(crate) use park::{park, parked, unpark};

use previrt_site_abi::Kind;

/// The kinds `pvm` routes besides the `hv` backend's ([`crate::hv::ROUTED`], whose mov cr
/// covers CR3): `invlpg` (shadow sync), `lidt` (substitute IDT), `lgdt` (a substitute GDT
/// when the kernel's lacks the mode's user segments), `sidt`/`sgdt` (the kernel's tables, not
/// the substitutes) and `cpuid` (the VMM's table).
pub const ROUTED: &[Kind] = &[Kind::Invlpg, Kind::Lidt, Kind::Lgdt, Kind::Sidt, Kind::Sgdt, Kind::Cpuid];
