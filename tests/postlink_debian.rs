//! The post-link patcher on Debian's real 6.1 kernel: a few modules and the stripped vmlinux
//! (`scripts/debian-kernel.sh` fetches them once into ~/.cache/previrt/debian).

use previrt_postlink::{patch, verify, Options};
use previrt_rewriter::elf::Elf;
use previrt_site_abi::SITES_SECTION;
use std::path::PathBuf;
use std::process::Command;

/// Coverage target of issue 8: sensitive instructions and pv sites with a site record.
const MIN_COVERAGE: f64 = 99.5;

fn debian() -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let o = Command::new("bash")
        .arg(format!("{root}/scripts/debian-kernel.sh"))
        .output()
        .expect("running scripts/debian-kernel.sh");
    assert!(
        o.status.success(),
        "scripts/debian-kernel.sh failed (needs network once; see scripts/install-deps.sh): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert!(dir.join("vmlinux").is_file(), "{}: no vmlinux; run scripts/debian-kernel.sh", dir.display());
    dir
}

#[test]
fn debian_modules_patch_and_verify() {
    let dir = debian().join("modules");
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
    let orig = std::fs::read(debian().join("vmlinux")).unwrap();
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
