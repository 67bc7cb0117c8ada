//! `previrt verify ORIGINAL PATCHED`: an independent re-check of a post-link patch.
//!
//! Both files are read afresh (the site table through the rewriter's ABI reader) and the
//! checker proves:
//! 1. every byte of every section is unchanged, except inside a *window* (`origin`..`resume`
//!    of a `TRAMPOLINE` record), a trampoline the window jumps to, the relocations and symbol
//!    table of an object, and the sections the patch adds;
//! 2. every window is `jmp trampoline` + `int3` filler over whole original instructions with no
//!    branch target, symbol, relocation target or table target inside, no pinned byte and no
//!    interrupt-shadow instruction (`sti`, `mov …,%ss`); its
//!    trampoline holds each original instruction re-encoded to the same operation and absolute
//!    targets (bytes-identical where a relocation applies, and the relocation moved with it),
//!    each sensitive one as a site padded with `nop`, then `jmp` back to `resume`;
//! 3. in objects, every relocation is the original one, at its moved offset when its
//!    instruction moved, against the same symbol;
//! 4. every sensitive instruction of the original is covered: moved into a trampoline site of
//!    its kind, or left in place under a `TRAP` record; every `.parainstructions` entry has a
//!    `pv_call` record; every kernel-table target is an instruction start outside windows.

use crate::code::{BOUNDARY, PIN, RELOC};
use crate::image::{Image, Loc, Reloc};
use crate::plan::{jmp_rel32, shadows_next, JMP_LEN};
use crate::tables::Role;
use crate::Error;
use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind};
use previrt_rewriter::elf::{symbol_by_index, Elf};
use previrt_rewriter::sites::{read as read_sites, Target};
use previrt_site_abi::{flags, Kind, Producer, SiteRecord, SAVE_SECTION, SITES_SECTION};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// At most this many problems are listed per file (all are counted).
const MAX_LISTED: usize = 50;

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub original: String,
    pub patched: String,
    pub ok: bool,
    pub sites: usize,
    pub windows: usize,
    pub traps: usize,
    pub pv_sites: usize,
    /// Sensitive instructions of the original (default classes, plus any with a record).
    pub sensitive: usize,
    pub covered: usize,
    pub table_refs: usize,
    pub problem_count: usize,
    pub problems: Vec<String>,
}

impl VerifyReport {
    fn fail(&mut self, msg: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_LISTED {
            self.problems.push(msg);
        }
    }
}

struct Rec {
    rec: SiteRecord,
    site: Loc,
    origin: Loc,
    resume: Loc,
}

fn loc(t: &Target) -> Option<Loc> {
    t.section_offset().map(|(sec, off)| Loc { sec, off })
}

/// An instruction is equivalent to its moved copy when it does the same thing: same
/// operation, same absolute branch target, same absolute RIP-relative address (iced keeps both
/// absolute), same everything else.
fn equivalent(a: &Instruction, b: &Instruction) -> bool {
    let branch = |i: &Instruction| {
        i.op_count() > 0 && matches!(i.op0_kind(), OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64)
    };
    if branch(a) {
        let (mut x, mut y) = (*a, *b);
        x.as_near_branch();
        y.as_near_branch();
        return branch(b) && x.code() == y.code() && a.near_branch_target() == b.near_branch_target();
    }
    a == b
}

