//! The Xen-compatible personality (`--abi xen`): what a PVH guest started as the initial
//! domain needs from Xen, on the same VMM. Numbers and layouts follow Xen's public headers
//! (xen/include/public/{xen,version,sched,hvm/hvm_op,hvm/params,memory,event_channel}.h).
//!
//! Hypercall arguments that are pointers are guest *linear* addresses (Xen HVM convention);
//! they are translated through the guest's page tables by the caller-supplied translator.

use std::io::Write;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::ConsoleOut;
use crate::emulate::{read_linear_with, write_linear_with, Translate};
use crate::pv::Outcome;

/// Xen 4.17, as CPUID leaf 0x40000001 reports it.
pub const XEN_VERSION: u32 = (4 << 16) | 17;
/// hvm_start_info.flags bit: this domain is the initial domain (xen.h SIF_INITDOMAIN). The
/// personality presents the guest as dom0: no xenstore or PV console to look for.
pub const SIF_INITDOMAIN: u32 = 1 << 1;
/// MSR a Xen HVM guest writes its hypercall page address to (CPUID 0x40000002.ebx).
pub const MSR_HYPERCALL: u32 = 0x4000_0000;

/// Xen error codes (negated errno values of xen/include/public/errno.h).
mod xerr {
    pub const EPERM: i64 = -1;
    pub const EFAULT: i64 = -14;
    pub const EINVAL: i64 = -22;
    pub const ENOSYS: i64 = -38;
}

/// Hypercall numbers we answer (xen.h), with names for the accounting. Others get -ENOSYS.
const HYPERCALLS: [(u64, &str); 10] = [
    (12, "memory_op"),
    (20, "grant_table_op"),
    (17, "xen_version"),
    (18, "console_io"),
    (24, "vcpu_op"),
    (29, "sched_op"),
    (32, "event_channel_op"),
    (33, "physdev_op"),
    (34, "hvm_op"),
    (6, "sched_op_compat"),
];

pub fn name(nr: u64) -> &'static str {
    HYPERCALLS.iter().find(|(n, _)| *n == nr).map(|(_, s)| *s).unwrap_or("unknown")
}

/// SCHEDOP_shutdown reasons (sched.h) → `previrt run` exit status: poweroff is success.
const SHUTDOWN_STATUS: [(u32, i32, &str); 5] =
    [(0, 0, "poweroff"), (1, 1, "reboot"), (2, 2, "suspend"), (3, 3, "crash"), (4, 4, "watchdog")];

pub struct Xen {
    console: ConsoleOut,
    hypercall_msr: u64,
}

impl Xen {
    pub fn new(console: ConsoleOut) -> Xen {
        Xen { console, hypercall_msr: 0 }
    }

    /// CPUID leaves 0x40000000..=0x40000004 as Xen reports them to an HVM guest.
    pub fn cpuid(&self) -> [(u32, u32, u32, u32, u32); 5] {
        let s = b"XenVMMXenVMM";
        let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        [
            (0x4000_0000, 0x4000_0004, w(0), w(4), w(8)),
            (0x4000_0001, XEN_VERSION, 0, 0, 0),
            // One hypercall page, installed through MSR_HYPERCALL.
            (0x4000_0002, 1, MSR_HYPERCALL, 0, 0),
            (0x4000_0003, 0, 0, 0, 0),
            (0x4000_0004, 0, 0, 0, 0),
        ]
    }

    pub fn rdmsr(&self, index: u32) -> Option<u64> {
        (index == MSR_HYPERCALL).then_some(self.hypercall_msr)
    }

    /// The hypercall page MSR: value = page GPA | page index (only index 0 exists).
    pub fn wrmsr(&mut self, mem: &GuestMemoryMmap, index: u32, value: u64) -> Option<bool> {
        if index != MSR_HYPERCALL {
            return None;
        }
        let gpa = value & !0xfff;
        if value & 0xfff != 0 || !mem.check_range(GuestAddress(gpa), 4096) {
            return Some(false);
        }
        let page: Vec<u8> = (0..128u32).flat_map(previrt_hv_abi::port_stub).collect();
        self.hypercall_msr = value;
        Some(mem.write_slice(&page, GuestAddress(gpa)).is_ok())
    }

