//! One executable section, decoded by a linear sweep, with a mark byte per code byte saying
//! what the patcher must respect there.

use iced_x86::{Code as Op, Decoder, DecoderOptions, FlowControl, Instruction, OpKind};
use previrt_rewriter::catalogue::{classify, Entry};
use previrt_rewriter::elf::{Elf, Section};

/// Control may arrive at this byte from elsewhere: it may start a window, never lie inside one.
pub const BOUNDARY: u8 = 1;
/// The kernel rewrites or identifies these bytes (a table points at them): never move them.
pub const PIN: u8 = 2;
/// A relocation writes this byte (relocatable objects): the instruction is moved verbatim
/// and its relocation moves with it.
pub const RELOC: u8 = 4;

/// What may happen to an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mobility {
    /// May move into a trampoline.
    Movable,
    /// May move; what follows it is reached only by a jump (unconditional branch, return).
    EndsBlock,
    /// Never moved: padding (`int3`), undecodable bytes, branches without a 32-bit form,
    /// 16/32-bit code.
    Fixed,
}

#[derive(Debug, Clone, Copy)]
pub struct Insn {
    pub off: u32,
    pub len: u8,
    /// 64, or 16/32 inside a region the object marks as such.
    pub bits: u8,
    pub mobility: Mobility,
    pub entry: Option<&'static Entry>,
}

pub struct Code<'a> {
    pub sec: usize,
    pub name: String,
    /// Address of byte 0: the section address in a linked image, 0 in an object.
    pub base: u64,
    pub bytes: &'a [u8],
    pub insns: Vec<Insn>,
    pub marks: Vec<u8>,
}

fn mobility(i: &Instruction, bits: u32) -> Mobility {
    if bits != 64 || i.code() == Op::INVALID || i.code() == Op::Int3 {
        return Mobility::Fixed;
    }
    match i.flow_control() {
        FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch
            if i.code().as_near_branch() == i.code() && i.len() < 5 =>
        {
            Mobility::Fixed // loop, jrcxz: no rel32 form
        }
        FlowControl::UnconditionalBranch
        | FlowControl::IndirectBranch
        | FlowControl::Return
        | FlowControl::Exception
        | FlowControl::Interrupt => Mobility::EndsBlock,
        _ if i.code() == Op::Xbegin_rel32 || i.code() == Op::Xbegin_rel16 => Mobility::Fixed,
        _ => Mobility::Movable,
    }
}

/// Decode `bytes` as `bits`-bit code at address `ip`, calling `each` per instruction.
pub fn sweep(bytes: &[u8], ip: u64, bits: u32, mut each: impl FnMut(u64, &Instruction)) {
    let mut d = Decoder::with_ip(bits, bytes, ip, DecoderOptions::NONE);
    let mut i = Instruction::default();
    while d.can_decode() {
        let pos = d.position() as u64;
        d.decode_out(&mut i);
        each(pos, &i);
    }
}

