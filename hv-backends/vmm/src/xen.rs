//! The Xen-compatible personality (`--abi xen`, `--abi xen-3.0.2`): what a PVH guest started
//! as the initial domain needs from Xen, on the same VMM (docs/xen-hvm.md). Numbers and
//! layouts follow Xen's public headers (xen/include/public/{xen,version,sched,vcpu,
//! hvm/hvm_op,hvm/params,memory,event_channel}.h).
//!
//! Events: shared_info (mapped by XENMEM_add_to_physmap) holds the 2-level event-channel
//! bitmaps and vCPU 0's vcpu_info; VIRQ_TIMER is the one virtual interrupt raised (by
//! set_timer_op or the single-shot vcpu_op timer), delivered as the HVM callback vector
//! (HVM_PARAM_CALLBACK_IRQ of vector type, or HVMOP_set_evtchn_upcall_vector). System time is
//! the guest TSC scaled, published once in vcpu_time_info.
//!
//! Hypercall arguments that are pointers are guest *linear* addresses (Xen HVM convention);
//! they are translated through the guest's page tables by the caller-supplied translator.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

use crate::devices::ConsoleOut;
use crate::emulate::{read_linear_with, write_linear_with, Translate};
use crate::pv::Outcome;
use previrt_runtime::xen::console::Ring;

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
    pub const ETIME: i64 = -62;
}

/// Hypercall names (xen.h), for the accounting.
const NAMES: [(u64, &str); 14] = [
    (6, "sched_op_compat"),
    (12, "memory_op"),
    (15, "set_timer_op"),
    (16, "event_channel_op_compat"),
    (17, "xen_version"),
    (18, "console_io"),
    (20, "grant_table_op"),
    (24, "vcpu_op"),
    (29, "sched_op"),
    (32, "event_channel_op"),
    (33, "physdev_op"),
    (34, "hvm_op"),
    (1, "mmu_update"),
    (0, "set_trap_table"),
];

pub fn name(nr: u64) -> &'static str {
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, s)| *s).unwrap_or("unknown")
}

/// The Xen interface the personality presents: `--abi xen` (4.17) or `--abi xen-3.0.2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Xen 3.0.2's HVM interface: scheduler and event-channel calls in their first form,
    /// `sched_op_compat` (6, argument by value) and `event_channel_op_compat` (16, the command
    /// inside the structure); no vcpu_op timers (3.1), no physdev_op (3.0.3).
    V3_0_2,
    /// Xen 4.17's HVM interface: `sched_op` (29) and `event_channel_op` (32). As on real Xen
    /// 4.17, the compat calls are PV-only: an HVM guest gets -ENOSYS for 6 and 16.
    V4_17,
}

/// What each version offers: XENVER_version, XENVER_extraversion, the hypercalls answered
/// (others get -ENOSYS).
const OFFERS: [(Version, u32, &[u8], &[u64]); 2] = [
    (Version::V3_0_2, 3 << 16, b".2-previrt", &[6, 12, 15, 16, 17, 18, 20, 34]),
    (Version::V4_17, (4 << 16) | 17, b".0-previrt", &[12, 15, 17, 18, 20, 24, 29, 32, 33, 34]),
];

impl Version {
    fn offer(self) -> (u32, &'static [u8], &'static [u64]) {
        let (_, v, e, c) = OFFERS.iter().find(|o| o.0 == self).copied().unwrap_or(OFFERS[1]);
        (v, e, c)
    }
    /// XENVER_version: major << 16 | minor.
    pub fn number(self) -> u32 {
        self.offer().0
    }
}

/// SCHEDOP_shutdown reasons (sched.h) → `previrt run` exit status: poweroff is success. Xen
/// keeps any reason as the domain's 8-bit shutdown code for the toolstack; the personality
/// makes that code the exit status (the runtime passes isa-debug-exit's status this way).
fn shutdown(reason: u64) -> Outcome {
    match reason {
        SHUTDOWN_SUSPEND => Outcome::Suspend,
        0..=255 => Outcome::Shutdown(reason as i32),
        _ => Outcome::Ret(xerr::EINVAL),
    }
}

