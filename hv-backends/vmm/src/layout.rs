//! Where the VMM puts its boot structures in guest-physical memory. Everything below 1 MiB;
//! kernels load at or above 1 MiB. The page-table root sits at 0x9000 because KVM-PVM's
//! native mode wants bit 12 of CR3 set (../shared/FACTS.md); the tables set U=1 for the same
//! reason, which an ordinary ring-0 guest ignores.

/// GDT: 0x08 flat 32-bit code, 0x10 64-bit code, 0x18 flat data, 0x20 TSS.
pub const GDT: u64 = 0x500;
pub const TSS: u64 = 0x600;
/// hvm_start_info, then the memory map, then the module list.
pub const START_INFO: u64 = 0x6000;
pub const MEMMAP: u64 = 0x6100;
pub const MODLIST: u64 = 0x6800;
/// Linux boot_params ("zero page") for bzImage boots.
pub const ZERO_PAGE: u64 = 0x7000;
/// Identity page tables for the 64-bit entry: PML4, PDPT, four PDs (4 GiB in 2 MiB pages).
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// Kernel command line (NUL-terminated), at most CMDLINE_MAX bytes.
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
/// Initial stack for the 64-bit entry (grows down).
pub const STACK_TOP: u64 = 0x8_0000;
/// End of conventional memory; [LOW_END, 1 MiB) is reserved (VGA/BIOS hole).
pub const LOW_END: u64 = 0x9_fc00;
pub const HIGH_START: u64 = 0x10_0000;
/// Guest RAM is one block from 0; the 32-bit PCI hole starts here, so RAM stops below it.
pub const MAX_RAM: u64 = 0xc000_0000;
