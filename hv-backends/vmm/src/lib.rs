//! `previrt-vmm`: previrt's in-tree KVM hypervisor, behind `previrt run`.
//!
//! One vCPU, guest RAM from 0, kernels loaded as ELF (PVH, multiboot v1, 64-bit entry) or
//! Linux bzImage ([`boot`]); a UART, isa-debug-exit and the in-kernel PIC/PIT ([`devices`]);
//! per-exit accounting ([`stats`]) and KVM's own counters ([`kvmstats`]); instructions the
//! host emulator refuses completed with iced-x86 ([`emulate`]); the previrt paravirtual ABI ([`pv`]) and a Xen personality ([`xen`]).
//!
//! Public API: [`RunArgs`] (the command line), [`run`] (boot and run to the end) and
//! [`main_run`] (both, with the process exit status `previrt run` uses).

pub mod boot;
pub mod devices;
pub mod emulate;
mod kick;
pub mod kvmstats;
pub mod layout;
pub mod profile;
pub mod pv;
pub mod pvm;
pub mod stats;
mod vm;
pub mod xen;

use std::path::PathBuf;

pub use vm::snapshot::{self, main_snapshot, RestoreArgs, SnapshotArgs};
pub use vm::{run, Error, RunResult};
/// Guest memory types of the public API ([`pv::Pv`] and [`xen::Xen`] take a `GuestMemoryMmap`).
pub use vm_memory;

/// Which paravirtual interface the VMM offers the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AbiKind {
    /// The previrt ABI, version 1 (docs/hv-abi.md); also spelled `hv-v1`.
    #[value(alias = "hv-v1")]
    Previrt,
    /// The previrt ABI, version 2: the same services with another hypercall layout
    /// (docs/hv-abi.md §10).
    #[value(name = "hv-v2")]
    PrevirtV2,
    /// Xen-compatible: 'XenVMMXenVMM' CPUID leaves and Xen hypercalls.
    Xen,
    /// No paravirtual interface: plain trap-and-emulate.
    None,
    /// The Xen personality as Xen 3.0.2: sched_op_compat and event_channel_op_compat instead
    /// of sched_op and event_channel_op (docs/xen-hvm.md); `xen` is Xen 4.17.
    #[value(name = "xen-3.0.2")]
    Xen302,
}

impl AbiKind {
    /// The Xen interface version, for the Xen kinds.
    pub fn xen_version(self) -> Option<xen::Version> {
        match self {
            AbiKind::Xen => Some(xen::Version::V4_17),
            AbiKind::Xen302 => Some(xen::Version::V3_0_2),
            _ => None,
        }
    }

    /// The previrt ABI major version, for the previrt kinds.
    pub fn hv_major(self) -> Option<u16> {
        match self {
            AbiKind::Previrt => Some(previrt_hv_abi::ABI_MAJOR),
            AbiKind::PrevirtV2 => Some(previrt_hv_abi::ABI_MAJOR_V2),
            _ => None,
        }
    }
}

/// How guest code executes on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The ordinary KVM path (instruction-emulated ring 0 on KVM-PVM).
    Pv,
    /// KVM-PVM's native-execution mode (docs/pvm.md); an error if the probe does not find it.
    Native,
    /// Native when the probe finds KVM-PVM's mode, else the ordinary path (said on stderr).
    Auto,
}

