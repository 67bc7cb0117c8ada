//! The previrt paravirtual ABI (crate `previrt-hv-abi`, docs/hv-abi.md): MSRs, the hypercall
//! dispatcher and the per-vCPU shared page.
//!
//! Everything here is independent of KVM so it can be driven directly with random input (the
//! fuzz test): the guest's registers come in as numbers, guest memory as a `GuestMemoryMmap`.
//! Every guest-controlled value is checked; a bad argument gets an error code, a corrupted
//! shared structure (ring indices out of range) stops the VM with a message.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use previrt_hv_abi::{self as abi, err, hc, offsets, timer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

use crate::devices::ConsoleOut;

/// What a hypercall asks of the run loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Return this value in rax.
    Ret(i64),
    /// Block until an event is pending, then return the pending bits.
    Halt,
    /// Stop the VM with this exit status.
    Shutdown(i32),
    /// The guest broke the ABI; stop it with this message.
    Fatal(String),
    /// The guest is quiescent and asks to be saved (`SUSPEND`, docs/hv-abi.md §9); the run
    /// loop saves it if a snapshot was requested, else returns `suspend::CANCELLED`.
    Suspend,
}

/// State shared with the console-doorbell thread.
pub struct Shared {
    /// GPA of the registered vCPU page, or u64::MAX.
    vcpu_page: AtomicU64,
    /// Serializes console-ring consumers (the vCPU thread and the doorbell thread).
    drain: Mutex<()>,
    pub console: ConsoleOut,
}

const NO_PAGE: u64 = u64::MAX;

impl Shared {
    pub fn new(console: ConsoleOut) -> Arc<Shared> {
        Arc::new(Shared { vcpu_page: AtomicU64::new(NO_PAGE), drain: Mutex::new(()), console })
    }

    pub fn vcpu_page(&self) -> Option<u64> {
        Some(self.vcpu_page.load(Ordering::Acquire)).filter(|&p| p != NO_PAGE)
    }

    /// Drain the console ring of the vCPU page to the console. Err: corrupt ring.
    pub fn drain_console(&self, mem: &GuestMemoryMmap) -> Result<usize, String> {
        let Some(page) = self.vcpu_page() else { return Ok(0) };
        let _g = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        let at = |o: usize| GuestAddress(page + o as u64);
        let head: u32 = mem.load(at(offsets::CONSOLE_HEAD), Ordering::Acquire).map_err(|e| e.to_string())?;
        let tail: u32 = mem.load(at(offsets::CONSOLE_TAIL), Ordering::Acquire).map_err(|e| e.to_string())?;
        let used = head.wrapping_sub(tail) as usize;
        if used > abi::CONSOLE_RING_SIZE {
            return Err(format!(
                "console ring corrupt: head {head} tail {tail} (more than {} bytes)",
                abi::CONSOLE_RING_SIZE
            ));
        }
        let mut data = [0u8; abi::CONSOLE_RING_SIZE];
        mem.read_slice(&mut data, at(offsets::CONSOLE_DATA)).map_err(|e| e.to_string())?;
        let start = tail as usize % abi::CONSOLE_RING_SIZE;
        let first = used.min(abi::CONSOLE_RING_SIZE - start);
        let mut out = self.console.clone();
        let _ = out.write_all(&data[start..start + first]);
        let _ = out.write_all(&data[..used - first]);
        mem.store(head, at(offsets::CONSOLE_TAIL), Ordering::Release).map_err(|e| e.to_string())?;
        Ok(used)
    }

    /// Set `bits` in the vCPU page's pending word (atomic OR). False if there is no page.
    pub fn raise(&self, mem: &GuestMemoryMmap, bits: u64) -> bool {
        self.pending(mem, |a| a.fetch_or(bits, Ordering::SeqCst))
    }

    /// Clear `bits` in the vCPU page's pending word (atomic AND). False if there is no page.
    pub fn clear(&self, mem: &GuestMemoryMmap, bits: u64) -> bool {
        self.pending(mem, |a| a.fetch_and(!bits, Ordering::SeqCst))
    }

    /// Apply `op` to the vCPU page's pending word as an atomic. False if there is no page.
    fn pending(&self, mem: &GuestMemoryMmap, op: impl FnOnce(&AtomicU64) -> u64) -> bool {
        let Some(page) = self.vcpu_page() else { return false };
        let Ok(s) = mem.get_slice(GuestAddress(page + offsets::PENDING as u64), 8) else { return false };
        s.get_atomic_ref::<AtomicU64>(0).map(op).is_ok()
    }

