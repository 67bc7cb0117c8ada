//! The Xen PV ABI as the runtime uses it: hypercall numbers, sub-commands and the layouts of
//! the structures it shares with Xen (xen/include/public/: xen.h, arch-x86/xen.h,
//! arch-x86/xen-x86_64.h, event_channel.h, sched.h, vcpu.h, callback.h, physdev.h), and the
//! hypercall itself: `call hypercall_page + nr * 32`, arguments in rdi, rsi, rdx, r10, r8,
//! result in rax, rcx and r11 clobbered.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// One table gives the hypercall numbers the runtime uses (xen.h) and their names (error
/// messages, the exit summary).
macro_rules! hypercalls {
    ($($(#[$doc:meta])* $variant:ident = $nr:literal, $name:literal;)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u64)]
        pub enum Hypercall { $($(#[$doc])* $variant = $nr,)* }

        /// Every hypercall the runtime issues, with its name.
        pub const HYPERCALLS: &[(Hypercall, &str)] = &[$((Hypercall::$variant, $name),)*];
    };
}

hypercalls! {
    SetTrapTable = 0, "set_trap_table";
    MmuUpdate = 1, "mmu_update";
    SetGdt = 2, "set_gdt";
    /// Before Xen 3.0.2 (interface 0x00030101): the command and its argument by value.
    SchedOpCompat = 6, "sched_op_compat";
    /// One descriptor of a page Xen holds as GDT frame: its machine address, the descriptor.
    UpdateDescriptor = 10, "update_descriptor";
    MemoryOp = 12, "memory_op";
    /// A batch of hypercalls in one transition (`struct multicall_entry` array, count).
    Multicall = 13, "multicall";
    UpdateVaMapping = 14, "update_va_mapping";
    SetTimerOp = 15, "set_timer_op";
    /// Before Xen 3.0.2: `struct evtchn_op { uint32_t cmd; union {...} u; }`.
    EventChannelOpCompat = 16, "event_channel_op_compat";
    XenVersion = 17, "xen_version";
    ConsoleIo = 18, "console_io";
    /// Entered by a jump with a frame on the stack (entry.rs, `xen_iret`), never called.
    Iret = 23, "iret";
    VcpuOp = 24, "vcpu_op";
    SetSegmentBase = 25, "set_segment_base";
    MmuextOp = 26, "mmuext_op";
    SchedOp = 29, "sched_op";
    CallbackOp = 30, "callback_op";
    EventChannelOp = 32, "event_channel_op";
    PhysdevOp = 33, "physdev_op";
    HvmOp = 34, "hvm_op";
}

/// Hypercalls issued, by number (the exit summary: what the kernel's operations cost in
/// transitions to Xen).
pub static COUNTS: [AtomicU32; 64] = [const { AtomicU32::new(0) }; 64];

impl Hypercall {
    pub fn name(self) -> &'static str {
        HYPERCALLS.iter().find(|(h, _)| *h == self).map_or("?", |(_, n)| n)
    }
}

pub const CONSOLEIO_WRITE: u64 = 0;
pub const SCHEDOP_SHUTDOWN: u64 = 2;
pub const SHUTDOWN_POWEROFF: u32 = 0;
pub const SHUTDOWN_CRASH: u32 = 3;
pub const VCPUOP_STOP_PERIODIC_TIMER: u64 = 7;
pub const EVTCHNOP_BIND_VIRQ: u64 = 1;
pub const EVTCHNOP_UNMASK: u64 = 9;
pub const EVTCHNOP_SEND: u64 = 4;
pub const SCHEDOP_YIELD: u64 = 0;
pub const SCHEDOP_BLOCK: u64 = 1;
pub const VIRQ_TIMER: u32 = 0;
pub const CALLBACKOP_REGISTER: u64 = 0;
pub const CALLBACKTYPE_EVENT: u16 = 0;
pub const CALLBACKTYPE_FAILSAFE: u16 = 1;
/// Xen masks events when it enters the callback (like an interrupt gate).
pub const CALLBACKF_MASK_EVENTS: u16 = 1;
pub const PHYSDEVOP_SET_IOPL: u64 = 6;
pub const SEGBASE_GS_USER: u64 = 1;
pub const UVMF_INVLPG: u64 = 2;
pub const DOMID_SELF: u64 = 0x7ff0;

pub const MMUEXT_PIN_L4_TABLE: u32 = 3;
pub const MMUEXT_UNPIN_TABLE: u32 = 4;
pub const MMUEXT_NEW_BASEPTR: u32 = 5;
pub const MMUEXT_TLB_FLUSH_LOCAL: u32 = 6;
pub const MMUEXT_INVLPG_LOCAL: u32 = 7;

/// start_info.flags: this is the initial domain (dom0).
pub const SIF_INITDOMAIN: u32 = 1 << 1;
/// trap_info.flags bit 2: mask events on entry (an interrupt gate rather than a trap gate).
pub const TI_MASK_EVENTS: u8 = 1 << 2;

/// Xen's flat 64-bit ring-3 code selector for PV guest kernels (arch-x86/xen-x86_64.h): its
/// exception and event entries run there.
pub const FLAT_KERNEL_CS: u16 = 0xe033;

/// `struct start_info` offsets (x86_64).
pub mod start_info {
    pub const NR_PAGES: usize = 32;
    pub const SHARED_INFO: usize = 40;
    pub const FLAGS: usize = 48;
    /// console.domU.mfn and .evtchn (a non-initial domain's console ring and its channel).
    pub const CONSOLE_MFN: usize = 72;
    pub const CONSOLE_EVTCHN: usize = 80;
    /// Virtual address of Xen's boot L4 table.
    pub const PT_BASE: usize = 88;
    pub const MFN_LIST: usize = 104;
    pub const CMD_LINE: usize = 128;
    pub const CMD_LINE_LEN: usize = 1024;
}

/// `struct vcpu_info` (64 bytes; vCPU 0's is at the start of shared_info).
#[repr(C)]
pub struct VcpuInfo {
    pub upcall_pending: u8,
    pub upcall_mask: u8,
    _pad: [u8; 6],
    pub pending_sel: u64,
    /// arch_vcpu_info: the faulting address of the last #PF.
    pub cr2: u64,
    _arch_pad: u64,
    pub time: VcpuTimeInfo,
}

/// `struct vcpu_time_info`: system time (ns since boot) = system_time + scaled TSC delta.
#[repr(C)]
pub struct VcpuTimeInfo {
    pub version: u32,
    _pad0: u32,
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
    pub flags: u8,
    _pad1: [u8; 2],
}

impl VcpuTimeInfo {
    /// Xen system time (ns since boot) at TSC value `tsc`, read under the version protocol
    /// (odd: being written).
    pub fn system_time(&self, tsc: impl Fn() -> u64) -> u64 {
        loop {
            // SAFETY: fields Xen updates under the version protocol.
            let (v, stamp, sys, mul, shift) = unsafe {
                let v = core::ptr::addr_of!(self.version).read_volatile();
                core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
                (
                    v,
                    core::ptr::addr_of!(self.tsc_timestamp).read_volatile(),
                    core::ptr::addr_of!(self.system_time).read_volatile(),
                    core::ptr::addr_of!(self.tsc_to_system_mul).read_volatile(),
                    core::ptr::addr_of!(self.tsc_shift).read_volatile(),
                )
            };
            let delta = tsc_to_ns(tsc().wrapping_sub(stamp), mul, shift);
            core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
            // SAFETY: as above.
            if v & 1 == 0 && unsafe { core::ptr::addr_of!(self.version).read_volatile() } == v {
                return sys.wrapping_add(delta);
            }
        }
    }
}

/// A TSC interval in ns with vcpu_time_info's scale (`tsc_to_system_mul`, `tsc_shift`).
pub fn tsc_to_ns(delta: u64, mul: u32, shift: i8) -> u64 {
    let d = if shift >= 0 { delta << shift } else { delta >> -shift };
    ((d as u128 * mul as u128) >> 32) as u64
}

/// Offsets in shared_info of the 2-level event channel bitmaps (after 32 vcpu_info).
pub const EVTCHN_PENDING: usize = 32 * 64;
pub const EVTCHN_MASK: usize = EVTCHN_PENDING + 64 * 8;

/// `struct trap_info`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct TrapInfo {
    pub vector: u8,
    pub flags: u8,
    pub cs: u16,
    pub address: u64,
}

/// `struct mmu_update`: `ptr` = machine address of the entry (low bits 0: normal update).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct MmuUpdate {
    pub ptr: u64,
    pub val: u64,
}

/// `struct multicall_entry` (x86_64): the hypercall, its result (Xen writes it), six arguments.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MulticallEntry {
    pub op: u64,
    pub result: u64,
    pub args: [u64; 6],
}

/// `struct mmuext_op`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct MmuextOp {
    pub cmd: u32,
    pub arg1: u64,
    pub arg2: u64,
}

