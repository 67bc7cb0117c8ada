//! Save and restore (`previrt run --snapshot … --snapshot-after …`, `previrt restore`) of the
//! example kernel mid-workload: the console stream of the saved run followed by the restored
//! one is the stream of an uninterrupted run (sequence numbers, checksums, console lines), and
//! bad snapshots are refused with one line and status 2 before anything runs.
//!
//! Migration-time re-patching (docs/snapshot.md): the pre-virtualized example kernel on the
//! runtime's `hv` backend suspends itself when asked (every trigger: --snapshot-after,
//! SIGUSR1, the control socket), and after a restore under another ABI version or with no
//! paravirtual interface it re-patches itself; the stream goes on byte for byte and the exits
//! are those of the new backend.

mod common;
mod vmm_support;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use vmm_support::*;

/// Workloads with console output, interrupt-flag and compute work; 4 passes, each WORKLOAD
/// line carries seq=1..=12.
const CMDLINE: &str = "workloads=irqflag,console,compute repeat=4 console_lines=4";

fn previrt(args: &[&str]) -> Output {
    require_kvm();
    Command::new(env!("CARGO_BIN_EXE_previrt")).args(args).output().expect("spawn previrt")
}

/// The deterministic lines (TIMING lines carry TSC values and the banner repeats nothing).
fn stream(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.starts_with("TIMING ")).collect()
}

fn seqs(lines: &[&str]) -> Vec<u64> {
    lines.iter().filter_map(|l| l.split("seq=").nth(1)).map(|n| n.trim().parse().unwrap()).collect()
}

/// Boot with `cmdline`, snapshot after `after`, restore with `restore_args`; return (saved run, restored run).
fn save_and_restore(d: &Path, kernel: &Path, cmdline: &str, after: &str, restore_args: &[&str]) -> (Output, Output) {
    let snap = d.join(format!("{after}.snap"));
    let snap_s = snap.to_str().unwrap();
    let a = previrt(&[
        "run",
        kernel.to_str().unwrap(),
        "--append",
        cmdline,
        "--snapshot",
        snap_s,
        "--snapshot-after",
        after,
    ]);
    assert_eq!(a.status.code(), Some(0), "saving run: {}", stderr(&a));
    assert!(stderr(&a).contains("snapshot written to"), "{}", stderr(&a));
    let mut args = vec!["restore", snap_s];
    args.extend_from_slice(restore_args);
    let b = previrt(&args);
    (a, b)
}

#[test]
fn snapshot_mid_workload_resumes_without_losing_or_repeating_a_line() {
    let d = scratch("migrate-resume");
    let kernel = common::example_kernel().elf();
    let full = previrt(&["run", kernel.to_str().unwrap(), "--append", CMDLINE]);
    assert_eq!(full.status.code(), Some(1), "uninterrupted run: {}", stderr(&full));
    let full_out = stdout(&full);
    assert_eq!(seqs(&stream(&full_out)), (1..=12).collect::<Vec<_>>(), "{full_out}");

    // Early (during the first pass) and late (a later pass), by exits and by time.
    for after in ["300exits", "2500exits", "1500ms"] {
        let (a, b) = save_and_restore(&d, &kernel, CMDLINE, after, &[]);
        assert_eq!(b.status.code(), Some(1), "restore after {after}: {}", stderr(&b));
        let (sa, sb) = (stdout(&a), stdout(&b));
        let before = seqs(&stream(&sa));
        assert!(before.len() < 12, "{after}: the snapshot was taken after the workloads ended: {sa}");
        assert!(!stream(&sb).is_empty(), "{after}: nothing after the restore");
        let joined = format!("{sa}{sb}");
        assert_eq!(stream(&joined), stream(&full_out), "{after}: saved run + restored run != uninterrupted run");
        assert!(stream(&sb).last().unwrap().starts_with("RESULT PASS"), "{after}: {sb}");
    }
}

