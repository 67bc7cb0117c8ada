//! Save and restore of a whole VM: `previrt run --snapshot FILE --snapshot-after N(exits|ms)`,
//! SIGUSR1, or a `--control` socket request (`previrt snapshot`) writes a snapshot and stops;
//! `previrt restore FILE` resumes it (docs/snapshot.md has the format field by field).
//!
//! Every trigger first asks a guest that supports it to suspend itself (docs/hv-abi.md §9):
//! it re-patches itself after the restore. A guest that does not answer within the timeout
//! is saved anyway and the snapshot says so ("forced").
//!
//! A child of `vm` (it reads and writes the VM's private state). The snapshot is taken between
//! two exits, after a KVM_RUN with `immediate_exit` set has completed any in-flight port/MMIO
//! access, so the saved registers are the ones the guest would see next. State goes in the
//! order restore needs (FACTS.md): MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS
//! (after LAPIC), VCPU_EVENTS; the irqchip and PIT before the vCPU, the clock last.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::Kvm;
use previrt_hv_abi as abi;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{Error, Personality, Stop, Vm};
use crate::{AbiKind, Backend, RunArgs};

pub const MAGIC: &[u8; 8] = b"PREVSNAP";
pub const VERSION: u32 = 1;
/// magic, crc32, version, vcpus, abi, mem_size, payload_len.
pub const HEADER_LEN: usize = 40;
const PAGE: usize = 4096;

/// When `previrt run` takes its snapshot: after N handled exits or at the first exit after N ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Exits(u64),
    Millis(u64),
}

impl std::str::FromStr for When {
    type Err = String;
    fn from_str(s: &str) -> Result<When, String> {
        let bad = || format!("{s:?}: expected N followed by 'exits' or 'ms' (e.g. 5000exits, 200ms)");
        let (num, ctor): (&str, fn(u64) -> When) = if let Some(n) = s.strip_suffix("exits") {
            (n, When::Exits)
        } else if let Some(n) = s.strip_suffix("ms") {
            (n, When::Millis)
        } else {
            return Err(bad());
        };
        num.parse().map(ctor).map_err(|_| bad())
    }
}

/// One request to save the VM: where, and who waits for the answer (a control connection).
struct Request {
    path: PathBuf,
    reply: Option<Reply>,
}

/// The control connection of a request, answered by the vCPU thread itself before the run
/// ends (an answer handed to another thread could be lost when the process exits first). One
/// dropped unanswered says the VM stopped before saving.
struct Reply(Option<UnixStream>);

impl Reply {
    fn send(mut self, answer: String) {
        if let Some(mut c) = self.0.take() {
            let _ = writeln!(c, "{answer}");
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = writeln!(c, "{}", reply_err("the VM stopped before saving"));
        }
    }
}

/// A request waiting for the guest to suspend.
struct Pending {
    req: Request,
    since: Instant,
}

/// Set by the SIGUSR1 handler.
static SIGUSR1: AtomicBool = AtomicBool::new(false);
/// The vCPU thread, kicked out of KVM_RUN by SIGUSR1 and control requests.
static VCPU_THREAD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn on_sigusr1(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGUSR1.store(true, Ordering::SeqCst);
    crate::kick::kick(VCPU_THREAD.load(Ordering::SeqCst) as libc::pthread_t);
}

/// The snapshot triggers of one run (`--snapshot-after`, SIGUSR1, `--control`).
pub(super) struct Trigger {
    when: Option<When>,
    /// `--snapshot FILE`: where the exit/time trigger and SIGUSR1 save.
    path: Option<PathBuf>,
    exits: u64,
    start: Instant,
    mem_size: u64,
    abi: AbiKind,
    timeout: Duration,
    control: Option<(PathBuf, mpsc::Receiver<Request>)>,
    pending: Option<Pending>,
    /// `--disk`: absolute path and size, saved so restore can reopen it.
    disk: Option<(PathBuf, u64)>,
}

impl Trigger {
    /// The triggers `args` ask for (None: no snapshot possible). Err: a bad option (one line).
    pub(super) fn new(args: &RunArgs, mem_size: u64) -> Result<Option<Trigger>, String> {
        if args.snapshot.is_none() && args.control.is_none() {
            return Ok(None);
        }
        crate::kick::install().map_err(|e| format!("signal handler: {e}"))?;
        // SAFETY: pthread_self has no preconditions; the run happens on this thread.
        VCPU_THREAD.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
        if args.snapshot.is_some() {
            vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, on_sigusr1)
                .map_err(|e| format!("SIGUSR1 handler: {e}"))?;
        }
        let control = args.control.as_ref().map(|p| listen(p).map(|rx| (p.clone(), rx))).transpose()?;
        let disk = match &args.disk {
            Some(p) => {
                let abs = std::fs::canonicalize(p).map_err(|e| format!("--disk {}: {e}", p.display()))?;
                let len = std::fs::metadata(&abs).map_err(|e| format!("--disk {}: {e}", p.display()))?.len();
                Some((abs, len))
            }
            None => None,
        };
        Ok(Some(Trigger {
            when: args.snapshot_after,
            path: args.snapshot.clone(),
            exits: 0,
            start: Instant::now(),
            mem_size,
            abi: args.abi,
            timeout: Duration::from_millis(args.suspend_timeout),
            control,
            pending: None,
            disk,
        }))
    }

    /// Count one handled exit; a new request if a trigger fired.
    fn next(&mut self) -> Option<Request> {
        self.exits += 1;
        let due = match self.when {
            Some(When::Exits(n)) => self.exits >= n,
            Some(When::Millis(n)) => self.start.elapsed() >= Duration::from_millis(n),
            None => false,
        };
        if (due || SIGUSR1.swap(false, Ordering::SeqCst)) && self.path.is_some() {
            self.when = None;
            return Some(Request { path: self.path.clone()?, reply: None });
        }
        self.control.as_ref().and_then(|(_, rx)| rx.try_recv().ok())
    }

    /// When the pending request gives up waiting for the guest.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.since + self.timeout)
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        if let Some((p, _)) = &self.control {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Serve `previrt snapshot` on a Unix socket: one request line (`{"path": FILE}`) per
/// connection, answered with one JSON line once the run loop has saved (or failed).
fn listen(path: &Path) -> Result<mpsc::Receiver<Request>, String> {
    let l = UnixListener::bind(path).map_err(|e| format!("--control {}: {e}", path.display()))?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("previrt-control".into())
        .spawn(move || {
            for conn in l.incoming().flatten() {
                let mut line = String::new();
                let mut conn = BufReader::new(conn);
                let _ = conn.read_line(&mut line);
                let answer = match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(v) => match v["path"].as_str() {
                        Some(p) if Path::new(p).is_absolute() => {
                            let reply = Some(Reply(Some(conn.into_inner())));
                            let _ = tx.send(Request { path: PathBuf::from(p), reply });
                            crate::kick::kick(VCPU_THREAD.load(Ordering::SeqCst) as libc::pthread_t);
                            continue;
                        }
                        _ => reply_err("request needs an absolute \"path\""),
                    },
                    Err(e) => reply_err(&format!("bad request: {e}")),
                };
                let _ = writeln!(conn.get_mut(), "{answer}");
            }
        })
        .map_err(|e| format!("control thread: {e}"))?;
    Ok(rx)
}

