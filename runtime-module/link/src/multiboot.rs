//! Redirecting a multiboot v1 header to the runtime's multiboot entry.
//!
//! Only headers with the a.out kludge (flag bit 16, which 64-bit ELF kernels need: QEMU loads
//! no ELF64 through multiboot otherwise) give an entry that can be rewritten. Such a loader
//! copies `[load_addr, load_end_addr)` linearly from the file (from the header's offset minus
//! `header_addr − load_addr`) and zeroes up to `bss_end_addr`; it ignores the program headers.
//! So the runtime goes into the file where that linear mapping puts its physical address:
//! after the image's file data (its last loaded byte) come zeros (padding and the kernel's
//! `.bss`) and the runtime's bytes, and the rest of the file (section contents, section
//! headers) moves back by that gap. The header's
//! `load_end_addr`/`bss_end_addr` then cover the runtime and `entry_addr` is the runtime's.

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
use object::LittleEndian as LE;

const MAGIC: u32 = 0x1bad_b002;
const AOUT_KLUDGE: u32 = 1 << 16;
/// Offsets of the a.out-kludge address fields in the header.
const HEADER_ADDR: usize = 12;
const LOAD_ADDR: usize = 16;
const LOAD_END_ADDR: usize = 20;
const BSS_END_ADDR: usize = 24;
const ENTRY_ADDR: usize = 28;

/// A multiboot v1 header with the a.out kludge, found at file offset `off`.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    off: usize,
    pub entry: u32,
}

fn word(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(data[at..at + 4].try_into().unwrap())
}

/// The multiboot v1 header (magic at a 4-byte boundary in the first 8 KiB, magic + flags +
/// checksum = 0), if any. Errors name what cannot be redirected.
pub fn find(data: &[u8]) -> Result<Option<Header>, String> {
    let Some(off) = (0..data.len().min(8192).saturating_sub(11)).step_by(4).find(|&at| {
        word(data, at) == MAGIC && word(data, at).wrapping_add(word(data, at + 4)).wrapping_add(word(data, at + 8)) == 0
    }) else {
        return Ok(None);
    };
    if word(data, off + 4) & AOUT_KLUDGE == 0 || off + ENTRY_ADDR + 4 > data.len() {
        return Err("the multiboot header has no load addresses (flag bit 16), so its entry cannot be redirected to the runtime; link an image without it".into());
    }
    if word(data, off + LOAD_END_ADDR) == 0 {
        return Err(
            "the multiboot header's load_end_addr is 0 (load the whole file), which leaves no room for the runtime"
                .into(),
        );
    }
    Ok(Some(Header { off, entry: word(data, off + ENTRY_ADDR) }))
}

/// Where [`place_runtime`] opened the file: offsets at or after `at` moved by `gap`.
#[derive(Debug, Clone, Copy)]
pub struct Gap {
    pub at: usize,
    pub gap: usize,
}

impl Gap {
    pub fn moved(&self, off: usize) -> usize {
        if off >= self.at {
            off + self.gap
        } else {
            off
        }
    }
}

/// The runtime as [`place_runtime`] needs it: physical address, bytes, memory size, and its
/// multiboot entry.
pub struct Runtime<'a> {
    pub phys: u64,
    pub bytes: &'a [u8],
    pub mem_size: u64,
    pub entry: u64,
}

