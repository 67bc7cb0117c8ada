//! Migration-time re-patching (docs/snapshot.md, docs/hv-abi.md §9): at a safe point the
//! active backend suspends the guest; when the suspend call returns "resumed elsewhere" the
//! runtime re-detects the platform, chooses the backend for it, hands the kernel's device
//! configuration over, re-patches every site and returns into the kernel.
//!
//! Backends take part through [`HOOKS`], one row each: how they suspend, what the kernel
//! programmed under them ([`Programmed`]), how they bind such a configuration, what they leave
//! behind in the virtual hardware that travelled with the snapshot. A backend without a row
//! (trace, Xen PV) never suspends. The paravirtual backends' set-up, console and stub come
//! from the boot table (`super::PARAVIRTUAL`), so a new backend (`pvm`) adds a row there and
//! one here.
//!
//! Re-patching is cheap where it can be (docs/snapshot.md, "Re-patching"): the migratable
//! backends' routed sites all call [`entry`], one indirect jump to the active backend's stub,
//! so backends that route the same kinds (`hv` v1/v2, `xen-hvm`) have identical site bytes and
//! a move between them rebinds that pointer and touches no site. Otherwise each site is
//! compared before it is written. A backend with a faster mode of its own (`pvm`, native on
//! KVM-PVM) re-patches to the shared encoding before it suspends and to its own only once it
//! runs in that mode again ([`finish`]): on this host everything else runs on the
//! instruction-emulated ring-0 path.
//!
//! After a migration to a platform with no paravirtual interface the runtime runs
//! [`backend::NATIVE_WATCH`]: native instructions (trap-and-emulate), except `hlt`, after
//! which it looks at CPUID once; when a paravirtual interface has appeared (the VM was moved
//! back) it re-patches for it the same way. That move is lazy: the resume only points the
//! shared entry at `previrt_lazy_entry`, and a routed site gets its instruction back when it
//! is next called ([`previrt_lazy_dispatch`]); sites never run again stay calls.

use super::{apply, hw, serial::Com1, sym_addr, Global, PvConsole, State, PARAVIRTUAL, STATE};
use crate::backend::{self, Backend, Route};
use crate::devices::{Pic, Pit, Programmed};
use crate::emulate::{self, gpr, Machine as _, Regs};
use crate::patch::{self, Stats, CALL_LEN, MAX_SITE_LEN};
use crate::platform;
use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};
use previrt_hv_abi::suspend;

/// A backend's part in a migration.
struct Hooks {
    backend: &'static Backend,
    /// The site encoding the runtime writes while this backend suspends and resumes: its own,
    /// or (a backend with a faster mode) the shared `hv` one, re-patched to the backend's own
    /// by [`finish`] once it runs in that mode.
    encoding: &'static Backend,
    /// On the old platform, at the safe point: flush what is buffered and call the platform's
    /// suspend; its result (`suspend::RESUMED` when this is the restored guest).
    suspend: fn() -> i64,
    /// What the kernel programmed while this backend ran.
    programmed: fn() -> Programmed,
    /// On the new platform: bind `Programmed` (after the backend's set-up succeeded).
    adopt: fn(&Programmed),
    /// On the new platform: undo what this backend left in the virtual hardware that came
    /// with the snapshot.
    release: fn(),
    /// Whether the backend takes the kernel's CR3 over from where a suspend parked it
    /// (`crate::pvm::park`: `pvm` syncs its shadow from it); for the others `resume` gives
    /// the kernel its own CR3 back before it runs.
    takes_parked_cr3: bool,
}

static HOOKS: [Hooks; 4] = [
    Hooks {
        backend: &backend::HV,
        encoding: &backend::HV,
        suspend: hv_suspend,
        programmed: crate::hv::programmed,
        adopt: crate::hv::adopt,
        release: || {},
        takes_parked_cr3: false,
    },
    Hooks {
        backend: &backend::XEN_HVM,
        encoding: &backend::XEN_HVM,
        suspend: crate::xen_hvm::suspend,
        programmed: crate::xen_hvm::programmed,
        adopt: crate::xen_hvm::adopt,
        release: || {},
        takes_parked_cr3: false,
    },
    Hooks {
        backend: &backend::PVM,
        encoding: &backend::HV,
        suspend: crate::pvm::suspend,
        programmed: crate::hv::programmed,
        adopt: crate::pvm::adopt,
        release: || {},
        takes_parked_cr3: true,
    },
    Hooks {
        backend: &backend::NATIVE_WATCH,
        encoding: &backend::NATIVE_WATCH,
        suspend: || suspend::CANCELLED,
        programmed: native_programmed,
        adopt: native_adopt,
        release: native_release,
        takes_parked_cr3: false,
    },
];