fn reply_err(msg: &str) -> String {
    serde_json::json!({ "ok": false, "error": msg }).to_string()
}

/// How a snapshot came about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The guest called SUSPEND after waiting this long; it re-patches itself after restore.
    Cooperative(Duration),
    /// Saved without the guest's help, for this reason.
    Forced(String),
}

impl Mode {
    fn describe(&self) -> String {
        match self {
            Mode::Cooperative(w) => {
                format!("cooperative: guest suspended after {:.1} ms", w.as_secs_f64() * 1e3)
            }
            Mode::Forced(why) => format!("forced: {why}; no re-patching"),
        }
    }
    fn section(&self) -> Vec<u8> {
        let (mode, why) = match self {
            Mode::Cooperative(_) => (1u32, ""),
            Mode::Forced(w) => (0, w.as_str()),
        };
        [&mode.to_le_bytes()[..], &0u32.to_le_bytes(), why.as_bytes()].concat()
    }
}

/// Called after every handled exit while a trigger exists: start a request (ask the guest to
/// suspend, or save at once if it cannot), or give up waiting for it. Some(status): the VM
/// was saved and the run ends.
pub(super) fn poll(vm: &mut Vm) -> Result<Option<i32>, Stop> {
    let Some(t) = vm.snapshot.as_mut() else { return Ok(None) };
    if t.pending.is_none() {
        if let Some(req) = t.next() {
            if !vm.persona.can_suspend(&vm.mem) {
                return finish(vm, req, Mode::Forced("the guest does not support suspend".into()));
            }
            vm.persona.request_suspend(&vm.mem);
            t.pending = Some(Pending { req, since: Instant::now() });
        }
        return Ok(None);
    }
    if t.deadline().is_some_and(|d| Instant::now() >= d) {
        let ms = t.timeout.as_millis();
        let p = t.pending.take().expect("checked above");
        vm.persona.cancel_suspend(&vm.mem);
        return finish(vm, p.req, Mode::Forced(format!("the guest did not suspend within {ms} ms")));
    }
    Ok(None)
}

/// One KVM_RUN with immediate exit: KVM completes an in-flight port/MMIO access and its
/// register write-back without running guest code.
fn settle(vm: &mut Vm) {
    vm.vcpu.set_kvm_immediate_exit(1);
    let _ = vm.vcpu.run();
    vm.vcpu.set_kvm_immediate_exit(0);
}

/// The guest called SUSPEND. With a request pending: complete the call as the stub's `ret`
/// would, with RAX = RESUMED, and save, so the saved vCPU is outside the hypercall page (whose
/// contents belong to the restoring VMM). Without one: return CANCELLED.
pub(super) fn suspended(vm: &mut Vm) -> Result<Option<i32>, Stop> {
    // Let KVM finish the stub's `out` first: it may still write RIP back.
    settle(vm);
    let mut regs = vm.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = vm.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let at = |la| super::emulate::translate(&vm.mem, &sregs, la);
    let ret = at(regs.rsp).and_then(|gpa| vm.mem.read_obj::<u64>(GuestAddress(gpa)).ok());
    let pending = vm.snapshot.as_mut().and_then(|t| t.pending.take());
    let (resumed, cancelled) = vm.persona.suspend_results();
    let (Some(p), Some(ret)) = (pending, ret) else {
        regs.rax = cancelled;
        return vm.vcpu.set_regs(&regs).map(|_| None).map_err(kvm_err("KVM_SET_REGS"));
    };
    vm.persona.cancel_suspend(&vm.mem);
    let saved = regs;
    regs.rip = ret;
    regs.rsp += 8;
    regs.rax = resumed;
    vm.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    let out = finish(vm, p.req, Mode::Cooperative(p.since.elapsed()));
    if matches!(out, Ok(None)) {
        // Not saved: the guest carries on as if no suspend had been asked for.
        let back = kvm_regs { rax: cancelled, ..saved };
        vm.vcpu.set_regs(&back).map_err(kvm_err("KVM_SET_REGS"))?;
    }
    out
}

