//! Writing the patched ELF file. The input's bytes are kept; what changes is written in place
//! (windows, trampolines in padding, relocation offsets) or appended (grown sections, the site
//! table, a new section header table), so every byte we do not mean to touch stays put.

use crate::image::{Image, Loc};
use crate::plan::Plan;
use crate::Error;
use previrt_site_abi::{field, ChunkHeader, Producer, Resolved, HEADER_SIZE, RECORD_SIZE, SAVE_SECTION, SITES_SECTION};

const SHDR: usize = 64;
const PHDR: usize = 56;
const SYM: usize = 24;
const RELA: usize = 24;
const SHT_PROGBITS: u32 = 1;
const SHT_SYMTAB: u32 = 2;
const SHT_RELA: u32 = 4;
const SHT_NOBITS: u32 = 8;
const SHT_GROUP: u32 = 17;
const SHT_SYMTAB_SHNDX: u32 = 18;
const SHF_WRITE: u64 = 1;
const SHF_ALLOC: u64 = 2;
const SHF_INFO_LINK: u64 = 0x40;
const PT_LOAD: u32 = 1;
const R_X86_64_PC32: u64 = 2;
/// Appended to signed modules: `struct module_signature` (12 bytes, big-endian length last)
/// and the signature precede it.
pub const SIG_MARKER: &[u8] = b"~Module signature appended~\n";

fn rd<const N: usize>(d: &[u8], at: usize) -> [u8; N] {
    d[at..at + N].try_into().unwrap()
}
fn r16(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(rd(d, at))
}
fn r32(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(rd(d, at))
}
fn r64(d: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(rd(d, at))
}
fn put(d: &mut [u8], at: usize, v: &[u8]) {
    d[at..at + v.len()].copy_from_slice(v);
}

/// A section header as raw fields.
#[derive(Debug, Clone, Copy, Default)]
struct Shdr {
    name: u32,
    ty: u32,
    flags: u64,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
    info: u32,
    align: u64,
    entsize: u64,
}

impl Shdr {
    fn read(d: &[u8], at: usize) -> Shdr {
        Shdr {
            name: r32(d, at),
            ty: r32(d, at + 4),
            flags: r64(d, at + 8),
            addr: r64(d, at + 16),
            offset: r64(d, at + 24),
            size: r64(d, at + 32),
            link: r32(d, at + 40),
            info: r32(d, at + 44),
            align: r64(d, at + 48),
            entsize: r64(d, at + 56),
        }
    }
    fn bytes(&self) -> [u8; SHDR] {
        let mut b = [0u8; SHDR];
        put(&mut b, 0, &self.name.to_le_bytes());
        put(&mut b, 4, &self.ty.to_le_bytes());
        put(&mut b, 8, &self.flags.to_le_bytes());
        put(&mut b, 16, &self.addr.to_le_bytes());
        put(&mut b, 24, &self.offset.to_le_bytes());
        put(&mut b, 32, &self.size.to_le_bytes());
        put(&mut b, 40, &self.link.to_le_bytes());
        put(&mut b, 44, &self.info.to_le_bytes());
        put(&mut b, 48, &self.align.to_le_bytes());
        put(&mut b, 56, &self.entsize.to_le_bytes());
        b
    }
}

/// The output being built: the file bytes and its section headers.
struct Out {
    data: Vec<u8>,
    shdrs: Vec<Shdr>,
    shstrtab: Vec<u8>,
    shstrndx: usize,
}

impl Out {
    /// The headers the writer relies on, checked (the reader already checked the rest).
    fn new(data: Vec<u8>) -> Result<Out, Error> {
        let bad = |what: String| Error::Input(format!("corrupt ELF: {what}"));
        let (shoff, shnum, shstrndx) =
            (r64(&data, 0x28) as usize, r16(&data, 0x3c) as usize, r16(&data, 0x3e) as usize);
        if shoff.checked_add(shnum * SHDR).is_none_or(|e| e > data.len()) || shstrndx >= shnum {
            return Err(bad("section header table".into()));
        }
        let shdrs: Vec<Shdr> = (0..shnum).map(|i| Shdr::read(&data, shoff + i * SHDR)).collect();
        for (i, s) in shdrs.iter().enumerate().skip(1) {
            let in_file = s.ty == SHT_NOBITS || s.offset.checked_add(s.size).is_some_and(|e| e <= data.len() as u64);
            if !in_file || s.align > 1 << 21 || (s.align > 1 && !s.align.is_power_of_two()) {
                return Err(bad(format!("section {i}: offset, size or alignment")));
            }
            if matches!(s.ty, SHT_SYMTAB | SHT_RELA) && s.size % SYM as u64 != 0 {
                return Err(bad(format!("section {i}: size not a multiple of its entries")));
            }
        }
        let s = shdrs[shstrndx];
        if s.ty == SHT_NOBITS {
            return Err(bad("section name table".into()));
        }
        let shstrtab = data[s.offset as usize..(s.offset + s.size) as usize].to_vec();
        Ok(Out { data, shdrs, shstrtab, shstrndx })
    }

