//! Save and restore (`previrt run --snapshot … --snapshot-after …`, `previrt restore`) of the
//! example kernel mid-workload: the console stream of the saved run followed by the restored
//! one is the stream of an uninterrupted run (sequence numbers, checksums, console lines), and
//! bad snapshots are refused with one line and status 2 before anything runs.

mod common;
mod vmm_support;
use std::path::Path;
use std::process::{Command, Output};
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
    let tc = d.join("toolchain");
    let o = Command::new(env!("CARGO_BIN_EXE_previrt"))
        .args(["toolchain", "install", "--prefix"])
        .arg(&tc)
        .output()
        .unwrap();
    assert!(o.status.success(), "previrt toolchain install: {}", stderr(&o));
    let build = common::build_example_kernel(
        &d.join("kernel"),
        Some(&format!("{}/bin/x86_64-previrt-linux-gnu-", tc.display())),
    );
    let linked = d.join("linked.elf");
    let o =
        previrt(&["link", build.pvh_elf().to_str().unwrap(), "-o", linked.to_str().unwrap(), "--backend", "native"]);
    assert!(o.status.success(), "previrt link: {}", stderr(&o));
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
        let (a, b) = save_and_restore(&d, &linked, cmdline, after, &[]);
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
