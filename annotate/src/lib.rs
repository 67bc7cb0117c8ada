//! `previrt-annotate`: finds the memory accesses of a kernel that touch device memory (MMIO)
//! or page tables, so they can become sites (kinds `mmio_read`, `mmio_write`, `pt_read`,
//! `pt_write`) with no change to the kernel's source — what Afterburner did with hand-written
//! macros.
//!
//! Three sources, combined per instruction address:
//! - [`rules`]: known accessor functions (`readl`, `set_pte`, …), out of line or inlined;
//! - [`debuginfo`]: DWARF — loads/stores through pointers to page-table entry types or to
//!   volatile memory;
//! - [`profile`]: the in-tree hypervisor's trace (`previrt run --profile`).
//!
//! Public API: [`analyse`] gives the [`Annotations`] (the documented JSON file,
//! docs/annotations.md); [`score`] compares each source and their unions with a
//! [`Reference`] trace (recall, precision, wasted site executions);
//! [`emit::patch`] writes memory-access sites (producer 3) into a linked image by address;
//! [`asm::LineAnnotations`] tells the toolchain's `as` which statements to make sites (by
//! `file:line`); [`cli`] is `previrt annotate`.

pub mod asm;
pub mod cli;
pub mod debuginfo;
pub mod emit;
pub mod insn;
pub mod profile;
pub mod rules;

use anyhow::{anyhow, Result};
use debuginfo::{DebugInfo, Place};
use insn::MemAccess;
use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};
use profile::Profile;
use rules::Target;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub const FORMAT: &str = "previrt-annotations/1";

/// Which source found an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Rules,
    Dwarf,
    Profile,
}

pub const SOURCES: [Source; 3] = [Source::Rules, Source::Dwarf, Source::Profile];

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Rules => "rules",
            Source::Dwarf => "dwarf",
            Source::Profile => "profile",
        }
    }
}

/// One annotated memory access.
#[derive(Debug, Clone, Serialize)]
pub struct Access {
    /// Address of the instruction (the image's virtual address).
    pub address: u64,
    pub insn_len: u8,
    /// The instruction in AT&T syntax.
    pub insn: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub function: Option<String>,
    /// `mmio_read`, `mmio_write`, `pt_read` or `pt_write`.
    pub kind: &'static str,
    pub width: u8,
    pub sources: BTreeSet<Source>,
    /// Detail per source: the accessor (rules), the pointer variable (dwarf), the traced
    /// count (profile).
    pub why: BTreeMap<Source, String>,
}

/// A traced access that cannot be a site, with the reason.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub rip: u64,
    pub kind: String,
    pub reason: &'static str,
}

/// The annotations file (`previrt-annotations/1`).
#[derive(Debug, Clone, Serialize)]
pub struct Annotations {
    pub format: &'static str,
    pub image: String,
    /// False when the image has no DWARF line table: rules then see symbols only and DWARF
    /// finds nothing.
    pub debug_info: bool,
    /// Accesses found by each source (an access found by several counts for each).
    pub found: BTreeMap<Source, usize>,
    pub accesses: Vec<Access>,
    pub profile_skipped: Vec<Skipped>,
}

/// Analysis settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Page-table entry type names for the DWARF source.
    pub pt_types: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options { pt_types: debuginfo::PT_TYPES.iter().map(|s| s.to_string()).collect() }
    }
}

/// The executable bytes, allocated ranges and function symbols of a linked image.
struct Image<'a> {
    code: Vec<(u64, &'a [u8])>,
    /// `[start, end)` of every allocated section: the image's own memory, never a device.
    alloc: Vec<(u64, u64)>,
    /// `(start, end, name)` sorted by start.
    functions: Vec<(u64, u64, String)>,
    /// `(start, end, name)` of the [`rules::PT_OBJECTS`] the image defines.
    pt_objects: Vec<(u64, u64, String)>,
}

/// Where a section sits for the analysis: its address in a linked image. In a relocatable
/// object every section is at 0, so allocated section `i` is placed at `i << 32` (an address
/// then names one section and offset: [`emit::patch`] maps it back) and the others at 0 (DWARF
/// refers to them by offset).
pub fn section_base(file: &object::File<'_>, index: object::SectionIndex) -> u64 {
    let Ok(s) = file.section_by_index(index) else { return 0 };
    if file.kind() != object::ObjectKind::Relocatable {
        return s.address();
    }
    use SectionKind::*;
    let alloc =
        matches!(s.kind(), Text | Data | ReadOnlyData | ReadOnlyDataWithRel | ReadOnlyString | UninitializedData | Tls);
    if alloc {
        (index.0 as u64) << 32
    } else {
        0
    }
}

