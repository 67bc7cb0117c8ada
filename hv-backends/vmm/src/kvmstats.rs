//! KVM's own per-vCPU counters (the binary stats file, `KVM_GET_STATS_FD`).
//!
//! On KVM-PVM the host kernel handles LAPIC MMIO, shadow page-table faults and instruction
//! emulation without returning to the VMM, so the exit table the run loop keeps cannot show
//! that traffic; these counters can. Only cumulative counters are read (no histograms, no
//! "peak"/"instant" values).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_stats_desc, kvm_stats_header, KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_MASK};

vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// The counters worth reporting for MMIO, page-table and exit traffic, in print order.
pub const COUNTERS: &[&str] = &[
    "exits",
    "insn_emulation",
    "mmio_exits",
    "io_exits",
    "halt_exits",
    "pf_taken",
    "pf_fixed",
    "pf_emulate",
    "pf_guest",
    "pf_mmio_spte_created",
    "invlpg",
    "tlb_flush",
    "irq_injections",
    "hypercalls",
];

/// The vCPU's stats file, opened once at start (its counters begin at vCPU creation).
pub struct KvmStats {
    file: std::fs::File,
    /// (name, offset of the u64 value in the file) for each of [`COUNTERS`] the host has.
    slots: Vec<(&'static str, u64)>,
}

impl KvmStats {
    /// Open the stats file of `vcpu`; `None` when the host has no binary stats.
    pub fn open(vcpu: &impl AsRawFd) -> Option<KvmStats> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let fd = unsafe { vmm_sys_util::ioctl::ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut h = [0u8; std::mem::size_of::<kvm_stats_header>()];
        file.read_exact_at(&mut h, 0).ok()?;
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        // kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset, data_offset.
        let (name_size, num, desc_off, data_off) = (u32_at(&h, 4), u32_at(&h, 8), u32_at(&h, 16), u32_at(&h, 20));
        let dsz = std::mem::size_of::<kvm_stats_desc>() + name_size as usize;
        let mut d = vec![0u8; dsz * num as usize];
        file.read_exact_at(&mut d, desc_off as u64).ok()?;
        let head = std::mem::size_of::<kvm_stats_desc>();
        let slots = d
            .chunks_exact(dsz)
            .filter_map(|e| {
                // kvm_stats_desc: flags u32, exponent i16, size u16, offset u32, bucket_size u32, name.
                let (flags, size, offset) = (u32_at(e, 0), u16::from_le_bytes([e[6], e[7]]), u32_at(e, 8));
                let name = e[head..].split(|&b| b == 0).next()?;
                let name = COUNTERS.iter().find(|c| c.as_bytes() == name)?;
                (flags & KVM_STATS_TYPE_MASK == KVM_STATS_TYPE_CUMULATIVE && size == 1)
                    .then_some((*name, data_off as u64 + offset as u64))
            })
            .collect();
        Some(KvmStats { file, slots })
    }

    /// The current values, in [`COUNTERS`] order (counters the host lacks are left out).
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<_> = self
            .slots
            .iter()
            .filter_map(|&(n, at)| {
                let mut v = [0u8; 8];
                self.file.read_exact_at(&mut v, at).ok().map(|_| (n, u64::from_le_bytes(v)))
            })
            .collect();
        out.sort_by_key(|(n, _)| COUNTERS.iter().position(|c| c == n));
        out
    }
}
