//! The `hv` backend in the kernel: hypercalls, the shared vCPU page, the device models as the
//! backend's [`Machine`], the site dispatcher and its stub.

use crate::devices::{self, Dev, Pic, Pit, Uart};
use crate::emulate::{self, gpr, rflags, DescTable, Machine, Regs};
use crate::guest::{self, hw, link_value, sym_addr, Global};
use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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

/// Period of the VMM's backstop timer (see `Hv::tick`).
const BACKSTOP_NS: u64 = 1_000_000_000;

/// The interrupt frame (rip, cs, rflags, rsp, ss) and handler of an event the runtime
/// delivers, read by `previrt_hv_deliver`.
#[no_mangle]
static mut previrt_hv_frame: [u64; 6] = [0; 6];

/// Hypercalls made, by number (the exit summary prints them).
static CALLS: [AtomicU64; hc::COUNT as usize] = [const { AtomicU64::new(0) }; hc::COUNT as usize];
/// Console doorbells rung (asynchronous flushes; no exit to the VMM).
static DOORBELLS: AtomicU64 = AtomicU64::new(0);

/// Everything the backend knows; single vCPU, touched inside the stub (interrupts off).
pub struct Hv {
    features: u32,
    uart: Uart,
    pic: [Pic; 2],
    pit: Pit,
    /// The event vector the VMM injects (0: none): IRQ0's vector while the PIC unmasks it.
    vector: u8,
    tsc_per_ms: u64,
    /// When the kernel's next tick is due (ns since boot; 0: no tick programmed).
    next_tick: u64,
    /// Events the runtime delivered itself (IF came on with an event pending).
    delivered: u64,
}

static HV: Global<Hv> = Global(UnsafeCell::new(Hv {
    features: 0,
    uart: Uart::new(),
    pic: [Pic::new(), Pic::new()],
    pit: Pit::new(),
    vector: 0,
    tsc_per_ms: 0,
    next_tick: 0,
    delivered: 0,
}));

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

/// Guest-physical address of a runtime address.
fn gpa(va: u64) -> u64 {
    va.wrapping_sub(link_value!("__previrt_virt_delta"))
}

/// Hypercall `nr`: a call into the VMM's stub page (only %rax is clobbered).
fn hypercall(nr: u64, a: [u64; 4]) -> i64 {
    let stub = HYPERCALLS.0.get() as u64 + nr * abi::HYPERCALL_STUB_SIZE as u64;
    CALLS[nr as usize].fetch_add(1, Ordering::Relaxed);
    let r: i64;
    // SAFETY: the VMM filled the page at `init`; the stubs follow the SysV convention and
    // preserve every register but %rax.
    unsafe {
        core::arch::asm!("call {stub}", stub = in(reg) stub, in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("rcx") a[3], lateout("rax") r)
    };
    r
}

/// Set up the ABI at boot: check the version, install the hypercall and vCPU pages.
pub(crate) fn init(tsc_per_ms: u64) -> Result<(), &'static str> {
    let [version, feats, _, _] = hw::cpuid(abi::CPUID_VERSION, 0);
    if version >> 16 != abi::ABI_MAJOR as u32 {
        return Err("the hypervisor offers another major version of the previrt ABI");
    }
    // SAFETY: boot runs once, single-threaded.
    let x = unsafe { HV.get() };
    x.features = feats;
    x.tsc_per_ms = tsc_per_ms;
    let mut h = hw::Hardware;
    vif().store(0, Ordering::Relaxed);
    Machine::wrmsr(&mut h, abi::MSR_HYPERCALL_PAGE, gpa(HYPERCALLS.0.get() as u64) | abi::MSR_ENABLE);
    Machine::wrmsr(&mut h, abi::MSR_VCPU_PAGE, gpa(page() as u64) | abi::MSR_ENABLE);
    if hypercall(hc::VERSION, [0; 4]) != abi::ABI_VERSION as i64 {
        return Err("the hypercall page does not answer VERSION");
    }
    Ok(())
}

