//! The `xen-hvm` backend (docs/xen-hvm.md): an unmodified kernel started as a Xen HVM/PVH
//! guest (real Xen, or `previrt run --abi xen|xen-3.0.2`). The kernel keeps its own page
//! tables, IDT and CPL 0; the runtime is the Xen side of the shared paravirtual machine
//! ([`crate::guest::paravirt`]): interrupt flag in the runtime, PC devices modelled in the
//! guest, the PIT's ticks as VIRQ_TIMER events on the kernel's IRQ0 vector.
//!
//! - Detection: CPUID "XenVMMXenVMM" ([`crate::platform::Platform::XenHvm`]); the hypercall
//!   page is installed through the MSR leaf 0x40000002 names; shared_info is mapped with
//!   `XENMEM_add_to_physmap`; the clock is its vcpu_time_info.
//! - ABI version: Xen before 3.0.2 had `sched_op_compat` (6, argument by value) and
//!   `event_channel_op_compat` (16, command inside the structure) instead of `sched_op` (29) and
//!   `event_channel_op` (32). As real guests do, the runtime tries the current call and falls
//!   back on -ENOSYS; the first event-channel call (binding VIRQ_TIMER) decides for both.
//! - Events: `HVMOP_set_param(HVM_PARAM_CALLBACK_IRQ, vector type)` with the kernel's IRQ0
//!   vector; Xen injects it while `evtchn_upcall_pending` is set and RFLAGS.IF allows, the
//!   runtime delivers it itself when IF comes back on; the PIC EOI clears the timer channel.
//! - Timer: `set_timer_op` (one-shot, absolute system time). hlt: `SCHEDOP_block`.
//! - Console: `console_io` for the initial domain (a line per call); an ordinary domain
//!   (HVM_PARAM_CONSOLE_PFN answered) moves its console page into the runtime
//!   (XENMAPSPACE_gmfn: the kernel's page tables map the runtime, not that frame) and writes the
//!   ring with the Xen PV backend's writer ([`crate::xen::console`]), then `EVTCHNOP_send`.
//! - isa-debug-exit: `SCHEDOP_shutdown` whose reason is the status QEMU would give (Xen keeps
//!   the reason as the domain's 8-bit shutdown code).

use crate::guest::paravirt::{Hypervisor, Paravirt};
use crate::guest::{self, gpa, hw, sym_addr, Global};
use crate::xen::abi::{self, Hypercall, VcpuInfo};
use core::cell::UnsafeCell;
use core::fmt::{self, Write};

const ENOSYS: i64 = -38;
const XENVER_VERSION: u64 = 0;
const XENMEM_ADD_TO_PHYSMAP: u64 = 7;
const XENMAPSPACE_SHARED_INFO: u32 = 0;
const HVMOP_SET_PARAM: u64 = 0;
const HVMOP_GET_PARAM: u64 = 1;
const HVM_PARAM_CALLBACK_IRQ: u32 = 0;
const HVM_PARAM_CONSOLE_PFN: u32 = 17;
const HVM_PARAM_CONSOLE_EVTCHN: u32 = 18;
const XENMAPSPACE_GMFN: u32 = 2;
/// HVM_PARAM_CALLBACK_IRQ value type "vector" (bits 63:56 = 2; the vector in bits 7:0).
const CALLBACK_TYPE_VECTOR: u64 = 2 << 56;

/// Which generation of the event-channel and scheduler hypercalls the hypervisor offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// `sched_op` (29), `event_channel_op` (32): Xen 3.0.2 and later.
    Current,
    /// `sched_op_compat` (6), `event_channel_op_compat` (16): before 3.0.2.
    Compat,
}

/// The Xen side of the paravirtual machine.
pub struct XenHvm {
    generation: Generation,
    /// XENVER_version: major << 16 | minor.
    version: u32,
    timer_port: u32,
    /// The VIRQ_SUSPEND channel (kept masked, polled at safe points); 0: the hypervisor
    /// has no suspend requests.
    suspend_port: u32,
    /// An ordinary domain's console channel (0: the initial domain, console_io).
    console_port: u32,
}