/// A symbol's address in the layout of [`section_base`].
fn symbol_address(file: &object::File<'_>, s: &object::Symbol<'_, '_>) -> u64 {
    match (file.kind(), s.section_index()) {
        (object::ObjectKind::Relocatable, Some(i)) => section_base(file, i) + s.address(),
        _ => s.address(),
    }
}

impl<'a> Image<'a> {
    fn read(file: &object::File<'a>) -> Image<'a> {
        let code = file
            .sections()
            .filter(|s| s.kind() == SectionKind::Text)
            .filter_map(|s| Some((section_base(file, s.index()), s.data().ok()?)))
            .collect();
        let span = |s: &object::Symbol<'_, '_>| {
            let a = symbol_address(file, s);
            Some((a, a + s.size(), s.name().ok()?.to_string()))
        };
        let mut functions: Vec<_> =
            file.symbols().filter(|s| s.kind() == SymbolKind::Text && s.size() > 0).filter_map(|s| span(&s)).collect();
        functions.sort();
        let pt_objects = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Data && s.size() > 0)
            .filter_map(|s| span(&s))
            .filter(|(_, _, n)| rules::PT_OBJECTS.contains(&n.as_str()))
            .collect();
        let alloc = file
            .sections()
            .map(|s| (section_base(file, s.index()), s.size()))
            .filter(|&(b, n)| b != 0 && n != 0)
            .map(|(b, n)| (b, b + n))
            .collect();
        Image { code, alloc, functions, pt_objects }
    }

    /// Whether an access names the image's own memory (a global): not MMIO, however much
    /// an accessor's body needs it (`io_apic_base()` reads a table of bases).
    fn names_own_memory(&self, a: &MemAccess) -> bool {
        a.static_address().is_some_and(|x| self.alloc.iter().any(|&(b, e)| (b..e).contains(&x)))
    }

    /// The [`rules::PT_OBJECTS`] table an access names by address (or indexes from its
    /// address with a run-time index: `init_top_pgt[pgd_index(addr)]`), if any.
    fn pt_object(&self, a: &MemAccess) -> Option<&str> {
        let x = a.static_address().or_else(|| a.array_base())?;
        self.pt_objects.iter().find(|(b, e, _)| (*b..*e).contains(&x)).map(|(_, _, n)| n.as_str())
    }

