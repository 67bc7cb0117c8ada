//! Filling a [`SiteRecord`] from a decoded (or encoder-built) instruction.
//!
//! [`operands`] fills every field the runtime needs to handle a site *without re-decoding*:
//! `kind`, `flags`, `site_len`, `insn_len`, `width`, `reg`, `base`, `index`, `scale`, `imm`.
//! The PC-relative fields (`site_rel`, `save_rel`, `resume_rel`, `origin_rel`) are left 0: the
//! caller places the record and the site and fills them (in assembler output with
//! `.long 1f - .` directives, in a linked image with [`SiteRecord::set_targets`]). Flags that
//! depend on where the instruction lives rather than on the instruction itself
//! ([`flags::IN_ALTINSTR`], [`flags::INIT`], [`flags::TRAMPOLINE`], [`flags::TRAP`]) are also
//! the caller's; [`section_flags`] gives the first two from a section name.
//!
//! # Field conventions (per the site ABI docs in `site-abi/src/lib.rs`)
//!
//! | kind(s) | `reg` | `base` | `imm` | `width` |
//! | --- | --- | --- | --- | --- |
//! | `mov_cr`, `mov_dr` | the GPR | the CR/DR | 0 | GPR size |
//! | `mov_seg`, register form | the GPR | the segment register | 0 | GPR size |
//! | `mov_seg`, memory form | the segment register | memory base | displacement | 2 |
//! | `push_seg`, `pop_seg` | the segment register | the segment register | 0 | stack operand size |
//! | `in`, `out` | `%al/%ax/%eax` (gpr 0) | 0 | port if [`flags::IMM_PORT`] (else `%dx`) | 1, 2, 4 |
//! | `ins`, `outs` | 0 | 0 | 0 | 1, 2, 4 (per element; [`flags::REP`] for `rep`) |
//! | `lgdt`/`lidt`/`sgdt`/`sidt` | 0 | memory base | displacement | 10 (6 outside 64-bit) |
//! | `lldt`/`ltr`/`sldt`/`str`/`smsw`/`lmsw`/`verr`/`verw` | the GPR (register form) | memory base | displacement | operand size |
//! | `lar`, `lsl` | destination GPR | memory base, or the selector GPR in the register form | displacement | destination size |
//! | `invpcid` | the type GPR | memory base | displacement | 16 |
//! | `invlpg` | 0 | memory base | displacement | 0 |
//! | `rd/wr fs/gs base` | the GPR | 0 | 0 | 4 or 8 |
//! | `far_call`/`far_jmp` memory | 0 | memory base | displacement | 4, 6 or 10 (pointer size) |
//! | `far_call`/`far_jmp` immediate | 0 | 0 | selector | 2 or 4 (offset size) |
//! | `far_ret` | 0 | 0 | bytes popped (`lret $n`), else 0 | stack operand size |
//! | `int` | 0 | 0 | vector | 0 |
//! | `pushf`, `popf`, `iret`, `sysret`, `sysexit` | 0 | 0 | 0 | operand size (2, 4, 8) |
//! | everything else | 0 | 0 | 0 | 0 |
//!
//! Memory operands set [`flags::MEM`], `index` and `scale` (0 when absent). When the operand is
//! RIP-relative, [`flags::RIP_RELATIVE`] is set, `base` is [`reg::RIP`] and `imm` is the byte
//! offset of the 32-bit displacement inside the instruction (the displacement itself must be
//! read from the relocated copy). [`flags::WIDE`] marks an operand-size prefix or REX.W that
//! changes the operand size away from the mode's default (`pushfw`, `iretq`, `sysretq`,
//! `lretq`, `inw`, `rdgsbase %rax` …). [`flags::CODE32`]/[`flags::CODE16`] follow `bitness`.

use crate::catalogue::{Access, Entry, Shape};
use iced_x86::{Instruction, OpKind, Register};
use previrt_site_abi::{flags, reg, SiteRecord};

/// Encode a register in the site ABI's one-byte [`reg`] format (0 if not representable).
pub fn encode_reg(r: Register) -> u8 {
    if r == Register::None {
        reg::NONE
    } else if r.is_gpr() {
        reg::gpr(r.full_register().number() as u8)
    } else if r.is_cr() {
        reg::cr(r.number() as u8)
    } else if r.is_dr() {
        reg::dr(r.number() as u8)
    } else if r.is_segment_register() {
        reg::seg(r.number() as u8)
    } else if matches!(r, Register::RIP | Register::EIP) {
        reg::RIP
    } else {
        reg::NONE
    }
}