/// Verify the patch from `orig` to `patched` (file contents).
pub fn verify(orig: &[u8], patched: &[u8]) -> Result<VerifyReport, Error> {
    let img = Image::read(orig)?;
    let pel = Elf::parse(patched).map_err(|e| Error::Input(format!("patched file: {e}")))?;
    let mut r = VerifyReport::default();
    if pel.elf_type != img.elf.elf_type {
        return Err(Error::Input("the two files are not the same kind of ELF".into()));
    }
    let table = match read_sites(&pel) {
        Ok(Some(t)) => t,
        Ok(None) => {
            r.fail(format!("patched file has no {SITES_SECTION}"));
            return Ok(r);
        }
        Err(e) => {
            r.fail(format!("site table unreadable: {e}"));
            return Ok(r);
        }
    };
    let mut recs = Vec::new();
    for s in &table.sites {
        if s.producer != Producer::PostLink {
            r.fail(format!("record at {:#x}: producer {:?}, expected post-link", s.record_offset, s.producer));
        }
        match (loc(&s.site), loc(&s.origin), loc(&s.resume)) {
            (Some(site), Some(origin), Some(resume))
                if img.code_index(origin.sec).is_some() && img.code_index(site.sec).is_some() =>
            {
                recs.push(Rec { rec: s.record, site, origin, resume })
            }
            _ => r.fail(format!("record at {:#x}: site/origin/resume not inside code", s.record_offset)),
        }
        if loc(&s.save).is_none_or(|l| pel.sections[l.sec].name != SAVE_SECTION) {
            r.fail(format!("record at {:#x}: save slot not in {SAVE_SECTION}", s.record_offset));
        }
    }
    r.sites = recs.len();
    let by_site: HashMap<Loc, &Rec> = recs.iter().map(|x| (x.site, x)).collect();

    // Windows, trampolines, coverage of moved instructions.
    let mut windows: BTreeMap<Loc, Loc> = BTreeMap::new();
    for x in recs.iter().filter(|x| x.rec.has(flags::TRAMPOLINE)) {
        if x.rec.has(flags::TRAP) || x.rec.site_len < JMP_LEN as u8 || x.rec.site_len < x.rec.insn_len {
            r.fail(format!(
                "{}: trampoline site with site_len {} insn_len {}",
                at(&img, x.site),
                x.rec.site_len,
                x.rec.insn_len
            ));
        }
        if *windows.entry(x.origin).or_insert(x.resume) != x.resume {
            r.fail(format!("{}: records of one window disagree on resume", at(&img, x.origin)));
        }
    }
    r.windows = windows.len();
    let moved_relocs = img.is_rel();
    let mut covered: HashSet<Loc> = HashSet::new();
    let mut changed_ok: HashMap<usize, Vec<(u64, u64)>> = HashMap::new(); // section → accounted ranges
    let mut moves: HashMap<usize, Vec<(u64, u64, u64)>> = HashMap::new(); // section → (from, len, to)
    let mut last_end: HashMap<usize, u64> = HashMap::new();
    for (&o, &res) in &windows {
        let code = &img.code[img.code_index(o.sec).unwrap()];
        let pdata = pel.sections[o.sec].data;
        if res.sec != o.sec
            || res.off <= o.off
            || res.off > code.bytes.len() as u64
            || last_end.get(&o.sec).is_some_and(|&e| o.off < e)
        {
            r.fail(format!("{}: bad or overlapping window", at(&img, o)));
            continue;
        }
        last_end.insert(o.sec, res.off);
        changed_ok.entry(o.sec).or_default().push((o.off, res.off));
        let (Some(first), Some(_)) =
            (code.insn_at(o.off), code.insn_at(res.off).or((res.off == code.bytes.len() as u64).then_some(0)))
        else {
            r.fail(format!("{}: window does not cover whole instructions", at(&img, o)));
            continue;
        };
        if (o.off + 1..res.off).any(|b| code.marks[b as usize] & BOUNDARY != 0 && code.insn_at(b).is_some()) {
            r.fail(format!("{}: window swallows a branch/table/relocation target or symbol", at(&img, o)));
        }
        if (o.off..res.off).any(|b| code.marks[b as usize] & PIN != 0) {
            r.fail(format!("{}: window moves bytes a kernel table pins", at(&img, o)));
        }
        let Some(jmp) = pdata.get(o.off as usize..o.off as usize + JMP_LEN as usize) else { continue };
        if jmp[0] != 0xe9 || pdata[(o.off + JMP_LEN) as usize..res.off as usize].iter().any(|&b| b != 0xcc) {
            r.fail(format!("{}: window is not jmp rel32 + int3 filler", at(&img, o)));
            continue;
        }
        let t_ip =
            (code.base + o.off + JMP_LEN).wrapping_add(i32::from_le_bytes(jmp[1..5].try_into().unwrap()) as i64 as u64);
        let tl = if img.is_rel() { Some(Loc { sec: o.sec, off: t_ip }) } else { img.loc_of_addr(t_ip) };
        let Some(tl) = tl else {
            r.fail(format!("{}: window jumps outside code", at(&img, o)));
            continue;
        };
        let tcode = &img.code[img.code_index(tl.sec).unwrap()];
        let tdata = pel.sections[tl.sec].data;
        let t = tl.off;
        let mut pos = t;
        let mut k = first;
        let mut bad = false;
        while k < code.insns.len() && (code.insns[k].off as u64) < res.off {
            let ins = code.insns[k];
            let oi = code.decode_at(k);
            if shadows_next(code, k) {
                r.fail(format!(
                    "{}: window moves an interrupt-shadow instruction",
                    at(&img, Loc { sec: o.sec, off: ins.off as u64 })
                ));
            }
            let Some(tail) = tdata.get(pos as usize..) else {
                bad = true;
                break;
            };
            let pi = Decoder::with_ip(64, tail, tcode.base + pos, DecoderOptions::NONE).decode();
            let raw = &code.bytes[ins.off as usize..ins.off as usize + ins.len as usize];
            let relocated =
                code.marks[ins.off as usize..ins.off as usize + ins.len as usize].iter().any(|m| m & RELOC != 0);
            let same = if relocated { tail.get(..raw.len()) == Some(raw) } else { equivalent(&oi, &pi) };
            if !same {
                r.fail(format!(
                    "{}: moved copy at {} is not equivalent to the original instruction",
                    at(&img, Loc { sec: o.sec, off: ins.off as u64 }),
                    at(&img, Loc { sec: tl.sec, off: pos })
                ));
                bad = true;
                break;
            }
            moves.entry(o.sec).or_default().push((ins.off as u64, ins.len as u64, pos));
            let mut step = pi.len() as u64;
            if let Some(x) = by_site.get(&Loc { sec: tl.sec, off: pos }) {
                let kind_ok = ins.entry.is_some_and(|e| e.kind as u16 == x.rec.kind)
                    && x.rec.insn_len == ins.len
                    && x.origin == o;
                let pad = tail.get(pi.len()..x.rec.site_len as usize);
                if !kind_ok || pad.is_none_or(|p| p.iter().any(|&b| b != 0x90)) {
                    r.fail(format!("{}: site record does not match the moved instruction", at(&img, x.site)));
                }
                covered.insert(Loc { sec: o.sec, off: ins.off as u64 });
                step = x.rec.site_len as u64;
            }
            pos += step;
            k += 1;
        }
        if bad {
            continue;
        }
        if tdata.get(pos as usize..(pos + JMP_LEN) as usize)
            != Some(&jmp_rel32(tcode.base + pos, code.base + res.off)[..])
        {
            r.fail(format!("{}: trampoline does not jump back to {}", at(&img, tl), at(&img, res)));
            continue;
        }
        let tramp_end = pos + JMP_LEN;
        let orig_len = tcode.bytes.len() as u64;
        if t < orig_len
            && (tramp_end > orig_len || tcode.bytes[t as usize..tramp_end as usize].iter().any(|&b| b != 0xcc))
        {
            r.fail(format!("{}: trampoline overwrites bytes that were not int3 padding", at(&img, tl)));
        }
        changed_ok.entry(tl.sec).or_default().push((t, tramp_end));
    }

    // Bytes: every section unchanged except accounted ranges; grown sections fully accounted.
    let added = [SITES_SECTION, SAVE_SECTION, &format!(".rela{SITES_SECTION}")];
    for s in &img.elf.sections {
        let Some(p) = pel.sections.get(s.index) else {
            r.fail(format!("section {} missing from the patched file", s.name));
            continue;
        };
        if p.name != s.name || p.sh_type != s.sh_type || (!img.is_rel() && p.addr != s.addr) {
            r.fail(format!("section {} changed its name, type or address", s.name));
            continue;
        }
        let editable = img.is_rel()
            && (s.sh_type == object::elf::SHT_RELA.0
                || s.sh_type == object::elf::SHT_SYMTAB.0
                || s.name == ".shstrtab")
            || (!img.is_rel() && s.name == ".shstrtab");
        if editable {
            continue;
        }
        let mut ok_ranges = changed_ok.remove(&s.index).unwrap_or_default();
        ok_ranges.sort();
        let grown = p.data.len() as u64 > s.data.len() as u64;
        if p.data.len() < s.data.len() || (grown && !(img.is_rel() && img.code_index(s.index).is_some())) {
            r.fail(format!("section {} changed size", s.name));
            continue;
        }
        let in_ok = |b: u64| {
            let k = ok_ranges.partition_point(|x| x.0 <= b);
            k > 0 && b < ok_ranges[k - 1].1
        };
        if let Some(b) = (0..p.data.len()).find(|&b| s.data.get(b) != Some(&p.data[b]) && !in_ok(b as u64)) {
            r.fail(format!("{}: byte changed outside every window and trampoline", at_sec(&img, s.index, b as u64)));
        }
    }
    for s in pel.sections.iter().skip(img.elf.sections.len()) {
        if !added.contains(&s.name.as_ref()) {
            r.fail(format!("unexpected new section {}", s.name));
        }
    }

    // Relocations of objects: the same set, moved with their instructions.
    if moved_relocs {
        check_relocs(&img, &pel, &moves, &mut r);
    }

    // Coverage of sensitive instructions left in place, and paravirt sites.
    let traps: HashMap<Loc, &Rec> = recs.iter().filter(|x| x.rec.has(flags::TRAP)).map(|x| (x.origin, x)).collect();
    r.traps = traps.len();
    for code in &img.code {
        for ins in code.insns.iter().filter(|i| i.entry.is_some()) {
            let l = Loc { sec: code.sec, off: ins.off as u64 };
            let e = ins.entry.unwrap();
            let trap = traps.get(&l);
            if !e.patched_by_default && trap.is_none() && !covered.contains(&l) {
                continue;
            }
            r.sensitive += 1;
            let ok = covered.contains(&l)
                || trap.is_some_and(|x| {
                    x.site == l && x.rec.kind == e.kind as u16 && x.rec.site_len == ins.len && x.rec.insn_len == ins.len
                });
            if ok {
                r.covered += 1;
            } else {
                r.fail(format!("{}: sensitive {} not covered by a site", at(&img, l), e.kind.name()));
            }
        }
    }
    let pv: HashSet<Loc> = recs.iter().filter(|x| x.rec.kind == Kind::PvCall as u16).map(|x| x.site).collect();
    for t in img.table_refs.iter().filter(|t| t.table.pv_sites) {
        r.pv_sites += 1;
        if !pv.contains(&t.target) {
            r.fail(format!("{}: paravirt site without a pv_call record", at(&img, t.target)));
        }
    }
    // Kernel tables: targets stay instruction starts outside windows.
    for t in &img.table_refs {
        r.table_refs += 1;
        let code = &img.code[img.code_index(t.target.sec).unwrap()];
        let inside = windows.range(..=t.target).next_back().is_some_and(|(o, e)| {
            o.sec == t.target.sec && t.target.off < e.off && (t.role == Role::Pin || t.target.off > o.off)
        });
        if inside {
            r.fail(format!("{}: {} entry points into a moved window", at(&img, t.target), t.table.section));
        } else if code.insn_at(t.target.off).is_none()
            && t.target.off < code.bytes.len() as u64
            && code.marks[t.target.off as usize] & PIN == 0
        {
            // (Inside a pinned range — a paravirt or alternatives site — tables describe the
            // replacement the kernel writes there; those bytes are unchanged.)
            r.fail(format!("{}: {} entry is not at an instruction start", at(&img, t.target), t.table.section));
        }
    }
    r.ok = r.problem_count == 0;
    Ok(r)
}