    /// Dispatch Xen hypercall `nr` with its five arguments; `bits64`: the guest runs 64-bit
    /// code (C `long` and `xen_pfn_t` are 8 bytes, else 4).
    pub fn hypercall(&mut self, mem: &GuestMemoryMmap, nr: u64, a: [u64; 5], bits64: bool, tr: Translate) -> Outcome {
        let g = Guest { mem, tr, long: if bits64 { 8 } else { 4 } };
        let r = match nr {
            17 => self.xen_version(&g, a[0], a[1]),
            18 => self.console_io(&g, a[0], a[1], a[2]),
            29 => return sched_op(&g, a[0], a[1]),
            6 => return sched_op_compat(a[0], a[1]),
            34 => hvm_op(&g, a[0], a[1]),
            12 => memory_op(&g, a[0], a[1]),
            _ => xerr::ENOSYS,
        };
        Outcome::Ret(r)
    }

    fn xen_version(&self, g: &Guest, cmd: u64, arg: u64) -> i64 {
        match cmd {
            0 => XEN_VERSION as i64,
            // XENVER_extraversion: char[16].
            1 => g.write(arg, &pad::<16>(b".0-previrt")),
            // XENVER_compile_info: compiler[64], compile_by[16], compile_domain[32], date[32].
            2 => {
                let mut b = Vec::new();
                b.extend_from_slice(&pad::<64>(b"rustc"));
                b.extend_from_slice(&pad::<16>(b"previrt"));
                b.extend_from_slice(&pad::<32>(b"previrt"));
                b.extend_from_slice(&pad::<32>(b"n/a"));
                g.write(arg, &b)
            }
            // XENVER_capabilities: char[1024].
            3 => g.write(arg, &pad::<1024>(b"hvm-3.0-x86_64 hvm-3.0-x86_32p")),
            // XENVER_changeset: char[64].
            4 => g.write(arg, &pad::<64>(b"previrt")),
            // XENVER_platform_parameters: { unsigned long virt_start; }.
            5 => g.write(arg, &0xffff_8000_0000_0000u64.to_le_bytes()[8 - g.long..]),
            // XENVER_get_features: { uint submap_idx; uint32 submap; }.
            6 => match g.read::<4>(arg) {
                Some(_) => g.write(arg + 4, &0u32.to_le_bytes()),
                None => xerr::EFAULT,
            },
            // XENVER_pagesize.
            7 => 4096,
            // XENVER_guest_handle: xen_domain_handle_t (16 bytes).
            8 => g.write(arg, &[0u8; 16]),
            _ => xerr::ENOSYS,
        }
    }

    fn console_io(&mut self, g: &Guest, cmd: u64, count: u64, buf: u64) -> i64 {
        const CONSOLEIO_WRITE: u64 = 0;
        const CONSOLEIO_READ: u64 = 1;
        match cmd {
            CONSOLEIO_WRITE => {
                if count > 64 * 1024 {
                    return xerr::EINVAL;
                }
                let mut b = vec![0u8; count as usize];
                if !g.read_into(buf, &mut b) {
                    return xerr::EFAULT;
                }
                let _ = self.console.write_all(&b);
                0
            }
            CONSOLEIO_READ => 0,
            _ => xerr::EINVAL,
        }
    }
}

fn pad<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut b = [0u8; N];
    let n = s.len().min(N - 1);
    b[..n].copy_from_slice(&s[..n]);
    b
}

fn shutdown(reason: u64) -> Outcome {
    match SHUTDOWN_STATUS.iter().find(|(r, _, _)| *r as u64 == reason) {
        Some(&(_, status, _)) => Outcome::Shutdown(status),
        None => Outcome::Ret(xerr::EINVAL),
    }
}

fn sched_op(g: &Guest, cmd: u64, arg: u64) -> Outcome {
    const YIELD: u64 = 0;
    const BLOCK: u64 = 1;
    const SHUTDOWN: u64 = 2;
    match cmd {
        YIELD | BLOCK => {
            std::thread::yield_now();
            Outcome::Ret(0)
        }
        SHUTDOWN => match g.read::<4>(arg) {
            Some(r) => shutdown(u32::from_le_bytes(r) as u64),
            None => Outcome::Ret(xerr::EFAULT),
        },
        _ => Outcome::Ret(xerr::ENOSYS),
    }
}