    fn bytes(&self, begin: u64, end: u64) -> Option<&'a [u8]> {
        let &(base, data) = self.code.iter().find(|(b, d)| (*b..*b + d.len() as u64).contains(&begin))?;
        let end = end.min(base + data.len() as u64);
        Some(&data[(begin - base) as usize..(end - base) as usize])
    }

    /// The profile's traced rows, each with the memory access in this image a site could
    /// hold, or why there is none.
    fn traced<'s, 'p: 's>(
        &'s self,
        p: &'p Profile,
    ) -> impl Iterator<Item = (&'p profile::Traced, Result<MemAccess, &'static str>)> + 's {
        p.accesses.iter().map(move |t| {
            let rip = if t.after { self.instruction_ending_at(t.rip) } else { Some(t.rip) };
            let access = rip
                .and_then(|rip| self.bytes(rip, rip + 15).and_then(|b| insn::decode_one(b, rip)))
                .and_then(|i| MemAccess::of(&i));
            let r = match access {
                _ if !t.code64 => Err("16/32-bit code (boot trampoline): no sites there"),
                None if self.bytes(t.rip, t.rip + 1).is_none() => Err("outside the image's code"),
                None => Err("not a load/store through an explicit memory operand (string or stack instruction)"),
                Some(a) => Ok(a),
            };
            (t, r)
        })
    }

    /// The instruction that ends at `end` (decoded from its function's start).
    fn instruction_ending_at(&self, end: u64) -> Option<u64> {
        let f = self.function_at(end - 1)?;
        let bytes = self.bytes(f.0, end)?;
        let mut d = iced_x86::Decoder::with_ip(64, bytes, f.0, iced_x86::DecoderOptions::NONE);
        let mut i = iced_x86::Instruction::default();
        while d.can_decode() {
            d.decode_out(&mut i);
            if i.next_ip() == end {
                return Some(i.ip());
            }
        }
        None
    }

    fn function(&self, addr: u64) -> Option<&str> {
        self.function_at(addr).map(|f| f.2.as_str())
    }

    fn function_at(&self, addr: u64) -> Option<&(u64, u64, String)> {
        let k = self.functions.partition_point(|f| f.0 <= addr).checked_sub(1)?;
        let f = &self.functions[k];
        (addr < f.1).then_some(f)
    }

    /// The instructions starting in `[begin, end)`. A location-list range need not begin on
    /// an instruction (GCC starts the range after a call at the call's last byte), so
    /// decoding starts at the enclosing function.
    fn instructions_in(&self, begin: u64, end: u64, mut each: impl FnMut(&iced_x86::Instruction)) {
        let from = self.function_at(begin).map_or(begin, |f| f.0);
        let Some(bytes) = self.bytes(from, end) else { return };
        let mut d = iced_x86::Decoder::with_ip(64, bytes, from, iced_x86::DecoderOptions::NONE);
        let mut i = iced_x86::Instruction::default();
        while d.can_decode() {
            d.decode_out(&mut i);
            if i.ip() >= begin {
                each(&i);
            }
        }
    }

    /// The memory accesses of the instructions starting in `[begin, end)`.
    fn accesses_in(&self, begin: u64, end: u64, mut each: impl FnMut(MemAccess)) {
        self.instructions_in(begin, end, |i| MemAccess::of(i).into_iter().for_each(&mut each));
    }

    /// The accesses through a pointer kept in the stack slot at `off` from the CFA over
    /// `[begin, end)`: a `mov` of the slot (`%rsp` + the CFA's distance from `%rsp` there, by
    /// `.debug_frame`, + `off`) into a register makes that register the pointer until the
    /// register is written again or control flow leaves the instruction.
    fn through_slot(&self, dbg: &DebugInfo, begin: u64, end: u64, off: i64, mut each: impl FnMut(MemAccess)) {
        let mut held: Vec<iced_x86::Register> = Vec::new();
        let mut info = iced_x86::InstructionInfoFactory::new();
        self.instructions_in(begin, end, |i| {
            if let Some(a) = MemAccess::of(i).filter(|a| held.contains(&a.instr.memory_base().full_register())) {
                each(a);
            }
            let slot = dbg.cfa_from_rsp(i.ip()).map(|k| (k + off) as u64);
            let loads_slot = i.mnemonic() == iced_x86::Mnemonic::Mov
                && i.op0_kind() == iced_x86::OpKind::Register
                && i.op1_kind() == iced_x86::OpKind::Memory
                && i.memory_base() == iced_x86::Register::RSP
                && i.memory_index() == iced_x86::Register::None
                && Some(i.memory_displacement64()) == slot;
            let written: Vec<_> = info
                .info(i)
                .used_registers()
                .iter()
                .filter(|r| !matches!(r.access(), iced_x86::OpAccess::Read | iced_x86::OpAccess::CondRead))
                .map(|r| r.register().full_register())
                .collect();
            held.retain(|r| !written.contains(r));
            if i.flow_control() != iced_x86::FlowControl::Next {
                held.clear();
            }
            if loads_slot {
                held.push(i.op0_register().full_register());
            }
        });
    }
}

struct Found {
    access: MemAccess,
    target: Target,
    why: BTreeMap<Source, String>,
}

/// The annotations file a build derives from a profile alone (`gcc --annotations PROFILE`):
/// every source over the image the profile traced, written once beside the profile as
/// `NAME.annotations.json` and reused while it is newer than the profile and the image. The
/// image must not be the build's own output (it is read while the build runs). `text` is the
/// profile as read from `path` (read once per `as`: only its head is parsed while the derived
/// file is fresh).
pub fn annotations_from_profile(path: &std::path::Path, text: &[u8], head: profile::Head) -> Result<Vec<u8>> {
    let image = head.image.ok_or_else(|| {
        anyhow!("{}: the profile names no image (record it again with `previrt run --profile`)", path.display())
    })?;
    let derived = path.with_extension("annotations.json");
    let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(d), Some(p), Some(i)) = (mtime(&derived), mtime(path), mtime(&image)) {
        if d >= p && d >= i {
            return std::fs::read(&derived).map_err(|e| anyhow!("cannot read {}: {e}", derived.display()));
        }
    }
    let profile = Profile::parse(text, path)?;
    let data =
        std::fs::read(&image).map_err(|e| anyhow!("cannot read {} (the profile's image): {e}", image.display()))?;
    let ann = analyse(&data, &image.display().to_string(), &Options::default(), Some(&profile))?;
    let json = serde_json::to_vec_pretty(&ann)?;
    // Concurrent compilers may both derive it; each write is atomic and the results equal.
    previrt_atomic_write::write(&derived, &json).map_err(|e| anyhow!("cannot write {}: {e}", derived.display()))?;
    Ok(json)
}

