//! Differential test of the runtime's emulation of privileged instructions on a real (QEMU TCG)
//! CPU: tests/runtime_fixtures/regdump.S runs cli, sti, pushf/popf, cpuid, rdmsr/wrmsr,
//! mov cr, in/out, invlpg, sgdt/lgdt/sidt/lidt, ltr/str, iretq and mov to segment registers
//! with known register contents and prints every GPR and RFLAGS after each. Built with the
//! previrt toolchain and linked with the runtime, it must print identical dumps with the native
//! backend (the real instructions) and the trace backend (the runtime's handlers, or the saved
//! original out of line for kinds it does not emulate).

mod common;

use common::{require_tool, run_qemu, QemuRun};
use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e} (run scripts/install-deps.sh)"));
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn dumps(r: &QemuRun) -> Vec<&str> {
    r.stdout.lines().filter(|l| l.starts_with('D')).collect()
}

#[test]
fn trace_backend_emulation_matches_the_cpu_register_for_register() {
    require_tool("ld");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("runtime-regdump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/runtime_fixtures");
    let previrt = env!("CARGO_BIN_EXE_previrt");
    let tc = dir.join("toolchain");
    run(Command::new(previrt).args(["toolchain", "install", "--prefix"]).arg(&tc), "previrt toolchain install");
    let obj = dir.join("regdump.o");
    let elf = dir.join("regdump.elf");
    let linked = dir.join("regdump-linked.elf");
    run(
        Command::new(tc.join("bin/x86_64-previrt-linux-gnu-gcc"))
            .arg("-c")
            .arg(fixtures.join("regdump.S"))
            .arg("-o")
            .arg(&obj),
        "assembling the fixture with the previrt toolchain",
    );
    run(
        Command::new("ld")
            .arg("-T")
            .arg(fixtures.join("regdump.ld"))
            .args(["-z", "noexecstack", "--no-warn-rwx-segments", "-o"])
            .arg(&elf)
            .arg(&obj),
        "linking the fixture",
    );
    run(Command::new(previrt).arg("link").arg(&elf).arg("-o").arg(&linked), "previrt link");

    let native = run_qemu(&linked, "previrt.backend=native");
    let trace = run_qemu(&linked, "previrt.backend=trace");
    for (r, what) in [(&native, "native"), (&trace, "trace")] {
        assert_eq!(r.status, 0, "{what} run: status {}\n{}{}", r.status, r.stdout, r.stderr);
        assert!(r.stdout.contains(&format!("previrt: backend={what} ")), "{what}: no boot line\n{}", r.stdout);
    }
    let (n, t) = (dumps(&native), dumps(&trace));
    assert_eq!(n.len(), 15, "native run should print 15 dumps:\n{}", native.stdout);
    for (i, (a, b)) in n.iter().zip(&t).enumerate() {
        assert_eq!(a, b, "dump {} differs between the CPU (native) and the runtime (trace)", i + 1);
    }
    assert_eq!(n.len(), t.len(), "trace run stopped early:\n{}", trace.stdout);

    let summary = trace.stdout.lines().find(|l| l.starts_with("previrt-trace:")).expect("trace summary");
    for kind in [
        "cli", "sti", "pushf", "popf", "iret", "mov_cr", "mov_seg", "lgdt", "lidt", "ltr", "sgdt", "sidt", "str",
        "invlpg", "in", "out", "rdmsr", "wrmsr", "cpuid",
    ] {
        let count = summary
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{kind}=")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        assert!(count > 0, "{kind} never went through the runtime: {summary}");
    }
}
