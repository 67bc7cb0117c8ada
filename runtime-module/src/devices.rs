//! In-guest models of the PC devices the kernel programs, so its port I/O becomes function
//! calls under a paravirtual backend (Xen PV, the in-tree hypervisor's `hv`): 8250 UART
//! (output buffered per line for the platform's console), 8259 PIC pair (the timer vector,
//! IRQ0's mask, EOIs), 8254 PIT channel 0 (the tick period and a readable counter), the local
//! APIC's register page, and the MSRs a kernel touches. Platform-neutral: each backend maps
//! the models' results onto its own hypercalls.

/// Which model a port belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dev {
    Uart,
    PicMaster,
    PicSlave,
    Pit,
    /// isa-debug-exit: the run's verdict.
    DebugExit,
}

/// Port ranges: first port, count, model.
pub const PORTS: &[(u16, u16, Dev)] = &[
    (0x3f8, 8, Dev::Uart),
    (0x20, 2, Dev::PicMaster),
    (0xa0, 2, Dev::PicSlave),
    (0x40, 4, Dev::Pit),
    (0xf4, 1, Dev::DebugExit),
];

/// The model owning `port` and the register offset within it.
pub fn device(port: u16) -> Option<(Dev, u16)> {
    PORTS.iter().find(|(p, n, _)| port >= *p && port < p + n).map(|(p, _, d)| (*d, port - p))
}

/// 8250 UART: transmit only; bytes are buffered and written to the console per line.
pub struct Uart {
    lcr: u8,
    pub buf: [u8; 256],
    pub len: usize,
}

const UART_THR: u16 = 0;
const UART_LCR: u16 = 3;
const UART_LSR: u16 = 5;
const LCR_DLAB: u8 = 0x80;
/// Transmitter holding register and shift register empty: output never waits.
const LSR_IDLE: u8 = 0x60;

impl Uart {
    pub const fn new() -> Uart {
        Uart { lcr: 0, buf: [0; 256], len: 0 }
    }
    /// A register write; true when the buffer should be flushed (a full line or no room).
    pub fn write(&mut self, reg: u16, v: u8) -> bool {
        match reg {
            UART_THR if self.lcr & LCR_DLAB == 0 => self.push(v),
            UART_LCR => {
                self.lcr = v;
                false
            }
            _ => false,
        }
    }
    /// Buffer one output byte (the kernel's through the data register, or the runtime's own
    /// messages); true when the buffer should be flushed.
    pub fn push(&mut self, v: u8) -> bool {
        self.buf[self.len] = v;
        self.len += 1;
        v == b'\n' || self.len == self.buf.len()
    }
    pub fn read(&self, reg: u16) -> u8 {
        match reg {
            UART_LSR => LSR_IDLE,
            UART_LCR => self.lcr,
            _ => 0,
        }
    }
}

/// One 8259: the initialization sequence (ICW1–ICW4) gives the vector base, the data port
/// outside it the interrupt mask. EOIs need no model (delivery is edge-like: one event, one
/// vector); the in-service register reads as empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pic {
    pub base: u8,
    pub mask: u8,
    /// ICW words still expected after ICW1 (2, 3, 4), 0 when initialized.
    expect: u8,
    icw4: bool,
}

impl Pic {
    pub const fn new() -> Pic {
        Pic { base: 0x08, mask: 0xff, expect: 0, icw4: false }
    }
    pub fn write(&mut self, reg: u16, v: u8) {
        match (reg, self.expect) {
            (0, _) if v & 0x10 != 0 => {
                self.expect = 2;
                self.icw4 = v & 1 != 0;
            }
            (0, _) => {} // OCW2 (EOI) / OCW3 (read ISR/IRR)
            (_, 2) => {
                self.base = v & 0xf8;
                self.expect = 3;
            }
            (_, 3) => self.expect = if self.icw4 { 4 } else { 0 },
            (_, 4) => self.expect = 0,
            _ => self.mask = v,
        }
    }
    /// True when a write of `v` to register `reg` is an end-of-interrupt for `irq` (OCW2:
    /// bits 4:3 clear, EOI bit 5; non-specific, or specific naming `irq`). Backends whose events
    /// stay pending until acknowledged (`hv`) take this as the acknowledgement.
    pub fn is_eoi(reg: u16, v: u8, irq: u8) -> bool {
        reg == 0 && v & 0x18 == 0 && v & 0x20 != 0 && (v & 0x40 == 0 || v & 7 == irq)
    }
    pub fn read(&self, reg: u16) -> u8 {
        if reg == 1 {
            self.mask
        } else {
            0
        }
    }
}

