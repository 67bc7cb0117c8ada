//! One input file, read for patching and verifying: its executable sections decoded
//! ([`Code`]), the relocations and kernel tables that point into them, and where they point.

use crate::code::{Code, BOUNDARY, PIN, RELOC};
use crate::kallsyms::Kallsyms;
use crate::tables::{Extent, Ptr, Role, Table, TABLES};
use crate::Error;
use object::read::elf::Sym;
use object::LittleEndian as LE;
use previrt_rewriter::elf::{relocations_for, symbol_by_index, Elf, ElfType};
use std::collections::HashMap;

/// A place in an executable section: section index and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Loc {
    pub sec: usize,
    pub off: u64,
}

/// One relocation of a relocatable object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloc {
    pub offset: u64,
    pub r_type: u32,
    pub sym: u32,
    pub addend: i64,
}

/// Relocation types the patcher understands, with the size of the field they write.
/// Everything else is refused: moving bytes under a relocation we cannot reason about is unsafe.
pub const RELOC_TYPES: &[(u32, &str, u64)] =
    &[(0, "NONE", 0), (1, "64", 8), (2, "PC32", 4), (4, "PLT32", 4), (10, "32", 4), (11, "32S", 4), (24, "PC64", 8)];

/// A kernel-table entry's pointer into code.
#[derive(Debug, Clone, Copy)]
pub struct TableRef {
    pub table: &'static Table,
    pub role: Role,
    pub target: Loc,
    /// Bytes pinned: from the entry's length byte, or `None` for "the instruction there".
    pub len: Option<u8>,
}

pub struct Image<'a> {
    pub elf: Elf<'a>,
    /// Decoded executable sections.
    pub code: Vec<Code<'a>>,
    /// Relocations per section index they apply to (relocatable objects only).
    pub relocs: HashMap<usize, Vec<Reloc>>,
    pub table_refs: Vec<TableRef>,
    /// A linked kernel's kallsyms (stripped vmlinux), for tables merged into other sections.
    pub kallsyms: Option<Kallsyms>,
}

/// Where a table's entries are: address, bytes, and the section index when the table is a
/// section of its own (relocations are per section).
struct Located<'a> {
    addr: u64,
    data: &'a [u8],
    section: Option<usize>,
}

