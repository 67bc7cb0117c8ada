//! The paravirtual ABI between a guest and previrt's in-tree hypervisor (`previrt run`).
//!
//! Documented field by field in `docs/hv-abi.md`; this `no_std` crate is the reference both
//! sides compile against: the VMM (`previrt-vmm`) and the guest runtime's `hv` backend.
//!
//! How a guest uses it:
//! 1. Detect: CPUID [`CPUID_BASE`] returns [`SIGNATURE`] in ebx/ecx/edx; CPUID
//!    [`CPUID_VERSION`] returns [`ABI_VERSION`] in eax and [`features`] bits in ebx.
//! 2. Install the hypercall page: `wrmsr` [`MSR_HYPERCALL_PAGE`] with `gpa | 1` (gpa 4 KiB
//!    aligned). The VMM fills it with stubs; hypercall `nr` is a plain SysV call to
//!    `page + HYPERCALL_STUB_SIZE * nr` with up to four arguments (rdi, rsi, rdx, rcx),
//!    returning an `i64` in rax (negative = [`err`] code). Only rax is clobbered.
//! 3. Register the per-vCPU shared page: `wrmsr` [`MSR_VCPU_PAGE`] with `gpa | 1`. Its layout
//!    is [`VcpuPage`]: virtual interrupt flag, pending events, console ring, block ring.
//!
//! The page hides the transport (port I/O to a doorbell today): guests never depend on it.
//!
//! Two majors exist ([`ABI_VERSION`], [`ABI_VERSION_V2`]): they share detection, MSRs, the
//! vCPU page and events, and differ in the hypercall layout ([`v2`]). Migration: the VMM asks
//! for a suspend with [`event::SUSPEND`]; a guest that set [`guest_features::SUSPEND`] calls
//! [`hc::SUSPEND`] at a quiescent point and learns from its result whether it now runs on
//! another VMM ([`suspend::RESUMED`]), where it re-detects everything (docs/hv-abi.md §9).

#![no_std]

/// ABI version: major in the high 16 bits, minor in the low 16 bits. A guest accepts any
/// version with the major it knows; minors only add hypercalls, features and fields.
pub const ABI_VERSION: u32 = 0x0001_0001;
/// The major version of [`ABI_VERSION`].
pub const ABI_MAJOR: u16 = 1;
/// Version 2: the same ABI with the hypercall layout of [`v2`] (`previrt run --abi hv-v2`).
pub const ABI_VERSION_V2: u32 = 0x0002_0000;
/// The major version of [`ABI_VERSION_V2`].
pub const ABI_MAJOR_V2: u16 = 2;

/// CPUID leaf: eax = highest previrt leaf, ebx/ecx/edx = [`SIGNATURE`].
pub const CPUID_BASE: u32 = 0x4000_0000;
/// CPUID leaf: eax = [`ABI_VERSION`], ebx = [`features`], ecx = [`MSR_HYPERCALL_PAGE`],
/// edx = number of hypercalls ([`hc::COUNT`]).
pub const CPUID_VERSION: u32 = 0x4000_0001;
/// CPUID leaf: eax = the vCPU's TSC frequency in kHz (0: unknown), as the VMM knows it. The
/// guest's own calibration against the PIT measures wrong whenever the vCPU thread is
/// descheduled during the measurement (a loaded host: 8x off was seen).
pub const CPUID_TSC: u32 = 0x4000_0002;
/// Highest leaf the VMM answers in the previrt range.
pub const CPUID_MAX_LEAF: u32 = CPUID_TSC;
/// 12-byte signature in ebx, ecx, edx (like "KVMKVMKVM\0\0\0" or "XenVMMXenVMM").
pub const SIGNATURE: [u8; 12] = *b"PrevirtHVabi";

/// The signature as the (ebx, ecx, edx) triple CPUID returns.
pub const fn signature_regs() -> (u32, u32, u32) {
    let s = SIGNATURE;
    (
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    )
}

