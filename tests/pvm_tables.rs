//! The `pvm` backend and the kernel's descriptor and page tables (docs/pvm.md): gates the
//! kernel writes into its IDT after `lidt` (tests/runtime_fixtures/pvm_idt.S), a GDT without
//! the mode's user segments (pvm_gdt.S), mappings made without `invlpg` (pvm_retry.S) and an
//! intermediate entry moved to another table or made read-only (pvm_subtree.S). Each fixture runs under QEMU TCG with
//! previrt.backend=native (the real instructions: the CPU's answer) and under
//! `previrt run --backend native` with previrt.backend=pvm (natively on this host's KVM-PVM);
//! their register dumps must be equal.

mod common;
mod vmm_support;
use common::{linked_fixture, run_qemu};
use vmm_support::{run, stderr, stdout};

/// The "D<case> ..." register dumps of a run's output.
fn dumps(out: &str) -> Vec<String> {
    out.lines().filter(|l| l.starts_with('D')).map(String::from).collect()
}

/// The fixture's dumps under QEMU TCG (`count` of them, exit status 0) and its whole output
/// under pvm, run natively (`previrt-pvm: native=yes`).
fn cpu_and_pvm(fixture: &str, count: usize) -> (Vec<String>, String, std::process::Output) {
    let linked = linked_fixture(fixture);
    let cpu = run_qemu(&linked, "previrt.backend=native");
    assert_eq!(cpu.status, 0, "QEMU TCG run: {}{}", cpu.stdout, cpu.stderr);
    let expected = dumps(&cpu.stdout);
    assert_eq!(expected.len(), count, "{}", cpu.stdout);
    let o = run(&linked, &["--backend", "native", "--boot", "pvh", "--append", "previrt.backend=pvm"]);
    (expected, stdout(&o), o)
}

/// The first dump where `got` differs from `expected`, as an assertion message.
fn assert_same(expected: &[String], got: &[String], out: &str) {
    for (i, (a, b)) in expected.iter().zip(got).enumerate() {
        assert_eq!(a, b, "dump {} (case {}) differs: CPU, then pvm\n{out}", i + 1, &a[..17]);
    }
    assert_eq!(got.len(), expected.len(), "pvm run stopped early:\n{out}");
}

/// Gates written after `lidt` take effect under pvm as on the CPU: #UD and vector 0x80 go to
/// handlers set after the load, an interrupt-to-trap gate change shows in the IF the handler
/// runs with (and the frame's IF is the kernel's, IF off and on), a new handler for 0x80 is
/// the one called. Deliveries through gates the table does not have raise what the CPU
/// raises: #NP for `int $0x81`, `ud2` and `int3` through gates made not present after `lidt`, #GP for
/// `int $0x81` beyond a shorter table's limit (error codes with and without EXT, RIP back on
/// the `int`). Last, with the #NP gate gone too, the CPU's #DF, which the backend does not
/// model: it stops with one line naming the vector. Fails with a backend that copies the
/// handlers at `lidt` (each case's `ud2` reaches `unexpected`: "X", exit 0x3f).
#[test]
fn pvm_sees_idt_gates_written_after_lidt_like_the_cpu() {
    // 2 dumps per case (before, after) + 1 in the handler: 13 cases; case 0x33's first dump
    // and the #DF handler's.
    let (mut expected, out, o) = cpu_and_pvm("pvm_idt", 13 * 3 + 2);
    // The #NP, #GP and #DF handlers' error codes (rdi). QEMU TCG leaves EXT clear for the
    // `ud2` (case 0x31: 0x32), where the SDM's error code has it set ("an event external to
    // the program, such as an interrupt or an earlier exception"): the backend follows the
    // SDM, so that dump and the next (rdi is the handler's) are compared with 0x33.
    let rdi = |l: &String| l.split(' ').nth(7).unwrap_or_default().to_string();
    let codes: Vec<String> = expected.iter().filter(|l| l.starts_with("D00000000000002")).map(rdi).collect();
    let want = ["000000000000040a", "0000000000000032", "000000000000040a", "000000000000001a", "0000000000000000"];
    assert_eq!(
        codes[codes.len() - 5..],
        want,
        "#NP (int, ud2), #GP, #NP (int3), #DF error codes on the CPU: {expected:?}"
    );
    let at = expected.iter().position(|l| l.starts_with("D0000000000000031")).expect("case 0x31");
    for l in &mut expected[at + 1..at + 3] {
        *l = l.replace(" 0000000000000032 ", " 0000000000000033 ");
    }
    // Up to the case 0x33 dump before the last `int $0x81`, then the backend's stop (the
    // substitute IDT, and so that stop, exists only while the kernel runs natively).
    assert_same(&expected[..expected.len() - 1], &dumps(&out), &out);
    assert!(
        out.contains("FATAL: pvm: the kernel's IDT gate for vector 0x81 is not present, and the gate for the exception the CPU raises then (0xb) is missing too (#DF: not modelled)"),
        "{out}{}",
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(4), "stopped by the runtime: {}", stderr(&o));
}