/// Where an ordinary domain's console page is moved to (mapped wherever the runtime is).
#[repr(C, align(4096))]
struct ConsolePage([u8; 4096]);
static CONSOLE_PAGE: Global<ConsolePage> = Global(UnsafeCell::new(ConsolePage([0; 4096])));

static XEN: Global<Paravirt<XenHvm>> = Global(UnsafeCell::new(Paravirt::new(XenHvm {
    generation: Generation::Current,
    version: 0,
    timer_port: 0,
    suspend_port: 0,
    console_port: 0,
})));

/// previrt's suspend request channel (the VMM personality's stand-in for xenstore's
/// `control/shutdown`; docs/xen-hvm.md). Real Xen refuses the bind: no suspend requests.
const VIRQ_SUSPEND: u32 = 23;
const SHUTDOWN_SUSPEND: u64 = 2;

fn shared_info() -> u64 {
    sym_addr!("previrt_xen_shared_info")
}

fn vcpu() -> &'static mut VcpuInfo {
    // SAFETY: vCPU 0's vcpu_info is the start of the shared_info page mapped at `init`.
    unsafe { &mut *(shared_info() as *mut VcpuInfo) }
}

/// Word `i` of the shared_info bitmap at `offset` (event channel pending or mask bits).
fn bitmap(offset: usize, i: usize) -> &'static core::sync::atomic::AtomicU64 {
    // SAFETY: an aligned u64 inside the shared_info page, shared with the hypervisor.
    unsafe { core::sync::atomic::AtomicU64::from_ptr((shared_info() as usize + offset + i * 8) as *mut u64) }
}

/// HVMOP_get_param of this domain; None if refused.
fn get_param(index: u32) -> Option<u64> {
    let mut p = HvmParam { domid: abi::DOMID_SELF as u16, _pad: 0, index, value: 0 };
    (call(Hypercall::HvmOp, [HVMOP_GET_PARAM, &mut p as *mut _ as u64, 0, 0, 0]) == 0).then_some(p.value)
}

fn add_to_physmap(space: u32, idx: u64, gpfn: u64) -> i64 {
    let mut xatp = AddToPhysmap { domid: abi::DOMID_SELF as u16, size: 0, space, idx, gpfn };
    call(Hypercall::MemoryOp, [XENMEM_ADD_TO_PHYSMAP, &mut xatp as *mut _ as u64, 0, 0, 0])
}

fn call(h: Hypercall, a: [u64; 5]) -> i64 {
    // SAFETY: callers pass arguments laid out for `h`.
    unsafe { abi::call(h, a) }
}

/// `struct xen_add_to_physmap` (64-bit layout).
#[repr(C)]
struct AddToPhysmap {
    domid: u16,
    size: u16,
    space: u32,
    idx: u64,
    gpfn: u64,
}

/// `struct xen_hvm_param`.
#[repr(C)]
struct HvmParam {
    domid: u16,
    _pad: u16,
    index: u32,
    value: u64,
}

/// `struct evtchn_op` of `event_channel_op_compat`: the command, then the command's structure.
#[repr(C)]
struct CompatEvtchnOp {
    cmd: u32,
    arg: [u32; 6],
}

impl XenHvm {
    /// An event-channel command in this hypervisor's generation; `arg` is the command's
    /// structure (at most 24 bytes), updated with what the hypervisor writes back.
    fn evtchn_op(&mut self, cmd: u64, arg: &mut [u32]) -> i64 {
        if self.generation == Generation::Current {
            let rc = call(Hypercall::EventChannelOp, [cmd, arg.as_mut_ptr() as u64, 0, 0, 0]);
            if rc != ENOSYS {
                return rc;
            }
            self.generation = Generation::Compat;
        }
        let mut op = CompatEvtchnOp { cmd: cmd as u32, arg: [0; 6] };
        op.arg[..arg.len()].copy_from_slice(arg);
        let rc = call(Hypercall::EventChannelOpCompat, [&mut op as *mut _ as u64, 0, 0, 0, 0]);
        arg.copy_from_slice(&op.arg[..arg.len()]);
        rc
    }

