//! Per-kind emulation of sensitive instructions: pure functions over a register file
//! ([`Regs`]) and the platform primitives of a [`Machine`].
//!
//! Every backend that routes a site through the runtime performs the site's effect with these
//! handlers; backends differ only in their `Machine` (real hardware for `trace`, hypercalls and
//! in-guest device models for the virtual backends). The host tests run the same handlers
//! against the real CPU in ring 3 and against models.

use previrt_site_abi::{flags, reg, Kind, SiteRecord};

/// RFLAGS bits the emulation touches.
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    /// Bit 1 reads as 1.
    pub const FIXED: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// Bits `popf`/`iret` may change at any privilege level.
    pub const ALWAYS_WRITABLE: u64 = CF | PF | AF | ZF | SF | TF | DF | OF | NT | AC | ID;
}

/// General-purpose register numbers (hardware order) used to index [`Regs::gpr`].
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
}

/// The register state at a site, laid out as the trace stub saves it: the 16 GPRs in hardware
/// order (`gpr[4]` is the site's `%rsp`), then an `iretq` frame the stub returns through.
/// Handlers read and write `gpr`, `rip` and `rflags`; the dispatcher copies `gpr[4]` into
/// `iret_rsp` before returning.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Regs {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub iret_rsp: u64,
    pub ss: u64,
}

impl Regs {
    /// Current privilege level.
    pub fn cpl(&self) -> u64 {
        self.cs & 3
    }

    /// Read a GPR ([`reg`] encoding) at `width` bytes, zero-extended.
    pub fn read(&self, r: u8, width: u8) -> u64 {
        self.gpr[reg::number(r) as usize] & mask(width)
    }

    /// Write a GPR with x86-64 semantics: 4-byte writes zero the upper half, 1- and 2-byte
    /// writes keep the other bits.
    pub fn write(&mut self, r: u8, width: u8, value: u64) {
        let slot = &mut self.gpr[reg::number(r) as usize];
        *slot = match width {
            4 => value & 0xffff_ffff,
            8 => value,
            _ => (*slot & !mask(width)) | (value & mask(width)),
        };
    }

    fn push(&mut self, m: &mut dyn Machine, width: u8, value: u64) {
        self.gpr[gpr::RSP] = self.gpr[gpr::RSP].wrapping_sub(width as u64);
        m.write(self.gpr[gpr::RSP], &value.to_le_bytes()[..width as usize]);
    }

    fn pop(&mut self, m: &mut dyn Machine, width: u8) -> u64 {
        let mut b = [0u8; 8];
        m.read(self.gpr[gpr::RSP], &mut b[..width as usize]);
        self.gpr[gpr::RSP] = self.gpr[gpr::RSP].wrapping_add(width as u64);
        u64::from_le_bytes(b)
    }
}

fn mask(width: u8) -> u64 {
    match width {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// A descriptor-table register image (`lgdt`/`lidt` operand in 64-bit mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescTable {
    pub limit: u16,
    pub base: u64,
}

impl DescTable {
    /// The 10-byte image `sgdt`/`sidt` store in 64-bit mode: limit, then base.
    pub fn image(&self) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[..2].copy_from_slice(&self.limit.to_le_bytes());
        b[2..].copy_from_slice(&self.base.to_le_bytes());
        b
    }

    /// The table an [`image`](Self::image) describes.
    pub fn from_image(b: &[u8; 10]) -> DescTable {
        DescTable {
            limit: u16::from_le_bytes([b[0], b[1]]),
            base: u64::from_le_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]]),
        }
    }
}

/// Whether a 64-bit IDT gate descriptor is an interrupt gate (the CPU clears IF through it),
/// not a trap gate.
pub fn interrupt_gate(g: &[u8; 16]) -> bool {
    g[5] & 0xf == 0xe
}

/// The handler address a 64-bit IDT gate descriptor names (offset bits 0-15, 16-31, 32-63).
pub fn gate_handler(g: &[u8; 16]) -> u64 {
    u64::from(u16::from_le_bytes([g[0], g[1]]))
        | u64::from(u16::from_le_bytes([g[6], g[7]])) << 16
        | u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]])) << 32
}

