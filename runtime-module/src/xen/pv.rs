//! The Xen PV backend proper: start of day, the site dispatcher, the event upcall, the #PF
//! hook and the Xen [`Machine`] (docs/xen-pv.md).

use super::{abi, console, devices, gdt, mmu};

use crate::backend;
use crate::emulate::{self, gpr, rflags, DescTable, Handler, Machine, Op, Regs};
use crate::guest::{self, hw, link_value, Global};
use crate::platform::{self, Platform};
use abi::{Hypercall, VcpuInfo};
use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering::Relaxed, Ordering::SeqCst};
use devices::{Dev, Msr, Pic, Pit, Uart};
use mmu::{Mmu, MmuError};
use previrt_site_abi::{flags, reg, Kind};

/// vcpu_info of vCPU 0 (in the shared_info page); the stub reads it by this name.
#[no_mangle]
static mut previrt_xen_vcpu: u64 = 0;
/// The kernel's handlers for exceptions 0..31, from its IDT (the trap trampolines jump here).
#[no_mangle]
static mut previrt_xen_vectors: [u64; 32] = [0; 32];
/// The kernel handler the upcall is about to run.
#[no_mangle]
static mut previrt_xen_deliver: u64 = 0;

/// Everything the backend knows; single vCPU, touched with events masked.
pub struct Xen {
    flags: u32,
    /// A non-initial domain's console ring and its event channel (dom0 uses `console_io`).
    ring: Option<(console::Ring, u32)>,
    mmu: Mmu,
    uart: Uart,
    pic: [Pic; 2],
    pit: Pit,
    timer_port: u32,
    next_tick: u64,
    gdt: Option<DescTable>,
    idt: Option<DescTable>,
    /// The selectors the kernel last wrote to es, cs, ss, ds, fs, gs (hardware order).
    segs: [u16; 8],
    kernel_gs_base: u64,
    cr0: u64,
    cr4: u64,
}

static XEN: Global<Xen> = Global(UnsafeCell::new(Xen {
    flags: 0,
    ring: None,
    mmu: Mmu::new(),
    uart: Uart::new(),
    pic: [Pic::new(), Pic::new()],
    pit: Pit::new(),
    timer_port: u32::MAX,
    next_tick: 0,
    gdt: None,
    idt: None,
    segs: [0; 8],
    kernel_gs_base: 0,
    // PE, MP, ET, NE, WP, AM, PG and PAE: what a long-mode kernel expects to read.
    cr0: 0x8005_0033,
    cr4: 0x20,
}));

/// The `boot_info` handed to the kernel's 64-bit entry (examples/kernel/README.md).
#[repr(C)]
struct BootInfo {
    magic: u32,
    version: u32,
    cmdline: u64,
    source: u32,
    reserved: u32,
}
const BOOT_INFO_MAGIC: u32 = 0x4942_4b58;
static BOOT: Global<(BootInfo, [u8; abi::start_info::CMD_LINE_LEN + 1])> =
    Global(UnsafeCell::new((BootInfo { magic: 0, version: 0, cmdline: 0, source: 0, reserved: 0 }, [0; 1025])));

fn vcpu() -> &'static mut VcpuInfo {
    // SAFETY: set at boot to vCPU 0's vcpu_info in the mapped shared_info page.
    unsafe { &mut *(previrt_xen_vcpu as *mut VcpuInfo) }
}

/// The runtime's own messages: through the UART model's line buffer, so a formatted line is
/// one `console_io` like the kernel's.
struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // SAFETY: single vCPU; runtime messages are written with events masked.
        let x = unsafe { XEN.get() };
        for &b in s.as_bytes() {
            if x.uart.push(b) {
                flush_uart(x);
            }
        }
        Ok(())
    }
}

/// Console output as Xen allows it: `console_io` for the initial domain, the console ring
/// otherwise. Failures are ignored: there is no other place to report them.
fn console_write(ring: Option<&mut (console::Ring, u32)>, mut b: &[u8]) {
    let Some((ring, port)) = ring else {
        // SAFETY: a buffer of b.len() readable bytes.
        unsafe { abi::call(Hypercall::ConsoleIo, [abi::CONSOLEIO_WRITE, b.len() as u64, b.as_ptr() as u64, 0, 0]) };
        return;
    };
    while !b.is_empty() {
        let n = ring.write(b);
        b = &b[n..];
        // SAFETY: evtchn_send is one port number.
        unsafe { abi::call(Hypercall::EventChannelOp, [abi::EVTCHNOP_SEND, port as *const u32 as u64, 0, 0, 0]) };
        if n == 0 {
            // Full: let the back end (in another domain) drain it.
            sched_op(abi::SCHEDOP_YIELD, 0);
        }
    }
}

/// The `sched_op` commands the runtime issues, by name: the exit summary counts them.
const SCHED_OPS: [(u64, &str); 3] =
    [(abi::SCHEDOP_YIELD, "yield"), (abi::SCHEDOP_BLOCK, "block"), (abi::SCHEDOP_SHUTDOWN, "shutdown")];
static SCHED_COUNTS: [AtomicU32; SCHED_OPS.len()] = [const { AtomicU32::new(0) }; SCHED_OPS.len()];

/// `sched_op(cmd, arg)` (arg: a pointer to the command's structure, or 0).
fn sched_op(cmd: u64, arg: u64) -> i64 {
    if let Some(i) = SCHED_OPS.iter().position(|(c, _)| *c == cmd) {
        SCHED_COUNTS[i].fetch_add(1, Relaxed);
    }
    // SAFETY: callers pass the structure `cmd` takes (yield and block take none).
    unsafe { abi::call(Hypercall::SchedOp, [cmd, arg, 0, 0, 0]) }
}

