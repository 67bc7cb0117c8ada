//! The in-kernel runtime: start of day, the trace stub and its dispatcher, `previrt_repatch`.
//!
//! Link-time parameters are absolute symbols defined by `previrt link`
//! (docs/runtime-entry.md): the kernel's site table bounds, its original PVH entry, the default
//! backend and virt − phys.

pub(crate) mod arena;
mod boot;
pub(crate) mod hw;
mod linux;
pub(crate) mod migrate;
pub(crate) mod paravirt;
mod rt;
mod serial;

use crate::backend::{self, Backend};
use crate::emulate::{self, gpr, Op, Regs};
use crate::patch::{encode_call, IndexEntry, Patcher, CALL_LEN};
use crate::platform::{self, Platform};
use crate::trace::Counters;
use core::cell::UnsafeCell;
use core::fmt::Write;
use previrt_site_abi::{flags, Kind};
use serial::Com1;

/// Most sites the runtime indexes; a bigger table is refused at boot (left unpatched).
const MAX_SITES: usize = 8192;
/// Out-of-line slot per site: the original instruction (≤ 15 bytes) and a `jmp rel32` back.
const OOL_SLOT: usize = 24;
/// Writing here (isa-debug-exit) ends the run: the trace summary is printed first.
const EXIT_PORT: u16 = 0xf4;

/// The value of an absolute link-time symbol. Read through `movabs` because the compiler
/// assumes the address of an extern static is never 0 (and may fold comparisons), while
/// these symbols are numbers, 0 included.
macro_rules! link_value {
    ($sym:literal) => {{
        let v: u64;
        // SAFETY: loads a link-time constant, no memory access.
        unsafe { core::arch::asm!(concat!("movabsq $", $sym, ", {}"), out(reg) v, options(att_syntax, nomem, nostack, preserves_flags)) };
        v
    }};
}
pub(crate) use link_value;

/// Guest-physical address of a runtime (or kernel image) address.
pub(crate) fn gpa(va: u64) -> u64 {
    va.wrapping_sub(link_value!("__previrt_virt_delta"))
}

/// Single-CPU global state: written at boot and by `previrt_repatch`, which run with
/// interrupts off and no CPU inside a site.
pub(crate) struct Global<T>(pub(crate) UnsafeCell<T>);
// SAFETY: see the type's documentation.
unsafe impl<T> Sync for Global<T> {}
impl<T> Global<T> {
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn get(&self) -> &mut T {
        &mut *self.0.get()
    }
}

struct State {
    patcher: Option<Patcher<'static>>,
    active: &'static Backend,
    platform: Platform,
    /// Where routed sites call: the trace stub, a platform's own (Xen PV), or the migratable
    /// backends' shared entry (guest/migrate.rs).
    stub: u64,
    /// The stub the sites were last patched with (a re-patch with the same route and stub
    /// touches no site).
    patched_stub: u64,
    /// After a lazy move (guest/migrate.rs): the backend whose encoding the sites still hold,
    /// except the ones already restored to their instruction at their first call.
    lazy_from: Option<&'static Backend>,
    /// `previrt.trace=sites`: the exit summary lists every executed site.
    site_profile: bool,
}

static STATE: Global<State> = Global(UnsafeCell::new(State {
    patcher: None,
    active: &backend::NATIVE,
    platform: Platform::BareMetal,
    stub: 0,
    patched_stub: 0,
    lazy_from: None,
    site_profile: false,
}));
static INDEX: Global<[IndexEntry; MAX_SITES]> =
    Global(UnsafeCell::new([IndexEntry { site: 0, record_addr: 0 }; MAX_SITES]));
static OOL: Global<[[u8; OOL_SLOT]; MAX_SITES]> = Global(UnsafeCell::new([[0; OOL_SLOT]; MAX_SITES]));
static COUNTERS: Counters<MAX_SITES> = Counters::new();

fn stop() -> ! {
    loop {
        // SAFETY: parking the CPU for good.
        unsafe { core::arch::asm!("cli", "hlt") };
    }
}

/// Serialize the instruction stream after patching.
fn serialize() {
    hw::cpuid(0, 0);
}