/// Save for `req`, say so (stderr, and the control connection), and end the run (Some(0)).
/// A file that cannot be written fails only a control request (Ok(None): the VM runs on).
fn finish(vm: &mut Vm, req: Request, mode: Mode) -> Result<Option<i32>, Stop> {
    let t0 = Instant::now();
    let t = vm.snapshot.as_ref().expect("a trigger exists");
    let (mem_size, abi, exits, disk) = (t.mem_size, t.abi, t.exits, t.disk.clone());
    match write(vm, &req.path, mem_size, abi, &mode, disk.as_ref()) {
        Ok((len, parts)) => {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let parts: Vec<String> = SAVE_PARTS.iter().zip(parts).map(|(n, ms)| format!("{n} {ms:.1}")).collect();
            eprintln!(
                "previrt run: snapshot written to {} ({len} bytes, after {exits} exits, {ms:.1} ms to save: {} ms; {})",
                req.path.display(),
                parts.join(", "),
                mode.describe()
            );
            if let Some(r) = req.reply {
                let (coop, wait, why) = match &mode {
                    Mode::Cooperative(w) => (true, w.as_secs_f64() * 1e3, String::new()),
                    Mode::Forced(w) => (false, 0.0, w.clone()),
                };
                r.send(
                    serde_json::json!({"ok": true, "path": req.path, "bytes": len, "cooperative": coop,
                        "reason": why, "save_ms": ms, "wait_ms": wait, "exits": exits})
                    .to_string(),
                );
            }
            Ok(Some(0))
        }
        Err(Stop::Host(e)) if req.reply.is_some() => {
            req.reply.unwrap().send(reply_err(&e));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

impl Personality {
    /// The guest answers suspend requests (docs/hv-abi.md §9). The Xen personality does not
    /// yet: it would report its guest's opt-in here.
    fn can_suspend(&self, mem: &GuestMemoryMmap) -> bool {
        match self {
            Personality::Previrt(pv) => {
                pv.shared.read_u64(mem, abi::offsets::GUEST_FEATURES).unwrap_or(0) & abi::guest_features::SUSPEND != 0
            }
            Personality::Xen(x) => x.can_suspend(),
            Personality::None => false,
        }
    }
    fn request_suspend(&self, mem: &GuestMemoryMmap) {
        match self {
            Personality::Previrt(pv) => {
                pv.shared.raise(mem, abi::event::SUSPEND);
            }
            Personality::Xen(x) => x.request_suspend(mem),
            Personality::None => {}
        }
    }
    fn cancel_suspend(&self, mem: &GuestMemoryMmap) {
        match self {
            Personality::Previrt(pv) => {
                pv.shared.clear(mem, abi::event::SUSPEND);
            }
            Personality::Xen(x) => x.cancel_suspend(mem),
            Personality::None => {}
        }
    }
    /// The suspend call's results (resumed elsewhere, cancelled): the previrt ABI's, or Xen's
    /// SCHEDOP_shutdown(SHUTDOWN_suspend) convention (0 in the new domain, 1 cancelled).
    fn suspend_results(&self) -> (u64, u64) {
        match self {
            Personality::Xen(_) => (0, 1),
            _ => (abi::suspend::RESUMED as u64, abi::suspend::CANCELLED as u64),
        }
    }
}

/// Sections of the payload, in the order restore applies them. The tag is the on-disk id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Tag {
    Memory = 1,
    PicMaster = 2,
    PicSlave = 3,
    Ioapic = 4,
    Pit = 5,
    MpState = 10,
    Regs = 11,
    Sregs = 12,
    Xsave = 13,
    Xcrs = 14,
    DebugRegs = 15,
    Lapic = 16,
    Msrs = 17,
    VcpuEvents = 18,
    Clock = 20,
    Uart = 30,
    Previrt = 31,
    Suspend = 32,
    Disk = 33,
    Xen = 34,
    DomU = 35,
}

const TAGS: [Tag; 21] = [
    Tag::Memory,
    Tag::PicMaster,
    Tag::PicSlave,
    Tag::Ioapic,
    Tag::Pit,
    Tag::MpState,
    Tag::Regs,
    Tag::Sregs,
    Tag::Xsave,
    Tag::Xcrs,
    Tag::DebugRegs,
    Tag::Lapic,
    Tag::Msrs,
    Tag::VcpuEvents,
    Tag::Clock,
    Tag::Uart,
    Tag::Previrt,
    Tag::Suspend,
    Tag::Disk,
    Tag::Xen,
    Tag::DomU,
];

/// The KVM irqchips in a snapshot: (section, chip id).
const CHIPS: [(Tag, u32); 3] = [
    (Tag::PicMaster, KVM_IRQCHIP_PIC_MASTER),
    (Tag::PicSlave, KVM_IRQCHIP_PIC_SLAVE),
    (Tag::Ioapic, KVM_IRQCHIP_IOAPIC),
];

const ABIS: [(u32, AbiKind); 5] =
    [(0, AbiKind::Previrt), (1, AbiKind::Xen), (2, AbiKind::None), (3, AbiKind::PrevirtV2), (4, AbiKind::Xen302)];

/// A validated snapshot file.
pub struct Image {
    pub mem_size: u64,
    pub abi: AbiKind,
    /// When `previrt restore` started reading the file, finished checking it, started and
    /// finished loading guest memory (the restore-time line's parts).
    opened: Instant,
    checked: std::cell::Cell<Option<Instant>>,
    loading: std::cell::Cell<Option<Instant>>,
    loaded: std::cell::Cell<Option<Instant>>,
    bytes: Vec<u8>,
    /// (tag, payload range) of each section.
    sections: Vec<(u32, std::ops::Range<usize>)>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl Image {
    /// Check everything that can be checked without a VM; Err is one line for the user.
    pub fn parse(bytes: Vec<u8>) -> Result<Image, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!("truncated: {} bytes, shorter than the {HEADER_LEN}-byte header", bytes.len()));
        }
        if &bytes[..8] != MAGIC {
            return Err("bad magic: not a previrt snapshot".into());
        }
        let version = u32_at(&bytes, 12);
        if version != VERSION {
            return Err(format!("format version {version}, this previrt reads version {VERSION}"));
        }
        let payload = u64_at(&bytes, 32);
        let have = (bytes.len() - HEADER_LEN) as u64;
        if payload != have {
            return Err(format!("truncated or padded: header says {payload} payload bytes, file has {have}"));
        }
        let crc = crc32fast::hash(&bytes[12..]);
        if crc != u32_at(&bytes, 8) {
            return Err(format!(
                "checksum mismatch (stored {:#010x}, computed {crc:#010x}): corrupt",
                u32_at(&bytes, 8)
            ));
        }
        let vcpus = u32_at(&bytes, 16);
        if vcpus != 1 {
            return Err(format!("{vcpus} vCPUs, this VMM runs exactly 1"));
        }
        let abi_id = u32_at(&bytes, 20);
        let abi = ABIS.iter().find(|a| a.0 == abi_id).map(|a| a.1).ok_or(format!("unknown ABI id {abi_id}"))?;
        let mem_size = u64_at(&bytes, 24);
        if !(2 << 20..=crate::layout::MAX_RAM).contains(&mem_size) || !mem_size.is_multiple_of(PAGE as u64) {
            return Err(format!("memory size {mem_size} is not 2M..=3G in whole pages"));
        }
        let mut sections = Vec::new();
        let mut at = HEADER_LEN;
        while at < bytes.len() {
            if bytes.len() - at < 16 {
                return Err(format!("section header at {at} cut short"));
            }
            let (tag, len) = (u32_at(&bytes, at), u64_at(&bytes, at + 8));
            let start = at + 16;
            if len > (bytes.len() - start) as u64 {
                return Err(format!("section {tag} at {at} claims {len} bytes past the end"));
            }
            if !TAGS.iter().any(|t| *t as u32 == tag) || sections.iter().any(|s: &(u32, _)| s.0 == tag) {
                return Err(format!("unknown or repeated section {tag} at {at}"));
            }
            sections.push((tag, start..start + len as usize));
            at = start + len as usize;
        }
        let now = Instant::now();
        let img = Image {
            mem_size,
            abi,
            opened: now,
            checked: Some(now).into(),
            loading: None.into(),
            loaded: None.into(),
            bytes,
            sections,
        };
        for t in [Tag::Memory, Tag::MpState, Tag::Regs, Tag::Sregs, Tag::Uart] {
            img.section(t).ok_or(format!("section {t:?} missing"))?;
        }
        let pages = (mem_size as usize) / PAGE;
        let mem = img.section(Tag::Memory).unwrap();
        let bitmap = pages.div_ceil(8);
        let stored = mem.get(..bitmap).map_or(usize::MAX, |b| b.iter().map(|x| x.count_ones() as usize).sum());
        if mem.len() < bitmap || mem.len() - bitmap != stored * PAGE {
            return Err(format!(
                "memory section of {} bytes does not match {mem_size} bytes of guest memory",
                mem.len()
            ));
        }
        Ok(img)
    }

    /// How the snapshot was taken (no Suspend section: forced, as before session 2).
    pub fn mode(&self) -> Mode {
        match self.section(Tag::Suspend) {
            Some(b) if b.len() >= 8 && u32_at(b, 0) == 1 => Mode::Cooperative(Duration::ZERO),
            Some(b) if b.len() >= 8 => Mode::Forced(String::from_utf8_lossy(&b[8..]).into_owned()),
            _ => Mode::Forced("saved by an older previrt".into()),
        }
    }

    /// The guest had registered a previrt ABI page (hypercall or vCPU page) when it was saved.
    /// A Xen guest's live channels and shared_info (a forced snapshot keeps them).
    fn uses_xen(&self) -> bool {
        self.section(Tag::Xen).is_some_and(|b| b.len() >= 20 && u64_at(b, 12) != u64::MAX)
    }

    fn uses_previrt_abi(&self) -> bool {
        self.section(Tag::Previrt).is_some_and(|b| b.len() >= 16 && (u64_at(b, 0) | u64_at(b, 8)) & 1 != 0)
    }

    fn section(&self, t: Tag) -> Option<&[u8]> {
        self.sections.iter().find(|s| s.0 == t as u32).map(|s| &self.bytes[s.1.clone()])
    }

    /// A section holding one KVM structure; Err if it has the wrong size.
    fn pod<T: Default>(&self, t: Tag) -> Result<Option<T>, Stop> {
        let Some(b) = self.section(t) else { return Ok(None) };
        if b.len() != std::mem::size_of::<T>() {
            return Err(Stop::Host(format!("snapshot section {t:?}: {} bytes, expected {}", b.len(), size_of::<T>())));
        }
        let mut v = T::default();
        // SAFETY: T is a plain-old-data KVM UAPI structure (integers and arrays only) of
        // exactly b.len() bytes; any bit pattern is a valid value.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), &mut v as *mut T as *mut u8, b.len()) };
        Ok(Some(v))
    }
}