/// `hv`'s suspend, off the kernel's root if that is at an odd page (`crate::pvm::park`): a
/// restore with KVM-PVM's native mode on would run the kernel natively on its own tables
/// (no U bits) before the runtime could shadow them. Back on it when not resumed elsewhere.
fn hv_suspend() -> i64 {
    crate::pvm::park(hw::Hardware.read_cr(3));
    let r = crate::hv::suspend();
    if r != suspend::RESUMED {
        crate::pvm::unpark();
    }
    r
}

fn hooks(b: &Backend) -> Option<&'static Hooks> {
    HOOKS.iter().find(|h| h.backend.id == b.id)
}

/// The row of the backend every platform has.
fn watch() -> &'static Hooks {
    hooks(&backend::NATIVE_WATCH).expect("native-watch has a row")
}

/// TSC ticks per millisecond measured at boot, or reported by the in-tree hypervisor at the
/// last resume (the backends' clocks; without a report the same host is assumed).
static TSC_PER_MS: AtomicU64 = AtomicU64::new(0);

/// Boot: remember the TSC rate for set-ups after a migration.
pub(super) fn boot(tsc_per_ms: u64) {
    TSC_PER_MS.store(tsc_per_ms, Ordering::Relaxed);
}

/// The active backend's platform asks for a suspend, and nothing runs inside a site or a
/// handler (a dispatcher calls this after the site's work, with interrupts off). Suspends;
/// after a restore re-patches for where the guest now runs. True when the backend changed
/// (the caller's machine is no longer in charge).
pub(crate) fn safe_point() -> bool {
    // SAFETY: single vCPU, interrupts off, no CPU inside a site.
    let state = unsafe { STATE.get() };
    let from = state.active;
    let Some(h) = hooks(from) else { return false };
    // Into the shared encoding while a backend with a faster mode still runs in it.
    let t0 = hw::rdtsc();
    // SAFETY: as above.
    let before = (h.encoding.id != from.id).then(|| unsafe { apply(state, h.encoding, true) }).flatten();
    let before = before.map(|s| (s, hw::rdtsc() - t0));
    if (h.suspend)() != suspend::RESUMED {
        if before.is_some() {
            // SAFETY: as above; the backend is back in its mode (its suspend hook's job).
            unsafe { apply(state, from, true) };
        }
        return false;
    }
    resume(h, before) != from.id
}

/// The address routed sites of the migratable backends call, bound to `stub` (the active
/// backend's own stub).
pub(super) fn entry(stub: u64) -> u64 {
    // SAFETY: single vCPU, interrupts off, no CPU inside a site (boot or a safe point): the
    // entry's one load sees either value whole.
    unsafe { previrt_entry_target = stub };
    sym_addr!("previrt_entry")
}

/// Where [`entry`] jumps.
#[no_mangle]
static mut previrt_entry_target: u64 = 0;

// One indirect jump: [rsp] stays the site's return address, which the stubs look sites up by.
core::arch::global_asm!(
    ".section .text.previrt_entry, \"ax\", @progbits\n",
    ".globl previrt_entry\n",
    "previrt_entry:\n",
    "    jmpq *previrt_entry_target(%rip)\n",
    ".text\n",
    options(att_syntax, raw)
);

/// The backend whose own encoding waits until it runs in its faster mode (set by `resume`).
static PENDING: Global<Option<&'static Backend>> = Global(UnsafeCell::new(None));

