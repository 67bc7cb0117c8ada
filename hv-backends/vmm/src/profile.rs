//! `previrt run --profile FILE`: the hypervisor's own trace of every guest memory access that
//! touches MMIO or a page-table page, by RIP — the ground truth `previrt annotate` maps back to
//! source lines and scores its static sources against.
//!
//! Why single-stepping to see every access: the LAPIC is emulated in the kernel (its accesses
//! never exit to user space), a read-only memslot catches writes only, and a page-table page
//! removed from the memslots breaks the host's own page walk. So the vCPU runs with
//! `KVM_GUESTDBG_SINGLESTEP`; at each step the VMM decodes the instruction
//! about to execute, computes its memory operands from the live registers, translates them
//! through the guest's page tables and counts `(rip, page, direction, width, kind)`.
//!
//! Each access is classified when it happens: a page is a page-table page only while it is
//! reachable from a root the guest has loaded in CR3 (the set is kept up to date: recomputed on
//! CR3 loads and when a write to an upper-level table unlinks a table; a newly linked table's
//! subtree is added). So zeroing a page that only later becomes a table, or reusing a freed
//! table page for other data, is not page-table traffic. MMIO is any guest-physical address
//! outside RAM.
//!
//! `--profile-writes` is the fast tracer: no single-stepping; every page-table page is mapped
//! read-only to the guest (its own `KVM_MEM_READONLY` memslot), so only stores into page
//! tables exit, as MMIO writes the VMM completes in guest memory. Measured on KVM-PVM: such an
//! exit costs about twice a port write, loads through read-only slots and the host's page walk
//! of tables in them work, so the whole boot runs at emulation speed. It sees only `pt_write`:
//! loads never exit, LAPIC MMIO is completed in the host kernel, and a page in no memslot (to
//! make loads exit too) breaks the host's walk of a table there (triple fault). At an exit the
//! RIP is already past the store (`after`: the instruction ending there), and CR3 loads are
//! seen only at the next exit of any kind (a store into a new root's tables before it is missed).
//!
//! Output (`previrt-profile/1`, JSON): `{"format", "mode", "steps", "pt_pages", "accesses": [{"rip",
//! "gpa", "width", "write", "code64", "kind", "count", "after"}], "executed": [[rip, count], …]}` with `kind` one
//! of `mmio_read`, `mmio_write`, `pt_read`, `pt_write`; documented in docs/annotations.md.

use std::collections::{HashMap, HashSet};

use iced_x86::{InstructionInfoFactory, OpAccess, Register};
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::emulate;

pub const FORMAT: &str = "previrt-profile/1";
const PAGE: u64 = 0x1000;
/// The write-protect tracer's memslot granularity (see `relayout`).
const CHUNK: u64 = 0x20_0000;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    rip: u64,
    page: u64,
    write: bool,
    width: u8,
    /// Executed as 64-bit code (16/32-bit code, e.g. a boot trampoline, cannot hold sites).
    code64: bool,
    /// What the page was when the access happened.
    kind: &'static str,
    /// `rip` is the address after the instruction (the write-protect tracer sees the store
    /// complete).
    after: bool,
}

/// Guest RAM as the write-protect tracer maps it: `(gpa, size, read-only)`, one per memslot.
type Range = (u64, u64, bool);

/// The trace being collected during one run.
pub struct Profile {
    ram_end: u64,
    steps: u64,
    /// `--profile-steps`: trace only this many instructions, then stop the run.
    window: Option<u64>,
    /// Times each RIP was about to execute: tells an annotation that never touched MMIO or a
    /// page table on an executed path (a false site) from one on a path the run never took.
    executed: HashMap<u64, u64>,
    /// Count and first guest-physical address per access key.
    seen: HashMap<Key, (u64, u64)>,
    /// Every root the guest has loaded in CR3.
    roots: Vec<u64>,
    /// Page-table pages linked now, with their level (4 = PML4 … 1 = PT).
    tables: HashMap<u64, u8>,
    /// Pages that were page-table pages at some time (the profile's `pt_pages`).
    ever: HashSet<u64>,
    cr3: u64,
    /// Upper-level entries about to be written: `(entry gpa, table level, value before,
    /// step)`. The new table is walked once the value changes — not at the next step, since
    /// an interrupt may be delivered before the write executes.
    pending: Vec<(u64, u8, u64, u64)>,
    info: InstructionInfoFactory,
    /// `--profile-writes`: the host address of guest-physical 0 and the memslots now in place
    /// (None: single-stepping).
    protect: Option<(u64, Vec<(Range, u32)>)>,
}

