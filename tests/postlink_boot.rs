//! Debian 6.1's vmlinux, post-link patched with every site left native (trampolines run the
//! original instructions), boots under QEMU TCG (PVH, `-kernel vmlinux`) to a busybox
//! initramfs that loads three patched modules — their init functions run `in`/`out` moved into
//! trampolines — and prints exactly what the unpatched kernel with the original modules prints.

mod common;

use common::require_tool;
use previrt_postlink::{patch, Options};
use std::path::{Path, PathBuf};
use std::process::Command;

const MODULES: &[&str] =
    &["drivers/watchdog/watchdog.ko", "drivers/watchdog/w83627hf_wdt.ko", "drivers/watchdog/sc1200wdt.ko"];

/// `/init`: load the modules (sc1200wdt probes the port given), print the results and the
/// modules' kernel messages, power off.
const INIT: &str = r#"#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox echo previrt-init: hello
/bin/busybox insmod /m/watchdog.ko; /bin/busybox echo "insmod watchdog: $?"
/bin/busybox insmod /m/w83627hf_wdt.ko; /bin/busybox echo "insmod w83627hf_wdt: $?"
/bin/busybox insmod /m/sc1200wdt.ko io=0x500; /bin/busybox echo "insmod sc1200wdt: $?"
/bin/busybox cut -d' ' -f1,3 /proc/modules
/bin/busybox dmesg | /bin/busybox grep -E 'w83627|sc1200|watchdog' | /bin/busybox sed 's/^\[[^]]*\] //'
/bin/busybox echo previrt-init: done
/bin/busybox poweroff -f
"#;

fn debian() -> PathBuf {
    let o = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/debian-kernel.sh"))
        .output()
        .expect("running scripts/debian-kernel.sh");
    assert!(o.status.success(), "scripts/debian-kernel.sh failed: {}", String::from_utf8_lossy(&o.stderr));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

fn initramfs(dir: &Path, modules: &[(String, Vec<u8>)], out: &Path) {
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
    std::fs::write(root.join("init"), INIT).unwrap();
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

/// Boot and return the lines the init script printed.
fn boot(kernel: &Path, initrd: &Path) -> Vec<String> {
    require_tool("qemu-system-x86_64");
    let o = Command::new("timeout")
        .args(["300", "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024"])
        .args(["-display", "none", "-vga", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=3"])
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
    lines
}

#[test]
fn patched_debian_kernel_boots_and_loads_patched_modules() {
    let deb = debian();
    let dir = std::env::temp_dir().join(format!("previrt-postlink-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vmlinux = std::fs::read(deb.join("vmlinux")).unwrap();
    let patched = patch(&vmlinux, &Options::default()).unwrap();
    assert!(patched.report.trampolines > 500);
    let pk = dir.join("vmlinux");
    std::fs::write(&pk, &patched.data).unwrap();
    let (mut orig_mods, mut patched_mods) = (Vec::new(), Vec::new());
    for m in MODULES {
        let data = std::fs::read(deb.join("modules").join(m)).unwrap();
        let name = Path::new(m).file_name().unwrap().to_string_lossy().into_owned();
        let p = patch(&data, &Options::default()).unwrap();
        if *m != MODULES[0] {
            assert!(p.report.trampolines > 0, "{m}: no trampolines");
        }
        patched_mods.push((name.clone(), p.data));
        orig_mods.push((name, data));
    }
    let (oi, pi) = (dir.join("orig.cpio"), dir.join("patched.cpio"));
    initramfs(&dir, &orig_mods, &oi);
    initramfs(&dir, &patched_mods, &pi);
    let plain = boot(&deb.join("vmlinux"), &oi);
    let mut ours = boot(&pk, &pi);
    // The one expected difference: the patched modules carry no signature.
    ours.retain(|l| !l.contains("module verification failed"));
    assert!(plain.iter().any(|l| l.starts_with("insmod w83627hf_wdt")), "{plain:?}");
    assert_eq!(plain, ours, "patched kernel/modules behave differently");
    let _ = std::fs::remove_dir_all(&dir);
}