    /// Append `bytes` aligned to `align`; returns the file offset.
    fn append(&mut self, bytes: &[u8], align: u64) -> u64 {
        let at = self.data.len().next_multiple_of(align.max(1) as usize);
        self.data.resize(at, 0);
        self.data.extend_from_slice(bytes);
        at as u64
    }

    fn add_section(&mut self, name: &str, mut sh: Shdr) -> usize {
        sh.name = self.shstrtab.len() as u32;
        self.shstrtab.extend_from_slice(name.as_bytes());
        self.shstrtab.push(0);
        self.shdrs.push(sh);
        self.shdrs.len() - 1
    }

    fn section_bytes(&self, i: usize) -> &[u8] {
        let s = self.shdrs[i];
        &self.data[s.offset as usize..(s.offset + s.size) as usize]
    }

    /// Write the new `.shstrtab` and section header table at the end and point the ELF
    /// header at them.
    fn finish(mut self) -> Result<Vec<u8>, Error> {
        if self.shdrs.len() >= 0xff00 {
            return Err(Error::Input("too many sections for the patcher (needs fewer than 65280)".into()));
        }
        let strtab = std::mem::take(&mut self.shstrtab);
        let off = self.append(&strtab, 1);
        self.shdrs[self.shstrndx].offset = off;
        self.shdrs[self.shstrndx].size = strtab.len() as u64;
        let table: Vec<u8> = self.shdrs.iter().flat_map(|s| s.bytes()).collect();
        let shoff = self.append(&table, 8);
        put(&mut self.data, 0x28, &shoff.to_le_bytes());
        put(&mut self.data, 0x3c, &(self.shdrs.len() as u16).to_le_bytes());
        Ok(self.data)
    }
}

/// The site chunk for `plan`; the PC-relative fields are filled by the caller.
fn chunk(plan: &Plan) -> Vec<u8> {
    let mut b = ChunkHeader::new(Producer::PostLink, plan.sites.len() as u32).to_bytes().to_vec();
    for s in &plan.sites {
        b.extend_from_slice(&s.rec.to_bytes());
    }
    b
}

/// Length of the ELF part of a module, without an appended signature.
pub fn unsigned_len(data: &[u8]) -> Option<usize> {
    let body = data.strip_suffix(SIG_MARKER)?;
    let info = body.len().checked_sub(12)?;
    let sig_len = u32::from_be_bytes(rd(body, info + 8)) as usize;
    info.checked_sub(sig_len)
}

