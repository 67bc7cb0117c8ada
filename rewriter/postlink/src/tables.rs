//! The kernel tables that point into code, as data: which section, how big an entry is, and
//! what each pointer field means for the patcher.
//!
//! The rule the patcher follows is the simplest correct one: it never moves an instruction a
//! table points at as a *site* ([`Role::Pin`]: the kernel rewrites or looks up exactly those
//! bytes), and never lets a window swallow a table's *target* ([`Role::Boundary`]: a fixup,
//! a jump-label target, an ORC entry — it may start a window, never lie inside one). So no
//! table entry ever needs rewriting, and `previrt verify` can check the rule directly.
//!
//! Layouts are Linux 6.1 x86-64 (`struct alt_instr`, `struct paravirt_patch_site`,
//! `struct exception_table_entry`, `struct jump_entry`, `struct static_call_site`,
//! `struct bug_entry` with relative pointers and BUGVERBOSE, the `s32` site lists).

use iced_x86::{Code, Instruction};

/// How a field stores its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ptr {
    /// `s32` relative to the field (`.long sym - .`); `R_X86_64_PC32` in objects.
    Rel32,
    /// Absolute 64-bit address; `R_X86_64_64` in objects.
    Abs64,
}

/// What the patcher must preserve about a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The kernel rewrites or identifies these bytes: never move them.
    Pin,
    /// Control may arrive here from elsewhere: keep it an instruction start outside windows.
    Boundary,
}

/// How many bytes a [`Role::Pin`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// The instruction at the target.
    Insn,
    /// A length byte at this offset inside the entry (alternatives, paravirt).
    LenByte(usize),
}

#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub offset: usize,
    pub ptr: Ptr,
    pub role: Role,
    pub extent: Extent,
}

/// One table kind.
#[derive(Debug)]
pub struct Table {
    pub section: &'static str,
    pub entry_size: usize,
    pub fields: &'static [Field],
    /// Entries are paravirt call sites: each becomes a `pv_call` site record.
    pub pv_sites: bool,
    /// A linked kernel merges this table into `.data` (no section of its own, no symbols):
    /// pin every instruction that could be one of its sites instead.
    pub could_be_site: Option<fn(&Instruction) -> bool>,
    /// The symbols bounding the merged table (`__start_…`, `__stop_…`), which a stripped
    /// vmlinux's kallsyms still names: then its entries are read exactly, nothing is pinned
    /// by pattern.
    pub bounds: Option<(&'static str, &'static str)>,
}

const fn pin(offset: usize, ptr: Ptr, extent: Extent) -> Field {
    Field { offset, ptr, role: Role::Pin, extent }
}
const fn boundary(offset: usize) -> Field {
    Field { offset, ptr: Ptr::Rel32, role: Role::Boundary, extent: Extent::Insn }
}
const SITE_LIST: &[Field] = &[pin(0, Ptr::Rel32, Extent::Insn)];

fn is_nop5_or_rel(i: &Instruction) -> bool {
    is_nop_of(i, 5) || matches!(i.code(), Code::Call_rel32_64 | Code::Jmp_rel32_64)
}
fn is_jump_label(i: &Instruction) -> bool {
    is_nop_of(i, 5) || is_nop_of(i, 2) || matches!(i.code(), Code::Jmp_rel8_64 | Code::Jmp_rel32_64)
}
fn is_endbr(i: &Instruction) -> bool {
    i.code() == Code::Endbr64
}
fn is_nop_of(i: &Instruction, len: usize) -> bool {
    i.len() == len
        && matches!(i.code(), Code::Nopw | Code::Nopd | Code::Nopq | Code::Nop_rm16 | Code::Nop_rm32 | Code::Nop_rm64)
}

/// Every table the patcher knows.
pub static TABLES: &[Table] = &[
    Table {
        section: "__ex_table",
        entry_size: 12,
        fields: &[pin(0, Ptr::Rel32, Extent::Insn), boundary(4)],
        pv_sites: false,
        could_be_site: None,
        bounds: None,
    },
    Table {
        section: ".altinstructions",
        entry_size: 12,
        fields: &[pin(0, Ptr::Rel32, Extent::LenByte(10)), boundary(4)],
        pv_sites: false,
        could_be_site: None,
        bounds: None,
    },
    Table {
        section: ".parainstructions",
        entry_size: 16,
        fields: &[pin(0, Ptr::Abs64, Extent::LenByte(9))],
        pv_sites: true,
        could_be_site: None,
        bounds: None,
    },
    Table {
        section: ".retpoline_sites",
        entry_size: 4,
        fields: SITE_LIST,
        pv_sites: false,
        could_be_site: None,
        bounds: None,
    },
    Table {
        section: ".return_sites",
        entry_size: 4,
        fields: SITE_LIST,
        pv_sites: false,
        could_be_site: None,
        bounds: None,
    },
    Table {
        section: ".smp_locks",
        entry_size: 4,
        fields: SITE_LIST,
        pv_sites: false,
        could_be_site: None,
        bounds: None,
    },
    Table {
        section: ".ibt_endbr_seal",
        entry_size: 4,
        fields: SITE_LIST,
        pv_sites: false,
        could_be_site: Some(is_endbr),
        bounds: Some(("__ibt_endbr_seal", "__ibt_endbr_seal_end")),
    },
    Table {
        section: "__jump_table",
        entry_size: 16,
        fields: &[pin(0, Ptr::Rel32, Extent::Insn), boundary(4)],
        pv_sites: false,
        could_be_site: Some(is_jump_label),
        bounds: Some(("__start___jump_table", "__stop___jump_table")),
    },
    Table {
        section: ".static_call_sites",
        entry_size: 8,
        fields: SITE_LIST,
        pv_sites: false,
        could_be_site: Some(is_nop5_or_rel),
        bounds: Some(("__start_static_call_sites", "__stop_static_call_sites")),
    },
    Table {
        section: "__mcount_loc",
        entry_size: 8,
        fields: &[pin(0, Ptr::Abs64, Extent::Insn)],
        pv_sites: false,
        could_be_site: Some(is_nop5_or_rel),
        bounds: Some(("__start_mcount_loc", "__stop_mcount_loc")),
    },
    Table {
        section: "__bug_table",
        entry_size: 12,
        fields: SITE_LIST,
        pv_sites: false,
        could_be_site: None,
        bounds: None,
    },
    Table {
        section: ".orc_unwind_ip",
        entry_size: 4,
        fields: &[boundary(0)],
        pv_sites: false,
        could_be_site: None,
        bounds: None,
    },
];
