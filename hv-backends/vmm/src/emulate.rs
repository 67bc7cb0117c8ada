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

/// Read `buf.len()` bytes at linear address `la`, page by page. Returns how many were read.
pub fn read_linear(mem: &GuestMemoryMmap, sregs: &kvm_sregs, la: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let a = la.wrapping_add(done as u64);
        let chunk = (0x1000 - (a & 0xfff) as usize).min(buf.len() - done);
        let Some(pa) = translate(mem, sregs, a) else { break };
        if mem.read_slice(&mut buf[done..done + chunk], GuestAddress(pa)).is_err() {
            break;
        }
        done += chunk;
    }
    done
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