impl<'a> Image<'a> {
    pub fn read(data: &'a [u8]) -> Result<Image<'a>, Error> {
        let elf = Elf::parse(data).map_err(|e| Error::Input(e.to_string()))?;
        if elf.elf_type == ElfType::Dyn {
            return Err(Error::Input(
                "shared objects and PIE executables are not supported (only .o, .ko, vmlinux)".into(),
            ));
        }
        let mut relocs = HashMap::new();
        if elf.elf_type == ElfType::Rel {
            for s in &elf.sections {
                if s.sh_type == object::elf::SHT_RELA.0
                    && elf.sections.get(s.info as usize).is_none_or(|t| t.sh_type == object::elf::SHT_RELA.0)
                {
                    return Err(Error::Input(format!("relocation section {} applies to no section", s.name)));
                }
                if s.sh_type == object::elf::SHT_RELA.0 {
                    let list = relocations_for(&elf, s.info as usize).map_err(|e| Error::Input(e.to_string()))?;
                    for r in &list {
                        if !RELOC_TYPES.iter().any(|t| t.0 == r.1) {
                            return Err(Error::Input(format!(
                                "unsupported relocation type {} at {}+{:#x}",
                                r.1,
                                elf.sections.get(s.info as usize).map(|t| t.name.as_ref()).unwrap_or("?"),
                                r.0
                            )));
                        }
                    }
                    relocs.insert(
                        s.info as usize,
                        list.into_iter()
                            .map(|(offset, r_type, sym, addend)| Reloc { offset, r_type, sym, addend })
                            .collect(),
                    );
                } else if s.sh_type == object::elf::SHT_REL.0 {
                    return Err(Error::Input(format!("SHT_REL section {} (x86-64 objects use RELA)", s.name)));
                }
            }
        }
        let code = elf.exec_sections().map(|s| Code::decode(&elf, s)).collect();
        let kallsyms = match elf.elf_type {
            ElfType::Rel => None,
            _ => elf
                .section_by_name(".rodata")
                .zip(elf.section_by_name(".text"))
                .and_then(|(ro, text)| Kallsyms::read(ro.data, text.addr)),
        };
        let mut img = Image { elf, code, relocs, table_refs: Vec::new(), kallsyms };
        img.table_refs = img.read_tables()?;
        img.mark();
        Ok(img)
    }

    pub fn is_rel(&self) -> bool {
        self.elf.elf_type == ElfType::Rel
    }

    pub fn code_index(&self, sec: usize) -> Option<usize> {
        self.code.iter().position(|c| c.sec == sec)
    }

    /// The section and offset of a virtual address in a linked image's executable sections.
    pub fn loc_of_addr(&self, addr: u64) -> Option<Loc> {
        self.code
            .iter()
            .find(|c| addr >= c.base && addr - c.base < c.bytes.len() as u64)
            .map(|c| Loc { sec: c.sec, off: addr - c.base })
    }

    /// Where `symbol + addend` lands in a relocatable object, if in an executable section.
    pub fn reloc_target(&self, sym: u32, addend: i64) -> Option<Loc> {
        let table = self.elf.symbol_table().ok()??;
        let (sec, value, _, _) = symbol_by_index(&table, sym).ok()?;
        let sec = sec?;
        self.code_index(sec)?;
        Some(Loc { sec, off: value.wrapping_add(addend as u64) })
    }

    fn read_tables(&self) -> Result<Vec<TableRef>, Error> {
        let mut out = Vec::new();
        for table in TABLES {
            let Some(s) = self.locate(table) else { continue };
            if s.data.len() % table.entry_size != 0 {
                return Err(Error::Input(format!(
                    "{} is {} bytes, not a multiple of its {}-byte entries (unknown kernel version?)",
                    table.section,
                    s.data.len(),
                    table.entry_size
                )));
            }
            let by_offset: HashMap<u64, (u32, i64)> = s
                .section
                .and_then(|i| self.relocs.get(&i))
                .map(|v| v.iter().map(|r| (r.offset, (r.sym, r.addend))).collect())
                .unwrap_or_default();
            for (k, entry) in s.data.chunks_exact(table.entry_size).enumerate() {
                for f in table.fields {
                    let at = (k * table.entry_size + f.offset) as u64;
                    let target = if self.is_rel() {
                        by_offset.get(&at).and_then(|&(sym, addend)| self.reloc_target(sym, addend))
                    } else {
                        let addr = match f.ptr {
                            Ptr::Rel32 => {
                                (s.addr + at)
                                    .wrapping_add(i32::from_le_bytes(entry[f.offset..f.offset + 4].try_into().unwrap())
                                        as i64 as u64)
                            }
                            Ptr::Abs64 => u64::from_le_bytes(entry[f.offset..f.offset + 8].try_into().unwrap()),
                        };
                        self.loc_of_addr(addr)
                    };
                    let Some(target) = target else { continue };
                    let len = match f.extent {
                        Extent::Insn => None,
                        Extent::LenByte(b) => Some(entry[b]),
                    };
                    out.push(TableRef { table, role: f.role, target, len });
                }
            }
        }
        Ok(out)
    }

    /// A table's entries: its section, or the bytes between its bounding symbols (kallsyms)
    /// inside the section that holds them.
    fn locate(&self, table: &Table) -> Option<Located<'a>> {
        if let Some(s) = self.elf.section_by_name(table.section) {
            return Some(Located { addr: s.addr, data: s.data, section: Some(s.index) });
        }
        let (start, stop) = table.bounds?;
        let syms = self.kallsyms.as_ref()?;
        let (start, stop) = (syms.get(start)?, syms.get(stop)?);
        let s = self.elf.sections.iter().find(|s| {
            s.is_alloc() && s.sh_type != object::elf::SHT_NOBITS.0 && s.addr <= start && stop <= s.addr + s.size
        })?;
        let data = s.data.get((start - s.addr) as usize..(stop.checked_sub(s.addr)?) as usize)?;
        Some(Located { addr: start, data, section: None })
    }

