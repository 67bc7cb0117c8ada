//! Placing the runtime inside a kernel's `.text` padding (kernels linked high, e.g. Linux).
//!
//! Linux keeps only its own image mapped: early on (`__startup_64`) it invalidates the
//! kernel-window entries after `_end`, `cleanup_highmap` zaps them again, and `mark_rodata_ro`
//! leaves only `[_text, _etext)` executable. Memory after the image is also free for the
//! page allocator. So for such kernels the runtime and a copy of the site table (with its
//! save slots) go into the largest run of `int3` padding in `.text` — loaded by the image's own
//! segment, reserved and mapped executable for as long as the kernel runs, at its virtual
//! address and at its physical alias (which Linux's earliest code runs at). `.text` becomes
//! read-only late in boot; the runtime clears CR0.WP for its few writes (docs/runtime-entry.md).

use object::elf;
use object::read::elf::{FileHeader, SectionHeader};
use object::LittleEndian as LE;
use previrt_site_abi::{field, SAVE_SECTION, SITES_SECTION};

/// Where in `.text` the runtime can go: the padding run's addresses and file offset.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// First usable address (after the run's first `int3`, kept as a speculation barrier)
    /// and end of the run.
    pub start: u64,
    pub end: u64,
    /// File offset of address `start`.
    pub offset: usize,
}

impl Run {
    /// File offset of `addr` inside the run.
    pub fn offset_of(&self, addr: u64) -> usize {
        self.offset + (addr - self.start) as usize
    }
}

/// The longest `int3` run in `.text`.
pub fn largest_run(data: &[u8]) -> Option<Run> {
    let hdr = elf::FileHeader64::<LE>::parse(data).ok()?;
    let sections = hdr.sections(LE, data).ok()?;
    let (_, text) = sections.section_by_name(LE, b".text")?;
    let bytes = text.data(LE, data).ok()?;
    let (mut best, mut at) = ((0, 0), None);
    for (i, &b) in bytes.iter().chain([&0u8]).enumerate() {
        match (b == 0xcc, at) {
            (true, None) => at = Some(i),
            (false, Some(s)) => {
                if i - s > best.1 - best.0 {
                    best = (s, i);
                }
                at = None;
            }
            _ => {}
        }
    }
    (best.1 - best.0 > 1).then(|| Run {
        start: text.sh_addr(LE) + best.0 as u64 + 1,
        end: text.sh_addr(LE) + best.1 as u64,
        offset: text.sh_offset(LE) as usize + best.0 + 1,
    })
}

/// The kernel's site table and save slots as one block (`.previrt.sites` then
/// `.previrt.save`): its address and bytes (the NOBITS save area as zeros).
pub struct Block {
    pub addr: u64,
    pub bytes: Vec<u8>,
    /// Length of the site table at the block's start.
    pub table_len: usize,
}

/// The block of a post-link patched kernel, or None when it has no site table.
pub fn site_block(data: &[u8]) -> Result<Option<Block>, String> {
    let hdr = elf::FileHeader64::<LE>::parse(data).map_err(|_| "not ELF".to_string())?;
    let sections = hdr.sections(LE, data).map_err(|e| format!("bad section headers: {e}"))?;
    let Some((_, sites)) = sections.section_by_name(LE, SITES_SECTION.as_bytes()) else { return Ok(None) };
    let addr = sites.sh_addr(LE);
    let mut bytes = sites.data(LE, data).map_err(|e| format!("cannot read the site table: {e}"))?.to_vec();
    let table_len = bytes.len();
    if let Some((_, save)) = sections.section_by_name(LE, SAVE_SECTION.as_bytes()) {
        let (save_addr, save_end) = (save.sh_addr(LE), save.sh_addr(LE) + save.sh_size(LE));
        if save_addr < addr + table_len as u64 || save_addr - addr > 1 << 24 {
            return Err(format!("{SAVE_SECTION} does not follow {SITES_SECTION}"));
        }
        bytes.resize((save_end - addr) as usize, 0);
    }
    Ok(Some(Block { addr, bytes, table_len }))
}

/// The block's bytes for address `to`: every record field that points into the block (save
/// slots) moves with it, every other one (sites, resume, origin) keeps its absolute target.
pub fn relocate(b: &Block, to: u64) -> Result<Vec<u8>, String> {
    let mut out = b.bytes.clone();
    let table = &b.bytes[..b.table_len];
    let inside = |t: u64| t >= b.addr && t < b.addr + b.bytes.len() as u64;
    for c in previrt_site_abi::chunks(table) {
        let c = c.map_err(|e| format!("site table: {e}"))?;
        for (off, _) in c.records() {
            for f in [field::SITE, field::SAVE, field::RESUME, field::ORIGIN] {
                let at = off + f;
                let rel = i32::from_le_bytes(table[at..at + 4].try_into().unwrap()) as i64;
                let target = (b.addr + at as u64).wrapping_add(rel as u64);
                let target = if inside(target) { target - b.addr + to } else { target };
                let moved = i32::try_from(target.wrapping_sub(to + at as u64) as i64).map_err(|_| {
                    format!("site record at {:#x}: target out of rel32 reach from .text", b.addr + off as u64)
                })?;
                out[at..at + 4].copy_from_slice(&moved.to_le_bytes());
            }
        }
    }
    Ok(out)
}
