//! What the paravirtual backends of HVM-style platforms share (`hv` on the in-tree
//! hypervisor, `xen-hvm` on Xen's HVM/PVH interface): the kernel runs at CPL 0 on virtualized
//! hardware, its interrupt flag lives in the runtime (cli/sti/pushf/popf/iret never exit), its
//! port I/O to the PC devices goes to the in-guest models of [`crate::devices`], and its timer
//! becomes the platform's event.
//!
//! [`Paravirt`] is the [`Machine`] and the site dispatcher; a platform plugs in with a
//! [`Hypervisor`]: how console bytes leave, how the event vector and timers are set, how an
//! event is seen, acknowledged and waited for, and how the VM stops.
//!
//! Ticks are kept by the runtime: a tick that is due when the kernel runs a site becomes
//! pending here (missed periods skipped) with no exit. The kernel runs sites constantly (every
//! interrupt-flag operation and port access), so ticks arrive at most a few instructions late;
//! the platform's timer only backs up code that waits for a tick without any site
//! ([`BACKSTOP_NS`]) and wakes a halted kernel at its next tick.

use crate::devices::{self, Dev, Pic, Pit, Programmed, Uart};
use crate::emulate::{self, gpr, rflags, DescTable, Machine, Regs};
use crate::guest::{self, hw, sym_addr, Global};
use core::fmt::{self, Write};
use previrt_site_abi::Kind;

/// Period of the platform's backstop timer.
pub const BACKSTOP_NS: u64 = 1_000_000_000;

/// A platform's side of a paravirtual backend.
pub trait Hypervisor {
    /// Prefix of the backend's messages ("previrt-hv").
    const NAME: &'static str;
    /// Send console bytes (a line, or a full buffer).
    fn console(&mut self, bytes: &[u8]);
    /// Deliver timer events on `vector` (0: none). False if the platform refused.
    fn set_vector(&mut self, vector: u8) -> bool;
    /// A timer event `ns` from now, once (a halted kernel's next tick).
    fn wake_in(&mut self, ns: u64);
    /// A timer event at most every `ns` while the kernel does not halt.
    fn backstop(&mut self, ns: u64);
    /// Wait until an event is pending.
    fn block(&mut self);
    /// Any event pending / the timer event pending.
    fn pending(&self) -> bool;
    fn timer_pending(&self) -> bool;
    /// Mark the timer event pending (a tick the runtime found due) / acknowledge it (EOI).
    fn raise_timer(&mut self);
    fn ack_timer(&mut self);
    /// The kernel's interrupt flag changed (for platforms that read a copy of it).
    fn set_vif(&mut self, on: bool);
    /// Nanoseconds on the platform's clock.
    fn now_ns(&self) -> u64;
    /// The backend's line of the exit summary (hypercalls made, events).
    fn summary(&self, out: &mut dyn Write);
    /// Stop the VM with exit status `status`.
    fn shutdown(&mut self, status: u32) -> !;
    /// A memory-access site ([`Machine::memory`]): the platform's model of that address.
    fn memory(&mut self, _kind: Kind, _addr: u64, _width: u8, _store: Option<u64>) -> Option<u64> {
        None
    }
    /// The platform asks the guest to suspend (guest/migrate.rs answers at the dispatcher's
    /// safe point). Platforms without a suspend protocol never ask.
    fn suspend_requested(&self) -> bool {
        false
    }
}

/// The device models and the runtime-kept interrupt flag and ticks over platform `H`.
pub struct Paravirt<H> {
    pub hv: H,
    uart: Uart,
    pic: [Pic; 2],
    pit: Pit,
    /// The event vector the platform injects (0: none): IRQ0's while the PIC unmasks it.
    vector: u8,
    /// When the kernel's next tick is due (platform ns; 0: no tick programmed).
    next_tick: u64,
    /// Events the runtime delivered itself (IF came on with an event pending).
    delivered: u64,
}

/// The interrupt frame (rip, cs, rflags, rsp, ss) and handler of an event the runtime
/// delivers, read by `previrt_pv_deliver`.
#[no_mangle]
static mut previrt_pv_frame: [u64; 6] = [0; 6];

impl<H: Hypervisor> Paravirt<H> {
    pub const fn new(hv: H) -> Self {
        Paravirt {
            hv,
            uart: Uart::new(),
            pic: [Pic::new(), Pic::new()],
            pit: Pit::new(),
            vector: 0,
            next_tick: 0,
            delivered: 0,
        }
    }

    /// The configuration the kernel programmed (for the next backend after a migration).
    pub fn programmed(&self) -> Programmed {
        Programmed { pic: self.pic, pit: self.pit }
    }

