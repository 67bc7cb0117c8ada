//! The `pvm` backend in the kernel: its [`Machine`] (the `hv` machine with CR3, `invlpg` and
//! `lidt` kept within the mode's rules), the site dispatcher and stub, the substitute IDT and
//! the #PF check (module docs in `super`).

use super::shadow;
use crate::devices::{self, Dev};
use crate::emulate::{self, gpr, rflags, DescTable, Machine, Regs};
use crate::guest::paravirt::{Hypervisor, Paravirt};
use crate::guest::{self, hw, sym_addr, Global};
use crate::hv::{self, Hv};
use crate::patch::Site;
use core::cell::UnsafeCell;
use core::fmt::Write;
use previrt_hv_abi as abi;
use previrt_site_abi::{flags, Kind};

/// The selectors the kernel's frames carry (host-pushed frames show them too); native code
/// runs on the host's user selectors instead.
const KERNEL_CS: u64 = 0x10;
const KERNEL_SS: u64 = 0x18;
/// The mode's DPL3 code segment every IDT gate must name.
const GATE_CS: u16 = 0x33;
const NP_VECTOR: u64 = 11;
const GP_VECTOR: u64 = 13;
const PF_VECTOR: u64 = 14;

/// The mode's user segments as (GDT index, descriptor as in Linux's GDT): native code runs on
/// 0x2b/0x33, and the host checks an emulated `iretq`'s target against the guest's GDT (a
/// table without them: #GP(0x30), then a triple fault; ring-0 descriptors there: a #GP into
/// the kernel).
const USER_SEGMENTS: [(usize, u64); 2] = [(5, 0x00cf_f300_0000_ffff), (6, 0x00af_fb00_0000_ffff)];
/// The descriptor bits that make one of those: type (less accessed), S, DPL, P and L.
const SEGMENT_KIND: u64 = 0xfe << 40 | 1 << 53;
/// Entries the substitute GDT holds: a kernel's table that lacks the user segments must fit.
const GDT_ENTRIES: usize = 32;

/// The substitute GDT: the kernel's descriptors plus the mode's user segments.
#[repr(C, align(16))]
struct Gdt([u8; 8 * GDT_ENTRIES]);
static GDT: Global<Gdt> = Global(UnsafeCell::new(Gdt([0; 8 * GDT_ENTRIES])));

/// The substitute IDT (256 gates, each to its trampoline: the same for any kernel table).
#[repr(C, align(4096))]
struct Idt([[u8; 16]; 256]);
static IDT: Global<Idt> = Global(UnsafeCell::new(Idt([[0; 16]; 256])));

/// The kernel's IDT as it loaded it: base and whole gates within its limit. The trampolines
/// read the gate there at each delivery, so gates the kernel writes after its `lidt` count.
#[no_mangle]
static mut previrt_pvm_idt: [u64; 2] = [0; 2];
/// Set by the dispatcher when the runtime delivers an event itself (`deliver_pending`,
/// through the substitute gate): the frame then holds the kernel's IF already (the
/// trampoline's entry takes `vif` from it instead of the other way round).
#[no_mangle]
static mut previrt_pvm_soft: u8 = 0;
/// The error code of the #NP or #GP a delivery through a missing gate raised
/// (`previrt_pvm_absent`), for the trampolines' entry to store.
#[no_mangle]
static mut previrt_pvm_error: u64 = 0;
/// Set by every host delivery (it clears the mode's own interrupt flag); the dispatcher
/// re-opens the flag with one trapping `sti` when the kernel's IF is on.
#[no_mangle]
static mut previrt_pvm_masked: u8 = 1;
/// The shared `vif` the stub saves and clears (set at [`init`]).
#[no_mangle]
static mut previrt_pvm_vif: u64 = 0;
/// The #PF stub's verdict: 0 retry, else the kernel's handler to continue in.
#[no_mangle]
static mut previrt_pvm_next: u64 = 0;

/// The kinds with a lean entry, in the order of `previrt_pvm_lean_entries` (8 bytes each) and
/// of their bodies.
const LEAN: [Kind; 4] = [Kind::Cli, Kind::Sti, Kind::Pushf, Kind::Popf];
/// Where each lean entry jumps: its body while the CPU runs natively, else the stub (on the
/// ordinary path the stub also keeps the hardware IF, which the bodies do not touch).
#[no_mangle]
static mut previrt_pvm_lean: [u64; 4] = [0; 4];
/// TSC value at which the kernel's next tick is due (0: take the stub): a lean entry that
/// turns IF on from then on takes the stub, which raises and delivers the tick.
#[no_mangle]
static mut previrt_pvm_deadline: u64 = 0;
// The bodies read `pending` at `vif` + 8.
const _: () = assert!(core::mem::offset_of!(abi::VcpuPage, pending) == core::mem::offset_of!(abi::VcpuPage, vif) + 8);