/// The runtime's own messages: through the UART model's line buffer into the console ring.
pub(crate) struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // SAFETY: single vCPU; runtime messages are written inside the stub or at boot.
        let x = unsafe { HV.get() };
        for &b in s.as_bytes() {
            if x.uart.push(b) {
                x.flush();
            }
        }
        Ok(())
    }
}

/// Print why the kernel cannot go on and stop the VM (status 4, as the VMM's own stops).
fn fatal(what: fmt::Arguments) -> ! {
    let _ = writeln!(Console, "\nprevirt-hv: FATAL: {what}");
    // SAFETY: single vCPU.
    unsafe { HV.get() }.flush();
    loop {
        hypercall(hc::SHUTDOWN, [4, 0, 0, 0]);
    }
}

impl Hv {
    /// Move the UART's buffered bytes into the console ring and ring the doorbell (or flush
    /// synchronously when the VMM offers no doorbell or the ring has no room).
    fn flush(&mut self) {
        let bytes = &self.uart.buf[..self.uart.len];
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
        self.uart.len = 0;
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

    /// Nanoseconds since boot from the TSC (the PIT model's clock).
    fn now_ns(&self) -> u64 {
        let (t, k) = (hw::rdtsc(), self.tsc_per_ms.max(1));
        t / k * 1_000_000 + t % k * 1_000_000 / k
    }

    /// Tell the VMM which vector to inject: IRQ0's, while the PIC is initialised and leaves
    /// IRQ0 unmasked; none otherwise.
    fn sync_vector(&mut self) {
        let m = &self.pic[0];
        let want = if m.mask & 1 == 0 && m.base >= 32 { m.base } else { 0 };
        if want != self.vector && hypercall(hc::SET_EVENT_VECTOR, [want as u64, 0, 0, 0]) == 0 {
            self.vector = want;
        }
    }

    fn timer_set(&self, mode: u64, ns: u64) {
        let ns = ns.clamp(abi::TIMER_MIN_NS, BACKSTOP_NS);
        if hypercall(hc::TIMER_SET, [mode, ns, 0, 0]) != 0 {
            fatal(format_args!("TIMER_SET refused {ns} ns"));
        }
    }

    /// The kernel programmed the PIT: ticks start one period from now.
    fn set_timer(&mut self) {
        self.next_tick = self.now_ns() + self.pit.period_ns();
        self.timer_set(timer::PERIODIC, BACKSTOP_NS);
    }

    /// Ticks are kept by the runtime, not by the VMM's timer: a tick that is due when the
    /// kernel runs a site becomes pending here (missed periods are skipped, as the VMM does),
    /// with no exit. The kernel runs sites constantly (every interrupt-flag operation and port
    /// access), so ticks arrive at most a few instructions late; the VMM's timer only backs up
    /// code that waits for a tick without any site (every [`BACKSTOP_NS`]) and wakes `hlt`.
    fn tick(&mut self) {
        let period = self.pit.period_ns();
        if self.next_tick == 0 || period == 0 {
            return;
        }
        let now = self.now_ns();
        if now >= self.next_tick {
            self.next_tick += period * ((now - self.next_tick) / period + 1);
            pending().fetch_or(event::TIMER, Ordering::AcqRel);
        }
    }

    /// isa-debug-exit: the summary, then SHUTDOWN with the status QEMU would exit with.
    fn exit(&mut self, value: u32) -> ! {
        self.flush();
        let mut out = Console;
        guest::site_summary(&mut out);
        let _ = write!(out, "previrt-hv: hypercalls");
        for (nr, n) in CALLS.iter().enumerate() {
            let _ = write!(out, " {nr}={}", n.load(Ordering::Relaxed));
        }
        // SAFETY: statistics written by the VMM.
        let upcalls = unsafe { core::ptr::addr_of!((*page()).upcalls).read_volatile() };
        let _ = writeln!(
            out,
            " doorbells={} upcalls={upcalls} delivered-by-runtime={}",
            DOORBELLS.load(Ordering::Relaxed),
            self.delivered
        );
        self.flush();
        loop {
            hypercall(hc::SHUTDOWN, [((value as u64 & 0x7f) << 1) | 1, 0, 0, 0]);
        }
    }

    /// IF is on and an event is pending: deliver it as the hardware would, through the
    /// kernel's IDT gate for the event vector (interrupt frame on the current stack, aligned
    /// to 16 bytes; no privilege change, the kernel runs at CPL 0). The stub's register frame
    /// sits right below the kernel's stack pointer, so the stub returns to
    /// `previrt_hv_deliver`, which pushes the frame from `previrt_hv_frame` and jumps.
    fn deliver_pending(&mut self, regs: &mut Regs) {
        if regs.rflags & rflags::IF == 0 || self.vector == 0 || pending().load(Ordering::Acquire) & event::TIMER == 0 {
            return;
        }
        let mut idtr = [0u8; 10];
        // SAFETY: stores the IDT register into the buffer.
        unsafe { core::arch::asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack, preserves_flags)) };
        let limit = u16::from_le_bytes([idtr[0], idtr[1]]) as u64;
        let base = u64::from_le_bytes(idtr[2..].try_into().unwrap_or_default());
        let v = self.vector as u64;
        if (v + 1) * 16 > limit + 1 {
            fatal(format_args!("event vector {v:#x} is beyond the kernel's IDT"));
        }
        let mut g = [0u8; 16];
        hw::Hardware.read(base + v * 16, &mut g);
        if g[5] & 0x80 == 0 || g[4] & 7 != 0 {
            fatal(format_args!("IDT gate {v:#x} is not present or uses an IST stack (not modelled)"));
        }
        let handler = u16::from_le_bytes([g[0], g[1]]) as u64
            | (u16::from_le_bytes([g[6], g[7]]) as u64) << 16
            | (u32::from_le_bytes([g[8], g[9], g[10], g[11]]) as u64) << 32;
        // SAFETY: real interrupts stay off from here to the jump into the handler.
        unsafe { previrt_hv_frame = [regs.rip, regs.cs, regs.rflags, regs.gpr[gpr::RSP], regs.ss, handler] };
        regs.rip = sym_addr!("previrt_hv_deliver");
        regs.cs = u16::from_le_bytes([g[2], g[3]]) as u64;
        let interrupt_gate = g[5] & 0xf == 0xe;
        regs.rflags &= !(rflags::TF | rflags::NT | rflags::RF | if interrupt_gate { rflags::IF } else { 0 });
        // As the VMM does on injection: no further event until the kernel's IF comes back on.
        vif().store(0, Ordering::Release);
        self.delivered += 1;
    }
}

