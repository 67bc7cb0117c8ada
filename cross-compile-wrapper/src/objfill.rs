//! After the real assembler: fill the operand fields of every site record from the bytes it
//! assembled, and verify that every sensitive instruction in the object's executable
//! sections is covered by a site.
//!
//! The text side cannot know operands reliably (macros, expressions, Intel syntax), the
//! assembled bytes can: each record's site is found through its `site_rel` relocation,
//! decoded with iced-x86 and classified by the rewriter's catalogue, and
//! `previrt_rewriter::record::operands` gives the fields. They are patched in place at their
//! file offsets (no size change), and the file is replaced atomically.

use crate::text::Narrow;
use anyhow::{anyhow, Context, Result};
use iced_x86::{Decoder, DecoderOptions};
use previrt_rewriter::cli::UncoveredReport as Uncovered;
use previrt_rewriter::elf::Elf;
use previrt_rewriter::scan::{scan_elf, Hit};
use previrt_rewriter::sites::{self, Reason};
use previrt_rewriter::{catalogue, record};
use previrt_site_abi::{Class, Kind, SiteRecord};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

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
    /// Bytes of executable sections, and of the section named `.text`.
    pub code_bytes: u64,
    pub text_bytes: u64,
    /// Sensitive instructions patched by default found by the scan in 64-bit code, and those
    /// starting a site of their kind.
    pub found: usize,
    pub covered: usize,
    pub uncovered: Vec<Uncovered>,
    pub mismatches: Vec<Mismatch>,
}

/// Why an instruction has no site when the text side never saw it as a statement.
pub const NOT_IN_TEXT: &str =
    "no instruction statement in the assembler input (.byte/.incbin-encoded or built from macro arguments)";