/// What the backend keeps besides the `hv` machine.
struct State {
    /// CR3 as the kernel loaded it (what `mov from cr3` returns).
    kernel_cr3: u64,
    /// The copies of the kernel's address spaces (the live one is loaded).
    shadow: shadow::Cache,
    /// The kernel's IDT as it loaded it; None before its `lidt`.
    idt: Option<DescTable>,
    /// The kernel's GDT while the substitute is the loaded one (its own lacks the mode's
    /// user segments), and whether the loaded one was checked for them (not after `leave`).
    gdt: Option<DescTable>,
    gdt_checked: bool,
    /// Set by [`adopt`]: enter the mode at the next site.
    enter_pending: bool,
    /// Whether the hardware CR3 is the live copy's (false after [`State::leave`]).
    on_copy: bool,
    /// Whether the substitute IDT is the loaded one.
    idt_loaded: bool,
    /// CR2 as the last #PF set it, found by the fault check (`previrt_pvm_fault`), which
    /// every #PF passes while native: the kernel's `mov from cr2` gets it without a trap.
    /// None while the kernel's own IDT takes faults (off the mode). The check decodes it
    /// from the faulting instruction where it can ([`super::fault`]), else reads CR2
    /// (counted: `cr2_reads`).
    cr2: Option<u64>,
    cr2_reads: u64,
    /// Entries brought up to date in place (`invlpg`), of them those that replaced a
    /// present entry (a hardware `invlpg`; the others were not present in the copy), and
    /// `invlpg`s that found the copy already up to date.
    updates: u64,
    flushes: u64,
    unchanged: u64,
    /// Shadow syncs (CR3 loads, #PFs resolved by one), of them copies built whole (the
    /// others brought a cached copy up to date), and CR3 loads that reached the hardware.
    syncs: u64,
    builds: u64,
    cr3_loads: u64,
    resolved: u64,
}

static STATE: Global<State> = Global(UnsafeCell::new(State {
    kernel_cr3: 0,
    shadow: shadow::Cache::NEW,
    idt: None,
    gdt: None,
    gdt_checked: false,
    enter_pending: false,
    on_copy: false,
    idt_loaded: false,
    cr2: None,
    cr2_reads: 0,
    updates: 0,
    flushes: 0,
    unchanged: 0,
    syncs: 0,
    builds: 0,
    cr3_loads: 0,
    resolved: 0,
}));

/// Whether the VMM switched KVM-PVM native mode on (the hv ABI's CPUID leaf says so).
pub(crate) fn offered() -> bool {
    let [_, feats, _, _] = hw::cpuid(abi::CPUID_VERSION, 0);
    feats & abi::features::PVM_NATIVE != 0
}

/// Set up the `hv` ABI, then require the mode.
pub(crate) fn init(tsc_per_ms: u64) -> Result<(), &'static str> {
    if !offered() {
        return Err("the VMM does not offer KVM-PVM native mode (run with --backend native|auto)");
    }
    hv::init(tsc_per_ms)?;
    // SAFETY: boot, single-threaded.
    unsafe {
        previrt_pvm_vif = hv::vif_addr();
    }
    set_lean(false);
    Ok(())
}

/// Migration (guest/migrate.rs): leave the mode first, so the snapshot holds the kernel's
/// own CR3 (or its root parked at an even page: `park`) and IDT (the ordinary path, which
/// any backend can take over), then the `hv` suspend; back into the mode when the guest was
/// not resumed elsewhere.
pub(crate) fn suspend() -> i64 {
    // SAFETY: at the dispatcher's safe point (single vCPU, `vif` clear).
    let st = unsafe { STATE.get() };
    st.leave();
    let r = hv::suspend();
    if r != abi::suspend::RESUMED {
        st.enter(hv::machine());
    }
    r
}

/// Migration: bind what the kernel programmed under the previous backend (`hv`'s models).
/// The mode is entered from the kernel's own CR3 (the CPU's, or the one its suspend parked)
/// and IDT at the first `pvm` site: the previous backend's stub, which does not know the
/// mode's selectors, returns first.
pub(crate) fn adopt(p: &crate::devices::Programmed) {
    hv::adopt(p);
    // SAFETY: as `suspend`.
    unsafe { STATE.get() }.enter_pending = true;
}

/// Where `pvm` sites call.
pub(crate) fn stub() -> u64 {
    sym_addr!("previrt_pvm_entry")
}

/// The lean entry for a site of `pvm` (routed through [`Patcher::apply_with`]): interrupt-flag
/// kinds at their 64-bit operand size whose site ends where execution resumes (the body
/// returns to the call's end and the NOP fill runs on).
///
/// [`Patcher::apply_with`]: crate::patch::Patcher::apply_with
pub(crate) fn lean(site: &Site) -> Option<u64> {
    let r = &site.record;
    let slot = LEAN.iter().position(|&k| k as u16 == r.kind)?;
    let falls_through = site.next() == site.at.site + r.site_len as u64;
    (falls_through && !r.has(flags::WIDE)).then(|| sym_addr!("previrt_pvm_lean_entries") + 8 * slot as u64)
}

/// Point the lean entries at their bodies (`on`: the CPU runs natively) or at the stub.
fn set_lean(on: bool) {
    let stub = stub();
    let bodies = [
        sym_addr!("previrt_pvm_cli"),
        sym_addr!("previrt_pvm_sti_on"),
        sym_addr!("previrt_pvm_pushf"),
        sym_addr!("previrt_pvm_popf"),
    ];
    // SAFETY: single vCPU; a lean entry reads its slot with one aligned load.
    let slots = unsafe { &mut *core::ptr::addr_of_mut!(previrt_pvm_lean) };
    for (slot, body) in slots.iter_mut().zip(bodies) {
        *slot = if on { body } else { stub };
    }
}

/// The TSC deadline of the next tick `pv` will raise (none programmed: never; pending events
/// are checked apart).
fn set_deadline(pv: &Paravirt<Hv>) {
    let per_ms = pv.hv.tsc_per_ms;
    // The inverse of the platform clock's ns = tsc * 10^6 / per_ms, rounded down (a lean
    // entry then takes the stub at most a TSC tick early); no 128-bit division in the kernel.
    let due = match pv.next_tick() {
        0 => u64::MAX,
        ns => (ns / 1_000_000 * per_ms).saturating_add(ns % 1_000_000 * per_ms / 1_000_000),
    };
    // SAFETY: as above; the bodies read it with one aligned load.
    unsafe { previrt_pvm_deadline = due };
}