impl Profile {
    /// `window`: trace only the first N instructions (a window of a run too long to
    /// single-step whole, e.g. Linux's boot); the run stops there and the profile is written.
    pub fn new(ram_end: u64, window: Option<u64>) -> Profile {
        Profile::with(ram_end, window, None)
    }

    /// The write-protect tracer over guest RAM `[0, ram_end)` mapped at host address `host`,
    /// which the VMM has registered as memslot 0 (replaced here as tables come and go).
    pub fn writes(ram_end: u64, host: u64) -> Profile {
        Profile::with(ram_end, None, Some((host, vec![((0, ram_end, false), 0)])))
    }

    /// Whether this is the single-stepping tracer (not the write-protect one).
    pub fn single_steps(&self) -> bool {
        self.protect.is_none()
    }

    /// Whether the vCPU must be single-stepped now: always for the stepping tracer; for the
    /// write-protect tracer until the guest first runs with paging on, so the first root it
    /// loads (Linux's PVH entry: `init_top_pgt`, left again within microseconds) is seen.
    pub fn wants_steps(&self) -> bool {
        self.single_steps() || self.roots.is_empty()
    }

    fn with(ram_end: u64, window: Option<u64>, protect: Option<(u64, Vec<(Range, u32)>)>) -> Profile {
        Profile {
            protect,
            ram_end,
            steps: 0,
            window,
            executed: HashMap::new(),
            seen: HashMap::new(),
            roots: Vec::new(),
            tables: HashMap::new(),
            ever: HashSet::new(),
            cr3: u64::MAX,
            pending: Vec::new(),
            info: InstructionInfoFactory::new(),
        }
    }

    /// The bounded window is traced: the run should stop.
    pub fn window_done(&self) -> Option<u64> {
        self.window.filter(|&w| self.steps >= w)
    }

    /// One single-step exit: record the memory accesses of the instruction about to execute.
    pub fn step(&mut self, mem: &GuestMemoryMmap, regs: &kvm_regs, sregs: &kvm_sregs) {
        if !self.single_steps() {
            return; // the write-protect tracer looks at CR3 before each entry
        }
        self.steps += 1;
        if let Some(root) = self.cr3_load(sregs) {
            if !self.roots.contains(&root) {
                self.roots.push(root);
            }
            self.recompute(mem);
        }
        self.follow_pending(mem);
        let Ok(f) = emulate::fetch(mem, regs, sregs) else { return };
        *self.executed.entry(f.rip).or_default() += 1;
        let bits64 = code64(sregs);
        let used = self.info.info(&f.insn).used_memory().to_vec();
        let mut found = Vec::new();
        for m in &used {
            let (read, write) = match m.access() {
                OpAccess::Read | OpAccess::CondRead => (true, false),
                OpAccess::Write | OpAccess::CondWrite => (false, true),
                OpAccess::ReadWrite | OpAccess::ReadCondWrite => (true, true),
                _ => continue,
            };
            let Some(la) = m.virtual_address(0, |r, _, _| reg_value(regs, sregs, bits64, r)) else { continue };
            let Some(gpa) = emulate::translate(mem, sregs, la) else { continue };
            let width = m.memory_size().size().min(255) as u8;
            let page = gpa & !(PAGE - 1);
            for (dir, on) in [(false, read), (true, write)] {
                if let Some(kind) = self.kind(page, dir).filter(|_| on) {
                    found.push((Key { rip: f.rip, page, write: dir, width, code64: bits64, kind, after: false }, gpa));
                }
            }
        }
        for (k, gpa) in found {
            // A write to an upper-level table may link a new table.
            if let Some(&level) = self.tables.get(&k.page).filter(|&&l| k.write && l > 1) {
                let entry = gpa & !7;
                let old = mem.read_obj::<u64>(GuestAddress(entry)).unwrap_or(0);
                self.pending.push((entry, level, old, self.steps));
            }
            self.seen.entry(k).or_insert((0, gpa)).0 += 1;
        }
    }

    /// Write-protect tracer, at every exit: a root loaded since the last exit is added.
    pub fn observe(&mut self, vm: &VmFd, mem: &GuestMemoryMmap, sregs: &kvm_sregs) -> Result<(), String> {
        match self.cr3_load(sregs) {
            Some(root) if !self.roots.contains(&root) => {
                self.roots.push(root);
                self.walk(mem, root, 4);
                self.relayout(vm)
            }
            _ => Ok(()),
        }
    }

