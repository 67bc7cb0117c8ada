//! `previrt`: the command-line front end. Each subcommand lives in the crate that does the work;
//! this file only parses arguments and dispatches.

use clap::{Parser, Subcommand};

mod demo;

#[derive(Parser)]
#[command(name = "previrt", version, about = "Pre-virtualize x86-64 kernels automatically, and run them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the example kernel plainly and pre-virtualized, run both on the in-tree hypervisor, compare exits and time.
    Demo(demo::DemoArgs),
    /// Count, list or export the sensitive instructions of x86-64 ELF files (vmlinux, .o, .ko, executables).
    Scan(previrt_rewriter::cli::ScanArgs),
    /// Boot a kernel on previrt's in-tree KVM hypervisor.
    Run(previrt_vmm::RunArgs),
    /// Resume a VM saved by `previrt run --snapshot FILE --snapshot-after …`.
    Restore(previrt_vmm::RestoreArgs),
    /// Ask a running `previrt run --control SOCKET` to save its VM (the guest suspends itself first if it can).
    Snapshot(previrt_vmm::SnapshotArgs),
    /// Install the CROSS_COMPILE toolchain that pre-virtualizes at assembler level.
    #[command(subcommand)]
    Toolchain(previrt_toolchain::ToolchainCommand),
    /// Link the guest runtime into a kernel ELF: it patches the kernel's sites at boot.
    Link(previrt_link::cli::LinkArgs),
    /// Post-link patch a kernel or module (.o, .ko, vmlinux) or a directory of them: sensitive instructions move into trampolines.
    Patch(previrt_postlink::cli::PatchArgs),
    /// Prove a post-link patch preserved the original: exit 0 pass, 1 fail, 2 bad input.
    Verify(previrt_postlink::cli::VerifyArgs),
    /// Find MMIO and page-table accesses (rules, DWARF, a `run --profile` trace): annotations file, scores, memory-access sites.
    Annotate(previrt_annotate::cli::AnnotateArgs),
}

fn main() {
    // Invoked as a toolchain tool (x86_64-previrt-linux-gnu-gcc, as, …): before any parsing.
    if let Some(status) = previrt_toolchain::dispatch() {
        std::process::exit(status);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(a) => std::process::exit(demo::run(&a)),
        Command::Scan(a) => std::process::exit(previrt_rewriter::cli::run(&a)),
        Command::Run(a) => std::process::exit(previrt_vmm::main_run(&a)),
        Command::Restore(a) => std::process::exit(previrt_vmm::main_restore(&a)),
        Command::Snapshot(a) => std::process::exit(previrt_vmm::main_snapshot(&a)),
        Command::Toolchain(c) => std::process::exit(previrt_toolchain::run(c)),
        Command::Link(a) => std::process::exit(previrt_link::cli::run(&a)),
        Command::Patch(a) => std::process::exit(previrt_postlink::cli::patch_cmd(&a)),
        Command::Verify(a) => std::process::exit(previrt_postlink::cli::verify_cmd(&a)),
        Command::Annotate(a) => std::process::exit(previrt_annotate::cli::run(&a)),
    }
}
