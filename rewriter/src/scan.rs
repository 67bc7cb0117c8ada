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

/// Below this many bytes a code range is decoded on one thread.
pub const PARALLEL_MIN: usize = 2 << 20;
/// Instruction starts each parallel chunk remembers for resynchronisation.
const SYNC_STARTS: usize = 256;

/// Like [`scan_code`], but splits a large range into chunks decoded in parallel (rayon) and
/// stitches them together so the result is exactly what one sequential decode gives: each
/// chunk remembers its first instruction starts; where the previous chunk's last instruction
/// ends on one of them the decodes agree from there on, otherwise the stretch is re-decoded
/// sequentially from the true boundary. Returns `(offset, instruction, entry)` in offset order.
pub fn scan_code_parallel(code: &[u8], ip: u64, bitness: u32) -> Vec<(u64, Instruction, &'static Entry)> {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    let mut out = Vec::new();
    if code.len() < PARALLEL_MIN || threads < 2 {
        scan_code(code, ip, bitness, |o, i, e| out.push((o, *i, e)));
        return out;
    }
    let chunk = (code.len() / (threads * 4)).max(PARALLEL_MIN / 4);
    let bounds: Vec<usize> = (0..code.len()).step_by(chunk).chain(std::iter::once(code.len())).collect();
    struct Part {
        hits: Vec<(u64, Instruction, &'static Entry)>,
        starts: Vec<u64>,
        /// First instruction boundary at or after the chunk's end, decoding from its start.
        end: u64,
    }
    let parts: Vec<Part> = bounds
        .par_windows(2)
        .map(|w| {
            let (b, e) = (w[0], w[1]);
            // Decode from b to the end of the code, stopping at the first boundary >= e.
            let mut d = Decoder::with_ip(bitness, &code[b..], ip.wrapping_add(b as u64), DecoderOptions::NONE);
            let mut instr = Instruction::default();
            let mut p = Part { hits: Vec::new(), starts: Vec::with_capacity(SYNC_STARTS), end: code.len() as u64 };
            let mut at = b as u64;
            while d.can_decode() {
                if at >= e as u64 {
                    p.end = at;
                    break;
                }
                if p.starts.len() < SYNC_STARTS {
                    p.starts.push(at);
                }
                d.decode_out(&mut instr);
                if let Some(entry) = classify(&instr) {
                    p.hits.push((at, instr, entry));
                }
                at += instr.len() as u64;
            }
            p
        })
        .collect();
    // Stitch: `pos` is the true instruction boundary where the next chunk must continue.
    let mut pos = 0u64;
    for (k, p) in parts.into_iter().enumerate() {
        let (b, e) = (bounds[k] as u64, bounds[k + 1] as u64);
        if pos >= e {
            continue; // the previous stretch already decoded past this chunk
        }
        let mut sync = if pos == b || p.starts.binary_search(&pos).is_ok() { Some(pos) } else { None };
        if sync.is_none() {
            // Decode sequentially from the true boundary until it meets one of the chunk's
            // starts, or leaves the chunk.
            let mut d = Decoder::with_ip(bitness, &code[pos as usize..], ip.wrapping_add(pos), DecoderOptions::NONE);
            let mut instr = Instruction::default();
            let mut at = pos;
            while d.can_decode() && at < e {
                if p.starts.binary_search(&at).is_ok() {
                    sync = Some(at);
                    break;
                }
                d.decode_out(&mut instr);
                if let Some(entry) = classify(&instr) {
                    out.push((at, instr, entry));
                }
                at += instr.len() as u64;
            }
            if sync.is_none() {
                pos = at;
                continue;
            }
        }
        let from = sync.unwrap_or(pos);
        out.extend(p.hits.into_iter().filter(|h| h.0 >= from));
        pos = p.end;
    }
    out
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
        for (off, instr, entry) in scan_code_parallel(code, s.addr.wrapping_add(start), bits) {
            hits.push(Hit { section, offset: start + off, entry, bitness: bits, instr });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sequential(code: &[u8], ip: u64) -> Vec<(u64, String)> {
        let mut v = Vec::new();
        scan_code(code, ip, 64, |o, i, e| v.push((o, format!("{} {}", e.name(), att(i)))));
        v
    }

    #[test]
    fn parallel_decode_is_exactly_sequential() {
        // Random bytes: many misaligned starts, so every stitching path is exercised.
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut code = vec![0u8; 3 * PARALLEL_MIN + 12345];
        for b in code.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        // Some long int3 runs and real instructions, as in kernel text.
        for k in (0..code.len() - 5000).step_by(700_001) {
            code[k..k + 4000].fill(0xcc);
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let par = pool.install(|| scan_code_parallel(&code, 0xffff_ffff_8100_0000, 64));
        let par: Vec<(u64, String)> = par.iter().map(|(o, i, e)| (*o, format!("{} {}", e.name(), att(i)))).collect();
        let seq = sequential(&code, 0xffff_ffff_8100_0000);
        assert!(seq.len() > 1000);
        assert_eq!(par.len(), seq.len());
        assert!(par == seq, "parallel decode differs from sequential");
    }
}