/// Flags implied by the name of the section an instruction lives in:
/// [`flags::IN_ALTINSTR`] for `.altinstr_replacement`, [`flags::INIT`] for init sections
/// (`.init.text`, `.init.*`, `.exit.text`, `.ref.text` is not init).
pub fn section_flags(section: &str) -> u16 {
    let mut f = 0;
    if section.starts_with(".altinstr_replacement") {
        f |= flags::IN_ALTINSTR;
    }
    if section.starts_with(".init.") || section == ".init" || section.starts_with(".exit.") {
        f |= flags::INIT;
    }
    f
}

fn imm_size(kind: OpKind) -> usize {
    match kind {
        OpKind::Immediate8
        | OpKind::Immediate8_2nd
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64 => 1,
        OpKind::Immediate16 => 2,
        OpKind::Immediate32 | OpKind::Immediate32to64 => 4,
        OpKind::Immediate64 => 8,
        _ => 0,
    }
}

/// Is the operand size different from the mode's default because of a 66 prefix or REX.W?
fn is_wide(instr: &Instruction, bitness: u32) -> bool {
    let oc = instr.op_code();
    match oc.operand_size() {
        16 => bitness != 16,
        32 => bitness == 16,
        64 => !oc.default_op_size64() && !oc.force_op_size64(),
        _ => false,
    }
}

/// Fill a record for `instr`, which `entry` classified, decoded in `bitness`-bit code.
///
/// Fills `kind`, `flags`, `site_len` (`max(insn_len, entry.min_site_len)`), `insn_len`,
/// `width`, `reg`, `base`, `index`, `scale` and `imm` as the module docs describe; leaves the
/// PC-relative fields and `reserved` 0. Pure function of its inputs: the assembler wrapper
/// calls it on the instruction it just assembled, the post-link patcher on the instruction it
/// moves.
pub fn operands(instr: &Instruction, entry: &Entry, bitness: u32) -> SiteRecord {
    let mut r = SiteRecord {
        kind: entry.kind as u16,
        insn_len: instr.len().min(u8::MAX as usize) as u8,
        site_len: entry.site_len(instr.len()),
        ..Default::default()
    };
    let mut f = match bitness {
        16 => flags::CODE16,
        32 => flags::CODE32,
        _ => 0,
    };
    let write = match entry.access {
        Access::Read => false,
        Access::Write => true,
        Access::ByOperand => {
            instr.op_count() > 0 && instr.op0_kind() == OpKind::Register && {
                let d = instr.op0_register();
                d.is_cr() || d.is_dr() || d.is_segment_register()
            }
        }
    };
    if write {
        f |= flags::WRITE;
    }
    if is_wide(instr, bitness) {
        f |= flags::WIDE;
    }

    // Walk the explicit operands once.
    let mut gprs: [Register; 2] = [Register::None; 2];
    let mut ngpr = 0;
    let mut special = Register::None;
    let mut has_mem = false;
    let mut imm: Option<i32> = None;
    let mut imm_bytes = 0usize;
    for i in 0..instr.op_count() {
        let k = instr.op_kind(i);
        match k {
            OpKind::Register => {
                let x = instr.op_register(i);
                if x.is_gpr() {
                    if ngpr < 2 {
                        gprs[ngpr] = x;
                        ngpr += 1;
                    }
                } else if x.is_cr() || x.is_dr() || x.is_segment_register() {
                    special = x;
                }
            }
            OpKind::Memory => has_mem = true,
            OpKind::FarBranch16 | OpKind::FarBranch32 => imm = Some(instr.far_branch_selector() as i32),
            _ => {
                let n = imm_size(k);
                if n > 0 {
                    imm_bytes += n;
                    imm = Some(instr.immediate(i) as i64 as i32);
                }
            }
        }
    }

    // Memory operand: base/index/scale/displacement.
    if has_mem {
        f |= flags::MEM;
        r.index = encode_reg(instr.memory_index());
        if instr.memory_index() != Register::None {
            r.scale = instr.memory_index_scale() as u8;
        }
        if instr.is_ip_rel_memory_operand() {
            f |= flags::RIP_RELATIVE;
            r.base = reg::RIP;
            // disp32 is last but for any immediate bytes.
            r.imm = instr.len().saturating_sub(4 + imm_bytes) as i32;
        } else {
            r.base = encode_reg(instr.memory_base());
            r.imm = instr.memory_displacement64() as i64 as i32;
        }
        r.width = instr.memory_size().size().min(u8::MAX as usize) as u8;
    } else if let Some(v) = imm {
        r.imm = v;
    }

    match entry.shape {
        Shape::SpecialGpr => {
            r.reg = encode_reg(gprs[0]);
            r.base = encode_reg(special);
            r.width = gprs[0].size() as u8;
        }
        Shape::SegRm => {
            if has_mem {
                r.reg = encode_reg(special);
                r.width = 2;
            } else {
                r.reg = encode_reg(gprs[0]);
                r.base = encode_reg(special);
                r.width = gprs[0].size() as u8;
            }
        }
        Shape::Seg => {
            r.reg = encode_reg(special);
            r.base = r.reg;
            r.width = stack_width(instr);
        }
        Shape::Port => {
            // The data register is always the accumulator; the port is imm8 or %dx.
            let data = if instr.op0_kind() == OpKind::Register && instr.op0_register() != Register::DX {
                instr.op0_register()
            } else {
                instr.op1_register()
            };
            r.reg = encode_reg(data);
            r.width = data.size() as u8;
            if imm.is_some() {
                f |= flags::IMM_PORT;
                r.imm = imm.unwrap_or(0) & 0xff;
            }
        }
        Shape::StringPort => {
            if instr.has_rep_prefix() || instr.has_repne_prefix() {
                f |= flags::REP;
            }
            r.width = instr.memory_size().size() as u8;
            r.imm = 0;
        }
        Shape::Rm | Shape::Gpr => {
            if !has_mem {
                r.reg = encode_reg(gprs[0]);
                r.width = gprs[0].size() as u8;
            }
        }
        Shape::RegRm => {
            // lar/lsl: op0 = destination GPR; invpcid: op0 = type GPR, op1 = memory.
            r.reg = encode_reg(gprs[0]);
            if !has_mem {
                r.base = encode_reg(gprs[1]);
            }
            if entry.kind != previrt_site_abi::Kind::Invpcid {
                r.width = gprs[0].size() as u8;
            }
        }
        Shape::Mem => {}
        Shape::FarPtr => {
            r.width = if instr.op0_kind() == OpKind::FarBranch16 { 2 } else { 4 };
        }
        Shape::Imm => {
            if entry.kind == previrt_site_abi::Kind::FarRet {
                r.width = stack_width(instr);
            }
        }
        Shape::None => {
            r.width = (instr.op_code().operand_size() / 8) as u8;
        }
    }
    r.flags = f;
    r
}

