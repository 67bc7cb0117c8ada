//! The x86-64 sensitive-instruction catalogue, as data.
//!
//! [`ENTRIES`] is one static table. Each row names a [`Kind`] (from the site ABI), the exact
//! iced-x86 [`Code`]s (encodings) it covers, the operand [`Shape`], which way the special state
//! flows ([`Access`]), the minimum site length the runtime needs, whether the kind is patched by
//! default, and why the instruction is sensitive. A kind may have more than one row (e.g. far
//! `call` with an immediate pointer vs. a memory pointer).
//!
//! [`classify`] maps a decoded instruction to its row with one array lookup indexed by
//! [`Code`]; nothing else is consulted, so the same answer holds for an instruction decoded
//! from bytes, built by the encoder, or produced by the assembler wrapper.
//!
//! Deliberately *not* in the table: `int3` (millions of padding bytes in Linux), `int1`,
//! `into`, `syscall`/`sysenter` (they enter the kernel and are handled by the runtime's entry
//! path), push/pop of es/cs/ss/ds (invalid in 64-bit code), `monitorx`/`mwaitx` (unprivileged
//! AMD variants), the 386 test-register moves.

use iced_x86::{Code, Instruction};
use previrt_site_abi::{Class, Kind};
use std::sync::OnceLock;

/// The operand pattern of an entry. Informational for reports and for [`crate::record`]:
/// the record filler reads the operands from the instruction itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// No explicit operands (`cli`, `cpuid`, `swapgs`, `pushf`, `iretq`, `lret` …).
    None,
    /// A control or debug register and a general-purpose register (`mov %cr3,%rax`).
    SpecialGpr,
    /// A segment register and a 16-bit register or memory operand (`mov %ax,%ds`).
    SegRm,
    /// A segment register only (`push %fs`, `pop %gs`).
    Seg,
    /// A memory operand only (`lgdt (%rax)`, `invlpg (%rdi)`, `ljmp *(%rax)`).
    Mem,
    /// A 16-bit register or memory operand (`lldt %ax`, `str (%rdi)`, `smsw %eax`).
    Rm,
    /// A register and a register-or-memory operand (`lar %cx,%eax`, `invpcid (%rdi),%rax`).
    RegRm,
    /// One general-purpose register (`rdgsbase %rax`).
    Gpr,
    /// Port I/O: `%al/%ax/%eax` and an 8-bit immediate port or `%dx`.
    Port,
    /// String port I/O: `%dx` and an implicit `(%rdi)`/`(%rsi)` buffer, optional `rep`.
    StringPort,
    /// An immediate: `int $n` (vector), `lret $n` (bytes to pop).
    Imm,
    /// An immediate far pointer `$sel,$off` (only outside 64-bit mode).
    FarPtr,
}

/// Which way the sensitive state flows. Drives [`previrt_site_abi::flags::WRITE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Reads the special register / port / descriptor state.
    Read,
    /// Writes it.
    Write,
    /// A `mov`: writes when the first (destination) operand is the special register.
    ByOperand,
}

/// Whether the CPU stops a deprivileged kernel at this instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sensitivity {
    /// Faults (`#GP`/`#UD`) outside ring 0, or when IOPL / CR4 bits forbid it: the kernel
    /// would crash, or the hypervisor must trap and emulate at great cost.
    Trapping,
    /// Runs without a fault outside ring 0 but gives a silently different result (wrong IF,
    /// host descriptor tables, CPL-dependent checks, host identity or time).
    Silent,
    /// Either, depending on a control bit the hypervisor may not control (CR4.UMIP,
    /// CR4.TSD, CR4.PCE, IOPL, CPUID faulting).
    Conditional,
}

impl Sensitivity {
    pub const fn name(self) -> &'static str {
        match self {
            Sensitivity::Trapping => "trapping",
            Sensitivity::Silent => "silent",
            Sensitivity::Conditional => "conditional",
        }
    }
}