fn table() -> (u64, usize) {
    let start = link_value!("__previrt_sites_start");
    let end = link_value!("__previrt_sites_end");
    (start, end.saturating_sub(start) as usize)
}

/// TSC ticks per millisecond: the in-tree hypervisor's figure (kHz) when it reports one, which
/// a loaded host cannot skew, else [`tsc_per_ms`].
fn tsc_rate(platform: Platform) -> u64 {
    hv_tsc_khz(platform).unwrap_or_else(tsc_per_ms)
}

/// The in-tree hypervisor's TSC rate (kHz = ticks per ms) when it reports one.
fn hv_tsc_khz(platform: Platform) -> Option<u64> {
    use previrt_hv_abi::{CPUID_BASE, CPUID_TSC};
    let offered = platform == Platform::PrevirtHv && hw::cpuid(CPUID_BASE, 0)[0] >= CPUID_TSC;
    offered.then(|| u64::from(hw::cpuid(CPUID_TSC, 0)[0])).filter(|&khz| khz != 0)
}

/// TSC ticks per millisecond, from PIT channel 2 (10 ms, mode 0). 0 if the PIT never fires.
fn tsc_per_ms() -> u64 {
    const MS: u64 = 10;
    const PIT_COUNT: u16 = (1_193_182 * MS / 1000) as u16;
    let gate = hw::inb(0x61);
    hw::outb(0x61, (gate & !0x02) | 0x01);
    hw::outb(0x43, 0xb0);
    hw::outb(0x42, PIT_COUNT as u8);
    hw::outb(0x42, (PIT_COUNT >> 8) as u8);
    let t0 = hw::rdtsc();
    let mut t1 = t0;
    while hw::inb(0x61) & 0x20 == 0 {
        t1 = hw::rdtsc();
        if t1 - t0 > 50_000_000_000 {
            t1 = t0;
            break;
        }
    }
    hw::outb(0x61, gate);
    (t1 - t0) / MS
}

/// The kernel command line from the boot information of boot path `path` (boot.rs's BOOT_*
/// indices): PVH `hvm_start_info` (magic 0x336ec578, cmdline_paddr at +24) or multiboot info
/// (flags bit 2, cmdline at +16), identity-mapped. The 64-bit entry's boot info is the
/// kernel's own structure, so it has none.
fn boot_cmdline(info: u64, path: u32) -> &'static [u8] {
    const PVH_MAGIC: u32 = 0x336e_c578;
    if info == 0 {
        return &[];
    }
    // SAFETY: the loader passes valid boot information; low memory is identity-mapped.
    unsafe {
        let first = (info as *const u32).read_unaligned();
        let p = match path {
            0 if first == PVH_MAGIC => ((info + 24) as *const u64).read_unaligned(),
            1 if first & 4 != 0 => ((info + 16) as *const u32).read_unaligned() as u64,
            _ => 0,
        } as *const u8;
        if p.is_null() {
            return &[];
        }
        let len = (0..4096).find(|&i| p.add(i).read() == 0).unwrap_or(4096);
        core::slice::from_raw_parts(p, len)
    }
}

/// Out-of-line copy of site `i`'s original instruction followed by `jmp resume`; RIP-relative
/// displacements are adjusted for the new location.
unsafe fn build_ool(slot: &mut [u8; OOL_SLOT], site: &crate::patch::Site) {
    let n = site.record.insn_len as usize;
    core::ptr::copy_nonoverlapping(site.at.save as *const u8, slot.as_mut_ptr(), n);
    let slot_addr = slot.as_ptr() as u64;
    if site.record.has(flags::RIP_RELATIVE) {
        let at = (site.record.imm as usize).min(n.saturating_sub(4));
        let disp = i32::from_le_bytes(slot[at..at + 4].try_into().unwrap_or([0; 4])) as i64;
        let moved = disp + site.at.site as i64 - slot_addr as i64;
        slot[at..at + 4].copy_from_slice(&(moved as i32).to_le_bytes());
    }
    let mut jmp = [0u8; CALL_LEN];
    // A jmp is a call with opcode e9; both are rel32 from the end of the 5 bytes.
    let _ = encode_call(slot_addr + n as u64, site.next(), &mut jmp);
    jmp[0] = 0xe9;
    slot[n..n + CALL_LEN].copy_from_slice(&jmp);
}

