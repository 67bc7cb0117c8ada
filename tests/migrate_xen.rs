//! Migrations that involve the Xen personality (docs/xen-hvm.md, docs/snapshot.md): the
//! pre-virtualized example kernel, mid-workload, is asked to suspend (cooperative: it answers
//! on its VIRQ_SUSPEND channel under Xen, on event::SUSPEND under the in-tree ABI), saved, and
//! restored under another interface, where the runtime re-detects the platform, re-patches its
//! sites and re-binds timer, events and console:
//! - Xen 3.0.2 → Xen 4.17 (compat calls → sched_op/event_channel_op),
//! - the in-tree PV ABI (`hv`) → the Xen personality (`xen-hvm`), and back.
//!
//! In each: the kernel's output before and after the move is QEMU TCG's output for the same
//! command line, line for line (the console lines and workloads carry sequence numbers, so a
//! lost or repeated byte fails), and the restored run's exits and hypercalls are those of the
//! new backend.

mod common;
mod vmm_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Console lines (output from the start, whichever backend), timer events (re-bound after the
/// move) and compute, three passes. The saves are by exit count, about half-way through the
/// source backend's run (timer ticks make the exact point vary).
const CMDLINE: &str = "hz=100 workloads=console,timer,compute repeat=3 console_lines=4";

fn previrt(args: &[&str]) -> Output {
    vmm_support::require_kvm();
    Command::new(env!("CARGO_BIN_EXE_previrt")).args(args).output().expect("spawn previrt")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The kernel's deterministic lines (no runtime messages, no TIMING).
fn kernel_lines(out: &str) -> Vec<&str> {
    common::deterministic_lines(out).into_iter().filter(|l| !l.starts_with("previrt")).collect()
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("migrate-xen").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Move {
    saved: Output,
    restored: Output,
    stats: serde_json::Value,
}

/// Run the linked kernel under `--abi from` with `previrt.backend=auto` (and `run_extra`),
/// snapshot after `after` exits, restore under `--abi to` with statistics.
fn migrate(name: &str, from: &str, to: &str, after: &str, run_extra: &[&str]) -> Move {
    let d = scratch(name);
    let (snap, stats) = (d.join("vm.snap"), d.join("restored.json"));
    let kernel = common::linked_example_kernel().to_str().unwrap();
    let append = format!("previrt.backend=auto {CMDLINE}");
    let mut run = vec![
        "run",
        kernel,
        "--boot",
        "pvh",
        "--abi",
        from,
        "--append",
        &append,
        "--snapshot",
        snap.to_str().unwrap(),
        "--snapshot-after",
        after,
    ];
    run.extend_from_slice(run_extra);
    let saved = previrt(&run);
    assert_eq!(saved.status.code(), Some(0), "saving run under {from}: {}", text(&saved.stderr));
    assert!(text(&saved.stderr).contains("snapshot written to"), "{}", text(&saved.stderr));
    let restored = previrt(&["restore", snap.to_str().unwrap(), "--abi", to, "--stats-json", stats.to_str().unwrap()]);
    let json = std::fs::read(&stats).unwrap_or_else(|e| panic!("no stats ({e}): {}", text(&restored.stderr)));
    Move { saved, restored, stats: serde_json::from_slice(&json).unwrap() }
}

fn assert_cooperative(m: &Move) {
    let err = text(&m.saved.stderr);
    assert!(err.contains("cooperative: guest suspended"), "not a cooperative save: {err}");
}

/// Both halves together are QEMU's run of the plain kernel; the move happened mid-workload.
fn assert_stream_continues(m: &Move) {
    let qemu = common::run_qemu(&common::example_kernel().pvh_elf(), CMDLINE);
    assert_eq!(qemu.status, 0, "QEMU TCG:\n{}{}", qemu.stdout, qemu.stderr);
    let (a, b) = (text(&m.saved.stdout), text(&m.restored.stdout));
    assert_eq!(m.restored.status.code(), Some(1), "restored run: {b}{}", text(&m.restored.stderr));
    assert!(a.contains("WORKLOAD ") && b.contains("WORKLOAD "), "not mid-workload:\n{a}\n---\n{b}");
    // The suspend flushes a partial console line; the resumed runtime's own line comes before
    // the rest of it. The kernel's bytes, joined, are QEMU's.
    let b_kernel: String = b.split_inclusive('\n').filter(|l| !l.starts_with("previrt")).collect();
    let joined = format!("{a}{b_kernel}");
    assert_eq!(kernel_lines(&joined), kernel_lines(&qemu.stdout), "saved + restored != QEMU TCG\n{a}\n---\n{b}");
}

fn hypercall(stats: &serde_json::Value, name: &str) -> u64 {
    stats["hypercalls"][name]["count"].as_u64().unwrap_or(0)
}

/// After the move only the new backend's exits: hypercalls (port 0xe8), ABI wrmsr, kicks
/// and injected upcalls — the runtime took over again, nothing is trapped and emulated.
fn assert_paravirtual_exits(stats: &serde_json::Value) {
    let reasons = stats["reasons"].as_object().unwrap();
    assert!(
        reasons.keys().all(|r| ["io_out", "wrmsr", "interrupted", "upcall_injected"].contains(&r.as_str())),
        "exit reasons after the move: {}",
        stats["reasons"]
    );
    for port in stats["ports"].as_object().unwrap().keys() {
        assert!(port.starts_with("0xe8") || port.starts_with("0xea"), "port exit {port} after the move");
    }
}

/// A cooperative move from `from` to `to`, after `after` exits: the stream continues, the
/// runtime says it resumed on `platform` with `backend` without writing a site, and only
/// paravirtual exits follow.
fn cooperative(name: &str, from: &str, to: &str, after: &str, platform: &str, backend: &str) -> Move {
    let m = migrate(name, from, to, after, &[]);
    assert_cooperative(&m);
    assert_stream_continues(&m);
    let b = text(&m.restored.stdout);
    assert!(b.contains(&format!("previrt: resumed on {platform}: backend={backend}")), "{b}");
    // hv and xen-hvm route the same kinds through the one shared entry: only its target
    // changes, no site is written.
    let line = b.lines().find(|l| l.starts_with("previrt: resumed on")).unwrap_or_default();
    assert!(line.contains(" rewritten=0 ") && !line.contains(" unchanged=0 "), "{line}");
    assert_paravirtual_exits(&m.stats);
    let a = text(&m.saved.stdout);
    assert!(a.contains("previrt: backend=auto chose"), "{a}");
    m
}

fn hypercall_names(s: &serde_json::Value) -> Vec<&String> {
    s["hypercalls"].as_object().unwrap().keys().collect()
}

#[test]
fn xen_3_0_2_to_current_xen_rebinds_with_the_new_calls() {
    let m = cooperative("302-to-417", "xen-3.0.2", "xen", "120exits", "xen-hvm", "xen-hvm");
    let a = text(&m.saved.stdout);
    assert!(a.contains("previrt-xen-hvm: Xen 3.0, sched_op_compat/event_channel_op_compat"), "{a}");
    let s = &m.stats;
    // Re-bound with the current calls; the compat ones are -ENOSYS on 4.17 and never used.
    assert!(hypercall(s, "xen:event_channel_op") >= 2 && hypercall(s, "xen:sched_op") > 0, "{}", s["hypercalls"]);
    assert_eq!(hypercall(s, "xen:event_channel_op_compat") + hypercall(s, "xen:sched_op_compat"), 0);
    assert!(hypercall(s, "xen:set_timer_op") > 0 && hypercall(s, "xen:hvm_op") > 0, "{}", s["hypercalls"]);
}

#[test]
fn in_tree_pv_to_xen_personality_repatches_for_xen_hvm() {
    let s = &cooperative("hv-to-xen", "previrt", "xen", "150exits", "xen-hvm", "xen-hvm").stats;
    assert!(hypercall(s, "xen:sched_op") > 0 && hypercall(s, "xen:set_timer_op") > 0, "{}", s["hypercalls"]);
    assert!(hypercall_names(s).iter().all(|k| k.starts_with("xen:")), "{}", s["hypercalls"]);
}

#[test]
fn xen_personality_to_in_tree_pv_repatches_for_hv() {
    let s = &cooperative("xen-to-hv", "xen", "previrt", "120exits", "previrt-hv", "hv").stats;
    assert!(hypercall_names(s).iter().all(|k| k.starts_with("previrt:")), "{}", s["hypercalls"]);
}

/// A guest that does not answer in time (`--suspend-timeout 0`) is saved as it is: the
/// personality's whole state goes into section Xen (shared_info, channels, callback vector,
/// timer), so under the same `--abi` the kernel carries on without knowing it moved; under
/// another one nothing re-patched it, and the restore is refused before anything runs.
#[test]
fn forced_xen_snapshot_resumes_under_xen_only() {
    let m = migrate("xen-forced", "xen", "xen", "120exits", &["--suspend-timeout", "0"]);
    let err = text(&m.saved.stderr);
    assert!(err.contains("forced: the guest did not suspend within 0 ms"), "{err}");
    assert_stream_continues(&m);
    let b = text(&m.restored.stdout);
    assert!(!b.contains("resumed on"), "a forced snapshot is not re-patched: {b}");
    assert_paravirtual_exits(&m.stats);
    // The restored guest keeps its timer channel and callback vector: no new bind or vector,
    // and its blocks are woken by the restored VIRQ_TIMER channel (SCHEDOP_block with no
    // event and no timer would stop the run with a message).
    let s = &m.stats;
    assert_eq!(hypercall(s, "xen:event_channel_op") + hypercall(s, "xen:hvm_op"), 0, "{}", s["hypercalls"]);
    assert!(hypercall(s, "xen:sched_op") > 0, "{}", s["hypercalls"]);

    let snap = Path::new(env!("CARGO_TARGET_TMPDIR")).join("migrate-xen/xen-forced/vm.snap");
    let o = previrt(&["restore", snap.to_str().unwrap(), "--abi", "previrt"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("cannot resume under --abi Previrt: nothing re-patched it"),
        "{}",
        text(&o.stderr)
    );
    assert!(o.stdout.is_empty(), "nothing ran: {}", text(&o.stdout));
}

/// An ordinary domain (`--domu`: console through the ring, console_io refused) is saved and
/// restored as one, cooperatively (the guest binds a new console channel, as after a Xen
/// migration) and forced (the console ring and channel are where the guest left them): the
/// stream continues, every console line after the move goes through the ring (an event-channel
/// send each, no console_io).
#[test]
fn domu_snapshots_keep_the_console_ring() {
    for (name, extra, after) in
        [("domu", &["--domu"][..], "150exits"), ("domu-forced", &["--domu", "--suspend-timeout", "0"][..], "120exits")]
    {
        let m = migrate(name, "xen", "xen", after, extra);
        assert_stream_continues(&m);
        let s = &m.stats;
        assert_eq!(hypercall(s, "xen:console_io"), 0, "{name}: {}", s["hypercalls"]);
        assert!(hypercall(s, "xen:event_channel_op") > 0, "{name}: no ring notification: {}", s["hypercalls"]);
        let b = text(&m.restored.stdout);
        match extra.len() {
            1 => {
                assert_cooperative(&m);
                assert!(b.contains("previrt: resumed on xen-hvm: backend=xen-hvm"), "{b}");
            }
            _ => assert!(!b.contains("resumed on"), "a forced snapshot is not re-patched: {b}"),
        }
    }
}