/// The bytes of a KVM UAPI structure.
fn pod_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: T is a plain-old-data KVM UAPI structure; reading its bytes is always valid.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
}

/// Builds the file: header placeholder, then sections; `finish` fills length and checksum.
struct Writer(Vec<u8>);

impl Writer {
    fn new(abi: AbiKind, mem_size: u64, capacity: usize) -> Writer {
        let mut b = Vec::with_capacity(capacity + HEADER_LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&ABIS.iter().find(|a| a.1 == abi).unwrap().0.to_le_bytes());
        b.extend_from_slice(&mem_size.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        Writer(b)
    }
    fn section(&mut self, t: Tag, data: &[u8]) {
        self.header(t, data.len());
        self.0.extend_from_slice(data);
    }
    fn header(&mut self, t: Tag, len: usize) {
        self.0.extend_from_slice(&(t as u32).to_le_bytes());
        self.0.extend_from_slice(&0u32.to_le_bytes());
        self.0.extend_from_slice(&(len as u64).to_le_bytes());
    }
    fn finish(mut self) -> Vec<u8> {
        let payload = (self.0.len() - HEADER_LEN) as u64;
        self.0[32..40].copy_from_slice(&payload.to_le_bytes());
        let crc = crc32fast::hash(&self.0[12..]);
        self.0[8..12].copy_from_slice(&crc.to_le_bytes());
        self.0
    }
}

/// Guest RAM as one byte slice (one region from GPA 0).
#[allow(clippy::mut_from_ref)]
fn ram(mem: &GuestMemoryMmap, size: u64) -> Result<&mut [u8], String> {
    let p = mem.get_host_address(GuestAddress(0)).map_err(|e| format!("guest memory: {e}"))?;
    // SAFETY: guest RAM is one mapping of `size` bytes from GPA 0 (`run` creates it so) and
    // the vCPU is stopped; the only other user, the console doorbell thread, touches the
    // console ring only after a doorbell, which a stopped vCPU cannot ring.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, size as usize) })
}

/// Which pages of `ram` the host has ever backed (present or swapped, /proc/self/pagemap bits
/// 63 and 62); None if the map cannot be read. The others were never touched, so they are
/// zero, and reading them would fault each one in (~9 µs a page on this host: 150 ms for
/// 64 MiB).
fn backed_pages(ram: &[u8]) -> Option<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").ok()?;
    let mut raw = vec![0u8; ram.len() / PAGE * 8];
    f.read_exact_at(&mut raw, ram.as_ptr() as u64 / PAGE as u64 * 8).ok()?;
    Some(raw.chunks_exact(8).map(|e| u64::from_le_bytes(e.try_into().unwrap()) >> 62 != 0).collect())
}