/// Feature bits reported in CPUID [`CPUID_VERSION`].ebx.
pub mod features {
    /// Console ring in the vCPU page, flushed by [`super::hc::CONSOLE_FLUSH`] or the doorbell.
    pub const CONSOLE: u32 = 1 << 0;
    /// One-shot/periodic timer ([`super::hc::TIMER_SET`]) delivered as [`super::event::TIMER`].
    pub const TIMER: u32 = 1 << 1;
    /// A virtual disk behind the block ring ([`super::hc::BLOCK_KICK`]).
    pub const BLOCK: u32 = 1 << 2;
    /// An asynchronous console doorbell: `out %al, $CONSOLE_DOORBELL_PORT` flushes the console
    /// ring without a synchronous exit (ioeventfd).
    pub const CONSOLE_DOORBELL: u32 = 1 << 3;
    /// The VMM switched this host's KVM-PVM native mode on for the vCPU (docs/pvm.md): a
    /// guest that keeps the mode's rules (the runtime's `pvm` backend) runs natively.
    pub const PVM_NATIVE: u32 = 1 << 4;
}

/// `wrmsr` here with `gpa | 1` installs the hypercall page at `gpa`; `0` uninstalls.
/// Reading returns the last value written.
pub const MSR_HYPERCALL_PAGE: u32 = 0x5052_5600;
/// `wrmsr` here with `gpa | 1` registers this vCPU's [`VcpuPage`] at `gpa`; `0` unregisters.
pub const MSR_VCPU_PAGE: u32 = 0x5052_5601;
/// Low bit of both MSR values: enable.
pub const MSR_ENABLE: u64 = 1;

/// Size of one stub in the hypercall page.
pub const HYPERCALL_STUB_SIZE: usize = 32;
/// Size of the hypercall page (and of the vCPU page).
pub const PAGE_SIZE: usize = 4096;
/// Port the hypercall stubs write the hypercall number to (synchronous exit to the VMM).
/// Part of the stubs, not of the ABI: guests call the stubs, never the port.
pub const HYPERCALL_PORT: u16 = 0xe8;
/// Port whose write only signals the VMM to drain the console ring (ioeventfd: no exit to
/// user space on hosts that support it). Advertised by [`features::CONSOLE_DOORBELL`].
pub const CONSOLE_DOORBELL_PORT: u16 = 0xea;

/// Hypercall numbers: stub `nr` lives at `page + HYPERCALL_STUB_SIZE * nr`.
pub mod hc {
    /// `() -> ABI_VERSION`.
    pub const VERSION: u64 = 0;
    /// `(gpa, len) -> len`: write `len` (≤ [`super::CONSOLE_WRITE_MAX`]) bytes at `gpa` to the
    /// console directly (for early boot, before the vCPU page exists).
    pub const CONSOLE_WRITE: u64 = 1;
    /// `() -> bytes flushed`: drain the vCPU page's console ring.
    pub const CONSOLE_FLUSH: u64 = 2;
    /// `(vector) -> 0`: vector (32..=255) injected for event upcalls; 0 disables upcalls
    /// (events then only show up in [`super::VcpuPage::pending`]).
    pub const SET_EVENT_VECTOR: u64 = 3;
    /// `(mode, period_ns) -> 0`: [`super::timer`] mode; `period_ns` ≥ [`super::TIMER_MIN_NS`].
    pub const TIMER_SET: u64 = 4;
    /// `() -> pending bits`: block until an event is pending (returns at once if one is).
    pub const HALT: u64 = 5;
    /// `(status) -> never returns`: stop the VM; `status` (0..=255) is the process exit
    /// status of `previrt run`.
    pub const SHUTDOWN: u64 = 6;
    /// `() -> sectors`: size of the virtual disk in 512-byte sectors (0: no disk).
    pub const BLOCK_INFO: u64 = 7;
    /// `() -> requests completed`: process the block ring.
    pub const BLOCK_KICK: u64 = 8;
    /// `() -> 0`: give up the CPU (host yield).
    pub const YIELD: u64 = 9;
    /// `() -> suspend::*` (ABI 1.1): the guest is quiescent; the VMM may save it now. Returns
    /// [`super::suspend::CANCELLED`] at once when no suspend was requested, else (after the
    /// VM was saved and restored, possibly by another VMM) [`super::suspend::RESUMED`].
    pub const SUSPEND: u64 = 10;
    /// Number of hypercalls; stubs beyond it return [`super::err::NOSYS`].
    pub const COUNT: u64 = 11;
}

