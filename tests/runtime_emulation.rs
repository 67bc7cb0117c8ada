//! The runtime's per-kind emulation (previrt_runtime::emulate) on the host.
//!
//! - Differential, ring 3: `pushf`/`popf` (both widths) and `cpuid` are unprivileged, so the
//!   real instruction runs here and its effect on every register, the flags and the stack is
//!   compared with the emulation's.
//! - Privileged kinds (port I/O, MSRs, control registers, TLB, descriptor tables, `iretq`,
//!   `hlt`) run against a model machine; their real-CPU comparison is the register-dump guest
//!   under QEMU (tests/runtime_regdump.rs).
//!
//! Every site is built the way producers build it: the instruction is assembled by iced-x86's
//! assembler, classified and turned into a record by previrt-rewriter, and the runtime decodes
//! only that record (plus the saved bytes for RIP-relative operands).

use previrt_rewriter::iced_x86::code_asm::*;
use previrt_rewriter::iced_x86::{Decoder, DecoderOptions};
use previrt_runtime::emulate::{emulate, gpr, popf_merge, rflags, DescTable, Machine, Op, Regs};
use std::collections::HashMap;

/// Assemble one instruction at `ip`.
fn assemble(ip: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

/// The op a producer's record describes for the instruction `bytes` at `ip`.
fn op_at(ip: u64, bytes: &[u8]) -> Op {
    let ins = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).decode();
    let entry = previrt_rewriter::classify(&ins).unwrap_or_else(|| panic!("{ins} is not in the catalogue"));
    let rec = previrt_rewriter::record::operands(&ins, entry, 64);
    Op::new(&rec, ip, &bytes[..ins.len()]).expect("known kind")
}

fn op(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Op {
    op_at(0x1000, &assemble(0x1000, f))
}

/// A model machine: real memory (addresses are this process's pointers), real `cpuid`, and
/// recorded state for everything privileged.
#[derive(Default)]
struct Model {
    ports: HashMap<u16, u32>,
    port_writes: Vec<(u16, u8, u32)>,
    msrs: HashMap<u32, u64>,
    crs: [u64; 16],
    invlpg: Vec<u64>,
    halts: Vec<bool>,
    gdt: Option<DescTable>,
    idt: Option<DescTable>,
    tr: Option<u16>,
}

impl Machine for Model {
    fn read(&mut self, addr: u64, buf: &mut [u8]) {
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) }
    }
    fn write(&mut self, addr: u64, buf: &[u8]) {
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), addr as *mut u8, buf.len()) }
    }
    fn port_in(&mut self, port: u16, width: u8) -> u32 {
        let v = self.ports[&port] as u64;
        (v & ((1u64 << (8 * width)) - 1)) as u32
    }
    fn port_out(&mut self, port: u16, width: u8, value: u32) {
        self.port_writes.push((port, width, value));
    }
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
    fn rdmsr(&mut self, msr: u32) -> u64 {
        self.msrs[&msr]
    }
    fn wrmsr(&mut self, msr: u32, value: u64) {
        self.msrs.insert(msr, value);
    }
    fn read_cr(&mut self, n: u8) -> u64 {
        self.crs[n as usize]
    }
    fn write_cr(&mut self, n: u8, value: u64) {
        self.crs[n as usize] = value;
    }
    fn invlpg(&mut self, addr: u64) {
        self.invlpg.push(addr);
    }
    fn halt(&mut self, interrupts: bool) {
        self.halts.push(interrupts);
    }
    fn load_gdt(&mut self, t: DescTable) {
        self.gdt = Some(t);
    }
    fn load_idt(&mut self, t: DescTable) {
        self.idt = Some(t);
    }
    fn load_tr(&mut self, selector: u16) {
        self.tr = Some(selector);
    }
}

/// Deterministic pseudo-random register contents.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn regs(&mut self) -> Regs {
        let mut r = Regs { cs: 0x10, rflags: rflags::FIXED | rflags::IF, ..Default::default() };
        r.gpr.iter_mut().for_each(|g| *g = self.next());
        r
    }
}

fn current_cs() -> u64 {
    let sel: u64;
    unsafe { std::arch::asm!("mov {}, cs", out(reg) sel) };
    sel
}

fn current_flags() -> u64 {
    let f: u64;
    unsafe { std::arch::asm!("pushfq", "pop {}", out(reg) f) };
    f
}

// ---- differential, ring 3 ----

/// Flag bits a ring-3 test may load: everything but TF (it would single-step the test).
const LOADABLE: u64 = 0x003f_7fd5 & !rflags::TF;