/// Operand size of a stack instruction in bytes (`pushw %fs` → 2, `lretq` → 8).
fn stack_width(instr: &Instruction) -> u8 {
    match instr.op_code().operand_size() {
        0 => 0,
        n => (n / 8) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::classify;
    use iced_x86::{Decoder, DecoderOptions};
    use previrt_site_abi::Kind;

    fn rec(bytes: &[u8]) -> SiteRecord {
        let mut d = Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE);
        let i = d.decode();
        assert_eq!(i.len(), bytes.len(), "{bytes:x?} decoded as {i}");
        let e = classify(&i).unwrap_or_else(|| panic!("{i} not classified"));
        operands(&i, e, 64)
    }

    #[test]
    fn mov_cr3_write() {
        let r = rec(&[0x0f, 0x22, 0xd8]); // mov %rax,%cr3
        assert_eq!(r.kind, Kind::MovCr as u16);
        assert!(r.has(flags::WRITE) && !r.has(flags::WIDE));
        assert_eq!((r.reg, r.base, r.width, r.insn_len, r.site_len), (reg::gpr(0), reg::cr(3), 8, 3, 5));
        let r = rec(&[0x41, 0x0f, 0x20, 0xc7]); // mov %cr0,%r15
        assert!(!r.has(flags::WRITE));
        assert_eq!((r.reg, r.base), (reg::gpr(15), reg::cr(0)));
        let r = rec(&[0x44, 0x0f, 0x20, 0xc0]); // mov %cr8,%rax
        assert_eq!((r.reg, r.base), (reg::gpr(0), reg::cr(8)));
    }

    #[test]
    fn stack_and_wide() {
        let r = rec(&[0x9c]);
        assert_eq!((r.kind, r.width, r.flags & flags::WIDE), (Kind::Pushf as u16, 8, 0));
        let r = rec(&[0x66, 0x9c]);
        assert_eq!((r.width, r.flags & flags::WIDE), (2, flags::WIDE));
        let r = rec(&[0x48, 0xcf]);
        assert_eq!((r.kind, r.width, r.flags & flags::WIDE), (Kind::Iret as u16, 8, flags::WIDE));
        let r = rec(&[0xcf]);
        assert_eq!((r.width, r.flags & flags::WIDE), (4, 0));
        let r = rec(&[0x48, 0x0f, 0x07]);
        assert_eq!((r.kind, r.width, r.flags & flags::WIDE), (Kind::Sysret as u16, 8, flags::WIDE));
        let r = rec(&[0x0f, 0xa0]); // push %fs
        assert_eq!((r.kind, r.reg, r.base, r.width), (Kind::PushSeg as u16, reg::seg(4), reg::seg(4), 8));
        let r = rec(&[0x48, 0xcb]); // lretq
        assert_eq!((r.kind, r.width, r.flags & flags::WIDE), (Kind::FarRet as u16, 8, flags::WIDE));
        let r = rec(&[0xca, 0x08, 0x00]); // lret $8
        assert_eq!((r.width, r.imm), (4, 8));
    }

    #[test]
    fn ports() {
        let r = rec(&[0xe6, 0xf4]); // out %al,$0xf4
        assert_eq!(r.flags, flags::WRITE | flags::IMM_PORT);
        assert_eq!((r.imm, r.width, r.reg), (0xf4, 1, reg::gpr(0)));
        let r = rec(&[0x66, 0xed]); // in (%dx),%ax
        assert_eq!(r.flags, flags::WIDE);
        assert_eq!((r.imm, r.width, r.reg), (0, 2, reg::gpr(0)));
        let r = rec(&[0xf3, 0x6c]); // rep insb
        assert_eq!((r.kind, r.flags, r.width), (Kind::Ins as u16, flags::REP, 1));
        let r = rec(&[0xf3, 0x6f]); // rep outsl
        assert_eq!((r.kind, r.flags, r.width), (Kind::Outs as u16, flags::REP | flags::WRITE, 4));
    }

    #[test]
    fn memory_operands() {
        let r = rec(&[0x0f, 0x01, 0x15, 0x10, 0, 0, 0]); // lgdt 0x10(%rip)
        assert_eq!(r.flags, flags::WRITE | flags::MEM | flags::RIP_RELATIVE);
        assert_eq!((r.base, r.imm, r.width), (reg::RIP, 3, 10));
        let r = rec(&[0x0f, 0x01, 0x7c, 0x8b, 0x08]); // invlpg 0x8(%rbx,%rcx,4)
        assert_eq!((r.base, r.index, r.scale, r.imm), (reg::gpr(3), reg::gpr(1), 4, 8));
        let r = rec(&[0x8e, 0xd8]); // mov %eax,%ds
        assert_eq!((r.kind, r.flags, r.reg, r.base), (Kind::MovSeg as u16, flags::WRITE, reg::gpr(0), reg::seg(3)));
        let r = rec(&[0x8c, 0x0f]); // mov %cs,(%rdi)
        assert_eq!((r.flags, r.reg, r.base, r.width), (flags::MEM, reg::seg(1), reg::gpr(7), 2));
        let r = rec(&[0x0f, 0x03, 0xc1]); // lsl %ecx,%eax
        assert_eq!((r.kind, r.reg, r.base, r.width), (Kind::Lsl as u16, reg::gpr(0), reg::gpr(1), 4));
        let r = rec(&[0x66, 0x0f, 0x38, 0x82, 0x07]); // invpcid (%rdi),%rax
        assert_eq!((r.kind, r.reg, r.base, r.width), (Kind::Invpcid as u16, reg::gpr(0), reg::gpr(7), 16));
        let r = rec(&[0x48, 0xff, 0x18]); // lcall *(%rax) m16:64
        assert_eq!((r.kind, r.width, r.flags & flags::WIDE), (Kind::FarCall as u16, 10, flags::WIDE));
        let r = rec(&[0xcd, 0x80]); // int $0x80
        assert_eq!((r.kind, r.imm, r.width), (Kind::Int as u16, 0x80, 0));
    }
}