    /// Take over configuration programmed under another backend, and bind it to this
    /// platform: the event vector and the tick timer are sent again.
    pub fn adopt(&mut self, p: &Programmed) {
        self.pic = p.pic;
        self.pit = p.pit;
        self.vector = 0;
        self.sync_vector();
        self.next_tick = 0;
        if self.pit.period_ns() != 0 {
            self.next_tick = self.hv.now_ns() + self.pit.period_ns();
            self.hv.backstop(BACKSTOP_NS);
        }
    }

    /// Send the UART model's buffered bytes to the platform's console.
    pub fn flush(&mut self) {
        self.hv.console(&self.uart.buf[..self.uart.len]);
        self.uart.len = 0;
    }

    /// Print why the kernel cannot go on and stop the VM (status 4, as the VMM's own stops).
    pub fn fatal(&mut self, what: fmt::Arguments) -> ! {
        self.flush();
        let _ = writeln!(self, "\n{}: FATAL: {what}", H::NAME);
        self.flush();
        self.hv.shutdown(4)
    }

    /// Tell the platform which vector to inject: IRQ0's, while the PIC is initialised and
    /// leaves IRQ0 unmasked; none otherwise.
    fn sync_vector(&mut self) {
        let m = &self.pic[0];
        let want = if m.mask & 1 == 0 && m.base >= 32 { m.base } else { 0 };
        if want != self.vector && self.hv.set_vector(want) {
            self.vector = want;
        }
    }

    /// When the kernel's next tick is due (platform ns; 0: no tick programmed).
    pub(crate) fn next_tick(&self) -> u64 {
        self.next_tick
    }

    /// A tick due now becomes pending (missed periods are skipped, as the VMMs do).
    pub(crate) fn tick(&mut self) {
        let period = self.pit.period_ns();
        if self.next_tick == 0 || period == 0 {
            return;
        }
        let now = self.hv.now_ns();
        if now >= self.next_tick {
            self.next_tick += period * ((now - self.next_tick) / period + 1);
            self.hv.raise_timer();
        }
    }

    /// isa-debug-exit: the summary, then shutdown with the status QEMU would exit with.
    fn exit(&mut self, value: u32) -> ! {
        self.flush();
        guest::site_summary(self);
        let mut line = Line([0; 256], 0);
        self.hv.summary(&mut line);
        let delivered = self.delivered;
        let _ = writeln!(self, "{}: {} delivered-by-runtime={delivered}", H::NAME, line.as_str());
        self.flush();
        self.hv.shutdown(((value & 0x7f) << 1) | 1)
    }

    /// IF is on and an event is pending: deliver it as the hardware would, through the
    /// kernel's IDT gate for the event vector (interrupt frame on the current stack, aligned
    /// to 16 bytes; no privilege change, the kernel runs at CPL 0). The stub's register frame
    /// sits right below the kernel's stack pointer, so the stub returns to
    /// `previrt_pv_deliver`, which pushes the frame from `previrt_pv_frame` and jumps.
    pub(crate) fn deliver_pending(&mut self, regs: &mut Regs) {
        if regs.rflags & rflags::IF == 0 || self.vector == 0 || !self.hv.timer_pending() {
            return;
        }
        let DescTable { limit, base } = hw::loaded_idt();
        let limit = u64::from(limit);
        let v = self.vector as u64;
        if (v + 1) * 16 > limit + 1 {
            self.fatal(format_args!("event vector {v:#x} is beyond the kernel's IDT"));
        }
        let mut g = [0u8; 16];
        hw::Hardware.read(base + v * 16, &mut g);
        if g[5] & 0x80 == 0 || g[4] & 7 != 0 {
            self.fatal(format_args!("IDT gate {v:#x} is not present or uses an IST stack (not modelled)"));
        }
        let handler = crate::emulate::gate_handler(&g);
        // SAFETY: real interrupts stay off from here to the jump into the handler.
        unsafe { previrt_pv_frame = [regs.rip, regs.cs, regs.rflags, regs.gpr[gpr::RSP], regs.ss, handler] };
        regs.rip = sym_addr!("previrt_pv_deliver");
        regs.cs = u16::from_le_bytes([g[2], g[3]]) as u64;
        let interrupt_gate = emulate::interrupt_gate(&g);
        regs.rflags &= !(rflags::TF | rflags::NT | rflags::RF | if interrupt_gate { rflags::IF } else { 0 });
        // As the platform does on injection: no further event until the kernel's IF is back.
        self.hv.set_vif(false);
        self.delivered += 1;
    }

