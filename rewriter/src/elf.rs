//! Zero-copy reading of x86-64 ELF files (vmlinux, `.o`, `.ko`, executables, shared objects)
//! on the `object` crate: sections, symbols for function+offset, relocations, and the code
//! regions that are not 64-bit.
//!
//! Every malformed input gives an [`ElfError`] naming the reason; nothing here panics on bad
//! bytes (checked by the fuzz loop in `tests/elf_fuzz.rs`).

use object::elf::{self, FileHeader64, SectionHeader64, Sym64};
use object::read::elf::{FileHeader, SectionHeader, SectionTable, Sym, SymbolTable};
use object::LittleEndian as LE;
use std::borrow::Cow;

/// Why a file could not be read. `Display` is one line, without the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("truncated ELF: {0}")]
    Truncated(String),
    #[error("corrupt ELF: {0}")]
    Corrupt(String),
    #[error("not x86-64: {0}")]
    NotX86_64(String),
    #[error("unsupported ELF: {0}")]
    Unsupported(String),
}

/// The ELF file types previrt accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElfType {
    /// `ET_REL`: `.o`, `.ko`.
    Rel,
    /// `ET_EXEC`: vmlinux, static executables.
    Exec,
    /// `ET_DYN`: PIE executables, shared objects.
    Dyn,
}

impl ElfType {
    pub fn name(self) -> &'static str {
        match self {
            ElfType::Rel => "rel",
            ElfType::Exec => "exec",
            ElfType::Dyn => "dyn",
        }
    }
    /// Linked images have meaningful section addresses.
    pub fn is_linked(self) -> bool {
        self != ElfType::Rel
    }
}

/// One section header, with its bytes (empty for `SHT_NOBITS`).
#[derive(Debug, Clone)]
pub struct Section<'data> {
    pub index: usize,
    pub name: Cow<'data, str>,
    pub sh_type: u32,
    pub flags: u64,
    pub addr: u64,
    pub size: u64,
    pub link: u32,
    pub info: u32,
    pub data: &'data [u8],
}

impl Section<'_> {
    /// `SHF_EXECINSTR` with file contents.
    pub fn is_exec(&self) -> bool {
        self.flags & elf::SHF_EXECINSTR.0 != 0 && self.sh_type != elf::SHT_NOBITS.0
    }
    pub fn is_alloc(&self) -> bool {
        self.flags & elf::SHF_ALLOC.0 != 0
    }
}

/// A code symbol, as an offset within its section.
#[derive(Debug, Clone, Copy)]
pub struct CodeSymbol<'data> {
    pub offset: u64,
    pub size: u64,
    pub name: &'data [u8],
    pub is_func: bool,
}

/// Where the symbol names came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolSource {
    Symtab,
    Dynsym,
    None,
}

/// A part of an executable section that is not 64-bit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub section: usize,
    pub start: u64,
    pub end: u64,
    /// 16 or 32.
    pub bits: u32,
    /// How it was recognised (`"section .text32"`, `"symbol pvh_start_xen"`).
    pub reason: String,
}

/// Section names that hold 16/32-bit code.
pub const NON64_SECTIONS: &[(&str, u32)] = &[(".text32", 32), (".text16", 16), (".realmode", 16), (".text.code16", 16)];

/// Symbols that start 32-bit code inside otherwise 64-bit sections (Linux: the PVH entry in
/// `.head.text`, the compressed kernel's entry points, EFI mixed mode). The region runs to the
/// next symbol in the section.
pub const NON64_SYMBOLS: &[(&str, u32)] = &[
    ("pvh_start_xen", 32),
    ("startup_32", 32),
    ("startup_32_smp", 32),
    ("efi32_stub_entry", 32),
    ("efi32_pe_entry", 32),
    ("efi_enter32", 32),
    ("trampoline_start", 16),
    ("trampoline_start64", 32),
    ("sev_es_trampoline_start", 16),
    ("pa_trampoline_compat", 32),
];

/// A parsed x86-64 ELF64 file. Borrows the file's bytes.
pub struct Elf<'data> {
    pub data: &'data [u8],
    pub elf_type: ElfType,
    pub sections: Vec<Section<'data>>,
    pub symbol_source: SymbolSource,
    /// Code symbols per section index, sorted by offset.
    symbols: Vec<Vec<CodeSymbol<'data>>>,
    /// Regions that are not 64-bit code, sorted by (section, start).
    pub regions: Vec<Region>,
    header: &'data FileHeader64<LE>,
    section_table: SectionTable<'data, FileHeader64<LE>>,
}