fn at_sec(img: &Image, sec: usize, off: u64) -> String {
    let s = &img.elf.sections[sec];
    if img.is_rel() {
        img.elf
            .function_at(sec, off)
            .map_or_else(|| format!("{}+{off:#x}", s.name), |f| format!("{}+{off:#x} <{f}>", s.name))
    } else {
        format!("{:#x}", s.addr + off)
    }
}

fn at(img: &Image, l: Loc) -> String {
    at_sec(img, l.sec, l.off)
}

/// A relocation compared across files: where, what, and against which symbol.
type RelocKey = (u64, u32, Vec<u8>, Option<usize>, u64, i64);

fn keyed(elf: &Elf, list: &[Reloc], map: impl Fn(u64) -> u64) -> Vec<RelocKey> {
    let symtab = elf.symbol_table().ok().flatten();
    let mut v: Vec<RelocKey> = list
        .iter()
        .map(|x| {
            let (sec, value, name, _) =
                symtab.as_ref().and_then(|t| symbol_by_index(t, x.sym).ok()).unwrap_or((None, 0, b"", false));
            (map(x.offset), x.r_type, name.to_vec(), sec, value, x.addend)
        })
        .collect();
    v.sort();
    v
}

fn check_relocs(img: &Image, pel: &Elf, moves: &HashMap<usize, Vec<(u64, u64, u64)>>, r: &mut VerifyReport) {
    let Ok(pimg_relocs) = pel_relocs(pel) else {
        r.fail("patched relocations unreadable".into());
        return;
    };
    for (&sec, list) in &img.relocs {
        if pel.sections.get(sec).is_none_or(|s| s.name == SITES_SECTION) {
            continue;
        }
        let mv = moves.get(&sec).cloned().unwrap_or_default();
        let map = |o: u64| mv.iter().find(|m| o >= m.0 && o < m.0 + m.1).map_or(o, |m| m.2 + (o - m.0));
        let want = keyed(&img.elf, list, map);
        let got = keyed(pel, pimg_relocs.get(&sec).map(Vec::as_slice).unwrap_or(&[]), |o| o);
        if want != got {
            let diff = want.iter().find(|w| !got.contains(w)).or_else(|| got.iter().find(|g| !want.contains(g)));
            r.fail(format!(
                "relocations of {} differ from the original (first: {:?})",
                pel.sections[sec].name,
                diff.map(|d| (d.0, d.1, String::from_utf8_lossy(&d.2).into_owned()))
            ));
        }
    }
}

fn pel_relocs(pel: &Elf) -> Result<HashMap<usize, Vec<Reloc>>, Error> {
    let mut out = HashMap::new();
    for s in pel.sections.iter().filter(|s| s.sh_type == object::elf::SHT_RELA.0) {
        let list =
            previrt_rewriter::elf::relocations_for(pel, s.info as usize).map_err(|e| Error::Input(e.to_string()))?;
        out.insert(
            s.info as usize,
            list.into_iter().map(|(offset, r_type, sym, addend)| Reloc { offset, r_type, sym, addend }).collect(),
        );
    }
    Ok(out)
}
