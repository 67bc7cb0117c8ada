//! Choosing windows and building trampolines.
//!
//! For each sensitive instruction the planner looks for the smallest *window* of whole
//! instructions around it (≥ 5 bytes, for a `jmp rel32`) that holds no boundary except at its
//! start, no pinned byte, no padding and nothing already moved. The window's bytes become
//! `jmp trampoline` + `int3` filler; the trampoline holds the window's instructions re-encoded
//! for their new address (branches and RIP-relative operands keep their absolute targets;
//! instructions under a relocation are copied verbatim and the relocation moves with them),
//! each sensitive one followed by `nop` scratch up to its `site_len`, then `jmp` back to the
//! end of the window. Without such a window the instruction stays and gets a `TRAP` site.

use crate::code::{Code, Mobility, BOUNDARY, PIN, RELOC};
use crate::image::{Image, Loc};
use iced_x86::{Decoder, DecoderOptions, Encoder, Instruction, OpKind};
use previrt_rewriter::catalogue::Entry;
use previrt_rewriter::record::{operands, section_flags};
use previrt_site_abi::{flags, reg, Kind, SiteRecord};

pub const JMP_LEN: u64 = 5;
/// The most neighbours looked at on each side of a sensitive instruction.
const REACH: usize = 8;

/// A site with its targets as section locations (the writer turns them into addresses or
/// relocations).
#[derive(Debug, Clone)]
pub struct PlannedSite {
    pub rec: SiteRecord,
    pub site: Loc,
    pub origin: Loc,
    pub resume: Loc,
}

/// Why an instruction got a trap-based site instead of a trampoline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum TrapReason {
    /// In `.altinstr_replacement`: the kernel copies those bytes over the original.
    AltReplacement,
    /// A kernel table points at the instruction (alternatives, exception table, …).
    Pinned,
    /// 16/32-bit code.
    Not64Bit,
    /// No ≥ 5-byte window of movable instructions without an interior branch target.
    NoWindow,
    /// No padding run left that fits the trampoline.
    NoSpace,
    /// `sti` / `mov …,%ss`: the next instruction runs in its interrupt shadow (`sti; hlt`);
    /// scratch after it would end the shadow early.
    Shadow,
}