fn shutdown(reason: u32) -> ! {
    loop {
        sched_op(abi::SCHEDOP_SHUTDOWN, &reason as *const u32 as u64);
    }
}

/// The kinds with a lean entry (entry.rs), in the order of `previrt_xen_lean_counts`.
const LEAN: [Kind; 6] = [Kind::Cli, Kind::Sti, Kind::Pushf, Kind::Popf, Kind::In, Kind::Out];
/// Sites run by each lean entry (the trace counters see only those through the stub). The
/// interrupt-flag entries bump them without masking events, so an upcall that runs lean
/// entries in between can cost a count: a diagnostic, not an exact figure.
#[no_mangle]
static mut previrt_xen_lean_counts: [u64; LEAN.len()] = [0; LEAN.len()];

/// The lean entry for a site of the `xen` backend, if it has one (guest::apply): interrupt-flag
/// kinds at their 64-bit operand size whose site ends where execution resumes (the entry
/// returns to the call's end and the NOP fill runs on).
///
/// Port I/O sites qualify in their byte-through-%dx form (the lean entry reads the port from
/// %dx and the data from %al).
pub(crate) fn lean(site: &crate::patch::Site) -> Option<u64> {
    let r = &site.record;
    // In LEAN's order.
    let entry = [
        addr_of_sym!("previrt_xen_cli"),
        addr_of_sym!("previrt_xen_sti"),
        addr_of_sym!("previrt_xen_pushf"),
        addr_of_sym!("previrt_xen_popf"),
        addr_of_sym!("previrt_xen_inb_dx"),
        addr_of_sym!("previrt_xen_outb_dx"),
    ];
    let i = LEAN.iter().position(|k| *k as u16 == r.kind)?;
    let falls_through = site.next() == site.at.site + r.site_len as u64;
    let form = match LEAN[i] {
        Kind::In | Kind::Out => r.width == 1 && !r.has(flags::IMM_PORT | flags::REP | flags::CODE32 | flags::CODE16),
        _ => !r.has(flags::WIDE),
    };
    (falls_through && form).then_some(entry[i])
}

/// The lean port entries' Rust half: a byte `in` (`out` = 0) or `out` (1) of `value` at `port`
/// on the device models, with events masked for the access and then restored as they were;
/// returns the byte for %al (read, or `value` unchanged). Unmasking with events pending
/// delivers them with a `xen_version` hypercall (Xen delivers pending events on its way back,
/// as Linux's xen_force_evtchn_callback does), at this point of the lean entry, as an
/// interrupt that arrives right after the instruction.
#[no_mangle]
extern "C" fn previrt_xen_port_lean(port: u64, value: u64, out: u64) -> u64 {
    let v = vcpu();
    // SAFETY: vcpu_info's mask byte, shared with Xen; swapped so no upcall runs in between.
    let was_masked = unsafe { core::sync::atomic::AtomicU8::from_ptr(&raw mut v.upcall_mask).swap(1, SeqCst) };
    // SAFETY: events are masked: nothing else touches the machine until they are unmasked.
    let x = unsafe { XEN.get() };
    // SAFETY: the counters are only written with events masked.
    unsafe { previrt_xen_lean_counts[4 + out as usize] += 1 };
    let read = if out == 0 {
        x.port_in(port as u16, 1) as u64
    } else {
        x.port_out(port as u16, 1, value as u32);
        value
    };
    if was_masked == 0 {
        // SAFETY (volatile accesses): shared with Xen.
        unsafe {
            core::ptr::addr_of_mut!(v.upcall_mask).write_volatile(0);
            core::sync::atomic::fence(SeqCst);
            if core::ptr::addr_of!(v.upcall_pending).read_volatile() != 0 {
                abi::call(Hypercall::XenVersion, [0, 0, 0, 0, 0]);
            }
        }
    }
    read
}

/// Set while `Xen::halt` blocks: an upcall then only masks events again (entry.rs).
#[no_mangle]
static mut previrt_xen_blocking: u8 = 0;

/// Print why the kernel cannot go on under Xen and crash the domain.
fn fatal(what: fmt::Arguments) -> ! {
    // SAFETY: single vCPU; flushing whatever the kernel had written so far.
    let x = unsafe { XEN.get() };
    flush_uart(x);
    let _ = writeln!(Console, "previrt-xen: FATAL: {what}");
    shutdown(abi::SHUTDOWN_CRASH)
}

const ERRNO: &[(i64, &str)] =
    &[(-1, "EPERM"), (-3, "ESRCH"), (-12, "ENOMEM"), (-14, "EFAULT"), (-16, "EBUSY"), (-22, "EINVAL"), (-38, "ENOSYS")];

/// A hypercall whose failure the kernel cannot survive.
fn must(h: Hypercall, a: [u64; 5]) -> i64 {
    // SAFETY: callers pass arguments laid out for `h`.
    let rc = unsafe { abi::call(h, a) };
    if rc < 0 {
        hypercall_failed(h, a, rc);
    }
    rc
}

/// "hypercall NAME(ARGS) failed: RC (ERRNO)", for fatal messages.
struct Failed(Hypercall, [u64; 5], i64);

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let Failed(h, a, rc) = *self;
        let name = ERRNO.iter().find(|(n, _)| *n == rc).map_or("?", |(_, s)| *s);
        write!(
            f,
            "hypercall {}({:#x}, {:#x}, {:#x}, {:#x}, {:#x}) failed: {rc} ({name})",
            h.name(),
            a[0],
            a[1],
            a[2],
            a[3],
            a[4]
        )
    }
}