/// shared_info layout (xen.h, x86-64): vcpu_info[32] of 64 bytes, then the 2-level event
/// channel bitmaps of 64 words each.
mod si {
    pub const UPCALL_PENDING: u64 = 0;
    pub const PENDING_SEL: u64 = 8;
    /// vcpu_time_info: version u32, pad, tsc_timestamp u64, system_time u64, mul u32, shift i8.
    pub const TIME: u64 = 32;
    pub const EVTCHN_PENDING: u64 = 2048;
    pub const EVTCHN_MASK: u64 = 2048 + 512;
    pub const PORTS: u32 = 64 * 64;
}

/// Xen system time: ns since the guest's TSC was 0, published in vcpu_time_info as a scale of
/// the guest TSC, and known to the VMM as an offset from a host instant.
#[derive(Debug, Clone, Copy)]
struct Clock {
    mul: u32,
    shift: i8,
    /// System time at `at`.
    sys: u64,
    at: Instant,
}

impl Clock {
    /// The scale for a TSC of `khz`: ns = ((tsc << shift) * mul) >> 32.
    fn new(khz: u32, guest_tsc: u64) -> Clock {
        let khz = khz.max(1) as u128;
        let mut shift = 0i8;
        while (1_000_000u128 << 32) / (khz << shift) > u32::MAX as u128 {
            shift += 1;
        }
        let mul = ((1_000_000u128 << 32) / (khz << shift)) as u32;
        let sys = ((((guest_tsc as u128) << shift) * mul as u128) >> 32) as u64;
        Clock { mul, shift, sys, at: Instant::now() }
    }
    fn now(&self, at: Instant) -> u64 {
        self.sys.saturating_add(at.saturating_duration_since(self.at).as_nanos() as u64)
    }
    /// The host instant of system time `sys`; timeouts more than a year away are a year away
    /// (they never fire in a run, and `Instant` arithmetic stays in range).
    fn instant(&self, sys: u64) -> Instant {
        const YEAR_NS: u64 = 365 * 86_400 * 1_000_000_000;
        self.at + Duration::from_nanos(sys.saturating_sub(self.sys).min(YEAR_NS))
    }
}

/// What an event channel is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Virq(u32),
    /// The console back end (`--domu`): a send drains the console ring.
    Console,
}

/// Where `--domu` puts the console page: the reserved hole below 1 MiB (docs/hv-abi.md §7),
/// which no kernel uses as RAM. A guest may move it into its own memory with
/// XENMAPSPACE_gmfn (the only page that call moves here).
const CONSOLE_GPA: u64 = 0xa_0000;

const VIRQ_TIMER: u32 = 0;
/// previrt's stand-in for the toolstack writing `control/shutdown = "suspend"` to xenstore
/// (this personality has no xenstore): a guest that binds this virtual interrupt (VIRQ_ARCH_7,
/// unused by Xen on x86) opts in to suspend requests, which arrive as its channel going
/// pending (the guest keeps it masked and polls it); it answers with
/// `SCHEDOP_shutdown(SHUTDOWN_suspend)`, which returns 0 in the restored guest ("resumed in a
/// new domain") and 1 when cancelled, as on Xen.
pub const VIRQ_SUSPEND: u32 = 23;
/// The virtual interrupts this personality raises.
const VIRQS: [u32; 2] = [VIRQ_TIMER, VIRQ_SUSPEND];
/// SCHEDOP_shutdown reason: suspend (sched.h).
const SHUTDOWN_SUSPEND: u64 = 2;

pub struct Xen {
    console: ConsoleOut,
    pub version: Version,
    hypercall_msr: u64,
    /// GPA of the shared_info page (XENMEM_add_to_physmap), once mapped.
    shared_info: Option<u64>,
    /// Event channels by port; port 0 is never allocated (as in Xen).
    ports: Vec<Option<Channel>>,
    /// HVM_PARAM_CALLBACK_IRQ of vector type (or HVMOP_set_evtchn_upcall_vector): 0 = none.
    callback_vector: u8,
    /// The one-shot timer (set_timer_op / VCPUOP_set_singleshot_timer), as a host instant.
    timer: Option<Instant>,
    clock: Clock,
    /// `--domu`: GPA of the console page (HVM_PARAM_CONSOLE_PFN); None for the initial domain.
    console_ring: Option<u64>,
}

