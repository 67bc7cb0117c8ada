//! Backends: which sites a backend routes through the runtime. This is the seam later
//! backends (the in-tree hypervisor's `hv`, Xen PV, `pvm`) implement: a row here saying which
//! kinds they take over, plus an [`crate::emulate::Machine`] giving the platform primitives
//! the shared per-kind handlers run on.

use previrt_site_abi::{flags, SiteRecord};

/// What a site becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The original instruction (plus NOP filler) runs in place.
    Original,
    /// A `call` into the runtime's stub, which finds the record by return address.
    Stub,
}

/// A backend as the patcher sees it.
#[derive(Debug)]
pub struct Backend {
    /// Stable number (link-time default, `previrt_repatch` argument).
    pub id: u32,
    /// Name on the kernel command line (`previrt.backend=NAME`) and in the boot log.
    pub name: &'static str,
    pub route: fn(&SiteRecord) -> Route,
}

fn original(_: &SiteRecord) -> Route {
    Route::Original
}

/// Every long-mode site with room for a call. 16/32-bit and trap-only sites keep the original.
fn long_mode_sites(r: &SiteRecord) -> Route {
    if r.has(flags::CODE32 | flags::CODE16 | flags::TRAP) {
        Route::Original
    } else {
        Route::Stub
    }
}

/// The `hv` backend's sites: long-mode sites of the kinds it routes ([`crate::hv::ROUTED`]).
fn hv_sites(r: &SiteRecord) -> Route {
    listed_sites(r, crate::hv::ROUTED)
}

/// The `pvm` backend's sites: the `hv` backend's and [`crate::pvm::ROUTED`].
fn pvm_sites(r: &SiteRecord) -> Route {
    match hv_sites(r) {
        Route::Original => listed_sites(r, crate::pvm::ROUTED),
        stub => stub,
    }
}

/// Long-mode sites of the kinds in `kinds`.
fn listed_sites(r: &SiteRecord, kinds: &[previrt_site_abi::Kind]) -> Route {
    match long_mode_sites(r) {
        // The raw kind number: `r.kind()` would search every kind first (a re-patch on an
        // instruction-emulated host pays per instruction).
        Route::Stub if kinds.iter().any(|&k| k as u16 == r.kind) => Route::Stub,
        _ => Route::Original,
    }
}

/// The trace backend's sites: long-mode sites but `swapgs`, which a kernel's syscall entry
/// and exit run on the user's stack (a `call` must not push onto it).
fn trace_sites(r: &SiteRecord) -> Route {
    match r.kind == previrt_site_abi::Kind::Swapgs as u16 {
        true => Route::Original,
        false => long_mode_sites(r),
    }
}

/// Sites run the original instruction.
pub const NATIVE: Backend = Backend { id: 0, name: "native", route: original };
/// Every site is counted and its effect performed by the runtime.
pub const TRACE: Backend = Backend { id: 1, name: "trace", route: trace_sites };

/// Xen PV (runtime-module/src/xen, docs/xen-pv.md): chosen by the Xen entry, which only Xen
/// enters; every long-mode site is routed to hypercalls and in-guest models.
pub const XEN: Backend = Backend { id: 2, name: "xen", route: long_mode_sites };

/// The in-tree hypervisor's paravirtual ABI (runtime-module/src/hv, docs/hv-abi.md): chosen
/// by `previrt.backend=hv` or `auto` when CPUID shows the hypervisor's signature.
pub const HV: Backend = Backend { id: 3, name: "hv", route: hv_sites };

/// Xen HVM/PVH (runtime-module/src/xen_hvm, docs/xen-hvm.md): chosen by
/// `previrt.backend=xen-hvm` or `auto` on Xen's CPUID signature; it routes the kinds `hv`
/// routes (both are sides of `guest::paravirt`).
pub const XEN_HVM: Backend = Backend { id: 4, name: "xen-hvm", route: hv_sites };

/// After a migration to a platform without a paravirtual interface (guest/migrate.rs): sites
/// run the original instruction, but `hlt` goes through the runtime, which looks for a
/// paravirtual interface after it (the VM may have been moved back).
pub const NATIVE_WATCH: Backend = Backend { id: 5, name: "native-watch", route: hlt_sites };

fn hlt_sites(r: &SiteRecord) -> Route {
    listed_sites(r, &[previrt_site_abi::Kind::Hlt])
}

/// The in-tree hypervisor's ABI with the kernel running natively in this host's KVM-PVM mode
/// (runtime-module/src/pvm, docs/pvm.md): chosen by `previrt.backend=pvm`, or `auto` when the
/// VMM advertises the mode in the ABI's CPUID leaf.
pub const PVM: Backend = Backend { id: 6, name: "pvm", route: pvm_sites };

/// All backends, by id.
pub const BACKENDS: &[&Backend] = &[&NATIVE, &TRACE, &XEN, &HV, &XEN_HVM, &NATIVE_WATCH, &PVM];

/// Backends only a platform's own entry chooses, never the command line: Xen PV needs the
/// state the Xen entry sets up (shared info, callbacks, trap table); native-watch is what a
/// migration leaves behind.
const ENTRY_ONLY: &[&Backend] = &[&XEN, &NATIVE_WATCH];

/// A backend the command line may name (`previrt.backend=NAME`).
pub fn by_name(name: &[u8]) -> Option<&'static Backend> {
    BACKENDS.iter().copied().filter(|b| !ENTRY_ONLY.iter().any(|e| e.id == b.id)).find(|b| b.name.as_bytes() == name)
}

pub fn by_id(id: u32) -> Option<&'static Backend> {
    BACKENDS.iter().copied().find(|b| b.id == id)
}
