//! The hardware [`Machine`]: the real privileged instructions, for backends running at CPL 0
//! on real or fully virtualized hardware (`trace`).

use crate::emulate::{DescTable, Machine};
use core::arch::asm;

pub struct Hardware;

/// Page-table pages the runtime may need to map itself into a kernel's address space.
const POOL_PAGES: usize = 8;
#[repr(C, align(4096))]
struct Pool([[u64; 512]; POOL_PAGES]);
static POOL: super::Global<(Pool, usize)> =
    super::Global(core::cell::UnsafeCell::new((Pool([[0; 512]; POOL_PAGES]), 0)));

const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const HUGE: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Make sure the address space rooted at `cr3` maps the runtime (its handlers and data), so
/// that routed sites keep working after the kernel switches to page tables of its own that
/// map only its image. Missing 4 KiB entries are filled in; missing intermediate tables come
/// from a small static pool. Applies to identity-mapped kernels (virt = phys), whose page
/// tables are reachable at their physical addresses; kernels linked high map the runtime with
/// their image window (docs/runtime-entry.md).
pub(crate) unsafe fn map_runtime(cr3: u64) {
    if super::link_value!("__previrt_virt_delta") != 0 {
        return;
    }
    let (pool, used) = POOL.get();
    let start = super::link_value!("__previrt_runtime_start");
    let end = super::link_value!("__previrt_runtime_end");
    for va in (start..end).step_by(4096) {
        let mut table = (cr3 & ADDR) as *mut u64;
        for shift in [39u32, 30, 21, 12] {
            let entry = table.add(((va >> shift) & 511) as usize);
            let e = entry.read_volatile();
            if shift == 12 {
                if e & PRESENT == 0 {
                    entry.write_volatile(va | PRESENT | WRITABLE);
                }
                break;
            }
            if e & PRESENT != 0 && e & HUGE != 0 {
                break;
            }
            if e & PRESENT == 0 {
                let Some(page) = pool.0.get_mut(*used) else { return };
                *used += 1;
                entry.write_volatile(page.as_mut_ptr() as u64 | PRESENT | WRITABLE);
            }
            table = (entry.read_volatile() & ADDR) as *mut u64;
        }
    }
}

pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn inb(port: u16) -> u8 {
    Hardware.port_in(port, 1) as u8
}

pub fn outb(port: u16, v: u8) {
    Hardware.port_out(port, 1, v as u32)
}

/// The GDT register as the CPU holds it (`sgdt`, which runs natively or traps but never
/// faults).
pub fn loaded_gdt() -> DescTable {
    let mut b = [0u8; 10];
    // SAFETY: stores the GDT register into the buffer.
    unsafe { asm!("sgdt [{}]", in(reg) b.as_mut_ptr(), options(nostack, preserves_flags)) };
    DescTable::from_image(&b)
}

/// The IDT register as the CPU holds it (`sidt`).
pub fn loaded_idt() -> DescTable {
    let mut b = [0u8; 10];
    // SAFETY: stores the IDT register into the buffer.
    unsafe { asm!("sidt [{}]", in(reg) b.as_mut_ptr(), options(nostack, preserves_flags)) };
    DescTable::from_image(&b)
}

// SAFETY (all asm below): the runtime runs at CPL 0 and performs exactly the operation the
// kernel's own instruction at the site would have performed.
impl Machine for Hardware {
    fn read(&mut self, addr: u64, buf: &mut [u8]) {
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) }
    }
    fn write(&mut self, addr: u64, buf: &[u8]) {
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), addr as *mut u8, buf.len()) }
    }
    fn port_in(&mut self, port: u16, width: u8) -> u32 {
        let v: u32;
        unsafe {
            match width {
                1 => asm!("in al, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags)),
                2 => asm!("in ax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags)),
                _ => asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags)),
            }
        }
        v & match width {
            1 => 0xff,
            2 => 0xffff,
            _ => u32::MAX,
        }
    }
    fn port_out(&mut self, port: u16, width: u8, value: u32) {
        unsafe {
            match width {
                1 => asm!("out dx, al", in("eax") value, in("dx") port, options(nomem, nostack, preserves_flags)),
                2 => asm!("out dx, ax", in("eax") value, in("dx") port, options(nomem, nostack, preserves_flags)),
                _ => asm!("out dx, eax", in("eax") value, in("dx") port, options(nomem, nostack, preserves_flags)),
            }
        }
    }
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpuid(leaf, subleaf)
    }
    fn rdmsr(&mut self, msr: u32) -> u64 {
        let (lo, hi): (u32, u32);
        unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
        ((hi as u64) << 32) | lo as u64
    }
    fn wrmsr(&mut self, msr: u32, value: u64) {
        unsafe {
            asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
        };
    }
    fn read_cr(&mut self, n: u8) -> u64 {
        let v: u64;
        unsafe {
            match n {
                0 => asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)),
                2 => asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)),
                3 => asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)),
                4 => asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)),
                8 => asm!("mov {}, cr8", out(reg) v, options(nomem, nostack, preserves_flags)),
                _ => v = 0,
            }
        }
        v
    }
    fn write_cr(&mut self, n: u8, v: u64) {
        unsafe {
            match n {
                0 => asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)),
                2 => asm!("mov cr2, {}", in(reg) v, options(nostack, preserves_flags)),
                3 => {
                    map_runtime(v);
                    asm!("mov cr3, {}", in(reg) v, options(nostack, preserves_flags))
                }
                4 => asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)),
                8 => asm!("mov cr8, {}", in(reg) v, options(nostack, preserves_flags)),
                _ => {}
            }
        }
    }
    fn invlpg(&mut self, addr: u64) {
        unsafe { asm!("invlpg [{}]", in(reg) addr, options(nostack, preserves_flags)) };
    }
    fn halt(&mut self, interrupts: bool) {
        // The stub runs with IF=0; `sti; hlt` is atomic (interrupt shadow), so a wakeup
        // between the check and the halt is not lost. The interrupt is taken here.
        unsafe {
            if interrupts {
                asm!("sti", "hlt", "cli", options(nomem, nostack));
            } else {
                asm!("hlt", options(nomem, nostack, preserves_flags));
            }
        }
    }
    fn load_gdt(&mut self, t: DescTable) {
        let img = t.image();
        unsafe { asm!("lgdt [{}]", in(reg) img.as_ptr(), options(readonly, nostack, preserves_flags)) };
    }
    fn load_idt(&mut self, t: DescTable) {
        let img = t.image();
        unsafe { asm!("lidt [{}]", in(reg) img.as_ptr(), options(readonly, nostack, preserves_flags)) };
    }
    fn load_tr(&mut self, selector: u16) {
        unsafe { asm!("ltr {:x}", in(reg) selector, options(nomem, nostack, preserves_flags)) };
    }
}