/// The code segment now: RPL 3 once the CPU runs natively (the mode's rules are met).
fn native() -> bool {
    hardware_selectors().0 & 3 == 3
}

/// The hardware selectors to return with: the current CS/SS.
fn hardware_selectors() -> (u64, u64) {
    let (cs, ss): (u64, u64);
    // SAFETY: reads segment registers.
    unsafe {
        core::arch::asm!("mov {}, cs", "mov {}, ss", out(reg) cs, out(reg) ss, options(nomem, nostack, preserves_flags))
    };
    (cs, ss)
}

impl State {
    /// The backend's line of the exit summary: whether the kernel ran natively (the site's
    /// code segment had RPL 3), shadow syncs and #PFs they resolved.
    fn summary(&self, out: &mut dyn Write) {
        let yes = |b| if b { "yes" } else { "no" };
        let native = yes(native());
        let (syncs, builds, loads) = (self.syncs, self.builds, self.cr3_loads);
        let (updates, flushes, unchanged, resolved) = (self.updates, self.flushes, self.unchanged, self.resolved);
        let cr2_reads = self.cr2_reads;
        let _ = writeln!(
            out,
            "previrt-pvm: native={native} shadow-syncs={syncs} shadow-builds={builds} cr3-loads={loads} shadow-updates={updates} invlpg-flushes={flushes} invlpg-unchanged={unchanged} faults-resolved={resolved} cr2-reads={cr2_reads}"
        );
    }

    /// Into the mode from the ordinary path: the kernel's IDT is the loaded one, its CR3
    /// the loaded one unless a suspend parked it (never the park's: `mov from cr3` returns
    /// what the kernel loaded).
    fn enter(&mut self, pv: &mut Paravirt<Hv>) {
        self.kernel_cr3 = super::park::kernel_cr3();
        self.build_idt(hw::loaded_idt());
        self.sync(pv);
    }

    /// Out of the mode: the kernel's own CR3, parked when its root has bit 12 (the mode
    /// would keep the CPU native on tables without U bits), and its IDT.
    fn leave(&mut self) {
        super::park::park(self.kernel_cr3);
        (self.on_copy, self.idt_loaded, self.cr2) = (false, false, None);
        set_lean(false);
        if let Some(t) = self.idt {
            hw::Hardware.load_idt(t);
        }
        self.restore_gdt();
        // Back on the kernel's selectors (the saved state must not keep the mode's).
        // SAFETY: an iretq to the next instruction with the kernel's code and stack segments.
        unsafe {
            core::arch::asm!("mov {t}, rsp", "push {ss}", "push {t}", "pushfq", "push {cs}", "lea {t}, [rip + 2f]", "push {t}", "iretq", "2:",
                t = out(reg) _, ss = in(reg) KERNEL_SS, cs = in(reg) KERNEL_CS)
        };
        // SAFETY: single vCPU; the mode's own flag is unknown until the next delivery.
        unsafe { previrt_pvm_masked = 1 };
    }

    /// Bring the copy of the kernel's current address space up to date (or build it) and
    /// load it, unless it is loaded already with nothing stale in it (a flush of nothing).
    /// (PCID tags would let a switch keep the other copies' translations, but this host's
    /// KVM-PVM offers no PCID: docs/pvm.md.)
    fn sync(&mut self, pv: &mut Paravirt<Hv>) {
        if !self.gdt_checked {
            self.load_gdt(hw::loaded_gdt(), pv);
        }
        let Some(l) = self.shadow.load(self.kernel_cr3) else {
            pv.fatal(format_args!("pvm: the kernel's page tables do not fit the shadow pool"))
        };
        if l.switched || l.stale() || !self.on_copy {
            hw::Hardware.write_cr(3, l.cr3);
            self.on_copy = true;
            self.cr3_loads += 1;
        }
        set_lean(native());
        self.syncs += 1;
        self.builds += u64::from(l.built);
        self.install_idt();
    }

    /// Once native, the substitute IDT replaces the kernel's (whose gates the mode refuses),
    /// once: `lidt` traps. It covers every vector: the trampolines check the kernel's limit.
    fn install_idt(&mut self) {
        if self.idt.is_some() && native() && !self.idt_loaded {
            hw::Hardware.load_idt(DescTable { limit: 4095, base: IDT.0.get() as u64 });
            self.idt_loaded = true;
        }
    }

    /// `sidt` or `sgdt` while a substitute is loaded: the kernel's table, as it loaded it
    /// (64-bit operand: limit, then base). False for anything else (the original runs).
    fn store_table(&self, op: &emulate::Op, regs: &Regs, pv: &mut Paravirt<Hv>) -> bool {
        let t = match op.kind {
            Kind::Sidt => self.idt.filter(|_| self.idt_loaded),
            Kind::Sgdt => self.gdt,
            _ => None,
        };
        let Some(t) = t.filter(|_| op.flags & flags::MEM != 0) else { return false };
        pv.write(op.address(regs), &t.image());
        true
    }