    pub fn read_u32(&self, mem: &GuestMemoryMmap, off: usize) -> Option<u32> {
        mem.load(GuestAddress(self.vcpu_page()? + off as u64), Ordering::Acquire).ok()
    }
    pub fn read_u64(&self, mem: &GuestMemoryMmap, off: usize) -> Option<u64> {
        mem.load(GuestAddress(self.vcpu_page()? + off as u64), Ordering::Acquire).ok()
    }
    pub fn write_u32(&self, mem: &GuestMemoryMmap, off: usize, v: u32) {
        if let Some(p) = self.vcpu_page() {
            let _ = mem.store(v, GuestAddress(p + off as u64), Ordering::Release);
        }
    }
    pub fn write_u64(&self, mem: &GuestMemoryMmap, off: usize, v: u64) {
        if let Some(p) = self.vcpu_page() {
            let _ = mem.store(v, GuestAddress(p + off as u64), Ordering::Release);
        }
    }
}

/// The guest timer.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timer {
    pub period: Option<Duration>,
    pub deadline: Option<Instant>,
}

/// The previrt ABI state of one VM (one vCPU).
pub struct Pv {
    pub shared: Arc<Shared>,
    hypercall_msr: u64,
    vcpu_msr: u64,
    /// Upcall vector (0 = none).
    pub event_vector: u8,
    pub timer: Timer,
    disk: Option<File>,
    disk_sectors: u64,
    /// The console doorbell is backed by an ioeventfd.
    pub doorbell: bool,
    /// KVM-PVM native mode is on for the vCPU (`--backend native|auto`, docs/pvm.md).
    pub native: bool,
    /// ABI major version offered: [`abi::ABI_MAJOR`] or [`abi::ABI_MAJOR_V2`].
    major: u16,
    /// The vCPU's TSC frequency, reported in [`abi::CPUID_TSC`].
    pub tsc_khz: u32,
    /// The version-1 number of the last hypercall (a version-2 op decoded), for statistics.
    last: u64,
}

/// A guest-physical page that lies wholly in guest RAM.
fn valid_page(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    gpa & 0xfff == 0 && mem.check_range(GuestAddress(gpa), abi::PAGE_SIZE)
}

impl Pv {
    pub fn new(console: ConsoleOut, disk: Option<File>) -> std::io::Result<Pv> {
        let disk_sectors = match &disk {
            Some(f) => f.metadata()?.len() / abi::SECTOR_SIZE,
            None => 0,
        };
        Ok(Pv {
            shared: Shared::new(console),
            hypercall_msr: 0,
            vcpu_msr: 0,
            event_vector: 0,
            timer: Timer::default(),
            disk,
            disk_sectors,
            doorbell: false,
            native: false,
            major: abi::ABI_MAJOR,
            tsc_khz: 0,
            last: hc::COUNT,
        })
    }

    /// Offer ABI major `major` (1 or 2) instead of 1.
    pub fn with_major(mut self, major: u16) -> Pv {
        self.major = major;
        self
    }

    fn version(&self) -> u32 {
        if self.major == abi::ABI_MAJOR_V2 {
            abi::ABI_VERSION_V2
        } else {
            abi::ABI_VERSION
        }
    }

    /// CPUID leaves of this ABI: (leaf, eax, ebx, ecx, edx).
    pub fn cpuid(&self) -> [(u32, u32, u32, u32, u32); 3] {
        let (b, c, d) = abi::signature_regs();
        let mut f = abi::features::CONSOLE | abi::features::TIMER;
        if self.disk.is_some() {
            f |= abi::features::BLOCK;
        }
        if self.doorbell {
            f |= abi::features::CONSOLE_DOORBELL;
        }
        if self.native {
            f |= abi::features::PVM_NATIVE;
        }
        [
            (abi::CPUID_BASE, abi::CPUID_MAX_LEAF, b, c, d),
            (abi::CPUID_VERSION, self.version(), f, abi::MSR_HYPERCALL_PAGE, self.stubs()),
            (abi::CPUID_TSC, self.tsc_khz, 0, 0, 0),
        ]
    }

    /// Number of live stubs in the hypercall page.
    fn stubs(&self) -> u32 {
        if self.major == abi::ABI_MAJOR_V2 {
            1
        } else {
            hc::COUNT as u32
        }
    }

    /// rdmsr of one of our MSRs; None: not ours.
    pub fn rdmsr(&self, index: u32) -> Option<u64> {
        match index {
            abi::MSR_HYPERCALL_PAGE => Some(self.hypercall_msr),
            abi::MSR_VCPU_PAGE => Some(self.vcpu_msr),
            _ => None,
        }
    }