    /// Code addresses that data of a linked image may hold, found without symbols: every
    /// 8-aligned 64-bit value and every 4-aligned `.long target - .` that lands on an
    /// instruction start. A stripped vmlinux keeps `__jump_table` (whose targets a disabled
    /// jump label's NOP does not show), function-pointer tables and the like inside `.data`;
    /// a false hit only costs a window, a missed one could break the kernel.
    fn data_refs(&self) -> Vec<u64> {
        let is_start = |a: u64| {
            self.loc_of_addr(a).is_some_and(|l| self.code[self.code_index(l.sec).unwrap()].insn_at(l.off).is_some())
        };
        let mut out = Vec::new();
        for s in self.elf.sections.iter().filter(|s| s.is_alloc() && !s.is_exec() && s.addr != 0) {
            let skip = (4 - s.addr % 4) % 4;
            for (k, w) in s.data.get(skip as usize..).unwrap_or(&[]).chunks_exact(4).enumerate() {
                let at = s.addr + skip + 4 * k as u64;
                let rel = at.wrapping_add(i32::from_le_bytes(w.try_into().unwrap()) as i64 as u64);
                if is_start(rel) {
                    out.push(rel);
                }
                if at.is_multiple_of(8) {
                    if let Some(q) = s.data.get((at - s.addr) as usize..(at - s.addr) as usize + 8) {
                        let abs = u64::from_le_bytes(q.try_into().unwrap());
                        if is_start(abs) {
                            out.push(abs);
                        }
                    }
                }
            }
        }
        out
    }

    /// Mark boundaries, pinned bytes and relocated fields in every [`Code`].
    fn mark(&mut self) {
        let mut boundaries: Vec<Loc> = Vec::new();
        let mut pins: Vec<(Loc, Option<u8>)> = Vec::new();
        let mut refs: Vec<u64> = Vec::new();
        for t in &self.table_refs {
            match t.role {
                Role::Boundary => boundaries.push(t.target),
                Role::Pin => pins.push((t.target, t.len)),
            }
        }
        // Relocation targets in code: anything another section (or an instruction) refers to.
        if let Some(symtab) = self.elf.symbol_table().ok().flatten() {
            for (&applies_to, list) in &self.relocs {
                let from_code = self.code_index(applies_to).is_some();
                for r in list {
                    let Some(t) = self.reloc_target(r.sym, r.addend) else { continue };
                    boundaries.push(t);
                    if from_code {
                        // A PC-relative operand's addend is biased by the bytes after the field.
                        boundaries.push(Loc { sec: t.sec, off: t.off.wrapping_add(4) });
                    }
                }
            }
            // Symbol starts.
            for sym in symtab.iter() {
                let shndx = sym.st_shndx(LE).0 as usize;
                if self.code_index(shndx).is_some() {
                    let off = if self.is_rel() {
                        sym.st_value(LE)
                    } else {
                        sym.st_value(LE).wrapping_sub(self.elf.sections[shndx].addr)
                    };
                    boundaries.push(Loc { sec: shndx, off });
                }
            }
        }
        // An object has every table it uses as a section; a linked kernel may have merged some
        // into .data, and then, unless kallsyms names their bounds, every instruction that could
        // be one of their sites is pinned.
        let missing: Vec<&Table> = if self.is_rel() {
            Vec::new()
        } else {
            TABLES.iter().filter(|t| t.could_be_site.is_some() && self.locate(t).is_none()).collect()
        };
        let linked = !self.is_rel();
        for code in &mut self.code {
            // Relocated fields first: their placeholder operands are not references.
            if let Some(list) = self.relocs.get(&code.sec) {
                for r in list {
                    let size = RELOC_TYPES.iter().find(|t| t.0 == r.r_type).map_or(0, |t| t.2);
                    code.mark_range(r.offset, size, RELOC);
                }
            }
            // In an object, an unrelocated reference stays within its own section.
            let (sec, base, len) = (code.sec, code.base, code.bytes.len() as u64);
            for addr in code.mark_flow() {
                if linked {
                    refs.push(addr);
                } else if addr < len {
                    boundaries.push(Loc { sec, off: addr - base });
                }
            }
            for t in &missing {
                code.pin_matching(t.could_be_site.unwrap());
            }
        }
        if linked {
            refs.extend(self.data_refs());
        }
        boundaries.extend(refs.into_iter().filter_map(|a| self.loc_of_addr(a)));
        for b in boundaries {
            if let Some(i) = self.code_index(b.sec) {
                self.code[i].mark_range(b.off, 1, BOUNDARY);
            }
        }
        for (p, len) in pins {
            if let Some(i) = self.code_index(p.sec) {
                let c = &mut self.code[i];
                let len = len.map(u64::from).or_else(|| c.insn_at(p.off).map(|k| c.insns[k].len as u64)).unwrap_or(1);
                c.mark_range(p.off, 1, BOUNDARY);
                c.mark_range(p.off, len.max(1), PIN);
            }
        }
    }
}