    /// The root CR3 names if it changed since the last look (long mode with paging on);
    /// [`Self::step`] adds it to the roots and recomputes, the write-protect tracer only adds
    /// a new one (its set follows every store into a table).
    fn cr3_load(&mut self, sregs: &kvm_sregs) -> Option<u64> {
        let long_paging = sregs.cr0 & CR0_PG != 0 && sregs.efer & EFER_LMA != 0;
        if !long_paging || sregs.cr3 == self.cr3 {
            return None;
        }
        self.cr3 = sregs.cr3;
        Some(sregs.cr3 & ADDR_MASK)
    }

    /// Write-protect tracer: when to look at CR3 again if no exit comes by itself. CR3 loads
    /// do not exit, so a kick bounds how long a new root's tables go unprotected (~1 ms of
    /// guest time) at the cost of one exit per period.
    pub fn next_look(&self) -> Option<std::time::Instant> {
        const LOOK: std::time::Duration = std::time::Duration::from_millis(1);
        self.protect.is_some().then(|| std::time::Instant::now() + LOOK)
    }

    /// Whether a write exit at `gpa` is a store into a write-protected table page.
    pub fn protects(&self, gpa: u64) -> bool {
        self.protect.is_some() && gpa < self.ram_end && self.tables.contains_key(&(gpa & !(PAGE - 1)))
    }

    /// Write-protect tracer: a guest store of `data` at `gpa` ([`Self::protects`]) exited.
    /// Complete it in guest memory, count it, and follow what it linked or unlinked.
    pub fn write_exit(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
        gpa: u64,
        data: &[u8],
    ) -> Result<(), String> {
        self.steps += 1;
        let page = gpa & !(PAGE - 1);
        let entry = gpa & !7;
        let old = mem.read_obj::<u64>(GuestAddress(entry)).unwrap_or(0);
        mem.write_slice(data, GuestAddress(gpa)).map_err(|e| format!("profile: store at {gpa:#x}: {e}"))?;
        // A `rep` string store exits per element with RIP still on it; anything else has
        // completed and RIP is past it.
        let string =
            emulate::fetch(mem, regs, sregs).is_ok_and(|f| f.insn.has_rep_prefix() && f.insn.is_string_instruction());
        let key = Key {
            rip: regs.rip,
            page,
            write: true,
            width: data.len() as u8,
            code64: code64(sregs),
            kind: "pt_write",
            after: !string,
        };
        self.seen.entry(key).or_insert((0, gpa)).0 += 1;
        let level = self.tables[&page];
        if level > 1 {
            self.pending.push((entry, level, old, self.steps));
            self.follow_pending(mem);
            self.pending.clear();
        }
        self.relayout(vm)
    }

    /// Give every table page a read-only memslot and the rest of RAM read-write ones. KVM
    /// cannot flip a slot's read-only flag and slots may not overlap, so the ranges that
    /// changed are deleted first, then the new ones created in free slot numbers; each change
    /// costs the host a memslot update (the vCPU is out of the guest here).
    fn relayout(&mut self, vm: &VmFd) -> Result<(), String> {
        let Some((host, old)) = self.protect.take() else { return Ok(()) };
        let want = layout(self.tables.keys().copied(), self.ram_end);
        let set = |slot: u32, (gpa, size, ro): Range| {
            let r = kvm_userspace_memory_region {
                slot,
                flags: if ro { KVM_MEM_READONLY } else { 0 },
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host + gpa,
            };
            // SAFETY: every slot lies inside the guest memory the VMM owns for the VM's life
            // (size 0 deletes).
            unsafe { vm.set_user_memory_region(r) }.map_err(|e| format!("profile: memslot {slot} at {gpa:#x}: {e}"))
        };
        let unused = old.iter().map(|&(_, s)| s + 1).max().unwrap_or(0);
        let (kept, gone): (Vec<_>, Vec<_>) = old.into_iter().partition(|(r, _)| want.contains(r));
        for &((gpa, _, ro), slot) in &gone {
            set(slot, (gpa, 0, ro))?;
        }
        let mut free = gone.iter().map(|&(_, s)| s).chain(unused..);
        let mut now = kept;
        for r in want.into_iter().filter(|r| !now.iter().any(|(k, _)| k == r)).collect::<Vec<_>>() {
            let slot = free.next().expect("slot numbers are unbounded");
            set(slot, r)?;
            now.push((r, slot));
        }
        self.protect = Some((host, now));
        Ok(())
    }

