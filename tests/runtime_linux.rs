//! The runtime's PVH convention on a kernel that knows nothing about it: Debian's 6.1 vmlinux
//! (`scripts/debian-kernel.sh` caches it), post-link patched (`previrt patch`, thousands of
//! sites), `previrt link`ed (linked high: virt != phys, plus Linux's zero-based per-CPU
//! segment) and booted under QEMU TCG with the native backend. Without a root file system Linux
//! ends in its VFS panic; it must get there exactly as the unlinked kernel does, after the
//! runtime has patched every site. The runtime and its copy of the site table live in the
//! kernel's `.text` padding: the copy names exactly the original sites. (The trace backend and
//! module loading: tests/postlink_debian.rs.)

mod common;

use common::require_tool;
use previrt_rewriter::elf::Elf;
use previrt_site_abi::{chunks, SITES_SECTION};
use std::path::Path;
use std::process::Command;

/// Boot to the VFS panic; the serial output.
fn boot(kernel: &Path, cmdline: &str) -> String {
    require_tool("qemu-system-x86_64");
    let o = Command::new("timeout")
        .args(["--foreground", "-k", "5", "120", "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max"])
        .args(["-m", "512", "-display", "none", "-vga", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", &format!("console=ttyS0 panic=-1 {cmdline}")])
        .output()
        .expect("running qemu-system-x86_64");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const END: &str = "Kernel panic - not syncing: VFS: Unable to mount root fs";

#[test]
fn patched_debian_vmlinux_boots_through_the_runtime() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("runtime-linux-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let previrt = env!("CARGO_BIN_EXE_previrt");
    let patched = dir.join("vmlinux-patched");
    let linked = dir.join("vmlinux-linked");
    let o = Command::new(previrt)
        .arg("patch")
        .arg(common::debian_kernel().join("vmlinux"))
        .arg("-o")
        .arg(&patched)
        .output()
        .unwrap();
    assert!(o.status.success(), "previrt patch: {}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(previrt).arg("link").arg(&patched).arg("-o").arg(&linked).arg("--json").output().unwrap();
    assert!(o.status.success(), "previrt link: {}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let sites = report["sites"].as_u64().unwrap();
    assert!(sites > 1000, "the patched vmlinux should carry thousands of sites: {report}");
    table_copy_names_the_same_sites(&patched, &linked, report["text_resident"].as_u64().unwrap());

    let plain = boot(&patched, "");
    let through = boot(&linked, "previrt.backend=native");
    assert!(plain.contains(END), "the unlinked kernel should reach the VFS panic:\n{plain}");
    let first = through.lines().next().unwrap_or_default();
    assert!(first.starts_with(&format!("previrt: backend=native sites={sites} patched in ")), "boot line: {first}");
    assert!(through.contains(END), "the linked kernel should reach the VFS panic:\n{through}");
    let banner = |s: &str| {
        s.lines().find(|l| l.contains("Linux version")).map(|l| l.split("] ").nth(1).unwrap_or(l).to_string())
    };
    assert_eq!(banner(&plain), banner(&through));
}

/// The linked kernel keeps its segments, and the site table copy in `.text` resolves to the
/// same sites, resume and origin addresses as the patched kernel's table.
fn table_copy_names_the_same_sites(patched: &Path, linked: &Path, copy: u64) {
    let (p, l) = (std::fs::read(patched).unwrap(), std::fs::read(linked).unwrap());
    let (pe, le) = (Elf::parse(&p).unwrap(), Elf::parse(&l).unwrap());
    let phnum = |d: &[u8]| u16::from_le_bytes([d[0x38], d[0x39]]);
    assert_eq!(phnum(&p), phnum(&l), "no segment added for a kernel linked high");
    let table = pe.section_by_name(SITES_SECTION).unwrap();
    let text = le.section_by_name(".text").unwrap();
    assert!(copy > text.addr && copy + table.size < text.addr + text.size, "copy not inside .text");
    let at = (copy - text.addr) as usize;
    let resolved = |bytes: &[u8], base: u64| {
        chunks(bytes)
            .flat_map(|c| {
                let c = c.unwrap();
                c.records().map(|(off, r)| r.resolve(base + off as u64)).collect::<Vec<_>>()
            })
            .map(|r| (r.site, r.resume, r.origin))
            .collect::<Vec<_>>()
    };
    let orig = resolved(table.data, table.addr);
    assert!(orig.len() > 1000);
    assert_eq!(orig, resolved(&text.data[at..at + table.size as usize], copy));
}
