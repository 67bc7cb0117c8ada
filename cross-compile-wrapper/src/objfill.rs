//! After the real assembler: fill the operand fields of every site record from the bytes it
//! assembled, and verify that every sensitive instruction in the object's executable
//! sections is covered by a site.
//!
//! The text side cannot know operands reliably (macros, expressions, Intel syntax), the
//! assembled bytes can: each record's site is found through its `site_rel` relocation,
//! decoded with iced-x86 and classified by the rewriter's catalogue, and
//! `previrt_rewriter::record::operands` gives the fields. They are patched in place at their
//! file offsets (no size change), and the file is replaced atomically.

use anyhow::{anyhow, Context, Result};
use iced_x86::{Decoder, DecoderOptions, Instruction};
use previrt_rewriter::catalogue::{self, Entry};
use previrt_rewriter::elf::{self as relf, Elf};
use previrt_rewriter::record;
use previrt_site_abi::{chunks, field, SiteRecord, RECORD_SIZE, SITES_SECTION};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// A sensitive instruction no site covers.
#[derive(Debug, Clone, Serialize)]
pub struct Uncovered {
    pub section: String,
    pub offset: u64,
    pub function: Option<String>,
    pub kind: &'static str,
    pub reason: &'static str,
}

/// A record whose site does not hold what the text side announced.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub section: String,
    pub offset: u64,
    pub problem: String,
}

/// What one object holds after filling.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ObjectReport {
    /// Sites by kind name.
    pub sites: BTreeMap<&'static str, u32>,
    /// Scratch bytes added after instructions (`site_len - insn_len`, summed).
    pub padding_bytes: u64,
    /// Bytes of executable sections.
    pub code_bytes: u64,
    /// Bytes of executable sections that are 16/32-bit code (not rewritten, not verified).
    pub narrow_code_bytes: u64,
    pub uncovered: Vec<Uncovered>,
    pub mismatches: Vec<Mismatch>,
}

/// Why an instruction has no site when the text side never saw it as a statement.
pub const REASON_NOT_IN_TEXT: &str =
    "no instruction statement in the assembler input (.byte/.incbin-encoded or built from macro arguments)";

struct Site {
    section: usize,
    offset: u64,
    /// File offset of the record.
    record_at: usize,
    record: SiteRecord,
}