/// `data` with the runtime placed where the header's loader puts it and the header
/// redirected; returns the new file, the runtime's file offset and the gap.
pub fn place_runtime(data: &[u8], h: &Header, rt: &Runtime) -> Result<(Vec<u8>, usize, Gap), String> {
    let field = |f: usize| word(data, h.off + f) as u64;
    let (header_addr, load_addr, load_end, bss_end) =
        (field(HEADER_ADDR), field(LOAD_ADDR), field(LOAD_END_ADDR), field(BSS_END_ADDR));
    let text_off = (h.off as u64)
        .checked_sub(header_addr.wrapping_sub(load_addr))
        .filter(|_| header_addr >= load_addr && load_end > load_addr)
        .ok_or("the multiboot header's addresses are inconsistent (header_addr, load_addr, load_end_addr)")?;
    let at = (text_off + load_end - load_addr) as usize;
    if at > data.len() || rt.phys < bss_end.max(load_end) || (text_off.wrapping_sub(load_addr)) % 4096 != 0 {
        return Err("the multiboot header's load range does not match the file (load_end_addr past the file, bss_end_addr past the kernel, or load_addr not page-congruent with its file offset)".into());
    }
    let top = rt.phys + rt.mem_size;
    let fits = |v: u64| {
        u32::try_from(v).map_err(|_| "the runtime would end above 4 GiB, out of multiboot's reach".to_string())
    };
    let (new_end, new_bss, entry) = (fits(rt.phys + rt.bytes.len() as u64)?, fits(top)?, fits(rt.entry)?);

    let hdr = elf::FileHeader64::<LE>::parse(data).map_err(|_| "not ELF")?;
    let phdrs = hdr.program_headers(LE, data).map_err(|e| e.to_string())?;
    let sections = hdr.section_headers(LE, data).map_err(|e| e.to_string())?;
    // The gap opens after the image's last file byte (what the loader copies past it up to
    // load_end_addr is padding before .bss, so zeros do as well).
    let image_end = phdrs.iter().filter(|p| p.p_type(LE) == elf::PT_LOAD && p.p_offset(LE) < at as u64);
    let at = image_end.map(|p| (p.p_offset(LE) + p.p_filesz(LE)) as usize).max().map_or(at, |e| e.min(at));
    let at_phys = load_addr + (at as u64 - text_off);
    let spans = |off: u64, size: u64| off < at as u64 && off + size > at as u64;
    if phdrs.iter().any(|p| spans(p.p_offset(LE), p.p_filesz(LE)))
        || sections.iter().any(|s| s.sh_type(LE) != elf::SHT_NOBITS && spans(s.sh_offset(LE), s.sh_size(LE)))
    {
        return Err("a segment or section spans the end of the multiboot load range".into());
    }
    // Later segments keep their offset ≡ address (mod align).
    let align = phdrs.iter().filter(|p| p.p_offset(LE) >= at as u64).map(|p| p.p_align(LE)).fold(4096, u64::max);
    let zeros = (rt.phys - at_phys) as usize;
    let g = Gap { at, gap: ((zeros + rt.bytes.len()) as u64).div_ceil(align) as usize * align as usize };

    let mut out = Vec::with_capacity(data.len() + g.gap);
    out.extend_from_slice(&data[..at]);
    out.resize(at + zeros, 0);
    out.extend_from_slice(rt.bytes);
    out.resize(at + g.gap, 0);
    out.extend_from_slice(&data[at..]);

    let put = |out: &mut Vec<u8>, pos: usize, v: &[u8]| out[pos..pos + v.len()].copy_from_slice(v);
    let moved64 = |v: u64| (g.moved(v as usize) as u64).to_le_bytes();
    let (phoff, shoff) = (hdr.e_phoff(LE) as usize, hdr.e_shoff(LE) as usize);
    for (i, p) in phdrs.iter().enumerate() {
        put(&mut out, g.moved(phoff) + i * hdr.e_phentsize(LE) as usize + 8, &moved64(p.p_offset(LE)));
    }
    for (i, s) in sections.iter().enumerate().filter(|(_, s)| s.sh_offset(LE) != 0) {
        put(&mut out, g.moved(shoff) + i * hdr.e_shentsize(LE) as usize + 24, &moved64(s.sh_offset(LE)));
    }
    put(&mut out, 32, &moved64(phoff as u64));
    if shoff != 0 {
        put(&mut out, 40, &moved64(shoff as u64));
    }
    put(&mut out, h.off + LOAD_END_ADDR, &new_end.to_le_bytes());
    put(&mut out, h.off + BSS_END_ADDR, &new_bss.to_le_bytes());
    put(&mut out, h.off + ENTRY_ADDR, &entry.to_le_bytes());
    Ok((out, at + zeros, g))
}