/// Page-table changes made without `invlpg` (tests/runtime_fixtures/pvm_retry.S), legal on x86
/// and made by Linux: a page mapped where its PT entry was not present, a new PT under a
/// not-present PD entry, a new PD under a not-present PDPT entry, a read-only page made
/// writable, each accessed at once. The pvm backend's copy of the tables is older than each
/// change, so each access faults natively: the runtime must see that the kernel's tables allow
/// it, sync and retry (`faults-resolved`), and still give the kernel's handler the real faults
/// (no PD, PT entry not present, a write to a read-only page) with QEMU's CR2 and error code.
/// The fixture's handler retries a fault its tables allow once per address and stops ("X",
/// exit 0x3f) at a second one. Fails when `previrt_pvm_fault` gives every fault to the
/// kernel: the first case's write faults again at the same address.
#[test]
fn pvm_resolves_faults_on_mappings_made_without_invlpg_like_the_cpu() {
    // 4 cases of 2 dumps, 3 faults the kernel's handler dumps.
    let (expected, out, o) = cpu_and_pvm("pvm_retry", 4 * 2 + 3);
    // The fixture does what it says on the CPU: what was written (rbx) reads back through the
    // identity map (rcx) and, for the new page, through its mapping (rdx); `pattern`'s words
    // read through the new tables and the read-only mapping (rdx); the real faults have the
    // fixture's addresses in CR2 and error codes 0, 0, 3 (P|W).
    let f = |l: &String, i: usize| l.split(' ').nth(i).unwrap_or_default().to_string();
    let (rcx, rdx, rbx) = (2, 3, 4);
    let after = |case: &str| expected.iter().find(|l| l.starts_with(&format!("D{case:0>16}"))).expect(case);
    for w in ["110", "113"] {
        assert_eq!(f(after(w), rbx), f(after(w), rcx), "case {w} on the CPU: {expected:?}");
    }
    let read = [
        ("110", f(after("110"), rbx)),
        ("111", "3333cccc4444dddd".into()),
        ("112", "5555eeee6666ffff".into()),
        ("113", "7777000088881111".into()),
    ];
    for (case, word) in read {
        assert_eq!(f(after(case), rdx), word, "case {case} on the CPU: {expected:?}");
    }
    let faults: Vec<_> = expected.iter().filter(|l| l.starts_with("D0000000000000500")).collect();
    let cr2_codes: Vec<_> = faults.iter().map(|l| (f(l, rbx), f(l, rcx))).collect();
    let want = [(0x4000_0000u64, 0), (0x8000_3000, 0), (0x8000_4000, 3)]
        .map(|(a, e)| (format!("{a:016x}"), format!("{e:016x}")));
    assert_eq!(cr2_codes, want, "CR2 and error codes on the CPU: {faults:?}");

    assert!(out.contains("previrt-pvm: native=yes"), "{out}{}", stderr(&o));
    assert_same(&expected, &dumps(&out), &out);
    assert_eq!(o.status.code(), Some(1), "isa-debug-exit 0: {}", stderr(&o));
    let line = out.lines().find(|l| l.starts_with("previrt-pvm: ")).unwrap_or_default();
    let resolved = line.split(' ').find_map(|w| w.strip_prefix("faults-resolved=")?.parse::<u64>().ok());
    assert!(resolved >= Some(4), "one resolved fault per case at least: {line}");
}

/// A GDT with only null, code32, code64 and data descriptors (no 0x2b/0x33 user segments):
/// the pvm backend runs the kernel natively on a substitute holding the kernel's descriptors
/// plus those two, while `sgdt` shows the kernel's table, also after the kernel loads another
/// one. The dumps (sgdt/sidt, sti/cli/pushf/popf, `ud2` and `int $0x80` frames) equal the
/// CPU's. Fails without the substitute: the backend's first trapping `sti; iretq` is a
/// #GP(0x30), then a triple fault.
#[test]
fn pvm_runs_a_kernel_whose_gdt_lacks_the_user_segments_natively() {
    // TABLES twice, 9 cases of 2 dumps, 5 of them with a handler's.
    let (expected, out, o) = cpu_and_pvm("pvm_gdt", 2 + 9 * 2 + 5);
    assert!(out.contains("previrt-pvm: native=yes"), "{out}{}", stderr(&o));
    assert_same(&expected, &dumps(&out), &out);
    assert_eq!(o.status.code(), Some(1), "isa-debug-exit 0: {}", stderr(&o));
}

/// A GDT whose 0x28/0x30 slots hold other descriptors (ring-0 data and code) cannot get the
/// mode's user segments there: the pvm backend stops with one line naming the selector
/// instead of running into the host's #GP (the CPU runs the kernel as usual).
#[test]
fn pvm_stops_with_a_line_when_the_kernels_gdt_uses_the_modes_selectors() {
    let (_, out, o) = cpu_and_pvm("pvm_gdt_taken", 2 + 9 * 2 + 5);
    assert!(
        out.contains("FATAL: pvm: the kernel's GDT holds 0x00cf93000000ffff at selector 0x28"),
        "{out}{}",
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(4), "stopped by the runtime: {}", stderr(&o));
}