/// `struct callback_register` (x86_64: the address is an unsigned long).
#[repr(C)]
pub struct CallbackRegister {
    pub kind: u16,
    pub flags: u16,
    pub address: u64,
}

/// `struct evtchn_bind_virq`: virq, vcpu in; port out.
#[repr(C)]
pub struct BindVirq {
    pub virq: u32,
    pub vcpu: u32,
    pub port: u32,
}

const _: () = assert!(core::mem::size_of::<VcpuInfo>() == 64);
const _: () = assert!(core::mem::size_of::<TrapInfo>() == 16);
const _: () = assert!(core::mem::size_of::<MmuextOp>() == 24);
const _: () = assert!(core::mem::size_of::<MulticallEntry>() == 64);

/// The hypercall page Xen fills in (XEN_ELFNOTE_HYPERCALL_PAGE names it).
pub fn hypercall_page() -> u64 {
    addr_of_sym!("previrt_xen_hypercall_page")
}

/// Issue hypercall `nr` with up to five arguments; returns Xen's result (negative errno on
/// failure).
///
/// # Safety
/// The arguments must be what Xen expects for `nr` (pointers to valid structures).
pub unsafe fn call(nr: Hypercall, a: [u64; 5]) -> i64 {
    COUNTS[nr as usize].fetch_add(1, Relaxed);
    let ret: i64;
    asm!(
        "call {entry}",
        entry = in(reg) hypercall_page() + nr as u64 * 32,
        inlateout("rdi") a[0] => _,
        inlateout("rsi") a[1] => _,
        inlateout("rdx") a[2] => _,
        inlateout("r10") a[3] => _,
        inlateout("r8") a[4] => _,
        lateout("rax") ret,
        lateout("rcx") _,
        lateout("r11") _,
    );
    ret
}
