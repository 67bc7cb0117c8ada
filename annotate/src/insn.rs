//! Which instructions are memory accesses an annotation can mean, and their site record.

use crate::rules::Target;
use iced_x86::{Decoder, DecoderOptions, Formatter, GasFormatter, Instruction, Mnemonic, OpAccess, OpKind, Register};
use previrt_rewriter::record::encode_reg;
use previrt_site_abi::{flags, reg, Kind, SiteRecord};

/// One load/store through an explicit memory operand (not the stack, not `lea`/prefetch).
#[derive(Debug, Clone)]
pub struct MemAccess {
    pub addr: u64,
    pub len: u8,
    pub instr: Instruction,
    pub write: bool,
    pub width: u8,
}

/// Mnemonics with a memory operand that is not a data access.
const NOT_ACCESSES: &[Mnemonic] = &[
    Mnemonic::Lea,
    Mnemonic::Nop,
    Mnemonic::Prefetch,
    Mnemonic::Prefetcht0,
    Mnemonic::Prefetcht1,
    Mnemonic::Prefetcht2,
    Mnemonic::Prefetchnta,
    Mnemonic::Prefetchw,
    Mnemonic::Clflush,
    Mnemonic::Clflushopt,
    Mnemonic::Invlpg,
    Mnemonic::Call,
    Mnemonic::Jmp,
];

impl MemAccess {
    pub fn of(instr: &Instruction) -> Option<MemAccess> {
        let op = (0..instr.op_count()).find(|&i| instr.op_kind(i) == OpKind::Memory)?;
        if NOT_ACCESSES.contains(&instr.mnemonic()) || instr.memory_base() == Register::RSP {
            return None;
        }
        let mut f = iced_x86::InstructionInfoFactory::new();
        let write = matches!(
            f.info(instr).op_access(op),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        Some(MemAccess {
            addr: instr.ip(),
            len: instr.len() as u8,
            instr: *instr,
            write,
            width: instr.memory_size().size().min(255) as u8,
        })
    }

    /// The address the operand names when it does not depend on a register: RIP-relative
    /// or absolute (`disp32` alone, e.g. a fixmap constant or a global).
    pub fn static_address(&self) -> Option<u64> {
        let i = &self.instr;
        if i.is_ip_rel_memory_operand() {
            return Some(i.ip_rel_memory_address());
        }
        (i.memory_base() == Register::None && i.memory_index() == Register::None).then(|| i.memory_displacement64())
    }

    /// The start of the array an operand indexes with no base register (`disp32(,%idx,8)`:
    /// `table[i]` of a global `table`): the displacement.
    pub fn array_base(&self) -> Option<u64> {
        let i = &self.instr;
        (!i.is_ip_rel_memory_operand() && i.memory_base() == Register::None && i.memory_index() != Register::None)
            .then(|| i.memory_displacement64())
    }

    /// A plain load or store (`mov`, `movzx`, `movsx`): how device registers are accessed
    /// (`readl` is one `mov`), unlike the locked and bit-test read-modify-writes that
    /// `volatile` bitmaps and atomics see.
    pub fn plain_move(&self) -> bool {
        use Mnemonic::*;
        matches!(self.instr.mnemonic(), Mov | Movzx | Movsx | Movsxd) && !self.instr.has_lock_prefix()
    }

    pub fn kind(&self, target: Target) -> Kind {
        match (target, self.write) {
            (Target::Mmio, false) => Kind::MmioRead,
            (Target::Mmio, true) => Kind::MmioWrite,
            (Target::PageTable, false) => Kind::PtRead,
            (Target::PageTable, true) => Kind::PtWrite,
        }
    }

    /// AT&T text, for reports.
    pub fn text(&self) -> String {
        let mut s = String::new();
        GasFormatter::new().format(&self.instr, &mut s);
        s
    }

    /// The operand fields of a memory-access site (`kind`, `flags`, lengths, `width`, the
    /// data register, base/index/scale/displacement), as docs/site-abi.md lays them out.
    /// PC-relative fields stay 0 for the caller; `site_len` is `insn_len` (a caller with
    /// scratch bytes sets its own, one without sets [`flags::TRAP`]).
    pub fn record(&self, kind: Kind) -> SiteRecord {
        let i = &self.instr;
        let mut f = flags::MEM;
        if self.write {
            f |= flags::WRITE;
        }
        let data = (0..i.op_count()).find(|&k| i.op_kind(k) == OpKind::Register).map(|k| i.op_register(k));
        let mut r = SiteRecord {
            kind: kind as u16,
            site_len: self.len,
            insn_len: self.len,
            width: self.width,
            reg: data.map_or(reg::NONE, encode_reg),
            index: encode_reg(i.memory_index()),
            scale: if i.memory_index() == Register::None { 0 } else { i.memory_index_scale() as u8 },
            ..Default::default()
        };
        if i.is_ip_rel_memory_operand() {
            f |= flags::RIP_RELATIVE;
            r.base = reg::RIP;
            r.imm = (i.len() - 4 - immediate_bytes(i)) as i32;
        } else {
            r.base = encode_reg(i.memory_base());
            r.imm = i.memory_displacement64() as i64 as i32;
        }
        r.flags = f;
        r
    }
}

fn immediate_bytes(i: &Instruction) -> usize {
    (0..i.op_count())
        .map(|k| match i.op_kind(k) {
            OpKind::Immediate8 | OpKind::Immediate8to16 | OpKind::Immediate8to32 | OpKind::Immediate8to64 => 1,
            OpKind::Immediate16 => 2,
            OpKind::Immediate32 | OpKind::Immediate32to64 => 4,
            _ => 0,
        })
        .sum()
}

/// Decode `bytes` (loaded at `ip`) and call `each` for every memory access in it.
pub fn accesses_in(bytes: &[u8], ip: u64, mut each: impl FnMut(MemAccess)) {
    let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    while d.can_decode() {
        let i = d.decode();
        if let Some(a) = MemAccess::of(&i) {
            each(a);
        }
    }
}

/// The instruction starting at `ip`, if `bytes` (loaded at `ip`) decode to a valid one.
pub fn decode_one(bytes: &[u8], ip: u64) -> Option<Instruction> {
    let i = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).decode();
    (!i.is_invalid()).then_some(i)
}
