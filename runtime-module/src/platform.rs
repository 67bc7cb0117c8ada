//! Start-of-day detection: where is the kernel running?

/// The platforms the runtime tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    BareMetal,
    PrevirtHv,
    XenHvm,
    XenPv,
    Kvm,
    /// QEMU's software emulation (TCG): bare metal as far as the kernel can tell.
    QemuTcg,
    /// A hypervisor with a signature this runtime does not know.
    OtherHypervisor,
}

impl Platform {
    pub const fn name(self) -> &'static str {
        match self {
            Platform::BareMetal => "bare-metal",
            Platform::PrevirtHv => "previrt-hv",
            Platform::XenHvm => "xen-hvm",
            Platform::XenPv => "xen-pv",
            Platform::Kvm => "kvm",
            Platform::QemuTcg => "qemu-tcg",
            Platform::OtherHypervisor => "hypervisor",
        }
    }
}

/// CPUID 0x40000000 EBX:ECX:EDX signatures; the in-tree hypervisor's comes from its ABI crate.
const SIGNATURES: &[([u8; 12], Platform)] = &[
    (previrt_hv_abi::SIGNATURE, Platform::PrevirtHv),
    (*b"XenVMMXenVMM", Platform::XenHvm),
    (*b"KVMKVMKVM\0\0\0", Platform::Kvm),
    (*b"TCGTCGTCGTCG", Platform::QemuTcg),
];

/// Detect the platform of an HVM-style start (PVH, multiboot) from CPUID: leaf 1 ECX bit 31
/// says a hypervisor is present, leaf 0x40000000 EBX:ECX:EDX names it.
pub fn detect(cpuid: impl Fn(u32) -> [u32; 4]) -> Platform {
    if cpuid(1)[2] & (1 << 31) == 0 {
        return Platform::BareMetal;
    }
    let [_, b, c, d] = cpuid(0x4000_0000);
    let mut name = [0u8; 12];
    name[0..4].copy_from_slice(&b.to_le_bytes());
    name[4..8].copy_from_slice(&c.to_le_bytes());
    name[8..12].copy_from_slice(&d.to_le_bytes());
    SIGNATURES.iter().find(|(s, _)| *s == name).map_or(Platform::OtherHypervisor, |(_, p)| *p)
}

/// What `previrt.backend=auto` runs on each platform (by backend id): the platform's
/// paravirtual backend where the runtime has one, else native (trap-and-emulate).
pub fn auto_backend(p: Platform) -> u32 {
    const AUTO: &[(Platform, u32)] =
        &[(Platform::PrevirtHv, crate::backend::HV.id), (Platform::XenHvm, crate::backend::XEN_HVM.id)];
    AUTO.iter().find(|(q, _)| *q == p).map_or(crate::backend::NATIVE.id, |(_, b)| *b)
}

/// The value of `key=` in a kernel command line (space-separated words).
pub fn cmdline_value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline.split(|&b| b == b' ' || b == b'\t' || b == b'\n').find_map(|w| {
        let rest = w.strip_prefix(key)?;
        rest.strip_prefix(b"=")
    })
}
