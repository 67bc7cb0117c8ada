//! The example kernel (examples/kernel/) under `previrt run`, through each of its entries,
//! prints exactly what it prints under QEMU TCG (workload verdicts and checksums; timing and
//! boot-path lines aside) and exits with the same verdict.

mod common;
mod vmm_support;
use std::process::Command;
use vmm_support::*;

fn verdict_lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| l.starts_with("WORKLOAD ") || l.starts_with("RESULT ") || l.starts_with("CONSOLE ")).collect()
}

#[test]
fn example_kernel_matches_qemu_on_every_entry() {
    let src = common::kernel_src();
    let kernel = common::example_kernel().elf();

    let q = Command::new("bash")
        .arg(src.join("run-qemu.sh"))
        .arg(&kernel)
        .output()
        .expect("run-qemu.sh (QEMU missing? run scripts/install-deps.sh)");
    assert_ne!(q.status.code(), Some(2), "run-qemu.sh: {}", stderr(&q));
    let qemu_out = stdout(&q);
    assert!(qemu_out.contains("RESULT PASS"), "QEMU run: {qemu_out}");

    for boot in ["pvh", "multiboot", "elf64"] {
        let o = run(&kernel, &["--boot", boot]);
        let out = stdout(&o);
        assert_eq!(verdict_lines(&out), verdict_lines(&qemu_out), "--boot {boot}; stderr: {}", stderr(&o));
        // PASS is isa-debug-exit value 0, i.e. status 1, as QEMU exits; run-qemu.sh says 0.
        assert_eq!(o.status.code(), Some(1), "--boot {boot}");
        assert_eq!(q.status.code(), Some(0));
    }
}