/// One row of the catalogue.
#[derive(Debug)]
pub struct Entry {
    /// The site-ABI kind; its [`Kind::name`] is the report name, [`Kind::class`] the class.
    pub kind: Kind,
    /// Every encoding this row covers.
    pub codes: &'static [Code],
    /// Operand pattern.
    pub shape: Shape,
    /// Direction of the sensitive access.
    pub access: Access,
    /// Bytes a site of this kind needs at least: the runtime replaces a site with at most a
    /// 5-byte `call rel32` into its handler, so `site_len = max(insn_len, min_site_len)`.
    pub min_site_len: u8,
    /// `false` for the time class (`rdtsc`, `rdtscp`): reported, but not patched unless asked.
    pub patched_by_default: bool,
    /// Trapping, silently wrong, or conditional.
    pub sensitivity: Sensitivity,
    /// The AT&T forms this row covers, for documentation.
    pub forms: &'static str,
    /// Why a deprivileged or hypervisor-hosted kernel must not run it natively.
    pub why: &'static str,
}

impl Entry {
    /// The kind's class (the same as `self.kind.class()`).
    pub fn class(&self) -> Class {
        self.kind.class()
    }
    /// The report name of the kind (`"mov_cr"`, `"pushf"`, …).
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }
    /// Site length for an instruction of `insn_len` bytes.
    pub fn site_len(&self, insn_len: usize) -> u8 {
        insn_len.max(self.min_site_len as usize).min(u8::MAX as usize) as u8
    }
}

/// The runtime's longest replacement: a 5-byte `call rel32` into the handler.
pub const CALL_REL32_LEN: u8 = 5;

use Access::*;
use Sensitivity::*;
use Shape as S;

macro_rules! row {
    ($kind:ident, [$($code:ident),* $(,)?], $shape:expr, $access:expr, $sens:expr, $forms:literal, $why:literal) => {
        row!($kind, [$($code),*], $shape, $access, $sens, true, $forms, $why)
    };
    ($kind:ident, [$($code:ident),* $(,)?], $shape:expr, $access:expr, $sens:expr, $patched:expr, $forms:literal, $why:literal) => {
        Entry {
            kind: Kind::$kind,
            codes: &[$(Code::$code),*],
            shape: $shape,
            access: $access,
            min_site_len: CALL_REL32_LEN,
            patched_by_default: $patched,
            sensitivity: $sens,
            forms: $forms,
            why: $why,
        }
    };
}