/// Called by a backend with a faster mode once it runs in it again after a resume (`pvm`,
/// right after re-entering KVM-PVM's native mode): its own site encoding, at native speed.
pub(crate) fn finish() {
    // SAFETY: single vCPU, called from the backend's dispatcher with no CPU inside a site.
    let Some(to) = (unsafe { PENDING.get() }).take() else { return };
    // SAFETY: as above.
    let state = unsafe { STATE.get() };
    let t0 = hw::rdtsc();
    // SAFETY: as above; the site table and text are mapped as at boot.
    let stats = unsafe { apply(state, to, true) };
    let cycles = hw::rdtsc() - t0;
    let Some(pv) = PARAVIRTUAL.iter().find(|p| p.backend.id == to.id) else { return };
    let mut out = PvConsole(pv.console);
    let _ = write!(out, "previrt: resumed on {}: backend={} in its own mode:", state.platform.name(), to.name);
    counts(&mut out, stats, cycles);
    let _ = writeln!(out);
}

/// ` sites=N rewritten=R unchanged=U init-left=I re-patched in T us`.
fn counts(out: &mut dyn Write, stats: Option<Stats>, cycles: u64) {
    let s = stats.unwrap_or_default();
    let _ = write!(
        out,
        " sites={} rewritten={} unchanged={} init-left={} re-patched in {} us",
        s.sites,
        s.rewritten,
        s.unchanged,
        s.init_left,
        micros(cycles)
    );
}

fn micros(cycles: u64) -> u64 {
    cycles * 1000 / TSC_PER_MS.load(Ordering::Relaxed).max(1)
}

/// Re-detect, choose, set up, hand over, re-patch; returns the new backend's id. `before`:
/// what the suspend's re-patch into the shared encoding did, and its TSC cycles.
fn resume(from: &Hooks, before: Option<(Stats, u64)>) -> u32 {
    let t0 = hw::rdtsc();
    let programmed = (from.programmed)();
    (from.release)();
    // SAFETY: as `safe_point`.
    let state = unsafe { STATE.get() };
    state.platform = platform::detect(|leaf| hw::cpuid(leaf, 0));
    if let Some(khz) = super::hv_tsc_khz(state.platform) {
        TSC_PER_MS.store(khz, Ordering::Relaxed);
    }
    let per_ms = TSC_PER_MS.load(Ordering::Relaxed);
    let want = super::auto_choice(state.platform);
    // The platform's paravirtual backend if it sets up and can migrate; else native-watch.
    let pv = PARAVIRTUAL.iter().find(|p| p.backend.id == want && hooks(p.backend).is_some());
    let why = match pv {
        Some(p) => (p.init)(per_ms).err(),
        None => None,
    };
    let pv = pv.filter(|_| why.is_none());
    let to = pv.and_then(|p| hooks(p.backend)).unwrap_or_else(watch);
    let parked = crate::pvm::parked();
    if !to.takes_parked_cr3 {
        crate::pvm::unpark();
    }
    (to.adopt)(&programmed);
    state.stub = entry(pv.map_or_else(|| sym_addr!("previrt_lazy_entry"), |p| (p.stub)()));
    let restored = state.lazy_from.map(|_| RESTORED.load(Ordering::Relaxed));
    let t1 = hw::rdtsc();
    let stats = match pv {
        None => go_lazy(state),
        // SAFETY: as `safe_point`; the site table and text are mapped as at boot.
        Some(_) => unsafe { apply(state, to.encoding, true) },
    };
    let t2 = hw::rdtsc();
    // SAFETY: as `safe_point`.
    unsafe { *PENDING.get() = (to.encoding.id != to.backend.id).then_some(to.backend) };
    let mut pv_out = pv.map(|p| PvConsole(p.console));
    let out: &mut dyn Write = match &mut pv_out {
        Some(c) => c,
        None => &mut Com1,
    };
    let _ = write!(out, "previrt: resumed on {}: backend={}", state.platform.name(), to.backend.name);
    if to.backend.id == backend::HV.id {
        let _ = write!(out, " abi=v{}", crate::hv::version());
    }
    if let Some(why) = why {
        let _ = write!(out, " ({why})");
    }
    counts(out, stats, t2 - t1);
    if pv.is_none() {
        let _ = write!(out, " (lazy: routed sites restore at their first call)");
    }
    if let Some(n) = restored {
        let _ = write!(out, " (lazily restored since the last move: {n})");
    }
    if let Some(cr3) = parked {
        let _ = write!(out, " (suspended on a copy of the kernel's root {cr3:#x}, which is at an odd page)");
    }
    let _ = write!(out, ", resumed in {} us", micros(t2 - t0));
    if let Some((s, c)) = before {
        let _ = write!(out, " (before the suspend: rewritten={} in {} us)", s.rewritten, micros(c));
    }
    let _ = writeln!(out);
    to.backend.id
}