/// `previrt run` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Kernel: ELF (PVH note, multiboot v1 header or 64-bit entry) or Linux bzImage.
    pub kernel: PathBuf,
    /// Guest RAM, with optional K/M/G suffix (at most 3G).
    #[arg(long, default_value = "128M")]
    pub mem: String,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub append: String,
    /// Initial ramdisk / boot module.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// File backing the paravirtual block device.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Boot protocol (default: the first the kernel offers of bzimage, pvh, multiboot, elf64).
    #[arg(long, value_enum)]
    pub boot: Option<boot::Protocol>,
    /// Execution backend.
    #[arg(long, value_enum, default_value = "pv")]
    pub backend: Backend,
    /// Paravirtual interface offered to the guest.
    #[arg(long, value_enum, default_value = "previrt")]
    pub abi: AbiKind,
    /// With a Xen --abi: start the guest as an ordinary domain (SIF_INITDOMAIN clear): no
    /// console_io, its console is the ring of HVM_PARAM_CONSOLE_PFN/_EVTCHN (docs/xen-hvm.md).
    #[arg(long)]
    pub domu: bool,
    /// Print the exit accounting table to stderr at the end.
    #[arg(long)]
    pub stats: bool,
    /// Write the exit accounting as JSON to FILE (atomically).
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Single-step the guest and write every MMIO and page-table access (RIP, address,
    /// width, direction) to FILE as JSON, for `previrt annotate --profile` (slow: one exit
    /// per instruction).
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// With --profile: trace only the first N instructions, then stop the run and write the
    /// profile (a window of a boot too long to single-step whole).
    #[arg(long, value_name = "N", requires = "profile")]
    pub profile_steps: Option<u64>,
    /// With --profile: trace only page-table stores, without single-stepping (page-table
    /// pages mapped read-only, so only stores into them exit): a whole boot at emulation
    /// speed; loads and MMIO are not seen (docs/annotations.md).
    #[arg(long, requires = "profile", conflicts_with = "profile_steps")]
    pub profile_writes: bool,
    /// Save the whole VM to FILE (atomically) and stop when --snapshot-after fires or on
    /// SIGUSR1; resume with `previrt restore FILE` (docs/snapshot.md).
    #[arg(long, value_name = "FILE")]
    pub snapshot: Option<PathBuf>,
    /// When to snapshot: after N handled exits ("5000exits") or at the first exit after N ms
    /// ("200ms").
    #[arg(long, requires = "snapshot")]
    pub snapshot_after: Option<snapshot::When>,
    /// Listen on this Unix socket for `previrt snapshot SOCKET -o FILE` requests.
    #[arg(long, value_name = "SOCKET")]
    pub control: Option<PathBuf>,
    /// How long a snapshot request waits for the guest to suspend itself (cooperative
    /// re-patching) before the VM is saved without it ("forced").
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub suspend_timeout: u64,
}

/// Parse "128M", "1G", "65536K" or bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// Run `previrt run` and return the process exit status: the guest's isa-debug-exit status
/// ((v << 1) | 1) or its shutdown status; 2 for bad input; 4 when the guest is stopped by the
/// VMM (triple fault, instruction nobody can complete, ABI violation); 1 for host failures.
pub fn main_run(args: &RunArgs) -> i32 {
    report("run", args, run(args, Box::new(std::io::stdout())))
}

/// Run `previrt restore`: validate the snapshot (exit 2 before anything runs if it is
/// corrupt, truncated or mismatched), then resume it; statuses as [`main_run`].
pub fn main_restore(args: &RestoreArgs) -> i32 {
    match snapshot::open(args) {
        Ok((img, run_args)) => {
            report("restore", &run_args, vm::run_with(&run_args, Box::new(std::io::stdout()), Some(&img)))
        }
        Err(e) => {
            eprintln!("previrt restore: {e}");
            e.exit_status()
        }
    }
}

/// The end of a run: status, error line, --stats and --stats-json.
fn report(cmd: &str, args: &RunArgs, res: Result<RunResult, Error>) -> i32 {
    let status = match &res {
        Ok(r) => r.status,
        Err(e) => {
            eprintln!("previrt {cmd}: {e}");
            e.exit_status()
        }
    };
    let stats = match &res {
        Ok(r) => Some(&r.stats),
        Err(Error::Guest { stats, .. }) => Some(stats),
        Err(_) => None,
    };
    if let Some(st) = stats {
        if args.stats {
            eprint!("{}", st.render());
        }
        if let Some(p) = &args.stats_json {
            let json = serde_json::to_vec_pretty(&st.to_json()).unwrap_or_default();
            if let Err(e) =
                previrt_atomic_write::write_with(p, &json, previrt_atomic_write::Options { mode: None, sync: true })
            {
                eprintln!("previrt {cmd}: cannot write {}: {e}", p.display());
                return 1;
            }
        }
    }
    status
}