/// What the CPU's RFLAGS is after `popfq` of `v` (64-bit) or `popfw` of `v` (16-bit).
fn real_popf(v: u64, wide16: bool) -> u64 {
    let after: u64;
    unsafe {
        if wide16 {
            std::arch::asm!(
                "pushfq", "sub rsp, 2", "mov word ptr [rsp], {v:x}", ".byte 0x66, 0x9d",
                "pushfq", "pop {after}", "popfq",
                v = in(reg) v, after = out(reg) after,
            );
        } else {
            std::arch::asm!(
                "pushfq", "push {v}", "popfq", "pushfq", "pop {after}", "popfq",
                v = in(reg) v, after = out(reg) after,
            );
        }
    }
    after
}

#[test]
fn popf_matches_the_cpu_in_ring_3() {
    let code_seg = current_cs();
    assert_eq!(code_seg & 3, 3, "host tests run in ring 3");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (wide16, bytes) in [(false, vec![0x9d]), (true, vec![0x66, 0x9d])] {
        let op = op_at(0x1000, &bytes);
        for i in 0..2000 {
            let v = match i {
                0 => 0,
                1 => LOADABLE,
                _ => rng.next() & LOADABLE | rng.next() & (rflags::IF | rflags::IOPL),
            };
            let before = current_flags();
            let real = real_popf(v, wide16);
            let mut stack = [0u64; 2];
            stack[0] = v;
            let mut regs = Regs { cs: code_seg, rflags: before, ..Default::default() };
            regs.gpr[gpr::RSP] = stack.as_ptr() as u64;
            assert!(emulate(&op, &mut regs, &mut Model::default()));
            let w = if wide16 { 2 } else { 8 };
            assert_eq!(regs.gpr[gpr::RSP], stack.as_ptr() as u64 + w, "rsp after popf (width {w})");
            assert_eq!(
                regs.rflags,
                real,
                "popf{} of {v:#x}: emulated {:#x}, cpu {real:#x}",
                if wide16 { "w" } else { "q" },
                regs.rflags
            );
            assert_eq!(popf_merge(before, v, 3, w as u8), real);
        }
    }
}

#[test]
fn pushf_matches_the_cpu_in_ring_3() {
    let code_seg = current_cs();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for (wide16, bytes) in [(false, vec![0x9c]), (true, vec![0x66, 0x9c])] {
        let op = op_at(0x1000, &bytes);
        for _ in 0..500 {
            let v = rng.next() & LOADABLE;
            // The real image: load v, then pushf into a buffer (no flag-changing instruction
            // in between); `flags` is what the CPU held.
            let (flags, image): (u64, u64);
            unsafe {
                if wide16 {
                    std::arch::asm!(
                        "pushfq", "push {v}", "popfq", "pushfq", "pop {flags}",
                        "push 0", "lea rsp, [rsp + 2]", ".byte 0x66, 0x9c", "pop {img}", "popfq",
                        v = in(reg) v, flags = out(reg) flags, img = out(reg) image,
                    );
                } else {
                    std::arch::asm!(
                        "pushfq", "push {v}", "popfq", "pushfq", "pop {flags}", "pushfq", "pop {img}", "popfq",
                        v = in(reg) v, flags = out(reg) flags, img = out(reg) image,
                    );
                }
            }
            let mut stack = [0u64; 2];
            let top = stack.as_mut_ptr() as u64 + 16;
            let mut regs = Regs { cs: code_seg, rflags: flags, ..Default::default() };
            regs.gpr[gpr::RSP] = top;
            assert!(emulate(&op, &mut regs, &mut Model::default()));
            let w = if wide16 { 2 } else { 8 };
            assert_eq!(regs.gpr[gpr::RSP], top - w);
            let pushed = if wide16 { (stack[1] >> 48) & 0xffff } else { stack[1] };
            let real = if wide16 { image & 0xffff } else { image };
            assert_eq!(pushed, real, "pushf image for {v:#x}");
        }
    }
}

/// Runs `cpuid` with every GPR loaded from `regs` (except rsp) and stores them back.
fn real_cpuid(regs: &mut [u64; 16]) {
    unsafe {
        std::arch::asm!(
            "push rbx", "push rbp", "push rdi",
            "mov rax, [rdi]", "mov rcx, [rdi+8]", "mov rdx, [rdi+16]", "mov rbx, [rdi+24]",
            "mov rbp, [rdi+40]", "mov rsi, [rdi+48]",
            "mov r8, [rdi+64]", "mov r9, [rdi+72]", "mov r10, [rdi+80]", "mov r11, [rdi+88]",
            "mov r12, [rdi+96]", "mov r13, [rdi+104]", "mov r14, [rdi+112]", "mov r15, [rdi+120]",
            "mov rdi, [rdi+56]",
            "cpuid",
            "xchg rdi, [rsp]",
            "mov [rdi], rax", "mov [rdi+8], rcx", "mov [rdi+16], rdx", "mov [rdi+24], rbx",
            "mov [rdi+40], rbp", "mov [rdi+48], rsi",
            "mov [rdi+64], r8", "mov [rdi+72], r9", "mov [rdi+80], r10", "mov [rdi+88], r11",
            "mov [rdi+96], r12", "mov [rdi+104], r13", "mov [rdi+112], r14", "mov [rdi+120], r15",
            "pop rax", "mov [rdi+56], rax",
            "pop rbp", "pop rbx",
            inout("rdi") regs.as_mut_ptr() => _,
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
        );
    }
}

