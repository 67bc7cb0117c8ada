//! Source 1: known accessor functions. Linux (and the example kernel) reach device registers
//! and page-table entries through a small set of helpers; any memory access inside one of
//! them — an out-of-line copy (symbol) or an inlined body (DWARF `DW_TAG_inlined_subroutine`)
//! — is such an access. The table is data: add a row to teach a new accessor.

/// What kind of memory an accessor touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Mmio,
    PageTable,
}

/// How a rule matches a function name.
#[derive(Debug, Clone, Copy)]
pub enum Pattern {
    Exact(&'static str),
    Prefix(&'static str),
    Suffix(&'static str),
}

impl Pattern {
    pub fn matches(self, name: &str) -> bool {
        match self {
            Pattern::Exact(n) => name == n,
            Pattern::Prefix(p) => name.starts_with(p),
            Pattern::Suffix(p) => name.ends_with(p),
        }
    }
}

use Pattern::{Exact, Prefix, Suffix};
use Target::{Mmio, PageTable};

/// Accessor functions: Linux's names (asm/io.h, asm-generic/io.h, asm/apic.h,
/// asm/pgtable*.h, asm/paravirt.h native_* helpers) and the example kernel's. Dispatchers
/// through ops tables (`apic_read` is `apic->read(reg)`, `io_apic_read` goes through
/// `x86_apic_ops`) hold no access themselves: their native targets are listed instead.
pub const RULES: &[(Pattern, Target)] = &[
    (Exact("readb"), Mmio),
    (Exact("readw"), Mmio),
    (Exact("readl"), Mmio),
    (Exact("readq"), Mmio),
    (Exact("writeb"), Mmio),
    (Exact("writew"), Mmio),
    (Exact("writel"), Mmio),
    (Exact("writeq"), Mmio),
    (Prefix("__raw_read"), Mmio),
    (Prefix("__raw_write"), Mmio),
    (Prefix("readl_relaxed"), Mmio),
    (Prefix("writel_relaxed"), Mmio),
    (Prefix("ioread"), Mmio),
    (Prefix("iowrite"), Mmio),
    (Prefix("memcpy_fromio"), Mmio),
    (Prefix("memcpy_toio"), Mmio),
    (Prefix("memset_io"), Mmio),
    (Exact("native_apic_mem_read"), Mmio),
    (Exact("native_apic_mem_write"), Mmio),
    (Exact("native_io_apic_read"), Mmio),
    (Exact("io_apic_write"), Mmio),
    (Exact("io_apic_modify"), Mmio),
    (Exact("hpet_readl"), Mmio),
    (Exact("hpet_writel"), Mmio),
    (Exact("get_pte"), PageTable),
    (Exact("set_pte"), PageTable),
    (Prefix("native_set_pte"), PageTable),
    (Prefix("native_set_pmd"), PageTable),
    (Prefix("native_set_pud"), PageTable),
    (Prefix("native_set_p4d"), PageTable),
    (Prefix("native_set_pgd"), PageTable),
    (Prefix("native_ptep_get"), PageTable),
    (Prefix("native_pte_clear"), PageTable),
    (Prefix("native_pmd_clear"), PageTable),
    (Prefix("native_pud_clear"), PageTable),
    (Prefix("native_ptep_get_and_clear"), PageTable),
    (Prefix("native_pmdp_get_and_clear"), PageTable),
    (Exact("set_pmd"), PageTable),
    (Exact("set_pud"), PageTable),
    (Exact("set_p4d"), PageTable),
    (Exact("set_pgd"), PageTable),
    (Exact("set_pte_at"), PageTable),
    (Exact("ptep_get"), PageTable),
    (Exact("pmdp_get"), PageTable),
    (Exact("pte_clear"), PageTable),
    (Exact("pmd_clear"), PageTable),
    (Exact("ptep_set_wrprotect"), PageTable),
    (Exact("ptep_get_and_clear"), PageTable),
];

/// What a [`PLAIN_VOLATILE`] pattern is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named {
    /// The function or inlined body declaring the pointer.
    Scope,
    /// The pointer variable itself.
    Variable,
}

/// `volatile` pointers that point at ordinary memory, not at devices. DWARF has no address
/// spaces (Linux's `__iomem` is seen only by sparse), so the DWARF source takes a volatile
/// pointer for device memory; declared in these scopes (inlined or not) it is a bitmap, an
/// atomic counter or a `READ_ONCE` of plain data, and `__ptr` is the temporary of Linux's
/// `READ_ONCE`-style macros (declared in whatever function expands them).
pub const PLAIN_VOLATILE: &[(Named, Pattern)] = &[
    (Named::Scope, Suffix("test_bit")),
    (Named::Scope, Suffix("test_bit_acquire")),
    (Named::Scope, Suffix("set_bit")),
    (Named::Scope, Suffix("clear_bit")),
    (Named::Scope, Suffix("change_bit")),
    (Named::Scope, Suffix("_bit_unlock")),
    (Named::Scope, Suffix("_bit_lock")),
    (Named::Scope, Prefix("find_")),
    (Named::Scope, Prefix("__read_once")),
    (Named::Scope, Prefix("__write_once")),
    (Named::Scope, Prefix("arch_atomic")),
    (Named::Scope, Prefix("raw_atomic")),
    (Named::Scope, Prefix("atomic")),
    (Named::Scope, Prefix("__arch_xchg")),
    (Named::Scope, Prefix("arch_cmpxchg")),
    (Named::Variable, Exact("__ptr")),
];

/// Whether a volatile pointer named `variable`, declared in scope `scope`, points at plain
/// memory ([`PLAIN_VOLATILE`]).
pub fn plain_volatile(scope: &str, variable: &str) -> bool {
    PLAIN_VOLATILE.iter().any(|&(n, p)| p.matches(if n == Named::Scope { scope } else { variable }))
}

/// Raw entry-value pointers (`pmdval_t *`, …: no `pmd_t` for the DWARF source to see) that
/// point into linked page tables, by the function declaring them. Only functions whose every
/// such store and load the hypervisor's trace saw hit a linked table: `__early_make_pgtable`
/// walks and extends the live early tables on a page fault. `__startup_64` is left out: it runs
/// at physical addresses (no site can serve it there) and its `pteval_t *mask_ptr` points at
/// `__supported_pte_mask`, not a table.
pub const RAW_PT_POINTERS: &[(Pattern, &[&str])] =
    &[(Exact("__early_make_pgtable"), &["pgdval_t", "p4dval_t", "pudval_t", "pmdval_t", "pteval_t"])];

/// The raw entry types that are page-table pointers in `scope` ([`RAW_PT_POINTERS`]).
pub fn raw_pt_types(scope: &str) -> &'static [&'static str] {
    RAW_PT_POINTERS.iter().find(|(p, _)| p.matches(scope)).map_or(&[], |&(_, t)| t)
}

/// Page tables the kernel indexes by name (global arrays: no pointer for the DWARF source):
/// a load or store whose operand names one of these symbols (or indexes from its start with a
/// register: `init_top_pgt[pgd_index(__PAGE_OFFSET)]`) is a page-table access. Only the
/// ones the trace saw hit while linked: Linux's `init_top_pgt` (swapper_pg_dir; the PVH entry
/// loads it in CR3, `x86_64_start_kernel` and `init_trampoline` index it) and `early_top_pgt`.
pub const PT_OBJECTS: &[&str] = &["init_top_pgt", "early_top_pgt"];

/// The target of the first rule matching `name`.
pub fn lookup(name: &str) -> Option<Target> {
    RULES.iter().find(|(p, _)| p.matches(name)).map(|&(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_accessors_and_nothing_else() {
        assert_eq!(lookup("readl"), Some(Mmio));
        assert_eq!(lookup("ioread32be"), Some(Mmio));
        assert_eq!(lookup("native_set_pte_at"), Some(PageTable));
        assert_eq!(lookup("get_pte"), Some(PageTable));
        assert_eq!(lookup("readlink"), None);
        assert_eq!(lookup("pte_val"), None);
        assert_eq!(lookup("memcpy"), None);
        assert!(plain_volatile("constant_test_bit", "addr") && plain_volatile("arch_atomic_read", "v"));
        assert!(plain_volatile("perf_output_begin", "__ptr"));
        assert!(!plain_volatile("readl", "addr") && !plain_volatile("native_apic_mem_read", "reg"));
        assert!(raw_pt_types("__early_make_pgtable").contains(&"pmdval_t"));
        assert!(raw_pt_types("__startup_64").is_empty() && raw_pt_types("early_make_pgtable").is_empty());
    }
}
