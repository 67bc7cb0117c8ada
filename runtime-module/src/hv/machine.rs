//! The `hv` backend in the kernel: hypercalls, the shared vCPU page and the in-tree
//! hypervisor's side of the shared paravirtual machine ([`Paravirt`]: device models,
//! interrupt flag, ticks, the site dispatcher), and its stub.
//!
//! Both ABI majors are spoken: version 1 calls stub `nr`, version 2 the single entry with a
//! [`abi::v2::Call`] block; [`init`] picks the one CPUID reports, at boot and again after a
//! migration (guest/migrate.rs), so the same kernel moves between the two.

use crate::emulate::{Machine, Regs};
use crate::guest::paravirt::{Hypervisor, Paravirt, BACKSTOP_NS};
use crate::guest::{self, gpa, hw, sym_addr, Global};
use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use previrt_hv_abi::{self as abi, event, features, hc, timer, VcpuPage};

/// The page the VMM fills with hypercall stubs (executable: the runtime's pages are mapped
/// without NX in every address space, see `hw::map_runtime`).
#[repr(C, align(4096))]
struct StubPage([u8; abi::PAGE_SIZE]);
static HYPERCALLS: Global<StubPage> = Global(UnsafeCell::new(StubPage([0xcc; abi::PAGE_SIZE])));

#[repr(C, align(4096))]
struct SharedPage(VcpuPage);
// SAFETY (zeroed): VcpuPage is plain integers and arrays.
static VCPU: Global<SharedPage> = Global(UnsafeCell::new(SharedPage(unsafe { core::mem::zeroed() })));

/// The ABI major in use ([`abi::ABI_MAJOR`] or [`abi::ABI_MAJOR_V2`]).
static MAJOR: AtomicU16 = AtomicU16::new(abi::ABI_MAJOR);

/// The block version-2 hypercalls point at (single vCPU; only used inside [`hypercall`]).
#[repr(C, align(16))]
struct CallBlock(abi::v2::Call);
static CALL: Global<CallBlock> =
    Global(UnsafeCell::new(CallBlock(abi::v2::Call { op: 0, flags: 0, args: [0; 4], _reserved: [0; 3] })));

/// Hypercalls made, by number (the exit summary prints them).
static CALLS: [AtomicU64; hc::COUNT as usize] = [const { AtomicU64::new(0) }; hc::COUNT as usize];
/// Console doorbells rung (asynchronous flushes; no exit to the VMM).
static DOORBELLS: AtomicU64 = AtomicU64::new(0);

/// The in-tree hypervisor's side of the paravirtual machine ([`Paravirt`]).
pub struct Hv {
    features: u32,
    /// TSC ticks per ms: the rate of [`Hypervisor::now_ns`]'s clock.
    pub(crate) tsc_per_ms: u64,
}

static HV: Global<Paravirt<Hv>> = Global(UnsafeCell::new(Paravirt::new(Hv { features: 0, tsc_per_ms: 0 })));

fn page() -> *mut VcpuPage {
    // SAFETY: only the address is taken.
    unsafe { core::ptr::addr_of_mut!(VCPU.get().0) }
}

fn vif() -> &'static AtomicU32 {
    // SAFETY: an aligned u32 of the shared page, which lives as long as the runtime.
    unsafe { AtomicU32::from_ptr(core::ptr::addr_of_mut!((*page()).vif)) }
}

fn pending() -> &'static AtomicU64 {
    // SAFETY: as `vif`; the VMM sets bits with atomic ORs.
    unsafe { AtomicU64::from_ptr(core::ptr::addr_of_mut!((*page()).pending)) }
}

/// Hypercall `nr` (a version-1 number) with arguments `a`: version 1 calls stub `nr` with the
/// arguments in registers; version 2 fills the call block with the renumbered op and calls
/// the entry with its GPA. Only %rax is clobbered.
fn hypercall(nr: u64, a: [u64; 4]) -> i64 {
    CALLS[nr as usize].fetch_add(1, Ordering::Relaxed);
    let (stub, a) = match MAJOR.load(Ordering::Relaxed) {
        abi::ABI_MAJOR_V2 => {
            // SAFETY: single vCPU, interrupts off in the runtime: nothing else uses the block.
            let block = unsafe { CALL.get() };
            let op = abi::v2::from_v1(nr).unwrap_or(u32::MAX);
            block.0 = abi::v2::Call { op, flags: 0, args: a, _reserved: [0; 3] };
            (0, [gpa(block as *mut CallBlock as u64), 0, 0, 0])
        }
        _ => (nr * abi::HYPERCALL_STUB_SIZE as u64, a),
    };
    let stub = HYPERCALLS.0.get() as u64 + stub;
    let r: i64;
    // SAFETY: the VMM filled the page at `init`; the stubs follow the SysV convention and
    // preserve every register but %rax.
    unsafe {
        core::arch::asm!("call {stub}", stub = in(reg) stub, in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("rcx") a[3], lateout("rax") r)
    };
    r
}

