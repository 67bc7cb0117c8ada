//! KVM-PVM's native mode (docs/pvm.md) under `previrt run`: the probe, `--backend
//! native|auto|pv`, a guest that meets the mode's rules itself (bench/pvm_guest.S, the guest
//! bench/pvm.sh times), and the runtime's `pvm` backend running the pre-virtualized example
//! kernel natively.

mod common;
mod vmm_support;
use common::{example_kernel, run_qemu, workload_lines};
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

/// The guest, with `edits` (from, to) applied to its source in order.
fn build(name: &str, edits: &[(&str, &str)]) -> std::path::PathBuf {
    let d = scratch(name);
    let mut src = format!("{GUEST}\n{LOOP}");
    for (from, to) in edits {
        assert!(src.contains(from), "test edit {from:?} no longer matches bench/pvm_guest.S");
        src = src.replacen(from, to, 1);
    }
    guest(&d, "g", &src, "_start")
}

/// Edits that run `ud2` instead of the compute loop: the guest's handler exits with 0x3e.
const UD2: (&str, &str) = ("    call pvm_compute\n", "    ud2\n");
/// Status of an exit through the guest's exception handler: (0x3e << 1) | 1.
const FAULTED: i32 = 0x7d;

#[test]
fn rule_abiding_guest_runs_natively_and_computes_like_the_host() {
    let k = build("pvm-native", &[]);
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
    let k = build("pvm-ordinary", &[]);
    let n = 1_000;
    let o = run(&k, &["--backend", "pv", "--append", &n.to_string()]);
    assert!(!stderr(&o).contains("KVM-PVM"), "pv never touches the mode: {}", stderr(&o));
    assert_eq!(stdout(&o), format!("mode=emulated result={}\n", expected(n)), "stderr: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn auto_backend_says_which_path_it_took() {
    let k = build("pvm-auto", &[]);
    let o = run(&k, &["--backend", "auto", "--append", "10"]);
    let (err, out) = (stderr(&o), stdout(&o));
    let native = err.contains("KVM-PVM native mode on");
    assert!(native || err.contains("using the ordinary path"), "auto must log its choice: {err}");
    let mode = if native { "native" } else { "emulated" };
    assert_eq!(out, format!("mode={mode} result={}\n", expected(10)), "stderr: {err}");
}

#[test]
fn native_mode_delivers_exceptions_only_through_gates_to_the_0x33_segment() {
    let k = build("pvm-gate33", &[UD2]);
    let o = run(&k, &["--backend", "native", "--append", "1"]);
    assert_eq!(o.status.code(), Some(FAULTED), "#UD through a 0x33 gate reaches the handler: {}", stderr(&o));

    let k = build("pvm-gate10", &[UD2, ("movw $0x33, 2(%rdi)", "movw $0x10, 2(%rdi)")]);
    let o = run(&k, &["--backend", "native", "--append", "1"]);
    assert!(stderr(&o).contains("triple fault"), "a gate to CS 0x10 cannot be delivered natively: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(4));
    // The same guest on the ordinary path delivers through the 0x10 gate.
    let o = run(&k, &["--backend", "pv", "--append", "1"]);
    assert_eq!(o.status.code(), Some(FAULTED), "ordinary path: {}", stderr(&o));
}

/// Gate 3 to `ret3`, an `int3` before the loop; `ret3` applies `fixup` to the frame, then iretq.
fn int3_guest(name: &str, fixup: &str) -> std::path::PathBuf {
    let gate3 = "    lidt idtr(%rip)
    lea ret3(%rip), %rax
    lea idt+16*3(%rip), %rdi
    mov %ax, (%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    int3
";
    let ret3 = format!("ret3:\n{fixup}    iretq\nfault:\n");
    build(name, &[("    lidt idtr(%rip)\n", gate3), ("fault:\n", &ret3)])
}

#[test]
fn native_frames_show_kernel_selectors_but_iretq_needs_ring3_ones() {
    // The host pushes CS 0x10 / SS 0x18 (the kernel's view; other selectors exit 0x3c);
    // returning to them from ring 3 is a #GP, which the guest's handler turns into its 0x3e exit.
    let fixup = "    cmpq $0x10, 8(%rsp)\n    jne 9f\n    cmpq $0x18, 32(%rsp)\n    je 8f\n9:  mov $0x3c, %eax\n    jmp exit\n8:\n";
    let k = int3_guest("pvm-iret-plain", fixup);
    let o = run(&k, &["--backend", "native", "--append", "1"]);
    assert_eq!(o.status.code(), Some(FAULTED), "iretq to CS 0x10 from native code: {}", stderr(&o));
    let o = run(&k, &["--backend", "pv", "--append", "1"]);
    assert_eq!(o.status.code(), Some(1), "the same return on the ordinary path works: {}", stderr(&o));
    // With the frame rewritten to the ring-3 selectors the return works and the loop runs on.
    let k = int3_guest("pvm-iret-ring3", "    movq $0x33, 8(%rsp)\n    movq $0x2b, 32(%rsp)\n");
    let n = 1000;
    let o = run(&k, &["--backend", "native", "--append", &n.to_string()]);
    assert_eq!(stdout(&o), format!("mode=native result={}\n", expected(n)), "stderr: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn native_code_faults_on_pages_without_the_user_bit() {
    // U=0 in the PDEs: the first fetch after the CR3 load faults before the IDT exists.
    let k = build("pvm-no-u", &[("mov $0x87, %eax", "mov $0x83, %eax")]);
    let o = run(&k, &["--backend", "native", "--append", "1"]);
    assert!(stderr(&o).contains("triple fault"), "{}", stderr(&o));
    let o = run(&k, &["--backend", "pv", "--append", "1"]);
    assert_eq!(o.status.code(), Some(1), "the ordinary path ignores U: {}", stderr(&o));
}

/// Upcalls of the previrt ABI (docs/hv-abi.md): hypercall page at 0x1000, vCPU page at 0x2000,
/// event vector 0x40, periodic 1 ms timer; the guest spins until 20 upcalls or N iterations
/// and exits with the count. `iret_tail` runs in the handler just before its iretq.
fn upcall_guest(name: &str, iret_tail: &str) -> std::path::PathBuf {
    let hc = |nr: u64| 0x1000 + previrt_hv_abi::HYPERCALL_STUB_SIZE as u64 * nr;
    let body = format!(
        "    mov ${hp:#x}, %ecx
    mov $0x1001, %eax
    xor %edx, %edx
    wrmsr
    mov ${vp:#x}, %ecx
    mov $0x2001, %eax
    wrmsr
    lea upcall(%rip), %rax
    lea idt+16*0x40(%rip), %rdi
    mov %ax, (%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    mov $0x40, %edi
    mov ${vec:#x}, %eax
    call *%rax
    mov ${periodic}, %edi
    mov $1000000, %esi
    mov ${timer:#x}, %eax
    call *%rax
    xor %r14d, %r14d
    movl $1, 0x2000
    sti
1:  cmp $20, %r14
    jae 2f
    dec %r12
    jnz 1b
2:  mov %r14d, %eax
    jmp exit
upcall:
    inc %r14
    movq $0, 0x2008
    movl $1, 0x2000
    movq $0x33, 8(%rsp)
    movq $0x2b, 32(%rsp)
{iret_tail}    iretq
",
        hp = previrt_hv_abi::MSR_HYPERCALL_PAGE,
        vp = previrt_hv_abi::MSR_VCPU_PAGE,
        vec = hc(previrt_hv_abi::hc::SET_EVENT_VECTOR),
        periodic = previrt_hv_abi::timer::PERIODIC,
        timer = hc(previrt_hv_abi::hc::TIMER_SET),
    );
    build(name, &[("    call pvm_compute\n", &body)])
}

#[test]
fn vmm_upcalls_reach_native_code_and_delivery_clears_the_virtual_if() {
    // A native iretq (ring 3 to ring 3) does not give back the interrupt flag the delivery
    // took: without an `sti` in the handler only the first upcall arrives; with one, all do.
    let iters = "300000000";
    let k = upcall_guest("pvm-upcall-sti", "    sti\n");
    let o = run(&k, &["--backend", "native", "--append", iters, "--stats"]);
    assert!(stdout(&o).starts_with("mode=native"), "{}", stdout(&o));
    assert_eq!(o.status.code(), Some((20 << 1) | 1), "20 upcalls with sti before iretq: {}", stderr(&o));
    let k = upcall_guest("pvm-upcall-nosti", "");
    let o = run(&k, &["--backend", "native", "--append", iters, "--stats"]);
    assert_eq!(o.status.code(), Some((1 << 1) | 1), "one upcall, then the virtual IF stays clear: {}", stderr(&o));
}

/// The linked kernel under `previrt run --boot pvh` with `args` and kernel command line `append`.
fn run_linked(args: &[&str], append: &str) -> std::process::Output {
    let mut all = vec!["--boot", "pvh", "--append", append];
    all.extend_from_slice(args);
    run(common::linked_example_kernel(), &all)
}

/// The proof: with the mode on, `previrt.backend=auto` picks `pvm`, the kernel runs
/// natively (its sites run at RPL 3) and every workload gives what the plain kernel gives on
/// QEMU TCG, at the kernel's default 1 kHz timer. The VMM sees almost no exits: the two ABI
/// page MSRs and a handful of port writes (hypercalls, the runtime's UART set-up).
#[test]
fn pvm_backend_runs_every_workload_natively_with_qemu_results() {
    let qemu = run_qemu(&example_kernel().pvh_elf(), "");
    assert_eq!(qemu.status, 0, "QEMU TCG run of the plain kernel:\n{}{}", qemu.stdout, qemu.stderr);
    let stats = scratch(&format!("pvm-stats-{}", std::process::id())).join("stats.json");
    let o = run_linked(&["--backend", "native", "--stats-json", stats.to_str().unwrap()], "previrt.backend=auto");
    let out = stdout(&o);
    assert!(out.contains("previrt: backend=auto chose pvm (platform=previrt-hv)"), "{out}{}", stderr(&o));
    assert!(out.contains("previrt-pvm: native=yes"), "the kernel's sites ran at RPL 3: {out}");
    // The shadow cache: the `pagetable` workload switches among three address spaces, so
    // most CR3 loads find their copy cached; its repeated `invlpg`s find nothing to change.
    let count = |key: &str| pvm_count(&out, key);
    let (syncs, builds) = (count("shadow-syncs"), count("shadow-builds"));
    assert!(builds > 0 && builds * 3 <= syncs, "copies built whole {builds} of {syncs} syncs: {out}");
    assert!(count("invlpg-unchanged") > 0, "{out}");
    let expected = workload_lines(&qemu.stdout);
    assert!(expected.len() >= 7 && expected.iter().all(|w| w.pass), "QEMU: {expected:?}");
    assert_eq!(workload_lines(&out), expected, "pvm backend vs QEMU TCG\n{out}");
    assert!(out.contains("RESULT PASS"), "{out}");
    assert_eq!(o.status.code(), Some(1), "isa-debug-exit 0 through SHUTDOWN");
    let console = |s: &str| s.lines().filter(|l| l.starts_with("CONSOLE ")).map(String::from).collect::<Vec<_>>();
    assert_eq!(console(&out), console(&qemu.stdout), "console text through the ring");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    let reasons: Vec<&String> = s["reasons"].as_object().unwrap().keys().collect();
    assert!(reasons.iter().all(|r| ["io_out", "wrmsr", "interrupted"].contains(&r.as_str())), "{}", s["reasons"]);
    assert!(s["exits"].as_u64().unwrap() < 200, "exits: {}", s["reasons"]);
}

/// A counter of the `pvm` backend's exit line (`previrt-pvm: … key=N …`).
fn pvm_count(out: &str, key: &str) -> u64 {
    let line = out.lines().find(|l| l.starts_with("previrt-pvm: ")).unwrap_or_default();
    let v = line.split(' ').find_map(|f| f.strip_prefix(key)?.strip_prefix('='));
    v.and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("no {key} in the exit line: {line}"))
}

/// The flushes `pvm` leaves out (an `invlpg` after a mapping the copy did not have, a CR3
/// load of a copy with nothing stale in it) must never be ones the kernel needs: the
/// `pagetable` workload remaps present pages to other frames and reads them back through
/// the same addresses (after `invlpg`, after a CR3 reload without `invlpg`, across two
/// address spaces), unmaps pages and expects a fault, three times over with the shadow
/// cache warm. Its checksums under `pvm` equal QEMU TCG's (the CPU) and those of the
/// ordinary `hv` path (every flush reaching the hardware). Checked by breaking it once on
/// purpose: a replaced entry without its hardware `invlpg`, or a CR3 load skipped after a
/// replacement, makes the workload FAIL here ("an unmapped page is still readable", "a CR3
/// reload did not flush a changed mapping").
#[test]
fn pvm_skips_only_flushes_nothing_needs_pagetable_checksums_match_qemu_and_hv() {
    const CMDLINE: &str = "workloads=pagetable repeat=3 hz=100";
    let qemu = run_qemu(&example_kernel().pvh_elf(), CMDLINE);
    assert_eq!(qemu.status, 0, "QEMU TCG run:\n{}{}", qemu.stdout, qemu.stderr);
    let expected = workload_lines(&qemu.stdout);
    assert!(expected.len() == 3 && expected.iter().all(|w| w.pass && w.checksum.is_some()), "QEMU: {expected:?}");
    let hv = run_linked(&["--backend", "pv"], &format!("previrt.backend=hv {CMDLINE}"));
    assert_eq!(workload_lines(&stdout(&hv)), expected, "hv (ordinary path) vs QEMU TCG\n{}", stdout(&hv));
    let o = run_linked(&["--backend", "native"], &format!("previrt.backend=pvm {CMDLINE}"));
    let out = stdout(&o);
    assert!(out.contains("previrt-pvm: native=yes"), "{out}{}", stderr(&o));
    assert_eq!(workload_lines(&out), expected, "pvm vs QEMU TCG\n{out}");
    // Flushes were left out: entries filled in place without a hardware `invlpg`.
    let (updates, flushes) = (pvm_count(&out, "shadow-updates"), pvm_count(&out, "invlpg-flushes"));
    assert!(flushes > 0 && flushes < updates, "invlpg-flushes {flushes} of shadow-updates {updates}: {out}");
    assert!(pvm_count(&out, "cr3-loads") <= pvm_count(&out, "shadow-syncs"), "{out}");
}

/// The lean `cli`/`sti`/`pushf`/`popf` entries are exact: tests/runtime_fixtures/pvm_lean.S
/// runs each (64-bit: the lean entries; 16-bit: the stub) with four flag patterns (every
/// arithmetic flag, DF, ID) and IF on and off, and dumps every GPR and the whole RFLAGS before
/// and after; likewise a `ud2` into an interrupt-gate handler, which dumps the flags it
/// starts with (IF clear) and its frame's (the kernel's IF at the fault). First `sidt` and
/// `sgdt` dump the tables the kernel loaded (not the backend's substitute IDT); last, page
/// faults in nine forms dump CR2 and the error code as the kernel's handler sees them (the
/// backend decodes the address of seven of them instead of reading CR2: `cr2-reads=2`). The CPU's dumps (QEMU TCG, `previrt.backend=native`: the real instructions at
/// ring 0) must equal those under `pvm` natively, IF included (the kernel's IF is `vif`,
/// which `pushf` must show). Checked by breaking it once on purpose: a `cli` entry without
/// its save of %rax, or a `sti` entry without its final `popfq`, makes this fail.
#[test]
fn pvm_lean_interrupt_flag_entries_keep_every_register_and_flag_like_the_cpu() {
    let linked = common::linked_fixture("pvm_lean");
    let dumps = |out: &str| out.lines().filter(|l| l.starts_with('D')).map(String::from).collect::<Vec<_>>();
    let cpu = run_qemu(&linked, "previrt.backend=native");
    assert_eq!(cpu.status, 0, "QEMU TCG run: {}{}", cpu.stdout, cpu.stderr);
    let expected = dumps(&cpu.stdout);
    assert_eq!(expected.len(), 1 + 4 * (13 * 2 + 2 * 3) + 9, "{}", cpu.stdout);
    let o = run(&linked, &["--backend", "native", "--boot", "pvh", "--append", "previrt.backend=pvm"]);
    let out = stdout(&o);
    assert!(out.contains("previrt-pvm: native=yes"), "{out}{}", stderr(&o));
    let got = dumps(&out);
    for (i, (a, b)) in expected.iter().zip(&got).enumerate() {
        assert_eq!(a, b, "dump {} (case {}) differs: CPU, then pvm", i + 1, &a[..17]);
    }
    assert_eq!(got.len(), expected.len(), "pvm run stopped early: {out}{}", stderr(&o));
    assert_eq!(o.status.code(), Some(1), "isa-debug-exit 0");
    // The 64-bit forms ran through the lean entries: the stub saw none of the `cli`s,
    // only the first `sti` (which re-opens the mode's interrupt flag) and the 16-bit forms.
    let summary = out.lines().find(|l| l.starts_with("previrt-trace:")).unwrap_or_default();
    let stub = |kind: &str| {
        summary.split(' ').find_map(|w| w.strip_prefix(kind)?.strip_prefix('=')?.parse::<u64>().ok()).unwrap_or(0)
    };
    assert!(stub("cli") == 0 && stub("sti") <= 1, "{summary}");
    assert!(stub("pushf") == 4 && stub("popf") == 8, "16-bit forms only: {summary}");
    assert_eq!(pvm_count(&out, "cr2-reads"), 2, "push and the page-crossing access read CR2: {out}");
}

/// Without the mode the runtime never tries it: `auto` takes `hv`, and `pvm` asked by name is
/// refused with a line and the kernel runs with the native backend.
#[test]
fn pvm_backend_needs_the_mode_advertised_by_the_vmm() {
    let o = run_linked(&["--backend", "pv"], "previrt.backend=auto workloads=cpuid_msr hz=100");
    let out = stdout(&o);
    assert!(out.contains("previrt: backend=auto chose hv (platform=previrt-hv)"), "{out}");
    assert!(!out.contains("previrt-pvm"), "{out}");
    let o = run_linked(&["--backend", "pv"], "previrt.backend=pvm workloads=cpuid_msr hz=100");
    let out = stdout(&o);
    assert!(
        out.contains("previrt: backend pvm unavailable (the VMM does not offer KVM-PVM native mode"),
        "{out}{}",
        stderr(&o)
    );
    assert!(out.contains("WORKLOAD cpuid_msr PASS") && out.contains("RESULT PASS"), "{out}");
}

/// The kernel's own lines of a run's output (a migration's "resumed on" line may land in the
/// middle of one: it is cut out).
fn kernel_lines(out: &str) -> Vec<String> {
    let mut s = out.to_string();
    while let Some(at) = s.find("previrt: resumed on ") {
        let end = s[at..].find('\n').map_or(s.len(), |n| at + n + 1);
        s.replace_range(at..end, "");
    }
    s.lines()
        .filter(|l| ["WORKLOAD ", "CONSOLE ", "RESULT "].iter().any(|p| l.starts_with(p)))
        .map(String::from)
        .collect()
}

/// Issue 10's migration scenario: a kernel running natively under `pvm` is saved mid-run
/// (it suspends itself, leaving the mode), restored without the mode (the runtime re-patches
/// for `hv` on the ordinary path), saved again and restored with the mode (re-patched for
/// `pvm`, native again); the first snapshot is also restored with the mode directly. The
/// kernel's lines are those of an uninterrupted run. Its root table is at an even page: no
/// suspend parks.
#[test]
fn pvm_guest_moves_to_hv_and_back_re_patching_each_time() {
    let legs = moves_pvm_hv_pvm(common::linked_example_kernel(), "pvm-migrate");
    assert!(legs.iter().all(|l| !l.contains("odd page")), "this kernel's root is at an even page: {legs:?}");
}

/// The same with the kernel's root page table at an odd page (`make KCFLAGS=-DPML4_ODD_PAGE`):
/// loaded as it is, off the shadow, that root would keep the CPU in the mode on tables
/// without U bits (a triple fault at the first fetch). Each suspend (pvm's and hv's) leaves
/// through a copy of the root at an even page and says so in the resume line; `hv` gets the
/// kernel's own CR3 back, `pvm` syncs its shadow from it, and after every workload the kernel
/// checks that CR3 reads back its root (`-DCHECK_CR3_READBACK`: a FAIL line otherwise).
/// Checked by breaking it: without the park in `pvm`'s leave the saving run triple-faults,
/// without the one in `hv`'s suspend the restore under `--backend native` does.
#[test]
fn pvm_guest_whose_root_table_is_at_an_odd_page_moves_to_hv_and_back() {
    let d = scratch(&format!("pvm-odd-root-kernel-{}", std::process::id()));
    let kernel = common::link_example_kernel(&d, &["KCFLAGS=-DPML4_ODD_PAGE -DCHECK_CR3_READBACK"]);
    let legs = moves_pvm_hv_pvm(&kernel, "pvm-odd-migrate");
    for leg in &legs {
        assert!(leg.contains("which is at an odd page)"), "the suspend before this resume parked: {leg}");
    }
}

/// Runs `kernel` uninterrupted, then saved under `pvm`, resumed under `hv` (`restore --backend
/// pv`), saved again and resumed under `pvm`; and the first snapshot resumed under `pvm`
/// directly. Asserts each leg and that the kernel's lines equal the uninterrupted run's. The
/// three resume lines (hv's, pvm's after hv, pvm's from the first snapshot).
fn moves_pvm_hv_pvm(kernel: &std::path::Path, name: &str) -> [String; 3] {
    const CMDLINE: &str =
        "previrt.backend=auto workloads=timer,cpuid_msr,console repeat=12 hz=100 ticks=20 console_lines=4";
    let d = scratch(&format!("{name}-{}", std::process::id()));
    let run_kernel = |args: &[&str]| {
        let mut all = vec!["--boot", "pvh", "--append", CMDLINE, "--backend", "native"];
        all.extend_from_slice(args);
        run(kernel, &all)
    };
    let full = run_kernel(&[]);
    assert_eq!(full.status.code(), Some(1), "uninterrupted run: {}{}", stdout(&full), stderr(&full));
    let expected = kernel_lines(&stdout(&full));
    assert_eq!(expected.iter().filter(|l| l.starts_with("WORKLOAD ")).count(), 36, "{}", stdout(&full));

    let snap = |n: &str| d.join(n).to_str().unwrap().to_string();
    let (s1, s2) = (snap("pvm.snap"), snap("hv.snap"));
    let a = run_kernel(&["--snapshot", &s1, "--snapshot-after", "2000ms"]);
    assert_eq!(a.status.code(), Some(0), "saving run: {}{}", stdout(&a), stderr(&a));
    assert!(stderr(&a).contains("cooperative: guest suspended after"), "pvm did not suspend itself: {}", stderr(&a));
    assert!(!stdout(&a).contains("RESULT"), "snapshot taken after the end: {}", stdout(&a));

    let restore = |from: &str, args: &[&str]| {
        let mut all = vec!["restore", from];
        all.extend_from_slice(args);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_previrt")).args(&all).output().unwrap();
        (stdout(&o), stderr(&o), o.status.code())
    };
    let (b, be, st) = restore(&s1, &["--backend", "pv", "--snapshot", &s2, "--snapshot-after", "3000ms"]);
    assert_eq!(st, Some(0), "hv leg: {b}{be}");
    assert!(b.starts_with("previrt: resumed on previrt-hv: backend=hv abi=v1 sites="), "{b}{be}");
    assert!(be.contains("cooperative: guest suspended after"), "the hv leg suspends too: {be}");
    let (c, ce, st) = restore(&s2, &["--backend", "native"]);
    assert_eq!(st, Some(1), "back on pvm: {c}{ce}");
    assert!(c.contains("previrt: resumed on previrt-hv: backend=pvm sites="), "{c}");
    assert!(c.contains("previrt-pvm: native=yes"), "native again after the move back: {c}");
    let (e, ee, st) = restore(&s1, &["--backend", "native"]);
    assert_eq!(st, Some(1), "pvm to pvm: {e}{ee}");
    assert!(e.contains("previrt-pvm: native=yes"), "native after pvm to pvm: {e}");
    let a = stdout(&a);
    assert_eq!(kernel_lines(&format!("{a}{b}{c}")), expected, "three legs != uninterrupted run");
    assert_eq!(kernel_lines(&format!("{a}{e}")), expected, "pvm, then pvm again != uninterrupted run");
    let resumed = |out: &str| {
        let at = out.find("previrt: resumed on ").unwrap_or(out.len());
        out[at..].lines().next().unwrap_or_default().to_string()
    };
    [resumed(&b), resumed(&c), resumed(&e)]
}
