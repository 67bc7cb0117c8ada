//! Emission for the post-link path: memory-access sites by address, written with
//! `previrt-postlink`'s writers — into a linked image (a new `PT_LOAD` holding `.previrt.sites`
//! and `.previrt.save`) or a relocatable object (`.o`/`.ko`: new sections, relocations moved
//! with the instructions) — as a chunk of producer 3.
//!
//! The sites are trampoline sites like the post-link patcher's own: its planner
//! (`previrt_postlink::plan::plan_sites`) moves a window of whole instructions around each
//! access into a trampoline where the access gets 5 bytes (room for the runtime's `call`);
//! where no safe window exists it keeps the instruction in place as a `TRAP` site, for the
//! same reasons (pinned by a kernel table, branch target, no padding left, …).

use crate::insn::{decode_one, MemAccess};
use crate::Annotations;
use anyhow::{anyhow, Result};
use object::{Object, ObjectSection};
use previrt_postlink::code::Code;
use previrt_postlink::image::Loc;
use previrt_postlink::plan::{plan_sites, Plan, TrapReason, JMP_LEN};
use previrt_site_abi::{flags, Kind, Producer, SiteRecord, SITES_SECTION};
use std::collections::HashMap;

/// Offset of `producer` in a chunk header.
const PRODUCER_AT: usize = 12;

/// What [`patch`] did: the sites, and those left in place as `TRAP` sites with the reason.
#[derive(Debug, Default)]
pub struct Patched {
    pub sites: usize,
    pub trampolines: usize,
    pub traps: Vec<(u64, TrapReason)>,
}

/// An object's addresses are `section << 32 | offset` ([`crate::section_base`]); a linked
/// image's are its own.
fn address_of(img: &previrt_postlink::image::Image<'_>, loc: Loc) -> u64 {
    match img.is_rel() {
        true => (loc.sec as u64) << 32 | loc.off,
        false => img.code[img.code_index(loc.sec).expect("code section")].base + loc.off,
    }
}

/// `data` (the image the annotations were made for) with a site for every annotated access.
pub fn patch(data: &[u8], ann: &Annotations) -> Result<(Vec<u8>, Patched)> {
    let img = previrt_postlink::image::Image::read(data).map_err(|e| anyhow!("{e}"))?;
    // Records by (section, offset); a trampoline gives each access the 5 bytes of a `call`.
    let mut records: HashMap<(usize, u64), SiteRecord> = HashMap::new();
    for a in &ann.accesses {
        let loc = match img.is_rel() {
            true => Some(Loc { sec: (a.address >> 32) as usize, off: a.address & 0xffff_ffff }),
            false => img.loc_of_addr(a.address),
        };
        let (loc, code) = loc
            .and_then(|l| Some((l, &img.code[img.code_index(l.sec)?])))
            .filter(|(l, c)| l.off < c.bytes.len() as u64)
            .ok_or_else(|| anyhow!("{:#x}: not in an executable section", a.address))?;
        let bytes = &code.bytes[loc.off as usize..];
        let access =
            decode_one(bytes, a.address).and_then(|i| MemAccess::of(&i)).filter(|m| m.len == a.insn_len).ok_or_else(
                || anyhow!("{:#x}: the image holds no `{}` there (annotations for another build?)", a.address, a.insn),
            )?;
        let kind = Kind::from_name(a.kind).ok_or_else(|| anyhow!("{:#x}: unknown kind {}", a.address, a.kind))?;
        let mut rec = access.record(kind);
        rec.site_len = rec.insn_len.max(JMP_LEN as u8);
        records.insert((loc.sec, loc.off), rec);
    }
    let site_of = |code: &Code, k: usize| records.get(&(code.sec, code.insns[k].off as u64)).copied();
    let plan: Plan = plan_sites(&img, &site_of);
    let done = Patched {
        sites: plan.sites.len(),
        trampolines: plan.sites.iter().filter(|s| s.rec.has(flags::TRAMPOLINE)).count(),
        traps: plan.fallbacks.iter().map(|f| (address_of(&img, f.loc), f.reason)).collect(),
    };
    let mut out = match img.is_rel() {
        true => previrt_postlink::write::write_object(data, &plan).map_err(|e| anyhow!("{e}"))?.0,
        false => previrt_postlink::write::write_image(data, &img, &plan).map_err(|e| anyhow!("{e}"))?,
    };
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
    Ok((out, done))
}