/// The address of an assembly symbol (a stub), taken RIP-relative: with the kernel code
/// model LLVM may fold `symbol + constant` into an absolute 32S relocation that only fits for
/// kernels linked in the top 2 GiB, and the runtime also runs at low identity-mapped addresses.
macro_rules! sym_addr {
    ($sym:literal) => {{
        let a: u64;
        // SAFETY: computes an address, no memory access.
        unsafe { core::arch::asm!(concat!("lea {}, [rip + ", $sym, "]"), out(reg) a, options(nomem, nostack, preserves_flags)) };
        a
    }};
}
pub(crate) use sym_addr;

/// Backends whose interrupt-flag sites call lean entries of their own (no record lookup, no
/// register file), and the entry for a site.
const LEAN: &[(u32, fn(&crate::patch::Site) -> Option<u64>)] =
    &[(backend::PVM.id, crate::pvm::lean), (backend::XEN.id, crate::xen::lean)];

/// Patch every site for `to`; `later`: a re-patch after boot (INIT sites left alone, sites
/// compared before they are written, and none visited when `to` routes as the active backend
/// does through the same stub). At CPL 0 code is made writable by clearing CR0.WP for the
/// duration (the kernel may have mapped its text read-only by the time of a later repatch); a
/// runtime running deprivileged (Xen PV, ring 3, or pvm's native mode) has no CR0 and patches
/// through mappings its platform made writable.
unsafe fn apply(state: &mut State, to: &'static Backend, later: bool) -> Option<crate::patch::Stats> {
    let p = state.patcher.as_ref()?;
    // After a lazy move the sites hold `from`'s encoding or already their instruction: no
    // site may be assumed to hold a stub call.
    let (from, lazy) = state.lazy_from.map_or((state.active, false), |b| (b, true));
    // The same route function, stub and lean entries write the same bytes.
    let lean_kinds = |b: &Backend| LEAN.iter().position(|(id, _)| *id == b.id);
    let same_stub = state.patched_stub == state.stub && lean_kinds(from) == lean_kinds(to);
    let same_encoding = later && same_stub && core::ptr::fn_addr_eq(from.route, to.route);
    if same_encoding && !lazy {
        state.active = to;
        return Some(crate::patch::Stats { sites: p.sites, unchanged: p.sites, ..Default::default() });
    }
    // Back to the encoding of before a lazy move: only the sites restored since differ, and
    // the lazy dispatcher logged what they held.
    let back = same_encoding && lazy;
    let lean = |s: &crate::patch::Site| LEAN.iter().find(|(id, _)| *id == to.id).and_then(|(_, lean)| lean(s));
    let stub = |s: &crate::patch::Site| lean(s).unwrap_or(state.stub);
    let stats = writing_code(|| match later {
        true => back
            .then(|| migrate::undo(p))
            .flatten()
            .unwrap_or_else(|| p.repatch_with(from, same_stub && !lazy, to, &stub)),
        false => p.apply_with(to, &stub),
    });
    state.lazy_from = None;
    state.active = to;
    state.patched_stub = state.stub;
    Some(stats)
}

/// Run `f`, which writes code, then serialize. At CPL 0 code is made writable by clearing
/// CR0.WP for the duration; a runtime running deprivileged has no CR0 (see [`apply`]).
unsafe fn writing_code<R>(f: impl FnOnce() -> R) -> R {
    let cs: u64;
    core::arch::asm!("mov {}, cs", out(reg) cs, options(nomem, nostack, preserves_flags));
    let cpl0 = cs & 3 == 0;
    let cr0 = if cpl0 { emulate::Machine::read_cr(&mut hw::Hardware, 0) } else { 0 };
    if cpl0 {
        emulate::Machine::write_cr(&mut hw::Hardware, 0, cr0 & !(1 << 16));
    }
    let r = f();
    if cpl0 {
        emulate::Machine::write_cr(&mut hw::Hardware, 0, cr0);
    }
    serialize();
    r
}