/// Find the MMIO and page-table accesses of the linked image `data` (vmlinux, the example
/// kernel) from the rules, its DWARF and, when given, a profile of a run.
pub fn analyse(data: &[u8], image_name: &str, opts: &Options, profile: Option<&Profile>) -> Result<Annotations> {
    let file = object::File::parse(data).map_err(|e| anyhow!("{image_name}: not an ELF file: {e}"))?;
    if !matches!(file.kind(), object::ObjectKind::Executable | object::ObjectKind::Relocatable) {
        return Err(anyhow!("{image_name}: neither a linked image nor a relocatable object"));
    }
    let img = Image::read(&file);
    let dbg = DebugInfo::read(&file, &opts.pt_types)?;
    let mut found: BTreeMap<u64, Found> = BTreeMap::new();
    let mut add = |a: MemAccess, target: Target, src: Source, why: String| {
        let f = found.entry(a.addr).or_insert_with(|| Found { access: a, target, why: BTreeMap::new() });
        f.why.entry(src).or_insert(why);
    };
    // Rules: accessor bodies, out of line (symbols) and inlined (DWARF scopes).
    let named = img.functions.iter().map(|(b, e, n)| (n.as_str(), vec![(*b, *e)]));
    let inlined = dbg.scopes.iter().map(|s| (s.name.as_str(), s.ranges.clone()));
    for (name, ranges) in named.chain(inlined) {
        let Some(target) = rules::lookup(name) else { continue };
        for (b, e) in ranges {
            let Some(bytes) = img.bytes(b, e) else { continue };
            insn::accesses_in(bytes, b, |a| {
                if target == Target::PageTable || !img.names_own_memory(&a) {
                    add(a, target, Source::Rules, name.to_string())
                }
            });
        }
    }
    // Rules: accesses naming a page table by its symbol.
    if !img.pt_objects.is_empty() {
        for &(b, e, _) in &img.functions {
            let Some(bytes) = img.bytes(b, e) else { continue };
            insn::accesses_in(bytes, b, |a| {
                if let Some(name) = img.pt_object(&a).map(str::to_string) {
                    add(a, Target::PageTable, Source::Rules, name)
                }
            });
        }
    }
    // DWARF: accesses based on a register that holds a typed pointer there.
    for p in dbg.pointers.iter().filter(|p| p.target == Target::PageTable || !rules::plain_volatile(&p.scope, &p.name))
    {
        let mut each = |a: MemAccess| {
            if p.target == Target::PageTable || a.plain_move() {
                add(a, p.target, Source::Dwarf, p.name.clone())
            }
        };
        match p.place {
            Place::Reg(reg) => img.accesses_in(p.begin, p.end, |a| {
                if a.instr.memory_base().full_register() == reg {
                    each(a)
                }
            }),
            Place::Frame(off) => img.through_slot(&dbg, p.begin, p.end, off, each),
        }
    }
    // Profile: every traced RIP that is a 64-bit memory access in this image.
    let mut skipped = Vec::new();
    for (t, access) in profile.map(|p| img.traced(p)).into_iter().flatten() {
        let target = if t.kind.starts_with("mmio") { Target::Mmio } else { Target::PageTable };
        match access {
            // A read-modify-write is traced once per direction; the site takes the write.
            Ok(a) => add(a, target, Source::Profile, format!("{} times", t.count)),
            Err(reason) => skipped.push(Skipped { rip: t.rip, kind: t.kind.clone(), reason }),
        }
    }
    skipped.sort_by_key(|s| s.rip);
    skipped.dedup_by_key(|s| s.rip);
    let mut counts = BTreeMap::new();
    let accesses: Vec<Access> = found
        .into_values()
        .map(|f| {
            let (file, line) =
                dbg.line(f.access.addr).map(|(f, l)| (Some(f.to_string()), Some(l))).unwrap_or((None, None));
            for s in f.why.keys() {
                *counts.entry(*s).or_insert(0) += 1;
            }
            Access {
                address: f.access.addr,
                insn_len: f.access.len,
                insn: f.access.text(),
                file,
                line,
                function: img.function(f.access.addr).map(str::to_string),
                kind: f.access.kind(f.target).name(),
                width: f.access.width,
                sources: f.why.keys().copied().collect(),
                why: f.why,
            }
        })
        .collect();
    Ok(Annotations {
        format: FORMAT,
        image: image_name.to_string(),
        debug_info: dbg.has_lines(),
        found: counts,
        accesses,
        profile_skipped: skipped,
    })
}