/// Native-watch's record of what it programmed into the real devices (an 8259 cannot be read
/// back, except its mask).
static NATIVE: Global<Programmed> =
    Global(UnsafeCell::new(Programmed { pic: [Pic::new(), Pic::new()], pit: Pit::new() }));

const PIC_PORTS: [u16; 2] = [0x20, 0xa0];
/// ICW3: the slave hangs on the master's IRQ2 / has cascade identity 2.
const PIC_ICW3: [u8; 2] = [0x04, 0x02];

/// The kernel's configuration into the real PIC pair and PIT (trap-and-emulate from here).
fn native_adopt(p: &Programmed) {
    // SAFETY: single vCPU at the safe point.
    unsafe { *NATIVE.get() = *p };
    for ((pic, port), icw3) in p.pic.iter().zip(PIC_PORTS).zip(PIC_ICW3) {
        // ICW1 (edge, cascade, ICW4 follows), ICW2 vector base, ICW3, ICW4 (8086 mode), mask.
        for (reg, v) in [(0, 0x11), (1, pic.base), (1, icw3), (1, 0x01), (1, pic.mask)] {
            hw::outb(port + reg, v);
        }
    }
    if p.pit.divisor != 0 {
        // Channel 0, lo/hi byte, mode 2 (rate generator): a tick per divisor.
        hw::outb(0x43, 0x34);
        hw::outb(0x40, p.pit.divisor as u8);
        hw::outb(0x40, (p.pit.divisor >> 8) as u8);
    }
}

/// What native-watch programmed, with the masks the kernel may have changed since (OCW1 reads
/// back from the data port).
fn native_programmed() -> Programmed {
    // SAFETY: single vCPU at the safe point.
    let mut p = unsafe { *NATIVE.get() };
    for (pic, port) in p.pic.iter_mut().zip(PIC_PORTS) {
        pic.mask = hw::inb(port + 1);
    }
    p
}

/// The real devices stop interrupting: both PICs masked, the PIT's channel 0 turned into a
/// one-shot (the next backend keeps time its own way).
fn native_release() {
    for port in PIC_PORTS {
        hw::outb(port + 1, 0xff);
    }
    hw::outb(0x43, 0x30);
    hw::outb(0x40, 0xff);
    hw::outb(0x40, 0xff);
}

/// Sites restored by [`previrt_lazy_dispatch`] since the last lazy move, and for the first
/// [`LOGGED`] of them what each held before (the encoding of before that move): the move back
/// writes those bytes again ([`undo`]) — no record read, nothing encoded or compared, which
/// on an instruction-emulated host is most of a re-patch's cost.
static RESTORED: AtomicU64 = AtomicU64::new(0);
const LOGGED: usize = 256;
#[derive(Clone, Copy)]
struct Undo {
    site: u64,
    len: u8,
    bytes: [u8; MAX_SITE_LEN],
}
static UNDO: Global<[Undo; LOGGED]> =
    Global(UnsafeCell::new([Undo { site: 0, len: 0, bytes: [0; MAX_SITE_LEN] }; LOGGED]));

/// The move back to the encoding of before the lazy move: the restored sites get their bytes
/// back; every other site still holds them. None when more sites were restored than the log
/// holds (then every site must be compared).
///
/// # Safety
/// Code writable (inside `writing_code`), no CPU inside a site, the lazy dispatcher not running.
pub(super) unsafe fn undo(p: &patch::Patcher) -> Option<Stats> {
    let n = RESTORED.load(Ordering::Relaxed) as usize;
    if n > LOGGED {
        return None;
    }
    for u in &UNDO.get()[..n] {
        core::ptr::copy_nonoverlapping(u.bytes.as_ptr(), u.site as *mut u8, u.len as usize);
    }
    Some(Stats {
        sites: p.sites,
        rewritten: n,
        unchanged: p.sites - n - p.init,
        init_left: p.init,
        ..Default::default()
    })
}

