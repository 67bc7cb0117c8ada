//! The post-link patcher on Debian's real 6.1 kernel: a few modules and the stripped vmlinux
//! (`scripts/debian-kernel.sh` fetches them once into ~/.cache/previrt/debian), patched,
//! verified, and booted: the patched vmlinux, with every site left native (trampolines run
//! the original instructions), boots under QEMU TCG (PVH, `-kernel vmlinux`) to a busybox
//! initramfs that loads three patched modules — their init functions run `in`/`out` moved into
//! trampolines — and prints exactly what the unpatched kernel with the original modules prints;
//! so does the patched kernel with the guest runtime linked in (`previrt link`, native backend),
//! which rewrites every post-link site at boot. With the runtime's trace backend the same
//! kernel and modules behave the same again, the runtime patches each module's sites when the
//! module loader finalizes it, and the trace summary counts the kernel's and the modules'
//! executed sites.

mod common;

use common::require_tool;
use previrt_postlink::{patch, verify, FileReport, Options};
use previrt_rewriter::elf::Elf;
use previrt_site_abi::SITES_SECTION;
use std::path::Path;
use std::process::Command;

/// Coverage target of issue 8: sensitive instructions and pv sites with a site record.
const MIN_COVERAGE: f64 = 99.5;

#[test]
fn debian_modules_patch_and_verify() {
    let dir = common::debian_kernel().join("modules");
    let mut trampolines = 0;
    for m in [
        "drivers/watchdog/w83627hf_wdt.ko",
        "drivers/char/ipmi/ipmi_si.ko",
        "arch/x86/kvm/kvm-intel.ko",
        "arch/x86/kvm/kvm.ko",
    ] {
        let orig = std::fs::read(dir.join(m)).unwrap_or_else(|e| panic!("{m}: {e}; run scripts/debian-kernel.sh"));
        let p = patch(&orig, &Options::default()).unwrap_or_else(|e| panic!("{m}: {e}"));
        let r = &p.report;
        assert!(r.signature_stripped, "{m}: Debian's modules are signed");
        assert!(r.sensitive > 0, "{m}: {r:?}");
        assert!(r.coverage >= MIN_COVERAGE, "{m}: coverage {}", r.coverage);
        let v = verify(&orig, &p.data).unwrap();
        assert!(v.ok, "{m}: {:?}", v.problems);
        assert_eq!(v.covered, v.sensitive, "{m}");
        assert!(v.table_refs > 0, "{m}: no kernel table checked");
        trampolines += r.trampolines;
    }
    assert!(trampolines > 50, "only {trampolines} trampolines in four driver modules");
}

#[test]
fn debian_vmlinux_patch_and_verify() {
    let orig = std::fs::read(common::debian_kernel().join("vmlinux")).unwrap();
    let p = patch(&orig, &Options::default()).unwrap();
    let r = &p.report;
    assert_eq!(r.pv_sites, 3848, "Debian 6.1 has 3,848 .parainstructions entries");
    assert!(r.coverage >= MIN_COVERAGE, "coverage {}", r.coverage);
    assert!(r.trampolines > 500, "{} trampolines", r.trampolines);
    let v = verify(&orig, &p.data).unwrap();
    assert!(v.ok, "{:?}", v.problems);
    assert_eq!((v.covered, v.pv_sites), (v.sensitive, 3848));
    // The site table is loadable: a new PT_LOAD after the image holds it.
    let elf = Elf::parse(&p.data).unwrap();
    let sites = elf.section_by_name(SITES_SECTION).unwrap();
    let text = elf.section_by_name(".text").unwrap();
    assert!(sites.addr > text.addr && sites.is_alloc());
    let phnum = u16::from_le_bytes([p.data[0x38], p.data[0x39]]) as usize;
    let phoff = u64::from_le_bytes(p.data[0x20..0x28].try_into().unwrap()) as usize;
    let covered = (0..phnum).map(|i| phoff + i * 56).any(|ph| {
        let f = |o: usize| u64::from_le_bytes(p.data[ph + o..ph + o + 8].try_into().unwrap());
        p.data[ph] == 1 && f(16) <= sites.addr && sites.addr + sites.size <= f(16) + f(32)
    });
    assert!(covered, "no PT_LOAD loads {SITES_SECTION}");
}

const MODULES: &[&str] =
    &["drivers/watchdog/watchdog.ko", "drivers/watchdog/w83627hf_wdt.ko", "drivers/watchdog/sc1200wdt.ko"];

/// `/init`: load the modules (sc1200wdt probes the port given), print the results and the
/// modules' kernel messages, then `END`.
const INIT: &str = r#"#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox echo previrt-init: hello
/bin/busybox insmod /m/watchdog.ko; /bin/busybox echo "insmod watchdog: $?"
/bin/busybox insmod /m/w83627hf_wdt.ko; /bin/busybox echo "insmod w83627hf_wdt: $?"
/bin/busybox insmod /m/sc1200wdt.ko io=0x500; /bin/busybox echo "insmod sc1200wdt: $?"
/bin/busybox cut -d' ' -f1,3 /proc/modules
/bin/busybox dmesg | /bin/busybox grep -E 'w83627|sc1200' | /bin/busybox sed 's/^\[[^]]*\] //'
/bin/busybox echo previrt-init: done
"#;

