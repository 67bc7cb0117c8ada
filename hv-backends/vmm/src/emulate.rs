//! Completing instructions the host's in-kernel emulator gives up on.
//!
//! KVM-PVM instruction-emulates ring-0 guests and fails on some instructions
//! (KVM_EXIT_INTERNAL_ERROR, suberror KVM_INTERNAL_ERROR_EMULATION). We fetch the instruction
//! at CS:RIP through the guest's own page tables, decode it with iced-x86, and finish it when
//! we know how; otherwise the caller stops with the instruction bytes, mnemonic and RIP.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};
use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Paging modes, as (levels, bits per level, entry size, root mask).
struct Mode {
    levels: u32,
    bits: u32,
    entry: u64,
}
const PAGING_32: Mode = Mode { levels: 2, bits: 10, entry: 4 };
const PAGING_PAE: Mode = Mode { levels: 3, bits: 9, entry: 8 };
const PAGING_4: Mode = Mode { levels: 4, bits: 9, entry: 8 };
const PAGING_5: Mode = Mode { levels: 5, bits: 9, entry: 8 };

/// Translate a linear address to a guest-physical one by walking the guest's page tables.
/// Returns None when a level is not present or a table lies outside guest memory.
pub fn translate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, la: u64) -> Option<u64> {
    if sregs.cr0 & CR0_PG == 0 {
        return Some(la & 0xffff_ffff);
    }
    let mode = match (sregs.efer & EFER_LMA != 0, sregs.cr4 & CR4_PAE != 0, sregs.cr4 & CR4_LA57 != 0) {
        (true, _, true) => &PAGING_5,
        (true, _, false) => &PAGING_4,
        (false, true, _) => &PAGING_PAE,
        (false, false, _) => &PAGING_32,
    };
    let mut table = match mode.levels {
        3 => sregs.cr3 & 0xffff_ffe0,
        2 => sregs.cr3 & 0xffff_f000,
        _ => sregs.cr3 & ADDR_MASK,
    };
    for level in (0..mode.levels).rev() {
        let shift = 12 + mode.bits * level;
        // PAE's top level has 4 entries indexed by bits 31:30.
        let index = (la >> shift) & ((1 << mode.bits) - 1);
        let addr = table + index * mode.entry;
        let pte: u64 = if mode.entry == 4 {
            mem.read_obj::<u32>(GuestAddress(addr)).ok()? as u64
        } else {
            mem.read_obj::<u64>(GuestAddress(addr)).ok()?
        };
        if pte & PTE_P == 0 {
            return None;
        }
        let large = level > 0 && pte & PTE_PS != 0 && (mode.entry == 8 || sregs.cr4 & CR4_PSE != 0);
        let is_pae_root = mode.levels == 3 && level == 2;
        if large && !is_pae_root {
            let page_mask = (1u64 << shift) - 1;
            let base = if mode.entry == 4 {
                (pte & 0xffc0_0000) | ((pte >> 13) & 0xff) << 32
            } else {
                pte & ADDR_MASK & !page_mask
            };
            return Some(base | (la & page_mask));
        }
        table = if mode.entry == 4 { pte & 0xffff_f000 } else { pte & ADDR_MASK };
    }
    Some(table | (la & 0xfff))
}

/// A translator from linear to guest-physical addresses (the vCPU's page tables).
pub type Translate<'a> = &'a dyn Fn(u64) -> Option<u64>;

/// The pieces of linear range [la, la+len) as (guest-physical address, range in the buffer),
/// one per page; None for a piece whose page is not mapped.
fn pieces(la: u64, len: usize, tr: Translate<'_>) -> impl Iterator<Item = Option<(u64, std::ops::Range<usize>)>> + '_ {
    let mut done = 0;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let a = la.wrapping_add(done as u64);
        let n = (0x1000 - (a & 0xfff) as usize).min(len - done);
        let r = tr(a).map(|pa| (pa, done..done + n));
        done += n;
        Some(r)
    })
}