/// The platform primitives a backend provides. Memory addresses are the kernel's virtual
/// addresses. The interrupt flag defaults to the saved RFLAGS; a backend with a virtual
/// interrupt flag (shared memory) overrides [`Machine::interrupt_flag`] and
/// [`Machine::set_interrupt_flag`].
pub trait Machine {
    fn read(&mut self, addr: u64, buf: &mut [u8]);
    fn write(&mut self, addr: u64, buf: &[u8]);
    fn port_in(&mut self, port: u16, width: u8) -> u32;
    fn port_out(&mut self, port: u16, width: u8, value: u32);
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    fn rdmsr(&mut self, msr: u32) -> u64;
    fn wrmsr(&mut self, msr: u32, value: u64);
    fn read_cr(&mut self, n: u8) -> u64;
    fn write_cr(&mut self, n: u8, value: u64);
    fn invlpg(&mut self, addr: u64);
    /// Wait for an interrupt; `interrupts` is the kernel's interrupt flag at the `hlt`.
    fn halt(&mut self, interrupts: bool);
    fn load_gdt(&mut self, table: DescTable);
    fn load_idt(&mut self, table: DescTable);
    fn load_tr(&mut self, selector: u16);

    /// A load (`store` None) or store of `width` bytes at `addr` by a memory-access site
    /// (`mmio_*`/`pt_*`, from `previrt annotate`): the value read, or `Some(0)` for a store,
    /// when the backend models that address; `None` runs the original instruction.
    fn memory(&mut self, _kind: Kind, _addr: u64, _width: u8, _store: Option<u64>) -> Option<u64> {
        None
    }

    fn interrupt_flag(&mut self, regs: &Regs) -> bool {
        regs.rflags & rflags::IF != 0
    }
    fn set_interrupt_flag(&mut self, regs: &mut Regs, on: bool) {
        regs.rflags = if on { regs.rflags | rflags::IF } else { regs.rflags & !rflags::IF };
    }
}

/// Everything a handler needs to know about a site, taken from its record and its saved
/// original bytes (no re-decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub kind: Kind,
    pub flags: u16,
    pub insn_len: u8,
    pub width: u8,
    pub reg: u8,
    pub base: u8,
    pub index: u8,
    pub scale: u8,
    pub imm: i32,
    /// Where the saved bytes were taken from (the site): RIP-relative operands are relative
    /// to `addr + insn_len`.
    pub addr: u64,
    /// The original instruction bytes as relocated at `addr`.
    pub insn: [u8; 15],
}

