//! Port-I/O devices emulated in user space: the 8250 UART on COM1 (vm-superio), QEMU's
//! isa-debug-exit on 0xf4, a read-only RTC/CMOS on 0x70, and everything else ignored (reads return all ones, like an empty
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

    /// Push everything written so far to the sink (end of run).
    pub fn sync(&self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
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
    /// A no-op: the UART model flushes after every byte, which on a pipe costs a reader
    /// wake-up per byte (~200 µs each here). Output goes out per line instead (see `write`)
    /// and at the end of the run ([`ConsoleOut::sync`]).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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

pub const CMOS: u16 = 0x70;

#[derive(Clone, Copy)]
enum Dev {
    Serial,
    DebugExit,
    Cmos,
}

/// Port ranges with a device behind them: (first, count, device).
const PORTS: [(u16, u16, Dev); 3] = [(COM1, 8, Dev::Serial), (DEBUG_EXIT, 4, Dev::DebugExit), (CMOS, 2, Dev::Cmos)];

fn lookup(port: u16) -> Option<(u16, Dev)> {
    PORTS.iter().find(|(b, n, _)| port >= *b && port < b + n).map(|&(b, _, d)| (port - b, d))
}

/// The MC146818 RTC/CMOS as far as kernels read it at boot: the time of day (host UTC, BCD,
/// 24-hour), status registers saying "no update in progress, battery good", zeros elsewhere.
/// Writes only select the index (kernels that set the clock are ignored). Without it a read
/// returns all ones, whose update-in-progress bit makes kernels poll forever.
#[derive(Default)]
struct Cmos {
    index: u8,
}

impl Cmos {
    fn read(&self, now_unix: u64) -> u8 {
        let bcd = |v: u64| (((v / 10) << 4) | (v % 10)) as u8;
        let days = now_unix / 86_400;
        let secs = now_unix % 86_400;
        let (y, m, d) = civil_from_days(days as i64);
        match self.index & 0x7f {
            0x00 => bcd(secs % 60),
            0x02 => bcd(secs / 60 % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd((days + 4) % 7 + 1),
            0x07 => bcd(d),
            0x08 => bcd(m),
            0x09 => bcd(y % 100),
            0x32 => bcd(y / 100),
            0x0a => 0x26,
            0x0b => 0x02,
            0x0d => 0x80,
            _ => 0,
        }
    }
}

/// Gregorian (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (u64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    (y as u64, m as u64, d as u64)
}

/// The port-I/O bus.
pub struct PortBus {
    serial: Serial<IrqLine, NoEvents, ConsoleOut>,
    cmos: Cmos,
}

impl PortBus {
    pub fn new(irq: IrqLine, out: ConsoleOut) -> Self {
        PortBus { serial: Serial::new(irq, out), cmos: Cmos::default() }
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> PortEffect {
        match lookup(port) {
            Some((off, Dev::Serial)) => {
                // A failed interrupt trigger or console write must not stop the guest.
                let _ = self.serial.write(off as u8, data[0]);
                PortEffect::None
            }
            Some((0, Dev::Cmos)) => {
                self.cmos.index = data[0];
                PortEffect::None
            }
            Some((_, Dev::Cmos)) => PortEffect::None,
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
            Some((1, Dev::Cmos)) => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                data.fill(0);
                data[0] = self.cmos.read(now);
            }
            _ => data.fill(0xff),
        }
    }

    pub fn flush(&mut self) {
        let _ = self.serial.writer().sync();
    }

    /// UART registers and receive FIFO, and the CMOS index, for a snapshot (the format is in
    /// docs/snapshot.md, section Uart).
    pub fn save_state(&self) -> Vec<u8> {
        let s = self.serial.state();
        let mut b = vec![
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
            self.cmos.index,
        ];
        b.extend_from_slice(&s.in_buffer);
        b
    }

    /// The inverse of [`PortBus::save_state`]; Err: malformed state.
    pub fn restore_state(&mut self, b: &[u8]) -> Result<(), String> {
        let [bl, bh, ie, ii, lc, ls, mc, ms, sc, cmos, rest @ ..] = b else {
            return Err(format!("UART state of {} bytes is too short", b.len()));
        };
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: *bl,
            baud_divisor_high: *bh,
            interrupt_enable: *ie,
            interrupt_identification: *ii,
            line_control: *lc,
            line_status: *ls,
            modem_control: *mc,
            modem_status: *ms,
            scratch: *sc,
            in_buffer: rest.to_vec(),
        };
        let irq = IrqLine(self.serial.interrupt_evt().0.try_clone().map_err(|e| e.to_string())?);
        self.serial = Serial::from_state(&s, irq, NoEvents, self.serial.writer().clone())
            .map_err(|e| format!("UART state: {e:?}"))?;
        self.cmos.index = *cmos;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_596), (2026, 5, 23));
    }

    #[test]
    fn cmos_time_is_bcd_and_never_updating() {
        let mut c = Cmos::default();
        // 2026-05-23 12:34:56 UTC.
        let t = 20_596 * 86_400 + 12 * 3600 + 34 * 60 + 56;
        let mut at = |i: u8| {
            c.index = i;
            c.read(t)
        };
        assert_eq!([at(4), at(2), at(0)], [0x12, 0x34, 0x56]);
        assert_eq!([at(9), at(8), at(7), at(0x32)], [0x26, 0x05, 0x23, 0x20]);
        assert_eq!(at(0x0a) & 0x80, 0, "update in progress must read clear");
        assert_eq!(at(0x8a) & 0x80, 0, "bit 7 of the index is the NMI mask, not part of it");
    }
}