impl Machine for Hv {
    fn read(&mut self, addr: u64, buf: &mut [u8]) {
        hw::Hardware.read(addr, buf)
    }
    fn write(&mut self, addr: u64, buf: &[u8]) {
        hw::Hardware.write(addr, buf)
    }
    fn port_in(&mut self, port: u16, width: u8) -> u32 {
        let Some((dev, r)) = devices::device(port).filter(|_| width == 1) else {
            return hw::Hardware.port_in(port, width);
        };
        (match dev {
            Dev::Uart => self.uart.read(r),
            Dev::PicMaster => self.pic[0].read(r),
            Dev::PicSlave => self.pic[1].read(r),
            Dev::Pit => {
                let now = self.now_ns();
                self.pit.read(r, now)
            }
            Dev::DebugExit => 0,
        }) as u32
    }
    fn port_out(&mut self, port: u16, width: u8, value: u32) {
        let Some((dev, r)) = devices::device(port).filter(|_| width == 1 || port == 0xf4) else {
            return hw::Hardware.port_out(port, width, value);
        };
        let v = value as u8;
        match dev {
            Dev::Uart => {
                if self.uart.write(r, v) {
                    self.flush();
                }
            }
            Dev::PicMaster => {
                self.pic[0].write(r, v);
                if Pic::is_eoi(r, v, 0) {
                    // The kernel acknowledged the tick: the event is handled.
                    pending().fetch_and(!event::TIMER, Ordering::AcqRel);
                }
                self.sync_vector();
            }
            Dev::PicSlave => self.pic[1].write(r, v),
            Dev::Pit => {
                let now = self.now_ns();
                if self.pit.write(r, v, now).is_some() {
                    self.set_timer();
                }
            }
            Dev::DebugExit => self.exit(value),
        }
    }
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        hw::Hardware.cpuid(leaf, subleaf)
    }
    fn rdmsr(&mut self, msr: u32) -> u64 {
        hw::Hardware.rdmsr(msr)
    }
    fn wrmsr(&mut self, msr: u32, value: u64) {
        hw::Hardware.wrmsr(msr, value)
    }
    fn read_cr(&mut self, n: u8) -> u64 {
        hw::Hardware.read_cr(n)
    }
    fn write_cr(&mut self, n: u8, value: u64) {
        hw::Hardware.write_cr(n, value)
    }
    fn invlpg(&mut self, addr: u64) {
        hw::Hardware.invlpg(addr)
    }
    fn halt(&mut self, interrupts: bool) {
        if !interrupts {
            fatal(format_args!("the kernel halted with interrupts disabled"));
        }
        self.tick();
        if pending().load(Ordering::Acquire) == 0 && self.next_tick != 0 {
            // Sleep until the kernel's next tick, then back to the backstop period.
            self.timer_set(timer::ONESHOT, self.next_tick.saturating_sub(self.now_ns()));
            hypercall(hc::HALT, [0; 4]);
            self.timer_set(timer::PERIODIC, BACKSTOP_NS);
            self.tick();
        } else if pending().load(Ordering::Acquire) == 0 {
            hypercall(hc::HALT, [0; 4]);
        }
    }
    fn load_gdt(&mut self, table: DescTable) {
        hw::Hardware.load_gdt(table)
    }
    fn load_idt(&mut self, table: DescTable) {
        hw::Hardware.load_idt(table)
    }
    fn load_tr(&mut self, selector: u16) {
        hw::Hardware.load_tr(selector)
    }
    fn set_interrupt_flag(&mut self, regs: &mut Regs, on: bool) {
        regs.rflags = if on { regs.rflags | rflags::IF } else { regs.rflags & !rflags::IF };
        vif().store(on as u32, Ordering::Release);
    }
}