fn machine_name(m: u16) -> &'static str {
    match m {
        0 => "none",
        2 => "SPARC",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC64",
        22 => "S390",
        40 => "ARM",
        43 => "SPARC64",
        50 => "IA-64",
        183 => "AArch64",
        243 => "RISC-V",
        258 => "LoongArch",
        _ => "unknown",
    }
}

fn le16(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

/// Does `data` start with the ELF magic?
pub fn is_elf(data: &[u8]) -> bool {
    data.len() >= 4 && data[..4] == elf::ELFMAG
}

impl<'data> Elf<'data> {
    /// Parse and validate: ELF magic, 64-bit little-endian, `EM_X86_64`, `ET_REL`/`ET_EXEC`/
    /// `ET_DYN`, section headers and every section's bytes inside the file.
    pub fn parse(data: &'data [u8]) -> Result<Elf<'data>, ElfError> {
        if !is_elf(data) {
            return Err(ElfError::NotElf);
        }
        if data.len() < 20 {
            return Err(ElfError::Truncated(format!("{} bytes, shorter than the ELF identification", data.len())));
        }
        let class = data[4];
        let little = data[5] == 1;
        let machine = if little { le16(data, 18) } else { u16::from_be_bytes([data[18], data[19]]) };
        if !little {
            return Err(ElfError::NotX86_64(format!("big-endian ELF (machine {machine})")));
        }
        if machine == elf::EM_386.0 {
            return Err(ElfError::NotX86_64("32-bit i386 ELF (EM_386)".into()));
        }
        if machine != elf::EM_X86_64.0 {
            return Err(ElfError::NotX86_64(format!("ELF for machine {} ({machine})", machine_name(machine))));
        }
        match class {
            2 => {}
            1 => return Err(ElfError::Unsupported("ELF32 x86-64 (x32) objects are not supported".into())),
            c => return Err(ElfError::Corrupt(format!("bad ELF class {c}"))),
        }
        if data.len() < 64 {
            return Err(ElfError::Truncated(format!("{} bytes, shorter than the 64-byte ELF header", data.len())));
        }
        let header = FileHeader64::<LE>::parse(data).map_err(|e| ElfError::Corrupt(e.to_string()))?;
        let endian = LE;
        let elf_type = match header.e_type(endian) {
            elf::ET_REL => ElfType::Rel,
            elf::ET_EXEC => ElfType::Exec,
            elf::ET_DYN => ElfType::Dyn,
            t => return Err(ElfError::Unsupported(format!("ELF type {} (core or unknown)", t.0))),
        };
        // Check the section header table's extent ourselves, so a cut file says "truncated".
        let shoff = header.e_shoff(endian);
        let shentsize = header.e_shentsize(endian) as u64;
        let shnum_raw = header.e_shnum(endian) as u64;
        if shoff != 0 {
            if shentsize != 0 && shentsize != 64 {
                return Err(ElfError::Corrupt(format!("section header size {shentsize}, expected 64")));
            }
            if shoff.checked_add(64).is_none_or(|end| end > data.len() as u64) {
                return Err(ElfError::Truncated(format!(
                    "section headers at {shoff:#x} lie past the end of the file ({:#x} bytes)",
                    data.len()
                )));
            }
            if shnum_raw != 0 && shoff + shnum_raw * 64 > data.len() as u64 {
                return Err(ElfError::Truncated(format!(
                    "{shnum_raw} section headers at {shoff:#x} end past the end of the file ({:#x} bytes)",
                    data.len()
                )));
            }
        }
        let section_table = header.sections(endian, data).map_err(|e| ElfError::Corrupt(e.to_string()))?;
        if section_table.is_empty() {
            return Err(ElfError::Unsupported("no section headers (only program headers): cannot find code".into()));
        }
        let mut sections = Vec::with_capacity(section_table.len());
        for (i, sh) in section_table.iter().enumerate() {
            sections.push(read_section(&section_table, i, sh, data)?);
        }
        let mut elf = Elf {
            data,
            elf_type,
            sections,
            symbol_source: SymbolSource::None,
            symbols: Vec::new(),
            regions: Vec::new(),
            header,
            section_table,
        };
        elf.read_symbols()?;
        elf.find_regions();
        Ok(elf)
    }

    /// The raw file header.
    pub fn header(&self) -> &'data FileHeader64<LE> {
        self.header
    }

    /// The `object` section table (for callers that need more than [`Section`]).
    pub fn section_table(&self) -> &SectionTable<'data, FileHeader64<LE>> {
        &self.section_table
    }

    /// Executable sections with contents.
    pub fn exec_sections(&self) -> impl Iterator<Item = &Section<'data>> {
        self.sections.iter().filter(|s| s.is_exec())
    }

    /// Total bytes of executable sections.
    pub fn exec_bytes(&self) -> u64 {
        self.exec_sections().map(|s| s.data.len() as u64).sum()
    }

    pub fn section_by_name(&self, name: &str) -> Option<&Section<'data>> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The symbol table used for names and relocations (`.symtab`, else `.dynsym`).
    pub fn symbol_table(&self) -> Result<Option<SymbolTable<'data, FileHeader64<LE>>>, ElfError> {
        for ty in [elf::SHT_SYMTAB, elf::SHT_DYNSYM] {
            let t = self.section_table.symbols(LE, self.data, ty).map_err(|e| ElfError::Corrupt(e.to_string()))?;
            if !t.is_empty() {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    fn read_symbols(&mut self) -> Result<(), ElfError> {
        self.symbols = vec![Vec::new(); self.sections.len()];
        let Some(table) = self.symbol_table()? else { return Ok(()) };
        self.symbol_source = if self.sections.get(table.section().0).is_some_and(|s| s.sh_type == elf::SHT_DYNSYM.0) {
            SymbolSource::Dynsym
        } else {
            SymbolSource::Symtab
        };
        for (i, sym) in table.iter().enumerate() {
            let st = sym.st_type();
            let is_func = st == elf::STT_FUNC || st == elf::STT_GNU_IFUNC;
            if !(is_func || st == elf::STT_NOTYPE) {
                continue;
            }
            let Ok(Some(section)) = table.symbol_section(LE, sym, object::SymbolIndex(i)) else { continue };
            let Some(sec) = self.sections.get(section.0) else { continue };
            if !sec.is_exec() {
                continue;
            }
            let name = table.symbol_name(LE, sym).unwrap_or(b"");
            if name.is_empty() || name.starts_with(b".L") || name.starts_with(b"$") {
                continue;
            }
            let value = sym.st_value(LE);
            let offset = if self.elf_type.is_linked() { value.wrapping_sub(sec.addr) } else { value };
            if offset > sec.size {
                continue;
            }
            self.symbols[section.0].push(CodeSymbol { offset, size: sym.st_size(LE), name, is_func });
        }
        for v in &mut self.symbols {
            v.sort_by_key(|s| (s.offset, s.is_func));
        }
        Ok(())
    }

    fn find_regions(&mut self) {
        let mut regions = Vec::new();
        for s in &self.sections {
            if !s.is_exec() {
                continue;
            }
            if let Some(&(_, bits)) = NON64_SECTIONS.iter().find(|(n, _)| s.name == *n) {
                regions.push(Region {
                    section: s.index,
                    start: 0,
                    end: s.data.len() as u64,
                    bits,
                    reason: format!("section {}", s.name),
                });
                continue;
            }
            let syms = &self.symbols[s.index];
            for (k, sym) in syms.iter().enumerate() {
                let Some(&(name, bits)) = NON64_SYMBOLS.iter().find(|(n, _)| sym.name == n.as_bytes()) else {
                    continue;
                };
                let end = syms[k + 1..]
                    .iter()
                    .map(|n| n.offset)
                    .find(|&o| o > sym.offset)
                    .unwrap_or(s.data.len() as u64)
                    .min(s.data.len() as u64);
                if end > sym.offset {
                    regions.push(Region {
                        section: s.index,
                        start: sym.offset,
                        end,
                        bits,
                        reason: format!("symbol {name}"),
                    });
                }
            }
        }
        // A linked kernel's PVH entry (Xen ELF note PHYS32_ENTRY) is 32-bit code even when the
        // image is stripped.
        if let Some(addr) = self.pvh_entry() {
            if let Some(s) = self.section_at_address(addr).filter(|s| s.is_exec()) {
                let start = addr - s.addr;
                if !regions.iter().any(|r| r.section == s.index && r.start <= start && start < r.end) {
                    let end = self.symbols[s.index]
                        .iter()
                        .map(|n| n.offset)
                        .find(|&o| o > start)
                        .unwrap_or(s.data.len() as u64)
                        .min(s.data.len() as u64);
                    regions.push(Region {
                        section: s.index,
                        start,
                        end,
                        bits: 32,
                        reason: "Xen ELF note PHYS32_ENTRY (PVH entry)".into(),
                    });
                }
            }
        }
        // Symbol- and note-started regions end at the mode switch; whole sections stay whole.
        for r in regions.iter_mut().filter(|r| !r.reason.starts_with("section ")) {
            if let Some(s) = self.sections.get(r.section) {
                r.end = mode_switch_end(s.data, r.start, r.end, r.bits);
            }
        }
        regions.sort_by_key(|r| (r.section, r.start));
        regions.dedup_by(|b, a| a.section == b.section && a.start == b.start);
        self.regions = regions;
    }

    /// The PVH 32-bit entry point as a virtual address: Xen note `XEN_ELFNOTE_PHYS32_ENTRY`
    /// (18) holds a physical address, mapped through the `PT_LOAD` segments.
    pub fn pvh_entry(&self) -> Option<u64> {
        use object::read::elf::ProgramHeader;
        const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
        let mut phys = None;
        for (i, sh) in self.section_table.iter().enumerate() {
            if sh.sh_type(LE) != elf::SHT_NOTE {
                continue;
            }
            let Ok(Some(mut notes)) = sh.notes(LE, self.data) else { continue };
            let _ = i;
            while let Ok(Some(n)) = notes.next() {
                if n.name() == b"Xen" && n.n_type(LE).0 == XEN_ELFNOTE_PHYS32_ENTRY {
                    let d = n.desc();
                    phys = match d.len() {
                        4 => Some(u32::from_le_bytes(d.try_into().ok()?) as u64),
                        8 => Some(u64::from_le_bytes(d.try_into().ok()?)),
                        _ => None,
                    };
                }
            }
        }
        let phys = phys?;
        let phdrs = self.header.program_headers(LE, self.data).ok()?;
        for ph in phdrs {
            if ph.p_type(LE) != elf::PT_LOAD {
                continue;
            }
            let (pa, va, sz) = (ph.p_paddr(LE), ph.p_vaddr(LE), ph.p_filesz(LE));
            if phys >= pa && phys - pa < sz {
                return Some(va.wrapping_add(phys - pa));
            }
        }
        None
    }

    /// Code symbols of a section, sorted by offset.
    pub fn symbols_in(&self, section: usize) -> &[CodeSymbol<'data>] {
        self.symbols.get(section).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The symbol at or before `offset` in `section`, and the distance from it.
    pub fn symbolize(&self, section: usize, offset: u64) -> Option<(&CodeSymbol<'data>, u64)> {
        let syms = self.symbols_in(section);
        let n = syms.partition_point(|s| s.offset <= offset);
        let s = syms.get(n.checked_sub(1)?)?;
        Some((s, offset - s.offset))
    }

    /// `name+0xoff` (or `name` at offset 0) for a location, if a symbol covers it.
    pub fn function_at(&self, section: usize, offset: u64) -> Option<String> {
        self.symbolize(section, offset).map(|(s, d)| {
            let name = String::from_utf8_lossy(s.name);
            if d == 0 {
                name.into_owned()
            } else {
                format!("{name}+{d:#x}")
            }
        })
    }

    /// Regions of `section` that are not 64-bit code, sorted by start.
    pub fn regions_in(&self, section: usize) -> impl Iterator<Item = &Region> {
        self.regions.iter().filter(move |r| r.section == section)
    }

    /// The section (with contents) containing the virtual address `addr` in a linked image,
    /// preferring executable sections.
    pub fn section_at_address(&self, addr: u64) -> Option<&Section<'data>> {
        let inside = |s: &&Section| s.is_alloc() && s.addr != 0 && addr >= s.addr && addr - s.addr < s.size.max(1);
        self.sections.iter().filter(|s| s.is_exec()).find(inside).or_else(|| self.sections.iter().find(inside))
    }
}

/// 16/32-bit code ends where it switches mode: after the first direct far jump (`ljmp
/// $sel,$off`) or far return (`lret`), the usual mode-switch idioms. Returns the refined end.
fn mode_switch_end(data: &[u8], start: u64, end: u64, bits: u32) -> u64 {
    use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
    let (s, e) = (start.min(data.len() as u64), end.min(data.len() as u64));
    let mut d = Decoder::with_ip(bits, &data[s as usize..e as usize], s, DecoderOptions::NONE);
    let mut i = Instruction::default();
    while d.can_decode() {
        d.decode_out(&mut i);
        if matches!(
            i.code(),
            Code::Jmp_ptr1616
                | Code::Jmp_ptr1632
                | Code::Retfw
                | Code::Retfd
                | Code::Retfq
                | Code::Retfw_imm16
                | Code::Retfd_imm16
        ) {
            return i.next_ip();
        }
    }
    end
}

fn read_section<'data>(
    table: &SectionTable<'data, FileHeader64<LE>>,
    index: usize,
    sh: &'data SectionHeader64<LE>,
    data: &'data [u8],
) -> Result<Section<'data>, ElfError> {
    let endian = LE;
    let name = match table.section_name(endian, sh) {
        Ok(n) => String::from_utf8_lossy(n),
        Err(_) if index == 0 => Cow::Borrowed(""),
        Err(e) => return Err(ElfError::Corrupt(format!("section {index}: {e}"))),
    };
    let sh_type = sh.sh_type(endian).0;
    let bytes: &'data [u8] = if sh_type == elf::SHT_NOBITS.0 || index == 0 {
        &[]
    } else {
        let (off, size) = (sh.sh_offset(endian), sh.sh_size(endian));
        match off.checked_add(size) {
            Some(end) if end <= data.len() as u64 => &data[off as usize..end as usize],
            _ => {
                return Err(ElfError::Truncated(format!(
                    "section {name} ({size:#x} bytes at {off:#x}) extends past the end of the file ({:#x} bytes)",
                    data.len()
                )))
            }
        }
    };
    Ok(Section {
        index,
        name,
        sh_type,
        flags: sh.sh_flags(endian).0,
        addr: sh.sh_addr(endian),
        size: if sh_type == elf::SHT_NOBITS.0 { sh.sh_size(endian) } else { bytes.len() as u64 },
        link: sh.sh_link(endian),
        info: sh.sh_info(endian),
        data: bytes,
    })
}