/// The pre-virtualized example kernel (assembler-level toolchain, `previrt link`) with the
/// runtime's trace backend: every executed site goes through the runtime, whose state (patched
/// text, site index, counters) is guest memory and must survive the trip; its exit summary
/// (per-kind site counts) is the same as an uninterrupted run's.
#[test]
fn previrtualized_kernel_with_trace_backend_resumes_with_the_same_stream_and_site_counts() {
    let d = scratch("migrate-previrt");
    let linked = common::linked_example_kernel();
    let cmdline = "previrt.backend=trace workloads=console,compute repeat=3 console_lines=2 compute=100";
    // The runtime's boot line carries its patch time; the trace summary's iret/in/out counts
    // depend on interrupt timing (UART and timer) and vary between two uninterrupted runs
    // too. Everything else is deterministic: the counters live in guest memory, so counts from
    // before the snapshot carry on after it.
    let lines = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.starts_with("TIMING ") && !l.contains(" patched in "))
            .map(|l| match l.strip_prefix("previrt-trace: ") {
                Some(t) => t
                    .split(' ')
                    .filter(|w| !["iret=", "in=", "out="].iter().any(|k| w.starts_with(k)))
                    .collect::<Vec<_>>()
                    .join(" "),
                None => l.to_string(),
            })
            .collect()
    };
    let full = previrt(&["run", "--boot", "pvh", linked.to_str().unwrap(), "--append", cmdline]);
    assert_eq!(full.status.code(), Some(1), "uninterrupted run: {}", stderr(&full));
    let full_out = stdout(&full);
    assert!(full_out.contains("previrt-trace:") && full_out.contains("RESULT PASS"), "{full_out}");
    for after in ["1000exits", "2000exits"] {
        let (a, b) = save_and_restore(&d, linked, cmdline, after, &[]);
        assert_eq!(b.status.code(), Some(1), "restore after {after}: {}", stderr(&b));
        assert!(!stdout(&a).contains("RESULT"), "{after}: snapshot taken after the end");
        let joined = format!("{}{}", stdout(&a), stdout(&b));
        assert_eq!(lines(&joined), lines(&full_out), "{after}: saved run + restored run != uninterrupted run");
    }
}