/// Read linear memory into `buf`; the number of leading bytes read before an unmapped page
/// or the end of guest RAM.
pub fn read_linear_with(mem: &GuestMemoryMmap, tr: Translate, la: u64, buf: &mut [u8]) -> usize {
    let mut n = 0;
    for p in pieces(la, buf.len(), tr) {
        let Some((pa, r)) = p else { break };
        if mem.read_slice(&mut buf[r.clone()], GuestAddress(pa)).is_err() {
            break;
        }
        n = r.end;
    }
    n
}

/// Write `data` to linear memory; false (possibly after a partial write) on an unmapped page.
pub fn write_linear_with(mem: &GuestMemoryMmap, tr: Translate, la: u64, data: &[u8]) -> bool {
    pieces(la, data.len(), tr).all(|p| p.is_some_and(|(pa, r)| mem.write_slice(&data[r], GuestAddress(pa)).is_ok()))
}

/// Read linear memory through the vCPU's current page tables.
pub fn read_linear(mem: &GuestMemoryMmap, sregs: &kvm_sregs, la: u64, buf: &mut [u8]) -> usize {
    read_linear_with(mem, &|a| translate(mem, sregs, a), la, buf)
}

/// The instruction at CS:RIP.
pub struct Fetched {
    pub rip: u64,
    pub bytes: Vec<u8>,
    pub insn: Instruction,
}

impl Fetched {
    /// One line naming the instruction, for error messages.
    pub fn describe(&self) -> String {
        let hex: Vec<String> = self.bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("`{}` ({:?}) bytes [{}] at RIP {:#x}", self.insn, self.insn.mnemonic(), hex.join(" "), self.rip)
    }
}

/// Fetch and decode the instruction at CS:RIP.
pub fn fetch(mem: &GuestMemoryMmap, regs: &kvm_regs, sregs: &kvm_sregs) -> Result<Fetched, String> {
    let bitness = if sregs.efer & EFER_LMA != 0 && sregs.cs.l == 1 {
        64
    } else if sregs.cs.db == 1 {
        32
    } else {
        16
    };
    let la = if bitness == 64 { regs.rip } else { sregs.cs.base.wrapping_add(regs.rip) & 0xffff_ffff };
    let mut buf = [0u8; 15];
    let n = read_linear(mem, sregs, la, &mut buf);
    if n == 0 {
        return Err(format!("instruction at RIP {:#x} (linear {la:#x}) is not mapped in guest memory", regs.rip));
    }
    let mut d = Decoder::with_ip(bitness, &buf[..n], regs.rip, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        let hex: Vec<String> = buf[..n].iter().map(|b| format!("{b:02x}")).collect();
        return Err(format!("undecodable instruction at RIP {:#x}: bytes [{}]", regs.rip, hex.join(" ")));
    }
    Ok(Fetched { rip: regs.rip, bytes: buf[..insn.len()].to_vec(), insn })
}

/// What to do to complete an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Advance RIP past it, then deliver interrupt `vector` (int n: no error code).
    Interrupt(u8),
    /// Advance RIP past it, then deliver exception `vector` (trap-like: int3, into, int1).
    Exception(u8),
    /// Advance RIP past it after setting/clearing RFLAGS bits (or, and-not).
    Flags(u64, u64),
    /// Advance RIP only.
    Skip,
}

const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_AC: u64 = 1 << 18;

/// How to complete `insn`, if we know. Tables over branches: one row per mnemonic.
pub fn completion(insn: &Instruction, rflags: u64) -> Option<Completion> {
    Some(match insn.mnemonic() {
        Mnemonic::Int => Completion::Interrupt(insn.immediate8()),
        Mnemonic::Int3 => Completion::Exception(3),
        Mnemonic::Int1 => Completion::Exception(1),
        Mnemonic::Into if rflags & RFLAGS_OF != 0 => Completion::Exception(4),
        Mnemonic::Into => Completion::Skip,
        Mnemonic::Clac => Completion::Flags(0, RFLAGS_AC),
        Mnemonic::Stac => Completion::Flags(RFLAGS_AC, 0),
        _ => return None,
    })
}

