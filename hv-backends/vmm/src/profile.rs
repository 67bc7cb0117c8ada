//! `previrt run --profile FILE`: the hypervisor's own trace of every guest memory access that
//! touches MMIO or a page-table page, by RIP — the ground truth `previrt annotate` maps back to
//! source lines and scores its static sources against.
//!
//! Why single-stepping rather than write-protecting or unmapping pages: the LAPIC is emulated
//! in the kernel (its accesses never exit to user space), a read-only memslot catches writes
//! only, and a page-table page removed from the memslots breaks the host's own page walk. So
//! the vCPU runs with `KVM_GUESTDBG_SINGLESTEP`; at each step the VMM decodes the instruction
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
//! Output (`previrt-profile/1`, JSON): `{"format", "steps", "pt_pages", "accesses": [{"rip",
//! "gpa", "width", "write", "code64", "kind", "count"}], "executed": [[rip, count], …]}` with `kind` one
//! of `mmio_read`, `mmio_write`, `pt_read`, `pt_write`; documented in docs/annotations.md.

use std::collections::{HashMap, HashSet};

use iced_x86::{InstructionInfoFactory, OpAccess, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::emulate;

pub const FORMAT: &str = "previrt-profile/1";
const PAGE: u64 = 0x1000;
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
}

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
}

impl Profile {
    /// `window`: trace only the first N instructions (a window of a run too long to
    /// single-step whole, e.g. Linux's boot); the run stops there and the profile is written.
    pub fn new(ram_end: u64, window: Option<u64>) -> Profile {
        Profile {
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
        self.steps += 1;
        let long_paging = sregs.cr0 & CR0_PG != 0 && sregs.efer & EFER_LMA != 0;
        if long_paging && sregs.cr3 != self.cr3 {
            self.cr3 = sregs.cr3;
            let root = sregs.cr3 & ADDR_MASK;
            if !self.roots.contains(&root) {
                self.roots.push(root);
            }
            self.recompute(mem);
        }
        self.follow_pending(mem);
        let Ok(f) = emulate::fetch(mem, regs, sregs) else { return };
        *self.executed.entry(f.rip).or_default() += 1;
        let bits64 = sregs.cs.l == 1 && sregs.efer & EFER_LMA != 0;
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
                    found.push((Key { rip: f.rip, page, write: dir, width, code64: bits64, kind }, gpa));
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
                serde_json::json!({"rip": k.rip, "gpa": gpa, "width": k.width, "write": k.write, "code64": k.code64, "kind": k.kind, "count": n})
            })
            .collect();
        let mut executed: Vec<_> = self.executed.iter().map(|(&rip, &n)| [rip, n]).collect();
        executed.sort_unstable();
        let image = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
        serde_json::json!({"format": FORMAT, "image": image, "steps": self.steps, "pt_pages": self.ever.len(),
            "accesses": accesses, "executed": executed})
    }
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
}
