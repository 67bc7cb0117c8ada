//! `previrt link KERNEL -o OUT [--backend native|trace|auto] [--json]`.

use crate::{link, DefaultBackend, LinkError};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct LinkArgs {
    /// Linked kernel ELF with a PVH entry note, optionally a multiboot header (never modified).
    pub kernel: PathBuf,
    /// Output ELF (written atomically).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Backend used when the kernel command line has no `previrt.backend=`.
    #[arg(long, default_value = "native", value_parser = ["native", "trace", "auto"])]
    pub backend: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Leave out the Xen PV notes (added by default when the kernel has `kernel_entry64`).
    #[arg(long)]
    pub no_xen: bool,
}

/// Run the subcommand; returns the exit status (2 for bad input, 1 for other failures).
pub fn run(a: &LinkArgs) -> i32 {
    let backend = DefaultBackend::parse(&a.backend).unwrap_or(DefaultBackend::Native);
    match link(&a.kernel, &a.output, backend, !a.no_xen) {
        Ok(r) if a.json => {
            let v = serde_json::json!({
                "kernel": a.kernel, "output": a.output,
                "runtime_virt": r.runtime_virt, "runtime_phys": r.runtime_phys,
                "runtime_file_size": r.runtime_file_size, "runtime_mem_size": r.runtime_mem_size,
                "sites": r.sites, "text_resident": r.text_resident,
                "module_hook": r.module_hook.map(|(f, at)| serde_json::json!({"function": f, "at": at})),
                "kinds": r.kinds.iter().map(|(k, (all, long))| (k.to_string(), serde_json::json!({"sites": all, "long_mode": long}))).collect::<serde_json::Map<_, _>>(),
                "kernel_pvh_entry": r.kernel_pvh_entry,
                "runtime_pvh_entry": r.runtime_pvh_entry, "default_backend": a.backend,
                "multiboot_header": r.multiboot.is_some(),
                "multiboot_entry": r.multiboot.map(|(k, rt)| serde_json::json!({"kernel": k, "runtime": rt})),
                "elf_entry64": r.elf_entry64.map(|(k, rt)| serde_json::json!({"kernel": k, "runtime": rt})),
                "xen_pv": r.xen_pv.map(|x| serde_json::json!({"entry": x.entry, "hypercall_page": x.hypercall_page})),
            });
            println!("{v}");
            0
        }
        Ok(r) => {
            println!(
                "previrt link: {} -> {}: runtime at {:#x} (phys {:#x}, {} bytes, {} in memory), {} sites, PVH entry {:#x} -> {:#x}, default backend {}",
                a.kernel.display(), a.output.display(), r.runtime_virt, r.runtime_phys, r.runtime_file_size,
                r.runtime_mem_size, r.sites, r.kernel_pvh_entry, r.runtime_pvh_entry, a.backend
            );
            if let Some((k, rt)) = r.multiboot {
                println!("previrt link: multiboot entry {k:#x} -> {rt:#x}");
            }
            if let Some((k, rt)) = r.elf_entry64 {
                println!("previrt link: 64-bit ELF entry {k:#x} -> {rt:#x}");
            }
            if let Some(x) = r.xen_pv {
                println!("previrt link: Xen PV notes: entry {:#x}, hypercall page {:#x}", x.entry, x.hypercall_page);
            }
            0
        }
        Err(e) => {
            eprintln!("previrt link: {}: {e}", a.kernel.display());
            match e {
                LinkError::Input(_) => 2,
                LinkError::Environment(_) => 1,
            }
        }
    }
}
