//! The VM: KVM setup and the vCPU run loop.

use std::fs::File;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_guest_debug, kvm_pit_config, kvm_regs, kvm_sregs, kvm_userspace_memory_region, CpuId,
    KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM_CAP_X86_USER_SPACE_MSR, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP, KVM_MAX_CPUID_ENTRIES, KVM_MSR_EXIT_REASON_INVAL, KVM_MSR_EXIT_REASON_UNKNOWN,
    KVM_PIT_SPEAKER_DUMMY, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, SyncReg, VcpuExit, VcpuFd, VmFd};
use previrt_hv_abi as abi;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BadInput};
use crate::devices::{ConsoleOut, IrqLine, PortBus, PortEffect, COM1_IRQ};
use crate::emulate::{self, Inject};
use crate::kick::Kicker;
use crate::pv::{Outcome, Pv};
use crate::stats::{Stats, Table};
use crate::xen::Xen;
use crate::{AbiKind, RunArgs};

#[path = "snapshot.rs"]
pub mod snapshot;

/// Why a run ended without a guest-chosen status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Host(String),
    #[error("guest stopped: {msg}")]
    Guest { msg: String, stats: Stats },
}

impl Error {
    pub fn exit_status(&self) -> i32 {
        match self {
            Error::BadInput(_) => 2,
            Error::Host(_) => 1,
            Error::Guest { .. } => 4,
        }
    }
}

impl From<BadInput> for Error {
    fn from(e: BadInput) -> Self {
        Error::BadInput(e.0)
    }
}

fn host<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Host(format!("{what}: {e}"))
}

/// A finished run.
#[derive(Debug)]
pub struct RunResult {
    /// Process exit status chosen by the guest.
    pub status: i32,
    pub stats: Stats,
}

/// The paravirtual personality offered to the guest.
enum Personality {
    None,
    Previrt(Pv),
    Xen(Xen),
}

impl Personality {
    fn cpuid(&self) -> Vec<(u32, u32, u32, u32, u32)> {
        match self {
            Personality::None => vec![],
            Personality::Previrt(p) => p.cpuid().to_vec(),
            Personality::Xen(x) => x.cpuid().to_vec(),
        }
    }
}

const EFLAGS_IF: u64 = 1 << 9;

fn read_file(p: &std::path::Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(p).map_err(|e| Error::BadInput(format!("cannot read {what} {}: {e}", p.display())))
}

struct Vm {
    _vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    bus: PortBus,
    persona: Personality,
    stats: Stats,
    kicker: Option<Kicker>,
    /// Where the #UD-handler breakpoint is armed (see `emulate::revector_user_int`).
    ud_bp: Option<u64>,
    /// Single-stepping over the #UD handler's first instruction.
    ud_stepping: bool,
    /// Registers are read and written through kvm_run (KVM_CAP_SYNC_REGS).
    sync_regs: bool,
    /// `--profile`: single-stepping, tracing MMIO and page-table accesses.
    profile: Option<crate::profile::Profile>,
    /// `--snapshot-after`: when to save and stop.
    snapshot: Option<snapshot::Trigger>,
}

/// Boot `args.kernel` and run it until it stops; console output goes to `out`.
pub fn run(args: &RunArgs, out: Box<dyn std::io::Write + Send>) -> Result<RunResult, Error> {
    run_with(args, out, None)
}