    /// A scheduler command; `by_value` is the compat form's argument, `by_ref` the current
    /// form's structure.
    fn sched_op(&self, cmd: u64, by_value: u64, by_ref: u64) -> i64 {
        match self.generation {
            Generation::Current => call(Hypercall::SchedOp, [cmd, by_ref, 0, 0, 0]),
            Generation::Compat => call(Hypercall::SchedOpCompat, [cmd, by_value, 0, 0, 0]),
        }
    }

    fn set_timer(&mut self, ns: u64) {
        let at = self.now_ns().saturating_add(ns);
        let rc = call(Hypercall::SetTimerOp, [at, 0, 0, 0, 0]);
        if rc != 0 {
            fatal(format_args!("set_timer_op({at}) failed: {rc}"));
        }
    }

    fn port_bit(&self) -> (usize, u64) {
        bit(self.timer_port)
    }
}

/// Word index and bit of event channel `port` in the shared_info bitmaps.
fn bit(port: u32) -> (usize, u64) {
    (port as usize / 64, 1 << (port % 64))
}

fn fatal(what: fmt::Arguments) -> ! {
    // SAFETY: single vCPU; called from inside the machine or at boot.
    unsafe { XEN.get() }.fatal(what)
}

/// Set up the Xen interface at boot: hypercall page, shared_info, VIRQ_TIMER (which also
/// decides the hypercall generation). Err: why this backend cannot run here.
pub(crate) fn init() -> Result<(), &'static str> {
    let [max, ..] = hw::cpuid(0x4000_0000, 0);
    if max < 0x4000_0002 {
        return Err("no Xen hypercall-page leaf");
    }
    let [_, msr, ..] = hw::cpuid(0x4000_0002, 0);
    crate::emulate::Machine::wrmsr(&mut hw::Hardware, msr, gpa(abi::hypercall_page()));
    // SAFETY: boot (or a resume at the safe point) runs single-threaded, interrupts off.
    let x = unsafe { XEN.get() };
    // A resumed guest finds out anew which calls this hypervisor has.
    x.hv.generation = Generation::Current;
    let version = call(Hypercall::XenVersion, [XENVER_VERSION, 0, 0, 0, 0]);
    if version <= 0 {
        return Err("the hypercall page does not answer xen_version");
    }
    x.hv.version = version as u32;
    if add_to_physmap(XENMAPSPACE_SHARED_INFO, 0, gpa(shared_info()) >> 12) != 0 {
        return Err("XENMEM_add_to_physmap(shared_info) refused");
    }
    // struct evtchn_bind_virq: virq, vcpu in; port out.
    let mut bind = [abi::VIRQ_TIMER, 0, 0];
    let rc = x.hv.evtchn_op(abi::EVTCHNOP_BIND_VIRQ, &mut bind);
    if rc != 0 {
        return Err("binding VIRQ_TIMER failed");
    }
    x.hv.timer_port = bind[2];
    // Opt in to suspend requests where offered; the channel stays masked (no upcall).
    let mut bind = [VIRQ_SUSPEND, 0, 0];
    x.hv.suspend_port = 0;
    if x.hv.evtchn_op(abi::EVTCHNOP_BIND_VIRQ, &mut bind) == 0 {
        let (i, b) = bit(bind[2]);
        bitmap(abi::EVTCHN_MASK, i).fetch_or(b, core::sync::atomic::Ordering::AcqRel);
        x.hv.suspend_port = bind[2];
    }
    // An ordinary domain has a console ring instead of console_io.
    x.hv.console_port = 0;
    if let (Some(pfn @ 1..), Some(port @ 1..)) = (get_param(HVM_PARAM_CONSOLE_PFN), get_param(HVM_PARAM_CONSOLE_EVTCHN))
    {
        let page = CONSOLE_PAGE.0.get() as u64;
        if add_to_physmap(XENMAPSPACE_GMFN, pfn, gpa(page) >> 12) != 0 {
            return Err("the console page cannot be moved into the runtime");
        }
        x.hv.console_port = port as u32;
    }
    Ok(())
}