/// Power off.
const POWEROFF: &str = "/bin/busybox poweroff -f\n";

/// Leave through isa-debug-exit (port 0xf4, QEMU's `-device isa-debug-exit`) by writing
/// /dev/port: the kernel's own `outb` does it, so the trace backend sees the exit and prints
/// its summary first.
const DEBUG_EXIT: &str = "/bin/busybox mknod /dev/port c 1 4
/bin/busybox printf '\\001' | /bin/busybox dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
/bin/busybox poweroff -f
";

fn initramfs(dir: &Path, modules: &[(String, Vec<u8>)], end: &str, out: &Path) {
    require_tool("cpio");
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("busybox (busybox-static) missing; run scripts/install-deps.sh");
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "dev", "proc", "sys", "m"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::write(root.join("init"), format!("{INIT}{end}")).unwrap();
    std::fs::set_permissions(root.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for (name, data) in modules {
        std::fs::write(root.join("m").join(name), data).unwrap();
    }
    let s = Command::new("bash")
        .arg("-c")
        .arg(format!("cd '{}' && find . | cpio -o -H newc --quiet > '{}'", root.display(), out.display()))
        .status()
        .unwrap();
    assert!(s.success(), "cpio failed");
}

/// Boot and return the lines the init script printed, and the whole serial log.
fn boot(kernel: &Path, initrd: &Path, append: &str) -> (Vec<String>, String) {
    require_tool("qemu-system-x86_64");
    let o = Command::new("timeout")
        .args(["300", "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024"])
        .args(["-display", "none", "-vga", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 loglevel=3 {append}"))
        .output()
        .expect("running qemu-system-x86_64");
    let log = String::from_utf8_lossy(&o.stdout).replace('\r', "");
    let lines: Vec<String> = log
        .lines()
        .skip_while(|l| !l.starts_with("previrt-init: hello"))
        .take_while(|l| !l.starts_with("previrt-init: done"))
        .map(str::to_owned)
        .collect();
    assert!(!lines.is_empty() && log.contains("previrt-init: done"), "{} did not reach init:\n{log}", kernel.display());
    (lines, log)
}

#[test]
fn patched_debian_kernel_boots_and_loads_patched_modules() {
    let deb = common::debian_kernel();
    let dir = std::env::temp_dir().join(format!("previrt-postlink-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vmlinux = std::fs::read(deb.join("vmlinux")).unwrap();
    let patched = patch(&vmlinux, &Options::default()).unwrap();
    assert!(patched.report.trampolines > 500);
    let pk = dir.join("vmlinux");
    std::fs::write(&pk, &patched.data).unwrap();
    let (orig_mods, patched_mods, reports) = modules(&deb);
    for (m, r) in MODULES.iter().zip(&reports).skip(1) {
        assert!(r.trampolines > 0, "{m}: no trampolines");
    }
    let (oi, pi) = (dir.join("orig.cpio"), dir.join("patched.cpio"));
    initramfs(&dir, &orig_mods, POWEROFF, &oi);
    initramfs(&dir, &patched_mods, POWEROFF, &pi);
    // Only init's and the modules' own lines count: TCG timing may add clocksource warnings,
    // and the signature taint line names the first module loaded (watchdog).
    let (plain, _) = boot(&deb.join("vmlinux"), &oi, "");
    let (ours, _) = boot(&pk, &pi, "");
    assert!(plain.iter().any(|l| l.starts_with("insmod w83627hf_wdt")), "{plain:?}");
    assert_eq!(plain, ours, "patched kernel/modules behave differently");

    // With the guest runtime linked in (`previrt link`), which rewrites every post-link site
    // at boot for the native backend: the same again.
    let linked = dir.join("vmlinux.linked");
    let o = Command::new(env!("CARGO_BIN_EXE_previrt")).arg("link").arg(&pk).arg("-o").arg(&linked).output().unwrap();
    assert!(o.status.success(), "previrt link: {}", String::from_utf8_lossy(&o.stderr));
    let (with_runtime, log) = boot(&linked, &pi, "previrt.backend=native");
    let line = format!("previrt: backend=native sites={} patched", patched.report.sites);
    assert!(log.contains(&line), "no `{line}` in the boot log:\n{log}");
    assert_eq!(plain, with_runtime, "patched kernel with the runtime behaves differently");
    let _ = std::fs::remove_dir_all(&dir);
}

type Modules = Vec<(String, Vec<u8>)>;

/// The original and the patched MODULES as (file name, bytes), and the patch reports.
fn modules(deb: &Path) -> (Modules, Modules, Vec<FileReport>) {
    let (mut orig, mut patched, mut reports) = (Vec::new(), Vec::new(), Vec::new());
    for m in MODULES {
        let data = std::fs::read(deb.join("modules").join(m)).unwrap();
        let name = Path::new(m).file_name().unwrap().to_string_lossy().into_owned();
        let p = patch(&data, &Options::default()).unwrap();
        reports.push(p.report);
        patched.push((name.clone(), p.data));
        orig.push((name, data));
    }
    (orig, patched, reports)
}

#[test]
fn patched_debian_kernel_traces_boot_and_module_loading() {
    let deb = common::debian_kernel();
    let dir = std::env::temp_dir().join(format!("previrt-postlink-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let previrt = env!("CARGO_BIN_EXE_previrt");
    let (pk, linked) = (dir.join("vmlinux"), dir.join("vmlinux.linked"));
    let o = Command::new(previrt).arg("patch").arg(deb.join("vmlinux")).arg("-o").arg(&pk).output().unwrap();
    assert!(o.status.success(), "previrt patch: {}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(previrt).arg("link").arg(&pk).arg("-o").arg(&linked).arg("--json").output().unwrap();
    assert!(o.status.success(), "previrt link: {}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["text_resident"].is_u64(), "Linux is linked high: the runtime goes into .text padding: {report}");
    assert!(report["module_hook"]["function"].is_u64(), "module_finalize not found: {report}");
    let kernel_sites = report["sites"].as_u64().unwrap() as usize;

    let (orig_mods, patched_mods, reports) = modules(&deb);
    let module_sites: Vec<usize> = reports.iter().map(|r| r.sites).collect();
    let (oi, pi) = (dir.join("orig.cpio"), dir.join("patched.cpio"));
    initramfs(&dir, &orig_mods, DEBUG_EXIT, &oi);
    initramfs(&dir, &patched_mods, DEBUG_EXIT, &pi);
    let (plain, _) = boot(&deb.join("vmlinux"), &oi, "");
    let (traced, log) = boot(&linked, &pi, "previrt.backend=trace previrt.trace=sites");
    assert!(plain.iter().any(|l| l.starts_with("insmod w83627hf_wdt")), "{plain:?}");
    assert_eq!(plain, traced, "the traced kernel and modules behave differently");

    let boot_line = format!("previrt: backend=trace sites={kernel_sites} patched in ");
    assert!(log.lines().any(|l| l.starts_with(&boot_line)), "no `{boot_line}` in:\n{log}");
    // Each module load (busybox insmod may try a second system call after a failed init) is
    // listed with its sites, all patched (and routed) by the hook before the module ran.
    let mut loaded = 0;
    for ((name, _), sites) in patched_mods.iter().zip(&module_sites) {
        let name = name.trim_end_matches(".ko");
        let line = format!("previrt-trace-module: {name} sites={sites} routed={sites}");
        let n = log.lines().filter(|l| *l == line).count();
        assert!(n >= 1, "no `{line}` in the log:\n{log}");
        loaded += n * sites;
    }
    assert!(module_sites[1] > 0 && module_sites[2] > 0, "the driver modules carry sites: {module_sites:?}");
    let summary = log.lines().find(|l| l.starts_with("previrt-trace:")).unwrap_or_else(|| panic!("no summary:\n{log}"));
    let executed = summary.rsplit("sites-executed=").next().unwrap();
    let (ran, total) = executed.split_once('/').unwrap();
    assert_eq!(total.trim().parse::<usize>().unwrap(), kernel_sites + loaded, "{summary}");
    assert!(ran.parse::<usize>().unwrap() > 100, "{summary}");
    // The driver modules' init functions ran their port I/O through the runtime.
    let module_io: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("previrt-trace-site: 0xffffffffc") && (l.contains(" in ") || l.contains(" out ")))
        .collect();
    assert!(!module_io.is_empty(), "no module in/out site executed:\n{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn debian_vmlinux_kallsyms_read_without_a_symbol_table() {
    let data = std::fs::read(common::debian_kernel().join("vmlinux")).unwrap();
    let elf = Elf::parse(&data).unwrap();
    assert!(elf.section_by_name(".symtab").is_none(), "Debian's vmlinux is stripped");
    let (text, rodata) = (elf.section_by_name(".text").unwrap(), elf.section_by_name(".rodata").unwrap());
    let syms = previrt_postlink::kallsyms::Kallsyms::read(rodata.data, text.addr).expect("kallsyms tables");
    assert!(syms.len() > 50_000, "{} symbols", syms.len());
    // The entry the PVH path ends in is the first byte of .text; functions lie in .text.
    assert_eq!(syms.get("startup_64"), Some(text.addr));
    for f in ["module_finalize", "__fentry__", "do_init_module", "apply_paravirt"] {
        let a = syms.get(f).unwrap_or_else(|| panic!("no {f}"));
        assert!(a >= text.addr && a < text.addr + text.size, "{f} at {a:#x} outside .text");
    }
    // Section bounds: a jump table of whole 16-byte entries.
    let (start, stop) = (syms.get("__start___jump_table").unwrap(), syms.get("__stop___jump_table").unwrap());
    assert!(stop > start && (stop - start) % 16 == 0, "{start:#x}..{stop:#x}");
}
