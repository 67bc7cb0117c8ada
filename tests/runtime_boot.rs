//! The guest runtime end to end: the example kernel built with the previrt toolchain,
//! `previrt link`ed, booted with the native and the trace backend under QEMU TCG and on the
//! in-tree hypervisor (`previrt run`, KVM), compared with the plain build; through each boot
//! path the runtime takes over: PVH, multiboot (QEMU's choice for `kernel.elf`) and the 64-bit
//! ELF entry (`previrt run --boot elf64`).

mod common;

use common::{build_example_kernel, deterministic_lines, example_kernel, run_qemu, workload_lines, QemuRun};
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
    let o =
        previrt().arg("link").arg(input).arg("-o").arg(output).args(["--backend", backend, "--json"]).output().unwrap();
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
    let line =
        out.lines().find(|l| l.starts_with("previrt: backend=")).unwrap_or_else(|| panic!("no boot line in\n{out}"));
    let word =
        |key: &str| line.split(' ').find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in `{line}`"));
    assert!(line.contains(" patched in ") && line.contains("(platform="), "malformed boot line `{line}`");
    (word("backend=").to_string(), word("sites=").parse().unwrap())
}

/// The trace summary: kind → count, and (executed, total) sites.
fn trace_summary(out: &str) -> (std::collections::BTreeMap<String, u64>, (u64, u64)) {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("previrt-trace:"))
        .unwrap_or_else(|| panic!("no trace summary in\n{out}"));
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
    // The multiboot image links too (its header redirected, see the multiboot tests).
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

    // A multiboot header without load addresses (flag bit 16 cleared, checksum fixed): its
    // loaders enter by the ELF headers, which cannot be pointed at a 32-bit runtime entry.
    let mut no_kludge = std::fs::read(k.dir.join("kernel/kernel.elf")).unwrap();
    let mb = multiboot_header(&no_kludge);
    let flags = word(&no_kludge, mb + 4) & !(1 << 16);
    no_kludge[mb + 4..mb + 8].copy_from_slice(&flags.to_le_bytes());
    no_kludge[mb + 8..mb + 12].copy_from_slice(&0u32.wrapping_sub(0x1bad_b002).wrapping_sub(flags).to_le_bytes());
    let no_kludge_path = k.dir.join("no-kludge.elf");
    std::fs::write(&no_kludge_path, &no_kludge).unwrap();

    for (bad, why) in
        [(&garbage, "not a 64-bit"), (&no_pvh_path, "no PVH entry note"), (&no_kludge_path, "flag bit 16")]
    {
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

fn word(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(data[at..at + 4].try_into().unwrap())
}

/// File offset of the multiboot v1 header (magic 0x1BADB002 in the first 8 KiB).
fn multiboot_header(image: &[u8]) -> usize {
    (0..8192).step_by(4).find(|&at| word(image, at) == 0x1bad_b002).expect("a multiboot header")
}

/// `kernel.elf` (PVH note and multiboot header) of the pre-virtualized build, linked with
/// default backend `backend` into a file named after `tag`; checks the report against the
/// headers of both files.
fn linked_multiboot(backend: &str, tag: &str) -> (PathBuf, serde_json::Value) {
    let k = linked_kernel();
    let input = k.dir.join("kernel/kernel.elf");
    let out = k.dir.join(format!("linked-{tag}-{backend}.elf"));
    let report = link(&input, &out, backend);
    let (before, after) = (std::fs::read(&input).unwrap(), std::fs::read(&out).unwrap());
    let entry_addr = |image: &[u8]| word(image, multiboot_header(image) + 28) as u64;
    let e_entry = |image: &[u8]| u64::from_le_bytes(image[24..32].try_into().unwrap());
    let mb = &report["multiboot_entry"];
    assert_eq!((mb["kernel"].as_u64(), mb["runtime"].as_u64()), (Some(entry_addr(&before)), Some(entry_addr(&after))));
    let elf = &report["elf_entry64"];
    assert_eq!((elf["kernel"].as_u64(), elf["runtime"].as_u64()), (Some(e_entry(&before)), Some(e_entry(&after))));
    let rt = report["runtime_phys"].as_u64().unwrap()
        ..report["runtime_phys"].as_u64().unwrap() + report["runtime_file_size"].as_u64().unwrap();
    assert!(rt.contains(&entry_addr(&after)) && rt.contains(&e_entry(&after)), "entries outside the runtime: {report}");
    (out, report)
}

/// The kernel's own deterministic lines (the runtime's lines aside).
fn kernel_lines(out: &str) -> Vec<&str> {
    deterministic_lines(out).into_iter().filter(|l| !l.starts_with("previrt")).collect()
}

#[test]
fn multiboot_entry_boots_through_the_runtime_with_both_backends() {
    let plain = run_qemu(&example_kernel().elf(), "");
    assert_passed(&plain, "plain kernel.elf");
    assert!(
        plain.stdout.contains("kernel: boot=multiboot"),
        "QEMU should boot kernel.elf via multiboot:\n{}",
        plain.stdout
    );
    for backend in ["native", "trace"] {
        let (elf, report) = linked_multiboot(backend, "mb");
        let run = run_qemu(&elf, "");
        assert_passed(&run, &format!("multiboot, {backend} backend"));
        assert!(run.stdout.contains("kernel: boot=multiboot"), "{backend}: not a multiboot boot:\n{}", run.stdout);
        assert_eq!(boot_line(&run.stdout), (backend.to_string(), report["sites"].as_u64().unwrap()));
        assert_eq!(kernel_lines(&plain.stdout), kernel_lines(&run.stdout), "{backend}: outputs differ");
        assert_eq!(backend == "trace", run.stdout.contains("previrt-trace:"), "{backend}: trace summary");
    }
    // The multiboot command line reaches the runtime.
    let (elf, _) = linked_multiboot("native", "mb-cmdline");
    let run = run_qemu(&elf, "previrt.backend=trace");
    assert_passed(&run, "multiboot, trace from the command line");
    assert_eq!(boot_line(&run.stdout).0, "trace");
}

#[test]
fn elf64_entry_boots_through_the_runtime_on_previrt_run() {
    let plain = run_qemu(&example_kernel().elf(), "");
    assert_passed(&plain, "plain kernel.elf");
    for backend in ["native", "trace"] {
        let (elf, report) = linked_multiboot(backend, "elf64");
        let o = previrt().args(["run", "--boot", "elf64"]).arg(&elf).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        // isa-debug-exit value 0 (PASS) becomes status 1, as with QEMU.
        assert_eq!(o.status.code(), Some(1), "{backend}: {out}{}", String::from_utf8_lossy(&o.stderr));
        assert!(out.contains("kernel: boot=entry64"), "{backend}: not a 64-bit entry boot:\n{out}");
        assert_eq!(boot_line(&out), (backend.to_string(), report["sites"].as_u64().unwrap()));
        assert!(out.contains("(platform=previrt-hv)"), "{backend}: {out}");
        assert_eq!(workload_lines(&plain.stdout), workload_lines(&out), "{backend}: workload results differ");
        assert_eq!(backend == "trace", out.contains("previrt-trace:"), "{backend}: trace summary");
    }
}