#[test]
fn restore_under_a_mismatched_or_damaged_snapshot_is_refused_before_running() {
    let d = scratch("migrate-bad");
    let kernel = common::example_kernel().elf();
    let (_, ok) = save_and_restore(&d, &kernel, CMDLINE, "200exits", &["--mem", "128M"]);
    assert_eq!(ok.status.code(), Some(1), "intact snapshot: {}", stderr(&ok));
    let good = std::fs::read(d.join("200exits.snap")).unwrap();

    let crc = |b: &mut Vec<u8>| {
        let c = crc32(&b[12..]);
        b[8..12].copy_from_slice(&c.to_le_bytes());
    };
    type Damage = fn(&mut Vec<u8>, &dyn Fn(&mut Vec<u8>));
    let cases: [(&str, Damage, &str); 7] = [
        ("bad magic", |b, _| b[0] ^= 0xff, "bad magic"),
        (
            "version",
            |b, fix| {
                b[12] = 9;
                fix(b)
            },
            "format version 9",
        ),
        (
            "flipped byte",
            |b, _| {
                let n = b.len() / 2;
                b[n] ^= 1
            },
            "checksum mismatch",
        ),
        (
            "truncated",
            |b, _| {
                let n = b.len() - 100;
                b.truncate(n)
            },
            "truncated",
        ),
        ("tiny", |b, _| b.truncate(10), "truncated"),
        (
            "two vCPUs",
            |b, fix| {
                b[16] = 2;
                fix(b)
            },
            "2 vCPUs",
        ),
        (
            "memory size",
            |b, fix| {
                b[26] ^= 0x10;
                fix(b)
            },
            "does not match",
        ),
    ];
    for (name, damage, msg) in cases {
        let mut b = good.clone();
        damage(&mut b, &crc);
        let p = d.join(format!("{}.snap", name.replace(' ', "-")));
        std::fs::write(&p, &b).unwrap();
        let o = previrt(&["restore", p.to_str().unwrap()]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {e}");
        assert_eq!(e.lines().count(), 1, "{name}: one line expected: {e}");
        assert!(e.contains(msg), "{name}: {e:?} should say {msg:?}");
        assert!(stdout(&o).is_empty(), "{name}: the guest ran: {}", stdout(&o));
    }
    let o = previrt(&["restore", d.join("200exits.snap").to_str().unwrap(), "--mem", "64M"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("128 MiB") && stdout(&o).is_empty(), "{}", stderr(&o));
    let o = previrt(&["restore", d.join("absent.snap").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// CRC-32 (IEEE), bitwise: the test recomputes the checksum independently of the VMM's crate.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xedb8_8320 } else { c >> 1 };
        }
    }
    !c
}

/// A guest of the previrt paravirtual ABI: hypercall page and vCPU page registered by MSR, a
/// periodic 1 ms timer, then 30 rounds of HALT (returns the pending events) and a
/// CONSOLE_WRITE of "tick NN"; SHUTDOWN 0x2a. After a restore the ticks only continue if the
/// hypercall page, the vCPU page and the timer came back with the snapshot.
const PV_TICKS: &str = r#".code64
.globl _start
_start:
    mov $0x50525600, %ecx
    lea hcpage(%rip), %rax
    or $1, %rax
    xor %edx, %edx
    wrmsr
    mov $0x50525601, %ecx
    lea vpage(%rip), %rax
    or $1, %rax
    wrmsr
    mov $2, %rdi
    mov $1000000, %rsi
    call hcpage + 32 * 4
    xor %r12, %r12
1:  call hcpage + 32 * 5
    test $1, %al
    jz fail
    movq $0, vpage + 8(%rip)
    inc %r12
    mov %r12, %rax
    xor %edx, %edx
    mov $10, %ecx
    div %ecx
    add $'0', %al
    mov %al, line + 5(%rip)
    add $'0', %dl
    mov %dl, line + 6(%rip)
    lea line(%rip), %rdi
    mov $8, %rsi
    call hcpage + 32 * 1
    cmp $30, %r12
    jb 1b
    mov $0x2a, %rdi
    call hcpage + 32 * 6
fail:
    mov $0x55, %rdi
    call hcpage + 32 * 6
    hlt
.data
line: .ascii "tick NN\n"
.bss
.balign 4096
hcpage: .skip 4096
vpage: .skip 4096
"#;

#[test]
fn previrt_abi_state_hypercall_page_vcpu_page_and_timer_survive_a_restore() {
    let d = scratch("migrate-pv");
    let k = guest(&d, "ticks", PV_TICKS, "_start");
    let k = k.to_str().unwrap();
    let want: String = (1..=30).map(|i| format!("tick {i:02}\n")).collect();
    let full = previrt(&["run", k]);
    assert_eq!((full.status.code(), stdout(&full)), (Some(0x2a), want.clone()), "{}", stderr(&full));
    for after in ["5exits", "20exits", "45exits"] {
        let snap = d.join(format!("{after}.snap"));
        let s = snap.to_str().unwrap();
        let a = previrt(&["run", k, "--snapshot", s, "--snapshot-after", after]);
        assert_eq!(a.status.code(), Some(0), "{after}: {}", stderr(&a));
        assert!(stdout(&a).len() < want.len(), "{after}: snapshot after the end");
        let b = previrt(&["restore", s]);
        assert_eq!(b.status.code(), Some(0x2a), "{after}: {}", stderr(&b));
        assert_eq!(format!("{}{}", stdout(&a), stdout(&b)), want, "{after}");
    }
}

/// The pre-virtualized kernel on the runtime's `hv` backend: console (UART), timer (halts,
/// PIT) and compute work, 4 passes, WORKLOAD lines seq=1..=12; every pass halts after its
/// console output (native-watch looks for a paravirtual interface at `hlt`). 50 Hz: ring 0 is
/// instruction-emulated on this host and a tick's handler costs about a millisecond, more on
/// a loaded machine; at 100 Hz the ticks then took most of the vCPU (minutes per run).
/// About 3 s of emulated work (quiet host) plus 2 s of timer waits (wall-clock ticks, the same under any
/// load), so that saves at 2000 ms and 1500 ms after a restore land mid-run.
const HV_CMDLINE: &str =
    "previrt.backend=hv hz=50 workloads=console,timer,compute repeat=4 console_lines=2 ticks=25 compute=2000";

/// The kernel's own output as lines: the runtime's "resumed on" line taken out of the byte
/// stream first (a suspend may fall in the middle of a kernel line, and the runtime's line is
/// printed right there), then no TIMING lines (TSC values) and none of the runtime's other
/// lines (patch time, exit summaries, which count per run).
fn kernel_stream(s: &str) -> Vec<String> {
    let mut bytes = s.to_string();
    while let Some(at) = bytes.find("previrt: resumed on ") {
        let end = bytes[at..].find('\n').map_or(bytes.len(), |n| at + n + 1);
        bytes.replace_range(at..end, "");
    }
    bytes.lines().filter(|l| !l.starts_with("TIMING ") && !l.starts_with("previrt")).map(String::from).collect()
}

/// What the runtime's "resumed on" line at `nth` (0: the first) says its re-patch did:
/// [sites, rewritten, unchanged, init-left].
fn repatch_counts(out: &str, nth: usize) -> [u64; 4] {
    let line = out.split("previrt: resumed on ").nth(nth + 1).and_then(|l| l.lines().next()).unwrap_or("");
    let count = |key: &str| {
        let v = line.split(&format!(" {key}=")).nth(1).unwrap_or_else(|| panic!("no {key}= in {line:?}"));
        v.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u64>().unwrap()
    };
    let c = [count("sites"), count("rewritten"), count("unchanged"), count("init-left")];
    assert_eq!(c[0], c[1] + c[2] + c[3], "every site rewritten, unchanged or left: {line}");
    c
}

/// How many sites the runtime's first "resumed on" line says were restored lazily since the
/// move before.
fn lazily_restored(out: &str) -> u64 {
    let line = out.split("previrt: resumed on ").nth(1).and_then(|l| l.lines().next()).unwrap_or("");
    line.split("(lazily restored since the last move: ")
        .nth(1)
        .and_then(|v| v.split(')').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no lazily restored count in {line:?}"))
}

/// Exits on the UART's data port (one per byte the kernel writes natively).
fn uart_exits(stats: &Value) -> u64 {
    stats["ports"]["0x3f8 out"]["count"].as_u64().unwrap_or(0)
}

fn stats(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Bytes of `out` before the runtime's "resumed on" line (all of it if there is none).
fn bytes_before_resume(out: &str) -> u64 {
    out.find("previrt: resumed on").unwrap_or(out.len()) as u64
}

/// The stdout of an uninterrupted hv run of HV_CMDLINE (once per test process).
fn hv_reference() -> &'static str {
    static OUT: OnceLock<String> = OnceLock::new();
    OUT.get_or_init(|| {
        let full = previrt(&[
            "run",
            "--boot",
            "pvh",
            common::linked_example_kernel().to_str().unwrap(),
            "--append",
            HV_CMDLINE,
        ]);
        assert_eq!(full.status.code(), Some(1), "uninterrupted run: {}{}", stdout(&full), stderr(&full));
        let out = stdout(&full);
        let lines = kernel_stream(&out);
        assert_eq!(seqs(&lines.iter().map(String::as_str).collect::<Vec<_>>()), (1..=12).collect::<Vec<_>>(), "{out}");
        out
    })
}

/// Save the hv run of HV_CMDLINE after `after` (the guest suspends itself); the saving run's
/// stdout.
fn hv_save(snap: &Path, after: &str) -> String {
    let a = previrt(&[
        "run",
        "--boot",
        "pvh",
        common::linked_example_kernel().to_str().unwrap(),
        "--append",
        HV_CMDLINE,
        "--snapshot",
        snap.to_str().unwrap(),
        "--snapshot-after",
        after,
    ]);
    let e = stderr(&a);
    assert_eq!(a.status.code(), Some(0), "saving run: {e}");
    assert!(e.contains("cooperative: guest suspended after"), "the guest did not suspend itself: {e}");
    assert!(!stdout(&a).contains("RESULT"), "snapshot taken after the end: {}", stdout(&a));
    stdout(&a)
}

/// `previrt restore SNAP ARGS… --stats-json J`: (stdout, stderr, status, stats).
fn restore(snap: &Path, json: &Path, args: &[&str]) -> (String, String, Option<i32>, Value) {
    let mut all = vec!["restore", snap.to_str().unwrap(), "--stats-json", json.to_str().unwrap()];
    all.extend_from_slice(args);
    let o = previrt(&all);
    (stdout(&o), stderr(&o), o.status.code(), stats(json))
}

/// One guest, four hosts: hv ABI v1 -> v2 -> no paravirtual interface -> v1 again, saved
/// mid-workload each time. The kernel's byte stream is the uninterrupted run's, and each leg's
/// exits are those of the backend the runtime re-patched for.
#[test]
fn hv_guest_moves_v1_to_v2_to_no_paravirtual_interface_and_back_re_patching_each_time() {
    let d = scratch("migrate-chain");
    let full = hv_reference();
    let snap = |n: &str| d.join(format!("{n}.snap"));
    let json = |n: &str| d.join(format!("{n}.json"));
    let a = hv_save(&snap("v1"), "2000ms");

    // v1 -> v2: the guest suspended itself; after the restore it re-detects ABI v2 and speaks
    // its layout (the VMM decodes op blocks into these calls); its console stays in the ring.
    let (b, be, st, s) = restore(
        &snap("v1"),
        &json("v2"),
        &["--abi", "hv-v2", "--snapshot", snap("v2").to_str().unwrap(), "--snapshot-after", "1500ms"],
    );
    assert_eq!(st, Some(0), "v2 leg: {b}{be}");
    assert!(be.contains("the guest suspended itself and re-detects its platform"), "{be}");
    assert!(be.contains("cooperative: guest suspended after"), "the v2 guest suspends too: {be}");
    assert!(b.starts_with("previrt: resumed on previrt-hv: backend=hv abi=v2 sites="), "{b}");
    // The same backend: its sites already call the shared entry, none is written.
    let [sites, rewritten, ..] = repatch_counts(&b, 0);
    assert!(rewritten == 0 && sites > 0, "v1 -> v2 rewrote sites: {b}");
    for call in ["previrt:version", "previrt:set_event_vector", "previrt:timer_set", "previrt:suspend"] {
        assert!(s["hypercalls"][call]["count"].as_u64().unwrap_or(0) > 0, "no {call} under v2: {}", s["hypercalls"]);
    }
    assert_eq!(uart_exits(&s), 0, "UART exits under hv-v2: {}", s["ports"]);

    // v2 -> no paravirtual interface: native instructions again (trap-and-emulate), restored
    // lazily: the resume writes no site, each routed site gets its instruction back at its
    // first call and runs it in place; every console byte is a UART exit. The VMM cannot ask
    // this guest anything: a forced snapshot, which may go anywhere (nothing in the guest
    // depends on an ABI).
    let (c, ce, st, s) = restore(
        &snap("v2"),
        &json("none"),
        &["--abi", "none", "--snapshot", snap("none").to_str().unwrap(), "--snapshot-after", "300exits"],
    );
    assert_eq!(st, Some(0), "no-PV leg: {c}{ce}");
    assert!(c.starts_with("previrt: resumed on ") && c.lines().next().unwrap().contains("backend=native-watch"), "{c}");
    let [sites, rewritten, ..] = repatch_counts(&c, 0);
    assert!(sites > 0 && rewritten == 0, "the move to no paravirtual interface wrote sites at resume: {c}");
    assert!(ce.contains("forced: the guest does not support suspend; no re-patching"), "{ce}");
    assert_eq!(uart_exits(&s), c.len() as u64, "under --abi none every console byte is a UART exit");

    // ... and back to v1: at its next hlt the runtime finds the previrt signature and re-patches
    // for hv; from its line on the console goes through the ring (no UART exit).
    let (e, ee, st, s) = restore(&snap("none"), &json("back"), &["--abi", "previrt"]);
    assert_eq!(st, Some(1), "back on v1: {e}{ee}");
    assert!(e.contains("previrt: resumed on previrt-hv: backend=hv abi=v1 sites="), "{e}");
    // The sites the no-PV leg ran were restored one by one; the move back rewrites exactly
    // those (the others still call the runtime).
    // (The no-PV leg's save may fall inside its resume line, which the next leg continues.)
    assert!(format!("{c}{e}").contains(" (lazy: routed sites restore at their first call), resumed in "), "{c}{e}");
    let restored = lazily_restored(&e);
    assert!(restored > 0, "no site was restored on the no-PV leg: {c}{e}");
    assert_eq!(repatch_counts(&e, 0)[1], restored, "back to hv rewrites exactly the sites restored lazily: {e}");
    assert!(e.contains("previrt-hv: hypercalls"), "the exit went through hv: {e}");
    assert_eq!(uart_exits(&s), bytes_before_resume(&e), "UART exits after the move back to hv: {e}");

    let joined = format!("{a}{b}{c}{e}");
    assert_eq!(kernel_stream(&joined), kernel_stream(full), "four legs != uninterrupted run");
}

/// A guest of the previrt ABI that opts in to suspend requests (guest_features = SUSPEND)
/// but never calls SUSPEND: HALT keeps returning the request, the guest halts again.
fn pv_ticks_ignoring_suspend() -> String {
    PV_TICKS
        .replace("    xor %r12, %r12\n", "    movq $1, vpage + 24(%rip)\n    xor %r12, %r12\n")
        .replace("    test $1, %al\n    jz fail\n", "    test $1, %al\n    jz 1b\n")
}

#[test]
fn guests_that_do_not_cooperate_are_saved_forced_and_never_restored_under_another_abi() {
    let d = scratch("migrate-forced");
    let want: String = (1..=30).map(|i| format!("tick {i:02}\n")).collect();
    // Never opted in: saved at once, said so; a previrt-ABI guest saved that way only resumes
    // under the ABI it was saved under.
    let k = guest(&d, "ticks", PV_TICKS, "_start");
    let snap = d.join("plain.snap");
    let a = previrt(&["run", k.to_str().unwrap(), "--snapshot", snap.to_str().unwrap(), "--snapshot-after", "20exits"]);
    assert_eq!(a.status.code(), Some(0), "{}", stderr(&a));
    assert!(stderr(&a).contains("forced: the guest does not support suspend; no re-patching"), "{}", stderr(&a));
    for abi in ["none", "hv-v2"] {
        let o = previrt(&["restore", snap.to_str().unwrap(), "--abi", abi]);
        let e = stderr(&o);
        assert_eq!((o.status.code(), e.lines().count()), (Some(2), 1), "--abi {abi}: {e}");
        assert!(e.contains("nothing re-patched it") && stdout(&o).is_empty(), "--abi {abi}: {e}");
    }
    // Opted in but never suspends: saved when the deadline passes, said so; it resumes under
    // its own ABI as if nothing happened.
    let k = guest(&d, "stubborn", &pv_ticks_ignoring_suspend(), "_start");
    let snap = d.join("stubborn.snap");
    let a = previrt(&[
        "run",
        k.to_str().unwrap(),
        "--snapshot",
        snap.to_str().unwrap(),
        "--snapshot-after",
        "5exits",
        "--suspend-timeout",
        "10",
    ]);
    assert_eq!(a.status.code(), Some(0), "{}", stderr(&a));
    assert!(stderr(&a).contains("forced: the guest did not suspend within 10 ms"), "{}", stderr(&a));
    let b = previrt(&["restore", snap.to_str().unwrap()]);
    assert_eq!(b.status.code(), Some(0x2a), "{}", stderr(&b));
    assert!(stderr(&b).contains("forced snapshot (the guest did not suspend within 10 ms)"), "{}", stderr(&b));
    assert_eq!(format!("{}{}", stdout(&a), stdout(&b)), want);
}

#[test]
fn the_disk_is_saved_by_path_and_size_and_a_changed_disk_is_refused() {
    let d = scratch("migrate-disk");
    let k = guest(&d, "ticks", PV_TICKS, "_start");
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![7u8; 64 * 1024]).unwrap();
    let snap = d.join("disk.snap");
    let a = previrt(&[
        "run",
        k.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
        "--snapshot",
        snap.to_str().unwrap(),
        "--snapshot-after",
        "20exits",
    ]);
    assert_eq!(a.status.code(), Some(0), "{}", stderr(&a));
    let b = previrt(&["restore", snap.to_str().unwrap()]);
    assert_eq!(b.status.code(), Some(0x2a), "restore reopens the saved disk: {}", stderr(&b));
    std::fs::write(&disk, vec![7u8; 4096]).unwrap();
    let c = previrt(&["restore", snap.to_str().unwrap()]);
    assert_eq!(c.status.code(), Some(2), "{}", stderr(&c));
    assert!(stderr(&c).contains("has 4096 bytes, the snapshot was taken with 65536"), "{}", stderr(&c));
    assert!(stdout(&c).is_empty());
}

/// A `previrt run` of HV_CMDLINE with `extra` options whose stdout the test reads.
struct Child {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    /// stdout so far.
    seen: String,
}

impl Child {
    /// Start it and return once the kernel has printed its second WORKLOAD line
    /// (mid-workload, whatever the host's speed).
    fn start(extra: &[&str]) -> Child {
        require_kvm();
        let mut child = Command::new(env!("CARGO_BIN_EXE_previrt"))
            .args(["run", "--boot", "pvh", common::linked_example_kernel().to_str().unwrap(), "--append", HV_CMDLINE])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn previrt run");
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut c = Child { child, out, seen: String::new() };
        while !c.seen.contains("seq=2\n") {
            let mut line = String::new();
            assert!(c.out.read_line(&mut line).unwrap() > 0, "previrt run ended early: {}", c.seen);
            c.seen.push_str(&line);
        }
        c
    }

    /// Wait for the end: (all of stdout, stderr, status).
    fn finish(mut self) -> (String, String, Option<i32>) {
        use std::io::Read;
        self.out.read_to_string(&mut self.seen).unwrap();
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        (self.seen, err, self.child.wait().unwrap().code())
    }
}

#[test]
fn sigusr1_and_the_control_socket_save_a_running_guest_that_suspends_itself() {
    let d = scratch("migrate-triggers");
    let full = hv_reference();
    let snap = d.join("usr1.snap");
    let child = Child::start(&["--snapshot", snap.to_str().unwrap()]);
    let kill = Command::new("kill").args(["-USR1", &child.child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let (a, ae, st) = child.finish();
    assert_eq!(st, Some(0), "{ae}");
    assert!(ae.contains("cooperative: guest suspended after"), "{ae}");
    assert!(!a.contains("RESULT"), "saved after the end: {a}");
    let b = previrt(&["restore", snap.to_str().unwrap()]);
    assert_eq!(b.status.code(), Some(1), "{}", stderr(&b));
    let joined = format!("{a}{}", stdout(&b));
    assert_eq!(kernel_stream(&joined), kernel_stream(full), "SIGUSR1: saved + restored != uninterrupted");

    let sock = d.join("control.sock");
    let snap = d.join("control.snap");
    let child = Child::start(&["--control", sock.to_str().unwrap()]);
    let o = previrt(&["snapshot", sock.to_str().unwrap(), "-o", snap.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(0), "previrt snapshot: {}{}", stdout(&o), stderr(&o));
    let answer: Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON line");
    assert_eq!((answer["ok"].as_bool(), answer["cooperative"].as_bool()), (Some(true), Some(true)), "{answer}");
    assert_eq!(answer["bytes"].as_u64(), Some(std::fs::metadata(&snap).unwrap().len()), "{answer}");
    let (a, ae, st) = child.finish();
    assert_eq!(st, Some(0), "{ae}");
    assert!(ae.contains("cooperative: guest suspended after"), "{ae}");
    let b = previrt(&["restore", snap.to_str().unwrap()]);
    assert_eq!(b.status.code(), Some(1), "{}", stderr(&b));
    let joined = format!("{a}{}", stdout(&b));
    assert_eq!(kernel_stream(&joined), kernel_stream(full), "control socket: saved + restored != uninterrupted");
    let o = previrt(&["snapshot", sock.to_str().unwrap(), "-o", snap.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "no VM behind the socket: {}", stderr(&o));
}

/// `previrt run --boot pvh KERNEL --append CMDLINE EXTRA…`, saved after `after`: (stdout of
/// the saving run, snapshot path). The guest must have suspended itself.
fn cooperative_save(
    d: &Path,
    kernel: &Path,
    cmdline: &str,
    after: &str,
    extra: &[&str],
) -> (String, std::path::PathBuf) {
    let snap = d.join("vm.snap");
    let mut args = vec!["run", "--boot", "pvh", kernel.to_str().unwrap(), "--append", cmdline];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--snapshot", snap.to_str().unwrap(), "--snapshot-after", after]);
    let a = previrt(&args);
    let e = stderr(&a);
    assert_eq!(a.status.code(), Some(0), "saving run: {e}");
    assert!(e.contains("cooperative: guest suspended after"), "the guest did not suspend itself: {e}");
    assert!(!stdout(&a).contains("RESULT"), "snapshot taken after the end: {}", stdout(&a));
    (stdout(&a), snap)
}

/// A kernel on `pvm` (KVM-PVM's native mode) saved mid-run and restored on `pvm`: the runtime
/// re-patches to the shared encoding natively before it suspends, so on the emulated path after
/// the restore no site is written; back in the native mode it re-patches exactly those sites
/// to pvm's own entries. The kernel's lines are those of an uninterrupted run.
#[test]
fn pvm_guest_re_patches_natively_around_a_move_and_writes_no_site_on_the_emulated_path() {
    const CMD: &str = "previrt.backend=auto workloads=timer,cpuid_msr,console repeat=6 hz=100 ticks=20 console_lines=4";
    let d = scratch("migrate-pvm");
    let kernel = common::linked_example_kernel();
    let full = previrt(&["run", "--boot", "pvh", kernel.to_str().unwrap(), "--append", CMD, "--backend", "native"]);
    assert_eq!(full.status.code(), Some(1), "uninterrupted run: {}{}", stdout(&full), stderr(&full));
    assert!(stdout(&full).contains("backend=auto chose pvm"), "no native mode here: {}", stdout(&full));
    let (a, snap) = cooperative_save(&d, kernel, CMD, "1500ms", &["--backend", "native"]);
    let b = previrt(&["restore", snap.to_str().unwrap(), "--backend", "native"]);
    let (out, err) = (stdout(&b), stderr(&b));
    assert_eq!(b.status.code(), Some(1), "restored run: {out}{err}");
    assert!(out.starts_with("previrt: resumed on previrt-hv: backend=pvm sites="), "{out}");
    let [_, emulated, ..] = repatch_counts(&out, 0);
    let before: u64 = out
        .split("(before the suspend: rewritten=")
        .nth(1)
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no native re-patch before the suspend: {out}"));
    assert!(out.contains("previrt: resumed on previrt-hv: backend=pvm in its own mode: sites="), "{out}");
    let [_, native, ..] = repatch_counts(&out, 1);
    assert_eq!(emulated, 0, "sites written on the emulated path: {out}");
    assert!(before > 0 && native == before, "pvm's own sites: {before} out before the suspend, {native} back: {out}");
    assert!(out.contains("previrt-pvm: native=yes"), "{out}");
    assert_eq!(kernel_stream(&format!("{a}{out}")), kernel_stream(&stdout(&full)), "saved + restored != uninterrupted");
}

/// Sites in an init section (flags::INIT) are patched at boot and never again: the kernel may
/// have freed the section by the time of a migration. The example kernel with one function in
/// `.init.text` (pushf; cli; popf, run once at boot) moves from hv to no paravirtual interface
/// (a lazy move: no pass over the sites) and back to hv, whose pass leaves them alone.
#[test]
fn init_section_sites_are_left_alone_by_a_re_patch() {
    let d = scratch("migrate-init");
    let src = d.join("src");
    let o = Command::new("cp").arg("-r").arg(common::kernel_src()).arg(&src).output().expect("cp");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let main = src.join("main.c");
    let text = std::fs::read_to_string(&main).unwrap();
    let (entry, call) = ("void __attribute__((noreturn)) kernel_main(", "\tpic_init();\n");
    assert!(text.contains(entry) && text.contains(call), "examples/kernel/main.c changed: update this test's edit");
    let probe = "static void __attribute__((section(\".init.text\"), noinline)) init_probe(void)\n\
                 {\n\t__asm__ volatile(\"pushf; cli; popf\" ::: \"memory\");\n}\n\n";
    let text = text.replacen(entry, &format!("{probe}{entry}"), 1).replacen(call, &format!("\tinit_probe();{call}"), 1);
    std::fs::write(&main, text).unwrap();
    // The previrt toolchain the shared linked kernel was built with (common::linked_example_kernel).
    let tc = common::linked_example_kernel().parent().unwrap().join("toolchain/bin/x86_64-previrt-linux-gnu-");
    let out = d.join("out");
    let o = Command::new("make")
        .args(["-s", "-C", src.to_str().unwrap()])
        .arg(format!("O={}", out.display()))
        .arg(format!("CROSS_COMPILE={}", tc.display()))
        .output()
        .expect("make");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let linked = d.join("linked.elf");
    let o = previrt(&["link", out.join("kernel-pvh.elf").to_str().unwrap(), "-o", linked.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let (_, snap) = cooperative_save(&d, &linked, HV_CMDLINE, "2000ms", &[]);
    let none = d.join("none.snap");
    let b = previrt(&[
        "restore",
        snap.to_str().unwrap(),
        "--abi",
        "none",
        "--snapshot",
        none.to_str().unwrap(),
        "--snapshot-after",
        "300exits",
    ]);
    assert_eq!(b.status.code(), Some(0), "no-PV leg: {}{}", stdout(&b), stderr(&b));
    let b = previrt(&["restore", none.to_str().unwrap(), "--abi", "previrt"]);
    let out = stdout(&b);
    assert_eq!(b.status.code(), Some(1), "restored run: {out}{}", stderr(&b));
    assert!(out.contains("RESULT PASS"), "{out}");
    let [_, rewritten, _, init_left] = repatch_counts(&out, 0);
    assert_eq!(init_left, 3, "pushf, cli, popf in .init.text: {out}");
    assert!(rewritten > 0, "{out}");
}