/// Set up the ABI (at boot, and after a migration): check the version, install the hypercall
/// and vCPU pages, say the guest answers suspend requests.
pub(crate) fn init(tsc_per_ms: u64) -> Result<(), &'static str> {
    let [version, feats, _, _] = hw::cpuid(abi::CPUID_VERSION, 0);
    let major = (version >> 16) as u16;
    if major != abi::ABI_MAJOR && major != abi::ABI_MAJOR_V2 {
        return Err("the hypervisor offers a major version of the previrt ABI this runtime does not know");
    }
    MAJOR.store(major, Ordering::Relaxed);
    // SAFETY: boot runs once, single-threaded.
    let x = unsafe { HV.get() };
    x.hv.features = feats;
    x.hv.tsc_per_ms = tsc_per_ms;
    let mut h = hw::Hardware;
    vif().store(0, Ordering::Relaxed);
    Machine::wrmsr(&mut h, abi::MSR_HYPERCALL_PAGE, gpa(HYPERCALLS.0.get() as u64) | abi::MSR_ENABLE);
    Machine::wrmsr(&mut h, abi::MSR_VCPU_PAGE, gpa(page() as u64) | abi::MSR_ENABLE);
    if hypercall(hc::VERSION, [0; 4]) != version as i64 {
        return Err("the hypercall page does not answer VERSION");
    }
    // SAFETY: the page is registered; the guest writes this field, the VMM reads it.
    unsafe { core::ptr::addr_of_mut!((*page()).guest_features).write_volatile(abi::guest_features::SUSPEND) };
    Ok(())
}

/// The ABI version in use (for the migration log line).
pub(crate) fn version() -> u16 {
    MAJOR.load(Ordering::Relaxed)
}

/// Migration: the console line buffer goes out, then `SUSPEND`; its result
/// ([`abi::suspend::RESUMED`] after a restore).
pub(crate) fn suspend() -> i64 {
    // SAFETY: called at the dispatcher's safe point (single vCPU, interrupts off).
    unsafe { HV.get() }.flush();
    hypercall(hc::SUSPEND, [0; 4])
}

/// Migration: what the kernel programmed, for the next backend.
pub(crate) fn programmed() -> crate::devices::Programmed {
    // SAFETY: as `suspend`.
    unsafe { HV.get() }.programmed()
}

/// Migration: bind what the kernel programmed under the previous backend.
pub(crate) fn adopt(p: &crate::devices::Programmed) {
    // SAFETY: as `suspend`.
    unsafe { HV.get() }.adopt(p)
}

/// The machine, for the `pvm` backend: the same ABI and models with the kernel deprivileged.
pub(crate) fn machine() -> &'static mut Paravirt<Hv> {
    // SAFETY: single vCPU; used inside the pvm stub (no events) or at boot.
    unsafe { HV.get() }
}

/// Address of the shared `vif` (the pvm stub saves and clears it around its dispatch).
pub(crate) fn vif_addr() -> u64 {
    vif().as_ptr() as u64
}

/// The runtime's own messages: through the UART model's line buffer into the console ring.
pub(crate) struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // SAFETY: single vCPU; runtime messages are written inside the stub or at boot.
        unsafe { HV.get() }.write_str(s)
    }
}

impl Hv {
    fn timer_set(&mut self, mode: u64, ns: u64) {
        let ns = ns.clamp(abi::TIMER_MIN_NS, BACKSTOP_NS);
        if hypercall(hc::TIMER_SET, [mode, ns, 0, 0]) != 0 {
            // SAFETY: single vCPU; the failing call came from inside the machine.
            unsafe { HV.get() }.fatal(format_args!("TIMER_SET refused {ns} ns"));
        }
    }
}

impl Hypervisor for Hv {
    const NAME: &'static str = "previrt-hv";