fn hypercall_failed(h: Hypercall, a: [u64; 5], rc: i64) -> ! {
    fatal(format_args!("{}", Failed(h, a, rc)))
}

fn mmu_ok<T>(r: Result<T, MmuError>) -> T {
    r.unwrap_or_else(|e| match e {
        MmuError::Hypercall(h, a, rc) => hypercall_failed(h, a, rc),
        MmuError::PoolFull => fatal(format_args!("shadow page-table pool exhausted ({} pages)", mmu::POOL_PAGES)),
        MmuError::Huge { va } => {
            fatal(format_args!("the kernel maps {va:#x} with a large page, not supported by the shadow tables"))
        }
        MmuError::NotRam { va, pfn } => fatal(format_args!(
            "the kernel maps {va:#x} to frame {pfn:#x}, which is neither its RAM nor a modelled device"
        )),
        MmuError::Frame { entry, pfn } => fatal(format_args!(
            "the page-table entry at {entry:#x} names frame {pfn:#x}, which is neither the kernel's RAM nor a modelled device"
        )),
        MmuError::Level { pfn, level, was } => {
            fatal(format_args!("frame {pfn:#x} is used as a level-{level} table and as a level-{was} table"))
        }
        MmuError::Tables => fatal(format_args!(
            "more than {} page-table pages or {} address spaces for direct page tables",
            mmu::MAX_TABLES,
            mmu::MAX_ROOTS
        )),
    })
}

fn flush_uart(x: &mut Xen) {
    console_write(x.ring.as_mut(), &x.uart.buf[..x.uart.len]);
    x.uart.len = 0;
}

fn rdtsc() -> u64 {
    // SAFETY: no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Xen system time (ns since boot) from vcpu_time_info and the TSC.
fn now_ns() -> u64 {
    vcpu().time.system_time(rdtsc)
}

/// CPUID as Xen presents it to PV guests (the forced-emulation prefix `ud2; "xen"; cpuid`).
fn xen_cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u64, u32, u32);
    // SAFETY: Xen emulates the prefixed cpuid; rbx is saved around it.
    unsafe {
        core::arch::asm!(
            "mov {t}, rbx",
            ".byte 0x0f, 0x0b, 0x78, 0x65, 0x6e",
            "cpuid",
            "xchg {t}, rbx",
            t = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") sub => c,
            out("edx") d,
        )
    };
    [a, b as u32, c, d]
}

/// CPUID leaf 1 EDX: the APIC bit, set because the runtime models the LAPIC registers.
const CPUID_1_EDX_APIC: u32 = 1 << 9;