/// The site stub's Rust half: the shared handlers over [`Hv`], then pending events.
#[no_mangle]
extern "C" fn previrt_hv_dispatch(regs: &mut Regs) {
    let Some((op, ool)) = guest::enter_site(regs) else {
        fatal(format_args!("call into the runtime from {:#x}, which is no site", regs.rip.wrapping_sub(5)))
    };
    // SAFETY: the stub runs with interrupts off (single vCPU).
    let x = unsafe { HV.get() };
    if !op.is_some_and(|op| emulate::emulate(&op, regs, x)) {
        regs.rip = ool;
    }
    x.tick();
    x.deliver_pending(regs);
    regs.iret_rsp = regs.gpr[gpr::RSP];
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
        // Entered with the interrupted RSP and every GPR, interrupts off; the arithmetic
        // flags it changes are not the interrupted code's (those are in the frame).
        r#"previrt_hv_deliver:
    andq $-16, %rsp
    pushq previrt_hv_frame+32(%rip)
    pushq previrt_hv_frame+24(%rip)
    pushq previrt_hv_frame+16(%rip)
    pushq previrt_hv_frame+8(%rip)
    pushq previrt_hv_frame(%rip)
    jmpq *previrt_hv_frame+40(%rip)
"#,
        ".text\n"
    ),
    options(att_syntax, raw)
);