/// The catalogue. Order: by kind number (the site ABI's order), then by form.
pub static ENTRIES: &[Entry] = &[
    // ---- interrupt flag -------------------------------------------------------------
    row!(Cli, [Cli], S::None, Write, Conditional, "cli",
        "Clears IF. Faults (#GP) when CPL > IOPL; with IOPL 3 it silently clears the host's real interrupt flag instead of the guest's virtual one."),
    row!(Sti, [Sti], S::None, Write, Conditional, "sti",
        "Sets IF (with a one-instruction interrupt shadow). Faults when CPL > IOPL; otherwise enables real interrupts the hypervisor owns."),
    row!(Pushf, [Pushfw, Pushfd, Pushfq], S::None, Read, Silent, "pushf, pushfw, pushfq (pushfl outside 64-bit)",
        "Unprivileged: pushes the real RFLAGS, so a deprivileged kernel sees the host's IF and IOPL instead of its virtual interrupt state."),
    row!(Popf, [Popfw, Popfd, Popfq], S::None, Write, Silent, "popf, popfw, popfq (popfl outside 64-bit)",
        "Unprivileged: at CPL > 0 it silently ignores changes to IF and IOPL, so `local_irq_restore` never re-enables (or disables) the virtual interrupt flag."),
    row!(Iret, [Iretw, Iretd, Iretq], S::None, Write, Silent, "iret, iretw, iretl, iretq",
        "Returns from an interrupt: loads CS/SS with privilege checks and RFLAGS; at CPL > 0 it cannot return to ring 0 and silently drops IF/IOPL."),
    // ---- control, debug, segment and descriptor-table state ----------------------------
    row!(MovCr, [Mov_r32_cr, Mov_r64_cr, Mov_cr_r32, Mov_cr_r64], S::SpecialGpr, ByOperand, Trapping,
        "mov %crN,%reg and mov %reg,%crN (cr0, cr2, cr3, cr4, cr8)",
        "Control registers (paging root, protection bits, task priority in CR8) are privileged: #GP outside ring 0, and their real values belong to the hypervisor."),
    row!(MovDr, [Mov_r32_dr, Mov_r64_dr, Mov_dr_r32, Mov_dr_r64], S::SpecialGpr, ByOperand, Trapping,
        "mov %drN,%reg and mov %reg,%drN (dr0-dr7)",
        "Debug registers are privileged: #GP outside ring 0; the hardware breakpoints belong to the hypervisor."),
    row!(Clts, [Clts], S::None, Write, Trapping, "clts",
        "Clears CR0.TS: privileged, #GP outside ring 0."),
    row!(Lmsw, [Lmsw_rm16, Lmsw_r32m16, Lmsw_r64m16], S::Rm, Write, Trapping, "lmsw %reg16 / lmsw mem16",
        "Loads the low word of CR0: privileged, #GP outside ring 0."),
    row!(Smsw, [Smsw_rm16, Smsw_r32m16, Smsw_r64m16], S::Rm, Read, Conditional, "smsw %reg / smsw mem16",
        "Reads CR0's low word without privilege (unless CR4.UMIP): silently reveals the host's CR0 (PE, TS, …) rather than the guest's."),
    row!(MovSeg, [Mov_rm16_Sreg, Mov_r32m16_Sreg, Mov_r64m16_Sreg, Mov_Sreg_rm16, Mov_Sreg_r32m16, Mov_Sreg_r64m16], S::SegRm, ByOperand, Silent,
        "mov %sreg,%reg/mem and mov %reg/mem,%sreg (es cs ss ds fs gs)",
        "Reading CS or SS exposes the real RPL (the deprivileged CPL); loading a selector checks RPL/DPL against the real CPL, so ring-0 selectors fault or behave differently."),
    row!(PushSeg, [Pushw_FS, Pushd_FS, Pushq_FS, Pushw_GS, Pushd_GS, Pushq_GS], S::Seg, Read, Silent,
        "push %fs, push %gs (pushw/pushq)",
        "Pushes the real selector, exposing the real RPL and GDT layout to a kernel that expects its own."),
    row!(PopSeg, [Popw_FS, Popd_FS, Popq_FS, Popw_GS, Popd_GS, Popq_GS], S::Seg, Write, Silent,
        "pop %fs, pop %gs (popw/popq)",
        "Loads a selector with privilege checks against the real CPL, and reloading FS/GS clobbers the base a paravirtualized kernel keeps elsewhere."),
    row!(Lgdt, [Lgdt_m1632_16, Lgdt_m1632, Lgdt_m1664], S::Mem, Write, Trapping, "lgdt mem",
        "Loads the GDT register: privileged, #GP outside ring 0; the real GDT belongs to the hypervisor."),
    row!(Lidt, [Lidt_m1632_16, Lidt_m1632, Lidt_m1664], S::Mem, Write, Trapping, "lidt mem",
        "Loads the IDT register: privileged, #GP outside ring 0; interrupts must reach the hypervisor first."),
    row!(Lldt, [Lldt_rm16, Lldt_r32m16, Lldt_r64m16], S::Rm, Write, Trapping, "lldt %reg16 / lldt mem16",
        "Loads the LDT register: privileged, #GP outside ring 0."),
    row!(Ltr, [Ltr_rm16, Ltr_r32m16, Ltr_r64m16], S::Rm, Write, Trapping, "ltr %reg16 / ltr mem16",
        "Loads the task register (TSS: stacks, I/O bitmap): privileged, #GP outside ring 0."),
    row!(Sgdt, [Sgdt_m1632_16, Sgdt_m1632, Sgdt_m1664], S::Mem, Read, Conditional, "sgdt mem",
        "Unprivileged unless CR4.UMIP: silently stores the host's GDT base and limit, leaking the hypervisor's table instead of the guest's."),
    row!(Sidt, [Sidt_m1632_16, Sidt_m1632, Sidt_m1664], S::Mem, Read, Conditional, "sidt mem",
        "Unprivileged unless CR4.UMIP: silently stores the host's IDT base and limit."),
    row!(Sldt, [Sldt_rm16, Sldt_r32m16, Sldt_r64m16], S::Rm, Read, Conditional, "sldt %reg / sldt mem16",
        "Unprivileged unless CR4.UMIP: silently returns the host's LDT selector."),
    row!(Str, [Str_rm16, Str_r32m16, Str_r64m16], S::Rm, Read, Conditional, "str %reg / str mem16",
        "Unprivileged unless CR4.UMIP: silently returns the host's task-register selector."),
    row!(Lar, [Lar_r16_rm16, Lar_r32_r32m16, Lar_r64_r64m16], S::RegRm, Read, Silent, "lar %reg/mem,%reg",
        "Unprivileged: reads access rights of a descriptor in the real GDT/LDT, checked against the real CPL and RPL — silently different answers (ZF) for ring-0 selectors."),
    row!(Lsl, [Lsl_r16_rm16, Lsl_r32_r32m16, Lsl_r64_r64m16], S::RegRm, Read, Silent, "lsl %reg/mem,%reg",
        "Unprivileged: reads a segment limit from the real descriptor tables with CPL/RPL checks (Linux uses it for the per-CPU number in the vDSO GDT entry)."),
    row!(Verr, [Verr_rm16, Verr_r32m16, Verr_r64m16], S::Rm, Read, Silent, "verr %reg16 / verr mem16",
        "Unprivileged: checks readability of a selector against the real CPL; silently differs for ring-0 segments (also used as an MDS buffer-clear idiom)."),
    row!(Verw, [Verw_rm16, Verw_r32m16, Verw_r64m16], S::Rm, Read, Silent, "verw %reg16 / verw mem16",
        "Unprivileged: checks writability against the real CPL; Linux executes `verw` to clear CPU buffers (MDS) on return to user, which must stay correct."),
    row!(FarCall, [Call_ptr1616, Call_ptr1632], S::FarPtr, Read, Silent, "lcall $sel,$off (not in 64-bit code)",
        "Loads CS through a call gate or code descriptor with RPL/DPL checks against the real CPL."),
    row!(FarCall, [Call_m1616, Call_m1632, Call_m1664], S::Mem, Read, Silent, "lcall *mem (m16:16, m16:32, m16:64)",
        "Loads CS from memory with RPL/DPL checks against the real CPL; a ring-0 target selector faults in a deprivileged kernel."),
    row!(FarJmp, [Jmp_ptr1616, Jmp_ptr1632], S::FarPtr, Read, Silent, "ljmp $sel,$off (not in 64-bit code)",
        "Reloads CS with RPL/DPL checks against the real CPL."),
    row!(FarJmp, [Jmp_m1616, Jmp_m1632, Jmp_m1664], S::Mem, Read, Silent, "ljmp *mem (m16:16, m16:32, m16:64)",
        "Reloads CS from memory with RPL/DPL checks against the real CPL; ring-0 selectors fault when deprivileged."),
    row!(FarRet, [Retfw, Retfd, Retfq, Retfw_imm16, Retfd_imm16, Retfq_imm16], S::Imm, Read, Silent,
        "lret, lretw, lretq, lret $n (retf)",
        "Pops CS (and SS on a privilege change) with RPL checks: returning to a ring-0 selector faults or changes privilege when deprivileged."),
    // ---- memory management ----------------------------------------------------------
    row!(Invlpg, [Invlpg_m], S::Mem, Write, Trapping, "invlpg mem",
        "Invalidates a TLB entry: privileged, #GP outside ring 0; the hypervisor owns the real TLB (shadow or nested paging)."),
    row!(Invpcid, [Invpcid_r32_m128, Invpcid_r64_m128], S::RegRm, Write, Trapping, "invpcid mem128,%reg",
        "Invalidates TLB entries by PCID: privileged, #GP outside ring 0."),
    row!(Invd, [Invd], S::None, Write, Trapping, "invd",
        "Discards caches without write-back: privileged, and would corrupt the host's memory if it ran."),
    row!(Wbinvd, [Wbinvd, Wbnoinvd], S::None, Write, Trapping, "wbinvd, wbnoinvd",
        "Writes back and invalidates all caches: privileged, #GP outside ring 0, and a whole-machine stall the hypervisor must arbitrate."),
    // ---- port I/O -------------------------------------------------------------------
    row!(In, [In_AL_imm8, In_AX_imm8, In_EAX_imm8, In_AL_DX, In_AX_DX, In_EAX_DX], S::Port, Read, Conditional,
        "in $port,%al/%ax/%eax and in (%dx),%al/%ax/%eax",
        "Reads an I/O port: faults when CPL > IOPL and the TSS bitmap denies the port; the devices belong to the hypervisor."),
    row!(Out, [Out_imm8_AL, Out_imm8_AX, Out_imm8_EAX, Out_DX_AL, Out_DX_AX, Out_DX_EAX], S::Port, Write, Conditional,
        "out %al/%ax/%eax,$port and out %al/%ax/%eax,(%dx)",
        "Writes an I/O port: faults when CPL > IOPL and the TSS bitmap denies the port; the devices belong to the hypervisor."),
    row!(Ins, [Insb_m8_DX, Insw_m16_DX, Insd_m32_DX], S::StringPort, Read, Conditional, "insb/insw/insl, with or without rep",
        "String input from a port into (%rdi): IOPL/bitmap checked, and a `rep` form moves many bytes per trap."),
    row!(Outs, [Outsb_DX_m8, Outsw_DX_m16, Outsd_DX_m32], S::StringPort, Write, Conditional, "outsb/outsw/outsl, with or without rep",
        "String output from (%rsi) to a port: IOPL/bitmap checked, and a `rep` form moves many bytes per trap."),
    // ---- MSRs and CPU identity ------------------------------------------------------
    row!(Rdmsr, [Rdmsr, Rdmsrlist], S::None, Read, Trapping, "rdmsr (rdmsrlist)",
        "Reads a model-specific register: privileged, #GP outside ring 0; MSR values are per-VM state."),
    row!(Wrmsr, [Wrmsr, Wrmsrns, Wrmsrlist], S::None, Write, Trapping, "wrmsr (wrmsrns, wrmsrlist)",
        "Writes a model-specific register: privileged, #GP outside ring 0."),
    row!(Cpuid, [Cpuid], S::None, Read, Conditional, "cpuid",
        "Unprivileged (unless CPUID faulting is on): silently returns the host CPU's identity and features instead of the virtual CPU's."),
    row!(Rdpmc, [Rdpmc], S::None, Read, Conditional, "rdpmc",
        "Reads a performance counter: faults unless CR4.PCE, and counts the host's events."),
    row!(Xsetbv, [Xsetbv], S::None, Write, Trapping, "xsetbv",
        "Writes XCR0 (enabled extended state): privileged, #GP outside ring 0."),
    row!(Rdfsbase, [Rdfsbase_r32, Rdfsbase_r64], S::Gpr, Read, Conditional, "rdfsbase %reg",
        "Reads FS.base directly: #UD unless CR4.FSGSBASE; reads the real base, not a virtualized one."),
    row!(Rdgsbase, [Rdgsbase_r32, Rdgsbase_r64], S::Gpr, Read, Conditional, "rdgsbase %reg",
        "Reads GS.base directly: #UD unless CR4.FSGSBASE; interacts with swapgs emulation (kernel vs. user GS base)."),
    row!(Wrfsbase, [Wrfsbase_r32, Wrfsbase_r64], S::Gpr, Write, Conditional, "wrfsbase %reg",
        "Writes FS.base directly: #UD unless CR4.FSGSBASE; bypasses the hypervisor's view of the segment base."),
    row!(Wrgsbase, [Wrgsbase_r32, Wrgsbase_r64], S::Gpr, Write, Conditional, "wrgsbase %reg",
        "Writes GS.base directly: #UD unless CR4.FSGSBASE; the per-CPU base of a deprivileged kernel must be virtualized with swapgs."),
    row!(Swapgs, [Swapgs], S::None, Write, Trapping, "swapgs",
        "Exchanges GS.base with MSR_KERNEL_GS_BASE: privileged, #UD outside ring 0; the kernel GS base is per-VM state."),
    // ---- transitions ----------------------------------------------------------------
    row!(Hlt, [Hlt], S::None, Write, Trapping, "hlt",
        "Halts the CPU until an interrupt: privileged, #GP outside ring 0; idling must yield to the hypervisor."),
    row!(Sysret, [Sysretd, Sysretq], S::None, Write, Trapping, "sysret, sysretq",
        "Returns to user mode: #GP outside ring 0; the CS/SS it loads come from the real STAR MSR."),
    row!(Sysexit, [Sysexitd, Sysexitq], S::None, Write, Trapping, "sysexit, sysexitq",
        "Returns to user mode via SYSENTER MSRs: #GP outside ring 0."),
    row!(Int, [Int_imm8], S::Imm, Read, Silent, "int $n (not int3, int1 or into)",
        "Software interrupt through the real IDT with a DPL check against the real CPL: ring-0-only gates fault, others reach the host's handler."),
    row!(Monitor, [Monitorw, Monitord, Monitorq], S::None, Write, Trapping, "monitor",
        "Arms address monitoring: #UD outside ring 0 (unless enabled for ring 3), and only meaningful with the real mwait."),
    row!(Mwait, [Mwait], S::None, Write, Trapping, "mwait",
        "Idles the CPU in a C-state: #UD outside ring 0; idling must yield to the hypervisor."),
    row!(Vmcall, [Vmcall], S::None, Write, Trapping, "vmcall",
        "Intel hypercall: #UD unless in VMX non-root mode; the hypervisor ABI differs per backend."),
    row!(Vmmcall, [Vmmcall], S::None, Write, Trapping, "vmmcall",
        "AMD hypercall: #UD unless in an SVM guest; the hypervisor ABI differs per backend."),
    // ---- time -------------------------------------------------------------------------
    row!(Rdtsc, [Rdtsc], S::None, Read, Conditional, false, "rdtsc",
        "Unprivileged unless CR4.TSD: returns the host's time-stamp counter (offset and scaling differ after migration or when the hypervisor virtualizes time). Reported, not patched by default."),
    row!(Rdtscp, [Rdtscp], S::None, Read, Conditional, false, "rdtscp",
        "Like rdtsc, and also returns IA32_TSC_AUX (the host's CPU number). Reported, not patched by default."),
];