/// Entered from `previrt_xen_entry` with start_info; returns the boot_info for the kernel.
#[no_mangle]
extern "C" fn previrt_xen_boot(si: u64) -> u64 {
    use abi::start_info as S;
    // SAFETY: Xen maps start_info and everything it names (identity layout, VIRT_BASE 0).
    let field = |off: usize| unsafe { ((si + off as u64) as *const u64).read_unaligned() };
    // SAFETY: boot is single-threaded with events masked.
    let x = unsafe { XEN.get() };
    x.flags = field(S::FLAGS) as u32;
    let shared_va = addr_of_sym!("previrt_xen_shared_info");
    let pte = field(S::SHARED_INFO) | mmu::PRESENT | mmu::WRITABLE | mmu::ACCESSED | mmu::DIRTY;
    must(Hypercall::UpdateVaMapping, [shared_va, pte, abi::UVMF_INVLPG, 0, 0]);
    // SAFETY: the page is mapped now; vCPU 0's vcpu_info is at its start.
    unsafe { previrt_xen_vcpu = shared_va };

    let m = &mut x.mmu;
    m.nr_pages = field(S::NR_PAGES);
    m.p2m = field(S::MFN_LIST);
    m.p2m_range = (m.p2m & !0xfff, (m.p2m + m.nr_pages * 8 + 0xfff) & !0xfff);
    m.runtime = (link_value!("__previrt_runtime_start"), link_value!("__previrt_runtime_end"));
    m.shared[0] = (shared_va, field(S::SHARED_INFO) & !0xfff);
    if x.flags & abi::SIF_INITDOMAIN == 0 {
        // Not dom0: no console_io; the console is the ring Xen's builder set up.
        let va = addr_of_sym!("previrt_xen_console");
        let maddr = field(S::CONSOLE_MFN) << 12;
        must(
            Hypercall::UpdateVaMapping,
            [va, maddr | mmu::PRESENT | mmu::WRITABLE | mmu::ACCESSED | mmu::DIRTY, abi::UVMF_INVLPG, 0, 0],
        );
        m.shared[1] = (va, maddr);
        // SAFETY: the ring's page is mapped at `va` from now on, in every shadow too.
        x.ring = Some((unsafe { console::Ring::new(va as *mut u8) }, field(S::CONSOLE_EVTCHN) as u32));
    }
    m.lapic_page = addr_of_sym!("previrt_xen_lapic");
    mmu_ok(m.protect_pool());

    if x.flags & abi::SIF_INITDOMAIN != 0 {
        // Port I/O (isa-debug-exit) from the kernel ring: virtual IOPL 1.
        let iopl = 1u32;
        must(Hypercall::PhysdevOp, [abi::PHYSDEVOP_SET_IOPL, &iopl as *const u32 as u64, 0, 0, 0]);
    }
    for (kind, entry) in [
        (abi::CALLBACKTYPE_EVENT, addr_of_sym!("previrt_xen_upcall")),
        (abi::CALLBACKTYPE_FAILSAFE, addr_of_sym!("previrt_xen_failsafe")),
    ] {
        let cb = abi::CallbackRegister { kind, flags: abi::CALLBACKF_MASK_EVENTS, address: entry };
        must(Hypercall::CallbackOp, [abi::CALLBACKOP_REGISTER, &cb as *const _ as u64, 0, 0, 0]);
    }
    // The tick comes from set_timer_op only (the PIT model's period), not Xen's default.
    must(Hypercall::VcpuOp, [abi::VCPUOP_STOP_PERIODIC_TIMER, 0, 0, 0, 0]);
    let mut bind = abi::BindVirq { virq: abi::VIRQ_TIMER, vcpu: 0, port: 0 };
    must(Hypercall::EventChannelOp, [abi::EVTCHNOP_BIND_VIRQ, &mut bind as *mut _ as u64, 0, 0, 0]);
    x.timer_port = bind.port;
    must(Hypercall::EventChannelOp, [abi::EVTCHNOP_UNMASK, &bind.port as *const u32 as u64, 0, 0, 0]);

    let lapic = addr_of_sym!("previrt_xen_lapic") as *mut [u32; 1024];
    // SAFETY: the LAPIC model page is the runtime's, mapped writable.
    let lapic = unsafe { &mut *lapic };
    lapic[devices::LAPIC_ID] = xen_cpuid(1, 0)[1] >> 24 << 24;
    lapic[devices::LAPIC_VERSION] = devices::LAPIC_VERSION_VALUE;

    // SAFETY: single-threaded boot.
    let (info, cmdline) = unsafe { BOOT.get() };
    for (i, b) in cmdline[..S::CMD_LINE_LEN].iter_mut().enumerate() {
        // SAFETY: start_info.cmd_line is 1024 bytes.
        *b = unsafe { ((si + (S::CMD_LINE + i) as u64) as *const u8).read() };
    }
    let len = cmdline.iter().position(|&b| b == 0).unwrap_or(S::CMD_LINE_LEN);
    *info = BootInfo { magic: BOOT_INFO_MAGIC, version: 1, cmdline: cmdline.as_ptr() as u64, source: 0, reserved: 0 };
    if let Some(name) =
        platform::cmdline_value(&cmdline[..len], b"previrt.backend").filter(|n| *n != backend::XEN.name.as_bytes())
    {
        let name = core::str::from_utf8(name).unwrap_or("?");
        let _ = writeln!(Console, "previrt: backend '{name}' cannot run under Xen PV, using {}", backend::XEN.name);
    }

    let stub = addr_of_sym!("previrt_xen_stub");
    let t0 = rdtsc();
    // SAFETY: the kernel image is mapped writable by Xen's boot tables; nothing runs yet.
    let result = unsafe { guest::patch_at_boot(&backend::XEN, stub) };
    let t = &vcpu().time;
    let us = abi::tsc_to_ns(rdtsc() - t0, t.tsc_to_system_mul, t.tsc_shift) / 1000;
    match result {
        Ok(Some(stats)) => {
            let kept = if stats.kept_original == 0 { "" } else { " (some sites kept the original instruction)" };
            let _ = writeln!(
                Console,
                "previrt: backend={} sites={} patched in {us} us (platform={}){kept}",
                backend::XEN.name,
                stats.sites,
                Platform::XenPv.name()
            );
        }
        Ok(None) => {}
        Err(e) => fatal(format_args!("site table unusable: {e}")),
    }
    // The kernel's page-table writes are sites (an annotated build): its tables become Xen's,
    // written with mmu_update (xen/direct.rs); otherwise they are shadowed (xen/mmu.rs).
    x.mmu.direct = guest::has_site(Kind::PtWrite);
    if x.mmu.direct {
        x.mmu.boot_root = x.mmu.mfn(field(S::PT_BASE) >> 12).unwrap_or(0);
    }
    let _ = writeln!(Console, "previrt-xen: page tables: {}", PT_MODES[x.mmu.direct as usize]);
    if link_value!("__previrt_kernel_entry64") == 0 {
        fatal(format_args!("the kernel has no 64-bit entry (previrt link found no kernel_entry64)"));
    }
    info as *const BootInfo as u64
}

/// The boot log's page-table mode, by `Mmu::direct`.
const PT_MODES: [&str; 2] =
    ["shadowed (no pt_write sites)", "direct (pt_write sites -> mmu_update with pfn->mfn, pt_read mfn->pfn)"];

/// Kinds whose effect differs under Xen PV: segment selectors get the kernel's real privilege
/// (ring 3) on the way to the CPU; `sgdt`/`sidt` store the kernel's tables, not Xen's.
/// (Memory-access sites go through the shared handler and `Machine::memory`.)
const XEN_HANDLERS: &[(Kind, Handler)] =
    &[(Kind::MovSeg, mov_seg), (Kind::FarRet, far_ret), (Kind::Sgdt, store_table), (Kind::Sidt, store_table)];

