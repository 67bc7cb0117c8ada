//! Emission for the post-link path: memory-access sites by address, written into a linked
//! image with `previrt-postlink`'s writer (a new `PT_LOAD` holding `.previrt.sites` and
//! `.previrt.save`), as a chunk of producer 3.
//!
//! The sites are trap-based (`TRAP`, `site_len == insn_len`): the instruction stays where it
//! is and the runtime handles it by `int3` or by its fault. Moving loads/stores into
//! trampolines needs the post-link planner to accept instructions the catalogue does not
//! classify; until then this is the documented fallback of docs/site-abi.md.

use crate::insn::{decode_one, MemAccess};
use crate::Annotations;
use anyhow::{anyhow, bail, Result};
use object::{Object, ObjectSection};
use previrt_postlink::image::{Image, Loc};
use previrt_postlink::plan::{Plan, PlannedSite};
use previrt_site_abi::{flags, Kind, Producer, SITES_SECTION};

/// Offset of `producer` in a chunk header.
const PRODUCER_AT: usize = 12;

/// `data` (the image the annotations were made for) with a site for every annotated access;
/// also the number of sites.
pub fn patch(data: &[u8], ann: &Annotations) -> Result<(Vec<u8>, usize)> {
    let img = Image::read(data).map_err(|e| anyhow!("{e}"))?;
    if img.is_rel() {
        bail!("post-link annotation sites need a linked image (vmlinux), not a relocatable object");
    }
    let mut plan = Plan::default();
    for a in &ann.accesses {
        let loc =
            img.loc_of_addr(a.address).ok_or_else(|| anyhow!("{:#x}: not in an executable section", a.address))?;
        let code = &img.code[img.code_index(loc.sec).expect("loc_of_addr gives code sections")];
        let bytes = &code.bytes[loc.off as usize..];
        let access =
            decode_one(bytes, a.address).and_then(|i| MemAccess::of(&i)).filter(|m| m.len == a.insn_len).ok_or_else(
                || anyhow!("{:#x}: the image holds no `{}` there (annotations for another build?)", a.address, a.insn),
            )?;
        let kind = Kind::from_name(a.kind).ok_or_else(|| anyhow!("{:#x}: unknown kind {}", a.address, a.kind))?;
        let mut rec = access.record(kind);
        rec.flags |= flags::TRAP | previrt_rewriter::record::section_flags(&code.name);
        plan.sites.push(PlannedSite {
            rec,
            site: loc,
            origin: loc,
            resume: Loc { sec: loc.sec, off: loc.off + a.insn_len as u64 },
        });
    }
    let n = plan.sites.len();
    let mut out = previrt_postlink::write::write_image(data, &img, &plan).map_err(|e| anyhow!("{e}"))?;
    // The writer labels its chunk as the post-link patcher's; these sites are the annotator's.
    let at = {
        let f = object::File::parse(&out[..])?;
        let s = f
            .sections()
            .filter(|s| s.name() == Ok(SITES_SECTION))
            .last()
            .ok_or_else(|| anyhow!("no site table written"))?;
        s.file_range().ok_or_else(|| anyhow!("site table without file bytes"))?.0 as usize
    };
    out[at + PRODUCER_AT..at + PRODUCER_AT + 2].copy_from_slice(&(Producer::Annotate as u16).to_le_bytes());
    Ok((out, n))
}
