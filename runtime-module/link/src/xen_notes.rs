//! Xen PV ELF notes (xen/include/public/elfnote.h) for a kernel linked with the runtime, so
//! Xen's PV domain builder boots it: the domain enters the runtime's Xen entry, which hands
//! over at the kernel's documented 64-bit entry (`kernel_entry64`, docs/runtime-entry.md).
//! The notes go into a PT_NOTE segment of their own; QEMU and the in-tree VMM look only for
//! the PVH note and ignore them, so the same file still boots there.

use object::read::elf::FileHeader;
use object::{elf, LittleEndian as LE};

/// The symbol naming a kernel's 64-bit entry.
pub const KERNEL_ENTRY64: &str = "kernel_entry64";

/// Addresses the notes carry (virtual; the kernels previrt links run at virt = phys here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XenPv {
    /// The runtime's `previrt_xen_entry` (XEN_ELFNOTE_ENTRY).
    pub entry: u64,
    /// The page Xen fills with hypercall stubs (XEN_ELFNOTE_HYPERCALL_PAGE).
    pub hypercall_page: u64,
}

const ENTRY: u32 = 1;
const HYPERCALL_PAGE: u32 = 2;
const VIRT_BASE: u32 = 3;
const PADDR_OFFSET: u32 = 4;
const XEN_VERSION: u32 = 5;
const LOADER: u32 = 8;
const PAE_MODE: u32 = 9;
const FEATURES: u32 = 10;

/// Value of symbol `name` in an ELF's symbol table.
pub fn symbol(data: &[u8], name: &str) -> Option<u64> {
    let hdr = elf::FileHeader64::<LE>::parse(data).ok()?;
    let sections = hdr.sections(LE, data).ok()?;
    let symbols = sections.symbols(LE, data, elf::SHT_SYMTAB).ok()?;
    symbols.iter().find(|s| symbols.symbol_name(LE, s).ok() == Some(name.as_bytes())).map(|s| s.st_value.get(LE))
}

/// The runtime's Xen entry points from the linked runtime ELF.
pub fn runtime_symbols(linked_runtime: &[u8]) -> Option<XenPv> {
    Some(XenPv {
        entry: symbol(linked_runtime, "previrt_xen_entry")?,
        hypercall_page: symbol(linked_runtime, "previrt_xen_hypercall_page")?,
    })
}

/// The kernel's 64-bit entry, if it names one.
pub fn kernel_entry64(kernel: &[u8]) -> Option<u64> {
    symbol(kernel, KERNEL_ENTRY64)
}

/// The note segment's contents: every note owned by "Xen", 4-byte aligned.
pub fn notes(x: &XenPv) -> Vec<u8> {
    let strings: &[(u32, &str)] = &[(XEN_VERSION, "xen-3.0"), (LOADER, "generic"), (PAE_MODE, "yes"), (FEATURES, "")];
    let numbers: &[(u32, u64)] =
        &[(VIRT_BASE, 0), (PADDR_OFFSET, 0), (ENTRY, x.entry), (HYPERCALL_PAGE, x.hypercall_page)];
    let mut out = Vec::new();
    let mut note = |kind: u32, desc: &[u8]| {
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(b"Xen\0");
        out.extend_from_slice(desc);
        out.resize(out.len().div_ceil(4) * 4, 0);
    };
    for (kind, s) in strings {
        note(*kind, format!("{s}\0").as_bytes());
    }
    for (kind, v) in numbers {
        note(*kind, &v.to_le_bytes());
    }
    out
}

/// A PT_NOTE program header for `len` bytes of notes at file offset `offset`.
pub fn note_phdr(offset: u64, len: u64) -> [u8; 56] {
    let mut ph = [0u8; 56];
    ph[0..4].copy_from_slice(&elf::PT_NOTE.0.to_le_bytes());
    ph[4..8].copy_from_slice(&elf::PF_R.0.to_le_bytes());
    ph[8..16].copy_from_slice(&offset.to_le_bytes());
    ph[32..40].copy_from_slice(&len.to_le_bytes());
    ph[40..48].copy_from_slice(&len.to_le_bytes());
    ph[48..56].copy_from_slice(&4u64.to_le_bytes());
    ph
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_well_formed_and_carry_the_addresses() {
        let x = XenPv { entry: 0x14_2000, hypercall_page: 0x15_0000 };
        let n = notes(&x);
        let mut at = 0;
        let mut seen = std::collections::BTreeMap::new();
        while at < n.len() {
            let word = |i: usize| u32::from_le_bytes(n[at + i..at + i + 4].try_into().unwrap());
            let (namesz, descsz, kind) = (word(0) as usize, word(4) as usize, word(8));
            assert_eq!(&n[at + 12..at + 12 + namesz], b"Xen\0");
            let desc = &n[at + 12 + namesz.div_ceil(4) * 4..][..descsz];
            seen.insert(kind, desc.to_vec());
            at += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
        assert_eq!(at, n.len());
        assert_eq!(seen[&ENTRY], x.entry.to_le_bytes());
        assert_eq!(seen[&HYPERCALL_PAGE], x.hypercall_page.to_le_bytes());
        assert_eq!(seen[&XEN_VERSION], b"xen-3.0\0");
        assert_eq!(seen[&LOADER], b"generic\0");
        assert_eq!(seen[&PAE_MODE], b"yes\0");
    }
}
