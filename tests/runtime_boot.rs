//! The guest runtime end to end: the example kernel built with the previrt toolchain,
//! `previrt link`ed, booted with the native and the trace backend under QEMU TCG and on the
//! in-tree hypervisor (`previrt run`, KVM), compared with the plain build.

mod common;

use common::{build_example_kernel, example_kernel, run_qemu, workload_lines, QemuRun};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn previrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_previrt"))
}

/// The pre-virtualized example kernel, linked with the runtime, and `previrt link --json`'s
/// report for it.
struct Linked {
    dir: PathBuf,
    elf: PathBuf,
    report: serde_json::Value,
}

fn link(input: &Path, output: &Path, backend: &str) -> serde_json::Value {
    let o = previrt().arg("link").arg(input).arg("-o").arg(output).args(["--backend", backend, "--json"]).output().unwrap();
    assert!(o.status.success(), "previrt link failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("previrt link --json prints JSON")
}

fn linked_kernel() -> &'static Linked {
    static K: OnceLock<Linked> = OnceLock::new();
    K.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("runtime-kernel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tc = dir.join("toolchain");
        let o = previrt().args(["toolchain", "install", "--prefix"]).arg(&tc).output().unwrap();
        assert!(o.status.success(), "previrt toolchain install: {}", String::from_utf8_lossy(&o.stderr));
        let prefix = format!("{}/bin/x86_64-previrt-linux-gnu-", tc.display());
        let build = build_example_kernel(&dir.join("kernel"), Some(&prefix));
        let elf = dir.join("linked.elf");
        let report = link(&build.pvh_elf(), &elf, "native");
        Linked { dir, elf, report }
    })
}

