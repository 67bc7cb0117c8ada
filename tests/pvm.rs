//! KVM-PVM's native mode (docs/pvm.md) under `previrt run`: the probe, `--backend
//! native|auto|pv`, and a guest that meets the mode's rules itself (bench/pvm_guest.S, the
//! guest bench/pvm.sh times).

mod vmm_support;
use vmm_support::*;

const GUEST: &str = include_str!("../bench/pvm_guest.S");
const LOOP: &str = include_str!("../bench/pvm_loop.S");

/// What bench/pvm_loop.S computes for `n` iterations.
fn expected(n: u64) -> u64 {
    let (mut x, mut acc) = (1u64, 0u64);
    for _ in 0..n {
        x = x.wrapping_mul(0x2545_f491_4f6c_dd1d).wrapping_add(0x7f4a_7c15);
        acc ^= x;
    }
    acc
}

/// The guest, with `edit` (from, to) applied to its source.
fn build(name: &str, edit: Option<(&str, &str)>) -> std::path::PathBuf {
    let d = scratch(name);
    let mut src = format!("{GUEST}\n{LOOP}");
    if let Some((from, to)) = edit {
        assert!(src.contains(from), "test edit {from:?} no longer matches bench/pvm_guest.S");
        src = src.replace(from, to);
    }
    guest(&d, "g", &src, "_start")
}

#[test]
fn rule_abiding_guest_runs_natively_and_computes_like_the_host() {
    let k = build("pvm-native", None);
    let n = 200_000;
    let o = run(&k, &["--backend", "native", "--append", &n.to_string()]);
    assert!(
        stderr(&o).contains("KVM-PVM native mode on"),
        "this machine kind's /dev/kvm is KVM-PVM (../shared/FACTS.md); the probe must find it: {}",
        stderr(&o)
    );
    // `mov %cs` reads the hardware selector 0x33 only when the code really runs natively.
    assert_eq!(stdout(&o), format!("mode=native result={}\n", expected(n)), "stderr: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(1), "isa-debug-exit 0");
}

#[test]
fn ordinary_path_runs_the_same_guest_emulated_with_the_same_result() {
    let k = build("pvm-ordinary", None);
    let n = 1_000;
    let o = run(&k, &["--backend", "pv", "--append", &n.to_string()]);
    assert!(!stderr(&o).contains("KVM-PVM"), "pv never touches the mode: {}", stderr(&o));
    assert_eq!(stdout(&o), format!("mode=emulated result={}\n", expected(n)), "stderr: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn auto_backend_says_which_path_it_took() {
    let k = build("pvm-auto", None);
    let o = run(&k, &["--backend", "auto", "--append", "10"]);
    let (err, out) = (stderr(&o), stdout(&o));
    let native = err.contains("KVM-PVM native mode on");
    assert!(native || err.contains("using the ordinary path"), "auto must log its choice: {err}");
    let mode = if native { "native" } else { "emulated" };
    assert_eq!(out, format!("mode={mode} result={}\n", expected(10)), "stderr: {err}");
}

#[test]
fn native_mode_delivers_exceptions_only_through_gates_to_the_0x33_segment() {
    // The guest's exception handler exits with 0x3e: status (0x3e << 1) | 1.
    let ud2 = Some(("    call pvm_compute\n", "    ud2\n"));
    let k = build("pvm-gate33", ud2);
    let o = run(&k, &["--backend", "native", "--append", "1"]);
    assert_eq!(o.status.code(), Some(0x7d), "#UD through a 0x33 gate reaches the handler: {}", stderr(&o));

    let gate10 = build("pvm-gate10", None);
    let src = std::fs::read_to_string(gate10.with_extension("S")).unwrap();
    let src = src.replace("    call pvm_compute\n", "    ud2\n").replace("movw $0x33, 2(%rdi)", "movw $0x10, 2(%rdi)");
    let k = guest(gate10.parent().unwrap(), "g10", &src, "_start");
    let o = run(&k, &["--backend", "native", "--append", "1"]);
    assert!(stderr(&o).contains("triple fault"), "a gate to CS 0x10 cannot be delivered natively: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(4));
    // The same guest on the ordinary path delivers through the 0x10 gate.
    let o = run(&k, &["--backend", "pv", "--append", "1"]);
    assert_eq!(o.status.code(), Some(0x7d), "ordinary path: {}", stderr(&o));
}
