//! The page-table pages direct mode holds as Xen's tables (xen/direct.rs): their frames and
//! levels in the order they were adopted (an adoption round walks the pages it added), with a
//! hash index by frame, because every `pt_read`/`pt_write` site asks whether its page is one.
//! No allocation: fixed capacity, open addressing with linear probing, at most half full.

/// Most table pages (the kernel's and the runtime's own together).
pub const CAPACITY: usize = 1024;
/// Index slots: a power of two, twice the capacity (probe chains stay short).
const SLOTS: usize = 2 * CAPACITY;
const SLOT_BITS: u32 = SLOTS.trailing_zeros();
const _: () = assert!(SLOTS.is_power_of_two() && CAPACITY < u16::MAX as usize);

pub struct Tables {
    /// (pseudo-physical frame, level), in adoption order.
    list: [(u64, u8); CAPACITY],
    len: usize,
    /// 1 + the list position of the frame hashed here (0: empty).
    slots: [u16; SLOTS],
}

/// The table is full (CAPACITY pages).
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// Fibonacci hashing of the frame number to a slot.
fn home(pfn: u64) -> usize {
    (pfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOT_BITS)) as usize
}

impl Tables {
    pub const fn new() -> Tables {
        Tables { list: [(0, 0); CAPACITY], len: 0, slots: [0; SLOTS] }
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`th page adopted: (frame, level).
    pub fn at(&self, i: usize) -> (u64, u8) {
        self.list[i]
    }

    /// Where frame `pfn` is in the adoption order, and its level, if it is a table.
    pub fn find(&self, pfn: u64) -> Option<(usize, u8)> {
        let mut s = home(pfn);
        loop {
            let i = self.slots[s] as usize;
            if i == 0 {
                return None;
            }
            if self.list[i - 1].0 == pfn {
                return Some((i - 1, self.list[i - 1].1));
            }
            s = (s + 1) % SLOTS;
        }
    }

    /// Add frame `pfn` (not held yet) at `level`; its position in the adoption order.
    pub fn push(&mut self, pfn: u64, level: u8) -> Result<usize, Full> {
        if self.len == CAPACITY {
            return Err(Full);
        }
        let mut s = home(pfn);
        while self.slots[s] != 0 {
            s = (s + 1) % SLOTS;
        }
        self.list[self.len] = (pfn, level);
        self.len += 1;
        self.slots[s] = self.len as u16;
        Ok(self.len - 1)
    }
}

impl Default for Tables {
    fn default() -> Tables {
        Tables::new()
    }
}