/// The ground truth a score compares with: one run's trace of an image (`previrt run
/// --profile`). It may be the profile the annotations were made with — then the `profile`
/// source is complete by construction — or another run (`--reference`), which tells how well
/// each source, the profile included, covers accesses it was not made from.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Traced instructions that can be sites, with how many of their executions touched MMIO
    /// or a linked page table (a read-modify-write counts once).
    traced: BTreeMap<u64, u64>,
    /// Times each RIP was about to execute in that run.
    executed: HashMap<u64, u64>,
}

impl Reference {
    /// The sites `profile` traced in the linked image `data`.
    pub fn of(data: &[u8], image_name: &str, profile: &Profile) -> Result<Reference> {
        let file = object::File::parse(data).map_err(|e| anyhow!("{image_name}: not an ELF file: {e}"))?;
        let img = Image::read(&file);
        // Per RIP and direction, then the larger direction: a read-modify-write is one execution.
        let mut per_dir: BTreeMap<u64, [u64; 2]> = BTreeMap::new();
        for (t, a) in img.traced(profile) {
            if let Ok(a) = a {
                per_dir.entry(a.addr).or_default()[t.write as usize] += t.count;
            }
        }
        let traced = per_dir.into_iter().map(|(rip, [r, w])| (rip, r.max(w))).collect();
        Ok(Reference { traced, executed: profile.executed() })
    }
}