#[test]
fn cpuid_matches_the_cpu_on_every_register() {
    let op = op(|a| a.cpuid());
    let mut rng = Rng(77);
    for (leaf, sub) in [(0, 0), (1, 0), (7, 0), (0xd, 1), (0x8000_0000, 0), (0x8000_0001, 0), (0x4000_0000, 0)] {
        let mut regs = rng.regs();
        regs.gpr[gpr::RAX] = (rng.next() << 32) | leaf;
        regs.gpr[gpr::RCX] = (rng.next() << 32) | sub;
        let mut real = regs.gpr;
        real_cpuid(&mut real);
        assert!(emulate(&op, &mut regs, &mut Model::default()));
        for (i, (e, r)) in regs.gpr.iter().zip(&real).enumerate() {
            if i != gpr::RSP {
                assert_eq!(e, r, "cpuid leaf {leaf:#x}.{sub}: register {i} emulated {e:#x}, cpu {r:#x}");
            }
        }
    }
}

// ---- privileged kinds against the model ----

#[test]
fn port_io_uses_the_record_operands() {
    let mut rng = Rng(5);
    let mut m = Model::default();
    m.ports.insert(0x71, 0xab);
    m.ports.insert(0x3fd, 0x1234_5678);
    let mut r = rng.regs();
    let before = r.gpr[gpr::RAX];
    assert!(emulate(&op(|a| a.in_(al, 0x71)), &mut r, &mut m));
    assert_eq!(r.gpr[gpr::RAX], (before & !0xff) | 0xab, "in al keeps the upper bits");
    r.gpr[gpr::RDX] = 0xffff_0000_0000_03fd;
    assert!(emulate(&op(|a| a.in_(eax, dx)), &mut r, &mut m));
    assert_eq!(r.gpr[gpr::RAX], 0x1234_5678, "in eax zero-extends");
    r.gpr[gpr::RAX] = 0xaaaa_bbbb_cccc_dddd;
    assert!(emulate(&op(|a| a.in_(ax, dx)), &mut r, &mut m));
    assert_eq!(r.gpr[gpr::RAX], 0xaaaa_bbbb_cccc_5678, "in ax keeps the upper bits");
    r.gpr[gpr::RAX] = 0xdead_beef_cafe_f00d;
    assert!(emulate(&op(|a| a.out(0xf4, al)), &mut r, &mut m));
    assert!(emulate(&op(|a| a.out(dx, ax)), &mut r, &mut m));
    assert!(emulate(&op(|a| a.out(dx, eax)), &mut r, &mut m));
    assert_eq!(m.port_writes, vec![(0xf4, 1, 0x0d), (0x3fd, 2, 0xf00d), (0x3fd, 4, 0xcafe_f00d)]);
}

#[test]
fn msrs_split_and_join_edx_eax() {
    let mut rng = Rng(6);
    let mut m = Model::default();
    m.msrs.insert(0x277, 0x0007_0406_0007_0406);
    let mut r = rng.regs();
    r.gpr[gpr::RCX] = 0xffff_ffff_0000_0277;
    let before = r;
    assert!(emulate(&op(|a| a.rdmsr()), &mut r, &mut m));
    assert_eq!((r.gpr[gpr::RAX], r.gpr[gpr::RDX]), (0x0007_0406, 0x0007_0406));
    assert_eq!(r.gpr[gpr::RBX], before.gpr[gpr::RBX]);
    r.gpr[gpr::RAX] = 0xffff_ffff_1111_2222;
    r.gpr[gpr::RDX] = 0xffff_ffff_3333_4444;
    assert!(emulate(&op(|a| a.wrmsr()), &mut r, &mut m));
    assert_eq!(m.msrs[&0x277], 0x3333_4444_1111_2222);
}

