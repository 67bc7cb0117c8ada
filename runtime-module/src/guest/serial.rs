//! COM1 (8250) polled output for the runtime's own messages.

use super::hw::{inb, outb};

const COM1: u16 = 0x3f8;

/// 115200 8N1, FIFO on, interrupts off (the kernel programs the port again as it likes).
pub fn init() {
    for (reg, v) in [(1, 0x00), (3, 0x80), (0, 0x01), (1, 0x00), (3, 0x03), (2, 0xc7), (4, 0x03)] {
        outb(COM1 + reg, v);
    }
}

pub struct Com1;

impl core::fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            // Transmit holding register empty.
            while inb(COM1 + 5) & 0x20 == 0 {}
            outb(COM1, b);
        }
        Ok(())
    }
}