/// Output lines that must match the plain kernel byte for byte: all but TIMING lines and the
/// runtime's own `previrt:` / `previrt-trace:` lines.
fn comparable(out: &str) -> String {
    out.lines()
        .filter(|l| !l.starts_with("TIMING ") && !l.starts_with("previrt:") && !l.starts_with("previrt-trace"))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn assert_passed(run: &QemuRun, what: &str) {
    assert_eq!(run.status, 0, "{what}: run-qemu status {}\n{}{}", run.status, run.stdout, run.stderr);
}

/// `previrt: backend=B sites=N patched in T us (platform=P)`, as (B, N).
fn boot_line(out: &str) -> (String, u64) {
    let line = out.lines().find(|l| l.starts_with("previrt: backend=")).unwrap_or_else(|| panic!("no boot line in\n{out}"));
    let word = |key: &str| line.split(' ').find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in `{line}`"));
    assert!(line.contains(" patched in ") && line.contains("(platform="), "malformed boot line `{line}`");
    (word("backend=").to_string(), word("sites=").parse().unwrap())
}

/// The trace summary: kind → count, and (executed, total) sites.
fn trace_summary(out: &str) -> (std::collections::BTreeMap<String, u64>, (u64, u64)) {
    let line = out.lines().find_map(|l| l.strip_prefix("previrt-trace:")).unwrap_or_else(|| panic!("no trace summary in\n{out}"));
    let mut kinds = std::collections::BTreeMap::new();
    let mut sites = None;
    for w in line.split_whitespace() {
        let (k, v) = w.split_once('=').unwrap();
        if k == "sites-executed" {
            let (a, b) = v.split_once('/').unwrap();
            sites = Some((a.parse().unwrap(), b.parse().unwrap()));
        } else {
            kinds.insert(k.to_string(), v.parse().unwrap());
        }
    }
    (kinds, sites.expect("sites-executed in the summary"))
}

#[test]
fn native_backend_prints_the_same_as_the_plain_kernel() {
    let k = linked_kernel();
    let sites = k.report["sites"].as_u64().unwrap();
    assert!(sites > 50, "the pre-virtualized kernel should have many sites, report: {}", k.report);
    let plain = run_qemu(&example_kernel().pvh_elf(), "");
    let pv = run_qemu(&k.elf, "");
    assert_passed(&plain, "plain kernel");
    assert_passed(&pv, "pre-virtualized kernel, native backend");
    assert_eq!(boot_line(&pv.stdout), ("native".to_string(), sites));
    assert_eq!(comparable(&plain.stdout), comparable(&pv.stdout), "outputs differ");
    assert!(!pv.stdout.contains("previrt-trace:"), "native backend must not trace");
}

#[test]
fn trace_backend_passes_and_executes_every_kind_in_the_table() {
    let k = linked_kernel();
    let cmdline = "previrt.backend=trace previrt.trace=sites";
    let plain = run_qemu(&example_kernel().pvh_elf(), cmdline);
    let pv = run_qemu(&k.elf, cmdline);
    assert_passed(&pv, "pre-virtualized kernel, trace backend");
    assert_eq!(workload_lines(&plain.stdout), workload_lines(&pv.stdout), "workload results differ under trace");
    assert_eq!(comparable(&plain.stdout), comparable(&pv.stdout), "outputs differ under trace");
    let sites = k.report["sites"].as_u64().unwrap();
    assert_eq!(boot_line(&pv.stdout), ("trace".to_string(), sites));
    let (counts, (executed, total)) = trace_summary(&pv.stdout);
    assert_eq!(total, sites);
    assert!(executed > 0 && executed <= total);
    for (kind, v) in k.report["kinds"].as_object().unwrap() {
        if v["long_mode"].as_u64().unwrap() > 0 {
            assert!(counts.get(kind).copied().unwrap_or(0) > 0, "kind {kind} has sites but never executed: {counts:?}");
        }
    }
    // The site profile: one line per executed site, whose counts add up to the kind counts.
    let mut per_kind = std::collections::BTreeMap::<String, u64>::new();
    let mut lines = 0;
    for l in pv.stdout.lines().filter_map(|l| l.strip_prefix("previrt-trace-site: ")) {
        let w: Vec<&str> = l.split(' ').collect();
        assert_eq!(w.len(), 3, "profile line `{l}`");
        assert!(u64::from_str_radix(w[0].trim_start_matches("0x"), 16).unwrap() >= 0x10_0000, "site address in `{l}`");
        *per_kind.entry(w[1].to_string()).or_default() += w[2].parse::<u64>().unwrap();
        lines += 1;
    }
    assert_eq!(lines, executed, "one profile line per executed site");
    assert_eq!(per_kind, counts, "per-site counts add up to the per-kind counts");
}

#[test]
fn link_time_default_backend_applies_without_a_command_line() {
    let k = linked_kernel();
    let input = k.dir.join("kernel/kernel-pvh.elf");
    let out = k.dir.join("linked-trace.elf");
    let report = link(&input, &out, "trace");
    assert_eq!(report["default_backend"], "trace");
    let run = run_qemu(&out, "");
    assert_passed(&run, "trace by default");
    assert_eq!(boot_line(&run.stdout).0, "trace");
    trace_summary(&run.stdout);
    // The command line still wins.
    let run = run_qemu(&out, "previrt.backend=native");
    assert_passed(&run, "native from the command line");
    assert_eq!(boot_line(&run.stdout).0, "native");
}

#[test]
fn link_leaves_its_input_alone_and_refuses_bad_input() {
    let k = linked_kernel();
    let input = k.dir.join("kernel/kernel-pvh.elf");
    let before = std::fs::read(&input).unwrap();
    let out = k.dir.join("linked-again.elf");
    assert_eq!(link(&input, &out, "native")["multiboot_header"], false);
    assert_eq!(std::fs::read(&input).unwrap(), before, "previrt link modified its input");
    // The multiboot image links too, with a note that multiboot loaders bypass the runtime.
    assert_eq!(link(&k.dir.join("kernel/kernel.elf"), &out, "native")["multiboot_header"], true);

    let garbage = k.dir.join("garbage.bin");
    std::fs::write(&garbage, b"not an elf at all").unwrap();
    // A kernel whose PVH note was renamed away: ELF, but no PVH entry.
    let mut no_pvh = before.clone();
    let at = no_pvh.windows(4).position(|w| w == b"Xen\0").expect("the kernel has a Xen note") - 4;
    assert_eq!(u32::from_le_bytes(no_pvh[at..at + 4].try_into().unwrap()), 18);
    no_pvh[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let no_pvh_path = k.dir.join("no-pvh.elf");
    std::fs::write(&no_pvh_path, &no_pvh).unwrap();

    for (bad, why) in [(&garbage, "not a 64-bit"), (&no_pvh_path, "no PVH entry note")] {
        let target = k.dir.join("must-not-exist.elf");
        let o = previrt().arg("link").arg(bad).arg("-o").arg(&target).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "bad input must exit 2: {err}");
        assert_eq!(err.lines().count(), 1, "one clear line: {err}");
        assert!(err.contains(why), "expected `{why}` in: {err}");
        assert!(!target.exists(), "no output on error");
    }
}

#[test]
fn runtime_boots_on_the_in_tree_hypervisor_with_both_backends() {
    let k = linked_kernel();
    let plain = run_qemu(&example_kernel().pvh_elf(), "");
    assert_passed(&plain, "plain kernel");
    for backend in ["native", "trace"] {
        let o = previrt()
            .args(["run", "--boot", "pvh", "--append", &format!("previrt.backend={backend}")])
            .arg(&k.elf)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        // isa-debug-exit value 0 (PASS) becomes status 1, as with QEMU.
        assert_eq!(o.status.code(), Some(1), "{backend}: {out}{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(boot_line(&out), (backend.to_string(), k.report["sites"].as_u64().unwrap()));
        assert!(out.contains("(platform=previrt-hv)"), "the runtime should recognise the in-tree hypervisor: {out}");
        assert_eq!(workload_lines(&plain.stdout), workload_lines(&out), "{backend}: workload results differ");
        assert_eq!(backend == "trace", out.contains("previrt-trace:"), "{backend}: trace summary");
    }
}
