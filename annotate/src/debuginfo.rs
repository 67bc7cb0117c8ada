//! Source 2 and the line tables: what the DWARF of an image says.
//!
//! - line table rows, to give every access its `file:line`;
//! - inlined-subroutine and subprogram ranges by name, so the rules see inlined accessor
//!   bodies (`readl`, `set_pte`, … leave no symbol when inlined);
//! - pointer variables and parameters whose pointee is a page-table entry type (`pte_t`, …)
//!   or volatile (device memory), with the registers that hold them and the code ranges where
//!   they do (`DW_OP_regN` locations, single or from location lists). A load or store based
//!   on such a register inside such a range is an access through that pointer (for volatile
//!   pointers only plain moves: locked and bit-test operations are bitmaps and atomics).

use crate::rules::Target;
use anyhow::{Context, Result};
use gimli::{AttributeValue, EndianSlice, Operation, RunTimeEndian, UnitOffset};
use iced_x86::Register;
use object::{Object, ObjectSection};

type R<'a> = EndianSlice<'a, RunTimeEndian>;

/// Page-table entry types recognised by default (Linux's, which the example kernel shares).
pub const PT_TYPES: &[&str] = &["pte_t", "pmd_t", "pud_t", "p4d_t", "pgd_t"];

/// DWARF register numbers 0–15 on x86-64.
const DWARF_GPRS: [Register; 16] = [
    Register::RAX,
    Register::RDX,
    Register::RCX,
    Register::RBX,
    Register::RSI,
    Register::RDI,
    Register::RBP,
    Register::RSP,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

/// A named code scope (an inlined body or a function) and its address ranges.
#[derive(Debug, Clone)]
pub struct Scope {
    pub name: String,
    pub ranges: Vec<(u64, u64)>,
}

/// Where a pointer is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// In a register.
    Reg(Register),
    /// In the stack slot at this offset from the CFA (`DW_OP_fbreg` with the frame base
    /// `DW_OP_call_frame_cfa`): loaded into a register before each use.
    Frame(i64),
}

/// A typed pointer kept at `place` over `[begin, end)`.
#[derive(Debug, Clone)]
pub struct TypedPointer {
    pub target: Target,
    /// The innermost named scope (function or inlined body) declaring it.
    pub scope: String,
    pub place: Place,
    pub begin: u64,
    pub end: u64,
    pub name: String,
}

#[derive(Debug, Default)]
pub struct DebugInfo {
    /// `(address, file index, line)`, sorted; line 0 ends a sequence.
    rows: Vec<(u64, usize, u32)>,
    files: Vec<String>,
    pub scopes: Vec<Scope>,
    pub pointers: Vec<TypedPointer>,
    /// `(start, end, k)` from `.debug_frame`, sorted: over `[start, end)` the CFA is `%rsp + k`.
    cfa: Vec<(u64, u64, i64)>,
}

impl DebugInfo {
    /// Whether the image had any line information at all.
    pub fn has_lines(&self) -> bool {
        !self.rows.is_empty()
    }

    /// Debug information with only these CFA rules (`(start, end, k)`: CFA = `%rsp + k`).
    #[cfg(test)]
    pub fn with_cfa(cfa: Vec<(u64, u64, i64)>) -> DebugInfo {
        DebugInfo { cfa, ..Default::default() }
    }

    /// `k` such that the CFA is `%rsp + k` at `addr`, if `.debug_frame` says so.
    pub fn cfa_from_rsp(&self, addr: u64) -> Option<i64> {
        let k = self.cfa.partition_point(|r| r.0 <= addr).checked_sub(1)?;
        let (_, end, off) = self.cfa[k];
        (addr < end).then_some(off)
    }

    /// `file:line` of the instruction at `addr`.
    pub fn line(&self, addr: u64) -> Option<(&str, u32)> {
        let k = self.rows.partition_point(|r| r.0 <= addr).checked_sub(1)?;
        let (_, file, line) = self.rows[k];
        (line != 0).then(|| (self.files[file].as_str(), line))
    }