/// `previrt run`/`restore` of `args` whose stdout the test reads: returned once a "P" line (the
/// fixture's loop of sites is running) has been printed, then saved with SIGUSR1 (the guest
/// suspends itself); its whole stdout, stderr and exit status.
fn saved_in_the_loop(args: &[&str]) -> (String, String, Option<i32>) {
    use std::io::{BufRead, Read};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_previrt"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn previrt");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.ends_with("P\n") {
        assert!(out.read_line(&mut seen).unwrap() > 0, "ended before its loop: {seen}");
    }
    let kill = std::process::Command::new("kill").args(["-USR1", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    out.read_to_string(&mut seen).unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (seen, err, child.wait().unwrap().code())
}

/// A run's output without the runtime's "previrt: resumed on …" lines, which may land in
/// the middle of a kernel line.
fn without_resume_lines(s: &str) -> String {
    let mut parts = s.split("previrt: resumed on ");
    let first = parts.next().unwrap_or_default().to_string();
    parts.fold(first, |acc, p| acc + p.split_once('\n').map_or("", |(_, rest)| rest))
}

/// The substitute GDT across a migration: a kernel whose GDT lacks the user segments is saved
/// under pvm in a loop of sites, resumed under `hv` on the ordinary path (which must see the
/// kernel's own GDT: the loop's `sgdt` checks the limit on every platform), saved again and
/// resumed under pvm, which builds the substitute again and runs natively; the dumps equal an
/// uninterrupted pvm run's. Fails when leaving the mode keeps the substitute loaded (the hv
/// leg's `sgdt` shows it: "X", exit 0x3f).
#[test]
fn pvm_gdt_substitute_is_left_for_hv_and_rebuilt_after_a_migration() {
    let linked = linked_fixture("pvm_gdt_migrate");
    let kernel = linked.to_str().unwrap();
    let pvm = ["--backend", "native", "--boot", "pvh", "--append", "previrt.backend=auto"];
    let full = run(&linked, &pvm);
    let expected = dumps(&stdout(&full));
    assert_eq!(full.status.code(), Some(1), "uninterrupted: {}{}", stdout(&full), stderr(&full));
    assert!(stdout(&full).contains("previrt-pvm: native=yes") && expected.len() == 2 + 9 * 2 + 5, "{}", stdout(&full));

    let d = vmm_support::scratch(&format!("pvm-gdt-migrate-{}", std::process::id()));
    let (s1, s2) = (d.join("pvm.snap"), d.join("hv.snap"));
    let (s1, s2) = (s1.to_str().unwrap(), s2.to_str().unwrap());
    let (a, ae, st) = saved_in_the_loop(&[&["run", kernel, "--snapshot", s1][..], &pvm].concat());
    assert_eq!(st, Some(0), "pvm leg: {a}{ae}");
    assert!(ae.contains("cooperative: guest suspended after"), "{ae}");
    let (b, be, st) =
        saved_in_the_loop(&["restore", s1, "--backend", "pv", "--snapshot", s2, "--snapshot-after", "600000ms"]);
    assert_eq!(st, Some(0), "hv leg: {b}{be}");
    assert!(b.contains("previrt: resumed on previrt-hv: backend=hv "), "{b}{be}");
    let c = std::process::Command::new(env!("CARGO_BIN_EXE_previrt"))
        .args(["restore", s2, "--backend", "native"])
        .output()
        .unwrap();
    let c_out = stdout(&c);
    assert_eq!(c.status.code(), Some(1), "pvm again: {c_out}{}", stderr(&c));
    assert!(c_out.contains("previrt-pvm: native=yes"), "{c_out}");
    let legs = without_resume_lines(&format!("{a}{b}{c_out}"));
    assert_same(&expected, &dumps(&legs), &legs);
}

/// A PD entry of the live address space moved to another page table (one `invlpg`, of the
/// only page read before), then made read-only (every page under it `invlpg`d, CR0.WP set):
/// the pvm backend's copy follows the new table and the new flags as the CPU does. Fails with
/// a backend that brings only the leaf of the old copied subtree in line (checked: the three
/// pages never read show table A's frames, and the write through the read-only entry does not
/// fault).
#[test]
fn pvm_follows_an_intermediate_entry_moved_to_another_table_or_made_read_only() {
    // Cases 0x10-0x13 and the #PF handler's dump.
    let (expected, out, o) = cpu_and_pvm("pvm_subtree", 5);
    assert!(out.contains("previrt-pvm: native=yes"), "{out}{}", stderr(&o));
    assert_same(&expected, &dumps(&out), &out);
    assert_eq!(o.status.code(), Some(1), "isa-debug-exit 0: {}", stderr(&o));
}