/// The site stub's Rust half.
#[no_mangle]
extern "C" fn previrt_xen_dispatch(regs: &mut Regs) {
    let Some((op, _)) = guest::enter_site(regs) else {
        fatal(format_args!("call into the runtime from {:#x}, which is no site", regs.rip.wrapping_sub(5)))
    };
    let Some(op) = op else { fatal(format_args!("site before {:#x} has an unknown kind", regs.rip)) };
    // SAFETY: events are masked for the dispatch (single vCPU).
    let x = unsafe { XEN.get() };
    // The kernel runs at virtual CPL 0: popf/iret may change IF and IOPL as at ring 0.
    regs.cs &= !3;
    let h = XEN_HANDLERS.iter().find(|(k, _)| *k == op.kind).map(|(_, h)| *h).or_else(|| emulate::handler(op.kind));
    if !h.is_some_and(|h| h(&op, regs, x)) {
        fatal(format_args!("{} at {:#x} (this form) is not available under Xen PV", op.kind.name(), op.addr));
    }
    regs.cs = x.selector(regs.cs as u16) as u64;
    regs.ss = x.selector(regs.ss as u16) as u64;
    regs.iret_rsp = regs.gpr[gpr::RSP];
    exit_frame(&mut regs.cs, regs.rflags);
}

/// Prepare the return through an interrupt frame (`xen_iret` in entry.rs): the event mask
/// follows the frame's virtual IF; CS keeps RPL 3 for a plain `iretq`, or gets RPL 0 (kernel
/// mode to the `iret` hypercall, which unmasks atomically and delivers at the interrupted
/// instruction) when unmasking finds events pending.
fn exit_frame(cs: &mut u64, rflags_image: u64) {
    let v = vcpu();
    let on = rflags_image & rflags::IF != 0;
    *cs |= 3;
    // SAFETY (volatile accesses): shared with Xen.
    unsafe {
        core::ptr::addr_of_mut!(v.upcall_mask).write_volatile(!on as u8);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        if on && core::ptr::addr_of!(v.upcall_pending).read_volatile() != 0 {
            core::ptr::addr_of_mut!(v.upcall_mask).write_volatile(1);
            *cs &= !3;
            abi::COUNTS[Hypercall::Iret as usize].fetch_add(1, Relaxed);
        }
    }
}

/// An interrupt frame as Xen bounces it (after %rcx/%r11): rip, cs, rflags, rsp, ss.
/// Xen writes kernel-mode selectors with RPL 0; a hardware `iretq` needs RPL 3.
#[repr(C)]
pub struct Frame {
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// An exception frame with an error code (#PF).
#[repr(C)]
pub struct FaultFrame {
    error: u64,
    frame: Frame,
}

impl Frame {
    /// Prepare the frame for the return to the interrupted code.
    fn resume(&mut self) {
        self.ss |= 3;
        exit_frame(&mut self.cs, self.rflags);
    }
}

/// Event upcall: acknowledge pending events; a timer tick re-arms the timer and, when the
/// kernel's PIC leaves IRQ0 unmasked, returns the kernel's handler for IRQ0's vector.
#[no_mangle]
extern "C" fn previrt_xen_event(frame: &mut Frame) -> u64 {
    use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
    // SAFETY: events are masked in the upcall.
    let x = unsafe { XEN.get() };
    let v = vcpu();
    // SAFETY: shared_info is mapped; the 2-level bitmaps are u64 words Xen sets atomically.
    let (sel, shared) = unsafe {
        core::ptr::addr_of_mut!(v.upcall_pending).write_volatile(0);
        (AtomicU64::from_ptr(core::ptr::addr_of_mut!(v.pending_sel)).swap(0, SeqCst), previrt_xen_vcpu)
    };
    let mut tick = false;
    for w in (0..64).filter(|w| sel & (1 << w) != 0) {
        // SAFETY: word w of evtchn_pending / evtchn_mask.
        let (pending, mask) = unsafe {
            (
                AtomicU64::from_ptr((shared + (abi::EVTCHN_PENDING + w * 8) as u64) as *mut u64),
                ((shared + (abi::EVTCHN_MASK + w * 8) as u64) as *const u64).read_volatile(),
            )
        };
        let ports = pending.load(SeqCst) & !mask;
        pending.fetch_and(!ports, SeqCst);
        tick |= x.timer_port / 64 == w as u32 && ports & (1 << (x.timer_port % 64)) != 0;
    }
    let handler = if tick {
        x.arm_timer(false);
        Some(x.kernel_vector(x.pic[0].base)).filter(|&h| h != 0 && x.pic[0].mask & 1 == 0)
    } else {
        None
    };
    // The kernel's handler runs masked (interrupt gate) and returns through a routed iretq;
    // otherwise the upcall returns here with the interrupted context's mask.
    handler.unwrap_or_else(|| {
        frame.resume();
        0
    })
}

/// #PF: resync the faulting page; 1 if the shadow was behind the kernel's tables (retry, the
/// assembly drops the error code).
#[no_mangle]
extern "C" fn previrt_xen_page_fault(fault: &mut FaultFrame) -> u64 {
    // SAFETY: exceptions arrive with events masked (interrupt-gate semantics).
    let x = unsafe { XEN.get() };
    let va = vcpu().cr2;
    if mmu_ok(x.mmu.resync_page(va)) {
        fault.frame.resume();
        return 1;
    }
    0
}

#[no_mangle]
extern "C" fn previrt_xen_failsafe_report() -> ! {
    fatal(format_args!("Xen's failsafe callback: a segment register or iret frame was refused"))
}

impl Xen {
    /// The kernel's IDT handler for `vector` (0 when there is none).
    fn kernel_vector(&self, vector: u8) -> u64 {
        let Some(idt) = self.idt.filter(|t| (vector as u64 + 1) * 16 <= t.limit as u64 + 1) else { return 0 };
        let mut g = [0u8; 16];
        self.read_mem(idt.base + vector as u64 * 16, &mut g);
        if g[5] & 0x80 == 0 {
            return 0;
        }
        emulate::gate_handler(&g)
    }