impl Xen {
    pub fn new(console: ConsoleOut, version: Version) -> Xen {
        Xen {
            console,
            version,
            hypercall_msr: 0,
            shared_info: None,
            ports: vec![None],
            callback_vector: 0,
            timer: None,
            clock: Clock::new(1_000_000, 0),
            console_ring: None,
        }
    }

    /// Start the guest as an ordinary domain's console: a `xencons_interface` page and an
    /// event channel to the back end (HVM_PARAM_CONSOLE_PFN, _EVTCHN); console_io is refused.
    pub fn offer_console_ring(&mut self) {
        self.console_ring = Some(CONSOLE_GPA);
        self.ports.push(Some(Channel::Console));
    }

    /// The console back end for a snapshot (`--domu`): the ring's GPA and its channel.
    pub fn console(&self) -> Option<(u64, u32)> {
        Some((self.console_ring?, self.port_of(Channel::Console)?))
    }

    /// A forced snapshot's console back end, where the guest left it (after [`Xen::restore`],
    /// which saved the channel as free).
    pub fn restore_console(&mut self, gpa: u64, port: u32) {
        self.console_ring = Some(gpa);
        if let Some(c) = self.ports.get_mut(port as usize) {
            *c = Some(Channel::Console);
        }
    }

    /// Copy what the guest wrote to the console ring out to the console.
    fn drain_console_ring(&mut self, mem: &GuestMemoryMmap) -> i64 {
        let Some(gpa) = self.console_ring else { return xerr::EINVAL };
        let Ok(page) = mem.get_host_address(GuestAddress(gpa)) else { return xerr::EFAULT };
        if !mem.check_range(GuestAddress(gpa), 4096) {
            return xerr::EFAULT;
        }
        // SAFETY: a whole page of guest RAM, mapped for the VM's lifetime; the guest is the
        // only other party and the ring's indices are checked (a corrupt pair reads as full).
        let mut ring = unsafe { Ring::new(page) };
        let mut buf = [0u8; 2048];
        loop {
            let n = ring.read(&mut buf);
            if n == 0 {
                return 0;
            }
            let _ = self.console.write_all(&buf[..n]);
        }
    }

    /// CPUID leaves 0x40000000..=0x40000004 as Xen reports them to an HVM guest.
    pub fn cpuid(&self) -> [(u32, u32, u32, u32, u32); 5] {
        let s = b"XenVMMXenVMM";
        let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        [
            (0x4000_0000, 0x4000_0004, w(0), w(4), w(8)),
            (0x4000_0001, self.version.number(), 0, 0, 0),
            // One hypercall page, installed through MSR_HYPERCALL.
            (0x4000_0002, 1, MSR_HYPERCALL, 0, 0),
            (0x4000_0003, 0, 0, 0, 0),
            (0x4000_0004, 0, 0, 0, 0),
        ]
    }

    /// Calibrate system time on the vCPU's TSC (`khz`, current value `guest_tsc`), at start
    /// and after a restore, and republish it.
    pub fn set_clock(&mut self, mem: &GuestMemoryMmap, khz: u32, guest_tsc: u64) {
        self.clock = Clock::new(khz, guest_tsc);
        self.publish_time(mem);
    }