/// Negative return values of hypercalls (Linux errno values, negated).
pub mod err {
    /// The caller is not the guest kernel (CPL > 0).
    pub const PERM: i64 = -1;
    pub const IO: i64 = -5;
    pub const FAULT: i64 = -14;
    pub const NODEV: i64 = -19;
    pub const INVAL: i64 = -22;
    pub const NOSYS: i64 = -38;
}

/// Modes for [`hc::TIMER_SET`].
pub mod timer {
    pub const STOP: u64 = 0;
    pub const ONESHOT: u64 = 1;
    pub const PERIODIC: u64 = 2;
}
/// Smallest accepted timer period (100 µs): bounds the event rate a guest can ask for.
pub const TIMER_MIN_NS: u64 = 100_000;
/// Largest [`hc::CONSOLE_WRITE`].
pub const CONSOLE_WRITE_MAX: u64 = 4096;

/// Event bits in [`VcpuPage::pending`].
pub mod event {
    /// The timer expired.
    pub const TIMER: u64 = 1 << 0;
    /// Block requests completed.
    pub const BLOCK: u64 = 1 << 1;
    /// The VMM asks the guest to suspend (ABI 1.1): call [`super::hc::SUSPEND`] at the next
    /// quiescent point. Never delivered as an upcall (the guest polls for it at its safe
    /// points; `HALT` returns when it is set).
    pub const SUSPEND: u64 = 1 << 2;
    /// The bits that cause an upcall.
    pub const UPCALL: u64 = TIMER | BLOCK;
}

/// Bits the guest sets in [`VcpuPage::guest_features`] (ABI 1.1).
pub mod guest_features {
    /// The guest answers [`super::event::SUSPEND`] with [`super::hc::SUSPEND`].
    pub const SUSPEND: u64 = 1 << 0;
}

/// Results of [`hc::SUSPEND`].
pub mod suspend {
    /// No suspend was pending: nothing happened, carry on.
    pub const CANCELLED: i64 = 0;
    /// The VM was saved and this is the restored guest: the VMM (and with it the ABI version,
    /// features, or the paravirtual interface itself) may have changed; re-detect.
    pub const RESUMED: i64 = 1;
}

/// ABI version 2: one hypercall entry, renumbered operations, arguments in a block.
///
/// Stub 0 of the hypercall page is the only entry: `call page` with %rdi = GPA of a
/// [`Call`] block (16-byte aligned, in RAM). The result comes back in %rax, as in version 1.
/// Every other stub returns [`super::err::NOSYS`]. Operation numbers ([`op`]) are grouped by
/// service; [`OPS`] maps each to the version-1 hypercall with the same meaning.
pub mod v2 {
    /// The block a version-2 hypercall points at (64 bytes).
    #[repr(C)]
    #[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
    pub struct Call {
        /// An [`op`] number.
        pub op: u32,
        /// 0.
        pub flags: u32,
        pub args: [u64; 4],
        pub _reserved: [u64; 3],
    }
    /// Size of [`Call`].
    pub const CALL_SIZE: usize = 64;
    const _: () = assert!(core::mem::size_of::<Call>() == CALL_SIZE);

    /// Version-2 operation numbers.
    pub mod op {
        pub const VERSION: u32 = 0x00;
        pub const SUSPEND: u32 = 0x01;
        pub const SHUTDOWN: u32 = 0x02;
        pub const YIELD: u32 = 0x03;
        pub const CONSOLE_WRITE: u32 = 0x10;
        pub const CONSOLE_FLUSH: u32 = 0x11;
        pub const SET_EVENT_VECTOR: u32 = 0x20;
        pub const TIMER_SET: u32 = 0x21;
        pub const HALT: u32 = 0x22;
        pub const BLOCK_INFO: u32 = 0x30;
        pub const BLOCK_KICK: u32 = 0x31;
    }