/// Fill every record of the object at `path` and verify coverage; rewrite the file
/// atomically when a record changed. `narrow` lists the sensitive statements the text side
/// left alone as 16/32-bit code, to explain (with file:line) what the scan finds there.
pub fn fill_and_verify(path: &Path, narrow: &[Narrow]) -> Result<ObjectReport> {
    let mut data = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let (report, patches) = {
        let elf = Elf::parse(&data).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        analyse(&elf, narrow)?
    };
    if !patches.is_empty() {
        for (at, bytes) in patches {
            data[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        previrt_atomic_write::write(path, &data).with_context(|| format!("{}: cannot replace", path.display()))?;
    }
    Ok(report)
}

/// The same analysis for any ELF file (objects or a linked vmlinux), changing nothing.
pub fn inspect(path: &Path) -> Result<ObjectReport> {
    let data = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let elf = Elf::parse(&data).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(analyse(&elf, &[])?.0)
}

/// Patches are `(file offset, bytes)`.
fn analyse(elf: &Elf<'_>, narrow: &[Narrow]) -> Result<(ObjectReport, Vec<(usize, Vec<u8>)>)> {
    let mut report = ObjectReport::default();
    let mut patches = Vec::new();
    let hits = scan_elf(elf);
    report.code_bytes = elf.exec_sections().map(|s| s.data.len() as u64).sum();
    report.text_bytes = elf.section_by_name(".text").map_or(0, |s| s.size);
    let Some(mut table) = sites::read(elf).map_err(|e| anyhow!("{e}"))? else {
        report_coverage(elf, &hits, &sites::SiteTable { section: 0, sites: Vec::new() }, narrow, &mut report);
        return Ok((report, patches));
    };
    let table_base = elf.sections[table.section].data.as_ptr() as usize - elf.data.as_ptr() as usize;
    for site in &mut table.sites {
        let Some((sec, off)) = site.site.section_offset() else {
            report.mismatches.push(Mismatch {
                section: String::new(),
                offset: 0,
                problem: format!("site at {:?}", site.site),
            });
            continue;
        };
        let sec = &elf.sections[sec];
        let mismatch = |problem: String| Mismatch { section: sec.name.to_string(), offset: off, problem };
        let bytes = sec.data.get(off as usize..).unwrap_or(&[]);
        let instr = Decoder::with_ip(64, bytes, off, DecoderOptions::NONE).decode();
        // Memory-access sites come from annotations (`previrt annotate`): any load/store.
        let memory_kind = Kind::from_u16(site.record.kind).filter(|k| k.class() == Class::MemoryAccess);
        let (mut filled, name, want_site_len) = if let Some(k) = memory_kind {
            let Some(m) = previrt_annotate::insn::MemAccess::of(&instr) else {
                report.mismatches.push(mismatch(format!("site holds `{instr}`, not an annotated memory access")));
                continue;
            };
            (m.record(k), k.name(), instr.len().max(usize::from(catalogue::CALL_REL32_LEN)) as u8)
        } else {
            let Some(entry) = catalogue::classify(&instr) else {
                report.mismatches.push(mismatch(format!("site holds `{instr}`, not a sensitive instruction")));
                continue;
            };
            (record::operands(&instr, entry, 64), entry.name(), entry.site_len(instr.len()))
        };
        filled.flags |= record::section_flags(&sec.name);
        // Lengths stay as assembled: the padding and the save slot were laid out with them.
        let filled = SiteRecord {
            site_len: site.record.site_len,
            insn_len: site.record.insn_len,
            ..keep_targets(filled, &site.record)
        };
        if instr.len() != usize::from(site.record.insn_len) || want_site_len != site.record.site_len {
            report.mismatches.push(mismatch(format!(
                "assembled insn {} site {} bytes, catalogue wants insn {} site {}",
                site.record.insn_len,
                site.record.site_len,
                instr.len(),
                want_site_len
            )));
        }
        *report.sites.entry(name).or_default() += 1;
        report.padding_bytes += u64::from(site.record.site_len.saturating_sub(site.record.insn_len));
        if filled != site.record {
            patches.push((table_base + site.record_offset, filled.to_bytes().to_vec()));
            site.record = filled;
        }
    }
    report_coverage(elf, &hits, &table, narrow, &mut report);
    Ok((report, patches))
}

/// `filled` with the assembler-resolved PC-relative fields of `text`.
fn keep_targets(filled: SiteRecord, text: &SiteRecord) -> SiteRecord {
    SiteRecord {
        site_rel: text.site_rel,
        save_rel: text.save_rel,
        resume_rel: text.resume_rel,
        origin_rel: text.origin_rel,
        ..filled
    }
}

fn report_coverage(
    elf: &Elf<'_>,
    hits: &[Hit],
    table: &sites::SiteTable,
    narrow: &[Narrow],
    report: &mut ObjectReport,
) {
    let cov = sites::coverage(hits, table);
    report.found = hits.iter().filter(|h| h.bitness == 64 && h.entry.patched_by_default).count();
    report.covered = cov.covered;
    let mut narrow_left: Vec<&Narrow> = narrow.iter().collect();
    for u in cov.uncovered {
        if u.reason == Reason::NotPatchedByDefault {
            continue;
        }
        let (mut reason, mut detail) = (u.reason.token(), u.detail);
        if u.reason == Reason::NoSite {
            // The text side saw this kind as 16/32-bit code: say where.
            let section = &elf.sections[u.section].name;
            detail = match narrow_left.iter().position(|n| n.kind == u.kind.name() && n.section == *section) {
                Some(i) => {
                    reason = "code16_32";
                    format!("16/32-bit code at {}: not rewritten", narrow_left.remove(i).at)
                }
                None => NOT_IN_TEXT.to_string(),
            };
        }
        report.uncovered.push(Uncovered {
            section: elf.sections[u.section].name.to_string(),
            offset: u.offset,
            function: elf.function_at(u.section, u.offset),
            kind: u.kind.name(),
            reason,
            detail,
        });
    }
}