    /// Apply pending upper-level writes once their entry changed: a table unlinked (or
    /// re-pointed) means recomputing the set, a table linked where none was means walking it;
    /// forget writes that changed nothing for a while.
    fn follow_pending(&mut self, mem: &GuestMemoryMmap) {
        const PATIENCE: u64 = 10_000;
        let pending = std::mem::take(&mut self.pending);
        let mut unlinked = false;
        for (entry, level, old, at) in pending {
            let now = mem.read_obj::<u64>(GuestAddress(entry)).unwrap_or(old);
            if now == old {
                if self.steps - at < PATIENCE {
                    self.pending.push((entry, level, old, at));
                }
                continue;
            }
            match (self.link(old, level), self.link(now, level)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(_), _) => unlinked = true,
                (None, Some(next)) => self.walk(mem, next, level - 1),
                (None, None) => {}
            }
        }
        if unlinked {
            self.recompute(mem);
        }
    }

    /// The table an entry of a `level` table links, if any (not a large page, inside RAM).
    fn link(&self, entry: u64, level: u8) -> Option<u64> {
        let next = entry & ADDR_MASK;
        (level > 1 && entry & PTE_P != 0 && (level == 4 || entry & PTE_PS == 0) && next < self.ram_end).then_some(next)
    }

    /// The page-table set from scratch: every table reachable from a loaded root.
    fn recompute(&mut self, mem: &GuestMemoryMmap) {
        self.tables.clear();
        for root in self.roots.clone() {
            self.walk(mem, root, 4);
        }
    }

    /// Add `table` (at `level`) and the tables below it; a table already in the set has been
    /// walked.
    fn walk(&mut self, mem: &GuestMemoryMmap, table: u64, level: u8) {
        if self.tables.insert(table, level).is_some() {
            return;
        }
        self.ever.insert(table);
        if level == 1 {
            return;
        }
        for i in 0..512 {
            let Ok(e) = mem.read_obj::<u64>(GuestAddress(table + i * 8)) else { return };
            if let Some(next) = self.link(e, level) {
                self.walk(mem, next, level - 1);
            }
        }
    }

    /// An access's kind from what its page is now; `None`: neither MMIO nor a linked table.
    fn kind(&self, page: u64, write: bool) -> Option<&'static str> {
        const KINDS: [[&str; 2]; 2] = [["pt_read", "pt_write"], ["mmio_read", "mmio_write"]];
        let mmio = page >= self.ram_end;
        (mmio || self.tables.contains_key(&page)).then(|| KINDS[mmio as usize][write as usize])
    }

    /// The trace as `previrt-profile/1` JSON, accesses sorted by RIP.
    /// The profile file's JSON; `image` is the traced kernel (its absolute path), so a build
    /// can derive annotations from the profile alone (docs/annotations.md).
    pub fn to_json(&self, image: &std::path::Path) -> serde_json::Value {
        let mut rows: Vec<_> = self.seen.iter().collect();
        rows.sort_by_key(|(k, &(_, gpa))| (k.rip, k.write, gpa, k.kind));
        let accesses: Vec<_> = rows
            .iter()
            .map(|(k, (n, gpa))| {
                serde_json::json!({"rip": k.rip, "gpa": gpa, "width": k.width, "write": k.write, "code64": k.code64, "kind": k.kind, "count": n, "after": k.after})
            })
            .collect();
        let mut executed: Vec<_> = self.executed.iter().map(|(&rip, &n)| [rip, n]).collect();
        executed.sort_unstable();
        let image = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
        let mode = if self.single_steps() { "step" } else { "writes" };
        serde_json::json!({"format": FORMAT, "mode": mode, "image": image, "steps": self.steps, "pt_pages": self.ever.len(),
            "accesses": accesses, "executed": executed})
    }
}

/// Guest RAM `[0, ram_end)` as memslot ranges: each run of table pages read-only, the rest
/// read-write, none crossing a 2 MiB boundary. Deleting a slot costs in proportion to its size
/// (up to 0.5 s for all of RAM here): with 2 MiB chunks a change touches one chunk.
fn layout(tables: impl Iterator<Item = u64>, ram_end: u64) -> Vec<Range> {
    let mut pages: Vec<u64> = tables.filter(|&p| p < ram_end).collect();
    pages.sort_unstable();
    let mut want: Vec<Range> = Vec::new();
    let mut at = 0;
    for p in pages {
        if p > at {
            want.push((at, p - at, false));
        }
        match want.last_mut() {
            Some(last) if last.2 && last.0 + last.1 == p => last.1 += PAGE,
            _ => want.push((p, PAGE, true)),
        }
        at = p + PAGE;
    }
    if at < ram_end {
        want.push((at, ram_end - at, false));
    }
    want.into_iter()
        .flat_map(|(gpa, size, ro)| {
            let cuts = (gpa.next_multiple_of(CHUNK)..gpa + size).step_by(CHUNK as usize).filter(|&a| a > gpa);
            let edges: Vec<u64> = std::iter::once(gpa).chain(cuts).chain(std::iter::once(gpa + size)).collect();
            edges.windows(2).map(|w| (w[0], w[1] - w[0], ro)).collect::<Vec<_>>()
        })
        .collect()
}