    /// wrmsr of one of our MSRs. None: not ours; Some(false): invalid value (#GP).
    pub fn wrmsr(&mut self, mem: &GuestMemoryMmap, index: u32, value: u64) -> Option<bool> {
        let gpa = value & !abi::MSR_ENABLE;
        let enable = value & abi::MSR_ENABLE != 0;
        let ok = value == 0 || (enable && valid_page(mem, gpa));
        match index {
            abi::MSR_HYPERCALL_PAGE => {
                if ok && enable && mem.write_slice(&abi::stub_page(self.major), GuestAddress(gpa)).is_err() {
                    return Some(false);
                }
                if ok {
                    self.hypercall_msr = value;
                }
            }
            abi::MSR_VCPU_PAGE => {
                if ok {
                    self.vcpu_msr = value;
                    self.shared.vcpu_page.store(if enable { gpa } else { NO_PAGE }, Ordering::Release);
                }
            }
            _ => return None,
        }
        Some(ok)
    }

    /// Dispatch the hypercall whose stub passed `nr` (%eax), with the argument registers
    /// `a` (rdi, rsi, rdx, rcx). Under version 2 the only entry passes [`abi::v2::ENTRY_MARK`]
    /// and %rdi points at the [`abi::v2::Call`] block, which is decoded into the same calls.
    pub fn hypercall(&mut self, mem: &GuestMemoryMmap, nr: u64, a: [u64; 4], now: Instant) -> Outcome {
        let (nr, a) = match (self.major, nr) {
            (abi::ABI_MAJOR_V2, n) if n == abi::v2::ENTRY_MARK as u64 => match read_call(mem, a[0]) {
                Some(c) => (abi::v2::to_v1(c.op).unwrap_or(hc::COUNT), c.args),
                None => {
                    self.last = hc::COUNT;
                    return Outcome::Ret(err::FAULT);
                }
            },
            // The doorbell port's synchronous fallback (no ioeventfd) is a flush in any version.
            (abi::ABI_MAJOR_V2, hc::CONSOLE_FLUSH) => (hc::CONSOLE_FLUSH, a),
            (abi::ABI_MAJOR_V2, _) => (hc::COUNT, a),
            _ => (nr, a),
        };
        self.last = nr;
        self.call(mem, nr, a, now)
    }

    /// Name of the last hypercall, for the exit accounting.
    pub fn last_name(&self) -> &'static str {
        Pv::name(self.last)
    }

    fn call(&mut self, mem: &GuestMemoryMmap, nr: u64, a: [u64; 4], now: Instant) -> Outcome {
        let r = match nr {
            hc::VERSION => self.version() as i64,
            hc::CONSOLE_WRITE => self.console_write(mem, a[0], a[1]),
            hc::CONSOLE_FLUSH => match self.shared.drain_console(mem) {
                Ok(n) => n as i64,
                Err(e) => return Outcome::Fatal(e),
            },
            hc::SET_EVENT_VECTOR => match a[0] {
                0 | 32..=255 => {
                    self.event_vector = a[0] as u8;
                    0
                }
                _ => err::INVAL,
            },
            hc::TIMER_SET => self.timer_set(a[0], a[1], now),
            hc::HALT => return Outcome::Halt,
            hc::SHUTDOWN => {
                if let Err(e) = self.shared.drain_console(mem) {
                    return Outcome::Fatal(e);
                }
                return match a[0] {
                    0..=255 => Outcome::Shutdown(a[0] as i32),
                    _ => Outcome::Fatal(format!("shutdown status {:#x} out of range 0..=255", a[0])),
                };
            }
            hc::BLOCK_INFO => self.disk_sectors as i64,
            hc::BLOCK_KICK => match self.block_kick(mem) {
                Ok(n) => n,
                Err(e) => return Outcome::Fatal(e),
            },
            hc::YIELD => {
                std::thread::yield_now();
                0
            }
            hc::SUSPEND => return Outcome::Suspend,
            _ => err::NOSYS,
        };
        Outcome::Ret(r)
    }

    /// Hypercall names for the exit accounting.
    pub fn name(nr: u64) -> &'static str {
        const NAMES: [&str; hc::COUNT as usize] = [
            "version",
            "console_write",
            "console_flush",
            "set_event_vector",
            "timer_set",
            "halt",
            "shutdown",
            "block_info",
            "block_kick",
            "yield",
            "suspend",
        ];
        NAMES.get(nr as usize).copied().unwrap_or("invalid")
    }

    fn console_write(&mut self, mem: &GuestMemoryMmap, gpa: u64, len: u64) -> i64 {
        if len > abi::CONSOLE_WRITE_MAX {
            return err::INVAL;
        }
        let mut buf = vec![0u8; len as usize];
        if mem.read_slice(&mut buf, GuestAddress(gpa)).is_err() {
            return err::FAULT;
        }
        let _ = self.shared.console.clone().write_all(&buf);
        len as i64
    }

    fn timer_set(&mut self, mode: u64, ns: u64, now: Instant) -> i64 {
        if mode == timer::STOP {
            self.timer = Timer::default();
            return 0;
        }
        if !(abi::TIMER_MIN_NS..=3_600_000_000_000).contains(&ns)
            || !(mode == timer::ONESHOT || mode == timer::PERIODIC)
        {
            return err::INVAL;
        }
        let d = Duration::from_nanos(ns);
        self.timer = Timer { period: (mode == timer::PERIODIC).then_some(d), deadline: Some(now + d) };
        0
    }

    /// If the timer is due at `now`: raise the timer event and re-arm (periodic) or disarm.
    /// Returns true if it fired.
    pub fn tick(&mut self, mem: &GuestMemoryMmap, now: Instant) -> bool {
        match self.timer.deadline {
            Some(d) if d <= now => {
                // A periodic timer that fell behind skips missed periods instead of bursting.
                self.timer.deadline = self.timer.period.map(|p| {
                    let mut next = d + p;
                    if next <= now {
                        next = now + p;
                    }
                    next
                });
                self.shared.raise(mem, abi::event::TIMER);
                true
            }
            _ => false,
        }
    }

    fn block_kick(&mut self, mem: &GuestMemoryMmap) -> Result<i64, String> {
        let Some(disk) = &self.disk else { return Ok(err::NODEV) };
        let sh = &self.shared;
        let (Some(prod), Some(mut cons)) =
            (sh.read_u32(mem, offsets::BLOCK_PROD), sh.read_u32(mem, offsets::BLOCK_CONS))
        else {
            return Ok(err::FAULT);
        };
        if prod.wrapping_sub(cons) as usize > abi::BLOCK_RING_SIZE {
            return Err(format!("block ring corrupt: prod {prod} cons {cons}"));
        }
        let mut done = 0;
        while cons != prod {
            let off = offsets::BLOCK_REQS + (cons as usize % abi::BLOCK_RING_SIZE) * offsets::BLOCK_REQ_SIZE;
            let page = sh.vcpu_page().ok_or("vCPU page vanished")?;
            let req: abi::BlockReq = read_req(mem, page + off as u64).ok_or("block request unreadable")?;
            let status = block_io(disk, self.disk_sectors, mem, &req);
            sh.write_u32(mem, off + 4, status as u32);
            cons = cons.wrapping_add(1);
            sh.write_u32(mem, offsets::BLOCK_CONS, cons);
            done += 1;
        }
        if done > 0 {
            sh.raise(mem, abi::event::BLOCK);
        }
        Ok(done)
    }
}