    /// vcpu_time_info of vCPU 0: system time = guest TSC scaled (tsc_timestamp and
    /// system_time 0), so it never needs updating while the TSC rate holds.
    fn publish_time(&self, mem: &GuestMemoryMmap) {
        let Some(base) = self.shared_info else { return };
        let at = |o: u64| GuestAddress(base + si::TIME + o);
        let version: u32 = mem.read_obj(at(0)).unwrap_or(0);
        let _ = mem.write_obj(version.wrapping_add(1) | 1, at(0));
        let _ = mem.write_obj(0u64, at(8));
        let _ = mem.write_obj(0u64, at(16));
        let _ = mem.write_obj(self.clock.mul, at(24));
        let _ = mem.write_obj(self.clock.shift as u8, at(28));
        let _ = mem.write_obj((version | 1).wrapping_add(1), at(0));
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
    /// code (C `long` and `xen_pfn_t` are 8 bytes, else 4). `Outcome::Halt`: the guest blocks
    /// (finish with [`Xen::block`]).
    pub fn hypercall(&mut self, mem: &GuestMemoryMmap, nr: u64, a: [u64; 5], bits64: bool, tr: Translate) -> Outcome {
        let g = Guest { mem, tr, long: if bits64 { 8 } else { 4 } };
        if !self.version.offer().2.contains(&nr) {
            return Outcome::Ret(xerr::ENOSYS);
        }
        let r = match nr {
            17 => self.xen_version(&g, a[0], a[1]),
            18 => self.console_io(&g, a[0], a[1], a[2]),
            29 => return sched(a[0], || g.read::<4>(a[1]).map(|r| u32::from_le_bytes(r) as u64)),
            6 => return sched(a[0], || Some(a[1])),
            15 => self.set_timer(if bits64 { a[0] } else { a[0] | a[1] << 32 }),
            24 => self.vcpu_op(&g, a[0], a[1], a[2]),
            32 => self.event_channel_op(&g, a[0], a[1]),
            // struct evtchn_op { uint32_t cmd; union { ... } u; }: the union (4-byte members
            // only) follows the command.
            16 => match g.read::<4>(a[0]) {
                Some(cmd) => self.event_channel_op(&g, u32::from_le_bytes(cmd) as u64, a[0].wrapping_add(4)),
                None => xerr::EFAULT,
            },
            34 => self.hvm_op(&g, a[0], a[1]),
            12 => self.memory_op(&g, a[0], a[1]),
            _ => xerr::ENOSYS,
        };
        Outcome::Ret(r)
    }

    fn xen_version(&self, g: &Guest, cmd: u64, arg: u64) -> i64 {
        let (version, extra, _) = self.version.offer();
        match cmd {
            0 => version as i64,
            // XENVER_extraversion: char[16].
            1 => g.write(arg, &pad::<16>(extra)),
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
                Some(_) => g.write(arg.wrapping_add(4), &0u32.to_le_bytes()),
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
        if self.console_ring.is_some() {
            // Only the initial domain has Xen's console.
            return xerr::EPERM;
        }
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

    /// set_timer_op: a one-shot timer at absolute system time `at` (0 cancels). VIRQ_TIMER
    /// fires when it expires.
    fn set_timer(&mut self, at: u64) -> i64 {
        self.timer = (at != 0).then(|| self.clock.instant(at));
        0
    }

    fn vcpu_op(&mut self, g: &Guest, cmd: u64, vcpu: u64, arg: u64) -> i64 {
        const STOP_PERIODIC_TIMER: u64 = 7;
        const SET_SINGLESHOT_TIMER: u64 = 10;
        const STOP_SINGLESHOT_TIMER: u64 = 11;
        const SSHOTTMR_FUTURE: u32 = 1;
        if vcpu != 0 {
            return xerr::EINVAL;
        }
        match cmd {
            // No periodic timer runs (Xen starts HVM vCPUs without one).
            STOP_PERIODIC_TIMER => 0,
            // struct vcpu_set_singleshot_timer { uint64_t timeout_abs_ns; uint32_t flags; }.
            SET_SINGLESHOT_TIMER => match g.read::<12>(arg) {
                Some(b) => {
                    let at = u64::from_le_bytes(b[..8].try_into().unwrap());
                    let flags = u32::from_le_bytes(b[8..].try_into().unwrap());
                    if flags & SSHOTTMR_FUTURE != 0 && at < self.clock.now(Instant::now()) {
                        return xerr::ETIME;
                    }
                    self.timer = Some(self.clock.instant(at));
                    0
                }
                None => xerr::EFAULT,
            },
            STOP_SINGLESHOT_TIMER => {
                self.timer = None;
                0
            }
            _ => xerr::ENOSYS,
        }
    }

    /// Event-channel command `cmd` on its structure at `arg` (event_channel.h).
    fn event_channel_op(&mut self, g: &Guest, cmd: u64, arg: u64) -> i64 {
        const BIND_VIRQ: u64 = 1;
        const CLOSE: u64 = 3;
        const SEND: u64 = 4;
        const UNMASK: u64 = 9;
        let u32_at = |o: u64| g.read::<4>(arg.wrapping_add(o)).map(u32::from_le_bytes);
        match cmd {
            // struct evtchn_bind_virq { uint32_t virq; uint32_t vcpu; evtchn_port_t port; }.
            BIND_VIRQ => {
                let (Some(virq), Some(vcpu)) = (u32_at(0), u32_at(4)) else { return xerr::EFAULT };
                if !VIRQS.contains(&virq) || vcpu != 0 || self.ports.contains(&Some(Channel::Virq(virq))) {
                    return xerr::EINVAL;
                }
                let port = self.ports.len() as u32;
                if port >= si::PORTS {
                    return xerr::EINVAL;
                }
                if g.write(arg.wrapping_add(8), &port.to_le_bytes()) != 0 {
                    return xerr::EFAULT;
                }
                self.ports.push(Some(Channel::Virq(virq)));
                0
            }
            // { evtchn_port_t port; } for the three below.
            CLOSE | SEND | UNMASK => {
                let Some(port) = u32_at(0) else { return xerr::EFAULT };
                let Some(slot) = self.ports.get_mut(port as usize).filter(|c| c.is_some()) else {
                    return xerr::EINVAL;
                };
                match (cmd, *slot) {
                    (CLOSE, _) => *slot = None,
                    (SEND, Some(Channel::Console)) => return self.drain_console_ring(g.mem),
                    // A virq channel has no remote end: sending is accepted and does nothing.
                    (SEND, _) => {}
                    _ => self.unmask(g.mem, port),
                }
                0
            }
            _ => xerr::ENOSYS,
        }
    }

    fn hvm_op(&mut self, g: &Guest, cmd: u64, arg: u64) -> i64 {
        const HVMOP_SET_PARAM: u64 = 0;
        const HVMOP_GET_PARAM: u64 = 1;
        const HVMOP_SET_EVTCHN_UPCALL_VECTOR: u64 = 23;
        const HVM_PARAM_CALLBACK_IRQ: u32 = 0;
        const HVM_PARAM_CONSOLE_PFN: u32 = 17;
        const HVM_PARAM_CONSOLE_EVTCHN: u32 = 18;
        const CALLBACK_TYPE_VECTOR: u64 = 2;
        if cmd == HVMOP_SET_EVTCHN_UPCALL_VECTOR {
            // Xen 4.6 and later. struct { uint32_t vcpu; uint8_t vector; }.
            if self.version == Version::V3_0_2 {
                return xerr::ENOSYS;
            }
            let Some(b) = g.read::<5>(arg) else { return xerr::EFAULT };
            return match (u32::from_le_bytes(b[..4].try_into().unwrap()), b[4]) {
                (0, v @ 0x10..) => {
                    self.callback_vector = v;
                    0
                }
                _ => xerr::EINVAL,
            };
        }
        // struct xen_hvm_param { domid_t domid; uint32_t index; uint64_t value; } (16 bytes).
        let Some(p) = g.read::<16>(arg) else { return xerr::EFAULT };
        let index = u32::from_le_bytes(p[4..8].try_into().unwrap());
        let value = u64::from_le_bytes(p[8..16].try_into().unwrap());
        match (cmd, index) {
            // The callback as a vector (type 2 in bits 63:56); 0 disables. GSI and PCI INTx
            // callbacks need an emulated interrupt controller route: not modelled.
            (HVMOP_SET_PARAM, HVM_PARAM_CALLBACK_IRQ) => match (value >> 56, value & 0xff) {
                (0, 0) if value == 0 => {
                    self.callback_vector = 0;
                    0
                }
                (CALLBACK_TYPE_VECTOR, v @ 0x10..) if value >> 8 & 0xffff_ffff_ffff == 0 => {
                    self.callback_vector = v as u8;
                    0
                }
                _ => xerr::EINVAL,
            },
            (HVMOP_GET_PARAM, HVM_PARAM_CALLBACK_IRQ) => {
                let v = match self.callback_vector {
                    0 => 0,
                    v => CALLBACK_TYPE_VECTOR << 56 | v as u64,
                };
                g.write(arg.wrapping_add(8), &v.to_le_bytes())
            }
            (HVMOP_GET_PARAM, HVM_PARAM_CONSOLE_PFN | HVM_PARAM_CONSOLE_EVTCHN) if self.console_ring.is_some() => {
                let v = match index {
                    HVM_PARAM_CONSOLE_PFN => self.console_ring.unwrap_or(0) >> 12,
                    _ => self.port_of(Channel::Console).unwrap_or(0) as u64,
                };
                g.write(arg.wrapping_add(8), &v.to_le_bytes())
            }
            // No other parameter is backed by anything: no xenstore (nor a console ring for
            // the initial domain).
            (HVMOP_GET_PARAM, 0..64) => {
                let _ = g.write(arg.wrapping_add(8), &0u64.to_le_bytes());
                xerr::EINVAL
            }
            (HVMOP_SET_PARAM, 0..64) => xerr::EPERM,
            _ => xerr::EINVAL,
        }
    }

    fn memory_op(&mut self, g: &Guest, cmd: u64, arg: u64) -> i64 {
        const XENMEM_ADD_TO_PHYSMAP: u64 = 7;
        const XENMAPSPACE_SHARED_INFO: u32 = 0;
        const XENMAPSPACE_GRANT_TABLE: u32 = 1;
        const XENMAPSPACE_GMFN: u32 = 2;
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
        if space == XENMAPSPACE_GMFN {
            return self.move_console_page(g.mem, idx, gpfn);
        }
        match (space, idx) {
            (XENMAPSPACE_SHARED_INFO, 0) | (XENMAPSPACE_GRANT_TABLE, 0..GRANT_FRAMES) => {}
            _ => return xerr::EINVAL,
        }
        // Zeroes are a valid, quiet shared_info (no events pending, no wallclock) and an empty
        // grant-table frame (v1, no grants). shared_info then gets the time.
        let Some(gpa) = gpfn.checked_mul(4096) else { return xerr::EINVAL };
        if g.mem.write_slice(&[0u8; 4096], GuestAddress(gpa)).is_err() {
            return xerr::EINVAL;
        }
        if space == XENMAPSPACE_SHARED_INFO {
            self.shared_info = Some(gpa);
            self.publish_time(g.mem);
        }
        0
    }

    /// XENMAPSPACE_gmfn for the console page: its contents move to `gpfn`, where the back end
    /// looks from now on. Any other frame: -EINVAL (there is no p2m to remap).
    fn move_console_page(&mut self, mem: &GuestMemoryMmap, idx: u64, gpfn: u64) -> i64 {
        let Some(from) = self.console_ring.filter(|&g| g >> 12 == idx) else { return xerr::EINVAL };
        let Some(to) = gpfn.checked_mul(4096).filter(|&g| mem.check_range(GuestAddress(g), 4096)) else {
            return xerr::EINVAL;
        };
        let mut page = [0u8; 4096];
        if mem.read_slice(&mut page, GuestAddress(from)).is_err() || mem.write_slice(&page, GuestAddress(to)).is_err() {
            return xerr::EFAULT;
        }
        let _ = mem.write_slice(&[0u8; 4096], GuestAddress(from));
        self.console_ring = Some(to);
        0
    }

    fn atomic(&self, mem: &GuestMemoryMmap, off: u64, f: impl FnOnce(&AtomicU64)) {
        let Some(base) = self.shared_info else { return };
        if let Ok(s) = mem.get_slice(GuestAddress(base + off), 8) {
            if let Ok(a) = s.get_atomic_ref::<AtomicU64>(0) {
                f(a)
            }
        }
    }

    fn word(&self, mem: &GuestMemoryMmap, off: u64) -> u64 {
        let mut v = 0;
        self.atomic(mem, off, |a| v = a.load(Ordering::Acquire));
        v
    }

    /// Mark `port` pending and, unless it is masked, raise the upcall (evtchn_set_pending).
    fn set_pending(&self, mem: &GuestMemoryMmap, port: u32) {
        let (word, bit) = port_bit(port);
        self.atomic(mem, si::EVTCHN_PENDING + word, |a| {
            a.fetch_or(bit, Ordering::SeqCst);
        });
        self.notify(mem, port);
    }

    /// A pending, unmasked `port` sets its selector bit and the upcall flag.
    fn notify(&self, mem: &GuestMemoryMmap, port: u32) {
        let (word, bit) = port_bit(port);
        if self.word(mem, si::EVTCHN_PENDING + word) & bit == 0 || self.word(mem, si::EVTCHN_MASK + word) & bit != 0 {
            return;
        }
        self.atomic(mem, si::PENDING_SEL, |a| {
            a.fetch_or(1 << (port / 64), Ordering::SeqCst);
        });
        if let Some(base) = self.shared_info {
            let _ = mem.store(1u8, GuestAddress(base + si::UPCALL_PENDING), Ordering::SeqCst);
        }
    }

    fn unmask(&self, mem: &GuestMemoryMmap, port: u32) {
        let (word, bit) = port_bit(port);
        self.atomic(mem, si::EVTCHN_MASK + word, |a| {
            a.fetch_and(!bit, Ordering::SeqCst);
        });
        self.notify(mem, port);
    }

    fn upcall_pending(&self, mem: &GuestMemoryMmap) -> bool {
        self.shared_info.is_some_and(|b| {
            mem.load::<u8>(GuestAddress(b + si::UPCALL_PENDING), Ordering::Acquire).is_ok_and(|v| v != 0)
        })
    }

    fn virq_port(&self, virq: u32) -> Option<u32> {
        self.port_of(Channel::Virq(virq))
    }

    /// The event-channel port bound to `channel`.
    fn port_of(&self, channel: Channel) -> Option<u32> {
        self.ports.iter().position(|c| *c == Some(channel)).map(|p| p as u32)
    }

    /// The guest bound VIRQ_SUSPEND: it answers suspend requests.
    pub fn can_suspend(&self) -> bool {
        self.virq_port(VIRQ_SUSPEND).is_some()
    }

    /// Ask the guest to suspend: its VIRQ_SUSPEND channel goes pending.
    pub fn request_suspend(&self, mem: &GuestMemoryMmap) {
        if let Some(port) = self.virq_port(VIRQ_SUSPEND) {
            self.set_pending(mem, port);
        }
    }

    pub fn cancel_suspend(&self, mem: &GuestMemoryMmap) {
        if let Some(port) = self.virq_port(VIRQ_SUSPEND) {
            let (word, bit) = port_bit(port);
            self.atomic(mem, si::EVTCHN_PENDING + word, |a| {
                a.fetch_and(!bit, Ordering::SeqCst);
            });
        }
    }

    /// The state a snapshot keeps (section Xen, docs/snapshot.md): version, hypercall MSR,
    /// shared_info GPA (u64::MAX: none), callback vector, ns to the timer (u64::MAX: none), then
    /// one u32 per port from 1 (u32::MAX free, else the virq). A guest that suspended itself
    /// resumes as in a new Xen domain: nothing but the hypercall MSR is kept (it re-maps
    /// shared_info and re-binds its channels, as Xen guests do after a migration).
    pub fn save(&self, suspended: bool) -> Vec<u8> {
        let now = Instant::now();
        let mut b = Vec::new();
        b.extend_from_slice(&self.version.number().to_le_bytes());
        b.extend_from_slice(&self.hypercall_msr.to_le_bytes());
        if suspended {
            b.extend_from_slice(&[u64::MAX, 0, u64::MAX].map(u64::to_le_bytes).concat());
            return b;
        }
        let timer = self.timer.map_or(u64::MAX, |d| d.saturating_duration_since(now).as_nanos() as u64);
        for v in [self.shared_info.unwrap_or(u64::MAX), self.callback_vector as u64, timer] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for c in &self.ports[1..] {
            // The console channel (--domu) is saved as free: section DomU names it.
            let v = match c {
                Some(Channel::Virq(v)) => *v,
                _ => u32::MAX,
            };
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Take the state `save` wrote (under this personality's own version). Err: malformed.
    pub fn restore(&mut self, mem: &GuestMemoryMmap, b: &[u8]) -> Result<(), String> {
        if b.len() < 36 || !(b.len() - 36).is_multiple_of(4) {
            return Err(format!("{} bytes", b.len()));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let msr = u64_at(4);
        if msr != 0 && self.wrmsr(mem, MSR_HYPERCALL, msr) != Some(true) {
            return Err(format!("hypercall page MSR {msr:#x} refused"));
        }
        self.shared_info = Some(u64_at(12)).filter(|&g| g != u64::MAX);
        self.callback_vector = u64_at(20) as u8;
        self.timer = Some(u64_at(28)).filter(|&t| t != u64::MAX).map(|ns| Instant::now() + Duration::from_nanos(ns));
        self.ports = std::iter::once(None)
            .chain(b[36..].chunks_exact(4).map(|c| {
                let v = u32::from_le_bytes(c.try_into().unwrap());
                (v != u32::MAX).then_some(Channel::Virq(v))
            }))
            .collect();
        self.publish_time(mem);
        Ok(())
    }

    /// When the timer is due next (for the kick thread).
    pub fn deadline(&self) -> Option<Instant> {
        self.timer
    }

    /// If the timer is due at `now`: VIRQ_TIMER on its channel (if bound). True if it fired.
    pub fn tick(&mut self, mem: &GuestMemoryMmap, now: Instant) -> bool {
        if self.timer.is_none_or(|d| d > now) {
            return false;
        }
        self.timer = None;
        if let Some(port) = self.virq_port(VIRQ_TIMER) {
            self.set_pending(mem, port);
        }
        true
    }

    /// The vector to inject now: the callback vector while an upcall is pending (Xen HVM: the
    /// vector stays asserted until the guest clears evtchn_upcall_pending; RFLAGS.IF gates it).
    pub fn pending_vector(&self, mem: &GuestMemoryMmap) -> Option<u8> {
        (self.callback_vector != 0 && self.upcall_pending(mem)).then_some(self.callback_vector)
    }

    /// SCHEDOP_block: wait for an upcall (the timer's) and return 0.
    pub fn block(&mut self, mem: &GuestMemoryMmap) -> Outcome {
        loop {
            self.tick(mem, Instant::now());
            if self.upcall_pending(mem) {
                return Outcome::Ret(0);
            }
            match self.timer {
                Some(d) => std::thread::sleep(d.saturating_duration_since(Instant::now())),
                None => return Outcome::Fatal("SCHEDOP_block with no event pending and no timer set".into()),
            }
        }
    }
}

fn pad<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut b = [0u8; N];
    let n = s.len().min(N - 1);
    b[..n].copy_from_slice(&s[..n]);
    b
}

/// sched_op (29) and sched_op_compat (6) share their commands; the shutdown reason is behind
/// a pointer in the current form and by value in the compat one.
fn sched(cmd: u64, reason: impl FnOnce() -> Option<u64>) -> Outcome {
    const YIELD: u64 = 0;
    const BLOCK: u64 = 1;
    const SHUTDOWN: u64 = 2;
    match cmd {
        YIELD => {
            std::thread::yield_now();
            Outcome::Ret(0)
        }
        BLOCK => Outcome::Halt,
        SHUTDOWN => reason().map_or(Outcome::Ret(xerr::EFAULT), shutdown),
        _ => Outcome::Ret(xerr::ENOSYS),
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

/// Byte offset of `port`'s 64-bit word in a shared_info event bitmap, and its bit.
fn port_bit(port: u32) -> (u64, u64) {
    (port as u64 / 64 * 8, 1u64 << (port % 64))
}