/// Migration (guest/migrate.rs): at the safe point, flush the console line, stop the timer
/// and suspend; `suspend::RESUMED` in the restored guest (Xen returns 0 in the new domain).
pub(crate) fn suspend() -> i64 {
    // SAFETY: called at the dispatcher's safe point (single vCPU, interrupts off).
    let x = unsafe { XEN.get() };
    x.flush();
    call(Hypercall::SetTimerOp, [0; 5]);
    let reason = SHUTDOWN_SUSPEND as u32;
    match x.hv.sched_op(abi::SCHEDOP_SHUTDOWN, SHUTDOWN_SUSPEND, &reason as *const u32 as u64) {
        0 => previrt_hv_abi::suspend::RESUMED,
        _ => previrt_hv_abi::suspend::CANCELLED,
    }
}

/// Migration: what the kernel programmed, for the next backend.
pub(crate) fn programmed() -> crate::devices::Programmed {
    // SAFETY: as `suspend`.
    unsafe { XEN.get() }.programmed()
}

/// Migration: bind what the kernel programmed under the previous backend.
pub(crate) fn adopt(p: &crate::devices::Programmed) {
    // SAFETY: as `suspend`.
    unsafe { XEN.get() }.adopt(p)
}

/// One boot-log line: what was found.
pub(crate) fn describe(out: &mut dyn Write) {
    // SAFETY: read-only use of the state written at `init`.
    let x = &unsafe { XEN.get() }.hv;
    let calls = match x.generation {
        Generation::Current => "sched_op/event_channel_op",
        Generation::Compat => "sched_op_compat/event_channel_op_compat",
    };
    let _ = writeln!(
        out,
        "previrt-xen-hvm: Xen {}.{}, {calls}, VIRQ_TIMER on port {}",
        x.version >> 16,
        x.version & 0xffff,
        x.timer_port
    );
}

/// The runtime's own messages: through the UART model's line buffer to console_io.
pub(crate) struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // SAFETY: single vCPU; runtime messages are written inside the stub or at boot.
        unsafe { XEN.get() }.write_str(s)
    }
}

impl Hypervisor for XenHvm {
    const NAME: &'static str = "previrt-xen-hvm";

