//! The `hv` backend: the in-tree hypervisor's paravirtual ABI (crate `previrt-hv-abi`,
//! docs/hv-abi.md) under an unmodified kernel.
//!
//! - Detection: CPUID signature (`platform::Platform::PrevirtHv`); [`init`] installs the
//!   hypercall page and the per-vCPU page with `wrmsr`.
//! - Interrupt flag: cli/sti/pushf/popf/iret run in the runtime (no exit). The kernel's IF
//!   stays in RFLAGS (so the frames exceptions push are right) and is mirrored in the shared
//!   `vif`, which tells the VMM when it may inject an event. When IF comes on with an event
//!   pending, the runtime delivers it itself (an interrupt frame on the kernel stack, then the
//!   kernel's IDT handler), as the ABI asks of the guest (§6).
//! - Port I/O: the shared [`crate::devices`] models. UART output goes to the console ring,
//!   flushed per line (or when the buffer is full) by the ioeventfd doorbell; the PIT period
//!   becomes `TIMER_SET`; the PIC's vector base and IRQ0 mask become `SET_EVENT_VECTOR` (the
//!   VMM injects the kernel's IRQ0 vector directly) and its EOI acknowledges the timer event;
//!   isa-debug-exit becomes `SHUTDOWN` with the status QEMU would give. Other ports go to the
//!   hardware (trap-and-emulate).
//! - hlt with IF on becomes `HALT`. cpuid, MSRs, mov cr, invlpg and descriptor-table loads
//!   stay native (they exit to KVM, not to the VMM, on this host); mov cr is still routed so
//!   the runtime maps itself into every address space the kernel loads.
//! - MMIO sites (`previrt annotate`): the LAPIC registers without side effects are served
//!   from an in-guest copy ([`mmio`]); the rest, and page-table sites, keep the original
//!   instruction (KVM's shadow MMU handles page-table writes in the host kernel, and this
//!   ABI has no page-table hypercall that would be cheaper).

#[cfg(feature = "guest")]
mod machine;
#[cfg(feature = "guest")]
mod mmio;
#[cfg(feature = "guest")]
pub(crate) use machine::{adopt, init, machine, programmed, stub, suspend, version, vif_addr, Console, Hv};

use previrt_site_abi::Kind;

/// The kinds the `hv` backend routes through the runtime (everything else keeps the original
/// instruction). Measured on this host: the unmodified kernel's cpuid, rdmsr/wrmsr, invlpg and
/// lgdt/lidt never reach the VMM, so routing them would only add runtime instructions.
pub const ROUTED: &[Kind] = &[
    Kind::Cli,
    Kind::Sti,
    Kind::Pushf,
    Kind::Popf,
    Kind::Iret,
    Kind::In,
    Kind::Out,
    Kind::Hlt,
    Kind::MovCr,
    Kind::MmioRead,
    Kind::MmioWrite,
];
