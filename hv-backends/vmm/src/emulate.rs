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

/// An event to deliver after a completed instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inject {
    /// Interrupt `vector` (int n: no error code).
    Interrupt(u8),
    /// Exception `vector`, trap-like (int3, into, int1): RIP already past the instruction.
    Exception(u8),
}

/// The vCPU state an instruction completion may change.
pub struct Cpu<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// Segment state changed: the caller must write `sregs` back.
    pub sregs_dirty: bool,
    /// Extended state (standard XSAVE layout) and XCR0, filled by the caller when
    /// [`needs_xsave`] says so; `xsave_dirty`: write it back.
    pub xsave: Option<(Box<[u8; 4096]>, u64)>,
    pub xsave_dirty: bool,
}

/// The XSAVE family: the caller must supply the vCPU's extended state.
pub fn needs_xsave(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Xrstor
            | Mnemonic::Xrstor64
            | Mnemonic::Xsave
            | Mnemonic::Xsave64
            | Mnemonic::Xsaveopt
            | Mnemonic::Xsaveopt64
    )
}

/// Completes one instruction: Ok(event to deliver), or Err(why not).
type Handler = fn(&mut Cpu, &Instruction) -> Result<Option<Inject>, String>;

/// What the VMM completes itself, one row per mnemonic (tables over branches).
const HANDLERS: &[(Mnemonic, Handler)] = &[
    (Mnemonic::Int, |c, i| c.skip(i, Some(Inject::Interrupt(i.immediate8())))),
    (Mnemonic::Int3, |c, i| c.skip(i, Some(Inject::Exception(3)))),
    (Mnemonic::Int1, |c, i| c.skip(i, Some(Inject::Exception(1)))),
    (Mnemonic::Into, |c, i| {
        let of = c.regs.rflags & RFLAGS_OF != 0;
        c.skip(i, of.then_some(Inject::Exception(4)))
    }),
    (Mnemonic::Clac, |c, i| {
        c.regs.rflags &= !RFLAGS_AC;
        c.skip(i, None)
    }),
    (Mnemonic::Stac, |c, i| {
        c.regs.rflags |= RFLAGS_AC;
        c.skip(i, None)
    }),
    // Shadow-stack reads are NOPs while CET is off (CR4.CET clear).
    (Mnemonic::Rdsspd, rdssp),
    (Mnemonic::Rdsspq, rdssp),
    (Mnemonic::Cmpxchg16b, cmpxchg16b),
    (Mnemonic::Iretd, iret32),
    (Mnemonic::Xrstor, xrstor),
    (Mnemonic::Xrstor64, xrstor),
    (Mnemonic::Xsave, xsave),
    (Mnemonic::Xsave64, xsave),
    // XSAVEOPT may skip unmodified components; writing them all is a valid XSAVEOPT.
    (Mnemonic::Xsaveopt, xsave),
    (Mnemonic::Xsaveopt64, xsave),
];

const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_AC: u64 = 1 << 18;
const RFLAGS_ZF: u64 = 1 << 6;
const CR4_CET: u64 = 1 << 23;

/// Complete `insn` on `cpu`. Err: the VMM does not know how (or the instruction faults in a
/// way the VMM does not model); the message says why.
pub fn complete(cpu: &mut Cpu, insn: &Instruction) -> Result<Option<Inject>, String> {
    if let Some((_, h)) = HANDLERS.iter().find(|(m, _)| *m == insn.mnemonic()) {
        return h(cpu, insn);
    }
    match BIT_OPS.iter().find(|(m, _)| *m == insn.mnemonic()) {
        Some((_, f)) => bit_op(cpu, insn, *f),
        None => Err("no completion for this instruction".into()),
    }
}