#[test]
fn control_registers_move_through_the_named_gpr() {
    let mut rng = Rng(7);
    let mut m = Model::default();
    let mut r = rng.regs();
    r.gpr[12] = 0x0000_0000_0123_4000;
    assert!(emulate(&op(|a| a.mov(cr3, r12)), &mut r, &mut m));
    assert_eq!(m.crs[3], 0x0123_4000);
    m.crs[4] = 0x6f0;
    assert!(emulate(&op(|a| a.mov(rsi, cr4)), &mut r, &mut m));
    assert_eq!(r.gpr[6], 0x6f0);
    m.crs[0] = 0x8005_0033;
    assert!(emulate(&op(|a| a.mov(rax, cr0)), &mut r, &mut m));
    assert_eq!(r.gpr[gpr::RAX], 0x8005_0033);
}

#[test]
fn memory_operands_are_computed_from_the_record() {
    let mut rng = Rng(8);
    let mut m = Model::default();
    let mut r = rng.regs();
    r.gpr[3] = 0x10_0000;
    r.gpr[9] = 3;
    assert!(emulate(&op(|a| a.invlpg(ptr(rbx + r9 * 8 + 0x40))), &mut r, &mut m));
    assert_eq!(m.invlpg, vec![0x10_0000 + 24 + 0x40]);

    // An absolute operand: the displacement comes from the (linked) bytes, not the record,
    // which the assembler path writes before the linker fills the address in.
    let bytes = assemble(0x1000, |a| a.invlpg(ptr(0x0012_3456u64)));
    let mut abs = op_at(0x1000, &bytes);
    assert_eq!(abs.imm, 0x12_3456, "the record carries the displacement the bytes have");
    abs.imm = 0;
    assert!(emulate(&abs, &mut r, &mut m));
    assert_eq!(m.invlpg.last(), Some(&0x12_3456));

    // lgdt/lidt read a 10-byte operand; RIP-relative operands are relative to the site.
    let table: [u8; 10] = [0x27, 0x00, 0x00, 0x30, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00];
    let site = table.as_ptr() as u64 + 0x100;
    let disp = table.as_ptr() as i64 - (site as i64 + 7);
    // lgdt disp32(%rip): 0f 01 15 disp32.
    let mut bytes = vec![0x0f, 0x01, 0x15];
    bytes.extend_from_slice(&(disp as i32).to_le_bytes());
    assert!(emulate(&op_at(site, &bytes), &mut r, &mut m));
    assert_eq!(m.gdt, Some(DescTable { limit: 0x27, base: 0x10_3000 }));
    r.gpr[gpr::RAX] = table.as_ptr() as u64;
    assert!(emulate(&op(|a| a.lidt(ptr(rax))), &mut r, &mut m));
    assert_eq!(m.idt, Some(DescTable { limit: 0x27, base: 0x10_3000 }));

    r.gpr[gpr::RAX] = 0xffff_0028;
    assert!(emulate(&op(|a| a.ltr(ax)), &mut r, &mut m));
    assert_eq!(m.tr, Some(0x28));
}

#[test]
fn interrupt_flag_kinds_and_hlt() {
    let mut m = Model::default();
    let mut r = Regs { cs: 0x10, rflags: rflags::FIXED | rflags::IF, ..Default::default() };
    assert!(emulate(&op(|a| a.cli()), &mut r, &mut m));
    assert_eq!(r.rflags & rflags::IF, 0);
    assert!(emulate(&op(|a| a.hlt()), &mut r, &mut m));
    assert!(emulate(&op(|a| a.sti()), &mut r, &mut m));
    assert!(emulate(&op(|a| a.hlt()), &mut r, &mut m));
    assert_eq!(m.halts, vec![false, true]);
    // At CPL 0 popf may change IF and IOPL.
    let mut stack = [rflags::FIXED | rflags::IOPL | rflags::CF, 0];
    r.gpr[gpr::RSP] = stack.as_mut_ptr() as u64;
    assert!(emulate(&op(|a| a.popfq()), &mut r, &mut m));
    assert_eq!(r.rflags, rflags::FIXED | rflags::IOPL | rflags::CF);
}

#[test]
fn iretq_pops_a_full_frame_into_the_iret_state() {
    let mut m = Model::default();
    let mut r = Regs { cs: 0x10, rflags: rflags::FIXED, ..Default::default() };
    let frame = [0x1234_5678u64, 0x33, rflags::FIXED | rflags::IF | rflags::ZF, 0x7fff_0000, 0x2b];
    r.gpr[gpr::RSP] = frame.as_ptr() as u64;
    assert!(emulate(&op(|a| a.iretq()), &mut r, &mut m));
    assert_eq!((r.rip, r.cs, r.gpr[gpr::RSP], r.ss), (0x1234_5678, 0x33, 0x7fff_0000, 0x2b));
    assert_eq!(r.rflags, rflags::FIXED | rflags::IF | rflags::ZF);
    // iretd (no REX.W) is left to out-of-line execution.
    let mut r2 = r;
    assert!(!emulate(&op(|a| a.iretd()), &mut r2, &mut m));
}