/// One source (or several together) scored against a reference trace.
#[derive(Debug, Clone, Serialize)]
pub struct SourceScore {
    pub source: String,
    pub found: usize,
    /// Found and traced.
    pub true_sites: usize,
    /// Found, executed in the run, never touched MMIO or a page table: false sites.
    pub false_sites: Vec<FalseSite>,
    /// Found but never executed in the run (the profile cannot tell).
    pub not_executed: usize,
    /// Traced but not found.
    pub missed: Vec<u64>,
    pub recall: f64,
    pub precision: f64,
    /// Executions of the found sites in the run, and how many of them touched neither MMIO
    /// nor a linked page table: each is a trip through the runtime for nothing under a
    /// routing backend — the measure of a site in a hot path.
    pub site_executions: u64,
    pub wasted_executions: u64,
    /// The sites with the most wasted executions (at most 5), largest first.
    pub hottest: Vec<HotSite>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FalseSite {
    pub address: u64,
    pub function: Option<String>,
    pub executed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HotSite {
    pub address: u64,
    pub function: Option<String>,
    pub executed: u64,
    /// Executions that touched MMIO or a linked page table.
    pub traced: u64,
}

/// The scores of each source and their unions against the reference's traced set.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    /// Distinct traced instructions that can be sites (64-bit memory accesses).
    pub traced: usize,
    pub sources: Vec<SourceScore>,
}

/// The groups scored: each source alone, the static ones together, all three.
const GROUPS: [(&str, &[Source]); 5] = [
    ("rules", &[Source::Rules]),
    ("dwarf", &[Source::Dwarf]),
    ("profile", &[Source::Profile]),
    ("rules+dwarf", &[Source::Rules, Source::Dwarf]),
    ("all", &[Source::Rules, Source::Dwarf, Source::Profile]),
];

pub fn score(ann: &Annotations, reference: &Reference) -> Score {
    let traced = &reference.traced;
    let executed = |a: &Access| reference.executed.get(&a.address).copied().unwrap_or(0);
    let sources = GROUPS
        .iter()
        .map(|(name, srcs)| {
            let found: Vec<&Access> =
                ann.accesses.iter().filter(|a| srcs.iter().any(|s| a.sources.contains(s))).collect();
            let hit: BTreeSet<u64> = found.iter().map(|a| a.address).filter(|a| traced.contains_key(a)).collect();
            let false_sites: Vec<FalseSite> = found
                .iter()
                .filter(|a| !traced.contains_key(&a.address) && executed(a) > 0)
                .map(|a| FalseSite { address: a.address, function: a.function.clone(), executed: executed(a) })
                .collect();
            let mut hottest: Vec<HotSite> = found
                .iter()
                .map(|a| HotSite {
                    address: a.address,
                    function: a.function.clone(),
                    executed: executed(a),
                    traced: traced.get(&a.address).copied().unwrap_or(0).min(executed(a)),
                })
                .collect();
            hottest.sort_by_key(|h| std::cmp::Reverse(h.executed - h.traced));
            let site_executions = hottest.iter().map(|h| h.executed).sum();
            let wasted_executions = hottest.iter().map(|h| h.executed - h.traced).sum();
            hottest.retain(|h| h.executed > h.traced);
            hottest.truncate(5);
            let ratio = |n: usize, d: usize| if d == 0 { 1.0 } else { n as f64 / d as f64 };
            SourceScore {
                source: name.to_string(),
                found: found.len(),
                true_sites: hit.len(),
                recall: ratio(hit.len(), traced.len()),
                precision: ratio(hit.len(), hit.len() + false_sites.len()),
                not_executed: found.len() - hit.len() - false_sites.len(),
                false_sites,
                missed: traced.keys().filter(|a| !hit.contains(a)).copied().collect(),
                site_executions,
                wasted_executions,
                hottest,
            }
        })
        .collect();
    Score { traced: traced.len(), sources }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A location-list range that starts on a call's last byte (GCC's convention for a value
    /// that changes across the call) still yields the accesses of the instructions after it,
    /// not of a decode out of step.
    #[test]
    fn ranges_starting_inside_an_instruction_decode_from_the_function() {
        // call .+5; testb $1,(%rbp); mov %rax,(%rbx); ret
        let code: &[u8] = &[0xe8, 0, 0, 0, 0, 0xf6, 0x45, 0x00, 0x01, 0x48, 0x89, 0x03, 0xc3];
        let base = 0x1000;
        let img = Image {
            code: vec![(base, code)],
            alloc: vec![],
            functions: vec![(base, base + code.len() as u64, "f".into())],
            pt_objects: vec![],
        };
        let mut got = Vec::new();
        img.accesses_in(base + 4, base + code.len() as u64, |a| got.push((a.addr, a.text())));
        assert_eq!(got, [(base + 5, "testb $1,(%rbp)".to_string()), (base + 9, "mov %rax,(%rbx)".to_string())]);
        let mut raw = Vec::new();
        insn::accesses_in(&code[4..], base + 4, |a| raw.push(a.addr));
        assert!(!raw.contains(&(base + 5)), "decoding from the range start is out of step: {raw:x?}");
    }

    /// A pointer spilled to the stack (`DW_OP_fbreg -8`, CFA = `%rsp + 0x18`): the access
    /// through the register it is loaded into counts, until that register is overwritten.
    #[test]
    fn a_pointer_in_a_stack_slot_is_followed_into_its_register() {
        // mov 0x10(%rsp),%rax; mov (%rax),%rdi; mov (%rsp),%rax; mov (%rax),%rdx; ret
        let code: &[u8] =
            &[0x48, 0x8b, 0x44, 0x24, 0x10, 0x48, 0x8b, 0x38, 0x48, 0x8b, 0x04, 0x24, 0x48, 0x8b, 0x10, 0xc3];
        let base = 0x1000;
        let end = base + code.len() as u64;
        let img = Image {
            code: vec![(base, code)],
            alloc: vec![],
            functions: vec![(base, end, "f".into())],
            pt_objects: vec![],
        };
        let dbg = DebugInfo::with_cfa(vec![(base, end, 0x18)]);
        let mut got = Vec::new();
        img.through_slot(&dbg, base, end, -8, |a| got.push(a.addr));
        assert_eq!(got, [base + 5]);
    }

    /// `init_top_pgt[i]` (Linux's init_mem_mapping): the displacement is the table's address.
    #[test]
    fn an_indexed_global_names_its_array() {
        let code: &[u8] = &[0x48, 0x8b, 0x04, 0xc5, 0x00, 0xd0, 0x81, 0x81, 0x48, 0x8b, 0x04, 0xc0];
        let mut got = Vec::new();
        insn::accesses_in(code, 0x1000, |a| got.push((a.static_address(), a.array_base())));
        assert_eq!(got, [(None, Some(0xffff_ffff_8181_d000)), (None, None)]);
    }
}
