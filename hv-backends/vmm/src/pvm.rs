//! KVM-PVM's native-execution mode (docs/pvm.md): probe it, switch it on, or say why not.
//!
//! The mode is undocumented; everything here was found by probing this host. The VMM never
//! assumes it: the signature MSR must answer "PVM" before the mode MSR is written.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::Backend;

/// Reads [`SIGNATURE`] on a KVM-PVM host (KVM_GET_MSRS on a vCPU; a guest `rdmsr` also works).
pub const MSR_SIGNATURE: u32 = 0x4b56_4d11;
/// "PVM".
pub const SIGNATURE: u64 = 0x4d_5650;
/// Bit 0 = 1: guest code meeting the rules in docs/pvm.md runs natively. KVM lists it among
/// the vCPU's MSRs, so a snapshot holds it; a restore skips it: `--backend` decides.
pub const MSR_MODE: u32 = 0x4b56_4d10;
/// The code segment native guest code runs on (the host's user code segment, which every IDT
/// gate must name). The vCPU's saved CS sometimes shows it instead of the guest's own
/// (after a trapping `sti`), so with the mode on it is the kernel's too.
pub const NATIVE_CS: u16 = 0x33;

fn msr(index: u32, data: u64) -> Msrs {
    Msrs::from_entries(&[kvm_msr_entry { index, data, ..Default::default() }]).expect("one MSR entry fits")
}

/// Whether the host answers the signature MSR with "PVM".
pub fn probe(vcpu: &VcpuFd) -> bool {
    let mut m = msr(MSR_SIGNATURE, 0);
    matches!(vcpu.get_msrs(&mut m), Ok(1)) && m.as_slice()[0].data == SIGNATURE
}

/// Apply `--backend` to a fresh vCPU; `Ok(true)` when native mode is on. `native` requires
/// the mode (Err without it); `auto` falls back to the ordinary path with a line on stderr.
pub fn setup(vcpu: &VcpuFd, backend: Backend) -> Result<bool, String> {
    if backend == Backend::Pv {
        return Ok(false);
    }
    let why = if !probe(vcpu) {
        format!("host has no KVM-PVM native mode (MSR {MSR_SIGNATURE:#x} does not read \"PVM\")")
    } else if !matches!(vcpu.set_msrs(&msr(MSR_MODE, 1)), Ok(1)) {
        format!("KVM-PVM native mode could not be enabled (KVM_SET_MSRS {MSR_MODE:#x})")
    } else {
        eprintln!("previrt run: KVM-PVM native mode on (MSR {MSR_MODE:#x} = 1)");
        return Ok(true);
    };
    match backend {
        Backend::Native => Err(format!("--backend native: {why}")),
        _ => {
            eprintln!("previrt run: {why}; using the ordinary path");
            Ok(false)
        }
    }
}