/// Patch a linked image (vmlinux): windows and trampolines in place, the site table and save
/// slots in a new `PT_LOAD` segment after the image.
pub fn write_image(data: &[u8], img: &Image, plan: &Plan) -> Result<Vec<u8>, Error> {
    let mut out = Out::new(data.to_vec())?;
    for sp in &plan.sections {
        let off = out.shdrs[sp.sec].offset as usize;
        for (at, bytes) in &sp.writes {
            put(&mut out.data, off + *at as usize, bytes);
        }
    }
    let (phoff, phnum) = (r64(data, 0x20) as usize, r16(data, 0x38) as usize);
    if phoff.checked_add(phnum * PHDR).is_none_or(|e| e > data.len()) {
        return Err(Error::Input("corrupt ELF: program header table".into()));
    }
    let first_content = out
        .shdrs
        .iter()
        .skip(1)
        .filter(|s| s.ty != SHT_NOBITS && s.size > 0)
        .map(|s| s.offset)
        .min()
        .unwrap_or(u64::MAX);
    if (phoff + (phnum + 1) * PHDR) as u64 > first_content {
        return Err(Error::Input("no room for one more program header before the first section".into()));
    }
    let last = (0..phnum)
        .map(|i| phoff + i * PHDR)
        .filter(|&p| r32(data, p) == PT_LOAD)
        .max_by_key(|&p| r64(data, p + 16).wrapping_add(r64(data, p + 40)))
        .ok_or_else(|| Error::Input("linked image without PT_LOAD".into()))?;
    let vaddr = r64(data, last + 16).wrapping_add(r64(data, last + 40)).next_multiple_of(0x1000);
    let paddr = r64(data, last + 24).wrapping_add(vaddr - r64(data, last + 16));
    let addr = |l: Loc| img.elf.sections[l.sec].addr + l.off;
    let mut table = chunk(plan);
    let save_base = vaddr + table.len().next_multiple_of(8) as u64;
    let mut save = save_base;
    for (k, s) in plan.sites.iter().enumerate() {
        let at = HEADER_SIZE + k * RECORD_SIZE;
        let mut rec = s.rec;
        rec.set_targets(
            vaddr + at as u64,
            Resolved { site: addr(s.site), save, resume: addr(s.resume), origin: addr(s.origin) },
        );
        save += rec.insn_len as u64;
        put(&mut table, at, &rec.to_bytes());
    }
    let offset = out.append(&table, 0x1000);
    let memsz = save - vaddr;
    let mut ph = [0u8; PHDR];
    put(&mut ph, 0, &PT_LOAD.to_le_bytes());
    put(&mut ph, 4, &6u32.to_le_bytes()); // R + W: the runtime fills the save slots
    for (at, v) in [(8, offset), (16, vaddr), (24, paddr), (32, table.len() as u64), (40, memsz), (48, 0x1000)] {
        put(&mut ph, at, &v.to_le_bytes());
    }
    put(&mut out.data, phoff + phnum * PHDR, &ph);
    put(&mut out.data, 0x38, &(phnum as u16 + 1).to_le_bytes());
    let sh = |ty, flags, addr, offset, size| Shdr { ty, flags, addr, offset, size, align: 4, ..Default::default() };
    out.add_section(SITES_SECTION, sh(SHT_PROGBITS, SHF_ALLOC, vaddr, offset, table.len() as u64));
    out.add_section(
        SAVE_SECTION,
        sh(SHT_NOBITS, SHF_ALLOC | SHF_WRITE, save_base, offset + (save_base - vaddr), save - save_base),
    );
    out.finish()
}

