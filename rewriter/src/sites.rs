//! Reading `.previrt.sites` tables and checking coverage.
//!
//! [`read`] finds the [`SITES_SECTION`] of an ELF file, walks its chunks with the site ABI's
//! [`chunks`], and resolves the four PC-relative fields of every record to a [`Target`]:
//!
//! - in a relocatable object (`.o`, `.ko`), through the `R_X86_64_PC32` relocations of
//!   `.rela.previrt.sites` (against section symbols, local labels or global symbols): the
//!   target of a field is `S + A`, i.e. (symbol's section, symbol value + addend). A field
//!   without a relocation was resolved by the assembler inside the sites section itself.
//! - in a linked image (vmlinux, executables), with the section's virtual address: the target
//!   is `record address + field offset + value`, mapped back to (section, offset) when it
//!   falls inside a section.
//!
//! [`coverage`] then checks that every sensitive instruction found by a scan starts a site of
//! the same kind, and gives a [`Reason`] for every one that does not. `previrt scan` reports
//! the result as `covered`/`uncovered`; the assembler wrapper runs the same check after
//! assembling ([`check_object`]).

use crate::elf::{relocations_for, symbol_ref, Elf, ElfError};
use crate::scan::{scan_elf, Hit};
use previrt_site_abi::{chunks, field, AbiError, Kind, Producer, SiteRecord, SITES_SECTION};
use std::collections::HashMap;

/// What a PC-relative field points at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Inside a section of the file: (section index, offset within it).
    Section { section: usize, offset: u64 },
    /// A virtual address of a linked image outside every section with contents.
    Address(u64),
    /// An undefined symbol plus addend (relocatable objects).
    Symbol { name: String, addend: i64 },
    /// A relocation this reader does not resolve (type number, symbol name).
    Unsupported { r_type: u32, symbol: String },
}

impl Target {
    /// `(section, offset)` when the target is inside a section.
    pub fn section_offset(&self) -> Option<(usize, u64)> {
        match *self {
            Target::Section { section, offset } => Some((section, offset)),
            _ => None,
        }
    }
}

/// One record of a site table, with its targets resolved.
#[derive(Debug, Clone)]
pub struct Site {
    /// Offset of the record within the sites section.
    pub record_offset: usize,
    /// Offset of its chunk's header within the sites section.
    pub chunk_offset: usize,
    pub producer: Producer,
    pub record: SiteRecord,
    /// First byte of the site (`site_rel`).
    pub site: Target,
    /// Save slot (`save_rel`).
    pub save: Target,
    /// Where execution continues (`resume_rel`).
    pub resume: Target,
    /// Where the instruction stood originally (`origin_rel`).
    pub origin: Target,
    /// Linked images: the site's virtual address.
    pub site_address: Option<u64>,
}

impl Site {
    pub fn kind(&self) -> Option<Kind> {
        self.record.kind()
    }
}

/// Errors specific to site tables (the ELF itself was readable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SitesError {
    #[error("{0}")]
    Elf(#[from] ElfError),
    #[error("{SITES_SECTION}: {0}")]
    Abi(AbiError),
    #[error("{SITES_SECTION}: relocation at {offset:#x}: {reason}")]
    Relocation { offset: u64, reason: String },
}

/// The site table of a file.
#[derive(Debug, Clone)]
pub struct SiteTable {
    /// Index of the `.previrt.sites` section.
    pub section: usize,
    pub sites: Vec<Site>,
}

const R_X86_64_NONE: u32 = 0;
const R_X86_64_PC32: u32 = 2;
const R_X86_64_PLT32: u32 = 4;