    /// The kernel's `lgdt` of `t` (or, at the first sync, the table it loaded before): loaded
    /// as it is when it holds the mode's user segments, else a substitute with its
    /// descriptors plus those two in their empty slots (read at this load: descriptors the
    /// kernel writes into its table later are not seen). A slot the kernel uses for another
    /// descriptor stops it with a line.
    fn load_gdt(&mut self, t: DescTable, pv: &mut Paravirt<Hv>) {
        self.gdt_checked = true;
        let mut lacking = false;
        for (i, want) in USER_SEGMENTS {
            let mut d = [0u8; 8];
            if i * 8 + 7 <= usize::from(t.limit) {
                hw::Hardware.read(t.base + i as u64 * 8, &mut d);
            }
            let d = u64::from_le_bytes(d);
            if d & SEGMENT_KIND == want & SEGMENT_KIND {
                continue;
            }
            if d != 0 {
                pv.fatal(format_args!(
                    "pvm: the kernel's GDT holds {d:#018x} at selector {:#x}; KVM-PVM's native mode needs its user segments at 0x28 (data) and 0x30 (64-bit code, DPL 3)",
                    i * 8
                ));
            }
            lacking = true;
        }
        if !lacking {
            self.gdt = None;
            return hw::Hardware.load_gdt(t);
        }
        let len = usize::from(t.limit) + 1;
        // SAFETY: the runtime's own table; the CPU reads a descriptor from it only at a
        // segment load, none of which happens in here.
        let sub = unsafe { &mut GDT.get().0 };
        let Some(kernel) = sub.get_mut(..len) else {
            pv.fatal(format_args!(
                "pvm: the kernel's GDT ({len} bytes) lacks KVM-PVM's user segments 0x2b/0x33, and a substitute holds {GDT_ENTRIES} entries"
            ))
        };
        hw::Hardware.read(t.base, kernel);
        sub[len..].fill(0);
        for (i, want) in USER_SEGMENTS {
            let slot = &mut sub[i * 8..i * 8 + 8];
            if u64::from_le_bytes(slot.try_into().unwrap_or_default()) & SEGMENT_KIND != want & SEGMENT_KIND {
                slot.copy_from_slice(&want.to_le_bytes());
            }
        }
        let limit = t.limit.max(8 * USER_SEGMENTS[1].0 as u16 + 7);
        hw::Hardware.load_gdt(DescTable { limit, base: sub.as_ptr() as u64 });
        self.gdt = Some(t);
    }

    /// The kernel's own GDT back in the CPU if a substitute replaced it (leaving the mode).
    fn restore_gdt(&mut self) {
        self.gdt_checked = false;
        if let Some(t) = self.gdt.take() {
            hw::Hardware.load_gdt(t);
        }
    }

    /// The kernel's `lidt` of `t`: recorded for the trampolines, which read each gate there
    /// when it is delivered (a kernel may fill its table after loading it, as Linux does).
    /// The substitute's gates: selector 0x33, DPL 3, no IST, each vector to its trampoline;
    /// exceptions through trap gates, so that a fault does not close the mode's own interrupt
    /// flag (which only a trapping `sti; iretq` reopens: two host traps per fault), other
    /// vectors through interrupt gates (an external event must close it). The trampolines'
    /// entry gives the kernel its own gate's semantics on `vif` instead.
    fn build_idt(&mut self, t: DescTable) {
        // SAFETY: the runtime's own table (rewritten with the same gates) and the record the
        // trampolines read; no event is delivered while it changes (interrupts are off in the
        // kernel when it loads an IDT, and `vif` is clear in the runtime).
        let (idt, kernel) = unsafe { (&mut IDT.get().0, &mut *core::ptr::addr_of_mut!(previrt_pvm_idt)) };
        *kernel = [t.base, (u64::from(t.limit) + 1) / 16];
        let tramp = sym_addr!("previrt_pvm_vectors");
        for (v, gate) in idt.iter_mut().enumerate() {
            let to = tramp + v as u64 * 16;
            gate[0..2].copy_from_slice(&(to as u16).to_le_bytes());
            gate[2..4].copy_from_slice(&GATE_CS.to_le_bytes());
            gate[4] = 0;
            gate[5] = if v < 32 { 0xef } else { 0xee };
            gate[6..8].copy_from_slice(&((to >> 16) as u16).to_le_bytes());
            gate[8..12].copy_from_slice(&((to >> 32) as u32).to_le_bytes());
        }
        self.idt = Some(t);
        self.install_idt();
    }
}

/// The kernel's gate for `vector` as it is now; None when it is beyond the loaded table's
/// limit or not present.
fn kernel_gate(vector: u64) -> Option<[u8; 16]> {
    // SAFETY: written only at `lidt` (`State::build_idt`).
    let [base, gates] = unsafe { previrt_pvm_idt };
    let mut g = [0u8; 16];
    (vector < gates).then(|| hw::Hardware.read(base + vector * 16, &mut g))?;
    (g[5] & 0x80 != 0).then_some(g)
}

/// The gate the CPU delivers `vector` through: the kernel's own when it is present, else that
/// of the exception the CPU raises instead (#NP for a gate not present, #GP for one beyond
/// the limit) with its error code (the vector, the IDT bit, and EXT for an event that software
/// did not raise). When that gate is missing too the CPU raises #DF: not modelled, the
/// kernel stops with a line.
fn deliver_through(vector: u64, ext: bool) -> ([u8; 16], Option<u64>) {
    if let Some(g) = kernel_gate(vector) {
        return (g, None);
    }
    // SAFETY: as `kernel_gate`.
    let (fault, why) = if vector < unsafe { previrt_pvm_idt[1] } {
        (NP_VECTOR, "not present")
    } else {
        (GP_VECTOR, "beyond its limit")
    };
    match kernel_gate(fault) {
        Some(g) => (g, Some(vector * 8 + 2 + u64::from(ext))),
        None => hv::machine().fatal(format_args!(
            "pvm: the kernel's IDT gate for vector {vector:#x} is {why}, and the gate for the exception the CPU raises then ({fault:#x}) is missing too (#DF: not modelled)"
        )),
    }
}