/// Boot `args.kernel`, or resume the snapshot `restore` (then `args.kernel` is not read).
pub(crate) fn run_with(
    args: &RunArgs,
    out: Box<dyn std::io::Write + Send>,
    restore: Option<&snapshot::Image>,
) -> Result<RunResult, Error> {
    if args.domu && args.abi.xen_version().is_none() {
        return Err(Error::BadInput("--domu: needs --abi xen or xen-3.0.2".into()));
    }
    let mem_size = crate::parse_size(&args.mem)
        .filter(|&s| (2 << 20..=crate::layout::MAX_RAM).contains(&s) && s % 4096 == 0)
        .ok_or_else(|| Error::BadInput(format!("--mem {}: need 2M..=3G in whole pages (e.g. 128M)", args.mem)))?;
    let disk = match &args.disk {
        None => None,
        Some(p) => Some(
            File::options()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| Error::BadInput(format!("cannot open disk {}: {e}", p.display())))?,
        ),
    };
    let console = ConsoleOut::new(out);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)]).map_err(host("guest memory"))?;
    let loaded = match restore {
        Some(img) => {
            snapshot::load(img, &mem)?;
            None
        }
        None => {
            let image = read_file(&args.kernel, "kernel")?;
            let initrd = args.initrd.as_deref().map(|p| read_file(p, "initrd")).transpose()?;
            let loaded = boot::load_kernel(&mem, &image, args.boot)?;
            let start_flags =
                if args.abi.xen_version().is_some() && !args.domu { crate::xen::SIF_INITDOMAIN } else { 0 };
            boot::write_boot_info(&mem, mem_size, &loaded, &args.append, initrd.as_deref(), start_flags)?;
            Some(loaded)
        }
    };
    let persona = match args.abi {
        AbiKind::None => Personality::None,
        AbiKind::Previrt | AbiKind::PrevirtV2 => Personality::Previrt(
            Pv::new(console.clone(), disk).map_err(host("disk"))?.with_major(args.abi.hv_major().unwrap_or(1)),
        ),
        AbiKind::Xen | AbiKind::Xen302 => {
            let mut x = Xen::new(console.clone(), args.abi.xen_version().unwrap_or(crate::xen::Version::V4_17));
            if args.domu {
                x.offer_console_ring();
            }
            Personality::Xen(x)
        }
    };

    let kvm = Kvm::new().map_err(|e| {
        Error::Host(format!("cannot open /dev/kvm: {e} (is KVM available and accessible? see scripts/install-deps.sh)"))
    })?;
    let vm = kvm.create_vm().map_err(host("KVM_CREATE_VM"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem_size,
        userspace_addr: mem.get_host_address(GuestAddress(0)).map_err(host("guest memory"))? as u64,
    };
    // SAFETY: the region is guest memory we own; it outlives the VM (both live in `Vm`, and
    // the VM fd is dropped first when the run ends).
    unsafe { vm.set_user_memory_region(region) }.map_err(host("KVM_SET_USER_MEMORY_REGION"))?;
    let _ = vm.set_tss_address(0xfffb_d000);
    if vm.check_extension(Cap::Irqchip) {
        vm.create_irq_chip().map_err(host("KVM_CREATE_IRQCHIP"))?;
        if vm.check_extension(Cap::Pit2) {
            vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
                .map_err(host("KVM_CREATE_PIT2"))?;
        }
    }
    // Unknown and invalid MSRs come to us: the paravirtual MSRs live there, and a wrong MSR
    // access is counted and answered with #GP like on hardware.
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [(KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL) as u64, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(host("KVM_CAP_X86_USER_SPACE_MSR"))?;
    // KVM turns an emulation failure at CPL > 0 into #UD for the guest; we want every one, so
    // user-mode `int n` (which the host emulator refuses) is completed like kernel-mode ones.
    if vm.check_extension_raw(KVM_CAP_EXIT_ON_EMULATION_FAILURE as libc::c_ulong) > 0 {
        let cap = kvm_enable_cap { cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE, args: [1, 0, 0, 0], ..Default::default() };
        vm.enable_cap(&cap).map_err(host("KVM_CAP_EXIT_ON_EMULATION_FAILURE"))?;
    }
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host("eventfd"))?;
    vm.register_irqfd(&irq, COM1_IRQ).map_err(host("KVM_IRQFD"))?;
    let mut persona = persona;
    if let Personality::Previrt(pv) = &mut persona {
        pv.doorbell = start_doorbell(&vm, pv, &mem);
    }

    let vcpu = vm.create_vcpu(0).map_err(host("KVM_CREATE_VCPU"))?;
    // The mode first: the ABI's CPUID leaf advertises it to the guest's runtime.
    let native = crate::pvm::setup(&vcpu, args.backend).map_err(Error::Host)?;
    if let Personality::Previrt(pv) = &mut persona {
        pv.native = native;
        pv.tsc_khz = vcpu.get_tsc_khz().map_err(host("KVM_GET_TSC_KHZ"))?;
    }
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(host("KVM_GET_SUPPORTED_CPUID"))?;
    cpuid = guest_cpuid(&cpuid, &persona.cpuid()).map_err(host("CPUID table"))?;
    vcpu.set_cpuid2(&cpuid).map_err(host("KVM_SET_CPUID2"))?;
    // A restored vCPU gets its state from the snapshot just before it runs.
    if let Some(loaded) = &loaded {
        let sregs = vcpu.get_sregs().map_err(host("KVM_GET_SREGS"))?;
        let (regs, sregs) = boot::initial_state(&mem, loaded, sregs)?;
        vcpu.set_sregs(&sregs).map_err(host("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs).map_err(host("KVM_SET_REGS"))?;
        let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        vcpu.set_fpu(&fpu).map_err(host("KVM_SET_FPU"))?;
        if vm.check_extension(Cap::Irqchip) {
            set_lint(&vcpu).map_err(host("KVM_SET_LAPIC"))?;
        }
    }
    if let Personality::Xen(x) = &mut persona {
        let (khz, tsc) = guest_tsc(&vcpu).map_err(host("TSC (KVM_GET_TSC_KHZ, KVM_GET_MSRS)"))?;
        x.set_clock(&mem, khz, tsc);
    }

    let kicker = match persona {
        Personality::Previrt(_) | Personality::Xen(_) => {
            Some(Kicker::for_current_thread().map_err(host("timer thread"))?)
        }
        _ if args.profile_writes => Some(Kicker::for_current_thread().map_err(host("timer thread"))?),
        _ => None,
    };
    let bus = PortBus::new(IrqLine(irq), console);
    const KVM_CAP_SYNC_REGS: libc::c_ulong = 74;
    let sync = (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS) as i32;
    let sync_regs = vm.check_extension_raw(KVM_CAP_SYNC_REGS) & sync == sync;
    let mut vcpu = vcpu;
    if sync_regs {
        vcpu.set_sync_valid_reg(SyncReg::Register);
        vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
    }
    let mut vm = Vm {
        _vm: vm,
        vcpu,
        mem,
        bus,
        persona,
        stats: Stats::default(),
        kicker,
        ud_bp: None,
        ud_stepping: false,
        sync_regs,
        profile: match &args.profile {
            None => None,
            Some(_) if args.profile_writes => Some(crate::profile::Profile::writes(mem_size, region.userspace_addr)),
            Some(_) => Some(crate::profile::Profile::new(mem_size, args.profile_steps)),
        },
        snapshot: snapshot::Trigger::new(args, mem_size).map_err(Error::BadInput)?,
    };
    if vm.profile.as_ref().is_some_and(|p| p.wants_steps()) {
        let dbg = kvm_guest_debug { control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, ..Default::default() };
        vm.vcpu.set_guest_debug(&dbg).map_err(host("KVM_SET_GUEST_DEBUG (--profile)"))?;
    }
    let kvm_stats = crate::kvmstats::KvmStats::open(&vm.vcpu);
    let start = Instant::now();
    let res = match restore {
        Some(img) => snapshot::apply(&mut vm, img).and_then(|_| vm.run_loop()),
        None => vm.run_loop(),
    };
    vm.stats.wall = start.elapsed();
    vm.stats.kvm = kvm_stats.map(|k| k.read()).unwrap_or_default();
    vm.bus.flush();
    if let (Some(p), Some(path)) = (&vm.profile, &args.profile) {
        let json = serde_json::to_vec_pretty(&p.to_json(&args.kernel)).unwrap_or_default();
        previrt_atomic_write::write_with(path, &json, previrt_atomic_write::Options { mode: None, sync: true })
            .map_err(|e| Error::Host(format!("cannot write {}: {e}", path.display())))?;
    }
    match res {
        Ok(status) => Ok(RunResult { status, stats: vm.stats }),
        Err(Stop::Guest(msg)) => Err(Error::Guest { msg, stats: vm.stats }),
        Err(Stop::Host(msg)) => Err(Error::Host(msg)),
    }
}

/// Register the console doorbell as an ioeventfd served by a thread; false if the host
/// cannot (the port then exits to user space like any other and is handled synchronously).
fn start_doorbell(vm: &VmFd, pv: &Pv, mem: &GuestMemoryMmap) -> bool {
    let Ok(evt) = EventFd::new(0) else { return false };
    if vm.register_ioevent(&evt, &IoEventAddress::Pio(abi::CONSOLE_DOORBELL_PORT as u64), NoDatamatch).is_err() {
        return false;
    }
    let shared = pv.shared.clone();
    let mem = mem.clone();
    // The thread lives as long as the process: it only ever drains the console ring, and a
    // corrupt ring is reported by the next synchronous flush on the vCPU thread.
    std::thread::Builder::new()
        .name("previrt-doorbell".into())
        .spawn(move || {
            while evt.read().is_ok() {
                let _ = shared.drain_console(&mem);
            }
        })
        .is_ok()
}

/// The guest's CPUID table: the host's supported leaves with the APIC IDs of vCPU 0 (KVM
/// reports whichever host CPU answered the ioctl), and the personality's 0x40000000.. leaves
/// instead of KVM's.
fn guest_cpuid(base: &CpuId, leaves: &[(u32, u32, u32, u32, u32)]) -> Result<CpuId, String> {
    let mut v: Vec<_> = base.as_slice().iter().filter(|e| e.function & 0xf000_0000 != 0x4000_0000).copied().collect();
    for e in &mut v {
        match e.function {
            // ebx[31:24] initial APIC ID, ebx[23:16] logical processors per package.
            1 => e.ebx = (e.ebx & 0xffff) | (1 << 16),
            // x2APIC topology leaves: edx = x2APIC ID.
            0xb | 0x1f => e.edx = 0,
            _ => {}
        }
    }
    for &(function, eax, ebx, ecx, edx) in leaves {
        v.push(kvm_bindings::kvm_cpuid_entry2 {
            function,
            index: 0,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        });
    }
    CpuId::from_entries(&v).map_err(|e| format!("{e:?}"))
}

/// LAPIC LINT0 = ExtINT (the PIC's output reaches the CPU), LINT1 = NMI, as firmware leaves it.
fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut l = vcpu.get_lapic()?;
    for (off, mode) in [(0x350usize, 0x700u32), (0x360, 0x400)] {
        let b = &mut l.regs[off..off + 4];
        let v = u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
        let v = (v & !0x1_0700) | mode;
        for (d, s) in b.iter_mut().zip(v.to_le_bytes()) {
            *d = s as _;
        }
    }
    vcpu.set_lapic(&l)
}

/// Why the run loop stopped without a guest status.
enum Stop {
    Guest(String),
    Host(String),
}

/// Work left over from an exit whose data borrowed the vCPU.
enum After {
    Nothing,
    /// A store into a page table the `--profile-writes` tracer write-protects: address, data.
    ProfileWrite(u64, [u8; 8], usize),
    Hypercall(u64),
    Emulate,
    UdBreakpoint,
    Exit(i32),
    Stop(Stop),
}

fn msr_name(index: u32, write: bool) -> String {
    format!("{index:#x} {}", if write { "wr" } else { "rd" })
}

impl Vm {
    fn guest<T>(&self, msg: String) -> Result<T, Stop> {
        Err(Stop::Guest(msg))
    }

    // Registers come from kvm_run's sync area when the host offers it: each register ioctl
    // costs ~12 µs on this host, the copy inside KVM_RUN next to nothing.
    fn regs(&self) -> Result<kvm_regs, Stop> {
        if self.sync_regs {
            return Ok(self.vcpu.sync_regs().regs);
        }
        self.vcpu.get_regs().map_err(|e| Stop::Host(format!("KVM_GET_REGS: {e}")))
    }

    fn sregs(&self) -> Result<kvm_sregs, Stop> {
        if self.sync_regs {
            return Ok(self.vcpu.sync_regs().sregs);
        }
        self.vcpu.get_sregs().map_err(|e| Stop::Host(format!("KVM_GET_SREGS: {e}")))
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), Stop> {
        if self.sync_regs {
            self.vcpu.sync_regs_mut().regs = *regs;
            self.vcpu.set_sync_dirty_reg(SyncReg::Register);
            return Ok(());
        }
        self.vcpu.set_regs(regs).map_err(|e| Stop::Host(format!("KVM_SET_REGS: {e}")))
    }

    fn run_loop(&mut self) -> Result<i32, Stop> {
        loop {
            self.before_entry()?;
            let t0 = Instant::now();
            let exit = self.vcpu.run();
            let t1 = Instant::now();
            self.stats.in_kvm += t1 - t0;
            let (reason, detail, after) = match exit {
                Err(e) if e.errno() == libc::EINTR => ("interrupted", None, After::Nothing),
                Err(e) => return Err(Stop::Host(format!("KVM_RUN: {e}"))),
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => {
                        let mut v = [0u8; 4];
                        v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                        let after = if port == abi::HYPERCALL_PORT && !matches!(self.persona, Personality::None) {
                            After::Hypercall(u32::from_le_bytes(v) as u64)
                        } else if port == abi::CONSOLE_DOORBELL_PORT && matches!(self.persona, Personality::Previrt(_))
                        {
                            After::Hypercall(abi::hc::CONSOLE_FLUSH)
                        } else {
                            match self.bus.write(port, data) {
                                PortEffect::Exit(s) => After::Exit(s),
                                PortEffect::None => After::Nothing,
                            }
                        };
                        ("io_out", Some((Table::Port, format!("{port:#x} out"))), after)
                    }
                    VcpuExit::IoIn(port, data) => {
                        self.bus.read(port, data);
                        ("io_in", Some((Table::Port, format!("{port:#x} in"))), After::Nothing)
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        data.fill(0xff);
                        ("mmio_read", Some((Table::Mmio, format!("{addr:#x} rd"))), After::Nothing)
                    }
                    VcpuExit::MmioWrite(addr, data) if self.profile.as_ref().is_some_and(|p| p.protects(addr)) => {
                        let mut v = [0u8; 8];
                        v[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
                        ("profile_write", None, After::ProfileWrite(addr, v, data.len().min(8)))
                    }
                    VcpuExit::MmioWrite(addr, _) => {
                        ("mmio_write", Some((Table::Mmio, format!("{addr:#x} wr"))), After::Nothing)
                    }
                    VcpuExit::X86Rdmsr(m) => {
                        let v = match &self.persona {
                            Personality::Previrt(p) => p.rdmsr(m.index),
                            Personality::Xen(x) => x.rdmsr(m.index),
                            Personality::None => None,
                        };
                        match v {
                            Some(v) => *m.data = v,
                            None => *m.error = 1,
                        }
                        ("rdmsr", Some((Table::Msr, msr_name(m.index, false))), After::Nothing)
                    }
                    VcpuExit::X86Wrmsr(m) => {
                        let ok = match &mut self.persona {
                            Personality::Previrt(p) => p.wrmsr(&self.mem, m.index, m.data),
                            Personality::Xen(x) => x.wrmsr(&self.mem, m.index, m.data),
                            Personality::None => None,
                        };
                        if ok != Some(true) {
                            *m.error = 1;
                        }
                        ("wrmsr", Some((Table::Msr, msr_name(m.index, true))), After::Nothing)
                    }
                    VcpuExit::Hlt => ("hlt", None, After::Nothing),
                    VcpuExit::Debug(_) => ("debug", None, After::UdBreakpoint),
                    VcpuExit::Shutdown => ("shutdown", None, After::Stop(Stop::Guest(String::new()))),
                    VcpuExit::InternalError => ("internal_error", None, After::Emulate),
                    VcpuExit::FailEntry(r, _) => {
                        ("fail_entry", None, After::Stop(Stop::Host(format!("KVM_EXIT_FAIL_ENTRY, reason {r:#x}"))))
                    }
                    VcpuExit::SystemEvent(t, _) => (
                        "system_event",
                        None,
                        After::Stop(Stop::Guest(format!("system event {t} (reset or power-off)"))),
                    ),
                    VcpuExit::IrqWindowOpen | VcpuExit::Intr => ("interrupt_window", None, After::Nothing),
                    other => {
                        let name = format!("{other:?}");
                        ("other", None, After::Stop(Stop::Host(format!("unhandled KVM exit {name}"))))
                    }
                },
            };
            let status = match after {
                After::Nothing => None,
                After::Exit(s) => Some(s),
                After::Hypercall(nr) => self.hypercall(nr)?,
                After::Emulate => {
                    self.emulate()?;
                    None
                }
                After::UdBreakpoint => {
                    self.debug_exit()?;
                    None
                }
                After::ProfileWrite(addr, v, n) => {
                    let (regs, sregs) = (self.regs()?, self.sregs()?);
                    if let Some(p) = &mut self.profile {
                        p.write_exit(&self._vm, &self.mem, &regs, &sregs, addr, &v[..n]).map_err(Stop::Host)?;
                    }
                    None
                }
                After::Stop(Stop::Guest(m)) if m.is_empty() => {
                    let rip = self.regs().map(|r| r.rip).unwrap_or(0);
                    return self.guest(format!("triple fault (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}"));
                }
                After::Stop(s) => return Err(s),
            };
            let dt = t1.elapsed();
            self.stats.add(Table::Reason, reason, dt);
            if let Some((t, k)) = detail {
                self.stats.add(t, k, dt);
            }
            if let Some(s) = status {
                return Ok(s);
            }
            if let Some(s) = snapshot::poll(self)? {
                return Ok(s);
            }
        }
    }

    /// Keep a hardware breakpoint on the guest's #UD handler, so a user-mode `int n` that the
    /// host turns into #UD comes to us (KVM-PVM runs ring 3 natively: no exit otherwise). The
    /// IDT is re-read at every exit; a guest that changes it and enters user mode without
    /// any exit in between is not covered. The breakpoint takes over debug register 0.
    fn arm_ud_breakpoint(&mut self) -> Result<(), Stop> {
        if self.ud_stepping {
            return Ok(());
        }
        let sregs = self.sregs()?;
        let target = emulate::read_gate(&self.mem, &sregs, emulate::UD_VECTOR).map(|g| g.target);
        if target == self.ud_bp {
            return Ok(());
        }
        self.apply_debug(target)
    }

    /// Set the vCPU's debug controls: the #UD breakpoint at `target`, single-stepping while
    /// the profile wants it.
    fn apply_debug(&mut self, target: Option<u64>) -> Result<(), Stop> {
        let mut dbg = kvm_guest_debug::default();
        if let Some(t) = target {
            dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[0] = t;
            // DR7: L0 enabled, execute breakpoint (R/W0 = 00, LEN0 = 00).
            dbg.arch.debugreg[7] = 1;
        }
        if self.profile.as_ref().is_some_and(|p| p.wants_steps()) {
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        }
        self.vcpu.set_guest_debug(&dbg).map_err(|e| Stop::Host(format!("KVM_SET_GUEST_DEBUG: {e}")))?;
        self.ud_bp = target;
        Ok(())
    }

    /// A debug exit: a `--profile` single step (traced), the #UD-handler breakpoint, or the
    /// step over the handler's first instruction.
    fn debug_exit(&mut self) -> Result<(), Stop> {
        if !self.profile.as_ref().is_some_and(|p| p.wants_steps()) {
            return self.ud_breakpoint();
        }
        let (regs, sregs) = (self.regs()?, self.sregs()?);
        if let Some(p) = &mut self.profile {
            p.step(&self.mem, &regs, &sregs);
            if let Some(n) = p.window_done() {
                return Err(Stop::Guest(format!("profile window of {n} instructions traced (--profile-steps)")));
            }
        }
        if self.ud_stepping || Some(regs.rip) == self.ud_bp {
            return self.ud_breakpoint();
        }
        Ok(())
    }

    /// The #UD-handler breakpoint fired: re-vector a user-mode `int n`, or let the handler run.
    fn ud_breakpoint(&mut self) -> Result<(), Stop> {
        if self.ud_stepping {
            self.ud_stepping = false;
            self.ud_bp = None;
            return Ok(());
        }
        let mut regs = self.regs()?;
        let sregs = self.sregs()?;
        let mut cpu = emulate::Cpu { mem: &self.mem, regs, sregs, sregs_dirty: false, xsave: None, xsave_dirty: false };
        let done = emulate::revector_user_int(&mut cpu);
        regs = cpu.regs;
        match done {
            Some(what) => self.stats.add(Table::Insn, what, Duration::ZERO),
            // Resume flag: execute the handler's first instruction without re-hitting.
            None => {
                // Step over the handler's first instruction with the breakpoint off (the host
                // ignores RFLAGS.RF); the single-step exit re-arms it.
                let dbg =
                    kvm_guest_debug { control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, ..Default::default() };
                self.vcpu.set_guest_debug(&dbg).map_err(|e| Stop::Host(format!("KVM_SET_GUEST_DEBUG: {e}")))?;
                self.ud_stepping = true;
                return Ok(());
            }
        }
        self.set_regs(&regs)
    }

    /// Before each KVM_RUN: the #UD breakpoint, then the personality's timer and events.
    fn before_entry(&mut self) -> Result<(), Stop> {
        self.arm_ud_breakpoint()?;
        // The write-protect tracer learns of CR3 loads only here, at the next exit.
        if self.profile.as_ref().is_some_and(|p| !p.single_steps()) {
            let sregs = self.sregs()?;
            let mut stepping = false;
            if let Some(p) = &mut self.profile {
                stepping = p.wants_steps();
                p.observe(&self._vm, &self.mem, &sregs).map_err(Stop::Host)?;
                stepping &= !p.wants_steps();
            }
            if stepping {
                self.apply_debug(self.ud_bp)?;
            }
            self.arm_kicker(None);
        }
        if let Personality::Xen(x) = &mut self.persona {
            x.tick(&self.mem, Instant::now());
            let (deadline, vector) = (x.deadline(), x.pending_vector(&self.mem));
            self.arm_kicker(deadline);
            return match vector {
                Some(v) => self.inject(v).map(|_| ()),
                None => Ok(()),
            };
        }
        let Personality::Previrt(pv) = &mut self.persona else { return Ok(()) };
        pv.tick(&self.mem, Instant::now());
        let (deadline, sh, vector) = (pv.timer.deadline, pv.shared.clone(), pv.event_vector);
        self.arm_kicker(deadline);
        let (Some(pending), Some(vif)) =
            (sh.read_u64(&self.mem, abi::offsets::PENDING), sh.read_u32(&self.mem, abi::offsets::VIF))
        else {
            return Ok(());
        };
        // A suspend request is polled by the guest, never injected.
        if pending & abi::event::UPCALL == 0 || vif == 0 || vector == 0 {
            return Ok(());
        }
        if !self.inject(vector)? {
            return Ok(());
        }
        sh.write_u32(&self.mem, abi::offsets::VIF, 0);
        let n = sh.read_u64(&self.mem, abi::offsets::UPCALLS).unwrap_or(0);
        sh.write_u64(&self.mem, abi::offsets::UPCALLS, n.wrapping_add(1));
        Ok(())
    }

    /// Wake the vCPU thread at the personality's next timer `deadline`, the snapshot
    /// trigger's or the write-protect tracer's next look at CR3, whichever is first.
    fn arm_kicker(&self, deadline: Option<Instant>) {
        if let Some(k) = &self.kicker {
            let suspend = self.snapshot.as_ref().and_then(|t| t.deadline());
            let look = self.profile.as_ref().and_then(|p| p.next_look());
            k.set(deadline.into_iter().chain(suspend).chain(look).min());
        }
    }

    /// Inject external interrupt `vector` if the vCPU can take one now (RFLAGS.IF, no
    /// interrupt shadow, nothing else being injected). True if injected.
    fn inject(&mut self, vector: u8) -> Result<bool, Stop> {
        let regs = self.regs()?;
        let mut ev = self.vcpu.get_vcpu_events().map_err(|e| Stop::Host(format!("KVM_GET_VCPU_EVENTS: {e}")))?;
        if regs.rflags & EFLAGS_IF == 0
            || ev.interrupt.injected != 0
            || ev.exception.injected != 0
            || ev.interrupt.shadow != 0
        {
            return Ok(false);
        }
        ev.interrupt.injected = 1;
        ev.interrupt.nr = vector;
        ev.interrupt.soft = 0;
        ev.flags = 0;
        self.vcpu.set_vcpu_events(&ev).map_err(|e| Stop::Host(format!("KVM_SET_VCPU_EVENTS: {e}")))?;
        self.stats.add(Table::Reason, "upcall_injected", Duration::ZERO);
        Ok(true)
    }

    /// A hypercall through the stub port: number in eax, arguments in registers.
    fn hypercall(&mut self, nr: u64) -> Result<Option<i32>, Stop> {
        let t = Instant::now();
        let mut regs = self.regs()?;
        let sregs = self.sregs()?;
        // Only the guest kernel may call the hypervisor (as Xen: -EPERM from user mode), even
        // if it lets user code reach the port through IOPL or the I/O bitmap.
        // In KVM-PVM's native mode the kernel itself runs on the mode's ring-3 code segment.
        let native_kernel =
            matches!(&self.persona, Personality::Previrt(p) if p.native) && sregs.cs.selector == crate::pvm::NATIVE_CS;
        if sregs.cs.selector & 3 != 0 && !native_kernel {
            regs.rax = abi::err::PERM as u64;
            self.stats.add(Table::Hypercall, "refused:user-mode", t.elapsed());
            return self.set_regs(&regs).map(|_| None);
        }
        let (name, out) = match &mut self.persona {
            Personality::Previrt(pv) => {
                let a = [regs.rdi, regs.rsi, regs.rdx, regs.rcx];
                let mut out = pv.hypercall(&self.mem, nr, a, Instant::now());
                if out == Outcome::Halt {
                    out = halt(pv, &self.mem);
                }
                (format!("previrt:{}", pv.last_name()), out)
            }
            Personality::Xen(x) => {
                // Xen's two register conventions: 64-bit code passes rdi, rsi, rdx, r10, r8;
                // 32-bit code ebx, ecx, edx, esi, edi.
                let bits64 = sregs.cs.l == 1;
                let a = if bits64 {
                    [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8]
                } else {
                    [regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi].map(|r| r & 0xffff_ffff)
                };
                let mem = &self.mem;
                let tr = |la| emulate::translate(mem, &sregs, la);
                let mut out = x.hypercall(mem, nr, a, bits64, &tr);
                if out == Outcome::Halt {
                    out = x.block(mem);
                }
                (format!("xen:{}", crate::xen::name(nr)), out)
            }
            Personality::None => unreachable!("hypercall port is only routed with a personality"),
        };
        let r = match out {
            Outcome::Ret(v) => {
                regs.rax = v as u64;
                self.set_regs(&regs)?;
                None
            }
            Outcome::Shutdown(s) => Some(s),
            Outcome::Suspend => {
                self.stats.add(Table::Hypercall, name, t.elapsed());
                return snapshot::suspended(self);
            }
            Outcome::Fatal(m) => return self.guest(format!("{name} at RIP {:#x}: {m}", regs.rip)),
            Outcome::Halt => unreachable!("halt is resolved above"),
        };
        self.stats.add(Table::Hypercall, name, t.elapsed());
        Ok(r)
    }

    /// KVM gave up on an instruction: complete it ourselves or stop with its description.
    fn emulate(&mut self) -> Result<(), Stop> {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live member.
        let (sub, ndata, data) = unsafe {
            let i = &run.__bindgen_anon_1.internal;
            (i.suberror, i.ndata, i.data)
        };
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let what = match emulate::fetch(&self.mem, &regs, &sregs) {
            Ok(f) => f,
            Err(e) => {
                return self.guest(format!(
                    "KVM internal error {sub} ({ndata} words {:x?}); {e}",
                    &data[..(ndata as usize).min(4)]
                ))
            }
        };
        const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
        if sub != KVM_INTERNAL_ERROR_EMULATION {
            return self.guest(format!("KVM internal error {sub} at {}", what.describe()));
        }
        let xsave = if emulate::needs_xsave(what.insn.mnemonic()) {
            let xs = self.vcpu.get_xsave().map_err(|e| Stop::Host(format!("KVM_GET_XSAVE: {e}")))?;
            let xcrs = self.vcpu.get_xcrs().map_err(|e| Stop::Host(format!("KVM_GET_XCRS: {e}")))?;
            let xcr0 = xcrs.xcrs[..xcrs.nr_xcrs as usize].iter().find(|x| x.xcr == 0).map_or(1, |x| x.value);
            let mut area = Box::new([0u8; 4096]);
            for (d, w) in area.chunks_exact_mut(4).zip(xs.region) {
                d.copy_from_slice(&w.to_le_bytes());
            }
            Some((area, xcr0))
        } else {
            None
        };
        let mut cpu = emulate::Cpu { mem: &self.mem, regs, sregs, sregs_dirty: false, xsave, xsave_dirty: false };
        let inject = match emulate::complete(&mut cpu, &what.insn) {
            Ok(i) => i,
            Err(why) => {
                return self.guest(format!("host emulator gave up on {} and so does the VMM: {why}", what.describe()))
            }
        };
        let (regs, sregs, dirty) = (cpu.regs, cpu.sregs, cpu.sregs_dirty);
        if let (true, Some((area, _))) = (cpu.xsave_dirty, cpu.xsave) {
            let mut xs = kvm_bindings::kvm_xsave::default();
            for (w, b) in xs.region.iter_mut().zip(area.chunks_exact(4)) {
                *w = u32::from_le_bytes(b.try_into().unwrap());
            }
            // SAFETY: a 4 KiB kvm_xsave, the size KVM_SET_XSAVE reads without XSAVE2.
            unsafe { self.vcpu.set_xsave(&xs) }.map_err(|e| Stop::Host(format!("KVM_SET_XSAVE: {e}")))?;
        }
        self.set_regs(&regs)?;
        if dirty {
            self.vcpu.set_sregs(&sregs).map_err(|e| Stop::Host(format!("KVM_SET_SREGS: {e}")))?;
        }
        if let Some(inj) = inject {
            let mut ev = self.vcpu.get_vcpu_events().map_err(|e| Stop::Host(format!("KVM_GET_VCPU_EVENTS: {e}")))?;
            match inj {
                Inject::Interrupt(v) => {
                    ev.interrupt.injected = 1;
                    ev.interrupt.nr = v;
                    ev.interrupt.soft = 0;
                }
                Inject::Exception(v) => {
                    ev.exception.injected = 1;
                    ev.exception.nr = v;
                    ev.exception.has_error_code = 0;
                }
            }
            ev.flags = 0;
            self.vcpu.set_vcpu_events(&ev).map_err(|e| Stop::Host(format!("KVM_SET_VCPU_EVENTS: {e}")))?;
        }
        self.stats.add(Table::Insn, format!("{:?}", what.insn.mnemonic()).to_lowercase(), Duration::ZERO);
        Ok(())
    }
}

/// The vCPU's TSC rate (kHz) and current value, for a Xen guest's system time.
fn guest_tsc(vcpu: &VcpuFd) -> Result<(u32, u64), kvm_ioctls::Error> {
    const IA32_TSC: u32 = 0x10;
    let khz = vcpu.get_tsc_khz()?;
    let mut msrs =
        kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry { index: IA32_TSC, ..Default::default() }])
            .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    vcpu.get_msrs(&mut msrs)?;
    Ok((khz, msrs.as_slice()[0].data))
}

/// HALT: wait for the timer if no event is pending; return the pending bits.
fn halt(pv: &mut Pv, mem: &GuestMemoryMmap) -> Outcome {
    loop {
        pv.tick(mem, Instant::now());
        let pending = pv.shared.read_u64(mem, abi::offsets::PENDING).unwrap_or(0);
        if pending != 0 {
            return Outcome::Ret(pending as i64);
        }
        match pv.timer.deadline {
            Some(d) => std::thread::sleep(d.saturating_duration_since(Instant::now())),
            None => return Outcome::Fatal("halt with no event pending and no timer armed would sleep forever".into()),
        }
    }
}