impl<'a> Code<'a> {
    pub fn decode(elf: &Elf<'a>, s: &Section<'a>) -> Code<'a> {
        let base = if elf.elf_type.is_linked() { s.addr } else { 0 };
        let mut insns = Vec::with_capacity(s.data.len() / 4);
        let mut pos = 0u64;
        let push_range = |from: u64, to: u64, bits: u32, insns: &mut Vec<Insn>| {
            sweep(&s.data[from as usize..to as usize], base + from, bits, |p, i| {
                insns.push(Insn {
                    off: (from + p) as u32,
                    len: i.len() as u8,
                    bits: bits as u8,
                    mobility: mobility(i, bits),
                    entry: classify(i),
                })
            });
        };
        for r in elf.regions_in(s.index) {
            if r.start >= pos {
                push_range(pos, r.start, 64, &mut insns);
                push_range(r.start, r.end.min(s.data.len() as u64), r.bits, &mut insns);
                pos = r.end;
            }
        }
        push_range(pos, s.data.len() as u64, 64, &mut insns);
        Code { sec: s.index, name: s.name.to_string(), base, bytes: s.data, insns, marks: vec![0; s.data.len()] }
    }

    /// Index of the instruction starting at `off`.
    pub fn insn_at(&self, off: u64) -> Option<usize> {
        let k = self.insns.partition_point(|i| (i.off as u64) < off);
        (self.insns.get(k)?.off as u64 == off).then_some(k)
    }

    /// Index of the instruction containing `off`.
    pub fn insn_containing(&self, off: u64) -> Option<usize> {
        let k = self.insns.partition_point(|i| (i.off as u64) <= off).checked_sub(1)?;
        let i = &self.insns[k];
        (off < i.off as u64 + i.len as u64).then_some(k)
    }

    pub fn mark_range(&mut self, off: u64, len: u64, bit: u8) {
        let end = off.saturating_add(len).min(self.marks.len() as u64);
        for m in self.marks.get_mut(off as usize..end as usize).unwrap_or(&mut []) {
            *m |= bit;
        }
    }

    pub fn decode_at(&self, k: usize) -> Instruction {
        let i = &self.insns[k];
        let mut d = Decoder::with_ip(
            i.bits as u32,
            &self.bytes[i.off as usize..],
            self.base + i.off as u64,
            DecoderOptions::NONE,
        );
        d.decode()
    }

    /// Call after marking [`RELOC`] bytes (placeholders under a relocation refer to nothing).
    /// Block ends become boundaries here; the addresses the code refers to — direct branch
    /// targets, RIP-relative operands, immediates (a linked kernel compares `%rip` against
    /// code labels held as immediates, e.g. the NMI and entry code) — are returned for the
    /// caller to mark, since they may lie in another section.
    pub fn mark_flow(&mut self) -> Vec<u64> {
        let mut refs = Vec::new();
        let mut after_block_end = true;
        for k in 0..self.insns.len() {
            let ins = self.insns[k];
            // Padding never moves, so only the first real instruction after it is marked.
            if after_block_end && !self.is_int3(k) {
                self.marks[ins.off as usize] |= BOUNDARY;
            }
            after_block_end = ins.mobility != Mobility::Movable;
            let relocated =
                self.marks[ins.off as usize..ins.off as usize + ins.len as usize].iter().any(|m| m & RELOC != 0);
            if ins.bits != 64 || ins.mobility == Mobility::Fixed || relocated {
                continue;
            }
            let i = self.decode_at(k);
            if matches!(
                i.flow_control(),
                FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch | FlowControl::Call
            ) {
                refs.push(i.near_branch_target());
            }
            if i.is_ip_rel_memory_operand() {
                refs.push(i.ip_rel_memory_address());
            }
            for op in 0..i.op_count() {
                if matches!(i.op_kind(op), OpKind::Immediate32to64 | OpKind::Immediate64) {
                    refs.push(i.immediate(op));
                }
            }
        }
        refs
    }

    /// Pin every instruction `pred` accepts.
    pub fn pin_matching(&mut self, pred: fn(&Instruction) -> bool) {
        for k in 0..self.insns.len() {
            let ins = self.insns[k];
            if ins.bits == 64 && ins.mobility != Mobility::Fixed && pred(&self.decode_at(k)) {
                self.mark_range(ins.off as u64, ins.len as u64, PIN);
            }
        }
    }

    fn is_int3(&self, k: usize) -> bool {
        self.insns[k].len == 1 && self.bytes[self.insns[k].off as usize] == 0xcc
    }

    /// Runs of `int3` padding at least `min` bytes long, as `(start, end)` offsets, keeping
    /// the first `int3` of each run (it may be a straight-line-speculation barrier) and never
    /// covering a boundary.
    pub fn padding_runs(&self, min: usize) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut k = 0;
        while k < self.insns.len() {
            if self.is_int3(k) {
                let start = self.insns[k].off as u64 + 1;
                let mut end = start;
                k += 1;
                while k < self.insns.len() && self.is_int3(k) && self.marks[self.insns[k].off as usize] & BOUNDARY == 0
                {
                    end += 1;
                    k += 1;
                }
                if end - start >= min as u64 {
                    runs.push((start, end));
                }
            } else {
                k += 1;
            }
        }
        runs
    }
}