/// The length of the software interrupt that raised `vector` and ends at `rip` (`int n`, or
/// `int3` for #BP), which a fault in its delivery points at; 0 for an event software did not
/// raise (an exception's RIP is already the instruction's, an interrupt's the next one).
fn software_int(vector: u64, rip: u64) -> u64 {
    let mut b = [0u8; 2];
    hw::Hardware.read(rip.wrapping_sub(2), &mut b);
    match (vector, b) {
        (3 | 32.., [0xcd, n]) if u64::from(n) == vector => 2,
        (3, [_, 0xcc]) => 1,
        _ => 0,
    }
}

/// A delivery through a gate the kernel's table does not have (from the trampolines' entry,
/// with `vif` clear, its stack: rsi rdx rcx rax flags, the trampoline's word, the error code if
/// one was pushed, then the frame): turned into the #NP or #GP the CPU raises (the frame's
/// RIP back on a software interrupt, the error code for the entry to store: one slot more
/// when the event pushed none). The handler to go to, with `vif` as its gate gives it.
#[no_mangle]
extern "C" fn previrt_pvm_absent(stack: &mut [u64; 12]) -> u64 {
    let (vector, pushed) = (stack[5] & 0xff, (stack[5] >> 8 & 1) as usize);
    let rip = &mut stack[6 + pushed];
    let soft = software_int(vector, *rip);
    *rip -= soft;
    let (g, error) = deliver_through(vector, soft == 0);
    // SAFETY: single vCPU; read by the entry right after this returns.
    unsafe { previrt_pvm_error = error.unwrap_or_default() };
    set_vif(stack[8 + pushed] & rflags::IF != 0 && !emulate::interrupt_gate(&g));
    emulate::gate_handler(&g)
}

/// The kernel's interrupt flag as the shared `vif`.
fn set_vif(on: bool) {
    // SAFETY: the shared page's `vif` (its address is set at `init`).
    unsafe { (previrt_pvm_vif as *mut u32).write_volatile(u32::from(on)) }
}

/// The `hv` machine with the mode's rules kept: CR3, `invlpg`, `lidt`, and the interrupt
/// flag (kept in the register frame only; the stub publishes it as `vif` on its way out).
struct Pvm<'a> {
    pv: &'a mut Paravirt<Hv>,
    st: &'a mut State,
}

impl Machine for Pvm<'_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) {
        self.pv.read(addr, buf)
    }
    fn write(&mut self, addr: u64, buf: &[u8]) {
        self.pv.write(addr, buf)
    }
    fn port_in(&mut self, port: u16, width: u8) -> u32 {
        self.pv.port_in(port, width)
    }
    fn port_out(&mut self, port: u16, width: u8, value: u32) {
        self.pv.port_out(port, width, value)
    }
    /// Native `cpuid` answers from the outer machine (another APIC ID, no previrt leaves);
    /// `int $0x1a` gets the VMM's table (docs/pvm.md).
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        if !native() {
            return self.pv.cpuid(leaf, subleaf);
        }
        let (a, b, c, d): (u32, u32, u32, u32);
        // SAFETY: the host answers `int $0x1a` with the VMM's CPUID leaf; rbx is saved by
        // hand (LLVM reserves it).
        unsafe {
            core::arch::asm!("xchg {b:r}, rbx", "int 0x1a", "xchg {b:r}, rbx", b = out(reg) b,
                inout("eax") leaf => a, inout("ecx") subleaf => c, out("edx") d, options(nostack))
        };
        [a, b, c, d]
    }
    fn rdmsr(&mut self, msr: u32) -> u64 {
        self.pv.rdmsr(msr)
    }
    fn wrmsr(&mut self, msr: u32, value: u64) {
        self.pv.wrmsr(msr, value)
    }
    fn read_cr(&mut self, n: u8) -> u64 {
        match (n, self.st.cr2) {
            (2, Some(cr2)) => cr2,
            (3, _) if self.st.kernel_cr3 != 0 => self.st.kernel_cr3,
            _ => self.pv.read_cr(n),
        }
    }
    fn write_cr(&mut self, n: u8, value: u64) {
        if n == 2 {
            self.st.cr2 = self.st.cr2.map(|_| value);
        }
        if n != 3 {
            return self.pv.write_cr(n, value);
        }
        // The runtime must stay mapped in every address space the kernel loads.
        // SAFETY: the kernel's new root table (identity-mapped kernel).
        unsafe { hw::map_runtime(value) };
        self.st.kernel_cr3 = value;
        self.st.sync(self.pv);
    }
    fn invlpg(&mut self, addr: u64) {
        let st = &mut *self.st;
        match shadow::update(&mut st.shadow, st.kernel_cr3, addr) {
            Some(shadow::Change::Replaced) => {
                st.updates += 1;
                st.flushes += 1;
                hw::Hardware.invlpg(addr);
            }
            Some(shadow::Change::ReplacedTable) => {
                // Every translation under the replaced entry may be stale: reload the copy.
                st.updates += 1;
                st.flushes += 1;
                st.cr3_loads += 1;
                hw::Hardware.write_cr(3, st.shadow.cr3());
            }
            Some(shadow::Change::Filled) => st.updates += 1,
            Some(shadow::Change::None) => st.unchanged += 1,
            None => st.sync(self.pv),
        }
    }
    fn halt(&mut self, interrupts: bool) {
        self.pv.halt(interrupts)
    }
    fn load_gdt(&mut self, table: DescTable) {
        self.st.load_gdt(table, self.pv)
    }
    fn load_idt(&mut self, table: DescTable) {
        self.st.build_idt(table);
        if !native() {
            self.pv.load_idt(table);
        }
    }
    fn load_tr(&mut self, selector: u16) {
        self.pv.load_tr(selector)
    }
    fn set_interrupt_flag(&mut self, regs: &mut Regs, on: bool) {
        regs.rflags = if on { regs.rflags | rflags::IF } else { regs.rflags & !rflags::IF };
    }
}