/// Memory section: a bitmap of non-zero pages, then those pages in order. One pass over
/// guest RAM, each page copied once, straight into the file buffer (the section's length and
/// bitmap are filled in behind it).
fn save_memory(w: &mut Writer, ram: &[u8]) {
    let pages = ram.len() / PAGE;
    let backed = backed_pages(ram);
    w.header(Tag::Memory, 0);
    let (len_at, bitmap_at) = (w.0.len() - 8, w.0.len());
    w.0.resize(bitmap_at + pages.div_ceil(8), 0);
    for (i, p) in ram.chunks_exact(PAGE).enumerate() {
        if backed.as_ref().is_some_and(|b| !b[i]) {
            continue;
        }
        // SAFETY: any bytes are valid u64s; the unaligned edges are checked bytewise.
        let (pre, words, post) = unsafe { p.align_to::<u64>() };
        if pre.iter().chain(post).all(|&b| b == 0) && words.iter().all(|&w| w == 0) {
            continue;
        }
        w.0[bitmap_at + i / 8] |= 1 << (i % 8);
        w.0.extend_from_slice(p);
    }
    let len = (w.0.len() - bitmap_at) as u64;
    w.0[len_at..len_at + 8].copy_from_slice(&len.to_le_bytes());
}

fn load_memory(img: &Image, ram: &mut [u8]) {
    let m = img.section(Tag::Memory).unwrap();
    let (bitmap, mut data) = m.split_at((ram.len() / PAGE).div_ceil(8));
    for (i, p) in ram.chunks_exact_mut(PAGE).enumerate() {
        if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            p.copy_from_slice(&data[..PAGE]);
            data = &data[PAGE..];
        }
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Stop {
    move |e| Stop::Host(format!("{what}: {e}"))
}

/// Every MSR the host can save, read one batch at a time (KVM_GET_MSRS stops at the first
/// it cannot read; that one is skipped).
fn read_msrs(vm: &Vm) -> Result<Vec<kvm_msr_entry>, Stop> {
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let list = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut want: Vec<kvm_msr_entry> =
        list.as_slice().iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut got = Vec::with_capacity(want.len());
    while !want.is_empty() {
        let mut m = Msrs::from_entries(&want).map_err(|e| Stop::Host(format!("MSR list: {e:?}")))?;
        let n = vm.vcpu.get_msrs(&mut m).map_err(kvm_err("KVM_GET_MSRS"))?;
        got.extend_from_slice(&m.as_slice()[..n]);
        want.drain(..(n + 1).min(want.len()));
    }
    Ok(got)
}

/// Write every MSR of the snapshot that this host accepts; returns the rejected indices.
fn write_msrs(vm: &Vm, mut entries: &[kvm_msr_entry]) -> Result<Vec<u32>, Stop> {
    let mut rejected = Vec::new();
    while !entries.is_empty() {
        let m = Msrs::from_entries(entries).map_err(|e| Stop::Host(format!("MSR list: {e:?}")))?;
        let n = vm.vcpu.set_msrs(&m).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n < entries.len() {
            rejected.push(entries[n].index);
        }
        entries = &entries[(n + 1).min(entries.len())..];
    }
    Ok(rejected)
}

/// The parts of a save, in the order `write` times them: the immediate-exit run and console
/// drain, guest memory, device and vCPU state, the CRC, the file (write, fsync, rename).
const SAVE_PARTS: [&str; 5] = ["settle", "memory", "state", "checksum", "file"];

/// Save the VM into `path`: the file's length and the ms each of [`SAVE_PARTS`] took.
fn write(
    vm: &mut Vm,
    path: &Path,
    mem_size: u64,
    abi: AbiKind,
    mode: &Mode,
    disk: Option<&(PathBuf, u64)>,
) -> Result<(usize, [f64; 5]), Stop> {
    let mut parts = [0.0; 5];
    let mut t = Instant::now();
    let mut lap = |i: usize| {
        parts[i] = t.elapsed().as_secs_f64() * 1e3;
        t = Instant::now();
    };
    // Complete an in-flight port/MMIO access (and any register write-back) without running.
    settle(vm);
    vm.bus.flush();
    if let Personality::Previrt(pv) = &vm.persona {
        // Bytes already in the console ring go out here, not again after restore.
        pv.shared.drain_console(&vm.mem).map_err(Stop::Guest)?;
    }
    let v = &vm.vcpu;
    lap(0);
    let mut w = Writer::new(abi, mem_size, mem_size as usize / 4);
    save_memory(&mut w, ram(&vm.mem, mem_size).map_err(Stop::Host)?);
    lap(1);
    for (tag, id) in CHIPS {
        let mut chip = kvm_irqchip { chip_id: id, ..Default::default() };
        if vm._vm.get_irqchip(&mut chip).is_ok() {
            w.section(tag, pod_bytes(&chip));
        }
    }
    if let Ok(pit) = vm._vm.get_pit2() {
        w.section(Tag::Pit, pod_bytes(&pit));
    }
    w.section(Tag::MpState, pod_bytes(&v.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?));
    w.section(Tag::Regs, pod_bytes(&v.get_regs().map_err(kvm_err("KVM_GET_REGS"))?));
    w.section(Tag::Sregs, pod_bytes(&v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?));
    w.section(Tag::Xsave, pod_bytes(&v.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?));
    w.section(Tag::Xcrs, pod_bytes(&v.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?));
    w.section(Tag::DebugRegs, pod_bytes(&v.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?));
    if let Ok(l) = v.get_lapic() {
        w.section(Tag::Lapic, pod_bytes(&l));
    }
    let msrs: Vec<u8> =
        read_msrs(vm)?.iter().flat_map(|m| [(m.index as u64).to_le_bytes(), m.data.to_le_bytes()]).flatten().collect();
    w.section(Tag::Msrs, &msrs);
    w.section(Tag::VcpuEvents, pod_bytes(&vm.vcpu.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?));
    w.section(Tag::Clock, pod_bytes(&vm._vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?));
    w.section(Tag::Uart, &vm.bus.save_state());
    if let Personality::Previrt(pv) = &vm.persona {
        w.section(Tag::Previrt, &save_previrt(pv));
    }
    if let Personality::Xen(x) = &vm.persona {
        w.section(Tag::Xen, &x.save(matches!(mode, Mode::Cooperative(_))));
        if let Some((gpa, port)) = x.console() {
            w.section(Tag::DomU, &[&gpa.to_le_bytes()[..], &port.to_le_bytes()].concat());
        }
    }
    w.section(Tag::Suspend, &mode.section());
    if let Some((p, len)) = disk {
        w.section(Tag::Disk, &[&len.to_le_bytes()[..], p.as_os_str().as_encoded_bytes()].concat());
    }
    lap(2);
    let bytes = w.finish();
    lap(3);
    previrt_atomic_write::write_with(path, &bytes, previrt_atomic_write::Options { mode: None, sync: true })
        .map_err(|e| Stop::Host(format!("cannot write snapshot {}: {e}", path.display())))?;
    lap(4);
    Ok((bytes.len(), parts))
}

/// Previrt ABI state: the two MSRs, the upcall vector, the timer (period, time to deadline).
fn save_previrt(pv: &crate::pv::Pv) -> Vec<u8> {
    let now = Instant::now();
    let ns = |d: Option<Duration>| d.map_or(u64::MAX, |d| d.as_nanos() as u64);
    [
        pv.rdmsr(previrt_hv_abi::MSR_HYPERCALL_PAGE).unwrap_or(0),
        pv.rdmsr(previrt_hv_abi::MSR_VCPU_PAGE).unwrap_or(0),
        pv.event_vector as u64,
        ns(pv.timer.period),
        ns(pv.timer.deadline.map(|d| d.saturating_duration_since(now))),
    ]
    .iter()
    .flat_map(|v| v.to_le_bytes())
    .collect()
}

fn restore_previrt(vm: &mut Vm, b: &[u8]) -> Result<(), Stop> {
    let Personality::Previrt(pv) = &mut vm.persona else { return Ok(()) };
    if b.len() != 40 {
        return Err(Stop::Host(format!("snapshot section Previrt: {} bytes, expected 40", b.len())));
    }
    let f = |i: usize| u64_at(b, i * 8);
    let dur = |v: u64| (v != u64::MAX).then(|| Duration::from_nanos(v));
    // Re-registering refills the hypercall page for this VMM's transport.
    for (msr, v) in [(previrt_hv_abi::MSR_HYPERCALL_PAGE, f(0)), (previrt_hv_abi::MSR_VCPU_PAGE, f(1))] {
        if pv.wrmsr(&vm.mem, msr, v) != Some(true) {
            return Err(Stop::Guest(format!("snapshot MSR {msr:#x} = {v:#x} refused by this VMM")));
        }
    }
    pv.event_vector = f(2) as u8;
    pv.timer.period = dur(f(3));
    pv.timer.deadline = dur(f(4)).map(|d| Instant::now() + d);
    Ok(())
}

/// Load the guest memory of `img` into a fresh VM's RAM.
pub(super) fn load(img: &Image, mem: &GuestMemoryMmap) -> Result<(), Error> {
    img.loading.set(Some(Instant::now()));
    load_memory(img, ram(mem, img.mem_size).map_err(Error::Host)?);
    img.loaded.set(Some(Instant::now()));
    Ok(())
}

/// Put the device and vCPU state of `img` into a fresh VM, in the order that works.
pub(super) fn apply(vm: &mut Vm, img: &Image) -> Result<(), Stop> {
    for (tag, _) in CHIPS {
        if let Some(chip) = img.pod::<kvm_irqchip>(tag)? {
            vm._vm.set_irqchip(&chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
    }
    if let Some(pit) = img.pod::<kvm_pit_state2>(Tag::Pit)? {
        vm._vm.set_pit2(&pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    }
    let v = &vm.vcpu;
    if let Some(s) = img.pod::<kvm_mp_state>(Tag::MpState)? {
        v.set_mp_state(s).map_err(kvm_err("KVM_SET_MP_STATE"))?;
    }
    if let Some(r) = img.pod::<kvm_regs>(Tag::Regs)? {
        v.set_regs(&r).map_err(kvm_err("KVM_SET_REGS"))?;
    }
    if let Some(s) = img.pod::<kvm_sregs>(Tag::Sregs)? {
        v.set_sregs(&s).map_err(kvm_err("KVM_SET_SREGS"))?;
    }
    if let Some(x) = img.pod::<kvm_xsave>(Tag::Xsave)? {
        // SAFETY: a 4 KiB kvm_xsave as KVM_GET_XSAVE returned it.
        unsafe { v.set_xsave(&x) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    }
    if let Some(x) = img.pod::<kvm_xcrs>(Tag::Xcrs)? {
        v.set_xcrs(&x).map_err(kvm_err("KVM_SET_XCRS"))?;
    }
    if let Some(d) = img.pod::<kvm_debugregs>(Tag::DebugRegs)? {
        v.set_debug_regs(&d).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    }
    if let Some(l) = img.pod::<kvm_lapic_state>(Tag::Lapic)? {
        v.set_lapic(&l).map_err(kvm_err("KVM_SET_LAPIC"))?;
    }
    let msrs: Vec<kvm_msr_entry> = img
        .section(Tag::Msrs)
        .unwrap_or(&[])
        .chunks_exact(16)
        .map(|c| kvm_msr_entry { index: u64_at(c, 0) as u32, data: u64_at(c, 8), ..Default::default() })
        .filter(|m| m.index != crate::pvm::MSR_MODE)
        .collect();
    let rejected = write_msrs(vm, &msrs)?;
    if !rejected.is_empty() {
        eprintln!("previrt restore: this host refused {} saved MSRs: {rejected:x?}", rejected.len());
    }
    if let Some(e) = img.pod::<kvm_vcpu_events>(Tag::VcpuEvents)? {
        vm.vcpu.set_vcpu_events(&e).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    }
    if let Some(mut c) = img.pod::<kvm_clock_data>(Tag::Clock)? {
        // Only the clock value: the realtime/host-TSC pairing belongs to the saving host.
        c.flags = 0;
        vm._vm.set_clock(&c).map_err(kvm_err("KVM_SET_CLOCK"))?;
    }
    vm.bus.restore_state(img.section(Tag::Uart).unwrap()).map_err(Stop::Host)?;
    if let Some(b) = img.section(Tag::Previrt) {
        restore_previrt(vm, b)?;
    }
    if let Personality::Xen(x) = &mut vm.persona {
        if let Some(b) = img.section(Tag::Xen).filter(|_| img.abi.xen_version().is_some()) {
            x.restore(&vm.mem, b).map_err(|e| Stop::Host(format!("snapshot section Xen: {e}")))?;
        }
        // An ordinary domain's console: where the guest left it (forced), or offered anew to
        // a guest that resumes as in a new domain and binds it again (cooperative).
        match (img.section(Tag::DomU).filter(|b| b.len() == 12), img.mode()) {
            (Some(b), Mode::Forced(_)) => x.restore_console(u64_at(b, 0), u32_at(b, 8)),
            (Some(_), Mode::Cooperative(_)) if x.console().is_none() => x.offer_console_ring(),
            _ => {}
        }
        // Xen system time follows the restored TSC.
        let (khz, tsc) = super::guest_tsc(&vm.vcpu).map_err(kvm_err("KVM_GET_TSC_KHZ/KVM_GET_MSRS"))?;
        x.set_clock(&vm.mem, khz, tsc);
    }
    // read + check, mapping guest RAM, copying memory in, creating the VM and applying the
    // state: the spans between the marks.
    let now = Instant::now();
    let marks = [Some(img.opened), img.checked.get(), img.loading.get(), img.loaded.get(), Some(now)];
    let ms = |w: &[Option<Instant>]| match (w[0], w[1]) {
        (Some(a), Some(b)) => format!("{:.1}", b.saturating_duration_since(a).as_secs_f64() * 1e3),
        _ => "?".into(),
    };
    let parts: Vec<String> = marks.windows(2).map(ms).collect();
    eprintln!(
        "previrt restore: resuming after {:.1} ms (read and check {}, guest RAM {}, memory {}, new VM and state {} ms); {}",
        img.opened.elapsed().as_secs_f64() * 1e3,
        parts[0],
        parts[1],
        parts[2],
        parts[3],
        match img.mode() {
            Mode::Cooperative(_) => "the guest suspended itself and re-detects its platform".to_string(),
            Mode::Forced(why) => format!("forced snapshot ({why}): the guest was not re-patched"),
        }
    );
    Ok(())
}

/// `previrt restore` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// Snapshot written by `previrt run --snapshot FILE --snapshot-after …`.
    pub file: PathBuf,
    /// Paravirtual interface offered to the resumed guest (default: the one it was saved under).
    #[arg(long, value_enum)]
    pub abi: Option<AbiKind>,
    /// Execution backend.
    #[arg(long, value_enum, default_value = "pv")]
    pub backend: Backend,
    /// Refuse the snapshot unless its guest memory is this size (K/M/G suffix).
    #[arg(long)]
    pub mem: Option<String>,
    /// Print the exit accounting table to stderr at the end.
    #[arg(long)]
    pub stats: bool,
    /// Write the exit accounting as JSON to FILE (atomically).
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Snapshot again (chained migration): where to write it.
    #[arg(long, value_name = "FILE", requires = "snapshot_after")]
    pub snapshot: Option<PathBuf>,
    /// When to snapshot again: N exits ("5000exits") or N ms ("200ms").
    #[arg(long, requires = "snapshot")]
    pub snapshot_after: Option<When>,
    /// The disk file (default: the path saved in the snapshot); must have the saved size.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Listen for `previrt snapshot` requests on this Unix socket.
    #[arg(long, value_name = "SOCKET")]
    pub control: Option<PathBuf>,
    /// How long a snapshot request waits for the guest to suspend itself.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub suspend_timeout: u64,
}

/// Read and validate a snapshot; Err is one line naming the file.
pub fn open(args: &RestoreArgs) -> Result<(Image, RunArgs), Error> {
    let name = args.file.display();
    let t0 = Instant::now();
    let bytes = std::fs::read(&args.file).map_err(|e| Error::BadInput(format!("cannot read {name}: {e}")))?;
    let mut img = Image::parse(bytes).map_err(|e| Error::BadInput(format!("{name}: {e}")))?;
    img.opened = t0;
    if let Some(m) = &args.mem {
        let want = crate::parse_size(m).ok_or_else(|| Error::BadInput(format!("--mem {m}: not a size")))?;
        if want != img.mem_size {
            return Err(Error::BadInput(format!(
                "{name}: snapshot has {} MiB of guest memory, --mem asks for {} MiB",
                img.mem_size >> 20,
                want >> 20
            )));
        }
    }
    let abi = args.abi.unwrap_or(img.abi);
    if let (Mode::Forced(why), true, true) = (img.mode(), abi != img.abi, img.uses_previrt_abi() || img.uses_xen()) {
        return Err(Error::BadInput(format!(
            "{name}: forced snapshot ({why}) of a guest using the {:?} ABI cannot resume under --abi {:?}: \
             nothing re-patched it",
            img.abi, abi
        )));
    }
    let disk = match img.section(Tag::Disk) {
        Some(b) if b.len() >= 8 => {
            let saved = PathBuf::from(String::from_utf8_lossy(&b[8..]).into_owned());
            let p = args.disk.clone().unwrap_or(saved);
            let len =
                std::fs::metadata(&p).map_err(|e| Error::BadInput(format!("{name}: disk {}: {e}", p.display())))?.len();
            if len != u64_at(b, 0) {
                return Err(Error::BadInput(format!(
                    "{name}: disk {} has {len} bytes, the snapshot was taken with {}",
                    p.display(),
                    u64_at(b, 0)
                )));
            }
            Some(p)
        }
        _ if args.disk.is_some() => {
            return Err(Error::BadInput(format!("{name}: --disk given but the snapshot was taken without a disk")))
        }
        _ => None,
    };
    let run = RunArgs {
        kernel: args.file.clone(),
        mem: img.mem_size.to_string(),
        append: String::new(),
        initrd: None,
        disk,
        boot: None,
        backend: args.backend,
        abi,
        // An ordinary domain stays one under the Xen personality.
        domu: img.section(Tag::DomU).is_some() && abi.xen_version().is_some(),
        stats: args.stats,
        stats_json: args.stats_json.clone(),
        profile: None,
        profile_steps: None,
        profile_writes: false,
        snapshot: args.snapshot.clone(),
        snapshot_after: args.snapshot_after,
        control: args.control.clone(),
        suspend_timeout: args.suspend_timeout,
    };
    Ok((img, run))
}

/// `previrt snapshot` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotArgs {
    /// The control socket of a `previrt run --control SOCKET`.
    pub socket: PathBuf,
    /// Where the VMM writes the snapshot.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print the VMM's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `previrt snapshot SOCKET -o FILE`: ask a running VMM to save its VM; 0 saved, 1 the VMM
/// could not, 2 bad input (no such socket).
pub fn main_snapshot(args: &SnapshotArgs) -> i32 {
    let fail = |code: i32, msg: String| {
        eprintln!("previrt snapshot: {msg}");
        code
    };
    let out = match args.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => match std::fs::canonicalize(dir) {
            Ok(d) => d.join(args.output.file_name().unwrap_or_default()),
            Err(e) => return fail(2, format!("{}: {e}", dir.display())),
        },
        None => std::env::current_dir().unwrap_or_default().join(&args.output),
    };
    let mut conn = match UnixStream::connect(&args.socket) {
        Ok(c) => c,
        Err(e) => return fail(2, format!("cannot connect to {}: {e}", args.socket.display())),
    };
    if let Err(e) = writeln!(conn, "{}", serde_json::json!({ "path": out })) {
        return fail(1, format!("{}: {e}", args.socket.display()));
    }
    let mut line = String::new();
    let _ = BufReader::new(&conn).read_line(&mut line);
    let v: serde_json::Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(_) => return fail(1, format!("no answer from {} (the VM ended?)", args.socket.display())),
    };
    if args.json {
        println!("{v}");
    }
    if v["ok"] != true {
        return fail(1, v["error"].as_str().unwrap_or("failed").to_string());
    }
    if !args.json {
        let how = match v["cooperative"].as_bool() {
            Some(true) => format!("cooperative, guest suspended after {:.1} ms", v["wait_ms"].as_f64().unwrap_or(0.0)),
            _ => format!("forced: {}; no re-patching", v["reason"].as_str().unwrap_or("")),
        };
        println!("snapshot written to {} ({} bytes; {how})", out.display(), v["bytes"]);
    }
    0
}