    fn console(&mut self, mut bytes: &[u8]) {
        if self.console_port == 0 {
            if !bytes.is_empty() {
                call(Hypercall::ConsoleIo, [abi::CONSOLEIO_WRITE, bytes.len() as u64, bytes.as_ptr() as u64, 0, 0]);
            }
            return;
        }
        // SAFETY: the console page was moved into CONSOLE_PAGE at `init`; the back end only
        // follows the ring protocol.
        let mut ring = unsafe { crate::xen::console::Ring::new(CONSOLE_PAGE.0.get() as *mut u8) };
        while !bytes.is_empty() {
            let n = ring.write(bytes);
            let mut send = [self.console_port];
            self.evtchn_op(abi::EVTCHNOP_SEND, &mut send);
            if n == 0 {
                // Full: let the back end run.
                self.sched_op(abi::SCHEDOP_YIELD, 0, 0);
            }
            bytes = &bytes[n..];
        }
    }
    fn set_vector(&mut self, vector: u8) -> bool {
        let value = if vector == 0 { 0 } else { CALLBACK_TYPE_VECTOR | vector as u64 };
        let mut p = HvmParam { domid: abi::DOMID_SELF as u16, _pad: 0, index: HVM_PARAM_CALLBACK_IRQ, value };
        call(Hypercall::HvmOp, [HVMOP_SET_PARAM, &mut p as *mut _ as u64, 0, 0, 0]) == 0
    }
    fn wake_in(&mut self, ns: u64) {
        self.set_timer(ns);
    }
    /// Xen's timer is one-shot: the backstop fires once after each halt or PIT programming.
    fn backstop(&mut self, ns: u64) {
        self.set_timer(ns);
    }
    fn block(&mut self) {
        self.sched_op(abi::SCHEDOP_BLOCK, 0, 0);
    }
    fn pending(&self) -> bool {
        // SAFETY: a byte Xen sets; read volatile.
        unsafe { core::ptr::addr_of!(vcpu().upcall_pending).read_volatile() != 0 }
    }
    fn timer_pending(&self) -> bool {
        let (i, bit) = self.port_bit();
        self.pending() && bitmap(abi::EVTCHN_PENDING, i).load(core::sync::atomic::Ordering::Acquire) & bit != 0
    }
    /// What Xen does when VIRQ_TIMER fires: channel pending, its selector bit, the upcall.
    fn raise_timer(&mut self) {
        let (i, bit) = self.port_bit();
        bitmap(abi::EVTCHN_PENDING, i).fetch_or(bit, core::sync::atomic::Ordering::AcqRel);
        let v = vcpu();
        // SAFETY: fields of vCPU 0's vcpu_info; Xen only sets them (atomically).
        unsafe {
            core::sync::atomic::AtomicU64::from_ptr(&mut v.pending_sel)
                .fetch_or(1 << i, core::sync::atomic::Ordering::AcqRel);
            core::ptr::addr_of_mut!(v.upcall_pending).write_volatile(1);
        }
    }
    /// What a guest's upcall handler does: upcall flag first, then the selector and the channel.
    fn ack_timer(&mut self) {
        let (i, bit) = self.port_bit();
        let v = vcpu();
        // SAFETY: as in `raise_timer`.
        unsafe {
            core::ptr::addr_of_mut!(v.upcall_pending).write_volatile(0);
            core::sync::atomic::AtomicU64::from_ptr(&mut v.pending_sel)
                .fetch_and(!(1 << i), core::sync::atomic::Ordering::AcqRel);
        }
        bitmap(abi::EVTCHN_PENDING, i).fetch_and(!bit, core::sync::atomic::Ordering::AcqRel);
    }
    /// Xen injects the callback vector by RFLAGS.IF (HVM): no copy of the flag to keep.
    fn set_vif(&mut self, _on: bool) {}
    fn suspend_requested(&self) -> bool {
        let (i, b) = bit(self.suspend_port);
        self.suspend_port != 0 && bitmap(abi::EVTCHN_PENDING, i).load(core::sync::atomic::Ordering::Acquire) & b != 0
    }
    fn now_ns(&self) -> u64 {
        vcpu().time.system_time(hw::rdtsc)
    }
    fn summary(&self, out: &mut dyn Write) {
        let _ = write!(out, "hypercalls");
        for (h, name) in abi::HYPERCALLS {
            let n = abi::COUNTS[*h as usize].load(core::sync::atomic::Ordering::Relaxed);
            if n != 0 {
                let _ = write!(out, " {name}={n}");
            }
        }
    }
    fn shutdown(&mut self, status: u32) -> ! {
        loop {
            self.sched_op(abi::SCHEDOP_SHUTDOWN, status as u64, &status as *const u32 as u64);
        }
    }
}

#[no_mangle]
extern "C" fn previrt_xen_hvm_dispatch(regs: &mut crate::emulate::Regs) {
    crate::guest::paravirt::Paravirt::enter(&XEN, regs)
}

/// Where `xen-hvm` sites call.
pub(crate) fn stub() -> u64 {
    sym_addr!("previrt_xen_hvm_entry")
}

// The trace stub's text (real interrupts off for the dispatch, iretq back) with this
// backend's dispatcher.
core::arch::global_asm!(
    concat!(
        ".section .text.previrt_xen_hvm, \"ax\", @progbits\n",
        ".globl previrt_xen_hvm_entry\n",
        "previrt_xen_hvm_entry:\n",
        guest::site_stub!("    cli\n", "previrt_xen_hvm_dispatch", "    iretq\n"),
        ".text\n"
    ),
    options(att_syntax, raw)
);