impl Op {
    /// Build an op from a record, its site address and the bytes saved from there.
    pub fn new(rec: &SiteRecord, addr: u64, saved: &[u8]) -> Option<Op> {
        let mut insn = [0u8; 15];
        let n = saved.len().min(15);
        insn[..n].copy_from_slice(&saved[..n]);
        Some(Op {
            kind: rec.kind()?,
            flags: rec.flags,
            insn_len: rec.insn_len,
            width: rec.width,
            reg: rec.reg,
            base: rec.base,
            index: rec.index,
            scale: rec.scale,
            imm: rec.imm,
            addr,
            insn,
        })
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Offset of the opcode in the saved bytes: after the legacy prefixes and REX.
    fn opcode_at(&self) -> Option<usize> {
        self.insn[..(self.insn_len as usize).min(15)]
            .iter()
            .position(|b| !matches!(b, 0x26 | 0x2e | 0x36 | 0x3e | 0x64..=0x67 | 0xf0 | 0xf2 | 0xf3 | 0x40..=0x4f))
    }

    /// Offset of an absolute operand's displacement: after the opcode (one byte, or 0f and
    /// one), the ModRM byte and the SIB byte (64-bit code reaches an absolute address only
    /// through a SIB byte; ModRM alone would be RIP-relative). An immediate may follow it.
    fn absolute_disp_at(&self) -> Option<usize> {
        let op = self.opcode_at()?;
        let at = op + if self.insn[op] == 0x0f { 2 } else { 1 } + 2;
        (at + 4 <= self.insn_len as usize).then_some(at)
    }

    /// Effective address of the memory operand.
    ///
    /// An absolute operand (no base, no index) takes its displacement from the saved bytes,
    /// because that is where the linker put the symbol's address; a record written from an
    /// unlinked object holds only the addend.
    pub fn address(&self, regs: &Regs) -> u64 {
        let disp32_at = |at: usize| {
            let at = at.min(11);
            i32::from_le_bytes([self.insn[at], self.insn[at + 1], self.insn[at + 2], self.insn[at + 3]])
        };
        let absolute = reg::class(self.base) != reg::GPR && reg::class(self.index) != reg::GPR;
        let (base, disp) = if self.has(flags::RIP_RELATIVE) {
            (self.addr.wrapping_add(self.insn_len as u64), disp32_at(self.imm as usize))
        } else if let Some(at) = self.absolute_disp_at().filter(|_| absolute) {
            (0, disp32_at(at))
        } else {
            let base = if reg::class(self.base) == reg::GPR { regs.read(self.base, 8) } else { 0 };
            (base, self.imm)
        };
        let index = if reg::class(self.index) == reg::GPR { regs.read(self.index, 8) } else { 0 };
        base.wrapping_add(disp as i64 as u64).wrapping_add(index.wrapping_mul(self.scale as u64))
    }

    /// Port number of an `in`/`out`: the immediate or `%dx`.
    pub fn port(&self, regs: &Regs) -> u16 {
        if self.has(flags::IMM_PORT) {
            self.imm as u8 as u16
        } else {
            regs.read(reg::gpr(gpr::RDX as u8), 2) as u16
        }
    }
}

/// A per-kind handler: perform the site's effect. Returns false when this form of the kind is
/// not emulated (the caller then runs the original instruction out of line). On entry
/// `regs.rip` is where execution continues after the site; `iret` replaces it.
pub type Handler = fn(&Op, &mut Regs, &mut dyn Machine) -> bool;

/// The emulated kinds. A kind missing here is executed out of line by the trace backend.
pub const HANDLERS: &[(Kind, Handler)] = &[
    (Kind::Cli, cli),
    (Kind::Sti, sti),
    (Kind::Pushf, pushf),
    (Kind::Popf, popf),
    (Kind::Iret, iret),
    (Kind::In, port_in),
    (Kind::Out, port_out),
    (Kind::Cpuid, cpuid),
    (Kind::Rdmsr, rdmsr),
    (Kind::Wrmsr, wrmsr),
    (Kind::MovCr, mov_cr),
    (Kind::Invlpg, invlpg),
    (Kind::Hlt, hlt),
    (Kind::Lgdt, lgdt),
    (Kind::Lidt, lidt),
    (Kind::Ltr, ltr),
    (Kind::MmioRead, memory_access),
    (Kind::MmioWrite, memory_access),
    (Kind::PtRead, memory_access),
    (Kind::PtWrite, memory_access),
];

/// The handler for a kind, if it is emulated.
pub fn handler(kind: Kind) -> Option<Handler> {
    HANDLERS.iter().find(|(k, _)| *k == kind).map(|(_, h)| *h)
}

/// Emulate `op`; false if it is not emulated.
pub fn emulate(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    handler(op.kind).is_some_and(|h| h(op, regs, m))
}

/// Sites in 16/32-bit code are never routed here; `flags::CODE*` ops are refused.
fn long_mode(op: &Op) -> bool {
    !op.has(flags::CODE32 | flags::CODE16)
}

fn cli(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    long_mode(op) && {
        m.set_interrupt_flag(regs, false);
        true
    }
}

fn sti(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    long_mode(op) && {
        m.set_interrupt_flag(regs, true);
        true
    }
}

/// The RFLAGS image `pushf` stores: RF and VM read as 0, IF as the machine sees it.
fn pushed_flags(regs: &Regs, m: &mut dyn Machine) -> u64 {
    let base = regs.rflags & !(rflags::RF | rflags::VM | rflags::IF);
    base | if m.interrupt_flag(regs) { rflags::IF } else { 0 }
}

/// Operand width of pushf/popf/iret in 64-bit code: 8, or 2 with a 66 prefix. `iretd` (no
/// REX.W) and 32-bit forms are not emulated.
fn stack_width(op: &Op) -> Option<u8> {
    match (op.kind, op.has(flags::WIDE)) {
        (Kind::Iret, true) => Some(8),
        (Kind::Iret, false) => None,
        (_, true) => Some(2),
        (_, false) => Some(8),
    }
}

fn pushf(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    let Some(w) = stack_width(op).filter(|_| long_mode(op)) else { return false };
    let v = pushed_flags(regs, m);
    regs.push(m, w, v);
    true
}

/// Merge a popped RFLAGS image the way `popf` does at the current privilege level: IOPL only
/// at CPL 0, IF only when CPL <= IOPL; VM, VIF, VIP kept; RF cleared; a 16-bit pop changes the
/// low 16 bits only.
pub fn popf_merge(old: u64, popped: u64, cpl: u64, width: u8) -> u64 {
    let iopl = (old & rflags::IOPL) >> 12;
    let mut writable = rflags::ALWAYS_WRITABLE;
    if cpl == 0 {
        writable |= rflags::IOPL;
    }
    if cpl <= iopl {
        writable |= rflags::IF;
    }
    writable &= mask(width);
    ((old & !writable) | (popped & writable) | rflags::FIXED) & !rflags::RF
}

fn popf(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    let Some(w) = stack_width(op).filter(|_| long_mode(op)) else { return false };
    let popped = regs.pop(m, w);
    let interrupts = m.interrupt_flag(regs);
    let old = (regs.rflags & !rflags::IF) | if interrupts { rflags::IF } else { 0 };
    let new = popf_merge(old, popped, regs.cpl(), w);
    regs.rflags = (new & !rflags::IF) | (regs.rflags & rflags::IF);
    m.set_interrupt_flag(regs, new & rflags::IF != 0);
    true
}

/// `iretq`: pop RIP, CS, RFLAGS, RSP, SS. The trace stub returns through the resulting iret
/// frame, so a privilege change is performed by the real `iretq`.
fn iret(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    if stack_width(op).is_none() || !long_mode(op) {
        return false;
    }
    let rip = regs.pop(m, 8);
    let cs = regs.pop(m, 8) & 0xffff;
    let popped = regs.pop(m, 8);
    let rsp = regs.pop(m, 8);
    let ss = regs.pop(m, 8) & 0xffff;
    let keep = rflags::VM | rflags::VIF | rflags::VIP;
    let new = ((regs.rflags & keep) | (popped & !keep) | rflags::FIXED) & !rflags::RF;
    regs.rip = rip;
    regs.cs = cs;
    regs.ss = ss;
    regs.gpr[gpr::RSP] = rsp;
    regs.rflags = (new & !rflags::IF) | (regs.rflags & rflags::IF);
    m.set_interrupt_flag(regs, new & rflags::IF != 0);
    true
}

fn io_width(op: &Op) -> Option<u8> {
    Some(op.width).filter(|w| matches!(w, 1 | 2 | 4) && long_mode(op) && !op.has(flags::REP))
}

fn port_in(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    let Some(w) = io_width(op) else { return false };
    let v = m.port_in(op.port(regs), w);
    regs.write(reg::gpr(gpr::RAX as u8), w, v as u64);
    true
}

fn port_out(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    let Some(w) = io_width(op) else { return false };
    let v = regs.read(reg::gpr(gpr::RAX as u8), w) as u32;
    m.port_out(op.port(regs), w, v);
    true
}

fn write32(regs: &mut Regs, r: usize, v: u32) {
    regs.write(reg::gpr(r as u8), 4, v as u64);
}

fn cpuid(_: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    let [a, b, c, d] = m.cpuid(regs.gpr[gpr::RAX] as u32, regs.gpr[gpr::RCX] as u32);
    write32(regs, gpr::RAX, a);
    write32(regs, gpr::RBX, b);
    write32(regs, gpr::RCX, c);
    write32(regs, gpr::RDX, d);
    true
}

fn rdmsr(_: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    let v = m.rdmsr(regs.gpr[gpr::RCX] as u32);
    write32(regs, gpr::RAX, v as u32);
    write32(regs, gpr::RDX, (v >> 32) as u32);
    true
}

fn wrmsr(_: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    let v = (regs.gpr[gpr::RDX] << 32) | (regs.gpr[gpr::RAX] & 0xffff_ffff);
    m.wrmsr(regs.gpr[gpr::RCX] as u32, v);
    true
}

fn mov_cr(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    if reg::class(op.base) != reg::CR || reg::class(op.reg) != reg::GPR || !long_mode(op) {
        return false;
    }
    let n = reg::number(op.base);
    if op.has(flags::WRITE) {
        m.write_cr(n, regs.read(op.reg, 8));
    } else {
        let v = m.read_cr(n);
        regs.write(op.reg, 8, v);
    }
    true
}

fn invlpg(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    op.has(flags::MEM) && {
        m.invlpg(op.address(regs));
        true
    }
}

/// The data of a plain `mov` between a register or an immediate and memory: opcode (after
/// legacy and REX prefixes) and where the data is. Other forms (read-modify-write, `movzx`,
/// string moves) run the original instruction. (Byte-register moves are left out: without
/// REX, registers 4-7 name %ah-%bh.)
const MOVES: &[(u8, MovData)] =
    &[(0x8b, MovData::Load), (0x89, MovData::Register), (0xc7, MovData::Immediate), (0xc6, MovData::Immediate)];

#[derive(Clone, Copy, PartialEq, Eq)]
enum MovData {
    /// Memory to a register.
    Load,
    /// A register to memory.
    Register,
    /// The immediate ending the instruction to memory.
    Immediate,
}

/// A memory-access site's `mov` (the form `previrt annotate` makes sites of): its address,
/// width, and for a store the value written. None for any other form, or a record whose
/// direction disagrees with the opcode.
pub fn mov_operands(op: &Op, regs: &Regs) -> Option<(u64, u8, Option<u64>)> {
    let opcode = op.insn[op.opcode_at()?];
    let &(_, data) = MOVES.iter().find(|(o, _)| *o == opcode)?;
    let usable = op.has(flags::MEM)
        && long_mode(op)
        && matches!(op.width, 1 | 2 | 4 | 8)
        && op.has(flags::WRITE) == (data != MovData::Load)
        && (data == MovData::Immediate || reg::class(op.reg) == reg::GPR);
    if !usable {
        return None;
    }
    let store = match data {
        MovData::Load => None,
        MovData::Register => Some(regs.read(op.reg, op.width)),
        MovData::Immediate => {
            // imm8/16/32, sign-extended for 8-byte stores.
            let (n, end) = (op.width.min(4) as usize, (op.insn_len as usize).min(15));
            let mut b = [0u8; 4];
            b[..n].copy_from_slice(&op.insn[end.checked_sub(n)?..end]);
            let v = if n == 4 { i32::from_le_bytes(b) as i64 as u64 } else { u32::from_le_bytes(b) as u64 };
            Some(v & mask(op.width))
        }
    };
    Some((op.address(regs), op.width, store))
}

/// A memory-access site: the machine's model of that address, if it has one.
fn memory_access(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    let Some((at, width, store)) = mov_operands(op, regs) else { return false };
    let Some(v) = m.memory(op.kind, at, width, store) else { return false };
    if store.is_none() {
        regs.write(op.reg, width, v);
    }
    true
}

fn hlt(_: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    let interrupts = m.interrupt_flag(regs);
    m.halt(interrupts);
    true
}

fn table_operand(op: &Op, regs: &Regs, m: &mut dyn Machine) -> Option<DescTable> {
    if !op.has(flags::MEM) || !long_mode(op) {
        return None;
    }
    let mut b = [0u8; 10];
    m.read(op.address(regs), &mut b);
    let mut base = [0u8; 8];
    base.copy_from_slice(&b[2..]);
    Some(DescTable { limit: u16::from_le_bytes([b[0], b[1]]), base: u64::from_le_bytes(base) })
}

fn lgdt(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    table_operand(op, regs, m).map(|t| m.load_gdt(t)).is_some()
}

fn lidt(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    table_operand(op, regs, m).map(|t| m.load_idt(t)).is_some()
}

fn ltr(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    let selector = if op.has(flags::MEM) {
        let mut b = [0u8; 2];
        m.read(op.address(regs), &mut b);
        u16::from_le_bytes(b)
    } else if reg::class(op.reg) == reg::GPR {
        regs.read(op.reg, 2) as u16
    } else {
        return false;
    };
    m.load_tr(selector);
    true
}
