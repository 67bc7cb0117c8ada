//! Boot-time patching cost per site on a synthetic table (bench/patch.sh runs this).
//!
//! Builds, in one host buffer, N sites of a realistic mix of kinds and lengths, their save
//! slots and a `.previrt.sites` table whose PC-relative records point at them, then times the
//! runtime's own patcher (the code the guest runs): first patch (save originals, build the
//! sorted index, write every site) for the native and the trace backend, and a re-patch
//! trace → native. Best of several runs; the buffer is restored outside the timed region.
//!
//!   cargo run --release -p previrt-link --example patch_bench [N] [--json]

use previrt_runtime::backend::{NATIVE, TRACE};
use previrt_runtime::patch::{IndexEntry, Patcher};
use previrt_site_abi::{ChunkHeader, Kind, Producer, Resolved, SiteRecord, HEADER_SIZE, RECORD_SIZE};
use std::time::Instant;

/// (kind, original bytes, site length): the shapes the assembler path emits most.
const MIX: &[(Kind, &[u8], u8)] = &[
    (Kind::Cli, &[0xfa], 5),
    (Kind::Sti, &[0xfb], 5),
    (Kind::Pushf, &[0x9c], 5),
    (Kind::Popf, &[0x9d], 5),
    (Kind::Out, &[0xe6, 0x80], 5),
    (Kind::In, &[0xec], 5),
    (Kind::MovCr, &[0x0f, 0x22, 0xd8], 5),
    (Kind::Wrmsr, &[0x0f, 0x30], 5),
    (Kind::Invlpg, &[0x0f, 0x01, 0x3f], 5),
    (Kind::Cpuid, &[0x0f, 0xa2], 5),
];

struct Image {
    buf: Vec<u8>,
    table_off: usize,
    table_len: usize,
}

fn build(n: usize) -> Image {
    let code_len: usize = (0..n).map(|i| MIX[i % MIX.len()].2 as usize).sum();
    let save_len: usize = (0..n).map(|i| MIX[i % MIX.len()].1.len()).sum();
    let table_len = HEADER_SIZE + n * RECORD_SIZE;
    let mut buf = vec![0x90u8; code_len + save_len + table_len];
    let base = buf.as_ptr() as u64;
    let (save_off, table_off) = (code_len, code_len + save_len);
    buf[table_off..table_off + HEADER_SIZE]
        .copy_from_slice(&ChunkHeader::new(Producer::Assembler, n as u32).to_bytes());
    let (mut at, mut save) = (0usize, save_off);
    for i in 0..n {
        let (kind, insn, len) = MIX[i % MIX.len()];
        buf[at..at + insn.len()].copy_from_slice(insn);
        let rec_off = table_off + HEADER_SIZE + i * RECORD_SIZE;
        let mut r = SiteRecord { kind: kind as u16, site_len: len, insn_len: insn.len() as u8, ..Default::default() };
        let site = base + at as u64;
        r.set_targets(
            base + rec_off as u64,
            Resolved { site, save: base + save as u64, resume: site + len as u64, origin: site },
        );
        buf[rec_off..rec_off + RECORD_SIZE].copy_from_slice(&r.to_bytes());
        at += len as usize;
        save += insn.len();
    }
    Image { buf, table_off, table_len }
}

fn best_ns(runs: usize, mut f: impl FnMut() -> u128) -> u128 {
    (0..runs).map(|_| f()).min().unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(10_000);
    let json = args.iter().any(|a| a == "--json");
    let mut img = build(n);
    let pristine = img.buf.clone();
    let table = img.buf.as_ptr() as u64 + img.table_off as u64;
    // A stand-in stub address within rel32 reach; the bench never executes the sites.
    let stub = img.buf.as_ptr() as u64;
    let mut index = vec![IndexEntry::default(); n];
    let runs = 15;

    let mut first = |backend| {
        best_ns(runs, || {
            img.buf.copy_from_slice(&pristine);
            let t = Instant::now();
            // SAFETY: the table, sites and save slots all live in img.buf.
            let p = unsafe { Patcher::prepare(table, img.table_len, &mut index) }.expect("valid table");
            let stats = unsafe { p.apply(backend, stub) };
            let ns = t.elapsed().as_nanos();
            assert_eq!(stats.sites, n);
            ns
        })
    };
    let native = first(&NATIVE);
    let trace = first(&TRACE);
    img.buf.copy_from_slice(&pristine);
    // SAFETY: as above.
    let p = unsafe { Patcher::prepare(table, img.table_len, &mut index) }.expect("valid table");
    let repatch = best_ns(runs, || {
        unsafe { p.apply(&TRACE, stub) };
        let t = Instant::now();
        let stats = unsafe { p.apply(&NATIVE, stub) };
        let ns = t.elapsed().as_nanos();
        assert_eq!(stats.routed, 0);
        ns
    });
    let per = |ns: u128| ns as f64 / n as f64;
    let target = 100.0;
    if json {
        println!(
            "{{\"sites\":{n},\"first_patch_native_ns_per_site\":{:.1},\"first_patch_trace_ns_per_site\":{:.1},\"repatch_trace_to_native_ns_per_site\":{:.1},\"repatch_total_us\":{:.1},\"target_ns_per_site\":{target}}}",
            per(native), per(trace), per(repatch), repatch as f64 / 1000.0
        );
        return;
    }
    println!("synthetic table: {n} sites, best of {runs} runs, runtime patcher on the host");
    println!("{:<34} {:>12} {:>10} {:>14}", "pass", "ns/site", "target", "target/actual");
    for (name, ns) in
        [("first patch, native", native), ("first patch, trace", trace), ("re-patch trace -> native", repatch)]
    {
        println!("{:<34} {:>12.1} {:>10.0} {:>13.1}x", name, per(ns), target, target / per(ns));
    }
    println!("re-patch of all {n} sites: {:.1} us (migration target: 1000 us)", repatch as f64 / 1000.0);
}