/// 8254 channel 0: the divisor the kernel programs sets the tick period; a latched read
/// returns a count in [1, divisor] derived from system time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pit {
    pub divisor: u32,
    /// Low byte of a divisor being written (lo/hi access mode).
    low: Option<u8>,
    latched: Option<u16>,
    high_next: bool,
}

pub const PIT_HZ: u64 = 1_193_182;

/// What the kernel programmed into the PIC pair and the PIT: handed from one backend to the
/// next when a migration changes the backend (guest/migrate.rs), so the new one binds the
/// kernel's configuration to its platform (hypercalls, or the real devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Programmed {
    pub pic: [Pic; 2],
    pub pit: Pit,
}

impl Pit {
    pub const fn new() -> Pit {
        Pit { divisor: 0, low: None, latched: None, high_next: false }
    }
    /// A register write; returns the new divisor when one was completed.
    pub fn write(&mut self, reg: u16, v: u8, now_ns: u64) -> Option<u32> {
        match reg {
            3 if v >> 6 == 0 && (v >> 4) & 3 == 0 => {
                // Counter latch of channel 0.
                self.latched = Some(self.count(now_ns));
                self.high_next = false;
                None
            }
            3 => {
                self.low = None;
                None
            }
            0 => match self.low.take() {
                None => {
                    self.low = Some(v);
                    None
                }
                Some(lo) => {
                    let d = lo as u32 | (v as u32) << 8;
                    self.divisor = if d == 0 { 0x10000 } else { d };
                    Some(self.divisor)
                }
            },
            _ => None,
        }
    }
    pub fn read(&mut self, reg: u16, now_ns: u64) -> u8 {
        if reg != 0 {
            return 0;
        }
        let c = self.latched.unwrap_or_else(|| self.count(now_ns));
        let b = if self.high_next { (c >> 8) as u8 } else { c as u8 };
        if self.high_next {
            self.latched = None;
        }
        self.high_next = !self.high_next;
        b
    }
    fn count(&self, now_ns: u64) -> u16 {
        let d = self.divisor.max(1) as u64;
        let ticks = now_ns.wrapping_mul(PIT_HZ / 1000) / 1_000_000;
        (d - ticks % d).min(0xffff) as u16
    }
    /// The tick period in nanoseconds.
    pub fn period_ns(&self) -> u64 {
        self.divisor as u64 * 1_000_000_000 / PIT_HZ
    }
}

/// The local APIC as a register page: the kernel's mapping of 0xfee00000 is backed by this
/// page, so ID and version read as set at boot and TPR-style registers read back what was
/// written. Registers with side effects (EOI, ICR, the APIC timer) have none under Xen PV.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
pub const LAPIC_ID: usize = 0x20 / 4;
pub const LAPIC_VERSION: usize = 0x30 / 4;
/// Version 0x14 (integrated xAPIC), 6 LVT entries.
pub const LAPIC_VERSION_VALUE: u32 = 0x0005_0014;

/// MSRs the runtime answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msr {
    /// IA32_APIC_BASE: the modelled LAPIC, enabled, xAPIC, bootstrap processor.
    ApicBase,
    /// IA32_KERNEL_GS_BASE: Xen's "user" GS base (set_segment_base SEGBASE_GS_USER).
    KernelGsBase,
}

pub const MSRS: &[(u32, Msr)] = &[(0x1b, Msr::ApicBase), (0xc000_0102, Msr::KernelGsBase)];
pub const APIC_BASE_VALUE: u64 = LAPIC_BASE | 1 << 11 | 1 << 8;

pub fn msr(n: u32) -> Option<Msr> {
    MSRS.iter().find(|(m, _)| *m == n).map(|(_, k)| *k)
}
