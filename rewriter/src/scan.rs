//! Finding sensitive instructions in code: the decode loop and per-file scans.
//!
//! [`scan_code`] is the hot loop: one iced-x86 `Decoder` per code range, one reused
//! `Instruction`, a table lookup per instruction ([`crate::catalogue::classify`]), and an
//! allocation only per hit. [`scan_elf`] runs it over every executable section of an [`Elf`],
//! decoding the [`crate::elf::Region`]s that are 16/32-bit code at their own bitness.

use crate::catalogue::{classify, Entry};
use crate::elf::Elf;
use crate::record;
use iced_x86::{Decoder, DecoderOptions, Formatter, GasFormatter, Instruction};
use previrt_site_abi::{flags, SiteRecord};

/// One sensitive instruction found in a file.
#[derive(Debug, Clone)]
pub struct Hit {
    /// Section index.
    pub section: usize,
    /// Offset within the section.
    pub offset: u64,
    /// The catalogue row.
    pub entry: &'static Entry,
    /// 64, 32 or 16: the bitness it was decoded at.
    pub bitness: u32,
    /// The decoded instruction (its `ip()` is the section address + offset).
    pub instr: Instruction,
}

impl Hit {
    pub fn len(&self) -> usize {
        self.instr.len()
    }
    pub fn is_empty(&self) -> bool {
        self.instr.len() == 0
    }
    /// The instruction's bytes within `elf`.
    pub fn bytes<'a>(&self, elf: &Elf<'a>) -> &'a [u8] {
        let d = elf.sections[self.section].data;
        let s = self.offset as usize;
        d.get(s..s + self.instr.len()).unwrap_or(&[])
    }
    /// AT&T (GNU as) disassembly.
    pub fn att(&self) -> String {
        att(&self.instr)
    }
    /// The site record the assembler path would write for this instruction, with the
    /// location-dependent flags ([`record::section_flags`]) of its section.
    pub fn record(&self, section_name: &str) -> SiteRecord {
        let mut r = record::operands(&self.instr, self.entry, self.bitness);
        r.flags |= record::section_flags(section_name);
        r
    }
    /// True when decoded outside 64-bit code.
    pub fn is_non64(&self) -> bool {
        self.bitness != 64
    }
}

/// AT&T disassembly of one instruction (GNU as syntax, as `objdump -d` prints it).
pub fn att(instr: &Instruction) -> String {
    let mut f = GasFormatter::new();
    f.options_mut().set_uppercase_hex(false);
    f.options_mut().set_space_after_operand_separator(false);
    let mut out = String::new();
    f.format(instr, &mut out);
    out
}

/// Decode `code` (which starts at address `ip`) at `bitness` and call `found(offset, instr,
/// entry)` for every sensitive instruction. Offsets are relative to the start of `code`.
/// Returns the number of instructions decoded.
pub fn scan_code(code: &[u8], ip: u64, bitness: u32, mut found: impl FnMut(u64, &Instruction, &'static Entry)) -> u64 {
    let mut decoder = Decoder::with_ip(bitness, code, ip, DecoderOptions::NONE);
    let mut instr = Instruction::default();
    let mut n = 0u64;
    while decoder.can_decode() {
        decoder.decode_out(&mut instr);
        n += 1;
        if let Some(e) = classify(&instr) {
            found(instr.ip().wrapping_sub(ip), &instr, e);
        }
    }
    n
}

/// Scan every executable section of `elf`. Hits are in (section, offset) order.
pub fn scan_elf(elf: &Elf<'_>) -> Vec<Hit> {
    let mut hits = Vec::new();
    for s in elf.exec_sections() {
        scan_section(elf, s.index, &mut hits);
    }
    hits
}

/// Scan one section (by index), appending to `hits`.
pub fn scan_section(elf: &Elf<'_>, section: usize, hits: &mut Vec<Hit>) {
    let s = &elf.sections[section];
    // Split the section into 64-bit stretches and the recorded 16/32-bit regions.
    let mut pos = 0u64;
    let len = s.data.len() as u64;
    let run = |start: u64, end: u64, bits: u32, hits: &mut Vec<Hit>| {
        if start >= end {
            return;
        }
        let code = &s.data[start as usize..end as usize];
        scan_code(code, s.addr.wrapping_add(start), bits, |off, instr, entry| {
            hits.push(Hit { section, offset: start + off, entry, bitness: bits, instr: *instr });
        });
    };
    for r in elf.regions_in(section) {
        let (rs, re) = (r.start.max(pos).min(len), r.end.min(len));
        run(pos, rs, 64, hits);
        run(rs, re, r.bits, hits);
        pos = pos.max(re);
    }
    run(pos, len, 64, hits);
}

/// Counts of hits by kind name, in catalogue order, zero kinds omitted.
pub fn counts<'a>(hits: impl IntoIterator<Item = &'a Hit>) -> Vec<(&'static str, u64)> {
    let kinds = crate::catalogue::kinds();
    let mut c = vec![0u64; kinds.len()];
    for h in hits {
        if let Some(i) = kinds.iter().position(|&k| k == h.entry.kind) {
            c[i] += 1;
        }
    }
    kinds.iter().zip(c).filter(|(_, n)| *n > 0).map(|(k, n)| (k.name(), n)).collect()
}

/// Flags a hit would carry in a record because of its bitness.
pub fn bitness_flags(bits: u32) -> u16 {
    match bits {
        16 => flags::CODE16,
        32 => flags::CODE32,
        _ => 0,
    }
}