    fn read_mem(&self, addr: u64, buf: &mut [u8]) {
        // SAFETY: the kernel's own memory, identity-mapped.
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) }
    }

    /// The selector the CPU loads for a kernel selector: the same descriptor (the runtime's
    /// GDT copy keeps every index, xen/gdt.rs) at the kernel's real privilege, ring 3. Xen's own
    /// selectors (0xe000 and up) name Xen's descriptors, present in every PV GDT.
    fn selector(&self, sel: u16) -> u16 {
        let index = sel as usize & !7;
        if index == 0 {
            return 0;
        }
        if index < gdt::MAX_ENTRIES * 8 && !self.gdt.is_some_and(|t| index + 7 <= t.limit as usize) {
            fatal(format_args!("selector {sel:#x} is outside the kernel's GDT"))
        }
        sel | 3
    }

    /// Program the next tick: at boot of the PIT period (`restart`) or one period after the
    /// previous deadline (never in the past).
    fn arm_timer(&mut self, restart: bool) {
        let period = self.pit.period_ns();
        if period == 0 {
            return;
        }
        let now = now_ns();
        let next = if restart { now + period } else { self.next_tick + period };
        self.next_tick = if next <= now { now + period } else { next };
        must(Hypercall::SetTimerOp, [self.next_tick, 0, 0, 0, 0]);
    }

    fn exit(&mut self, value: u32) -> ! {
        flush_uart(self);
        let mut out = Console;
        guest::site_summary(&mut out);
        let _ = write!(out, "previrt-xen: hypercalls");
        for (h, name) in abi::HYPERCALLS {
            let n = abi::COUNTS[*h as usize].load(Relaxed);
            if n != 0 {
                let _ = write!(out, " {name}={n}");
            }
        }
        let _ = writeln!(out);
        let _ = write!(out, "previrt-xen: lean");
        // SAFETY: aligned u64 counters (no torn reads); the kernel is exiting.
        let counts = unsafe { core::ptr::addr_of!(previrt_xen_lean_counts).read_volatile() };
        for (kind, n) in LEAN.iter().zip(counts) {
            let _ = write!(out, " {}={n}", kind.name());
        }
        let _ = writeln!(out);
        let _ = write!(out, "previrt-xen: sched_op");
        for ((_, name), n) in SCHED_OPS.iter().zip(&SCHED_COUNTS) {
            let _ = write!(out, " {name}={}", n.load(Relaxed));
        }
        let _ = writeln!(out);
        let st = self.mmu.stats;
        let _ = match self.mmu.direct {
            true => writeln!(
                out,
                "previrt-xen: page tables direct: pt_write mmu_update={} store={} pt_read translated={} tables adopted={}",
                st.pt_update, st.pt_store, st.pt_read_translated, st.adopted
            ),
            false => writeln!(
                out,
                "previrt-xen: page tables shadowed: resyncs cr3={} page={} written={}",
                st.resync_cr3, st.resync_page, st.written
            ),
        };
        if self.flags & abi::SIF_INITDOMAIN != 0 {
            // isa-debug-exit when running as dom0 under QEMU; Xen emulates the port write
            // (virtual IOPL 1).
            // SAFETY: a port write; without the device it does nothing.
            unsafe { core::arch::asm!("out dx, al", in("dx") 0xf4u16, in("al") value as u8, options(nomem, nostack)) };
        }
        shutdown(abi::SHUTDOWN_POWEROFF)
    }
}

fn mov_seg(op: &Op, regs: &mut Regs, _: &mut dyn Machine) -> bool {
    // SAFETY: dispatch runs with events masked (the selector table is the Xen machine's).
    let x = unsafe { XEN.get() };
    if op.flags & flags::MEM != 0 || reg::class(op.base) != reg::SEG || reg::class(op.reg) != reg::GPR {
        return false;
    }
    let seg = reg::number(op.base);
    if op.flags & flags::WRITE != 0 {
        let written = regs.read(op.reg, 2) as u16;
        let sel = x.selector(written);
        x.segs[seg as usize & 7] = written;
        // SAFETY: loading a selector of the runtime's GDT copy (or Xen's, or null) into a data
        // segment register.
        unsafe {
            match seg {
                0 => core::arch::asm!("mov es, {:x}", in(reg) sel),
                2 => regs.ss = sel as u64,
                3 => core::arch::asm!("mov ds, {:x}", in(reg) sel),
                4 => core::arch::asm!("mov fs, {:x}", in(reg) sel),
                5 => core::arch::asm!("mov gs, {:x}", in(reg) sel),
                _ => return false,
            }
        }
    } else {
        let v: u16;
        // SAFETY: reading a segment register.
        unsafe {
            match seg {
                0 => core::arch::asm!("mov {:x}, es", out(reg) v),
                1 => v = regs.cs as u16,
                2 => v = regs.ss as u16,
                3 => core::arch::asm!("mov {:x}, ds", out(reg) v),
                4 => core::arch::asm!("mov {:x}, fs", out(reg) v),
                _ => core::arch::asm!("mov {:x}, gs", out(reg) v),
            }
        }
        // The register holds what the kernel loaded with RPL 3 (see `selector`): it reads
        // back what the kernel wrote.
        let written = x.segs[seg as usize & 7];
        let v = if seg != 1 && v & !3 == written & !3 { written } else { v };
        regs.write(op.reg, op.width.max(2), v as u64);
    }
    true
}