/// Entry index (+1) for every [`Code`], 0 for instructions that are not sensitive.
fn by_code() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        assert!(ENTRIES.len() < u8::MAX as usize);
        let mut t = vec![0u8; Code::values().len()];
        for (i, e) in ENTRIES.iter().enumerate() {
            for &c in e.codes {
                assert_eq!(t[c as usize], 0, "{c:?} appears in two catalogue rows");
                t[c as usize] = (i + 1) as u8;
            }
        }
        t
    })
}

/// The catalogue row for an instruction, or `None` if it is not sensitive.
///
/// One table lookup by [`Instruction::code`]; cheap enough for the decode loop.
#[inline]
pub fn classify(instr: &Instruction) -> Option<&'static Entry> {
    classify_code(instr.code())
}

/// The catalogue row for an encoding ([`Code`]), or `None`.
#[inline]
pub fn classify_code(code: Code) -> Option<&'static Entry> {
    match by_code().get(code as usize) {
        Some(&i) if i != 0 => Some(&ENTRIES[i as usize - 1]),
        _ => None,
    }
}

/// Every kind the catalogue produces, in kind-number order, without duplicates.
pub fn kinds() -> Vec<Kind> {
    let mut v: Vec<Kind> = ENTRIES.iter().map(|e| e.kind).collect();
    v.dedup();
    v
}