impl TrapReason {
    pub fn text(self) -> &'static str {
        match self {
            TrapReason::AltReplacement => "in .altinstr_replacement (the kernel copies it over the original site)",
            TrapReason::Pinned => "a kernel table points at it (alternatives, exception table, jump label, ...)",
            TrapReason::Not64Bit => "16/32-bit code",
            TrapReason::NoWindow => "no 5-byte window: branch target, block end or pinned neighbour too close",
            TrapReason::NoSpace => "no int3 padding left for the trampoline",
            TrapReason::Shadow => {
                "interrupt shadow (sti, mov to %ss): scratch would separate it from the next instruction"
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Fallback {
    pub loc: Loc,
    pub kind: Kind,
    pub reason: TrapReason,
}

/// A moved instruction: `from_len` bytes at section offset `from` now live at `to`,
/// re-encoded to `len` bytes (`to` is the address: the section offset in an object).
#[derive(Debug, Clone, Copy)]
pub struct Moved {
    pub from: u64,
    pub from_len: u64,
    pub to: u64,
    pub len: u64,
}

/// Everything that changes in one executable section.
#[derive(Debug, Default)]
pub struct SectionPlan {
    pub sec: usize,
    /// Bytes written over the section at an offset (windows and, in images, trampolines).
    pub writes: Vec<(u64, Vec<u8>)>,
    /// Trampolines appended after the section's end (relocatable objects).
    pub tail: Vec<u8>,
    pub moved: Vec<Moved>,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub sections: Vec<SectionPlan>,
    pub sites: Vec<PlannedSite>,
    pub fallbacks: Vec<Fallback>,
    /// Sensitive instructions found (those patched by default, plus time if asked).
    pub sensitive: usize,
    pub pv_sites: usize,
    pub trampoline_bytes: u64,
}

/// Where trampolines go: appended to their own section (objects), or carved from `int3`
/// padding (linked images) — their own section's first, then any section the kernel never
/// frees (a trampoline for `.init.text` may live in `.text`, never the reverse).
enum Space {
    Tail,
    Padding(Vec<Pool>),
}

struct Pool {
    sec: usize,
    keeps: bool,
    /// Unused padding, sorted by start; a run shrinks from its start as it is used.
    runs: Vec<(u64, u64)>,
}

impl Pool {
    /// `size` bytes in the first run after `near` that fits, else the last one before it.
    /// Staying close keeps a trampoline in the same part of the image as its site — e.g. the
    /// entry code's 2 MiB region, the only text mapped in user page tables under PTI.
    fn take(&mut self, size: u64, near: u64) -> Option<u64> {
        let k = self.runs.partition_point(|r| r.0 < near);
        let fits = |r: &&mut (u64, u64)| r.1 - r.0 >= size;
        let (earlier, later) = self.runs.split_at_mut(k);
        let r = later.iter_mut().find(fits).or_else(|| earlier.iter_mut().rev().find(fits))?;
        r.0 += size;
        Some(r.0 - size)
    }
}

impl Space {
    fn new(img: &Image) -> Space {
        if img.is_rel() {
            return Space::Tail;
        }
        let pools = img
            .code
            .iter()
            .filter(|c| section_flags(&c.name) & flags::IN_ALTINSTR == 0)
            .map(|c| Pool { sec: c.sec, keeps: section_flags(&c.name) & flags::INIT == 0, runs: c.padding_runs(16) })
            .collect();
        Space::Padding(pools)
    }

    /// Room for `size` bytes for a trampoline of the window at `near` in `code`, whose
    /// appended tail (objects) is `tail_len` long.
    fn take(&mut self, code: &Code, near: u64, size: u64, tail_len: usize) -> Option<Loc> {
        match self {
            Space::Tail => Some(Loc { sec: code.sec, off: code.bytes.len() as u64 + tail_len as u64 }),
            Space::Padding(pools) => {
                let own = pools.iter().position(|p| p.sec == code.sec);
                let order = own.into_iter().chain((0..pools.len()).filter(|&i| Some(i) != own && pools[i].keeps));
                let order: Vec<usize> = order.collect();
                order.into_iter().find_map(|i| {
                    let p = &mut pools[i];
                    let near = if p.sec == code.sec { near } else { 0 };
                    p.take(size, near).map(|off| Loc { sec: p.sec, off })
                })
            }
        }
    }
}

/// `sti` and loads of `%ss` delay interrupts until after the next instruction.
pub fn shadows_next(code: &Code, k: usize) -> bool {
    code.insns[k].entry.is_some_and(|e| match e.kind {
        Kind::Sti => true,
        Kind::MovSeg => code.decode_at(k).op0_register() == iced_x86::Register::SS,
        _ => false,
    })
}

fn is_branch(i: &Instruction) -> bool {
    i.op_count() > 0 && matches!(i.op0_kind(), OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64)
}

/// Bytes of instruction `k` placed at address `ip`, the way the trampoline holds it.
fn encode_moved(code: &Code, k: usize, ip: u64) -> Option<Vec<u8>> {
    let ins = &code.insns[k];
    let raw = &code.bytes[ins.off as usize..ins.off as usize + ins.len as usize];
    let i = code.decode_at(k);
    let relocated = code.marks[ins.off as usize..ins.off as usize + ins.len as usize].iter().any(|m| m & RELOC != 0);
    if relocated || !(is_branch(&i) || i.is_ip_rel_memory_operand()) {
        return Some(raw.to_vec());
    }
    let mut i = i;
    i.as_near_branch();
    let mut enc = Encoder::new(64);
    enc.encode(&i, ip).ok()?;
    Some(enc.take_buffer())
}

pub fn jmp_rel32(from: u64, to: u64) -> [u8; 5] {
    let rel = to.wrapping_sub(from + JMP_LEN) as i64 as i32;
    let mut b = [0xe9, 0, 0, 0, 0];
    b[1..].copy_from_slice(&rel.to_le_bytes());
    b
}

/// Options that change what is patched.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Also patch the time class (`rdtsc`, `rdtscp`), which is reported only by default.
    pub time: bool,
}

pub fn wanted(entry: &Entry, opts: &Options) -> bool {
    entry.patched_by_default || opts.time
}

/// Plan every executable section of `img`.
pub fn plan(img: &Image, opts: &Options) -> Plan {
    let mut plan = plan_sites(img, &|code: &Code, k: usize| {
        let entry = code.insns[k].entry.filter(|e| wanted(e, opts))?;
        Some(operands(&code.decode_at(k), entry, code.insns[k].bits as u32))
    });
    pv_sites(img, &mut plan);
    plan
}

/// Which instruction (section's code, instruction index) is a site, and its record
/// (`site_len`: the bytes the site needs in a trampoline).
pub type SiteOf<'a> = &'a dyn Fn(&Code, usize) -> Option<SiteRecord>;

/// Plan windows and trampolines for the instructions `site_of` names — the catalogue's
/// sensitive instructions ([`plan`]) or a caller's (the annotator's memory accesses) — with
/// the same rules and fallbacks.
pub fn plan_sites(img: &Image, site_of: SiteOf) -> Plan {
    let mut plan = Plan::default();
    let mut space = Space::new(img);
    for code in &img.code {
        plan_section(img, code, site_of, &mut space, &mut plan);
    }
    plan
}

fn trap(code: &Code, k: usize, mut rec: SiteRecord, reason: TrapReason, plan: &mut Plan) {
    let ins = code.insns[k];
    let kind = rec.kind().expect("site records name a kind");
    rec.flags |= flags::TRAP | section_flags(&code.name);
    rec.site_len = rec.insn_len;
    let at = Loc { sec: code.sec, off: ins.off as u64 };
    plan.sites.push(PlannedSite {
        rec,
        site: at,
        origin: at,
        resume: Loc { sec: code.sec, off: at.off + ins.len as u64 },
    });
    plan.fallbacks.push(Fallback { loc: at, kind, reason });
}

fn plan_section(img: &Image, code: &Code, site_of: SiteOf, space: &mut Space, plan: &mut Plan) {
    let n = code.insns.len();
    let pinned = |j: usize| {
        let i = &code.insns[j];
        code.marks[i.off as usize..(i.off as usize + i.len as usize).min(code.marks.len())].iter().any(|m| m & PIN != 0)
    };
    let mut claimed = vec![false; n];
    let ok = |j: usize, claimed: &[bool]| {
        code.insns[j].mobility != Mobility::Fixed && !claimed[j] && !pinned(j) && !shadows_next(code, j)
    };
    let interior_ok = |j: usize| {
        code.marks[code.insns[j].off as usize] & BOUNDARY == 0
            && code.insns[j - 1].off + code.insns[j - 1].len as u32 == code.insns[j].off
    };
    let no_trampolines = section_flags(&code.name) & flags::IN_ALTINSTR != 0;
    let mut tail = Vec::new();
    for k in 0..n {
        if claimed[k] {
            continue;
        }
        let Some(rec) = site_of(code, k) else { continue };
        plan.sensitive += 1;
        let reason = if code.insns[k].bits != 64 {
            Some(TrapReason::Not64Bit)
        } else if no_trampolines {
            Some(TrapReason::AltReplacement)
        } else if pinned(k) {
            Some(TrapReason::Pinned)
        } else if shadows_next(code, k) {
            Some(TrapReason::Shadow)
        } else if !ok(k, &claimed) {
            Some(TrapReason::NoWindow)
        } else {
            None
        };
        if let Some(r) = reason {
            trap(code, k, rec, r, plan);
            continue;
        }
        // Smallest window [a, b] ∋ k of ≥ 5 bytes; ties prefer starting at k.
        let size = |a: usize, b: usize| (code.insns[b].off + code.insns[b].len as u32 - code.insns[a].off) as u64;
        let mut best: Option<(u64, usize, usize)> = None;
        let mut a = k;
        loop {
            let mut b = k;
            loop {
                let s = size(a, b);
                if s >= JMP_LEN {
                    if best.is_none_or(|(bs, _, _)| s < bs) {
                        best = Some((s, a, b));
                    }
                    break;
                }
                if b + 1 >= n || b + 1 > k + REACH || !ok(b + 1, &claimed) || !interior_ok(b + 1) {
                    break;
                }
                b += 1;
            }
            if a == 0 || a + REACH <= k || !ok(a - 1, &claimed) || !interior_ok(a) {
                break;
            }
            a -= 1;
        }
        let Some((_, a, mut b)) = best else {
            trap(code, k, rec, TrapReason::NoWindow, plan);
            continue;
        };
        // Take a sensitive instruction a few bytes further into the same trampoline: its own
        // window would need the neighbours this one just took (`out; add; out`).
        let sensitive = |j: usize| site_of(code, j).is_some();
        while let Some(j) = (b + 1..n.min(b + 4)).find(|&j| sensitive(j)) {
            if !(b + 1..=j).all(|i| ok(i, &claimed) && interior_ok(i)) {
                break;
            }
            b = j;
        }
        // Lengths do not depend on the address (branches become rel32): size it in place.
        let Some(tramp_len) =
            build(code, a, b, code.base + code.insns[a].off as u64, site_of).map(|t| t.bytes.len() as u64)
        else {
            trap(code, k, rec, TrapReason::NoWindow, plan);
            continue;
        };
        let Some(at) = space.take(code, code.insns[a].off as u64, tramp_len, tail.len()) else {
            trap(code, k, rec, TrapReason::NoSpace, plan);
            continue;
        };
        let at_ip = img.code[img.code_index(at.sec).unwrap()].base + at.off;
        // Both jumps and every moved branch must reach: rel32 from the trampoline's address.
        let reach = |from: u64, to: u64| i32::try_from(to.wrapping_sub(from) as i64).is_ok();
        let built = build(code, a, b, at_ip, site_of).filter(|t| t.bytes.len() as u64 == tramp_len);
        let Some(t) = built.filter(|_| reach(code.base + code.insns[a].off as u64 + JMP_LEN, at_ip)) else {
            trap(code, k, rec, TrapReason::NoSpace, plan);
            continue;
        };
        let start = code.insns[a].off as u64;
        let end = start + size(a, b);
        let mut window = jmp_rel32(code.base + start, at_ip).to_vec();
        window.resize(size(a, b) as usize, 0xcc);
        plan.section(code.sec).writes.push((start, window));
        plan.section(code.sec).moved.extend(t.moved);
        plan.trampoline_bytes += tramp_len;
        match space {
            Space::Tail => tail.extend_from_slice(&t.bytes),
            Space::Padding(_) => plan.section(at.sec).writes.push((at.off, t.bytes)),
        }
        for (j, site_ip, mut rec) in t.sites {
            claimed[j] = true;
            rec.flags |= flags::TRAMPOLINE | section_flags(&code.name);
            let l = |off| Loc { sec: code.sec, off };
            let site = Loc { sec: at.sec, off: site_ip - at_ip + at.off };
            plan.sites.push(PlannedSite { rec, site, origin: l(start), resume: l(end) });
            if j != k {
                plan.sensitive += 1;
            }
        }
        claimed[a..=b].iter_mut().for_each(|c| *c = true);
    }
    if !tail.is_empty() {
        plan.section(code.sec).tail = tail;
    }
}

impl Plan {
    /// The plan of section `sec`, created on first use.
    fn section(&mut self, sec: usize) -> &mut SectionPlan {
        let k = match self.sections.iter().position(|s| s.sec == sec) {
            Some(k) => k,
            None => {
                self.sections.push(SectionPlan { sec, ..Default::default() });
                self.sections.len() - 1
            }
        };
        &mut self.sections[k]
    }
}

/// A built trampoline for window `[a, b]` placed at address `at` (the section offset in an
/// object, where the trampoline is in the window's own section).
pub struct Trampoline {
    pub bytes: Vec<u8>,
    /// `(instruction index, site address, record)` per sensitive instruction.
    pub sites: Vec<(usize, u64, SiteRecord)>,
    pub moved: Vec<Moved>,
}

pub fn build(code: &Code, a: usize, b: usize, at: u64, site_of: SiteOf) -> Option<Trampoline> {
    let mut t = Trampoline { bytes: Vec::new(), sites: Vec::new(), moved: Vec::new() };
    for j in a..=b {
        let pos = at + t.bytes.len() as u64;
        let bytes = encode_moved(code, j, pos)?;
        t.moved.push(Moved {
            from: code.insns[j].off as u64,
            from_len: code.insns[j].len as u64,
            to: pos,
            len: bytes.len() as u64,
        });
        t.bytes.extend_from_slice(&bytes);
        if let Some(rec) = site_of(code, j) {
            t.bytes.resize((pos + rec.site_len as u64 - at) as usize, 0x90);
            t.sites.push((j, pos, rec));
        }
    }
    let end = code.insns[b].off as u64 + code.insns[b].len as u64;
    let pos = at + t.bytes.len() as u64;
    t.bytes.extend_from_slice(&jmp_rel32(pos, code.base + end));
    Some(t)
}

/// `.parainstructions` entries become `pv_call` sites in place (they are ≥ 5 bytes already).
fn pv_sites(img: &Image, plan: &mut Plan) {
    for t in img.table_refs.iter().filter(|t| t.table.pv_sites) {
        let Some(ci) = img.code_index(t.target.sec) else { continue };
        let code = &img.code[ci];
        let len = t.len.unwrap_or(0);
        let Some(bytes) = code.bytes.get(t.target.off as usize..) else { continue };
        let mut d = Decoder::with_ip(64, bytes, code.base + t.target.off, DecoderOptions::NONE);
        let i = d.decode();
        let mut rec = SiteRecord {
            kind: Kind::PvCall as u16,
            flags: section_flags(&code.name),
            site_len: len,
            insn_len: i.len() as u8,
            width: 8,
            ..Default::default()
        };
        if i.is_ip_rel_memory_operand() {
            rec.flags |= flags::MEM | flags::RIP_RELATIVE;
            rec.base = reg::RIP;
            rec.imm = d.get_constant_offsets(&i).displacement_offset() as i32;
        }
        if (len as u64) < JMP_LEN {
            rec.flags |= flags::TRAP;
        }
        plan.pv_sites += 1;
        plan.sites.push(PlannedSite {
            rec,
            site: t.target,
            origin: t.target,
            resume: Loc { sec: t.target.sec, off: t.target.off + len as u64 },
        });
    }
}
