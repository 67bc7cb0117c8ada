//! Differential test of the runtime's emulation of privileged instructions on a real (QEMU TCG)
//! CPU: tests/runtime_fixtures/regdump.S runs cli, sti, pushf/popf, cpuid, rdmsr/wrmsr,
//! mov cr, in/out, invlpg, sgdt/lgdt/sidt/lidt, ltr/str, iretq and mov to segment registers
//! with known register contents and prints every GPR and RFLAGS after each. Built with the
//! previrt toolchain and linked with the runtime, it must print identical dumps with the native
//! backend (the real instructions) and the trace backend (the runtime's handlers, or the saved
//! original out of line for kinds it does not emulate).

mod common;

use common::{linked_fixture, run_qemu, QemuRun};

fn dumps(r: &QemuRun) -> Vec<&str> {
    r.stdout.lines().filter(|l| l.starts_with('D')).collect()
}

#[test]
fn trace_backend_emulation_matches_the_cpu_register_for_register() {
    let linked = linked_fixture("regdump");

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