    pub fn read(file: &object::File<'_>, pt_types: &[String]) -> Result<DebugInfo> {
        let endian = if file.is_little_endian() { RunTimeEndian::Little } else { RunTimeEndian::Big };
        // Each section once, relocated for an object (in the layout of `crate::section_base`).
        let mut sections: Vec<(gimli::SectionId, std::borrow::Cow<'_, [u8]>)> = Vec::new();
        gimli::Dwarf::load(|id| -> Result<R<'_>> {
            sections.push((id, relocated(file, id.name())));
            Ok(EndianSlice::new(&[], endian))
        })?;
        let dwarf = gimli::Dwarf::load(|id| -> Result<R<'_>> {
            let data = sections.iter().find(|(s, _)| *s == id).map_or(&[][..], |(_, d)| &d[..]);
            Ok(EndianSlice::new(data, endian))
        })?;
        let mut out = DebugInfo::default();
        let mut units = dwarf.units();
        while let Some(header) = units.next().context("reading .debug_info")? {
            let unit = dwarf.unit(header).context("reading a DWARF unit")?;
            out.read_lines(&dwarf, &unit)?;
            out.read_entries(&dwarf, &unit, pt_types)?;
        }
        out.rows.sort_by_key(|r| (r.0, r.2 != 0));
        out.read_frames(file, endian);
        Ok(out)
    }

    /// The CFA rules of `.debug_frame` that are `%rsp + k` (what a stack-slot pointer needs);
    /// an entry that does not parse is skipped.
    fn read_frames(&mut self, file: &object::File<'_>, endian: RunTimeEndian) {
        use gimli::UnwindSection;
        let data = relocated(file, ".debug_frame");
        let mut frame = gimli::DebugFrame::new(&data, endian);
        frame.set_address_size(8);
        let bases = gimli::BaseAddresses::default();
        let mut ctx = Box::new(gimli::UnwindContext::new());
        let mut entries = frame.entries(&bases);
        while let Ok(Some(entry)) = entries.next() {
            let gimli::CieOrFde::Fde(partial) = entry else { continue };
            let Ok(fde) = partial.parse(gimli::DebugFrame::cie_from_offset) else { continue };
            let Ok(mut rows) = fde.rows(&frame, &bases, &mut ctx) else { continue };
            while let Ok(Some(row)) = rows.next_row() {
                if let gimli::CfaRule::RegisterAndOffset { register, offset } = *row.cfa() {
                    if register == gimli::X86_64::RSP {
                        self.cfa.push((row.start_address(), row.end_address(), offset));
                    }
                }
            }
        }
        self.cfa.sort_unstable();
    }

    fn read_lines(&mut self, dwarf: &gimli::Dwarf<R<'_>>, unit: &gimli::Unit<R<'_>>) -> Result<()> {
        let Some(program) = unit.line_program.clone() else { return Ok(()) };
        let mut rows = program.rows();
        let mut index: Vec<(u64, usize)> = Vec::new();
        while let Some((header, row)) = rows.next_row()? {
            let line = if row.end_sequence() { 0 } else { row.line().map_or(0, |l| l.get() as u32) };
            let file = match index.iter().find(|(f, _)| *f == row.file_index()) {
                Some(&(_, i)) => i,
                None => {
                    let name = row.file(header).map(|f| file_path(dwarf, unit, header, f)).unwrap_or_default();
                    let i = self.files.iter().position(|n| *n == name).unwrap_or_else(|| {
                        self.files.push(name);
                        self.files.len() - 1
                    });
                    index.push((row.file_index(), i));
                    i
                }
            };
            self.rows.push((row.address(), file, line));
        }
        Ok(())
    }

    fn read_entries<'a>(
        &mut self,
        dwarf: &gimli::Dwarf<R<'a>>,
        unit: &gimli::Unit<R<'a>>,
        pt_types: &[String],
    ) -> Result<()> {
        // The enclosing scopes, innermost last: depth, ranges, innermost named scope's name,
        // whether the function's frame base is the CFA.
        type Enclosing = (isize, Vec<(u64, u64)>, String, bool);
        let mut stack: Vec<Enclosing> = Vec::new();
        let mut cursor = unit.entries();
        while let Some(e) = cursor.next_dfs()? {
            let depth = e.depth();
            while stack.last().is_some_and(|s| s.0 >= depth) {
                stack.pop();
            }
            match e.tag() {
                gimli::DW_TAG_subprogram | gimli::DW_TAG_inlined_subroutine | gimli::DW_TAG_lexical_block => {
                    let mut ranges = Vec::new();
                    let mut it = dwarf.die_ranges(unit, e)?;
                    while let Some(r) = it.next()? {
                        ranges.push((r.begin, r.end));
                    }
                    let mut scope = stack.last().map(|s| s.2.clone()).unwrap_or_default();
                    if ranges.is_empty() {
                        ranges = stack.last().map(|s| s.1.clone()).unwrap_or_default();
                    } else if e.tag() != gimli::DW_TAG_lexical_block {
                        if let Some(name) = name_of(dwarf, unit, e) {
                            self.scopes.push(Scope { name: name.clone(), ranges: ranges.clone() });
                            scope = name;
                        }
                    }
                    let cfa = match e.attr_value(gimli::DW_AT_frame_base) {
                        Some(AttributeValue::Exprloc(x)) => {
                            matches!(x.0.slice(), [op] if *op == gimli::DW_OP_call_frame_cfa.0)
                        }
                        _ => stack.last().is_some_and(|s| s.3),
                    };
                    stack.push((depth, ranges, scope, cfa));
                }
                gimli::DW_TAG_formal_parameter | gimli::DW_TAG_variable => {
                    let Some(ty) = type_of(unit, e) else { continue };
                    let scope: &str = stack.last().map_or("", |s| s.2.as_str());
                    let is_pt =
                        |n: &str| pt_types.iter().any(|t| t == n) || crate::rules::raw_pt_types(scope).contains(&n);
                    let Some(target) = pointee_target(dwarf, unit, ty, &is_pt) else { continue };
                    let name = name_of(dwarf, unit, e).unwrap_or_default();
                    let Some(loc) = e.attr_value(gimli::DW_AT_location) else { continue };
                    let cfa = stack.last().is_some_and(|s| s.3);
                    let place = |x| place_of(x, unit.encoding()).filter(|p| cfa || matches!(p, Place::Reg(_)));
                    let mut push = |place, begin, end| {
                        let scope = scope.to_string();
                        self.pointers.push(TypedPointer { target, scope, place, begin, end, name: name.clone() })
                    };
                    if let AttributeValue::Exprloc(expr) = loc {
                        if let Some(p) = place(expr) {
                            for &(b, e) in stack.last().map(|s| &s.1[..]).unwrap_or(&[]) {
                                push(p, b, e);
                            }
                        }
                    } else if let Some(mut list) = dwarf.attr_locations(unit, loc)? {
                        while let Some(l) = list.next()? {
                            if let Some(p) = place(l.data) {
                                push(p, l.range.begin, l.range.end);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A debug section's bytes; in a relocatable object with its absolute relocations applied
/// (addresses of code, offsets into other debug sections), as a linker would.
fn relocated<'a>(file: &object::File<'a>, name: &str) -> std::borrow::Cow<'a, [u8]> {
    use object::{ObjectSymbol, RelocationKind, RelocationTarget};
    let Some(s) = file.section_by_name(name) else { return std::borrow::Cow::Borrowed(&[]) };
    let data = s.data().unwrap_or(&[]);
    if file.kind() != object::ObjectKind::Relocatable {
        return std::borrow::Cow::Borrowed(data);
    }
    let mut out = data.to_vec();
    for (at, r) in s.relocations() {
        let RelocationTarget::Symbol(i) = r.target() else { continue };
        let Ok(sym) = file.symbol_by_index(i) else { continue };
        let base = sym.section_index().map_or(0, |i| crate::section_base(file, i));
        let value = base.wrapping_add(sym.address()).wrapping_add(r.addend() as u64).to_le_bytes();
        let (at, n) = (at as usize, r.size() as usize / 8);
        if r.kind() == RelocationKind::Absolute && matches!(n, 4 | 8) && at + n <= out.len() {
            out[at..at + n].copy_from_slice(&value[..n]);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn file_path(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    header: &gimli::LineProgramHeader<R<'_>>,
    f: &gimli::FileEntry<R<'_>>,
) -> String {
    let s = |v| dwarf.attr_string(unit, v).map(|r| r.to_string_lossy().into_owned()).unwrap_or_default();
    let name = s(f.path_name());
    match f.directory(header).map(s) {
        Some(dir) if !dir.is_empty() && !name.starts_with('/') => format!("{dir}/{name}"),
        _ => name,
    }
}

/// The entry itself or, for inlined/concrete copies, its abstract origin.
fn origin<'a>(
    unit: &gimli::Unit<R<'a>>,
    e: &gimli::DebuggingInformationEntry<R<'a>>,
) -> Option<gimli::DebuggingInformationEntry<R<'a>>> {
    match e.attr_value(gimli::DW_AT_abstract_origin)? {
        AttributeValue::UnitRef(o) => unit.entry(o).ok(),
        _ => None,
    }
}

fn name_of<'a>(
    dwarf: &gimli::Dwarf<R<'a>>,
    unit: &gimli::Unit<R<'a>>,
    e: &gimli::DebuggingInformationEntry<R<'a>>,
) -> Option<String> {
    let v = match e.attr_value(gimli::DW_AT_name) {
        Some(v) => v,
        None => return origin(unit, e).and_then(|o| name_of(dwarf, unit, &o)),
    };
    dwarf.attr_string(unit, v).ok().map(|r| r.to_string_lossy().into_owned())
}

fn type_of<'a>(unit: &gimli::Unit<R<'a>>, e: &gimli::DebuggingInformationEntry<R<'a>>) -> Option<UnitOffset> {
    match e.attr_value(gimli::DW_AT_type) {
        Some(AttributeValue::UnitRef(o)) => Some(o),
        Some(_) => None,
        None => type_of(unit, &origin(unit, e)?),
    }
}

/// For a pointer type (through typedefs and qualifiers): what its pointee is; `is_pt` tells
/// the page-table entry type names.
fn pointee_target<'a>(
    dwarf: &gimli::Dwarf<R<'a>>,
    unit: &gimli::Unit<R<'a>>,
    ty: UnitOffset,
    is_pt: &dyn Fn(&str) -> bool,
) -> Option<Target> {
    let mut cur = unit.entry(ty).ok()?;
    // Up to the pointer itself.
    for _ in 0..8 {
        match cur.tag() {
            gimli::DW_TAG_pointer_type => break,
            gimli::DW_TAG_typedef | gimli::DW_TAG_const_type | gimli::DW_TAG_volatile_type => {
                cur = unit.entry(type_of(unit, &cur)?).ok()?
            }
            _ => return None,
        }
    }
    if cur.tag() != gimli::DW_TAG_pointer_type {
        return None;
    }
    let mut next = type_of(unit, &cur);
    for _ in 0..8 {
        // `volatile void *` has a volatile type without DW_AT_type.
        let e = unit.entry(next?).ok()?;
        let named = |e: &gimli::DebuggingInformationEntry<R<'a>>| name_of(dwarf, unit, e).is_some_and(|n| is_pt(&n));
        match e.tag() {
            gimli::DW_TAG_volatile_type => return Some(Target::Mmio),
            gimli::DW_TAG_typedef | gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type if named(&e) => {
                return Some(Target::PageTable)
            }
            gimli::DW_TAG_typedef | gimli::DW_TAG_const_type => next = type_of(unit, &e),
            _ => return None,
        }
    }
    None
}

/// Where a pointer's location keeps it: `DW_OP_regN` (the pointer is in the register),
/// `DW_OP_bregN off; DW_OP_stack_value` (it is the register plus `off`, as loop-optimised code
/// keeps `&t[i]` in a register one element ahead) or `DW_OP_fbreg off` (a stack slot).
fn place_of(expr: gimli::Expression<R<'_>>, enc: gimli::Encoding) -> Option<Place> {
    let mut ops = expr.operations(enc);
    let place = match ops.next().ok()?? {
        Operation::Register { register } => Place::Reg(*DWARF_GPRS.get(register.0 as usize)?),
        Operation::RegisterOffset { register, .. } if matches!(ops.next(), Ok(Some(Operation::StackValue))) => {
            Place::Reg(*DWARF_GPRS.get(register.0 as usize)?)
        }
        Operation::FrameOffset { offset } => Place::Frame(offset),
        _ => return None,
    };
    ops.next().ok()?.is_none().then_some(place)
}