/// Start of day for any boot path: save the originals, build the index and the out-of-line
/// slots, and patch every site for `to`, routed sites calling `stub`.
///
/// # Safety
/// Once, at boot, single-threaded, with the kernel image mapped and writable.
pub(crate) unsafe fn patch_at_boot(
    to: &'static Backend,
    stub: u64,
) -> Result<Option<crate::patch::Stats>, crate::patch::PatchError> {
    let state = STATE.get();
    state.stub = stub;
    let (start, len) = table();
    let p = Patcher::prepare(start, len, INDEX.get())?;
    for (slot, e) in OOL.get().iter_mut().zip(&p.index[..p.sites]) {
        build_ool(slot, &p.site(e));
    }
    state.patcher = Some(p);
    Ok(apply(state, to, false))
}

/// The paravirtual backends of HVM-style platforms: the platform each needs (and what to say
/// when it is not there), its set-up (given TSC ticks per ms), its console for the runtime's
/// messages, an optional boot-log line, and its site stub.
struct Paravirtual {
    backend: &'static Backend,
    platform: Platform,
    missing: &'static str,
    init: fn(u64) -> Result<(), &'static str>,
    console: fn(&str) -> core::fmt::Result,
    describe: Option<fn(&mut dyn Write)>,
    stub: fn() -> u64,
}

const PARAVIRTUAL: [Paravirtual; 3] = [
    Paravirtual {
        backend: &backend::HV,
        platform: Platform::PrevirtHv,
        missing: "no previrt hypervisor signature in CPUID",
        init: crate::hv::init,
        console: |s| crate::hv::Console.write_str(s),
        describe: None,
        stub: crate::hv::stub,
    },
    Paravirtual {
        backend: &backend::XEN_HVM,
        platform: Platform::XenHvm,
        missing: "no Xen signature in CPUID",
        init: |_| crate::xen_hvm::init(),
        console: |s| crate::xen_hvm::Console.write_str(s),
        describe: Some(crate::xen_hvm::describe),
        stub: crate::xen_hvm::stub,
    },
    Paravirtual {
        backend: &backend::PVM,
        platform: Platform::PrevirtHv,
        missing: "no previrt hypervisor signature in CPUID",
        init: crate::pvm::init,
        console: |s| crate::hv::Console.write_str(s),
        describe: None,
        stub: crate::pvm::stub,
    },
];

/// What `auto` chooses on platform `p` (at boot and after a migration): the platform's
/// paravirtual backend; on the in-tree hypervisor `pvm` when the VMM offers KVM-PVM's native
/// mode.
fn auto_choice(p: Platform) -> u32 {
    match platform::auto_backend(p) {
        hv if hv == backend::HV.id && crate::pvm::offered() => backend::PVM.id,
        b => b,
    }
}

/// A paravirtual backend's console as a `Write`.
struct PvConsole(fn(&str) -> core::fmt::Result);

impl Write for PvConsole {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        (self.0)(s)
    }
}