impl Cpu<'_> {
    fn skip(&mut self, insn: &Instruction, inject: Option<Inject>) -> Result<Option<Inject>, String> {
        self.regs.rip = insn.next_ip();
        Ok(inject)
    }

    fn translate(&self) -> impl Fn(u64) -> Option<u64> + '_ {
        |a| translate(self.mem, &self.sregs, a)
    }

    fn read(&self, la: u64, buf: &mut [u8]) -> Result<(), String> {
        if read_linear_with(self.mem, &self.translate(), la, buf) == buf.len() {
            Ok(())
        } else {
            Err(format!("operand at {la:#x} is not mapped"))
        }
    }

    fn write(&self, la: u64, data: &[u8]) -> Result<(), String> {
        if write_linear_with(self.mem, &self.translate(), la, data) {
            Ok(())
        } else {
            Err(format!("operand at {la:#x} is not mapped"))
        }
    }

    /// The 64-bit register holding `reg` (any width), if it is a general-purpose one.
    fn gpr(&mut self, reg: iced_x86::Register) -> Option<&mut u64> {
        use iced_x86::Register as R;
        let r = &mut self.regs;
        Some(match reg.full_register() {
            R::RAX => &mut r.rax,
            R::RCX => &mut r.rcx,
            R::RDX => &mut r.rdx,
            R::RBX => &mut r.rbx,
            R::RSP => &mut r.rsp,
            R::RBP => &mut r.rbp,
            R::RSI => &mut r.rsi,
            R::RDI => &mut r.rdi,
            R::R8 => &mut r.r8,
            R::R9 => &mut r.r9,
            R::R10 => &mut r.r10,
            R::R11 => &mut r.r11,
            R::R12 => &mut r.r12,
            R::R13 => &mut r.r13,
            R::R14 => &mut r.r14,
            R::R15 => &mut r.r15,
            _ => return None,
        })
    }

    /// Value of a register the way an address or operand sees it (masked to its width).
    fn reg_value(&mut self, insn: &Instruction, reg: iced_x86::Register) -> Option<u64> {
        use iced_x86::Register as R;
        let v = match reg {
            R::RIP | R::EIP => insn.next_ip(),
            R::ES => self.sregs.es.base,
            R::CS => self.sregs.cs.base,
            R::SS => self.sregs.ss.base,
            R::DS => self.sregs.ds.base,
            R::FS => self.sregs.fs.base,
            R::GS => self.sregs.gs.base,
            _ => *self.gpr(reg)?,
        };
        Some(v & width_mask(reg.size() as u32 * 8))
    }

    /// Write a general-purpose register: 32-bit writes zero-extend, narrower ones merge.
    fn set_reg(&mut self, reg: iced_x86::Register, v: u64) -> Result<(), String> {
        let bits = reg.size() as u32 * 8;
        let slot = self.gpr(reg).ok_or_else(|| format!("{reg:?} is not a general-purpose register"))?;
        *slot = match bits {
            64 => v,
            32 => v & 0xffff_ffff,
            _ => (*slot & !width_mask(bits)) | (v & width_mask(bits)),
        };
        Ok(())
    }

    /// Linear address of the instruction's memory operand.
    fn operand_address(&mut self, insn: &Instruction) -> Result<u64, String> {
        let mut values = std::collections::HashMap::new();
        for r in [insn.memory_base(), insn.memory_index(), insn.memory_segment()] {
            if r != iced_x86::Register::None {
                values.insert(r, self.reg_value(insn, r).ok_or_else(|| format!("cannot read {r:?}"))?);
            }
        }
        let op = (0..insn.op_count())
            .find(|&n| insn.op_kind(n) == iced_x86::OpKind::Memory)
            .ok_or("the instruction has no memory operand")?;
        insn.virtual_address(op, 0, |reg, _, _| values.get(&reg).copied())
            .ok_or_else(|| "cannot compute the operand address".into())
    }

    /// Value of operand `n` (register, memory or immediate), masked to the operand width.
    fn operand(&mut self, insn: &Instruction, n: u32) -> Result<u64, String> {
        use iced_x86::OpKind;
        match insn.op_kind(n) {
            OpKind::Register => self.reg_value(insn, insn.op_register(n)).ok_or_else(|| "unreadable register".into()),
            OpKind::Memory => {
                let la = self.operand_address(insn)?;
                let mut b = [0u8; 8];
                let size = insn.memory_size().size();
                self.read(la, &mut b[..size.min(8)])?;
                Ok(u64::from_le_bytes(b))
            }
            _ => Ok(insn.immediate(n)),
        }
    }
}