/// Set by [`reopen`]: the stub's return runs `sti; iretq` (one trapping `sti`, whose
/// interrupt shadow covers the `iretq`, as in the probe of docs/pvm.md).
#[no_mangle]
static mut previrt_pvm_sti: u8 = 0;

/// After a host delivery closed the mode's own interrupt flag, have the return open it again
/// when the kernel's IF (`on`) is set.
fn reopen(on: bool) {
    // SAFETY: single vCPU; the flags are written by the trampolines, the stubs and here.
    unsafe {
        if on && previrt_pvm_masked != 0 && native() {
            previrt_pvm_masked = 0;
            previrt_pvm_sti = 1;
        }
    }
}

/// The stub's Rust half: [`dispatch`], then, once nothing borrows the machines any more (as
/// `Paravirt::enter`), the safe point for a requested suspend (the pvm hooks leave and
/// re-enter the mode), then the selectors of the mode the CPU is in now.
#[no_mangle]
extern "C" fn previrt_pvm_dispatch(regs: &mut Regs) {
    if dispatch(regs) {
        guest::migrate::safe_point();
    }
    let (cs, ss) = hardware_selectors();
    if cs & 3 == 3 {
        (regs.cs, regs.ss) = (cs, ss);
    } else if regs.cs & 3 == 3 {
        // The mode was left (a migration) after an event frame took the substitute gate's
        // selector: the ordinary path returns to the kernel's.
        (regs.cs, regs.ss) = (KERNEL_CS, KERNEL_SS);
    }
    regs.iret_rsp = regs.gpr[gpr::RSP];
    set_deadline(hv::machine());
}

/// The shared handlers over [`Pvm`] with the kernel's selectors in the frame, then ticks and
/// pending events as in `hv`. Whether the platform asks for a suspend.
fn dispatch(regs: &mut Regs) -> bool {
    let pv = hv::machine();
    // SAFETY: the stub runs with `vif` clear (no event inside the runtime), single vCPU.
    let st = unsafe { STATE.get() };
    let Some((op, ool)) = guest::enter_site(regs) else {
        pv.fatal(format_args!("call into the runtime from {:#x}, which is no site", regs.rip.wrapping_sub(5)))
    };
    if core::mem::take(&mut st.enter_pending) {
        st.enter(pv);
        // After a migration: pvm's own site encoding, now at native speed.
        guest::migrate::finish();
    }
    if regs.cs & 3 == 3 {
        (regs.cs, regs.ss) = (KERNEL_CS, KERNEL_SS);
    }
    if op.is_some_and(|op| op.kind == Kind::Out && matches!(devices::device(op.port(regs)), Some((Dev::DebugExit, _))))
    {
        st.summary(pv);
    }
    let done = op.is_some_and(|op| {
        st.store_table(&op, regs, pv) || emulate::emulate(&op, regs, &mut Pvm { pv: &mut *pv, st: &mut *st })
    });
    if !done {
        regs.rip = ool;
    }
    pv.tick();
    pv.deliver_pending(regs);
    if st.idt_loaded && regs.rip == sym_addr!("previrt_pv_deliver") {
        // SAFETY: single vCPU; read by the trampoline's entry, where this delivery goes.
        unsafe { previrt_pvm_soft = 1 };
    }
    reopen(regs.rflags & rflags::IF != 0);
    pv.hv.suspend_requested()
}

/// The #PF check, from `previrt_pvm_pf` with the GPRs (15) and the host's frame (error code,
/// rip, cs, rflags, rsp, ss): a fault the kernel's tables would not raise (the copy is older
/// than a mapping) is resolved by a sync and retried; others go to the kernel's handler.
#[no_mangle]
extern "C" fn previrt_pvm_fault(frame: &mut [u64; 21]) -> u64 {
    let pv = hv::machine();
    // SAFETY: as the dispatcher.
    let st = unsafe { STATE.get() };
    let addr = super::fault::address(frame, st.shadow.cr3()).unwrap_or_else(|| {
        st.cr2_reads += 1;
        hw::Hardware.read_cr(2)
    });
    st.cr2 = Some(addr);
    let write = frame[15] & 2 != 0;
    let ours = shadow::kernel_allows(st.kernel_cr3, addr, write)
        .is_some_and(|k| shadow::shadow_allows(st.shadow.cr3(), addr, write) != Some(k));
    // The kernel's IF at the fault (the entry put it into the frame and cleared `vif`).
    let kernel_if = frame[18] & rflags::IF != 0;
    if !ours {
        // The kernel's #PF gate as it is now (read here, not in the entry: see there), or
        // the #NP/#GP the CPU raises instead, with its error code in the #PF's place; the
        // handler starts with IF clear through an interrupt gate.
        let (g, error) = deliver_through(PF_VECTOR, true);
        frame[15] = error.unwrap_or(frame[15]);
        set_vif(kernel_if && !emulate::interrupt_gate(&g));
        return emulate::gate_handler(&g);
    }
    st.sync(pv);
    st.resolved += 1;
    // Retried: the kernel's IF comes back.
    set_vif(kernel_if);
    reopen(kernel_if);
    (frame[17], frame[20]) = hardware_selectors();
    0
}