/// Called by every boot path (boot.rs) in long mode with its boot information and path index.
#[no_mangle]
extern "C" fn previrt_boot(start_info: u64, path: u32) {
    serial::init();
    let mut out = Com1;
    // SAFETY: boot runs once, single-threaded, interrupts off.
    let state = unsafe { STATE.get() };
    state.platform = platform::detect(|leaf| hw::cpuid(leaf, 0));
    let default = backend::by_id(link_value!("__previrt_default_backend") as u32).unwrap_or(&backend::NATIVE);
    let cmdline = boot_cmdline(start_info, path);
    state.site_profile = platform::cmdline_value(cmdline, b"previrt.trace") == Some(b"sites");
    let asked = platform::cmdline_value(cmdline, b"previrt.backend");
    let mut chosen = match asked {
        None => default,
        // `auto`: the platform's paravirtual backend when its signature is there.
        Some(b"auto") => backend::by_id(auto_choice(state.platform)).unwrap_or(&backend::NATIVE),
        Some(name) => backend::by_name(name).unwrap_or_else(|| {
            let name = core::str::from_utf8(name).unwrap_or("?");
            let _ = writeln!(out, "previrt: unknown backend '{name}', using {}", default.name);
            default
        }),
    };
    let per_ms = tsc_rate(state.platform);
    migrate::boot(per_ms);
    let mut pv = PARAVIRTUAL.iter().find(|p| p.backend.id == chosen.id);
    if let Some(p) = pv {
        let why = match state.platform == p.platform {
            true => (p.init)(per_ms).err(),
            false => Some(p.missing),
        };
        if let Some(why) = why {
            let _ =
                writeln!(out, "previrt: backend {} unavailable ({why}), using {}", chosen.name, backend::NATIVE.name);
            chosen = &backend::NATIVE;
            pv = None;
        }
    }
    // Once a paravirtual backend is up, the runtime's messages go to its console (no exits
    // for hv's ring).
    let mut pv_out = pv.map(|p| PvConsole(p.console));
    let out: &mut dyn Write = match &mut pv_out {
        Some(c) => c,
        None => &mut out,
    };
    if asked == Some(b"auto") {
        let _ = writeln!(out, "previrt: backend=auto chose {} (platform={})", chosen.name, state.platform.name());
    }
    if let Some(describe) = pv.and_then(|p| p.describe) {
        describe(out);
    }
    let stub = pv.map_or_else(|| sym_addr!("previrt_trace_entry"), |p| migrate::entry((p.stub)()));
    let t0 = hw::rdtsc();
    // SAFETY: the table and the sites it names are in the loaded kernel image, identity- or
    // window-mapped and writable under the boot page tables.
    let result = unsafe { patch_at_boot(chosen, stub) };
    let cycles = hw::rdtsc() - t0;
    match result {
        Ok(Some(stats)) => {
            let _ = write!(out, "previrt: backend={} sites={} patched in ", chosen.name, stats.sites);
            let _ = match per_ms {
                0 => write!(out, "{cycles} cycles"),
                _ => write!(out, "{} us", cycles * 1000 / per_ms),
            };
            let kept = match stats.kept_original {
                0 => "",
                _ => " (some sites kept the original instruction)",
            };
            let _ = writeln!(out, " (platform={}){kept}", state.platform.name());
        }
        Ok(None) => {}
        Err(e) => {
            let _ = writeln!(out, "previrt: site table unusable, kernel left unpatched: {e}");
        }
    }
}

/// Re-patch every site for backend `id` (see [`backend::BACKENDS`]). Callable by the kernel
/// or a suspend/resume path at any time with interrupts off and no CPU inside a site.
/// Returns 0, or -1 for an unknown backend or an unpatched kernel.
#[no_mangle]
pub extern "C" fn previrt_repatch(id: u32) -> i32 {
    let Some(to) = backend::by_id(id) else { return -1 };
    // SAFETY: the caller guarantees quiescence (documented above).
    match unsafe { apply(STATE.get(), to, true) } {
        Some(_) => 0,
        None => -1,
    }
}

/// The trace stub's Rust half: find the site by return address, count it, perform its effect
/// (emulated, or out of line), and set up the iret frame.
#[no_mangle]
extern "C" fn previrt_trace_dispatch(regs: &mut Regs) {
    let entry = (regs.cs, regs.ss, regs.gpr[gpr::RSP]);
    let Some((op, ool)) = enter_site(regs) else {
        let _ = writeln!(
            Com1,
            "previrt: call into the runtime from {:#x}, which is no site",
            regs.rip.wrapping_sub(CALL_LEN as u64)
        );
        stop()
    };
    if op.is_some_and(|op| op.kind == Kind::Out && op.port(regs) == EXIT_PORT) {
        site_summary(&mut Com1);
    }
    if !op.is_some_and(|op| emulate::emulate(&op, regs, &mut hw::Hardware)) {
        regs.rip = ool;
    }
    regs.iret_rsp = regs.gpr[gpr::RSP];
    keep_segments(regs, entry);
}

/// Unless the site changed CS or SS, return without reloading them (CS = 0 tells a stub
/// ending in [`keep_segments_exit`]): an `iretq` would reload both from the GDT, wrong right
/// after a kernel's `lgdt` and before its own far return (Linux's startup_64). The stub's
/// plain return writes three words below the target RSP, which must not reach the frame it
/// still reads. `entry`: CS, SS and RSP of the frame as the stub saved it.
pub(crate) fn keep_segments(regs: &mut Regs, entry: (u64, u64, u64)) {
    if (regs.cs, regs.ss) == (entry.0, entry.1) && regs.iret_rsp >= entry.2 - 8 {
        regs.cs = 0;
    }
}