/// A 64-bit IDT gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    pub target: u64,
    pub selector: u16,
    pub ist: u8,
    /// 0xe interrupt gate (clears IF), 0xf trap gate.
    pub kind: u8,
    pub dpl: u8,
}

/// The present long-mode gate for `vector`, if any.
pub fn read_gate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, vector: u8) -> Option<Gate> {
    if sregs.efer & EFER_LMA == 0 || (sregs.idt.limit as u64) < vector as u64 * 16 + 15 {
        return None;
    }
    let mut g = [0u8; 16];
    if read_linear(mem, sregs, sregs.idt.base + vector as u64 * 16, &mut g) != 16 || g[5] & 0x80 == 0 {
        return None;
    }
    let w = |i: usize| u16::from_le_bytes([g[i], g[i + 1]]) as u64;
    Some(Gate {
        target: w(0) | w(6) << 16 | (u32::from_le_bytes(g[8..12].try_into().unwrap()) as u64) << 32,
        selector: w(2) as u16,
        ist: g[4] & 7,
        kind: g[5] & 0xf,
        dpl: (g[5] >> 5) & 3,
    })
}

const RFLAGS_IF: u64 = 1 << 9;
pub const UD_VECTOR: u8 = 6;
const GP_VECTOR: u8 = 13;

/// The vCPU sits at the entry of the guest's #UD handler (a breakpoint the VMM keeps there).
/// If the #UD was raised by the host for a user-mode `int n` it cannot deliver (KVM-PVM runs
/// ring 3 natively and turns `int n` into #UD), turn this delivery into the one the CPU would
/// have made: vector n past the instruction, or #GP(n*8+2) when the gate's DPL forbids it.
/// Returns the completed mnemonic, or None to let the #UD handler run.
pub fn revector_user_int(mem: &GuestMemoryMmap, regs: &mut kvm_regs, sregs: &kvm_sregs) -> Option<&'static str> {
    let tr = |a| translate(mem, sregs, a);
    // The #UD frame: RIP, CS, RFLAGS, RSP, SS (no error code).
    let mut frame = [0u8; 40];
    if read_linear_with(mem, &tr, regs.rsp, &mut frame) != 40 {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(frame[i * 8..i * 8 + 8].try_into().unwrap());
    let (rip, cs, rflags) = (word(0), word(1), word(2));
    if cs & 3 != 3 {
        return None;
    }
    let mut bytes = [0u8; 15];
    let n = read_linear_with(mem, &tr, rip, &mut bytes);
    let insn = Decoder::with_ip(64, &bytes[..n], rip, DecoderOptions::NONE).decode();
    if insn.mnemonic() != Mnemonic::Int {
        return None;
    }
    let vector = insn.immediate8();
    let ud = read_gate(mem, sregs, UD_VECTOR)?;
    let (gate, err) = match read_gate(mem, sregs, vector) {
        Some(g) if g.dpl == 3 => (g, None),
        // Not present or DPL < CPL: #GP with the IDT-vector error code, RIP at the int.
        _ => (read_gate(mem, sregs, GP_VECTOR)?, Some(vector as u64 * 8 + 2)),
    };
    // Same code segment and stack as the #UD delivery, or the frame we have is the wrong one.
    if gate.selector != ud.selector || gate.ist != ud.ist {
        return None;
    }
    match err {
        None => {
            frame[..8].copy_from_slice(&insn.next_ip().to_le_bytes());
            if !write_linear_with(mem, &tr, regs.rsp, &frame[..8]) {
                return None;
            }
        }
        Some(e) => {
            if !write_linear_with(mem, &tr, regs.rsp.wrapping_sub(8), &e.to_le_bytes()) {
                return None;
            }
            regs.rsp = regs.rsp.wrapping_sub(8);
        }
    }
    regs.rip = gate.target;
    // Interrupt gates enter with IF clear; trap gates keep the interrupted context's IF.
    regs.rflags =
        if gate.kind == 0xe { regs.rflags & !RFLAGS_IF } else { (regs.rflags & !RFLAGS_IF) | (rflags & RFLAGS_IF) };
    Some(if err.is_some() { "int(user,#gp)" } else { "int(user)" })
}
