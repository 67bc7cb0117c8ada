//! Port-I/O devices emulated in user space: the 8250 UART on COM1 (vm-superio), QEMU's
//! isa-debug-exit on 0xf4, and everything else ignored (reads return all ones, like an empty
//! ISA bus). The PIC and PIT live in KVM when the host offers them.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The console: where the UART and the paravirtual console rings write. Cloneable; every
/// clone writes to the same sink (the I/O thread draining doorbells shares it).
#[derive(Clone)]
pub struct ConsoleOut(Arc<Mutex<Box<dyn Write + Send>>>);

impl ConsoleOut {
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        ConsoleOut(Arc::new(Mutex::new(w)))
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(buf)?;
        if buf.contains(&b'\n') {
            w.flush()?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// Raises the UART's interrupt line through an irqfd (GSI 4).
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub const COM1: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const DEBUG_EXIT: u16 = 0xf4;

/// What a port access asks of the run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEffect {
    None,
    /// isa-debug-exit: stop with this process exit status.
    Exit(i32),
}

#[derive(Clone, Copy)]
enum Dev {
    Serial,
    DebugExit,
}

/// Port ranges with a device behind them: (first, count, device).
const PORTS: [(u16, u16, Dev); 2] = [(COM1, 8, Dev::Serial), (DEBUG_EXIT, 4, Dev::DebugExit)];

fn lookup(port: u16) -> Option<(u16, Dev)> {
    PORTS.iter().find(|(b, n, _)| port >= *b && port < b + n).map(|&(b, _, d)| (port - b, d))
}

/// The port-I/O bus.
pub struct PortBus {
    serial: Serial<IrqLine, NoEvents, ConsoleOut>,
}

impl PortBus {
    pub fn new(irq: IrqLine, out: ConsoleOut) -> Self {
        PortBus { serial: Serial::new(irq, out) }
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> PortEffect {
        match lookup(port) {
            Some((off, Dev::Serial)) => {
                // A failed interrupt trigger or console write must not stop the guest.
                let _ = self.serial.write(off as u8, data[0]);
                PortEffect::None
            }
            Some((_, Dev::DebugExit)) => {
                let mut v = [0u8; 4];
                v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                PortEffect::Exit(((u32::from_le_bytes(v) << 1) | 1) as i32)
            }
            None => PortEffect::None,
        }
    }

    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match lookup(port) {
            Some((off, Dev::Serial)) => {
                data.fill(0);
                data[0] = self.serial.read(off as u8);
            }
            _ => data.fill(0xff),
        }
    }

    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}