/// The per-kind site execution summary (`previrt-trace: …`), for any routing backend's exit.
pub(crate) fn site_summary(out: &mut dyn Write) {
    // SAFETY: read-only use of the state written at boot.
    let state = unsafe { STATE.get() };
    let Some(p) = state.patcher.as_ref() else { return };
    let _ = COUNTERS.summary(linux::indexed(p), out);
    linux::module_summary(out);
    if state.site_profile {
        let _ = COUNTERS.profile(linux::site_kinds(p), out);
    }
}

/// Whether the loaded site table has a site of `kind`: a backend choosing at boot how to
/// serve a kind (Xen PV: page-table writes through `mmu_update` or shadow tables).
pub(crate) fn has_site(kind: Kind) -> bool {
    // SAFETY: read-only use of the state written at boot.
    let state = unsafe { STATE.get() };
    // SAFETY: index entries name records of the loaded table.
    state
        .patcher
        .as_ref()
        .is_some_and(|p| p.index[..p.sites].iter().any(|e| unsafe { p.site(e) }.record.kind == kind as u16))
}

/// The site a stub was called from (`regs.rip` is the return address): counts it, sets
/// `regs.rip` to its resume address and returns its op (None for an unknown kind) and the
/// address of its out-of-line slot. None when the caller is no site.
pub(crate) fn enter_site(regs: &mut Regs) -> Option<(Option<Op>, u64)> {
    // SAFETY: the state is only written at boot/repatch, with no CPU inside a site.
    let state = unsafe { STATE.get() };
    let p = state.patcher.as_ref()?;
    // `alias`: the caller runs the image at its physical alias (linux.rs); so do resume and slot.
    let (i, alias) = linux::find_site(p, regs.rip.wrapping_sub(CALL_LEN as u64))?;
    // SAFETY: index entries name records and save slots of the loaded table.
    let (site, saved) = unsafe {
        let site = p.site(&p.index[i]);
        (site, core::slice::from_raw_parts(site.at.save as *const u8, site.record.insn_len as usize))
    };
    linux::writable(|| COUNTERS.hit(site.record.kind, i));
    regs.rip = site.next() - alias;
    // SAFETY: slot i was built at boot for site i.
    let ool = unsafe { OOL.get()[i].as_ptr() } as u64 - alias;
    Some((Op::new(&site.record, site.at.site, saved), ool))
}

// The stub below hard-codes this frame size.
const _: () = assert!(core::mem::size_of::<Regs>() == 168);

// A site stub. Sites call it (`call rel32`), so on entry [rsp] is the return address
// (site + 5) and the site's %rsp is rsp + 8. It saves a `Regs` frame below the return address
// (16 GPRs, then an iretq frame), runs `$off` to turn interrupts off for the dispatch (it may
// use %rax and %rcx, already saved), calls `$dispatch` with 16-byte stack alignment and DF
// clear, restores the GPRs and returns through the iretq frame with `$exit` — which restores
// RFLAGS (IF, DF) and RSP and goes to the resume address, the out-of-line slot, or wherever an
// emulated iret goes. Flags are not touched before they are saved (lea/mov only). The trace
// stub below (`cli`, `iretq`) and the Xen PV stub (crate::xen) are this text with their own
// `$off`, dispatcher and `$exit`.
macro_rules! site_stub {
    ($off:literal, $dispatch:literal, $exit:expr) => {
        concat!(
            r#"    leaq -168(%rsp), %rsp
    movq %rax, 0(%rsp)
    movq %rcx, 8(%rsp)
    movq %rdx, 16(%rsp)
    movq %rbx, 24(%rsp)
    movq %rbp, 40(%rsp)
    movq %rsi, 48(%rsp)
    movq %rdi, 56(%rsp)
    movq %r8, 64(%rsp)
    movq %r9, 72(%rsp)
    movq %r10, 80(%rsp)
    movq %r11, 88(%rsp)
    movq %r12, 96(%rsp)
    movq %r13, 104(%rsp)
    movq %r14, 112(%rsp)
    movq %r15, 120(%rsp)
    pushfq
    popq 144(%rsp)
"#,
            $off,
            r#"    leaq 176(%rsp), %rax
    movq %rax, 32(%rsp)
    movq 168(%rsp), %rax
    movq %rax, 128(%rsp)
    movq %cs, %rax
    movq %rax, 136(%rsp)
    movq %ss, %rax
    movq %rax, 160(%rsp)
    movq %rsp, %rdi
    movq %rsp, %rbx
    andq $-16, %rsp
    cld
"#,
            "    call ",
            $dispatch,
            "\n",
            r#"    movq %rbx, %rsp
    movq 0(%rsp), %rax
    movq 8(%rsp), %rcx
    movq 16(%rsp), %rdx
    movq 24(%rsp), %rbx
    movq 40(%rsp), %rbp
    movq 48(%rsp), %rsi
    movq 56(%rsp), %rdi
    movq 64(%rsp), %r8
    movq 72(%rsp), %r9
    movq 80(%rsp), %r10
    movq 88(%rsp), %r11
    movq 96(%rsp), %r12
    movq 104(%rsp), %r13
    movq 112(%rsp), %r14
    movq 120(%rsp), %r15
    leaq 128(%rsp), %rsp
"#,
            $exit
        )
    };
}
pub(crate) use site_stub;