/// Patch a relocatable object (`.o`, `.ko`): patched code sections grow by their trampolines;
/// moved relocations follow their instructions; `.previrt.sites` gets `R_X86_64_PC32`
/// relocations against section symbols (added where missing). A module signature is dropped
/// (any edit invalidates it); the second value says whether one was.
pub fn write_object(data: &[u8], plan: &Plan) -> Result<(Vec<u8>, bool), Error> {
    let len = unsigned_len(data).unwrap_or(data.len());
    let mut out = Out::new(data[..len].to_vec())?;
    if out.shdrs.iter().any(|s| s.ty == SHT_SYMTAB_SHNDX) {
        return Err(Error::Input("SHT_SYMTAB_SHNDX (extended section indices) is not supported".into()));
    }
    let symtab = out
        .shdrs
        .iter()
        .position(|s| s.ty == SHT_SYMTAB)
        .ok_or_else(|| Error::Input("relocatable object without .symtab".into()))?;
    // Grown code sections and moved relocations.
    for sp in &plan.sections {
        let sh = out.shdrs[sp.sec];
        let mut bytes = out.section_bytes(sp.sec).to_vec();
        for (at, w) in &sp.writes {
            put(&mut bytes, *at as usize, w);
        }
        bytes.extend_from_slice(&sp.tail);
        let off = out.append(&bytes, sh.align);
        out.shdrs[sp.sec].offset = off;
        out.shdrs[sp.sec].size = bytes.len() as u64;
        let mut moved = sp.moved.clone();
        moved.sort_by_key(|m| m.from);
        for r in (0..out.shdrs.len()).filter(|&r| out.shdrs[r].ty == SHT_RELA && out.shdrs[r].info as usize == sp.sec) {
            let base = out.shdrs[r].offset as usize;
            for e in 0..(out.shdrs[r].size as usize / RELA) {
                let o = r64(&out.data, base + e * RELA);
                let k = moved.partition_point(|m| m.from <= o);
                if let Some(m) = k.checked_sub(1).map(|k| moved[k]).filter(|m| o < m.from + m.from_len) {
                    put(&mut out.data, base + e * RELA, &(m.to + (o - m.from)).to_le_bytes());
                }
            }
        }
    }
    // Section symbols for every section a record points into, and for the save section.
    let sites_idx = out.shdrs.len();
    let save_idx = sites_idx + 2;
    let syms = out.section_bytes(symtab).to_vec();
    let first_global = out.shdrs[symtab].info as usize;
    if first_global == 0 || first_global > syms.len() / SYM {
        return Err(Error::Input("corrupt ELF: .symtab's first global symbol index".into()));
    }
    let section_sym = |sec: usize| {
        (0..syms.len() / SYM).find(|&i| syms[i * SYM + 4] & 0xf == 3 && r16(&syms, i * SYM + 6) as usize == sec)
    };
    let mut targets: Vec<usize> = plan.sites.iter().flat_map(|s| [s.site.sec, s.origin.sec, s.resume.sec]).collect();
    targets.sort();
    targets.dedup();
    let mut sym_of = std::collections::HashMap::new();
    let mut added = Vec::new();
    for sec in targets.into_iter().chain([save_idx]) {
        match section_sym(sec).filter(|&i| i < first_global) {
            Some(i) => sym_of.insert(sec, i),
            None => {
                let mut s = [0u8; SYM];
                s[4] = 3; // STB_LOCAL, STT_SECTION
                put(&mut s, 6, &(sec as u16).to_le_bytes());
                added.push(s);
                sym_of.insert(sec, first_global + added.len() - 1)
            }
        };
    }
    let shift = added.len() as u64;
    let mut new_syms = syms[..first_global * SYM].to_vec();
    added.iter().for_each(|s| new_syms.extend_from_slice(s));
    new_syms.extend_from_slice(&syms[first_global * SYM..]);
    let off = out.append(&new_syms, 8);
    out.shdrs[symtab].offset = off;
    out.shdrs[symtab].size = new_syms.len() as u64;
    out.shdrs[symtab].info += shift as u32;
    for r in 0..out.shdrs.len() {
        let sh = out.shdrs[r];
        if sh.ty == SHT_RELA && sh.link as usize == symtab {
            for e in 0..(sh.size as usize / RELA) {
                let at = sh.offset as usize + e * RELA + 8;
                let info = r64(&out.data, at);
                if info >> 32 >= first_global as u64 {
                    put(&mut out.data, at, &(info + (shift << 32)).to_le_bytes());
                }
            }
        } else if sh.ty == SHT_GROUP && sh.link as usize == symtab && sh.info as usize >= first_global {
            out.shdrs[r].info += shift as u32;
        }
    }
    // The site table, its relocations, the save slots.
    let table = chunk(plan);
    let mut relas = Vec::with_capacity(plan.sites.len() * 4 * RELA);
    let mut save = 0u64;
    for (k, s) in plan.sites.iter().enumerate() {
        let rec_off = (HEADER_SIZE + k * RECORD_SIZE) as u64;
        for (f, loc) in [
            (field::SITE, s.site),
            (field::SAVE, Loc { sec: save_idx, off: save }),
            (field::RESUME, s.resume),
            (field::ORIGIN, s.origin),
        ] {
            relas.extend_from_slice(&(rec_off + f as u64).to_le_bytes());
            relas.extend_from_slice(&(((sym_of[&loc.sec] as u64) << 32) | R_X86_64_PC32).to_le_bytes());
            relas.extend_from_slice(&(loc.off as i64).to_le_bytes());
        }
        save += s.rec.insn_len as u64;
    }
    let sites_off = out.append(&table, 4);
    let rela_off = out.append(&relas, 8);
    let sh = |ty, flags, offset, size| Shdr { ty, flags, offset, size, align: 4, ..Default::default() };
    out.add_section(SITES_SECTION, sh(SHT_PROGBITS, SHF_ALLOC, sites_off, table.len() as u64));
    let rela = Shdr {
        link: symtab as u32,
        info: sites_idx as u32,
        align: 8,
        entsize: RELA as u64,
        ..sh(SHT_RELA, SHF_INFO_LINK, rela_off, relas.len() as u64)
    };
    out.add_section(&format!(".rela{SITES_SECTION}"), rela);
    let save_off = out.data.len() as u64;
    out.add_section(SAVE_SECTION, sh(SHT_NOBITS, SHF_ALLOC | SHF_WRITE, save_off, save));
    Ok((out.finish()?, len != data.len()))
}