/// sched_op_compat (6): the pre-3.0.2 form, argument by value.
fn sched_op_compat(cmd: u64, arg: u64) -> Outcome {
    match cmd {
        0 | 1 => Outcome::Ret(0),
        2 => shutdown(arg),
        _ => Outcome::Ret(xerr::ENOSYS),
    }
}

fn hvm_op(g: &Guest, cmd: u64, arg: u64) -> i64 {
    const HVMOP_SET_PARAM: u64 = 0;
    const HVMOP_GET_PARAM: u64 = 1;
    // struct xen_hvm_param { domid_t domid; uint32_t index; uint64_t value; } (16 bytes).
    let Some(p) = g.read::<16>(arg) else { return xerr::EFAULT };
    let index = u32::from_le_bytes(p[4..8].try_into().unwrap());
    match cmd {
        // No parameter is backed by anything: no xenstore, no PV console ring, no callback.
        HVMOP_GET_PARAM if index < 64 => {
            let _ = g.write(arg + 8, &0u64.to_le_bytes());
            xerr::EINVAL
        }
        HVMOP_SET_PARAM if index < 64 => xerr::EPERM,
        _ => xerr::EINVAL,
    }
}

fn memory_op(g: &Guest, cmd: u64, arg: u64) -> i64 {
    const XENMEM_ADD_TO_PHYSMAP: u64 = 7;
    const XENMAPSPACE_SHARED_INFO: u32 = 0;
    const XENMAPSPACE_GRANT_TABLE: u32 = 1;
    const GRANT_FRAMES: u64 = 32;
    if cmd != XENMEM_ADD_TO_PHYSMAP {
        return xerr::ENOSYS;
    }
    // struct xen_add_to_physmap { domid_t domid; uint16_t size; unsigned int space;
    //                             xen_ulong_t idx; xen_pfn_t gpfn; }: 24 bytes for 64-bit
    // guests, 16 for 32-bit ones (xen_ulong_t and xen_pfn_t are 4 bytes there).
    let mut p = [0u8; 24];
    if !g.read_into(arg, &mut p[..8 + 2 * g.long]) {
        return xerr::EFAULT;
    }
    let space = u32::from_le_bytes(p[4..8].try_into().unwrap());
    let field = |at: usize| {
        let mut v = [0u8; 8];
        v[..g.long].copy_from_slice(&p[at..at + g.long]);
        u64::from_le_bytes(v)
    };
    let (idx, gpfn) = (field(8), field(8 + g.long));
    match (space, idx) {
        (XENMAPSPACE_SHARED_INFO, 0) | (XENMAPSPACE_GRANT_TABLE, 0..GRANT_FRAMES) => {}
        _ => return xerr::EINVAL,
    }
    // Zeroes are a valid, quiet shared_info (no events pending, no wallclock) and an empty
    // grant-table frame (v1, no grants).
    let Some(gpa) = gpfn.checked_mul(4096) else { return xerr::EINVAL };
    match g.mem.write_slice(&[0u8; 4096], GuestAddress(gpa)) {
        Ok(()) => 0,
        Err(_) => xerr::EINVAL,
    }
}

/// Guest memory seen through linear addresses.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    tr: Translate<'a>,
    /// Size of C `long` in the guest: 8 or 4.
    long: usize,
}

impl Guest<'_> {
    fn read_into(&self, la: u64, buf: &mut [u8]) -> bool {
        read_linear_with(self.mem, self.tr, la, buf) == buf.len()
    }

    fn read<const N: usize>(&self, la: u64) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        self.read_into(la, &mut b).then_some(b)
    }

    /// Write `data` at linear `la`; 0 or -EFAULT.
    fn write(&self, la: u64, data: &[u8]) -> i64 {
        if write_linear_with(self.mem, self.tr, la, data) {
            0
        } else {
            xerr::EFAULT
        }
    }
}