/// Relocations (`SHT_RELA`) that apply to section `target`: `(r_offset, r_type, r_sym, r_addend)`.
pub fn relocations_for(elf: &Elf<'_>, target: usize) -> Result<Vec<(u64, u32, u32, i64)>, ElfError> {
    use object::read::elf::Rela;
    let mut out = Vec::new();
    for (i, sh) in elf.section_table.iter().enumerate() {
        if sh.sh_type(LE) != elf::SHT_RELA || sh.sh_info(LE) as usize != target {
            continue;
        }
        let Some((relas, _)) = sh.rela(LE, elf.data).map_err(|e| ElfError::Corrupt(format!("section {i}: {e}")))?
        else {
            continue;
        };
        for r in relas {
            out.push((r.r_offset(LE), r.r_type(LE, false).0, r.r_sym(LE, false), r.r_addend(LE)));
        }
    }
    Ok(out)
}

/// A symbol of the symbol table, as [`symbol_ref`] returns it.
#[derive(Debug, Clone, Copy)]
pub struct SymbolRef<'data> {
    /// Section index, or `None` (undefined, absolute, common).
    pub section: Option<usize>,
    pub value: u64,
    pub name: &'data [u8],
    /// `STT_SECTION`.
    pub is_section: bool,
}

/// A symbol of the symbol table, by index: `(section index or None, value, name,
/// is STT_SECTION)`. Kept in this tuple form for existing callers; [`symbol_ref`] gives the
/// same as a struct.
#[allow(clippy::type_complexity)]
pub fn symbol_by_index<'data>(
    table: &SymbolTable<'data, FileHeader64<LE>>,
    index: u32,
) -> Result<(Option<usize>, u64, &'data [u8], bool), ElfError> {
    symbol_ref(table, index).map(|s| (s.section, s.value, s.name, s.is_section))
}

/// A symbol of the symbol table, by index.
pub fn symbol_ref<'data>(
    table: &SymbolTable<'data, FileHeader64<LE>>,
    index: u32,
) -> Result<SymbolRef<'data>, ElfError> {
    let sym: &Sym64<LE> = table
        .symbol(object::SymbolIndex(index as usize))
        .map_err(|e| ElfError::Corrupt(format!("symbol {index}: {e}")))?;
    let section = table.symbol_section(LE, sym, object::SymbolIndex(index as usize)).ok().flatten().map(|s| s.0);
    let name = table.symbol_name(LE, sym).unwrap_or(b"");
    Ok(SymbolRef { section, value: sym.st_value(LE), name, is_section: sym.st_type() == elf::STT_SECTION })
}
