//! Linking the runtime object at one address with the system `ld`. Shared by the build
//! script (its check link) and `previrt link`.

use std::path::Path;
use std::process::Command;

/// Where the runtime goes and the link-time parameters it reads as absolute symbols.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// Virtual address of the runtime's first byte (page aligned).
    pub base: u64,
    /// The kernel's `.previrt.sites` bounds (virtual).
    pub sites_start: u64,
    pub sites_end: u64,
    /// The kernel's original PVH entry (physical, 32-bit).
    pub kernel_pvh_entry: u64,
    /// The kernel's original multiboot entry (`entry_addr`) and 64-bit ELF entry, where the
    /// runtime's multiboot and 64-bit entries hand over; 0 when not redirected.
    pub kernel_mb_entry: u64,
    pub kernel_elf_entry: u64,
    /// Default backend id (see previrt_runtime::backend::BACKENDS).
    pub default_backend: u32,
    /// Kernel virtual minus physical address.
    pub virt_delta: u64,
    /// The runtime lives in the kernel's `.text` padding (text_home.rs): read-only once the
    /// kernel protects its text, so the runtime clears CR0.WP for its writes.
    pub text_resident: bool,
    /// The kernel's 64-bit entry (`kernel_entry64`), where the Xen PV entry hands over; 0 if
    /// it has none.
    pub kernel_entry64: u64,
}

const SCRIPT: &str = include_str!("runtime.ld");

/// Link `object` into the ELF `out` at `p.base`. Errors carry ld's message.
pub fn link_runtime(object: &Path, out: &Path, p: &Placement) -> Result<(), String> {
    let script = out.with_extension("ld");
    std::fs::write(&script, SCRIPT.replace("@BASE@", &format!("{:#x}", p.base)))
        .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    let defsyms = [
        ("__previrt_sites_start", p.sites_start),
        ("__previrt_sites_end", p.sites_end),
        ("__previrt_kernel_pvh_entry", p.kernel_pvh_entry),
        ("__previrt_kernel_mb_entry", p.kernel_mb_entry),
        ("__previrt_kernel_elf_entry", p.kernel_elf_entry),
        ("__previrt_default_backend", p.default_backend as u64),
        ("__previrt_virt_delta", p.virt_delta),
        ("__previrt_text_resident", p.text_resident as u64),
        ("__previrt_kernel_entry64", p.kernel_entry64),
    ];
    let mut cmd = Command::new("ld");
    cmd.args(["-m", "elf_x86_64", "-static", "-nostdlib", "--gc-sections", "--no-dynamic-linker"])
        .args([
            "-z",
            "noexecstack",
            "-z",
            "max-page-size=4096",
            "--require-defined=previrt_repatch",
            "--require-defined=previrt_xen_entry",
            "--no-warn-rwx-segments",
        ])
        .arg("-T")
        .arg(&script)
        .args(defsyms.iter().map(|(n, v)| format!("--defsym={n}={v:#x}")))
        .arg("-o")
        .arg(out)
        .arg(object);
    let res = cmd.output().map_err(|e| format!("cannot run ld (install binutils: scripts/install-deps.sh): {e}"))?;
    let _ = std::fs::remove_file(&script);
    if !res.status.success() {
        return Err(format!("ld failed: {}", String::from_utf8_lossy(&res.stderr).trim()));
    }
    Ok(())
}