fn width_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

const FLAGS_ARITH: u64 = 0x8d5; // CF PF AF ZF SF OF
const CF: u64 = 1;
const SF: u64 = 1 << 7;

/// A bit-manipulation result: the value for operand 0 and, if the instruction writes them,
/// the new arithmetic flags.
struct Bits {
    v: u64,
    flags: Option<u64>,
}

/// (a = operand 1, b = operand 2 or 0, width in bits) → result.
type BitOp = fn(u64, u64, u32) -> Bits;

fn zf(v: u64) -> u64 {
    if v == 0 {
        RFLAGS_ZF
    } else {
        0
    }
}
fn sf(v: u64, w: u32) -> u64 {
    if v >> (w - 1) & 1 == 1 {
        SF
    } else {
        0
    }
}
fn cf(c: bool) -> u64 {
    if c {
        CF
    } else {
        0
    }
}

/// Register-computing instructions (POPCNT, LZCNT/TZCNT, BMI1/BMI2) that the host's
/// emulator does not know; flag effects as the SDM defines them (undefined ones cleared).
const BIT_OPS: &[(Mnemonic, BitOp)] = &[
    (Mnemonic::Popcnt, |a, _, _| Bits { v: a.count_ones() as u64, flags: Some(zf(a)) }),
    (Mnemonic::Lzcnt, |a, _, w| {
        let v = if a == 0 { w as u64 } else { (a.leading_zeros() - (64 - w)) as u64 };
        Bits { v, flags: Some(cf(a == 0) | zf(v)) }
    }),
    (Mnemonic::Tzcnt, |a, _, w| {
        let v = if a == 0 { w as u64 } else { a.trailing_zeros() as u64 };
        Bits { v, flags: Some(cf(a == 0) | zf(v)) }
    }),
    (Mnemonic::Andn, |a, b, w| {
        let v = !a & b & width_mask(w);
        Bits { v, flags: Some(zf(v) | sf(v, w)) }
    }),
    (Mnemonic::Blsi, |a, _, w| {
        let v = a & a.wrapping_neg() & width_mask(w);
        Bits { v, flags: Some(cf(a != 0) | zf(v) | sf(v, w)) }
    }),
    (Mnemonic::Blsr, |a, _, w| {
        let v = a & a.wrapping_sub(1) & width_mask(w);
        Bits { v, flags: Some(cf(a == 0) | zf(v) | sf(v, w)) }
    }),
    (Mnemonic::Blsmsk, |a, _, w| {
        let v = (a ^ a.wrapping_sub(1)) & width_mask(w);
        Bits { v, flags: Some(cf(a == 0) | sf(v, w)) }
    }),
    (Mnemonic::Shlx, |a, b, w| Bits { v: (a << (b & (w as u64 - 1))) & width_mask(w), flags: None }),
    (Mnemonic::Shrx, |a, b, w| Bits { v: a >> (b & (w as u64 - 1)), flags: None }),
    (Mnemonic::Sarx, |a, b, w| {
        let s = (b & (w as u64 - 1)) as u32;
        let v = (((a << (64 - w)) as i64) >> (64 - w + s)) as u64 & width_mask(w);
        Bits { v, flags: None }
    }),
    (Mnemonic::Rorx, |a, b, w| {
        let s = (b & (w as u64 - 1)) as u32;
        let v = if s == 0 { a } else { ((a >> s) | (a << (w - s))) & width_mask(w) };
        Bits { v, flags: None }
    }),
];