/// The lazy move to native-watch: no site visited, the shared entry already points at
/// `previrt_lazy_entry` (set by `resume`). The sites keep the encoding they hold (or, after an
/// earlier lazy move, its mix with restored instructions), which the next eager pass must not
/// assume is a stub call everywhere (`State::lazy_from`).
fn go_lazy(state: &mut State) -> Option<Stats> {
    let sites = state.patcher.as_ref()?.sites;
    // A second lazy move before the move back keeps the log: its sites still differ.
    if state.lazy_from.is_none() {
        RESTORED.store(0, Ordering::Relaxed);
    }
    state.lazy_from.get_or_insert(state.active);
    state.active = &backend::NATIVE_WATCH;
    Some(Stats { sites, unchanged: sites, ..Default::default() })
}

/// Native-watch's sites after a lazy move, all calls through the shared entry: a site
/// native-watch routes (`hlt`) is served by [`halt_and_look`]; any other site gets the bytes
/// an eager re-patch would have written (its instruction, `sti` last) and the stub returns to
/// its start, so the instruction runs in place with the registers and flags the site was
/// called with. Interrupts stay off from the stub's entry to its `popfq`, as for every stub.
#[no_mangle]
extern "C" fn previrt_lazy_dispatch(regs: &mut Regs) {
    let entry = (regs.cs, regs.ss, regs.gpr[gpr::RSP]);
    // SAFETY: single vCPU with interrupts off; the state is written only at safe points.
    let state = unsafe { STATE.get() };
    let at = regs.rip.wrapping_sub(CALL_LEN as u64);
    let found = state.patcher.as_ref().and_then(|p| super::linux::find_site(p, at).map(|(i, alias)| (p, i, alias)));
    let Some((p, i, alias)) = found else {
        let _ = writeln!(Com1, "previrt: call into the runtime from {at:#x}, which is no site");
        super::stop()
    };
    // SAFETY: index entries name records and save slots of the loaded table.
    let site = unsafe { p.site(&p.index[i]) };
    if (backend::NATIVE_WATCH.route)(&site.record) == Route::Stub {
        halt_and_look(regs);
    } else {
        let mut bytes = [0u8; MAX_SITE_LEN];
        // SAFETY: as above.
        let saved = unsafe { core::slice::from_raw_parts(site.at.save as *const u8, site.record.insn_len as usize) };
        patch::encode(&site, saved, Route::Original, 0, &mut bytes);
        let len = site.record.site_len as usize;
        let n = RESTORED.fetch_add(1, Ordering::Relaxed) as usize;
        if n < LOGGED {
            // SAFETY: single vCPU with interrupts off; the site is mapped (it called us).
            let u = unsafe { &mut UNDO.get()[n] };
            (u.site, u.len) = (site.at.site, len as u8);
            unsafe { core::ptr::copy_nonoverlapping(site.at.site as *const u8, u.bytes.as_mut_ptr(), len) };
        }
        // SAFETY: no CPU inside the site (this one is in the stub); serialized before the
        // return re-fetches it.
        unsafe { super::writing_code(|| core::ptr::copy_nonoverlapping(bytes.as_ptr(), site.at.site as *mut u8, len)) };
        regs.rip = site.at.site - alias;
        regs.iret_rsp = regs.gpr[gpr::RSP];
    }
    super::keep_segments(regs, entry);
}

/// Native-watch's `hlt`: halt as the hardware would, then one CPUID look at the platform;
/// another one than at the last resume means the VM was moved.
fn halt_and_look(regs: &mut Regs) {
    let Some((op, ool)) = super::enter_site(regs) else { return };
    if !op.is_some_and(|op| emulate::emulate(&op, regs, &mut hw::Hardware)) {
        regs.rip = ool;
    }
    // SAFETY: read-only; written at boot and by `resume`, on this vCPU.
    let known = unsafe { STATE.get() }.platform;
    if platform::detect(|leaf| hw::cpuid(leaf, 0)) != known {
        resume(watch(), None);
    }
    regs.iret_rsp = regs.gpr[gpr::RSP];
}

// Native-watch's stub: the trace stub's text with the lazy dispatcher.
core::arch::global_asm!(
    concat!(
        ".section .text.previrt_lazy, \"ax\", @progbits\n",
        ".globl previrt_lazy_entry\n",
        "previrt_lazy_entry:\n",
        super::site_stub!("    cli\n", "previrt_lazy_dispatch", super::keep_segments_exit!()),
        ".text\n"
    ),
    options(att_syntax, raw)
);