    /// (version-2 op, version-1 hypercall number).
    pub const OPS: [(u32, u64); super::hc::COUNT as usize] = [
        (op::VERSION, super::hc::VERSION),
        (op::CONSOLE_WRITE, super::hc::CONSOLE_WRITE),
        (op::CONSOLE_FLUSH, super::hc::CONSOLE_FLUSH),
        (op::SET_EVENT_VECTOR, super::hc::SET_EVENT_VECTOR),
        (op::TIMER_SET, super::hc::TIMER_SET),
        (op::HALT, super::hc::HALT),
        (op::SHUTDOWN, super::hc::SHUTDOWN),
        (op::BLOCK_INFO, super::hc::BLOCK_INFO),
        (op::BLOCK_KICK, super::hc::BLOCK_KICK),
        (op::YIELD, super::hc::YIELD),
        (op::SUSPEND, super::hc::SUSPEND),
    ];

    /// The version-1 hypercall an op stands for.
    pub fn to_v1(op: u32) -> Option<u64> {
        OPS.iter().find(|o| o.0 == op).map(|o| o.1)
    }
    /// The op of a version-1 hypercall.
    pub fn from_v1(nr: u64) -> Option<u32> {
        OPS.iter().find(|o| o.1 == nr).map(|o| o.0)
    }

    /// Value of %eax the entry stub passes to the VMM (no version-1 number is this large).
    pub const ENTRY_MARK: u32 = 0x0002_0000;
}

/// Console ring capacity in bytes (a power of two).
pub const CONSOLE_RING_SIZE: usize = 2048;
/// Block ring capacity in requests (a power of two).
pub const BLOCK_RING_SIZE: usize = 16;
/// Sector size of the virtual disk.
pub const SECTOR_SIZE: u64 = 512;
/// Largest transfer of one block request, in sectors (64 KiB).
pub const BLOCK_MAX_SECTORS: u32 = 128;

/// Console ring: the guest writes bytes at `data[head % SIZE]` and then advances `head`; the
/// VMM consumes from `tail` to `head` and advances `tail`. Indices run freely (wrapping u32);
/// `head - tail` > SIZE is a guest error and stops the VM.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConsoleRing {
    pub head: u32,
    pub tail: u32,
    pub _reserved: [u32; 14],
    pub data: [u8; CONSOLE_RING_SIZE],
}

/// Block request operations.
pub mod blk {
    pub const READ: u32 = 0;
    pub const WRITE: u32 = 1;
}

/// One block request. The guest fills it at `reqs[prod % SIZE]` and advances `prod`; the VMM
/// completes requests in order, writes `status` (0 or an [`err`] code) and advances `cons`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockReq {
    pub op: u32,
    pub status: i32,
    pub sector: u64,
    pub count: u32,
    pub _reserved: u32,
    pub buf_gpa: u64,
}

/// Block ring header and requests.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockRing {
    pub prod: u32,
    pub cons: u32,
    pub _reserved: [u32; 14],
    pub reqs: [BlockReq; BLOCK_RING_SIZE],
}

/// The per-vCPU shared page (4 KiB, registered with [`MSR_VCPU_PAGE`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VcpuPage {
    /// Virtual interrupt flag: 1 = events may be injected. The guest's cli/sti/popf write it
    /// (no exit). The VMM clears it when it injects an upcall, as an interrupt gate clears IF.
    pub vif: u32,
    pub _reserved0: u32,
    /// Pending [`event`] bits: the VMM sets them (atomic OR), the guest clears them (atomic
    /// exchange) in its upcall handler or when its sti/popf finds them set.
    pub pending: u64,
    /// Upcalls injected so far (statistics, written by the VMM).
    pub upcalls: u64,
    /// [`guest_features`] bits the guest supports (ABI 1.1; written by the guest).
    pub guest_features: u64,
    pub _reserved1: [u64; 4],
    pub console: ConsoleRing,
    pub block: BlockRing,
    pub _pad: [u8; VCPU_PAGE_PAD],
}

const VCPU_PAGE_USED: usize = 64 + core::mem::size_of::<ConsoleRing>() + core::mem::size_of::<BlockRing>();
const VCPU_PAGE_PAD: usize = PAGE_SIZE - VCPU_PAGE_USED;