    /// A site stub's entry: [`Paravirt::dispatch`], then, once nothing borrows the machine
    /// any more, the safe point for a requested suspend (guest/migrate.rs): a migration sets
    /// the machines up again through their own accessors, which must not alias a live
    /// `&mut` (the compiler may keep its fields in registers across the call).
    pub fn enter(machine: &Global<Self>, regs: &mut Regs) {
        // SAFETY: the stub runs with interrupts off (single vCPU); the borrow ends in here.
        let suspend = unsafe {
            let m = machine.get();
            m.dispatch(regs);
            m.hv.suspend_requested()
        };
        if suspend {
            guest::migrate::safe_point();
        }
    }

    /// A site stub's Rust half: the shared handlers over this machine, then pending events.
    pub fn dispatch(&mut self, regs: &mut Regs) {
        let Some((op, ool)) = guest::enter_site(regs) else {
            self.fatal(format_args!("call into the runtime from {:#x}, which is no site", regs.rip.wrapping_sub(5)))
        };
        if !op.is_some_and(|op| emulate::emulate(&op, regs, self)) {
            regs.rip = ool;
        }
        self.tick();
        self.deliver_pending(regs);
        regs.iret_rsp = regs.gpr[gpr::RSP];
    }
}

/// The runtime's own messages: through the UART model's line buffer to the platform console.
impl<H: Hypervisor> Write for Paravirt<H> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.uart.push(b) {
                self.flush();
            }
        }
        Ok(())
    }
}

/// A fixed buffer for one formatted line (no allocator in the runtime).
struct Line([u8; 256], usize);

impl Line {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.0[..self.1]).unwrap_or("?")
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.0.len() - self.1);
        self.0[self.1..self.1 + n].copy_from_slice(&s.as_bytes()[..n]);
        self.1 += n;
        Ok(())
    }
}

impl<H: Hypervisor> Machine for Paravirt<H> {
    fn memory(&mut self, kind: Kind, addr: u64, width: u8, store: Option<u64>) -> Option<u64> {
        self.hv.memory(kind, addr, width, store)
    }
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
                let now = self.hv.now_ns();
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
                    self.hv.ack_timer();
                    // Forward progress: when less than half a period is left at this
                    // acknowledgement, the next tick comes a period after it (ring 0 is
                    // instruction-emulated on KVM-PVM, where a handler running through sites
                    // can outlast a 1 ms period: otherwise only ticks would run). A handler
                    // that finished well in time keeps the PIT's own schedule: pushing every
                    // tick to EOI + period made each period late by the handler's time
                    // (100 ticks at 100 Hz took 1053 ms under pvm, 1168 under hv).
                    let (now, period) = (self.hv.now_ns(), self.pit.period_ns());
                    if self.next_tick != 0 && self.next_tick < now + period / 2 {
                        self.next_tick = now + period;
                    }
                }
                self.sync_vector();
            }
            Dev::PicSlave => self.pic[1].write(r, v),
            Dev::Pit => {
                let now = self.hv.now_ns();
                if self.pit.write(r, v, now).is_some() {
                    // Ticks start one period from now.
                    self.next_tick = now + self.pit.period_ns();
                    self.hv.backstop(BACKSTOP_NS);
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
            self.fatal(format_args!("the kernel halted with interrupts disabled"));
        }
        self.tick();
        if self.hv.pending() {
            return;
        }
        if self.next_tick != 0 {
            // Sleep until the kernel's next tick, then back to the backstop.
            let ns = self.next_tick.saturating_sub(self.hv.now_ns());
            self.hv.wake_in(ns);
            self.hv.block();
            self.hv.backstop(BACKSTOP_NS);
            self.tick();
        } else {
            self.hv.block();
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
        self.hv.set_vif(on);
    }
}

// Entered from a site stub's iretq with the interrupted RSP and every GPR, interrupts off; the
// arithmetic flags it changes are not the interrupted code's (those are in the frame).
core::arch::global_asm!(
    r#"
    .section .text.previrt_pv, "ax", @progbits
    .globl previrt_pv_deliver
previrt_pv_deliver:
    andq $-16, %rsp
    pushq previrt_pv_frame+32(%rip)
    pushq previrt_pv_frame+24(%rip)
    pushq previrt_pv_frame+16(%rip)
    pushq previrt_pv_frame+8(%rip)
    pushq previrt_pv_frame(%rip)
    jmpq *previrt_pv_frame+40(%rip)
    .text
"#,
    options(att_syntax, raw)
);