/// Read and resolve the site table of `elf`; `Ok(None)` when the file has none.
pub fn read(elf: &Elf<'_>) -> Result<Option<SiteTable>, SitesError> {
    let Some(sec) = elf.section_by_name(SITES_SECTION) else { return Ok(None) };
    let sec_index = sec.index;
    let linked = elf.elf_type.is_linked();

    // Relocatable objects: index the relocations by the field they patch.
    let mut relocs: HashMap<u64, (u32, u32, i64)> = HashMap::new();
    let symtab = if linked { None } else { elf.symbol_table()? };
    if !linked {
        for (off, ty, sym, addend) in relocations_for(elf, sec_index)? {
            relocs.insert(off, (ty, sym, addend));
        }
    }

    let resolve_rel = |field_off: u64, value: i32| -> Result<Target, SitesError> {
        if let Some(&(ty, sym, addend)) = relocs.get(&field_off) {
            let name_of = |s: u32| -> String {
                symtab
                    .as_ref()
                    .and_then(|t| symbol_ref(t, s).ok())
                    .map(|s| String::from_utf8_lossy(s.name).into_owned())
                    .unwrap_or_default()
            };
            if ty == R_X86_64_NONE {
                return Ok(Target::Section { section: sec_index, offset: field_off.wrapping_add(value as i64 as u64) });
            }
            if ty != R_X86_64_PC32 && ty != R_X86_64_PLT32 {
                return Ok(Target::Unsupported { r_type: ty, symbol: name_of(sym) });
            }
            let Some(t) = symtab.as_ref() else {
                return Err(SitesError::Relocation {
                    offset: field_off,
                    reason: "relocations but no symbol table".into(),
                });
            };
            let s =
                symbol_ref(t, sym).map_err(|e| SitesError::Relocation { offset: field_off, reason: e.to_string() })?;
            return Ok(match s.section {
                Some(section) => Target::Section { section, offset: s.value.wrapping_add(addend as u64) },
                None => Target::Symbol { name: String::from_utf8_lossy(s.name).into_owned(), addend },
            });
        }
        Ok(if linked {
            let addr = sec.addr.wrapping_add(field_off).wrapping_add(value as i64 as u64);
            address_target(elf, addr)
        } else {
            Target::Section { section: sec_index, offset: field_off.wrapping_add(value as i64 as u64) }
        })
    };

    let mut sites = Vec::new();
    for chunk in chunks(sec.data) {
        let chunk = chunk.map_err(SitesError::Abi)?;
        let producer = Producer::from_u16(chunk.header.producer);
        for (off, rec) in chunk.records() {
            let o = off as u64;
            let site = resolve_rel(o + field::SITE as u64, rec.site_rel)?;
            let site_address = linked.then(|| sec.addr.wrapping_add(o).wrapping_add(rec.site_rel as i64 as u64));
            sites.push(Site {
                record_offset: off,
                chunk_offset: chunk.offset,
                producer,
                record: rec,
                site,
                save: resolve_rel(o + field::SAVE as u64, rec.save_rel)?,
                resume: resolve_rel(o + field::RESUME as u64, rec.resume_rel)?,
                origin: resolve_rel(o + field::ORIGIN as u64, rec.origin_rel)?,
                site_address,
            });
        }
    }
    Ok(Some(SiteTable { section: sec_index, sites }))
}

fn address_target(elf: &Elf<'_>, addr: u64) -> Target {
    match elf.section_at_address(addr) {
        Some(s) => Target::Section { section: s.index, offset: addr - s.addr },
        None => Target::Address(addr),
    }
}

/// Why a sensitive instruction is not covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// No site record starts at the instruction.
    NoSite,
    /// A site starts there but records another kind.
    KindMismatch,
    /// The instruction lies inside a site, not at its start.
    InsideSite,
    /// Time class (`rdtsc`, `rdtscp`) without a site: not patched by default.
    NotPatchedByDefault,
    /// In 16-bit code: not rewritten.
    Code16,
    /// In 32-bit code: not rewritten.
    Code32,
}

impl Reason {
    /// Stable token used in JSON output.
    pub const fn token(self) -> &'static str {
        match self {
            Reason::NoSite => "no_site",
            Reason::KindMismatch => "kind_mismatch",
            Reason::InsideSite => "inside_site",
            Reason::NotPatchedByDefault => "not_patched_by_default",
            Reason::Code16 => "code16",
            Reason::Code32 => "code32",
        }
    }
}