/// Byte offsets of the fields, pinned (docs/hv-abi.md lists the same numbers).
pub mod offsets {
    pub const VIF: usize = 0;
    pub const PENDING: usize = 8;
    pub const UPCALLS: usize = 16;
    pub const GUEST_FEATURES: usize = 24;
    pub const CONSOLE: usize = 64;
    pub const CONSOLE_HEAD: usize = CONSOLE;
    pub const CONSOLE_TAIL: usize = CONSOLE + 4;
    pub const CONSOLE_DATA: usize = CONSOLE + 64;
    pub const BLOCK: usize = CONSOLE_DATA + super::CONSOLE_RING_SIZE;
    pub const BLOCK_PROD: usize = BLOCK;
    pub const BLOCK_CONS: usize = BLOCK + 4;
    pub const BLOCK_REQS: usize = BLOCK + 64;
    pub const BLOCK_REQ_SIZE: usize = 32;
}

const _: () = {
    assert!(core::mem::size_of::<VcpuPage>() == PAGE_SIZE);
    assert!(core::mem::offset_of!(VcpuPage, pending) == offsets::PENDING);
    assert!(core::mem::offset_of!(VcpuPage, upcalls) == offsets::UPCALLS);
    assert!(core::mem::offset_of!(VcpuPage, guest_features) == offsets::GUEST_FEATURES);
    assert!(core::mem::offset_of!(VcpuPage, console) == offsets::CONSOLE);
    assert!(core::mem::offset_of!(ConsoleRing, data) == offsets::CONSOLE_DATA - offsets::CONSOLE);
    assert!(core::mem::offset_of!(VcpuPage, block) == offsets::BLOCK);
    assert!(core::mem::offset_of!(BlockRing, reqs) == offsets::BLOCK_REQS - offsets::BLOCK);
    assert!(core::mem::size_of::<BlockReq>() == offsets::BLOCK_REQ_SIZE);
    assert!(CONSOLE_RING_SIZE.is_power_of_two() && BLOCK_RING_SIZE.is_power_of_two());
};

/// The bytes of hypercall stub `nr` for the port-I/O transport:
/// `mov $nr, %eax; out %eax, $HYPERCALL_PORT; ret`, padded with `int3`.
pub const fn port_stub(nr: u32) -> [u8; HYPERCALL_STUB_SIZE] {
    let mut s = [0xcc; HYPERCALL_STUB_SIZE];
    let n = nr.to_le_bytes();
    s[0] = 0xb8;
    s[1] = n[0];
    s[2] = n[1];
    s[3] = n[2];
    s[4] = n[3];
    s[5] = 0xe7;
    s[6] = HYPERCALL_PORT as u8;
    s[7] = 0xc3;
    s
}

/// The stub page of a version: version 1 has stub `nr` at `32 * nr` ([`port_stub`]); version
/// 2 has the entry at 0 ([`port_stub`] of [`v2::ENTRY_MARK`]) and `-ENOSYS` everywhere else.
pub fn stub_page(major: u16) -> [u8; PAGE_SIZE] {
    let mut page = [0xcc; PAGE_SIZE];
    for (nr, s) in page.chunks_exact_mut(HYPERCALL_STUB_SIZE).enumerate() {
        let stub = match (major, nr) {
            (ABI_MAJOR_V2, 0) => port_stub(v2::ENTRY_MARK),
            (ABI_MAJOR_V2, _) => nosys_stub(),
            _ => port_stub(nr as u32),
        };
        s.copy_from_slice(&stub);
    }
    page
}

/// `mov $-ENOSYS, %rax; ret`, padded with `int3`.
const fn nosys_stub() -> [u8; HYPERCALL_STUB_SIZE] {
    let mut s = [0xcc; HYPERCALL_STUB_SIZE];
    let e = (err::NOSYS as i32).to_le_bytes();
    s[0] = 0x48;
    s[1] = 0xc7;
    s[2] = 0xc0;
    s[3] = e[0];
    s[4] = e[1];
    s[5] = e[2];
    s[6] = e[3];
    s[7] = 0xc3;
    s
}