/// `sgdt`/`sidt` (64-bit, to memory): the table the kernel loaded, as it loaded it — the CPU
/// holds Xen's (the runtime's GDT frames in Xen's per-vCPU area, Xen's IDT). Before the
/// kernel's first load, what the CPU holds.
fn store_table(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    if op.flags & (flags::CODE32 | flags::CODE16) != 0 || op.flags & flags::MEM == 0 {
        return false;
    }
    // SAFETY: dispatch runs with events masked.
    let x = unsafe { XEN.get() };
    let t = match op.kind {
        Kind::Sgdt => x.gdt.unwrap_or_else(hw::loaded_gdt),
        _ => x.idt.unwrap_or_else(hw::loaded_idt),
    };
    m.write(op.address(regs), &t.image());
    true
}

/// `lretq` (no immediate): pop RIP and CS; the selector is translated on the way out.
fn far_ret(op: &Op, regs: &mut Regs, m: &mut dyn Machine) -> bool {
    if op.width != 8 || op.insn_len > 2 {
        return false;
    }
    let mut b = [0u8; 16];
    m.read(regs.gpr[gpr::RSP], &mut b);
    regs.rip = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
    regs.cs = u64::from_le_bytes(b[8..].try_into().unwrap_or_default()) & 0xffff;
    regs.gpr[gpr::RSP] += 16;
    true
}