/// Whether the guest runs 64-bit code.
fn code64(sregs: &kvm_sregs) -> bool {
    sregs.cs.l == 1 && sregs.efer & EFER_LMA != 0
}

/// A register's value for address computation; segment registers give their base (only FS
/// and GS have one in 64-bit mode).
fn reg_value(regs: &kvm_regs, sregs: &kvm_sregs, bits64: bool, r: Register) -> Option<u64> {
    use Register::*;
    if r.is_segment_register() {
        let base = match r {
            FS => sregs.fs.base,
            GS => sregs.gs.base,
            _ if bits64 => 0,
            ES => sregs.es.base,
            CS => sregs.cs.base,
            SS => sregs.ss.base,
            _ => sregs.ds.base,
        };
        return Some(base);
    }
    let full = match r.full_register() {
        RAX => regs.rax,
        RCX => regs.rcx,
        RDX => regs.rdx,
        RBX => regs.rbx,
        RSP => regs.rsp,
        RBP => regs.rbp,
        RSI => regs.rsi,
        RDI => regs.rdi,
        R8 => regs.r8,
        R9 => regs.r9,
        R10 => regs.r10,
        R11 => regs.r11,
        R12 => regs.r12,
        R13 => regs.r13,
        R14 => regs.r14,
        R15 => regs.r15,
        _ => return Option::None, // `None` is a Register here
    };
    let bits = r.size() as u32 * 8;
    Some(if bits >= 64 { full } else { full & ((1u64 << bits) - 1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page is a page-table page only while linked: a table filled before its link is
    /// plain memory, linking adds its subtree, unlinking removes it.
    #[test]
    fn tables_are_the_pages_linked_now() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (root, pdpt, pd) = (0x1000u64, 0x2000u64, 0x3000u64);
        let mut p = Profile::new(0x10_0000, None);
        p.roots.push(root);
        p.recompute(&mem);
        mem.write_obj(pd | 3, GuestAddress(pdpt + 8)).unwrap(); // pdpt is not linked yet
        assert_eq!(p.kind(pdpt, true), None);
        assert_eq!(p.kind(root, true), Some("pt_write"));
        assert_eq!(p.kind(0x20_0000, false), Some("mmio_read"));

        // The root's entry 0 about to be written (as `step` records it), then written.
        p.pending.push((root, 4, 0, p.steps));
        mem.write_obj(pdpt | 3, GuestAddress(root)).unwrap();
        p.follow_pending(&mem);
        assert_eq!((p.tables.get(&pdpt), p.tables.get(&pd)), (Some(&3), Some(&2)));

        p.pending.push((root, 4, pdpt | 3, p.steps));
        mem.write_obj(0u64, GuestAddress(root)).unwrap();
        p.follow_pending(&mem);
        assert_eq!(p.kind(pdpt, false), None);
        assert_eq!(p.kind(pd, false), None);
        assert_eq!(p.ever.len(), 3);
    }

    /// The write-protect tracer's memslots: runs of table pages read-only, the rest
    /// read-write, cut at 2 MiB, covering RAM exactly.
    #[test]
    fn layout_protects_table_pages_in_2mib_chunks() {
        let l = layout([0x3000, 0x1000, 0x2000, 0x20_1000].into_iter(), 0x40_0000);
        assert_eq!(
            l,
            [
                (0, 0x1000, false),
                (0x1000, 0x3000, true),
                (0x4000, 0x1f_c000, false),
                (0x20_0000, 0x1000, false),
                (0x20_1000, 0x1000, true),
                (0x20_2000, 0x1f_e000, false),
            ]
        );
        assert_eq!(
            layout(std::iter::empty(), 0x50_0000),
            [(0, CHUNK, false), (CHUNK, CHUNK, false), (2 * CHUNK, 0x10_0000, false)]
        );
    }
}