/// A sensitive instruction that no site covers.
#[derive(Debug, Clone)]
pub struct Uncovered {
    pub section: usize,
    pub offset: u64,
    pub kind: Kind,
    pub reason: Reason,
    /// Human-readable detail (e.g. the kind the site records).
    pub detail: String,
}

/// Result of [`coverage`].
#[derive(Debug, Clone, Default)]
pub struct Coverage {
    /// Sensitive instructions found.
    pub total: usize,
    /// Of those, starting a site of the same kind.
    pub covered: usize,
    /// The rest, each with a reason, in (section, offset) order.
    pub uncovered: Vec<Uncovered>,
    /// Site records in the table.
    pub sites: usize,
    /// Sites whose start is not a sensitive instruction found by the scan (e.g. a kind the
    /// scan does not decode, or a stale record).
    pub orphan_sites: usize,
}

/// Check every hit against the site table.
pub fn coverage(hits: &[Hit], table: &SiteTable) -> Coverage {
    let mut starts: HashMap<(usize, u64), &Site> = HashMap::with_capacity(table.sites.len());
    let mut spans: Vec<(usize, u64, u64)> = Vec::with_capacity(table.sites.len());
    for s in &table.sites {
        if let Some((sec, off)) = s.site.section_offset() {
            starts.entry((sec, off)).or_insert(s);
            spans.push((sec, off, off + s.record.site_len.max(s.record.insn_len).max(1) as u64));
        }
    }
    spans.sort_unstable();
    let mut cov = Coverage { total: hits.len(), sites: table.sites.len(), ..Default::default() };
    let mut used = 0usize;
    for h in hits {
        let kind = h.entry.kind;
        let unc = |reason, detail: String| Uncovered { section: h.section, offset: h.offset, kind, reason, detail };
        if let Some(site) = starts.get(&(h.section, h.offset)) {
            used += 1;
            if site.record.kind == kind as u16 {
                cov.covered += 1;
            } else {
                let other =
                    site.kind().map(|k| k.name().to_string()).unwrap_or_else(|| format!("#{}", site.record.kind));
                cov.uncovered.push(unc(Reason::KindMismatch, format!("site records kind {other}")));
            }
            continue;
        }
        let reason = if h.bitness == 16 {
            Reason::Code16
        } else if h.bitness == 32 {
            Reason::Code32
        } else if !h.entry.patched_by_default {
            Reason::NotPatchedByDefault
        } else {
            let n = spans.partition_point(|&(s, o, _)| (s, o) <= (h.section, h.offset));
            match n.checked_sub(1).map(|i| spans[i]) {
                Some((s, o, e)) if s == h.section && h.offset < e => {
                    cov.uncovered.push(unc(Reason::InsideSite, format!("inside the site at {o:#x}")));
                    continue;
                }
                _ => Reason::NoSite,
            }
        };
        let detail = match reason {
            Reason::Code16 | Reason::Code32 => format!("{}-bit code is not rewritten", h.bitness),
            Reason::NotPatchedByDefault => "time class: not patched by default".into(),
            _ => "no site record".into(),
        };
        cov.uncovered.push(unc(reason, detail));
    }
    cov.orphan_sites = starts.len().saturating_sub(used);
    cov
}

/// Scan an ELF file's bytes and check its site table: `Ok(None)` when it has no table.
/// This is the assembler wrapper's post-assembly check.
pub fn check_object(data: &[u8]) -> Result<Option<(Vec<Hit>, Coverage)>, SitesError> {
    let elf = Elf::parse(data)?;
    let Some(table) = read(&elf)? else { return Ok(None) };
    let hits = scan_elf(&elf);
    let cov = coverage(&hits, &table);
    Ok(Some((hits, cov)))
}