// The pvm site stub: the trace stub's text with `vif` saved into the frame's IF and cleared
// for the dispatch (and `cli` on the ordinary path, before the kernel's first CR3 load makes
// it native), and `vif` set from the frame's IF just before the `iretq` (an event that comes
// between the two is taken on the kernel's stack below the frame, as at any instruction).
core::arch::global_asm!(
    concat!(
        ".section .text.previrt_pvm, \"ax\", @progbits\n",
        ".globl previrt_pvm_entry\n",
        "previrt_pvm_entry:\n",
        guest::site_stub!(
            r#"    movq %cs, %rax
    testb $3, %al
    jnz 1f
    cli
1:  movq previrt_pvm_vif(%rip), %rcx
    xorl %eax, %eax
    xchgl %eax, (%rcx)
    andq $-513, 144(%rsp)
    andl $1, %eax
    shlq $9, %rax
    orq %rax, 144(%rsp)
"#,
            "previrt_pvm_dispatch",
            r#"    pushq %rax
    pushq %rcx
    movq 32(%rsp), %rax
    shrq $9, %rax
    andl $1, %eax
    movq previrt_pvm_vif(%rip), %rcx
    movl %eax, (%rcx)
    popq %rcx
    popq %rax
    cmpb $0, previrt_pvm_sti(%rip)
    jne 2f
    iretq
2:  movb $0, previrt_pvm_sti(%rip)
    sti
    iretq
"#
        ),
        // #PF: save the GPRs and the flags, ask `previrt_pvm_fault`, then retry or go to the
        // kernel's handler with every register and flag as at the fault (through one jump, so
        // that no compare after the flags are back changes them).
        r#"previrt_pvm_pf:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushfq
    leaq 8(%rsp), %rdi
    movq %rsp, %rbx
    andq $-16, %rsp
    cld
    call previrt_pvm_fault
    movq %rbx, %rsp
    testq %rax, %rax
    jnz 1f
    leaq pvm_pf_retry(%rip), %rax
1:  movq %rax, previrt_pvm_next(%rip)
    popfq
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    jmpq *previrt_pvm_next(%rip)
pvm_pf_retry:
    addq $8, %rsp
    cmpb $0, previrt_pvm_sti(%rip)
    jne 2f
    iretq
2:  movb $0, previrt_pvm_sti(%rip)
    sti
    iretq

// One trampoline per vector (16 bytes each, the substitute's gates): the vector, and whether
// the CPU pushed an error code, for `pvm_entry`.
    .balign 16
    .globl previrt_pvm_vectors
previrt_pvm_vectors:
    .set pvm_vector, 0
    .rept 256
    .balign 16
    .set pvm_error, 0
    .if (pvm_vector == 8) || (pvm_vector >= 10 && pvm_vector <= 14) || (pvm_vector == 17) || (pvm_vector == 21) || (pvm_vector >= 29 && pvm_vector <= 30)
    .set pvm_error, 1
    .endif
    pushq $(pvm_vector | pvm_error << 8)
    jmp pvm_entry
    .set pvm_vector, pvm_vector + 1
    .endr

// Every delivery through the substitute, with the kernel's gate read from its table now
// (`previrt_pvm_idt`). A host delivery's frame gets the kernel's IF (`vif`; the hardware's
// reads 1) in its RFLAGS and the kernel's selectors (through a trap gate the host pushes the
// hardware's 0x33/0x2b, through an interrupt gate 0x10/0x18: tests/pvm.rs; KERNEL_CS,
// KERNEL_SS), a #PF's error code says a supervisor access (the host reports the native ring
// 3's), and a vector from 32 up notes that the delivery closed the mode's own IF. The
// runtime's own delivery (`previrt_pvm_soft`: always an interrupt vector, so that an
// exception on the way to it, e.g. a #PF on the stack, is not taken for it) built its frame
// with the kernel's IF, which `vif` takes instead. Then `vif` is cleared when the kernel's
// gate is an interrupt gate, as the CPU would clear IF, and the kernel's handler runs with
// every register and flag as at the delivery: its address replaces the trampoline's word,
// taken by the final `ret`. A gate that is not present or beyond the kernel's limit raises
// the #NP or #GP the CPU would (`pvm_absent`). A #PF goes to the check (`previrt_pvm_pf`)
// with `vif` clear, which reads the kernel's gate itself when the fault is the kernel's
// (reading it here could fault again while the copy is older than the kernel's mapping of
// its IDT).
// Stack: 0 rsi, 8 rdx, 16 rcx, 24 rax, 32 flags, 40 the trampoline's word, 48 the frame
// (after the error code, if any): RIP, CS, RFLAGS, RSP, SS.
pvm_entry:
    pushfq
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    movzbl 40(%rsp), %ecx
    movzbl 41(%rsp), %eax
    leaq 48(%rsp, %rax, 8), %rdx
    movq previrt_pvm_vif(%rip), %rax
    cmpl $32, %ecx
    jb 1f
    cmpb $0, previrt_pvm_soft(%rip)
    jne 2f
    movb $1, previrt_pvm_masked(%rip)
1:  movl (%rax), %esi
    andl $1, %esi
    shll $9, %esi
    andq $-513, 16(%rdx)
    orq %rsi, 16(%rdx)
    movq $0x10, 8(%rdx)
    movq $0x18, 32(%rdx)
    cmpl $14, %ecx
    jne 3f
    andq $-5, -8(%rdx)
    jmp 3f
2:  movb $0, previrt_pvm_soft(%rip)
    movq 16(%rdx), %rsi
    shrq $9, %rsi
    andl $1, %esi
    movl %esi, (%rax)
3:  cmpl $14, %ecx
    je 5f
    cmpq previrt_pvm_idt+8(%rip), %rcx
    jae pvm_absent
    movq %rcx, %rsi
    shlq $4, %rsi
    addq previrt_pvm_idt(%rip), %rsi
    testb $0x80, 5(%rsi)
    jz pvm_absent
    movb 5(%rsi), %dl
    andb $0xf, %dl
    cmpb $0xe, %dl
    jne 4f
    movl $0, (%rax)
4:  movq 4(%rsi), %rax
    shrq $16, %rax
    shlq $16, %rax
    movw (%rsi), %ax
    jmp 6f
5:  movl $0, (%rax)
    leaq previrt_pvm_pf(%rip), %rax
6:  movq %rax, 40(%rsp)
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    popfq
    ret
// A gate the kernel's table does not have: `previrt_pvm_absent` (the caller-saved registers
// the entry did not save around it) picks the #NP/#GP gate; its error code goes where the
// event's was, or into a slot inserted below the frame (the saved registers and the word
// move down one).
pvm_absent:
    movl $0, (%rax)
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %rbp
    movq %rsp, %rbp
    leaq 48(%rsp), %rdi
    andq $-16, %rsp
    cld
    call previrt_pvm_absent
    movq %rbp, %rsp
    popq %rbp
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    testb $1, 41(%rsp)
    jnz 7f
    pushq (%rsp)
    movq 16(%rsp), %rsi
    movq %rsi, 8(%rsp)
    movq 24(%rsp), %rsi
    movq %rsi, 16(%rsp)
    movq 32(%rsp), %rsi
    movq %rsi, 24(%rsp)
    movq 40(%rsp), %rsi
    movq %rsi, 32(%rsp)
7:  movq previrt_pvm_error(%rip), %rsi
    movq %rsi, 48(%rsp)
    jmp 6b

// Lean interrupt-flag entries (`lean`): each jumps through its `previrt_pvm_lean` slot. The
// bodies keep every register and the arithmetic flags (saved with pushfq, restored with
// popfq, which cannot change the hardware IF at RPL 3) and leave the stack as the instruction
// would. One that turns the kernel's IF on (or pushes it on) first stores `vif` = 1 and then
// takes the stub, with everything as at the call, when an event is pending, the mode's own
// flag is closed (a trapping `sti` must reopen it) or a tick is due — the stub's dispatch
// raises and delivers it as for any site. Stack: 0 rdx, 8 rax, 16 flags, 24 return address.
    .balign 8
    .globl previrt_pvm_lean_entries
previrt_pvm_lean_entries:
    .set pvm_kind, 0
    .rept 4
    .balign 8
    jmpq *(previrt_pvm_lean + 8 * pvm_kind)(%rip)
    .set pvm_kind, pvm_kind + 1
    .endr

    .macro pvm_stub_if_due
    movq previrt_pvm_vif(%rip), %rax
    cmpq $0, 8(%rax)
    jne pvm_lean_stub
    cmpb $0, previrt_pvm_masked(%rip)
    jne pvm_lean_stub
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    cmpq previrt_pvm_deadline(%rip), %rax
    jae pvm_lean_stub
    .endm

previrt_pvm_cli:
    pushq %rax
    movq previrt_pvm_vif(%rip), %rax
    movl $0, (%rax)
    popq %rax
    ret

previrt_pvm_sti_on:
    pushfq
    pushq %rax
    pushq %rdx
    movq previrt_pvm_vif(%rip), %rax
    movl $1, (%rax)
    pvm_stub_if_due
    popq %rdx
    popq %rax
    popfq
    ret
pvm_lean_stub:
    popq %rdx
    popq %rax
    popfq
    jmp previrt_pvm_entry

// pushf: the hardware flags with IF replaced by `vif`, stored where the return address was;
// the return address moves into the saved flags' slot, the flags one below (nothing is
// written below %rsp: an event may be delivered on this stack at any instruction).
previrt_pvm_pushf:
    pushfq
    pushq %rax
    pushq %rdx
    movq previrt_pvm_vif(%rip), %rax
    cmpl $0, (%rax)
    je 1f
    pvm_stub_if_due
    movq previrt_pvm_vif(%rip), %rax
1:  movl (%rax), %eax
    andl $1, %eax
    shlq $9, %rax
"#,
        crate::guest::lean_pushf_exit!(),
        r#"
// popf: the popped image's IF into `vif`, the rest into the hardware flags; the return
// address moves onto the popped slot.
previrt_pvm_popf:
    pushfq
    pushq %rax
    pushq %rdx
    movq 32(%rsp), %rdx
    shrq $9, %rdx
    andl $1, %edx
    movq previrt_pvm_vif(%rip), %rax
    movl %edx, (%rax)
    testl %edx, %edx
    jz 1f
    pvm_stub_if_due
1:
"#,
        crate::guest::lean_popf_exit!(),
        ".text\n"
    ),
    options(att_syntax, raw)
);