// A site stub's exit: `iretq`, or with CS = 0 in the frame (rip, cs, rflags, rsp, ss) a return
// that keeps CS and SS: RIP, RFLAGS and the saved %rax go below the target RSP, then
// popq/popfq/ret there (frame fields are read before the slot they share is written).
macro_rules! keep_segments_exit {
    () => {
        r#"    cmpq $0, 8(%rsp)
    jne 1f
    pushq %rax
    pushq %rbx
    movq 40(%rsp), %rax
    movq 16(%rsp), %rbx
    movq %rbx, -8(%rax)
    movq 32(%rsp), %rbx
    movq %rbx, -16(%rax)
    movq 8(%rsp), %rbx
    movq %rbx, -24(%rax)
    movq (%rsp), %rbx
    leaq -24(%rax), %rsp
    popq %rax
    popfq
    ret
1:  iretq
"#
    };
}
pub(crate) use keep_segments_exit;

// The exits of the lean interrupt-flag entries (pvm, Xen PV) from their frame: 0 rdx, 8 rax,
// 16 flags, 24 return address (popf: 32 the popped image). Nothing is written below %rsp: an
// event may be delivered on this stack at any instruction.
// pushf, %rax = the virtual IF as RFLAGS bit 9 (nothing else set): the hardware flags with
// that IF go where the return address was, which moves into the saved flags' slot.
macro_rules! lean_pushf_exit {
    () => {
        r#"    movq 16(%rsp), %rdx
    andq $-513, %rdx
    orq %rax, %rdx
    movq 24(%rsp), %rax
    movq %rdx, 24(%rsp)
    movq 16(%rsp), %rdx
    movq %rax, 16(%rsp)
    movq 8(%rsp), %rax
    movq %rdx, 8(%rsp)
    movq (%rsp), %rdx
    leaq 8(%rsp), %rsp
    popfq
    ret
"#
    };
}
pub(crate) use lean_pushf_exit;

// popf, the virtual IF already taken from the image: the return address moves onto the
// popped slot, the rest of the image goes into the hardware flags.
macro_rules! lean_popf_exit {
    () => {
        r#"    movq 32(%rsp), %rax
    movq %rax, 16(%rsp)
    movq 24(%rsp), %rax
    movq %rax, 32(%rsp)
    popq %rdx
    popq %rax
    popfq
    leaq 8(%rsp), %rsp
    ret
"#
    };
}
pub(crate) use lean_popf_exit;

// The trace stub: real interrupts off for the dispatch.
core::arch::global_asm!(
    concat!(
        ".section .text.previrt_trace, \"ax\", @progbits\n",
        ".globl previrt_trace_entry\n",
        "previrt_trace_entry:\n",
        site_stub!("    cli\n", "previrt_trace_dispatch", keep_segments_exit!()),
        ".text\n"
    ),
    options(att_syntax, raw)
);