    /// Bytes go into the console ring, then the doorbell (or a synchronous flush when the VMM
    /// offers no doorbell or the ring has no room).
    fn console(&mut self, bytes: &[u8]) {
        let p = page();
        // SAFETY: the ring's indices are aligned u32 fields of the shared page.
        let (head, tail) = unsafe {
            (
                AtomicU32::from_ptr(core::ptr::addr_of_mut!((*p).console.head)),
                AtomicU32::from_ptr(core::ptr::addr_of_mut!((*p).console.tail)),
            )
        };
        let h = head.load(Ordering::Relaxed);
        if abi::CONSOLE_RING_SIZE - (h.wrapping_sub(tail.load(Ordering::Acquire)) as usize) < bytes.len() {
            hypercall(hc::CONSOLE_FLUSH, [0; 4]);
        }
        for (i, &b) in bytes.iter().enumerate() {
            let at = h.wrapping_add(i as u32) as usize % abi::CONSOLE_RING_SIZE;
            // SAFETY: inside the ring's data array; the VMM reads only below `head`.
            unsafe { core::ptr::addr_of_mut!((*p).console.data[at]).write_volatile(b) };
        }
        head.store(h.wrapping_add(bytes.len() as u32), Ordering::Release);
        if self.features & features::CONSOLE_DOORBELL != 0 {
            DOORBELLS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: a write to the doorbell port (ioeventfd), no other effect.
            unsafe {
                core::arch::asm!("out dx, al", in("dx") abi::CONSOLE_DOORBELL_PORT, in("al") 0u8, options(nomem, nostack, preserves_flags))
            };
        } else {
            hypercall(hc::CONSOLE_FLUSH, [0; 4]);
        }
    }
    /// The VMM injects the kernel's IRQ0 vector directly.
    fn set_vector(&mut self, vector: u8) -> bool {
        hypercall(hc::SET_EVENT_VECTOR, [vector as u64, 0, 0, 0]) == 0
    }
    fn wake_in(&mut self, ns: u64) {
        self.timer_set(timer::ONESHOT, ns);
    }
    fn backstop(&mut self, ns: u64) {
        self.timer_set(timer::PERIODIC, ns);
    }
    fn block(&mut self) {
        hypercall(hc::HALT, [0; 4]);
    }
    fn pending(&self) -> bool {
        pending().load(Ordering::Acquire) != 0
    }
    fn timer_pending(&self) -> bool {
        pending().load(Ordering::Acquire) & event::TIMER != 0
    }
    fn raise_timer(&mut self) {
        pending().fetch_or(event::TIMER, Ordering::AcqRel);
    }
    fn ack_timer(&mut self) {
        pending().fetch_and(!event::TIMER, Ordering::AcqRel);
    }
    fn set_vif(&mut self, on: bool) {
        vif().store(on as u32, Ordering::Release);
    }
    /// Nanoseconds since boot from the TSC (the PIT model's clock).
    fn now_ns(&self) -> u64 {
        let (t, k) = (hw::rdtsc(), self.tsc_per_ms.max(1));
        t / k * 1_000_000 + t % k * 1_000_000 / k
    }
    fn summary(&self, out: &mut dyn Write) {
        let _ = write!(out, "hypercalls");
        for (nr, n) in CALLS.iter().enumerate() {
            let _ = write!(out, " {nr}={}", n.load(Ordering::Relaxed));
        }
        // SAFETY: statistics written by the VMM.
        let upcalls = unsafe { core::ptr::addr_of!((*page()).upcalls).read_volatile() };
        let _ = write!(out, " doorbells={} upcalls={upcalls}", DOORBELLS.load(Ordering::Relaxed));
        let _ = write!(out, " lapic-in-guest={}", super::mmio::served());
    }
    fn shutdown(&mut self, status: u32) -> ! {
        loop {
            hypercall(hc::SHUTDOWN, [status as u64, 0, 0, 0]);
        }
    }
    fn memory(&mut self, kind: previrt_site_abi::Kind, addr: u64, width: u8, store: Option<u64>) -> Option<u64> {
        super::mmio::access(kind, addr, width, store)
    }
    fn suspend_requested(&self) -> bool {
        pending().load(Ordering::Acquire) & event::SUSPEND != 0
    }
}

#[no_mangle]
extern "C" fn previrt_hv_dispatch(regs: &mut Regs) {
    Paravirt::enter(&HV, regs)
}

/// Where `hv` sites call.
pub(crate) fn stub() -> u64 {
    sym_addr!("previrt_hv_entry")
}

// The trace stub's text (real interrupts off for the dispatch, iretq back) with the hv
// dispatcher.
core::arch::global_asm!(
    concat!(
        ".section .text.previrt_hv, \"ax\", @progbits\n",
        ".globl previrt_hv_entry\n",
        "previrt_hv_entry:\n",
        guest::site_stub!("    cli\n", "previrt_hv_dispatch", "    iretq\n"),
        ".text\n"
    ),
    options(att_syntax, raw)
);