impl Machine for Xen {
    fn read(&mut self, addr: u64, buf: &mut [u8]) {
        self.read_mem(addr, buf)
    }
    fn write(&mut self, addr: u64, buf: &[u8]) {
        // SAFETY: the kernel's own memory, identity-mapped.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), addr as *mut u8, buf.len()) }
    }
    fn port_in(&mut self, port: u16, width: u8) -> u32 {
        let Some((dev, r)) = devices::device(port).filter(|_| width == 1) else {
            fatal(format_args!("in{} from port {port:#x} is not available under Xen PV", width * 8))
        };
        (match dev {
            Dev::Uart => self.uart.read(r),
            Dev::PicMaster => self.pic[0].read(r),
            Dev::PicSlave => self.pic[1].read(r),
            Dev::Pit => self.pit.read(r, now_ns()),
            Dev::DebugExit => 0,
        }) as u32
    }
    fn port_out(&mut self, port: u16, width: u8, value: u32) {
        let Some((dev, r)) = devices::device(port).filter(|_| width == 1) else {
            fatal(format_args!("out{} {value:#x} to port {port:#x} is not available under Xen PV", width * 8))
        };
        let v = value as u8;
        match dev {
            Dev::Uart => {
                if self.uart.write(r, v) {
                    flush_uart(self);
                }
            }
            Dev::PicMaster => self.pic[0].write(r, v),
            Dev::PicSlave => self.pic[1].write(r, v),
            Dev::Pit => {
                if self.pit.write(r, v, now_ns()).is_some() {
                    self.arm_timer(true);
                }
            }
            Dev::DebugExit => self.exit(value),
        }
    }
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let mut r = xen_cpuid(leaf, subleaf);
        if leaf == 1 {
            r[3] |= CPUID_1_EDX_APIC;
        }
        r
    }
    fn rdmsr(&mut self, msr: u32) -> u64 {
        match devices::msr(msr) {
            Some(Msr::ApicBase) => devices::APIC_BASE_VALUE,
            Some(Msr::KernelGsBase) => self.kernel_gs_base,
            None => fatal(format_args!("rdmsr {msr:#x} is not available under Xen PV")),
        }
    }
    fn wrmsr(&mut self, msr: u32, value: u64) {
        match devices::msr(msr) {
            Some(Msr::ApicBase) if value == devices::APIC_BASE_VALUE => {}
            Some(Msr::KernelGsBase) => {
                must(Hypercall::SetSegmentBase, [abi::SEGBASE_GS_USER, value, 0, 0, 0]);
                self.kernel_gs_base = value;
            }
            _ => fatal(format_args!("wrmsr {msr:#x} <- {value:#x} is not available under Xen PV")),
        }
    }
    fn read_cr(&mut self, n: u8) -> u64 {
        match n {
            0 => self.cr0,
            2 => vcpu().cr2,
            3 => self.mmu.guest_cr3.unwrap_or(0),
            4 => self.cr4,
            _ => fatal(format_args!("reading cr{n} is not available under Xen PV")),
        }
    }
    fn write_cr(&mut self, n: u8, value: u64) {
        match n {
            // Xen owns paging and write protection: the values are kept for reads back.
            0 => self.cr0 = value,
            2 => vcpu().cr2 = value,
            3 => mmu_ok(self.mmu.load_cr3(value)),
            4 => self.cr4 = value,
            _ => fatal(format_args!("writing cr{n} is not available under Xen PV")),
        }
    }
    fn invlpg(&mut self, addr: u64) {
        mmu_ok(self.mmu.invlpg(addr));
    }
    /// Memory-access sites (annotated kernels): `pt_*` (8-byte entries) in direct mode are
    /// translated (xen/direct.rs), otherwise the access itself — shadow mode's tables are the
    /// kernel's, and the LAPIC frame maps the runtime's LAPIC register page.
    fn memory(&mut self, kind: Kind, at: u64, width: u8, store: Option<u64>) -> Option<u64> {
        let pt = matches!(kind, Kind::PtRead | Kind::PtWrite);
        if pt && width != 8 {
            return None;
        }
        let direct = pt && self.mmu.direct;
        match store {
            Some(v) if direct => mmu_ok(self.mmu.write_entry(at, v)),
            Some(v) => self.write(at, &v.to_le_bytes()[..width as usize]),
            None => {
                let mut b = [0u8; 8];
                self.read(at, &mut b[..width as usize]);
                let v = u64::from_le_bytes(b);
                return Some(if direct { self.mmu.read_entry(at, v) } else { v });
            }
        }
        Some(0)
    }
    fn halt(&mut self, interrupts: bool) {
        if !interrupts {
            flush_uart(self);
            let _ = writeln!(Console, "previrt-xen: the kernel halted with interrupts disabled");
            shutdown(abi::SHUTDOWN_POWEROFF);
        }
        if self.pit.period_ns() == 0 {
            // The timer is the only event source the backend models: this would sleep forever.
            fatal(format_args!("hlt with interrupts on but no timer programmed: nothing would wake the kernel"));
        }
        // SCHEDOP_block, as Linux's xen_safe_halt: Xen unmasks events atomically with its check
        // for pending ones and sleeps until one arrives. Unmasked, the event comes as an upcall
        // right at the hypercall's return, inside this dispatch; while `previrt_xen_blocking`
        // is set the upcall only masks events again and returns, leaving them pending, so the
        // return to the kernel (the iret hypercall, see exit_frame) delivers them at the
        // instruction after `hlt`, as hardware would.
        let blocking = &raw mut previrt_xen_blocking;
        // SAFETY: a flag the upcall reads (single vCPU); volatile, so it brackets the hypercall.
        unsafe { blocking.write_volatile(1) };
        let rc = sched_op(abi::SCHEDOP_BLOCK, 0);
        // SAFETY: vcpu_info's mask byte, shared with Xen; then the flag, as above.
        unsafe {
            core::ptr::addr_of_mut!(vcpu().upcall_mask).write_volatile(1);
            blocking.write_volatile(0);
        }
        if rc < 0 {
            hypercall_failed(Hypercall::SchedOp, [abi::SCHEDOP_BLOCK, 0, 0, 0, 0], rc);
        }
    }
    /// The kernel's table, translated (xen/gdt.rs) into the runtime's GDT frames — only the
    /// descriptors that differ from what the frames hold, with `update_descriptor` (Xen holds
    /// the frames read-only) — then `set_gdt`. Entries past the kernel's limit in the last
    /// frame are cleared, so its selectors past the limit fault as on hardware.
    fn load_gdt(&mut self, table: DescTable) {
        let entries = (table.limit as usize + 1) / 8;
        if entries > gdt::MAX_ENTRIES {
            fatal(format_args!(
                "lgdt: the kernel's GDT has {entries} entries; a PV guest's may have {} (selectors from {:#x} are Xen's)",
                gdt::MAX_ENTRIES,
                gdt::MAX_ENTRIES * 8
            ));
        }
        let copy = mmu::gdt_frames() as *const u64;
        let mut mfns = [0u64; gdt::FRAMES];
        let frames = gdt::frames(entries);
        for (f, mfn) in mfns[..frames].iter_mut().enumerate() {
            *mfn = self.mmu.mfn((copy as u64 >> 12) + f as u64).unwrap_or(0);
        }
        for i in 0..frames * gdt::PER_FRAME {
            let mut d = [0u8; 8];
            if i < entries {
                self.read_mem(table.base + i as u64 * 8, &mut d);
            }
            let (kernel, want) = (u64::from_le_bytes(d), gdt::translate(u64::from_le_bytes(d)));
            // SAFETY: the GDT frames are mapped read-only in every address space the runtime uses.
            if unsafe { copy.add(i).read_volatile() } == want {
                continue;
            }
            let a = [mfns[i / gdt::PER_FRAME] << 12 | (i % gdt::PER_FRAME * 8) as u64, want, 0, 0, 0];
            // SAFETY: the machine address of a descriptor in one of the runtime's GDT frames.
            let rc = unsafe { abi::call(Hypercall::UpdateDescriptor, a) };
            if rc < 0 {
                fatal(format_args!(
                    "lgdt: Xen refuses the kernel's GDT entry {i} (selector {:#x}, descriptor {kernel:#018x}): {}",
                    i * 8,
                    Failed(Hypercall::UpdateDescriptor, a, rc)
                ));
            }
        }
        must(Hypercall::SetGdt, [mfns.as_ptr() as u64, entries as u64, 0, 0, 0]);
        self.gdt = Some(table);
    }
    fn load_idt(&mut self, table: DescTable) {
        self.idt = Some(table);
        let mut traps = [abi::TrapInfo::default(); 33];
        let mut n = 0;
        for v in 0..32u8 {
            let handler = self.kernel_vector(v);
            if handler == 0 {
                continue;
            }
            let mut g = [0u8; 16];
            self.read_mem(table.base + v as u64 * 16, &mut g);
            // SAFETY: the trampolines read this table with events masked.
            unsafe { previrt_xen_vectors[v as usize] = handler };
            let gate_dpl = (g[5] >> 5) & 3;
            let interrupt_gate = emulate::interrupt_gate(&g);
            let address = if v == 14 {
                addr_of_sym!("previrt_xen_page_fault_entry")
            } else {
                addr_of_sym!("previrt_xen_traps") + v as u64 * 16
            };
            traps[n] = abi::TrapInfo {
                vector: v,
                flags: gate_dpl | if interrupt_gate { abi::TI_MASK_EVENTS } else { 0 },
                cs: abi::FLAT_KERNEL_CS,
                address,
            };
            n += 1;
        }
        must(Hypercall::SetTrapTable, [traps.as_ptr() as u64, 0, 0, 0, 0]);
    }
    fn load_tr(&mut self, _selector: u16) {
        // Xen owns the TSS; the kernel's IST stacks have no PV equivalent (docs/xen-pv.md).
    }
}