/// The rows of one kind.
pub fn entries_for(kind: Kind) -> impl Iterator<Item = &'static Entry> {
    ENTRIES.iter().filter(move |e| e.kind == kind)
}

/// The text of `docs/sensitive-instructions.md`, generated from [`ENTRIES`] (a test checks the
/// committed file is up to date; `PREVIRT_BLESS=1 cargo test -p previrt-rewriter --test docs`
/// rewrites it).
pub fn markdown() -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    s += "# Sensitive x86-64 instructions\n\n";
    s += "<!-- Generated from rewriter/src/catalogue.rs (ENTRIES) by `catalogue::markdown()`; \
          do not edit by hand. Regenerate: PREVIRT_BLESS=1 cargo test -p previrt-rewriter --test docs -->\n\n";
    s += "These are the instructions a deprivileged (ring 1/3) or hypervisor-hosted kernel must not run \
natively. `previrt scan` finds them; the assembler wrapper and the post-link patcher turn each into a \
site of the site ABI (`docs/site-abi.md`). The catalogue is one data table, `ENTRIES` in \
`rewriter/src/catalogue.rs`, classified by iced-x86 `Code` (the exact encoding), so an instruction \
decoded from bytes and one built by the encoder get the same answer.\n\n";
    s += "Sensitivity:\n\n";
    s += "- **trapping**: faults (`#GP`/`#UD`) outside ring 0; the kernel would crash, or the hypervisor \
must trap and emulate each execution at great cost (~2 µs on this project's KVM-PVM machines).\n";
    s += "- **silent**: runs outside ring 0 without a fault but gives a different result — the classic \
x86 virtualization holes: `popf` silently dropping IF, `pushf` exposing the real IF/IOPL, `sgdt`/`sidt` \
leaking the host's tables, `smsw`/`str`/`sldt`, `lar`/`lsl`/`verr`/`verw` and segment loads checking \
against the real CPL, far `call`/`jmp`/`ret` with RPL checks.\n";
    s += "- **conditional**: either, depending on a control bit the hypervisor may not own (IOPL and the \
TSS I/O bitmap, CR4.UMIP, CR4.TSD, CR4.PCE, CR4.FSGSBASE, CPUID faulting).\n\n";
    s += "Every site is at least `min_site_len` bytes (`site_len = max(insn_len, min_site_len)`): the \
runtime replaces a site with at most a 5-byte `call rel32` into its handler. The time class (`rdtsc`, \
`rdtscp`) is reported but not patched by default.\n\n";
    s += "Not in the catalogue, on purpose: `int3` (Linux has millions of int3 padding bytes), `int1`, \
`into`, `syscall`/`sysenter` (user-to-kernel entries handled by the runtime's entry path), push/pop of \
es/cs/ss/ds (invalid in 64-bit code), `monitorx`/`mwaitx` (unprivileged AMD variants), the 386 \
test-register moves.\n\n";
    let mut classes: Vec<Class> = ENTRIES.iter().map(|e| e.class()).collect();
    classes.dedup();
    for class in classes {
        let _ = writeln!(s, "## Class `{}`\n", class.name());
        s += "| kind | forms | sensitivity | patched by default | min site | why |\n";
        s += "| --- | --- | --- | --- | --- | --- |\n";
        for e in ENTRIES.iter().filter(|e| e.class() == class) {
            let _ = writeln!(
                s,
                "| `{}` | {} | {} | {} | {} | {} |",
                e.name(),
                e.forms.replace('|', "\\|"),
                e.sensitivity.name(),
                if e.patched_by_default { "yes" } else { "no" },
                e.min_site_len,
                e.why.replace('|', "\\|")
            );
        }
        s += "\n";
    }
    s += "## Encodings\n\nThe iced-x86 `Code`s of each row, for reviewers:\n\n";
    for e in ENTRIES {
        let codes: Vec<String> = e.codes.iter().map(|c| format!("`{c:?}`")).collect();
        let _ = writeln!(s, "- `{}` ({}): {}", e.name(), e.forms.replace('|', "\\|"), codes.join(", "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        let _ = by_code(); // asserts no code is in two rows
        let mut last = 0u16;
        for e in ENTRIES {
            assert!(e.kind as u16 >= last, "{:?} out of order", e.kind);
            last = e.kind as u16;
            assert!(!e.codes.is_empty());
            assert!(e.min_site_len >= CALL_REL32_LEN);
            assert_eq!(e.patched_by_default, e.class() != Class::Time, "{:?}", e.kind);
            assert!(!e.why.is_empty() && !e.forms.is_empty());
        }
    }

    #[test]
    fn every_instruction_kind_is_catalogued() {
        // Every site-ABI kind of the instruction classes has at least one row.
        for info in previrt_site_abi::KINDS {
            let instr_class = !matches!(info.class, Class::MemoryAccess | Class::ParavirtCall);
            assert_eq!(instr_class, entries_for(info.kind).next().is_some(), "{}", info.name);
        }
    }

    #[test]
    fn excluded_codes() {
        for c in [Code::Int3, Code::Int1, Code::Into, Code::Syscall, Code::Nopd, Code::Pushq_imm32, Code::Push_r64] {
            assert!(classify_code(c).is_none(), "{c:?}");
        }
        assert_eq!(classify_code(Code::Int_imm8).unwrap().kind, Kind::Int);
        assert_eq!(classify_code(Code::Mov_cr_r64).unwrap().kind, Kind::MovCr);
    }
}