/// Complete one of [`BIT_OPS`]: operand 0 is a register, 1 a register or memory, 2 (if any) a
/// register or immediate.
fn bit_op(c: &mut Cpu, i: &Instruction, f: BitOp) -> Result<Option<Inject>, String> {
    let dest = i.op0_register();
    let w = dest.size() as u32 * 8;
    let a = c.operand(i, 1)?;
    let b = if i.op_count() > 2 { c.operand(i, 2)? } else { 0 };
    let r = f(a & width_mask(w), b, w);
    c.set_reg(dest, r.v)?;
    if let Some(fl) = r.flags {
        c.regs.rflags = (c.regs.rflags & !FLAGS_ARITH) | fl;
    }
    c.skip(i, None)
}

fn rdssp(c: &mut Cpu, i: &Instruction) -> Result<Option<Inject>, String> {
    if c.sregs.cr4 & CR4_CET != 0 {
        return Err("shadow stacks are enabled".into());
    }
    c.skip(i, None)
}

/// cmpxchg16b m128: if rdx:rax == m128 { m128 = rcx:rbx; ZF = 1 } else { rdx:rax = m128; ZF = 0 }.
/// One vCPU: no other CPU can observe the read-compare-write as non-atomic.
fn cmpxchg16b(c: &mut Cpu, i: &Instruction) -> Result<Option<Inject>, String> {
    let la = c.operand_address(i)?;
    if la % 16 != 0 {
        return Err("misaligned operand (#GP)".into());
    }
    let mut m = [0u8; 16];
    c.read(la, &mut m)?;
    let lo = u64::from_le_bytes(m[..8].try_into().unwrap());
    let hi = u64::from_le_bytes(m[8..].try_into().unwrap());
    if (lo, hi) == (c.regs.rax, c.regs.rdx) {
        let mut new = [0u8; 16];
        new[..8].copy_from_slice(&c.regs.rbx.to_le_bytes());
        new[8..].copy_from_slice(&c.regs.rcx.to_le_bytes());
        c.write(la, &new)?;
        c.regs.rflags |= RFLAGS_ZF;
    } else {
        (c.regs.rax, c.regs.rdx) = (lo, hi);
        c.regs.rflags &= !RFLAGS_ZF;
    }
    c.skip(i, None)
}

/// Byte range of XSAVE component `i` in the standard (non-compacted) layout. x87 is the
/// legacy area without MXCSR (bytes 24..32 go with SSE/AVX); SSE the XMM registers.
fn xsave_component(i: u32) -> std::ops::Range<usize> {
    match i {
        0 => 0..160,
        1 => 160..416,
        // The VMM's host and the guest share the standard layout (KVM_GET_XSAVE reports it
        // in the host's offsets).
        _ => {
            let r = core::arch::x86_64::__cpuid_count(0xd, i);
            r.ebx as usize..(r.ebx + r.eax) as usize
        }
    }
}

const XSAVE_HEADER: usize = 512;
const MXCSR: std::ops::Range<usize> = 24..28;

/// Requested-feature bitmap and the 64-byte-aligned area address of an XSAVE-family insn.
fn xsave_operands(c: &mut Cpu, i: &Instruction) -> Result<(u64, u64, u64), String> {
    let xcr0 = c.xsave.as_ref().ok_or("extended state unavailable")?.1;
    let la = c.operand_address(i)?;
    if la % 64 != 0 {
        return Err("XSAVE area not 64-byte aligned (#GP)".into());
    }
    let rfbm = xcr0 & ((c.regs.rdx << 32) | (c.regs.rax & 0xffff_ffff));
    Ok((la, rfbm, xcr0))
}

/// Where component `k` lies in an area of `xcomp_bv` format: the standard offset, or in the
/// compacted format (bit 63) the components of XCOMP_BV packed from byte 576 in index order,
/// each 64-byte aligned when CPUID 0xD.k ecx bit 1 says so.
fn area_offset(k: u32, xcomp_bv: u64) -> usize {
    if k < 2 || xcomp_bv & (1 << 63) == 0 {
        return xsave_component(k).start;
    }
    let mut at = 576;
    for j in (2..k).filter(|j| xcomp_bv & (1 << j) != 0) {
        at = align_component(j, at) + xsave_component(j).len();
    }
    align_component(k, at)
}