/// A version-2 call block (16-byte aligned, in RAM).
fn read_call(mem: &GuestMemoryMmap, gpa: u64) -> Option<abi::v2::Call> {
    let mut b = [0u8; abi::v2::CALL_SIZE];
    if !gpa.is_multiple_of(16) {
        return None;
    }
    mem.read_slice(&mut b, GuestAddress(gpa)).ok()?;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    Some(abi::v2::Call {
        op: u32::from_le_bytes(b[0..4].try_into().unwrap()),
        flags: 0,
        args: [u64_at(8), u64_at(16), u64_at(24), u64_at(32)],
        _reserved: [0; 3],
    })
}

fn read_req(mem: &GuestMemoryMmap, gpa: u64) -> Option<abi::BlockReq> {
    let mut b = [0u8; 32];
    mem.read_slice(&mut b, GuestAddress(gpa)).ok()?;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    Some(abi::BlockReq {
        op: u32_at(0),
        status: 0,
        sector: u64_at(8),
        count: u32_at(16),
        _reserved: 0,
        buf_gpa: u64_at(24),
    })
}

/// One block request; returns 0 or an error code.
fn block_io(disk: &File, sectors: u64, mem: &GuestMemoryMmap, r: &abi::BlockReq) -> i32 {
    if r.count == 0
        || r.count > abi::BLOCK_MAX_SECTORS
        || r.sector.checked_add(r.count as u64).is_none_or(|e| e > sectors)
    {
        return err::INVAL as i32;
    }
    let len = r.count as usize * abi::SECTOR_SIZE as usize;
    if !mem.check_range(GuestAddress(r.buf_gpa), len) {
        return err::FAULT as i32;
    }
    let off = r.sector * abi::SECTOR_SIZE;
    let mut buf = vec![0u8; len];
    let ok = match r.op {
        abi::blk::READ => {
            disk.read_exact_at(&mut buf, off).is_ok() && mem.write_slice(&buf, GuestAddress(r.buf_gpa)).is_ok()
        }
        abi::blk::WRITE => {
            mem.read_slice(&mut buf, GuestAddress(r.buf_gpa)).is_ok() && disk.write_all_at(&buf, off).is_ok()
        }
        _ => return err::INVAL as i32,
    };
    if ok {
        0
    } else {
        err::IO as i32
    }
}
