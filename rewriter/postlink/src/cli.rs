//! `previrt patch` and `previrt verify`: one file or a directory tree at a time.
//!
//! Exit status: 0 success; 1 `verify` found a problem; 2 bad input (a file refused, unreadable,
//! not ELF, unsupported). A directory run processes every file in parallel (rayon), shows a
//! progress bar on a terminal only, and prints a summary table, or `--json`.

use crate::report::{FileReport, KindCount};
use crate::verify::{verify, VerifyReport};
use crate::{patch, Error, Options};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct PatchArgs {
    /// ELF file (.o, .ko, vmlinux) or directory walked recursively for ELF files.
    pub input: PathBuf,
    /// Output file, or output directory (mirrors the input tree) for a directory input.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Also patch the time class (rdtsc, rdtscp).
    #[arg(long)]
    pub time: bool,
    /// List every trap-based fallback with its reason.
    #[arg(long)]
    pub list: bool,
    /// Machine-readable report.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Original file or directory.
    pub original: PathBuf,
    /// Patched file or directory (same relative paths).
    pub patched: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// Files under `root` that start with the ELF magic, as paths relative to `root`.
fn elf_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel))? {
            let e = e?;
            let p = rel.join(e.file_name());
            let ty = e.file_type()?;
            if ty.is_dir() {
                stack.push(p);
            } else if ty.is_file() {
                let mut magic = [0u8; 4];
                if std::fs::File::open(e.path()).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
                    && magic == *b"\x7fELF"
                {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn progress(n: usize) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Run `each` over the files of a directory (or the single file), in parallel.
fn over_files<T: Send>(input: &Path, each: impl Fn(&Path) -> T + Sync) -> Result<Vec<(PathBuf, T)>, String> {
    if !input.is_dir() {
        return Ok(vec![(PathBuf::new(), each(Path::new("")))]);
    }
    let files = elf_files(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let pb = progress(files.len());
    let out = files
        .into_par_iter()
        .map(|rel| {
            let r = each(&rel);
            pb.inc(1);
            (rel, r)
        })
        .collect();
    pb.finish_and_clear();
    Ok(out)
}

#[derive(Serialize, Default)]
struct Summary {
    files: usize,
    patched: usize,
    refused: usize,
    sensitive: usize,
    pv_sites: usize,
    sites: usize,
    trampolines: usize,
    traps: usize,
    coverage: f64,
    signatures_stripped: usize,
    seconds: f64,
    by_kind: BTreeMap<&'static str, KindCount>,
    refusals: Vec<(String, String)>,
}

pub fn patch_cmd(a: &PatchArgs) -> i32 {
    let start = Instant::now();
    let opts = Options { time: a.time };
    let dir = a.input.is_dir();
    if dir {
        if let Err(e) = std::fs::create_dir_all(&a.output) {
            eprintln!("{}: {e}", a.output.display());
            return 2;
        }
    } else if a.output.is_dir() {
        eprintln!("{}: is a directory; give an output file for a single input", a.output.display());
        return 2;
    }
    let results = over_files(&a.input, |rel| -> Result<FileReport, Error> {
        let (inp, out) =
            if dir { (a.input.join(rel), a.output.join(rel)) } else { (a.input.clone(), a.output.clone()) };
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        if out.exists() && std::fs::canonicalize(&inp)? == std::fs::canonicalize(&out)? {
            return Err(Error::Input("output is the input file; the patcher never modifies its input".into()));
        }
        let data = std::fs::read(&inp)?;
        let p = patch(&data, &opts)?;
        previrt_atomic_write::write(&out, &p.data)?;
        let mut r = p.report;
        r.file = inp.display().to_string();
        r.output = Some(out.display().to_string());
        Ok(r)
    });
    let results = match results {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    if let [(_, Err(e))] = &results[..] {
        if !dir {
            eprintln!("previrt patch: {}: {e}", a.input.display());
            return 2;
        }
    }
    let mut s = Summary { files: results.len(), ..Default::default() };
    let mut reports = Vec::new();
    for (rel, r) in results {
        let name = if dir { a.input.join(&rel) } else { a.input.clone() };
        match r {
            Ok(r) => {
                s.patched += 1;
                s.sensitive += r.sensitive;
                s.pv_sites += r.pv_sites;
                s.sites += r.sites;
                s.trampolines += r.trampolines;
                s.traps += r.traps;
                s.signatures_stripped += r.signature_stripped as usize;
                for (k, c) in &r.by_kind {
                    let t = s.by_kind.entry(k).or_default();
                    t.trampoline += c.trampoline;
                    t.trap += c.trap;
                    t.in_place += c.in_place;
                }
                reports.push(r);
            }
            Err(e) => {
                s.refused += 1;
                s.refusals.push((name.display().to_string(), e.to_string()));
            }
        }
    }
    let found = s.sensitive + s.pv_sites;
    s.coverage = if found == 0 { 100.0 } else { 100.0 * s.sites.min(found) as f64 / found as f64 };
    s.seconds = start.elapsed().as_secs_f64();
    if a.json {
        let files: Vec<&FileReport> = reports.iter().collect();
        println!("{}", serde_json::json!({ "summary": s, "files": files }));
    } else {
        print_patch(&s, &reports, a.list, dir);
    }
    if s.refused > 0 {
        2
    } else {
        0
    }
}

fn print_patch(s: &Summary, reports: &[FileReport], list: bool, dir: bool) {
    if !dir {
        if let Some(r) = reports.first() {
            println!("{} -> {}", r.file, r.output.as_deref().unwrap_or("?"));
        }
    }
    println!("{:<12} {:>11} {:>6} {:>9}", "kind", "trampoline", "trap", "in place");
    for (k, c) in &s.by_kind {
        println!("{:<12} {:>11} {:>6} {:>9}", k, c.trampoline, c.trap, c.in_place);
    }
    println!(
        "files {}  patched {}  refused {}  sensitive {}  pv sites {}  sites {} ({} trampolines, {} trap fallbacks)  coverage {:.2}%  {:.2} s",
        s.files, s.patched, s.refused, s.sensitive, s.pv_sites, s.sites, s.trampolines, s.traps, s.coverage, s.seconds
    );
    if s.signatures_stripped > 0 {
        println!("note: {} module signature(s) removed: any edit invalidates a signature; re-sign with the kernel's scripts/sign-file", s.signatures_stripped);
    }
    if list {
        for r in reports {
            for f in &r.fallbacks {
                println!("trap {} {}:{:#x} {}: {}", r.file, f.section, f.address, f.kind, f.reason);
            }
        }
    }
    for (f, e) in &s.refusals {
        println!("refused {f}: {e}");
    }
}

pub fn verify_cmd(a: &VerifyArgs) -> i32 {
    let dir = a.original.is_dir();
    if dir != a.patched.is_dir() {
        eprintln!("{} and {}: give two files or two directories", a.original.display(), a.patched.display());
        return 2;
    }
    let results = over_files(&a.original, |rel| -> Result<VerifyReport, Error> {
        let (o, p) =
            if dir { (a.original.join(rel), a.patched.join(rel)) } else { (a.original.clone(), a.patched.clone()) };
        let read = |f: &Path| std::fs::read(f).map_err(|e| Error::Input(format!("{}: {e}", f.display())));
        let mut r = verify(&read(&o)?, &read(&p)?)?;
        r.original = o.display().to_string();
        r.patched = p.display().to_string();
        Ok(r)
    });
    let results = match results {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let (mut bad_input, mut failed) = (0, 0);
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    for (rel, r) in results {
        match r {
            Ok(r) => {
                failed += !r.ok as usize;
                reports.push(r);
            }
            Err(e) => {
                bad_input += 1;
                errors.push(format!("{}: {e}", if dir { a.original.join(rel) } else { a.original.clone() }.display()));
            }
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "files": reports.len() + errors.len(), "passed": reports.len() - failed, "failed": failed, "bad_input": errors, "reports": reports })
        );
    } else {
        for r in reports.iter().filter(|r| !r.ok || !dir) {
            println!(
                "{} {}: {} sites, {} windows, {} traps, {} pv sites; sensitive {}/{} covered; {} table entries checked",
                if r.ok { "PASS" } else { "FAIL" },
                r.patched,
                r.sites,
                r.windows,
                r.traps,
                r.pv_sites,
                r.covered,
                r.sensitive,
                r.table_refs
            );
            for p in &r.problems {
                println!("  {p}");
            }
            if r.problem_count > r.problems.len() {
                println!("  ... {} more", r.problem_count - r.problems.len());
            }
        }
        for e in &errors {
            println!("bad input {e}");
        }
        if dir {
            println!(
                "verified {} files: {} passed, {} failed, {} bad input",
                reports.len() + errors.len(),
                reports.len() - failed,
                failed,
                errors.len()
            );
        }
    }
    if bad_input > 0 {
        2
    } else if failed > 0 {
        1
    } else {
        0
    }
}