fn align_component(k: u32, at: usize) -> usize {
    let aligned = core::arch::x86_64::__cpuid_count(0xd, k).ecx & 2 != 0;
    if aligned {
        at.next_multiple_of(64)
    } else {
        at
    }
}

/// xrstor, standard or compacted form: load the components in RFBM from memory (or their
/// initial state when the area's XSTATE_BV bit is clear).
fn xrstor(c: &mut Cpu, i: &Instruction) -> Result<Option<Inject>, String> {
    let (la, rfbm, xcr0) = xsave_operands(c, i)?;
    let mut header = [0u8; 16];
    c.read(la + XSAVE_HEADER as u64, &mut header)?;
    let bv = u64::from_le_bytes(header[..8].try_into().unwrap());
    let comp = u64::from_le_bytes(header[8..].try_into().unwrap());
    let compacted = comp & (1 << 63) != 0;
    if bv & !xcr0 != 0 || (compacted && bv & !comp & !(1 << 63) != 0) {
        return Err("XSTATE_BV names a component XCR0 or XCOMP_BV does not have (#GP)".into());
    }
    let mut legacy = [0u8; XSAVE_HEADER];
    c.read(la, &mut legacy)?;
    let mut st = c.xsave.take().ok_or("extended state unavailable")?;
    let res = (|| {
        let region = &mut st.0;
        for k in (0..63).filter(|k| rfbm & (1 << k) != 0) {
            let r = xsave_component(k);
            if r.end > 4096 {
                return Err(format!("XSAVE component {k} lies beyond 4 KiB"));
            }
            if bv & (1 << k) != 0 {
                match k {
                    0 | 1 => region[r.clone()].copy_from_slice(&legacy[r]),
                    _ => c.read(la + area_offset(k, comp) as u64, &mut region[r])?,
                }
            } else {
                region[r].fill(0);
                if k == 0 {
                    region[0..2].copy_from_slice(&0x37fu16.to_le_bytes()); // FCW
                }
            }
        }
        if rfbm & 0b110 != 0 {
            region[MXCSR].copy_from_slice(&legacy[MXCSR]);
        }
        let old = u64::from_le_bytes(region[XSAVE_HEADER..XSAVE_HEADER + 8].try_into().unwrap());
        region[XSAVE_HEADER..XSAVE_HEADER + 8].copy_from_slice(&((old & !rfbm) | (bv & rfbm)).to_le_bytes());
        Ok(())
    })();
    c.xsave = Some(st);
    res?;
    c.xsave_dirty = true;
    c.skip(i, None)
}

/// xsave/xsaveopt, standard form: store the components in RFBM and their XSTATE_BV bits.
fn xsave(c: &mut Cpu, i: &Instruction) -> Result<Option<Inject>, String> {
    let (la, rfbm, _) = xsave_operands(c, i)?;
    let region = &c.xsave.as_ref().ok_or("extended state unavailable")?.0;
    for k in (0..63).filter(|k| rfbm & (1 << k) != 0) {
        let r = xsave_component(k);
        if r.end > 4096 {
            return Err(format!("XSAVE component {k} lies beyond 4 KiB"));
        }
        c.write(la + r.start as u64, &region[r])?;
    }
    if rfbm & 0b110 != 0 {
        c.write(la + MXCSR.start as u64, &region[MXCSR])?;
    }
    let mut bv = [0u8; 8];
    c.read(la + XSAVE_HEADER as u64, &mut bv)?;
    let inuse = u64::from_le_bytes(region[XSAVE_HEADER..XSAVE_HEADER + 8].try_into().unwrap());
    let bv = (u64::from_le_bytes(bv) & !rfbm) | (inuse & rfbm);
    c.write(la + XSAVE_HEADER as u64, &bv.to_le_bytes())?;
    c.skip(i, None)
}