/// Fill every record of the object at `path` and verify coverage; rewrite the file
/// atomically when a record changed.
pub fn fill_and_verify(path: &Path) -> Result<ObjectReport> {
    let mut data = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let (report, patches) = {
        let elf = Elf::parse(&data).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        analyse(&elf)?
    };
    if !patches.is_empty() {
        for (at, bytes) in patches {
            data[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        write_atomically(path, &data)?;
    }
    Ok(report)
}

/// Write `bytes` to a temporary file beside `path`, then rename it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().ok_or_else(|| anyhow!("{}: not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.previrt-{}", name.to_string_lossy(), std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))
}

fn decode_at(section: &[u8], offset: u64) -> Instruction {
    let bytes = section.get(offset as usize..).unwrap_or(&[]);
    Decoder::with_ip(64, bytes, offset, DecoderOptions::NONE).decode()
}

/// Patches are `(file offset, bytes)`.
fn analyse(elf: &Elf<'_>) -> Result<(ObjectReport, Vec<(usize, Vec<u8>)>)> {
    let mut report = ObjectReport::default();
    let sites = read_sites(elf)?;
    let mut patches = Vec::new();
    let mut covered = HashSet::new();
    for site in &sites {
        covered.insert((site.section, site.offset));
        let sec = &elf.sections[site.section];
        let instr = decode_at(sec.data, site.offset);
        let mismatch = |problem: String| Mismatch { section: sec.name.to_string(), offset: site.offset, problem };
        let Some(entry) = catalogue::classify(&instr) else {
            report.mismatches.push(mismatch(format!("site holds `{instr}`, not a sensitive instruction")));
            continue;
        };
        let filled = fill(&site.record, &instr, entry, &sec.name);
        if filled.insn_len != site.record.insn_len || filled.site_len != site.record.site_len {
            report.mismatches.push(mismatch(format!(
                "assembled lengths insn {} site {}, catalogue wants insn {} site {}",
                site.record.insn_len, site.record.site_len, filled.insn_len, filled.site_len
            )));
        }
        *report.sites.entry(entry.name()).or_default() += 1;
        report.padding_bytes += u64::from(site.record.site_len.saturating_sub(site.record.insn_len));
        if filled != site.record {
            patches.push((site.record_at, filled.to_bytes().to_vec()));
        }
    }
    for sec in elf.exec_sections() {
        report.code_bytes += sec.data.len() as u64;
        let narrow: Vec<(u64, u64)> = elf.regions_in(sec.index).map(|r| (r.start, r.end)).collect();
        report.narrow_code_bytes += narrow.iter().map(|(s, e)| e - s).sum::<u64>();
        let mut decoder = Decoder::with_ip(64, sec.data, 0, DecoderOptions::NONE);
        let mut instr = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut instr);
            let ip = instr.ip();
            if let Some(&(_, end)) = narrow.iter().find(|(s, e)| (*s..*e).contains(&ip)) {
                decoder.set_position(end as usize).ok();
                decoder.set_ip(end);
                continue;
            }
            let Some(entry) = catalogue::classify(&instr) else { continue };
            if entry.patched_by_default && !covered.contains(&(sec.index, ip)) {
                report.uncovered.push(Uncovered {
                    section: sec.name.to_string(),
                    offset: ip,
                    function: elf.function_at(sec.index, ip),
                    kind: entry.name(),
                    reason: REASON_NOT_IN_TEXT,
                });
            }
        }
    }
    Ok((report, patches))
}

/// The record with operand fields and kind from the instruction, section flags from where it
/// lives, and the assembler-computed PC-relative fields and lengths kept.
fn fill(text: &SiteRecord, instr: &Instruction, entry: &Entry, section: &str) -> SiteRecord {
    let ops = record::operands(instr, entry, 64);
    SiteRecord {
        kind: ops.kind,
        flags: ops.flags | record::section_flags(section),
        width: ops.width,
        reg: ops.reg,
        base: ops.base,
        index: ops.index,
        scale: ops.scale,
        imm: ops.imm,
        insn_len: ops.insn_len,
        site_len: ops.site_len,
        ..*text
    }
}

/// Every record of the object's site table with the section and offset its site relocation
/// points at. Records without a resolvable site relocation are skipped (not ours).
fn read_sites(elf: &Elf<'_>) -> Result<Vec<Site>> {
    let Some(table) = elf.section_by_name(SITES_SECTION) else { return Ok(Vec::new()) };
    let file_base = table.data.as_ptr() as usize - elf.data.as_ptr() as usize;
    let relocs: std::collections::HashMap<u64, (u32, i64)> = relf::relocations_for(elf, table.index)
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .map(|(off, _ty, sym, addend)| (off, (sym, addend)))
        .collect();
    let symtab = elf.symbol_table().map_err(|e| anyhow!("{e}"))?;
    let mut out = Vec::new();
    for chunk in chunks(table.data) {
        let chunk = chunk.map_err(|e| anyhow!("{SITES_SECTION}: {e}"))?;
        for (at, record) in chunk.records() {
            let Some(&(sym, addend)) = relocs.get(&((at + field::SITE) as u64)) else { continue };
            let Some(symtab) = &symtab else { continue };
            let (Some(section), value, _, _) = relf::symbol_by_index(symtab, sym).map_err(|e| anyhow!("{e}"))? else {
                continue;
            };
            let offset = (value as i64 + addend) as u64;
            debug_assert!(at + RECORD_SIZE <= table.data.len());
            out.push(Site { section, offset, record_at: file_base + at, record });
        }
    }
    Ok(out)
}