/// A segment descriptor from the GDT (or LDT) as KVM's segment register state.
fn load_descriptor(c: &Cpu, selector: u16) -> Result<kvm_bindings::kvm_segment, String> {
    let table = if selector & 4 != 0 { &c.sregs.ldt.base } else { &c.sregs.gdt.base };
    let limit = if selector & 4 != 0 { c.sregs.ldt.limit } else { c.sregs.gdt.limit as u32 };
    let off = (selector & !7) as u64;
    if selector & !3 == 0 || off + 7 > limit as u64 {
        return Err(format!("selector {selector:#x} outside its descriptor table (#GP)"));
    }
    let mut d = [0u8; 8];
    c.read(table + off, &mut d)?;
    let d = u64::from_le_bytes(d);
    let g = (d >> 55) & 1;
    let raw_limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let seg = kvm_bindings::kvm_segment {
        base: ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        s: ((d >> 44) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        present: ((d >> 47) & 1) as u8,
        avl: ((d >> 52) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        db: ((d >> 54) & 1) as u8,
        g: g as u8,
        unusable: 0,
        padding: 0,
    };
    if seg.present == 0 {
        return Err(format!("selector {selector:#x} not present (#NP)"));
    }
    Ok(seg)
}

/// 32-bit protected-mode iret (KVM's emulator only does real-mode iret): pop EIP, CS,
/// EFLAGS, and ESP, SS when returning to an outer privilege level. No task return (NT) and
/// no return to virtual-8086 mode.
fn iret32(c: &mut Cpu, _i: &Instruction) -> Result<Option<Inject>, String> {
    const NT: u64 = 1 << 14;
    const VM: u64 = 1 << 17;
    if c.sregs.efer & EFER_LMA != 0 || c.sregs.cr0 & 1 == 0 || c.regs.rflags & NT != 0 {
        return Err("iret outside 32-bit protected mode, or a task return".into());
    }
    let sp_mask = if c.sregs.ss.db == 1 { 0xffff_ffff } else { 0xffff };
    let sp = c.regs.rsp & sp_mask;
    let pop = |at: u64| -> Result<u64, String> {
        let mut w = [0u8; 4];
        c.read(c.sregs.ss.base.wrapping_add(at) & 0xffff_ffff, &mut w)?;
        Ok(u32::from_le_bytes(w) as u64)
    };
    let (eip, cs, eflags) = (pop(sp)?, pop(sp + 4)? as u16, pop(sp + 8)?);
    if eflags & VM != 0 {
        return Err("iret to virtual-8086 mode".into());
    }
    let cpl = c.sregs.cs.selector & 3;
    let rpl = cs & 3;
    if rpl < cpl {
        return Err(format!("iret to a more privileged level (CS {cs:#x}) (#GP)"));
    }
    let new_cs = load_descriptor(c, cs)?;
    let mut new_sp = sp + 12;
    if rpl > cpl {
        let (esp, ss) = (pop(sp + 12)?, pop(sp + 16)? as u16);
        c.sregs.ss = load_descriptor(c, ss)?;
        new_sp = esp;
    }
    c.sregs.cs = new_cs;
    c.sregs_dirty = true;
    // At CPL 0 every flag iret may restore is restored; bit 1 is always set.
    const IRET_MASK: u64 = 0x25_7fd5;
    c.regs.rflags = (eflags & IRET_MASK) | 2;
    c.regs.rip = eip;
    c.regs.rsp = (c.regs.rsp & !sp_mask) | (new_sp & sp_mask);
    Ok(None)
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

/// The present gate for `vector`, if any: 16-byte long-mode gates, 8-byte protected-mode ones.
pub fn read_gate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, vector: u8) -> Option<Gate> {
    let size: u64 = if sregs.efer & EFER_LMA != 0 { 16 } else { 8 };
    if sregs.cr0 & 1 == 0 || (sregs.idt.limit as u64) < vector as u64 * size + size - 1 {
        return None;
    }
    let mut g = [0u8; 16];
    let g = &mut g[..size as usize];
    if read_linear(mem, sregs, sregs.idt.base + vector as u64 * size, g) != g.len() || g[5] & 0x80 == 0 {
        return None;
    }
    let w = |i: usize| u16::from_le_bytes([g[i], g[i + 1]]) as u64;
    let high = if size == 16 { (u32::from_le_bytes(g[8..12].try_into().unwrap()) as u64) << 32 } else { 0 };
    Some(Gate {
        target: w(0) | w(6) << 16 | high,
        selector: w(2) as u16,
        ist: if size == 16 { g[4] & 7 } else { 0 },
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
/// Works for 64-bit and 32-bit protected-mode kernels. Returns the completed mnemonic, or
/// None to let the #UD handler run.
pub fn revector_user_int(cpu: &mut Cpu) -> Option<&'static str> {
    let long = cpu.sregs.efer & EFER_LMA != 0;
    // Stack slots are 8 bytes in long mode, 4 in protected mode.
    let slot: u64 = if long { 8 } else { 4 };
    let stack = |sp: u64| if long { sp } else { cpu.sregs.ss.base.wrapping_add(sp) & 0xffff_ffff };
    let read_slot = |sp: u64| -> Option<u64> {
        let mut b = [0u8; 8];
        cpu.read(stack(sp), &mut b[..slot as usize]).ok()?;
        Some(u64::from_le_bytes(b))
    };
    // The #UD frame: RIP, CS, RFLAGS, then RSP and SS (no error code).
    let sp = cpu.regs.rsp;
    let (rip, cs, rflags) = (read_slot(sp)?, read_slot(sp + slot)? as u16, read_slot(sp + 2 * slot)?);
    if cs & 3 != 3 {
        return None;
    }
    let user_cs = load_descriptor(cpu, cs).ok()?;
    let (bits, la) = if user_cs.l == 1 { (64, rip) } else { (32, user_cs.base.wrapping_add(rip) & 0xffff_ffff) };
    let mut bytes = [0u8; 15];
    let n = read_linear_with(cpu.mem, &cpu.translate(), la, &mut bytes);
    let insn = Decoder::with_ip(bits, &bytes[..n], rip, DecoderOptions::NONE).decode();
    if insn.mnemonic() != Mnemonic::Int {
        return None;
    }
    let vector = insn.immediate8();
    let ud = read_gate(cpu.mem, &cpu.sregs, UD_VECTOR)?;
    let (gate, err) = match read_gate(cpu.mem, &cpu.sregs, vector) {
        Some(g) if g.dpl == 3 => (g, None),
        // Not present or DPL < CPL: #GP with the IDT-vector error code, RIP at the int.
        _ => (read_gate(cpu.mem, &cpu.sregs, GP_VECTOR)?, Some(vector as u64 * 8 + 2)),
    };
    // Same code segment and stack as the #UD delivery, or the frame we have is the wrong one.
    if gate.selector != ud.selector || gate.ist != ud.ist {
        return None;
    }
    let (at, value) = match err {
        None => (sp, insn.next_ip()),
        Some(e) => (sp.wrapping_sub(slot), e),
    };
    cpu.write(stack(at), &value.to_le_bytes()[..slot as usize]).ok()?;
    cpu.regs.rsp = at;
    cpu.regs.rip = gate.target;
    // Interrupt gates enter with IF clear; trap gates keep the interrupted context's IF.
    let interrupt_gate = gate.kind == 0xe || gate.kind == 0x6;
    cpu.regs.rflags = (cpu.regs.rflags & !RFLAGS_IF) | if interrupt_gate { 0 } else { rflags & RFLAGS_IF };
    Some(if err.is_some() { "int(user,#gp)" } else { "int(user)" })
}
